"""The training loop: AdamW, cosine schedule with warm-up, gradient accumulation, bf16 autocast, a progress bar,
step checkpoints and exact resume, one process or many (DDP, or FSDP2: train/sharding.py)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm import tqdm

from ..config import StageConfig
from ..data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from ..data.features import encode_pixels
from ..data.llava_json import Sample
from ..errors import LlavaGMError
from ..model.sparse import global_aux_losses
from .checkpoint import StepCheckpoints
from .data import StageBatches, StageDataset, epoch_batches, make_loader
from .distributed import Ranks, all_sum, all_sum_tensor, barrier, gather
from .precision import train_precision


@dataclass
class TrainLog:
    steps: list = field(default_factory=list)  # one dict per optimizer step: step, loss, lm_loss, aux..., lr, tokens_per_s

    def last_mean(self, key: str = "lm_loss", n: int = 10) -> float:
        vals = [s[key] for s in self.steps[-n:]]
        return sum(vals) / max(len(vals), 1)


@dataclass
class RunSettings:
    """How a stage runs, beside what it trains: processes, step checkpoints, data workers, messages."""

    ranks: Ranks = field(default_factory=Ranks)
    checkpoints: Optional[StepCheckpoints] = None  # None: no step checkpoints
    save_every: int = 0  # optimizer steps between step checkpoints (0: none)
    resume: bool = False  # continue from the newest intact step checkpoint
    resume_command: str = ""  # the command that continues this run, for messages
    workers: int = 0  # DataLoader worker processes
    online: bool = False  # vision features computed in the step from pixels
    strategy: str = "ddp"  # several processes: ddp (replicated weights) | fsdp (FSDP2, sharded)
    activation_checkpointing: bool = False  # recompute decoder layers' activations in the backward
    progress: bool = True
    say: Callable[[str], None] = print


def collate(batch: list[Sample], features: dict, pad_id: int, device) -> dict:
    """One batch of samples whose features are in memory (analysis, benches); training streams (train/data.py)."""
    width = max(len(s.encoded.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    feats = []
    for i, s in enumerate(batch):
        n = len(s.encoded.input_ids)
        ids[i, :n] = torch.tensor(s.encoded.input_ids)
        labels[i, :n] = torch.tensor(s.encoded.labels)
        mask[i, :n] = 1
        if s.image is not None:
            feats.append(features[s.image])
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
        "image_features": torch.stack(feats).to(device) if feats else None,
    }


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _fingerprint(stage: StageConfig, n_samples: int) -> dict:
    """What must not change between a step checkpoint and its resume (the rate may: that is how one recovers)."""
    keep = ("name", "data", "epochs", "batch_size", "grad_accum", "max_samples", "seed", "lora", "lora_rank", "word_loss", "lm_loss")
    return {**{k: getattr(stage, k) for k in keep}, "samples": n_samples}


def _base_lrs(stage: StageConfig, groups: list[dict]) -> list[float]:
    return [(stage.projector_lr or stage.lr) if g["projector"] else stage.lr for g in groups]


def _restore(state: tuple, model, opt, sched, stage, groups, fingerprint, settings, fsdp: bool) -> tuple[int, list]:
    folder, weights, trainer = state
    if trainer["fingerprint"] != fingerprint:
        diff = {k: (trainer["fingerprint"].get(k), v) for k, v in fingerprint.items() if trainer["fingerprint"].get(k) != v}
        raise LlavaGMError(f"{folder}: made with other settings {diff} (saved, now); resume with the settings it was made with")
    saved = trainer.get("strategy", "ddp")
    if saved != ("fsdp" if fsdp else "ddp"):
        raise LlavaGMError(f"{folder}: saved by a run with --strategy {saved} on {len(trainer['rng'])} process(es); "
                           f"resume it with --strategy {saved}" + (" under torchrun" if saved == "fsdp" else ""))
    if fsdp:
        from .sharding import load_full_state

        load_full_state(model, opt, weights, trainer["optimizer"])
    else:
        model_params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in weights.items():
                model_params[n].copy_(v)
        opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    lrs = _base_lrs(stage, groups)
    if lrs != sched.base_lrs:  # a new rate (e.g. after a diverged run): the schedule continues with it
        settings.say(f"resuming with learning rate(s) {sorted(set(lrs))} instead of {sorted(set(sched.base_lrs))}")
        factor = [cosine_lr(sched.last_epoch, *trainer["schedule"]) for _ in lrs]
        sched.base_lrs = lrs
        for g, lr, f in zip(opt.param_groups, lrs, factor):
            g["initial_lr"], g["lr"] = lr, lr * f
    rng = trainer["rng"][settings.ranks.rank % len(trainer["rng"])]
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    settings.say(f"resuming from {folder} (step {trainer['step']})")
    return trainer["micro"], trainer["log"]


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def train_loop(model, stage: StageConfig, dataset: StageDataset, trainable: list[str], settings: Optional[RunSettings] = None) -> TrainLog:
    settings = settings or RunSettings()
    ranks, say = settings.ranks, settings.say
    device = ranks.device
    policy = train_precision(device, stage.precision)
    fsdp = settings.strategy == "fsdp" and ranks.world > 1  # one process: nothing to shard
    if settings.activation_checkpointing:
        from .sharding import checkpoint_layers

        checkpoint_layers(model)
    if fsdp:  # before the optimizer: sharding replaces the parameters
        from .sharding import shard

        shard(model, policy)
        say(f"FSDP2 over {ranks.world} processes: parameters, gradients and optimizer state sharded per decoder layer "
            f"(gathered in {str(policy.compute).replace('torch.', '')}, reduced in {str(policy.reduce).replace('torch.', '')})")
    params = dict(model.named_parameters())
    groups = []
    for is_proj in (False, True):  # the projector may take its own learning rate
        names = [n for n in trainable if n.startswith("projector.") == is_proj]
        lr = (stage.projector_lr or stage.lr) if is_proj else stage.lr
        decay = [params[n] for n in names if params[n].ndim >= 2]
        no_decay = [params[n] for n in names if params[n].ndim < 2]  # biases and norms: no weight decay
        groups += [{"params": decay, "weight_decay": stage.weight_decay, "lr": lr, "projector": is_proj},
                   {"params": no_decay, "weight_decay": 0.0, "lr": lr, "projector": is_proj}]
    groups = [g for g in groups if g["params"]]
    # the fused kernel: one pass over the weights (on a 2-core CPU it takes the step from 0.29 s to 0.10 s)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "projector"} for g in groups], lr=stage.lr,
                            betas=tuple(stage.betas), fused=device.type in ("cuda", "cpu") or None)
    lengths = [len(s.encoded.input_ids) for s in dataset.samples]
    per_epoch = len(epoch_batches(lengths, stage.batch_size, stage.seed, 0, ranks.world))
    total_micro = max(1, round(per_epoch * stage.epochs))
    total_steps = max(1, total_micro // stage.grad_accum)
    warmup = max(1, round(stage.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total_steps, warmup))
    fingerprint = _fingerprint(stage, len(dataset))
    log = TrainLog()
    micro = 0
    if settings.resume and settings.checkpoints is not None:
        state = settings.checkpoints.load_latest()
        if state is not None:
            micro, log.steps = _restore(state, model, opt, sched, stage, groups, fingerprint, settings, fsdp)
    pad_id = model.tokenizer.pad_token_id
    sampler = StageBatches(lengths, stage.batch_size, stage.seed, total_steps * stage.grad_accum, micro, ranks.rank, ranks.world)
    loader = make_loader(dataset, sampler, pad_id, settings.workers)
    # a sparse layer's expert may get no token in a step: it still takes part (zero gradient), so every rank
    # reduces the same gradients and the optimizer treats it alike on 1 or N processes
    # (FSDP: the sparse layers themselves keep every expert and router in the graph, model/sparse.py)
    sparse_params = [params[n] for n in trainable] if stage.name == "sparsify" and not fsdp else []
    net = model
    if ranks.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        # every rank built the same model from the same seed and checkpoint: no start-up broadcast
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False, init_sync=False)
    model.train()
    bar = tqdm(total=total_steps, initial=len(log.steps), desc=f"stage {stage.name}", unit="step", disable=not (settings.progress and ranks.main))
    acc, aux_acc, step_ids = {"loss": 0.0, "lm_loss": 0.0, "tokens": 0}, {}, []
    t0 = time.perf_counter()
    for batch in loader:
        step_ids += batch["ids"]
        images = batch["images"]
        if images is not None:
            images = encode_pixels(model.vision_tower, images) if settings.online else images.to(device, non_blocking=True)
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "attention_mask")}
        micro += 1
        last = micro % stage.grad_accum == 0
        # FSDP reduce-scatters every micro-batch's gradients into the shards (no unsharded gradients kept)
        sync = contextlib.nullcontext() if last or ranks.world == 1 or fsdp else net.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=policy.compute, enabled=policy.autocast):
                out = net(**inputs, image_features=images, word_loss=stage.word_loss, lm_loss=stage.lm_loss)
            loss, lm = out.loss, out.lm_loss.item()
            if ranks.world > 1:  # the loss of the global batch: each rank's tokens weigh in, as on one process
                targets, lm_sum = all_sum([batch["targets"], lm * batch["targets"]], ranks)
                if model.sparse_layers:  # balance and z losses over all ranks' routing, as on one process
                    out.aux = {**out.aux, **global_aux_losses(model.lm, lambda t: all_sum_tensor(t, ranks), ranks.world)}
                loss = stage.lm_loss * out.lm_loss * (batch["targets"] * ranks.world / targets) + sum(out.aux.values(), torch.zeros((), device=device))
                lm = lm_sum / targets
            if sparse_params:
                loss = loss + sum(p.sum() for p in sparse_params) * 0.0
            (loss / stage.grad_accum).backward()
        acc["loss"] += loss.item() / stage.grad_accum if ranks.world == 1 else 0.0
        acc["lm_loss"] += lm / stage.grad_accum
        acc["tokens"] += int(inputs["attention_mask"].sum())
        for k, v in out.aux.items():
            aux_acc[k] = aux_acc.get(k, 0.0) + v.item() / stage.grad_accum
        if not last:
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_([params[n] for n in trainable], 1.0)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if ranks.world > 1:  # the logged numbers are the global batch's
            merged: dict = {}
            for d in gather(aux_acc, ranks):
                for k, v in d.items():
                    merged[k] = merged.get(k, 0.0) + v / ranks.world
            aux_acc = merged
            acc["tokens"] = int(all_sum([acc["tokens"]], ranks)[0])
            acc["loss"] = acc["lm_loss"] + sum(aux_acc.values())
        step = len(log.steps) + 1
        if not (math.isfinite(acc["loss"]) and math.isfinite(grad_norm)):
            ids = [i for rank_ids in gather(step_ids, ranks) for i in rank_ids]
            _stop_non_finite(stage, step, total_steps, acc["loss"], grad_norm, ids, settings)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        entry = {"step": step, "loss": acc["loss"], "lm_loss": acc["lm_loss"], **{f"aux_{k}": v for k, v in aux_acc.items()},
                 "lr": sched.get_last_lr()[0], "tokens_per_s": acc["tokens"] / dt}
        log.steps.append(entry)
        post = {"loss": f"{log.last_mean('lm_loss'):.3f}", "tok/s": f"{entry['tokens_per_s']:.0f}"}
        post.update({k: f"{v:.4f}" for k, v in aux_acc.items()})
        bar.set_postfix(post)
        bar.update(1)
        if settings.checkpoints is not None and settings.save_every and step % settings.save_every == 0 and step < total_steps:
            rngs = gather(_rng_state(), ranks)
            if fsdp:  # the shards gathered whole on rank 0 (every rank takes its part again on resume)
                from .sharding import full_state

                weights, opt_state = full_state(model, opt, trainable)
            else:
                weights, opt_state = {n: params[n] for n in trainable}, opt.state_dict()
            if ranks.main:
                settings.checkpoints.save(step, weights, {
                    "step": step, "micro": micro, "optimizer": opt_state, "scheduler": sched.state_dict(),
                    "schedule": [total_steps, warmup], "log": log.steps, "rng": rngs, "fingerprint": fingerprint,
                    "strategy": "fsdp" if fsdp else "ddp"})
            barrier(ranks)
        acc, aux_acc, step_ids = {"loss": 0.0, "lm_loss": 0.0, "tokens": 0}, {}, []
        t0 = time.perf_counter()
    bar.close()
    if fsdp:
        from .sharding import gather_weights

        del opt
        gather_weights(model)
    model.eval()
    return log


def _stop_non_finite(stage, step, total, loss, grad_norm, ids, settings: RunSettings):
    shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    good = settings.checkpoints.existing() if settings.checkpoints is not None else []
    if good:
        how = (f"the last good step checkpoint is {good[-1]}; continue from it with a lower rate: "
               f"{settings.resume_command or 'the same command'} --resume --lr {stage.lr / 10:g}")
    else:
        how = "no step checkpoint was saved before it (--save-every N keeps one every N steps); try a lower --lr"
    raise LlavaGMError(f"stage {stage.name}: non-finite loss ({loss:g}) or gradient norm ({grad_norm:g}) at step {step} of {total}, "
                       f"on samples {shown}; nothing of this step was saved. {how}")


def render_sample(tokenizer, sample: Sample, num_image_tokens: int) -> str:
    """One sample as the model sees it: image slots collapsed, learned (labelled) text in [[ ]]."""
    out, run, labelled = [], [], False
    ids, labels = sample.encoded.input_ids, sample.encoded.labels

    def flush():
        if run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if labelled else text)
            run.clear()

    i = 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN_ID:
            flush()
            out.append(f"<image x{num_image_tokens}>")
            i += num_image_tokens
            continue
        is_label = labels[i] != IGNORE_INDEX
        if is_label != labelled:
            flush()
            labelled = is_label
        run.append(ids[i])
        i += 1
    flush()
    return "".join(out)
