"""Many processes on this machine: 2 against 1 (DDP), and FSDP2 against DDP, the same global batch.

Each run is one training stage in its own process(es): `llava-gm train` (1 process) or `torchrun --nproc_per_node 2
-m llava_gm train --strategy ddp|fsdp` (gloo on a CPU), the machine's cores split between the processes. The figure
is the training loop's tokens/s (median over its steps after the first, from the run's train_log.json, so start-up
is not counted). Runs go 1, ddp, fsdp, 1, ddp, fsdp ... and medians are compared, because the machine is shared.

    python bench/distributed_step.py [--model offline|tiny] [--stage instruct|align] [--samples 96] [--batch 16] [--rounds 2] [--threads T]

--model offline: the offline recipe (Gemma 3 270M + DINOv2-S) on easy-VQA; --model tiny: the tests' tiny Gemma 3 and
DINOv2 (tests/tiny.py) on their coloured shapes (seconds a run; the ratios then show fixed costs, not a big model's).
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

SETTINGS = [(1, "ddp"), (2, "ddp"), (2, "fsdp")]  # (processes, strategy); one process runs plain


def launcher(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]


def run(procs: int, strategy: str, out: Path, a, tiny: dict) -> float:
    threads = a.threads or max(1, (os.cpu_count() or 2) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if tiny:
        job = Path(str(out) + ".json")
        job.write_text(json.dumps({**tiny, "output": str(out / a.stage), "strategy": strategy}))
        cmd = launcher(procs) + [str(ROOT / "tests" / "train_child.py"), str(job)]
    else:
        from llava_gm.data.easy_vqa import build_easy_vqa

        data = build_easy_vqa(ROOT / "runs" / "data" / "easy-vqa")
        cmd = launcher(procs) + ["-m", "llava_gm", "train", "--recipe", str(ROOT / "recipes" / "offline-default.yaml"),
                                 "--stage", a.stage, "--output", str(out), "--data", str(data / f"{a.stage}.json"),
                                 "--image-folder", str(data), "--max-samples", str(a.samples), "--batch-size", str(a.batch),
                                 "--save-every", "0", "--strategy", strategy]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{procs} process(es), {strategy}, failed:\n{done.stderr[-3000:]}")
    steps = json.loads((out / a.stage / "train_log.json").read_text())["steps"]
    return statistics.median(s["tokens_per_s"] for s in steps[1:])


def tiny_job(tmp: Path, a) -> dict:
    sys.path.insert(0, str(ROOT))
    from llava_gm.config import LanguageConfig, ModelConfig, StageConfig, VisionConfig, to_dict
    from tests import tiny

    model = ModelConfig(vision=VisionConfig(name=str(tiny.make_vision(tmp / "vision"))),
                        language=LanguageConfig(name=str(tiny.make_lm(tmp / "lm")), max_length=256))
    data = tiny.make_shapes_data(tmp / "shapes", n=a.samples)
    stage = StageConfig(name=a.stage, data=str(data), batch_size=a.batch, epochs=1, precision="fp32")
    return {"stage": to_dict(stage), "model": to_dict(model)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["offline", "tiny"], default="offline")
    ap.add_argument("--stage", choices=["align", "instruct"], default="instruct",
                    help="the offline recipe's align trains the projector alone (no LM pass): instruct is the one to measure")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16, help="global batch (each of 2 processes takes half)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per process (default: the cores split between the processes; 1 on a busy shared host, where "
                         "spinning OpenMP threads that wait for descheduled ones make a 2-thread process slower than 1)")
    a = ap.parse_args()
    results = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        if a.model == "tiny":
            os.environ.setdefault("LLAVA_GM_CACHE", str(Path(tmp) / "cache"))
        tiny = tiny_job(Path(tmp), a) if a.model == "tiny" else {}
        run(1, "ddp", Path(tmp) / "warm", a, tiny)  # fills the feature cache, so no run below pays for it
        for r in range(a.rounds):
            for procs, strategy in SETTINGS:
                results[procs, strategy].append(run(procs, strategy, Path(tmp) / f"{procs}-{strategy}-{r}", a, tiny))
    med = {s: statistics.median(v) for s, v in results.items()}
    what = "offline recipe (Gemma 3 270M + DINOv2-S)" if a.model == "offline" else "tests' tiny model"
    print(f"{what}, stage {a.stage}, global batch {a.batch}, {a.samples} samples, {os.cpu_count()} cores, "
          f"{a.threads or 'the cores split between the processes as'} thread(s) a process")
    for (procs, strategy), v in results.items():
        label = "1 process" if procs == 1 else f"{procs} processes ({strategy.upper()})"
        print(f"{label:22s}: {med[procs, strategy]:8.0f} tok/s  runs {[round(x) for x in v]}")
    print(f"2 (DDP) vs 1: {med[2, 'ddp'] / med[1, 'ddp']:.2f}x   FSDP vs DDP (2 processes): {med[2, 'fsdp'] / med[2, 'ddp']:.2f}x")


if __name__ == "__main__":
    main()
