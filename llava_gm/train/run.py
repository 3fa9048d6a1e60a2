"""Run one training stage end to end: model, data, vision features, plan, loop, step checkpoints, checkpoint."""

from __future__ import annotations

import io
import json
import os
import shutil
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
from ..model.sparse import sparse_param_names
from . import distributed
from .checkpoint import StepCheckpoints
from .data import StageDataset
from .distributed import broadcast
from .loop import RunSettings, render_sample, train_loop
from .precision import store, train_precision
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


def _finished(output: Path, stage: StageConfig, resume: bool, resume_command: str, say) -> Optional[dict]:
    """A stage whose checkpoint exists: reused with --resume, else an error naming the command that continues."""
    if not output.exists():
        return None
    if not resume:
        how = f"to continue the run from there: {resume_command} --resume" if resume_command else "pass --resume to reuse it and continue"
        raise LlavaGMError(f"{output} exists (a finished stage {stage.name}; nothing was overwritten); {how}, or choose a new --output")
    from ..model.build import read_checkpoint_config

    _, history = read_checkpoint_config(output)
    record = next((h for h in reversed(history) if isinstance(h, dict) and h.get("stage") == stage.name), {"stage": stage.name})
    say(f"stage {stage.name}: reusing the finished checkpoint {output}")
    return {**record, "checkpoint": str(output)}


def _stage_data(model, stage: StageConfig, samples, skipped, online: bool, ranks, progress: bool):
    """The stage's dataset: cached features (rank 0 fills the cache, every rank reads it) or pixels for the step."""
    if online:
        return samples, StageDataset(samples, preprocess=model.vision_tower.preprocess), "computed in each step (online)"
    cache = FeatureCache(model.vision_tower)
    prepared = None
    if ranks.main:
        prepared = cache.prepare([s.image for s in samples if s.image is not None], progress=progress)
    keys, failed = broadcast(prepared, ranks)
    if not ranks.main:
        cache = FeatureCache(model.vision_tower)  # rank 0 wrote new shards: read their index
    samples = _drop_bad_images(samples, failed, stage, skipped, stage.data)
    return samples, StageDataset(samples, reader=cache.reader(), keys=keys), f"cached in {cache.root}"


def run_stage(stage: StageConfig, output: str | Path, model_cfg: Optional[ModelConfig] = None, init: Optional[str] = None,
              sparse: Optional[SparseConfig] = None, progress: bool = True, say: Callable[[str], None] = print, *,
              resume: bool = False, save_every: int = 0, keep_last: int = 2, features: str = "auto",
              workers: Optional[int] = None, resume_command: str = "", strategy: str = "ddp",
              activation_checkpointing: bool = False) -> dict:
    """Train `stage` starting from checkpoint `init` (or fresh backbones from `model_cfg`); write a checkpoint to `output`.

    Every `save_every` optimizer steps a step checkpoint goes to `<output>.steps/` (the last `keep_last` kept);
    `resume` continues from the newest intact one, or reuses `output` if the stage finished. Under torchrun every
    rank runs this; only rank 0 prints and writes. `strategy` (several processes): ddp | fsdp (FSDP2 shards);
    `activation_checkpointing` recomputes decoder layers in the backward."""
    output = Path(output)
    ranks = distributed.setup()
    if not ranks.main:
        say, progress = (lambda m: None), False
    if features not in ("auto", "online", "cache"):
        raise LlavaGMError(f"features {features!r}: use online, cache or auto")
    if strategy not in ("ddp", "fsdp"):
        raise LlavaGMError(f"strategy {strategy!r}: use ddp (replicated weights) or fsdp (sharded, FSDP2)")
    for name, value, least in (("save_every", save_every, 0), ("keep_last", keep_last, 1), ("workers", workers or 0, 0)):
        if not isinstance(value, int) or value < least:
            raise LlavaGMError(f"{name} {value!r}: use a whole number of at least {least}")
    done = _finished(output, stage, resume, resume_command, say)
    if done is not None:
        return done
    if not stage.data:
        raise LlavaGMError(f"stage {stage.name}: no training data given (--data or the recipe's stages[].data)")
    steps = StepCheckpoints(output, keep_last, say)
    if ranks.main:
        steps.acquire()
    try:
        if ranks.main and steps.existing() and not resume:
            how = f"{resume_command} --resume" if resume_command else "the same command with --resume"
            raise LlavaGMError(f"{steps.dir} holds the step checkpoints of an interrupted run of stage {stage.name} "
                               f"(newest: {steps.existing()[-1].name}); continue it with: {how} "
                               f"(or remove {steps.dir} to start the stage again)")
        result = _run(stage, output, model_cfg, init, sparse, progress, say, ranks, steps, resume, save_every, features,
                      workers, resume_command, strategy, activation_checkpointing)
    except BaseException:
        steps.release()
        if ranks.main and steps.dir.is_dir() and not steps.existing():
            shutil.rmtree(steps.dir, ignore_errors=True)  # nothing worth keeping: leave no empty folder behind
        raise
    return result


