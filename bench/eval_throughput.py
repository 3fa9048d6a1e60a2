"""Evaluation throughput on the easy-VQA test split: batched (sorted by length) vs one question at a time.

Both answer the same questions with the same model through the same runner; vision features come from the
on-disk cache in both (filled before timing). Prints questions per second and the ratio.

    python bench/eval_throughput.py [--checkpoint runs/demo/instruct] [--questions 256] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import ROOT, offline_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo" / "instruct"), help="(default: the demo's stage-2 model, else an untrained model)")
    ap.add_argument("--questions", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()

    from llava_gm.data.easy_vqa import build_easy_vqa
    from llava_gm.eval.runner import evaluate
    from llava_gm.infer import Answerer
    from llava_gm.model.build import build_model

    data = build_easy_vqa(ROOT / "runs" / "data" / "easy-vqa") / "test_questions.jsonl"
    if Path(a.checkpoint).is_dir():
        answerer, name = Answerer.from_checkpoint(a.checkpoint), a.checkpoint
    else:
        answerer, name = Answerer(build_model(offline_config(pool=2))), "untrained offline model"

    def run(batch_size):
        t = time.perf_counter()
        r = evaluate(answerer, "easy_vqa", str(data), limit=a.questions, batch_size=batch_size, progress=False)
        return time.perf_counter() - t, r

    run(a.batch_size)  # fills the feature cache and warms up
    t_one, r_one = run(1)
    t_batch, r_batch = run(a.batch_size)
    n = r_batch["n_questions"]
    print(f"model: {name}; {n} easy-VQA test questions")
    print(f"one at a time:      {n / t_one:7.2f} q/s  (accuracy {r_one['metrics']['accuracy']:.2f})")
    print(f"batched ({a.batch_size:>3}):      {n / t_batch:7.2f} q/s  (accuracy {r_batch['metrics']['accuracy']:.2f})")
    print(f"speed-up: {t_one / t_batch:.2f}x   (target >= 5x)")


if __name__ == "__main__":
    main()
