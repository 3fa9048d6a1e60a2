"""The offline demo: easy-VQA data -> stage 1 -> stage 2 -> evaluation -> one table and runs/demo/summary.json.

Everything comes from package registries (Gemma 3 270M, DINOv2 ViT-S/14, easy-VQA), so it runs on a laptop
with no network. A re-run reuses finished stages found in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .config import RecipeConfig, load_yaml
from .errors import LlavaGMError

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "offline-default.yaml"
# quick-run sizes, chosen so the demo fits in 15 minutes on a 2-core CPU; --full uses everything
QUICK = {"align": 1200, "instruct": 1600}
SAMPLE_QUESTIONS = 500  # the fixed test sample (its first questions) for the untrained and stage-1 rows


def _stage(recipe: RecipeConfig, name: str):
    for s in recipe.stages:
        if s.name == name:
            return s
    raise LlavaGMError(f"{RECIPE}: the recipe has no stage {name!r}")


def _train(stage, out: Path, model_cfg, init, sparse=None) -> str:
    from .model.build import read_checkpoint_config
    from .train.run import run_stage

    if out.exists():
        read_checkpoint_config(out)  # a finished checkpoint: reuse it
        print(f"reusing {out}")
        return str(out)
    return run_stage(stage, out, model_cfg=model_cfg, init=init, sparse=sparse)["checkpoint"]


def _evaluate(answerer, data: Path, out: Path, limit=None) -> dict:
    from .eval.runner import evaluate

    t = time.perf_counter()
    r = evaluate(answerer, "easy_vqa", str(data / "test_questions.jsonl"), output=str(out), limit=limit, batch_size=64)
    return {"accuracy": r["metrics"]["accuracy"], "per_type": r["metrics"]["per_type"], "questions": r["n_questions"],
            "eval_seconds": round(time.perf_counter() - t, 1), "results": str(out)}


def print_table(rows: list[dict]) -> str:
    head = f"{'model':<22}{'questions':>10}{'accuracy':>10}{'yes/no':>9}{'shape':>8}{'color':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pt = r["per_type"]
        lines.append(f"{r['model']:<22}{r['questions']:>10}{r['accuracy']:>10.2f}{pt.get('yes_no', 0):>9.2f}{pt.get('shape', 0):>8.2f}{pt.get('color', 0):>8.2f}")
    text = "\n".join(lines)
    print(text)
    return text


def run_demo(output: str = "runs/demo", full: bool = False, data_dir: str = "runs/data/easy-vqa") -> dict:
    from .data.easy_vqa import build_easy_vqa
    from .infer import Answerer
    from .model.build import build_model

    t0 = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_yaml(RecipeConfig, RECIPE)
    data = build_easy_vqa(data_dir)
    print(f"easy-VQA data in {data}")
    base_cfg = dataclasses.replace(recipe.model, sparse=dataclasses.replace(recipe.model.sparse, kind="none"))

    def sized(name):
        s = _stage(recipe, name)
        return dataclasses.replace(s, data=str(data / Path(s.data).name), image_folder=str(data), max_samples=None if full else QUICK.get(name))

    timings = {}
    t = time.perf_counter()
    align = _train(sized("align"), out / "align", base_cfg, None)
    timings["align"] = time.perf_counter() - t
    t = time.perf_counter()
    instruct = _train(sized("instruct"), out / "instruct", base_cfg, align)
    timings["instruct"] = time.perf_counter() - t

    rows = []
    t = time.perf_counter()
    untrained = Answerer(build_model(base_cfg), model_id="untrained")
    rows.append({"model": "untrained", "checkpoint": None, **_evaluate(untrained, data, out / "eval-untrained.json", SAMPLE_QUESTIONS)})
    del untrained
    rows.append({"model": "stage 1 (align)", "checkpoint": align, **_evaluate(Answerer.from_checkpoint(align), data, out / "eval-align.json", SAMPLE_QUESTIONS)})
    rows.append({"model": "stage 2 (instruct)", "checkpoint": instruct, **_evaluate(Answerer.from_checkpoint(instruct), data, out / "eval-instruct.json")})
    timings["evaluation"] = time.perf_counter() - t

    print()
    table = print_table(rows)
    total = time.perf_counter() - t0
    summary = {"rows": rows, "table": table, "full": full, "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)},
               "checkpoints": {"align": align, "instruct": instruct}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ndemo finished in {total / 60:.1f} min; summary in {out / 'summary.json'}")
    return summary
