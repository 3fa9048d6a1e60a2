"""Streamed training data against the old in-memory path: the cost of reading features a batch at a time.

Baseline: every image's features gathered in one dict before training (the old FeatureCache.features), a batch
collated from it in the training process. Streamed: the stage's DataLoader over the on-disk cache (memory-mapped
shards read a batch at a time), what `llava-gm train` now runs. Same model (the offline recipe's, stage 2), same
samples, same batches, same optimizer step; the two are timed in alternation (ABAB...) because the machine is
shared, and the medians compared. Target: streaming costs <= 5%.

    python bench/stream_step.py [--batch 16] [--steps 6] [--rounds 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import easy_vqa_samples, offline_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline/streamed runs")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()

    from llava_gm.config import StageConfig
    from llava_gm.data.features import FeatureCache
    from llava_gm.model.build import build_model
    from llava_gm.precision import use_bf16
    from llava_gm.train.data import StageBatches, StageDataset, make_loader
    from llava_gm.train.loop import collate
    from llava_gm.train.stages import plan_stage

    torch.manual_seed(0)

    cfg = offline_config(pool=4)
    model = build_model(cfg)
    n = a.batch * a.steps
    samples = easy_vqa_samples(model, n, turns=2)
    cache = FeatureCache(model.vision_tower)
    keys, _ = cache.prepare([s.image for s in samples], progress=False)
    in_memory = cache.features([s.image for s in samples], progress=False)[0]  # the baseline's gathered dict
    trainable = plan_stage(model, StageConfig(name="instruct", train_embeddings=False))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[k] for k in trainable], lr=1e-6)
    bf16 = use_bf16(torch.device("cpu"))
    pad = model.tokenizer.pad_token_id
    lengths = [len(s.encoded.input_ids) for s in samples]
    model.train()

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def baseline() -> float:
        sampler = StageBatches(lengths, a.batch, 0, a.steps)
        t = time.perf_counter()
        for idx in sampler:
            step(collate([samples[i] for i in idx], in_memory, pad, torch.device("cpu")))
        return (time.perf_counter() - t) / a.steps

    def streamed() -> float:
        dataset = StageDataset(samples, reader=cache.reader(), keys=keys)  # a fresh reader: no handle opened yet
        loader = make_loader(dataset, StageBatches(lengths, a.batch, 0, a.steps), pad, a.workers)
        t = time.perf_counter()
        for b in loader:
            step({"input_ids": b["input_ids"], "labels": b["labels"], "attention_mask": b["attention_mask"], "image_features": b["images"]})
        return (time.perf_counter() - t) / a.steps

    streamed(), baseline()  # warm-up: allocator, kernels, page cache
    base, stream = [], []
    for _ in range(a.rounds):
        base.append(baseline())
        stream.append(streamed())
    b, s = statistics.median(base), statistics.median(stream)
    print(f"offline recipe stage 2 (Gemma 3 270M + DINOv2-S), batch {a.batch}, {a.steps} steps a run, {a.rounds} alternating runs each")
    print(f"baseline (in-memory features dict, collate in the loop): {b:.3f} s/step  runs {[round(x, 3) for x in base]}")
    print(f"streamed (DataLoader, memory-mapped shards, {a.workers} workers): {s:.3f} s/step  runs {[round(x, 3) for x in stream]}")
    print(f"streaming cost: {100 * (s / b - 1):+.1f}%  (target <= +5%)")


if __name__ == "__main__":
    main()
