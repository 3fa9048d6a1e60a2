"""DDP on this machine: 2 processes against 1, the same global batch, the offline recipe's stage 1.

Each run is `llava-gm train` (1 process) or `torchrun --nproc_per_node 2 -m llava_gm train` (gloo on a CPU), with
the machine's cores split between the processes; the figure is the training loop's tokens/s (median over its steps
after the first, from the run's train_log.json, so start-up is not counted). Runs go 1, 2, 1, 2 ... and the
medians are compared, because the machine is shared.

    python bench/distributed_step.py [--samples 96] [--batch 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT


def run(procs: int, out: Path, a) -> float:
    from llava_gm.data.easy_vqa import build_easy_vqa

    data = build_easy_vqa(ROOT / "runs" / "data" / "easy-vqa")
    args = ["train", "--recipe", str(ROOT / "recipes" / "offline-default.yaml"), "--stage", "align", "--output", str(out),
            "--data", str(data / "align.json"), "--image-folder", str(data), "--max-samples", str(a.samples),
            "--batch-size", str(a.batch), "--save-every", "0"]
    launcher = [sys.executable, "-m", "llava_gm"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "llava_gm"]
    threads = str(max(1, (os.cpu_count() or 2) // procs))
    done = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        sys.exit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    steps = json.loads((out / "align" / "train_log.json").read_text())["steps"]
    return statistics.median(s["tokens_per_s"] for s in steps[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16, help="global batch (each of 2 processes takes half)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        run(1, Path(tmp) / "warm", a)  # fills the feature cache, so no run below pays for it
        for r in range(a.rounds):
            for procs in (1, 2):
                results[procs].append(run(procs, Path(tmp) / f"{procs}-{r}", a))
    one, two = statistics.median(results[1]), statistics.median(results[2])
    print(f"offline recipe stage 1 (Gemma 3 270M frozen, projector trains), global batch {a.batch}, {a.samples} samples, "
          f"{os.cpu_count()} cores split between the processes")
    print(f"1 process        : {one:8.0f} tok/s  runs {[round(x) for x in results[1]]}")
    print(f"2 processes (DDP): {two:8.0f} tok/s  runs {[round(x) for x in results[2]]}")
    print(f"2 vs 1: {two / one:.2f}x")


if __name__ == "__main__":
    main()