def _run(stage, output, model_cfg, init, sparse, progress, say, ranks, steps, resume, save_every, features, workers, resume_command,
         strategy="ddp", activation_checkpointing=False):
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
        model.trained_keys |= sparse_param_names(model)  # their frozen copies carry stage-2 weights: saved too
        say(f"sparse layers ({sparse.kind}) at decoder layers {model.sparse_layers}")
    device = ranks.device
    model.to(device)
    if stage.lora:
        if stage.name != "instruct":
            raise LlavaGMError("LoRA applies to stage instruct only")
        from peft import LoraConfig, get_peft_model

        model.lm = get_peft_model(model.lm, LoraConfig(r=stage.lora_rank, lora_alpha=stage.lora_alpha, lora_dropout=0.05,
                                                       target_modules="all-linear"))

    encoder = ConversationEncoder(model.tokenizer, model.num_image_tokens, model.cfg.language.max_length)
    samples, skipped = load_samples(stage.data, stage.image_folder, encoder, stage.on_bad, stage.max_samples)
    online = features == "online" or (features == "auto" and device.type == "cuda")
    samples, dataset, where = _stage_data(model, stage, samples, skipped, online, ranks, progress)
    if not samples:
        raise LlavaGMError(f"stage {stage.name}: no usable samples in {stage.data}")
    if model.cfg.projector.word_tokens and model.cfg.projector.word_ids is None:
        model.cfg.projector.word_ids, model.cfg.projector.word_targets = answer_words(samples, model)
        say(f"word-token projector: {len(model.cfg.projector.word_ids)} words from this stage's answers, "
            f"{len(model.cfg.projector.word_targets)} of them content words")
    if len(skipped):
        say(skipped.summary())
    say(f"{len(samples)} samples from {stage.data}; vision features {where}")
    say("one rendered sample ([[...]] = tokens the loss learns):\n" + render_sample(model.tokenizer, samples[0], model.num_image_tokens))

    trainable = plan_stage(model, stage)
    say(describe_plan(model, trainable))
    store(model, train_precision(device, stage.precision))  # frozen weights in the compute dtype, trainable in fp32

    if workers is None:  # decoding images is worth worker processes; reading cached features is not
        workers = min(4, max(1, (os.cpu_count() or 2) // max(1, ranks.world) - 1)) if online else 0
    settings = RunSettings(ranks=ranks, checkpoints=steps if save_every else None, save_every=save_every, resume=resume,
                           resume_command=resume_command, workers=workers, online=online, progress=progress, say=say,
                           strategy=strategy, activation_checkpointing=activation_checkpointing)
    if resume and not save_every:
        settings.checkpoints = steps  # resume reads what an earlier run saved, even if this one saves none
    log = train_loop(model, stage, dataset, trainable, settings)

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
              "first_loss": first, "final_loss": last, "init": init, "processes": ranks.world,
              "strategy": strategy if ranks.world > 1 else "one process", "activation_checkpointing": activation_checkpointing}
    if ranks.main:
        save_checkpoint(model, output, stage=record, extra={
            "train_log.json": json.dumps({"steps": log.steps, "skipped": skipped.reasons}, indent=1).encode(),
            "loss.png": _loss_plot(log.steps, f"stage {stage.name}"),
        })
        steps.finish()
    distributed.barrier(ranks)
    say(f"stage {stage.name}: loss {first:.3f} -> {last:.3f} over {len(log.steps)} steps; checkpoint {output}")
    return {**record, "checkpoint": str(output)}
