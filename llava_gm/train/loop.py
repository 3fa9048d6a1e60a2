"""The training loop: AdamW, cosine schedule with warm-up, gradient accumulation, bf16 autocast, a progress bar."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..config import StageConfig
from ..data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from ..data.llava_json import Sample
from ..precision import use_bf16


@dataclass
class TrainLog:
    steps: list = field(default_factory=list)  # one dict per optimizer step: step, loss, lm_loss, aux..., lr, tokens_per_s

    def last_mean(self, key: str = "lm_loss", n: int = 10) -> float:
        vals = [s[key] for s in self.steps[-n:]]
        return sum(vals) / max(len(vals), 1)


def length_grouped_batches(samples: list[Sample], batch_size: int, rng: random.Random) -> list[list[Sample]]:
    """Shuffle, then sort within mega-batches so a batch holds similar lengths (less padding)."""
    order = samples[:]
    rng.shuffle(order)
    mega = batch_size * 16
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda s: len(s.encoded.input_ids))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(batch: list[Sample], features: dict, pad_id: int, device) -> dict:
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


def train_loop(model, stage: StageConfig, samples: list[Sample], features: dict, trainable: list[str], progress: bool = True) -> TrainLog:
    device = next(model.lm.parameters()).device
    params = dict(model.named_parameters())
    groups = []
    for is_proj in (False, True):  # the projector may take its own learning rate
        names = [n for n in trainable if n.startswith("projector.") == is_proj]
        lr = (stage.projector_lr or stage.lr) if is_proj else stage.lr
        decay = [params[n] for n in names if params[n].ndim >= 2]
        no_decay = [params[n] for n in names if params[n].ndim < 2]  # biases and norms: no weight decay
        groups += [{"params": decay, "weight_decay": stage.weight_decay, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    # the fused kernel: one pass over the weights (on a 2-core CPU it takes the step from 0.29 s to 0.10 s)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=tuple(stage.betas), fused=device.type in ("cuda", "cpu") or None)
    rng = random.Random(stage.seed)
    torch.manual_seed(stage.seed)
    per_epoch = math.ceil(len(samples) / stage.batch_size)
    total_micro = max(1, round(per_epoch * stage.epochs))
    total_steps = max(1, total_micro // stage.grad_accum)
    warmup = max(1, round(stage.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total_steps, warmup))
    pad_id = model.tokenizer.pad_token_id
    bf16 = use_bf16(device, stage.precision)
    log = TrainLog()
    model.train()
    batches: list = []
    bar = tqdm(total=total_steps, desc=f"stage {stage.name}", unit="step", disable=not progress)
    acc = {"loss": 0.0, "lm_loss": 0.0, "tokens": 0}
    aux_acc: dict = {}
    t0 = time.perf_counter()
    micro = 0
    while micro < total_steps * stage.grad_accum:
        if not batches:
            batches = length_grouped_batches(samples, stage.batch_size, rng)
        batch = collate(batches.pop(), features, pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch, word_loss=stage.word_loss)
        (out.loss / stage.grad_accum).backward()
        acc["loss"] += out.loss.item() / stage.grad_accum
        acc["lm_loss"] += out.lm_loss.item() / stage.grad_accum
        acc["tokens"] += int(batch["attention_mask"].sum())
        for k, v in out.aux.items():
            aux_acc[k] = aux_acc.get(k, 0.0) + v.item() / stage.grad_accum
        micro += 1
        if micro % stage.grad_accum:
            continue
        torch.nn.utils.clip_grad_norm_([params[n] for n in trainable], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        entry = {"step": len(log.steps) + 1, "loss": acc["loss"], "lm_loss": acc["lm_loss"], **{f"aux_{k}": v for k, v in aux_acc.items()},
                 "lr": sched.get_last_lr()[0], "tokens_per_s": acc["tokens"] / dt}
        log.steps.append(entry)
        post = {"loss": f"{log.last_mean('lm_loss'):.3f}", "tok/s": f"{entry['tokens_per_s']:.0f}"}
        post.update({k: f"{v:.4f}" for k, v in aux_acc.items()})
        bar.set_postfix(post)
        bar.update(1)
        acc = {"loss": 0.0, "lm_loss": 0.0, "tokens": 0}
        aux_acc = {}
        t0 = time.perf_counter()
    bar.close()
    model.eval()
    return log


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
