"""`llava-gm stats` (parameters, GFLOPs per sample) and `llava-gm routing` (expert routing over data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import LlavaGMError
from .params_flops import VisionSpec, flops_per_sample, measured_flops, param_report, vision_spec_from_config


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("stats", help="total / activated parameters and GFLOPs per sample of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample for the FLOP count")
    p.add_argument("--image-tokens", type=int, help="image tokens the LM sees (default: the model's own count)")
    p.add_argument("--json", help="also write the report to this file")
    p.set_defaults(func=cmd_stats)

    p = subparsers.add_parser("routing", help="expert load, drop rate and router entropy per sparse layer over data (JSON + plots)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="LLaVA-format JSON")
    p.add_argument("--image-folder", default="", help="folder the data's image paths are relative to (default: the JSON's folder)")
    p.add_argument("--output", required=True, help="folder for routing.json and the plots")
    p.add_argument("--max-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_routing)


# ---- pure parts (testable on any model with .lm, .projector, .vision_tower) ------------------------
def vision_spec_of(tower) -> Optional[VisionSpec]:
    """Shapes of a transformers tower (attention counted analytically); else the FLOPs torch counts for one image."""
    if tower is None:
        return None
    hf = getattr(tower, "model", None)
    if hf is not None and hasattr(hf, "config") and hasattr(getattr(hf.config, "vision_config", hf.config), "patch_size"):
        return vision_spec_from_config(hf.config, getattr(tower, "select_layer", -2), getattr(tower, "image_size", None))
    from PIL import Image

    size = getattr(tower, "image_size", 224)
    return VisionSpec(flops=measured_flops(tower, tower.preprocess([Image.new("RGB", (size, size))])))


def model_report(model, text_tokens: int = 64, image_tokens: Optional[int] = None) -> dict:
    """Parameters (total, activated) and FLOPs per sample (with one image, and text only) of a LLaVA model."""
    lm = model.lm
    n_img = model.num_image_tokens if image_tokens is None else image_tokens
    sparse = model.cfg.sparse if getattr(model, "sparse_layers", None) else None
    proj_in = torch.zeros(1, model.vision_tokens, model.vision_dim, dtype=next(model.projector.parameters()).dtype)
    proj = measured_flops(model.projector, proj_in)
    vision = vision_spec_of(getattr(model, "vision_tower", None))
    with_image = flops_per_sample(lm.config, sparse, vision, n_img, text_tokens, projector_flops=proj)
    text_only = flops_per_sample(lm.config, sparse, vision, 0, text_tokens)
    return {
        "params": param_report(lm, getattr(model, "vision_tower", None), model.projector),
        "sparse": None if sparse is None else {"kind": sparse.kind, "layers": list(model.sparse_layers)},
        "flops_with_image": with_image,
        "flops_text_only": text_only,
    }


def format_report(r: dict) -> str:
    p = r["params"]
    f, t = r["flops_with_image"], r["flops_text_only"]
    lines = [
        f"parameters: total {p['total'] / 1e6:,.1f}M, activated per token {p['activated'] / 1e6:,.1f}M "
        f"(language {p['parts']['language'] / 1e6:,.1f}M, vision {p['parts']['vision'] / 1e6:,.1f}M, projector {p['parts']['projector'] / 1e6:,.2f}M)",
        f"sparse layers: {r['sparse']['kind']} at {r['sparse']['layers']}" if r["sparse"] else "sparse layers: none (dense)",
        f"GFLOPs per sample ({f['tokens']['image']} image + {f['tokens']['text']} text tokens): {f['gflops']:,.2f} "
        f"(vision {f['vision'] / 1e9:,.2f}, projector {f['projector'] / 1e9:,.3f}, language {f['language']['total'] / 1e9:,.2f})",
        f"GFLOPs per text-only sample ({t['tokens']['text']} tokens): {t['gflops']:,.2f}",
    ]
    return "\n".join(lines)


# ---- handlers (need the model loader and the data pipeline) ----------------------------------------
def _load(path):
    from ..model.build import load_checkpoint

    return load_checkpoint(path)


def cmd_stats(a) -> None:
    model = _load(a.checkpoint)
    report = model_report(model, a.text_tokens, a.image_tokens)
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
        print(f"written: {a.json}")


def data_batches(model, data: str, image_folder: str, max_samples: int, batch_size: int) -> list[dict]:
    """The training pipeline's batches for `data` (chat template, cached vision features, padding)."""
    from ..data.conversation import ConversationEncoder
    from ..data.features import FeatureCache
    from ..data.llava_json import load_samples
    from ..train.loop import collate

    encoder = ConversationEncoder(model.tokenizer, model.num_image_tokens, model.cfg.language.max_length)
    samples, _ = load_samples(data, image_folder, encoder, "skip", max_samples)
    features, _ = FeatureCache(model.vision_tower).features([s.image for s in samples if s.image is not None])
    samples = [s for s in samples if s.image is None or s.image in features]
    device = next(model.lm.parameters()).device
    pad = model.tokenizer.pad_token_id
    return [collate(samples[i : i + batch_size], features, pad, device) for i in range(0, len(samples), batch_size)]


def cmd_routing(a) -> None:
    from .routing import collect_routing, summarize, write_report

    model = _load(a.checkpoint)
    if not getattr(model, "sparse_layers", None):
        raise LlavaGMError(f"{a.checkpoint}: the model has no sparse layers (train stage 'sparsify' first)")
    batches = data_batches(model, a.data, a.image_folder, a.max_samples, a.batch_size)
    stats = collect_routing(model, batches)
    paths = write_report(stats, a.output)
    summary = summarize(stats)
    for layer, e in summary["layers"].items():
        print(f"layer {layer}: load text {[round(v, 3) for v in e['text']['load']]} image {[round(v, 3) for v in e['image']['load']]}"
              f"  drop {e['all']['drop_rate']:.3f}  entropy/logE {e['all']['entropy_norm']:.3f}")
    print("written: " + ", ".join(str(p) for p in paths.values()))
