"""Shared set-up for the benchmarks: the offline model, a batch of real easy-VQA samples, timing."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def offline_config(pool: int = 1):
    from llava_gm.config import RecipeConfig, load_yaml

    r = load_yaml(RecipeConfig, ROOT / "recipes" / "offline-default.yaml")
    # continuous image tokens: the baselines (transformers' Llava) have no word-token step
    return dataclasses.replace(r.model, projector=dataclasses.replace(r.model.projector, pool=pool, word_tokens=False),
                               sparse=dataclasses.replace(r.model.sparse, kind="none"))


def easy_vqa_samples(model, n: int, turns: int = 4):
    """The first n stage-2 conversations (cut to `turns` question/answer pairs) as encoded samples."""
    import json

    from llava_gm.data.conversation import ConversationEncoder
    from llava_gm.data.easy_vqa import build_easy_vqa
    from llava_gm.data.llava_json import check_row, Sample

    data = build_easy_vqa(ROOT / "runs" / "data" / "easy-vqa")
    rows = json.loads((data / "instruct.json").read_text())[:n]
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 4096)
    out = []
    for i, row in enumerate(rows):
        row = dict(row, conversations=row["conversations"][: 2 * turns])
        sid, image, messages = check_row(row, i, data)
        out.append(Sample(sid, image, enc.encode(messages, sid)))
    return out


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def matmul_tflops(n: int = 2048, repeats: int = 10, dtype=torch.bfloat16) -> float:
    """Matmul throughput of this machine, measured now (the machine is shared: absolute numbers drift)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = statistics.median(timed(lambda: a @ b, repeats, warmup=3))
    return 2 * n**3 / t / 1e12
