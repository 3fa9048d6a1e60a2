"""Parameter and FLOP counts, as in the papers' tables: total vs activated parameters, GFLOPs per sample.

FLOPs are 2 x multiply-accumulates of the linear layers plus the attention score (QK^T) and value (AV)
products, counted over the full T x context matrix (what dense kernels compute; no causal halving; a
sliding-window layer's context is min(T, window)). Norms, activations, softmax and embeddings lookups are
not counted. A sparse layer counts only the experts a token uses: MoE top-k experts + router, EVF one FFN
+ router (no router for a sample without an image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..config import SparseConfig
from ..model.sparse import select_layers, sparse_modules, sparsify


# ---- parameters --------------------------------------------------------------------------------
def count_params(module: Optional[nn.Module]) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def param_report(lm: nn.Module, vision: Optional[nn.Module] = None, projector: Optional[nn.Module] = None) -> dict:
    """Total and activated-per-token parameters. Activated leaves out, in every sparse layer, the experts a
    token does not use: (E - k) experts for MoE, one of the two FFNs for EVF."""
    inactive = 0
    layers = []
    for m in sparse_modules(lm):
        per_expert = count_params(m.experts[0])
        inactive += per_expert * (m.num_experts - m.top_k)
        layers.append(m.layer_idx)
    parts = {"language": count_params(lm), "vision": count_params(vision), "projector": count_params(projector)}
    total = sum(parts.values())
    return {"total": total, "activated": total - inactive, "parts": parts, "sparse_layers": sorted(layers)}


def lm_param_report_from_config(lm_config, sparse: Optional[SparseConfig] = None) -> dict:
    """param_report of an LM known only by its config (e.g. Gemma-7B), built on the meta device: no memory, exact."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config)
    if sparse is not None:
        sparsify(lm, sparse)
    return param_report(lm)


# ---- FLOPs -------------------------------------------------------------------------------------
@dataclass
class VisionSpec:
    """A ViT-style vision tower by its shapes, or any tower by a fixed FLOP count per image."""

    hidden: int = 0
    layers: int = 0  # layers actually run: LLaVA reads the penultimate layer, so num_hidden_layers - 1
    intermediate: int = 0
    patch: int = 14
    image_size: int = 336
    channels: int = 3
    prefix_tokens: int = 1  # CLS (+ registers); SigLIP has none
    flops: Optional[float] = None  # fixed FLOPs per image (e.g. a CNN), overrides the ViT formula

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + self.prefix_tokens

    def image_flops(self) -> float:
        if self.flops is not None:
            return float(self.flops)
        t, h = self.tokens, self.hidden
        patches = (self.image_size // self.patch) ** 2
        embed = 2 * patches * self.channels * self.patch * self.patch * h
        per_layer = 2 * t * (4 * h * h + 2 * h * self.intermediate) + 2 * 2 * t * t * h
        return float(embed + self.layers * per_layer)


def vision_spec_from_config(config, select_layer: int = -2, image_size: Optional[int] = None) -> VisionSpec:
    """VisionSpec of a transformers CLIP / SigLIP / DINOv2 vision config; `select_layer` as in VisionConfig."""
    vc = getattr(config, "vision_config", config)
    kind = getattr(vc, "model_type", "")
    layers = vc.num_hidden_layers + 1 + select_layer if select_layer < 0 else select_layer
    if kind == "dinov2":  # DINOv2 sizes its MLP by a ratio
        inter = int(vc.hidden_size * getattr(vc, "mlp_ratio", 4))
    else:
        inter = vc.intermediate_size
    prefix = 0 if kind.startswith("siglip") else 1 + getattr(vc, "num_register_tokens", 0)
    return VisionSpec(vc.hidden_size, layers, inter, vc.patch_size, image_size or vc.image_size, getattr(vc, "num_channels", 3), prefix)


def lm_flops(lm_config, sparse: Optional[SparseConfig], image_tokens: int, text_tokens: int, ffn_matrices: int = 3) -> dict:
    """FLOPs of one LM forward over image_tokens + text_tokens tokens (logits at every position).
    ffn_matrices: 3 for gated FFNs (Gemma, Llama: gate, up, down), 2 for plain ones."""
    c = lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config
    d, inter, n_layers, heads = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or d // heads
    t = image_tokens + text_tokens
    types = getattr(c, "layer_types", None) or ["full_attention"] * n_layers
    window = getattr(c, "sliding_window", None)
    sparse_idx = set(select_layers(sparse.layers, n_layers)) if sparse is not None and sparse.kind != "none" else set()
    ffn_dense = 2 * t * ffn_matrices * d * inter
    out = {"attention_proj": 0, "attention_scores": 0, "ffn": 0, "router": 0, "lm_head": 2 * t * d * c.vocab_size}
    for i in range(n_layers):
        ctx = min(t, window) if window and types[i] == "sliding_attention" else t
        out["attention_proj"] += 2 * t * (d * heads * hd + 2 * d * kv * hd + heads * hd * d)
        out["attention_scores"] += 2 * 2 * t * ctx * heads * hd
        if i not in sparse_idx:
            out["ffn"] += ffn_dense
        elif sparse.kind == "moe":
            out["ffn"] += sparse.top_k * ffn_dense
            out["router"] += 2 * t * d * sparse.num_experts
        else:  # EVF: one FFN per token; the router runs only when the sample has an image
            out["ffn"] += ffn_dense
            out["router"] += 2 * t * d * 2 if image_tokens > 0 else 0
    out["total"] = sum(out.values())
    return out


def flops_per_sample(lm_config, sparse: Optional[SparseConfig], vision: Optional[VisionSpec], image_tokens: int, text_tokens: int,
                     projector_flops: float = 0.0, images: int = 1, ffn_matrices: int = 3) -> dict:
    """FLOPs of one sample: vision tower (per image) + projector + LM. Returns a breakdown and 'total' (FLOPs)."""
    has_image = image_tokens > 0
    lm = lm_flops(lm_config, sparse, image_tokens, text_tokens, ffn_matrices)
    vis = images * vision.image_flops() if (vision is not None and has_image) else 0.0
    proj = float(projector_flops) if has_image else 0.0
    total = vis + proj + lm["total"]
    return {"total": total, "gflops": total / 1e9, "vision": vis, "projector": proj, "language": lm,
            "tokens": {"image": image_tokens, "text": text_tokens}, "vision_spec": asdict(vision) if vision else None}


def measured_flops(fn, *args) -> int:
    """FLOPs torch counts for fn(*args) (matmuls and convs; CPU SDPA attention is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()
