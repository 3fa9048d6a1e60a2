"""Run one training stage end to end: model, data, cached features, plan, loop, checkpoint."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch

from ..backbones.language import stop_token_ids
from ..config import ModelConfig, SparseConfig, StageConfig
from ..data.conversation import ConversationEncoder, SampleError
from ..data.features import FeatureCache
from ..data.llava_json import load_samples
from ..errors import LlavaGMError
from ..model.build import apply_sparse, build_model, load_checkpoint, save_checkpoint
from ..precision import use_bf16
from .loop import render_sample, train_loop
from .stages import describe_plan, plan_stage


def _drop_bad_images(samples, failed: dict, stage: StageConfig, skipped, data: str):
    if not failed:
        return samples
    kept = []
    for s in samples:
        if s.image in failed:
            err = SampleError(s.id, failed[s.image])
            if stage.on_bad != "skip":
                raise LlavaGMError(f"{data}: {err}\n(pass --on-bad skip to leave bad samples out and count them)")
            skipped.add(err)
        else:
            kept.append(s)
    return kept


def _sparse_param_names(model) -> set[str]:
    """Every parameter of the sparse layers: their frozen copies carry stage-2 weights, so they are saved too."""
    from ..model.sparse import decoder_layers

    layers = decoder_layers(model.lm)
    mlps = {id(layers[i].mlp) for i in model.sparse_layers}
    names = set()
    for mname, module in model.named_modules():
        if id(module) in mlps:
            names |= {f"{mname}.{n}" for n, _ in module.named_parameters()}
    return names


def _loss_plot(steps: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s["step"] for s in steps], [s["lm_loss"] for s in steps], label="language loss")
    for key in sorted({k for s in steps for k in s if k.startswith("aux_")}):
        ax.plot([s["step"] for s in steps], [s.get(key, 0.0) for s in steps], label=key[4:] + " loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def answer_words(samples, model) -> tuple[list[int], list[int]]:
    """The word-token projector's vocabulary: every token the answers use (special and stop tokens left out), and
    its content words: those in under half of the answers ("A" and "." in every caption are not content)."""
    special = set(model.tokenizer.all_special_ids) | set(stop_token_ids(model.lm, model.tokenizer))
    seen = Counter(t for s in samples for t in {t for t in s.encoded.labels if t >= 0 and t not in special})  # answers per word
    if not seen:
        raise LlavaGMError("the word-token projector needs answers with words in its first training stage's data")
    return sorted(seen), sorted(t for t, n in seen.items() if n < 0.5 * len(samples))


def run_stage(stage: StageConfig, output: str | Path, model_cfg: Optional[ModelConfig] = None, init: Optional[str] = None,
              sparse: Optional[SparseConfig] = None, progress: bool = True, say: Callable[[str], None] = print) -> dict:
    """Train `stage` starting from checkpoint `init` (or fresh backbones from `model_cfg`); write a checkpoint to `output`."""
    output = Path(output)
    if output.exists():
        raise LlavaGMError(f"{output} exists; choose a new output folder or remove it (nothing was overwritten)")
    if not stage.data:
        raise LlavaGMError(f"stage {stage.name}: no training data given (--data or the recipe's stages[].data)")
    torch.manual_seed(stage.seed)
    model = load_checkpoint(init) if init else build_model(model_cfg or ModelConfig())
    if stage.word_loss and not model.cfg.projector.word_tokens:
        raise LlavaGMError(f"stage {stage.name}: word_loss needs a word-token projector (model.projector.word_tokens: true); "
                           "set it in the recipe, or set word_loss to 0")
    if stage.name == "sparsify" and not model.sparse_layers:
        if sparse is None or sparse.kind == "none":
            raise LlavaGMError("stage sparsify needs a sparse layer kind: --sparse moe|evf (or model.sparse.kind in the recipe)")
        model.cfg.sparse = sparse
        apply_sparse(model)
        model.trained_keys |= _sparse_param_names(model)
        say(f"sparse layers ({sparse.kind}) at decoder layers {model.sparse_layers}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if stage.lora:
        if stage.name != "instruct":
            raise LlavaGMError("LoRA applies to stage instruct only")
        from peft import LoraConfig, get_peft_model

        model.lm = get_peft_model(model.lm, LoraConfig(r=stage.lora_rank, lora_alpha=stage.lora_alpha, lora_dropout=0.05,
                                                       target_modules="all-linear"))

    encoder = ConversationEncoder(model.tokenizer, model.num_image_tokens, model.cfg.language.max_length)
    samples, skipped = load_samples(stage.data, stage.image_folder, encoder, stage.on_bad, stage.max_samples)
    cache = FeatureCache(model.vision_tower)
    features, failed = cache.features([s.image for s in samples if s.image is not None], progress=progress)
    samples = _drop_bad_images(samples, failed, stage, skipped, stage.data)
    if model.cfg.projector.word_tokens and model.cfg.projector.word_ids is None:
        model.cfg.projector.word_ids, model.cfg.projector.word_targets = answer_words(samples, model)
        say(f"word-token projector: {len(model.cfg.projector.word_ids)} words from this stage's answers, "
            f"{len(model.cfg.projector.word_targets)} of them content words")
    if len(skipped):
        say(skipped.summary())
    say(f"{len(samples)} samples from {stage.data}; vision features cached in {cache.root}")
    say("one rendered sample ([[...]] = tokens the loss learns):\n" + render_sample(model.tokenizer, samples[0], model.num_image_tokens))

    trainable = plan_stage(model, stage)
    say(describe_plan(model, trainable))
    if use_bf16(device, stage.precision) and device.type == "cpu":
        # frozen weights that were never trained: keep them in bf16, as autocast would cast them every step anyway
        for n, p in model.named_parameters():
            if not p.requires_grad and n not in model.trained_keys and not n.startswith("vision_tower.") and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)

    log = train_loop(model, stage, samples, features, trainable, progress=progress)

    if stage.lora:
        model.lm = model.lm.merge_and_unload()  # a plain LM again: later stages and loading need no PEFT
        trainable = [n for n in trainable if "lora_" not in n] + [n for n, _ in model.named_parameters() if n.startswith("lm.") and ".layers." in n]
    model.trained_keys |= set(trainable)
    for n, p in model.named_parameters():  # saved weights in fp32, whatever the stage kept in memory
        if n in model.trained_keys and p.dtype != torch.float32:
            p.data = p.data.float()
    first, last = log.steps[0]["lm_loss"], log.last_mean("lm_loss")
    record = {"stage": stage.name, "data": stage.data, "samples": len(samples), "skipped": len(skipped), "steps": len(log.steps),
              "lr": stage.lr, "batch_size": stage.batch_size, "grad_accum": stage.grad_accum, "epochs": stage.epochs, "lora": stage.lora,
              "first_loss": first, "final_loss": last, "init": init}
    save_checkpoint(model, output, stage=record, extra={
        "train_log.json": json.dumps({"steps": log.steps, "skipped": skipped.reasons}, indent=1).encode(),
        "loss.png": _loss_plot(log.steps, f"stage {stage.name}"),
    })
    say(f"stage {stage.name}: loss {first:.3f} -> {last:.3f} over {len(log.steps)} steps; checkpoint {output}")
    return {**record, "checkpoint": str(output)}
