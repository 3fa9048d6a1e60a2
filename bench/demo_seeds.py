"""Does the demo's stage-2 result hold over seeds and number formats? Stage 1 + stage 2 of `llava-gm demo` (its quick
sizes, its recipe) for every seed x precision, each evaluated on the demo's fixed questions; prints each run, the
spread per precision and overall, and the baseline: the wording rule (no image) on the same yes/no questions.

    python bench/demo_seeds.py                      # seeds 0 1 2, fp32 and bf16 (on a 2-core CPU: hours)
    python bench/demo_seeds.py --seeds 0 --precisions fp32

Each run is `llava-gm demo --no-stage3 --seed S` in its own process with LLAVA_GM_PRECISION set, so features,
training and evaluation all compute in that format; finished runs in --output are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run(out: Path, seed: int, precision: str) -> dict:
    folder = out / f"{precision}-seed{seed}"
    summary = folder / "summary.json"
    if not summary.is_file():
        env = {**os.environ, "LLAVA_GM_PRECISION": precision}
        code = ("from llava_gm.demo import run_demo; "
                f"run_demo({str(folder)!r}, stage3=False, early_rows=False, seed={seed})")
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    s = json.loads(summary.read_text())
    row = s["rows"][-1]
    return {"precision": precision, "seed": seed, "accuracy": row["accuracy"], "yes_no": row["per_type"]["yes_no"],
            "balanced": row["yes_no_balanced"], "rule": s["yes_no_wording_rule"], "minutes": s["seconds"]["total"] / 60}


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} (mean {statistics.mean(values):.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--output", default="runs/bench-demo-seeds")
    a = ap.parse_args()
    results = [run(Path(a.output), s, p) for p in a.precisions for s in a.seeds]
    print(f"\n{'precision':<10}{'seed':>5}{'acc':>8}{'yes/no':>8}{'bal y/n':>9}{'minutes':>9}")
    for r in results:
        print(f"{r['precision']:<10}{r['seed']:>5}{r['accuracy']:>8.2f}{r['yes_no']:>8.2f}{r['balanced']:>9.2f}{r['minutes']:>9.1f}")
    for group in [*a.precisions, "all"]:
        rs = [r for r in results if group in ("all", r["precision"])]
        print(f"{group:<5} acc {spread([r['accuracy'] for r in rs])}, balanced yes/no {spread([r['balanced'] for r in rs])}")
    rule = results[0]["rule"]
    worst = min(r["balanced"] for r in results)
    print(f"baseline: the wording rule scores {rule:.2f} on these yes/no questions and 50.00 on the balanced part; "
          f"the worst run's balanced yes/no is {worst / 50:.2f}x the rule's")


if __name__ == "__main__":
    main()
