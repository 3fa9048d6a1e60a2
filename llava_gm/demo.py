"""The offline demo: easy-VQA data -> stage 1 -> stage 2 -> stage 3 (MoE and EVF) -> evaluation -> one table.

Everything comes from package registries (Gemma 3 270M, DINOv2 ViT-S/14, easy-VQA), so it runs on a laptop
with no network. A re-run reuses finished stages found in the output folder. Results: runs/demo/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from .config import RecipeConfig, load_yaml
from .errors import LlavaGMError
from .recipes import resolve

RECIPE = resolve("offline-default")
ENGLISH = Path(__file__).resolve().parent / "assets" / "english.txt"  # the same text for every row's perplexity
# quick-run sizes (samples per stage), chosen so the demo fits 15 minutes on a 2-core CPU; --full uses all data
QUICK = {"align": None, "instruct": 3200, "sparsify": 320}  # None: all 3,971 captions (stage 1 takes seconds: no LM)
# natural yes/no answers, as the split has them: with correct captions the model checks the image on them
# (bal y/n 99%, docs/yes-no.md); balanced answers (prepare-data --balance) stay an option, not the default
BALANCED_DATA = False
SAMPLE_QUESTIONS = 100  # the test split's first questions for the untrained and stage-1 rows (they score 0)
# the trained rows' fixed evaluation set: the test split's first questions (its natural mix) plus its balanced yes/no
# part, PER_ANSWER "yes" and as many "no" per question form; --full evaluates on the whole split
EVAL_NATURAL, EVAL_PER_ANSWER = 600, 64


def _stage(recipe: RecipeConfig, name: str):
    for s in recipe.stages:
        if s.name == name:
            return s
    raise LlavaGMError(f"{RECIPE}: the recipe has no stage {name!r}")


def _train(stage, out: Path, model_cfg, init, sparse=None) -> str:
    from .model.build import read_checkpoint_config
    from .train.run import run_stage

    if out.exists():
        read_checkpoint_config(out)  # a finished checkpoint (they are written atomically): reuse it
        print(f"reusing {out}")
        return str(out)
    # step checkpoints every 50 steps: an interrupted `make demo` run again continues the stage it was in
    return run_stage(stage, out, model_cfg=model_cfg, init=init, sparse=sparse, resume=True, save_every=50)["checkpoint"]


def _latency_ms(answerer, image_path: Path, runs: int = 10) -> float:
    """Median time of one image (a fresh decode + tower run, no cache) + question -> short answer."""
    from .images import load_image

    image = load_image(image_path)
    item = [{"prompt": "<image>\nwhat color is the shape?", "image": image}]
    answerer.answer(item, progress=False)  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        answerer.answer(item, progress=False)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _row(name: str, answerer, checkpoint, data: Path, questions: Path, out: Path, limit=None) -> dict:
    from .analysis.cli import model_report
    from .eval.runner import evaluate

    t = time.perf_counter()
    r = evaluate(answerer, "easy_vqa", str(questions), output=str(out), limit=limit, batch_size=64, image_folder=str(data))
    eval_s = time.perf_counter() - t
    report = model_report(answerer.model, text_tokens=12)  # an easy-VQA question and its answer are about 12 tokens
    return {
        "model": name, "checkpoint": checkpoint, "questions": r["n_questions"], "accuracy": r["metrics"]["accuracy"],
        "per_type": r["metrics"]["per_type"], "yes_no_balanced": r["metrics"].get("yes_no_balanced"), "results": str(out), "eval_seconds": round(eval_s, 1),
        "correct": {str(p["question_id"]): bool(p["correct"]) for p in r["predictions"]},
        "perplexity": answerer.perplexity(ENGLISH.read_text()),
        "params_total": report["params"]["total"], "params_activated": report["params"]["activated"],
        "gflops_per_sample": report["flops_with_image"]["total"] / 1e9,
        "latency_ms": _latency_ms(answerer, data / "images" / "test" / "0.png"),
    }


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<20}{'questions':>10}{'acc':>7}{'yes/no':>8}{'bal y/n':>8}{'shape':>7}{'color':>7}{'text ppl':>10}"
            f"{'params':>9}{'active':>9}{'GFLOPs':>8}{'latency':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        pt = r["per_type"]
        lines.append(f"{r['model']:<20}{r['questions']:>10}{r['accuracy']:>7.2f}{pt.get('yes_no', 0):>8.2f}{r.get('yes_no_balanced') or 0:>8.2f}{pt.get('shape', 0):>7.2f}"
                     f"{pt.get('color', 0):>7.2f}{r['perplexity']:>10.4g}{r['params_total'] / 1e6:>8.1f}M{r['params_activated'] / 1e6:>8.1f}M"
                     f"{r['gflops_per_sample']:>8.1f}{r['latency_ms']:>7.0f}ms")
    return "\n".join(lines)


def _evaluation_questions(data: Path, out: Path, full: bool) -> Path:
    """The trained rows' questions: the whole test split (--full), or its fixed subset (written once, same every run)."""
    from .data.easy_vqa import evaluation_subset

    if full:
        return data / "test_questions.jsonl"
    rows = [json.loads(line) for line in (data / "test_questions.jsonl").read_text().splitlines() if line.strip()]
    path = out / "eval_questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in evaluation_subset(rows, EVAL_NATURAL, EVAL_PER_ANSWER)))
    return path


def _host() -> dict:
    """What the figures were measured on (for the summary): CPU model, AMX or not, the number format auto chose."""
    import platform

    import torch

    from .precision import cpu_has_amx, use_bf16

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"cpu": model, "amx": cpu_has_amx(), "threads": torch.get_num_threads(), "device": device.type,
            "precision": "bf16" if use_bf16(device) else "fp32", "date": time.strftime("%Y-%m-%d")}


def _check_settings(out: Path, settings: dict) -> None:
    """A re-run reuses finished stages only if they were trained with these settings (never a stale recipe's)."""
    marker = out / "demo-settings.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != settings:
            raise LlavaGMError(f"{out} holds a demo run made with other settings (another recipe or sizes); remove it, "
                               "or pass another --output")
    elif any((out / name).exists() for name in ("align", "instruct")):
        raise LlavaGMError(f"{out} holds checkpoints of an earlier demo version; remove it, or pass another --output")
    else:
        marker.write_text(json.dumps(settings))


def run_demo(output: str = "runs/demo", full: bool = False, stage3: bool = True, data_dir: str | None = None, seed: int = 0,
             early_rows: bool = True) -> dict:
    """Train and evaluate; `seed` seeds every stage; `early_rows=False` leaves out the untrained and stage-1 rows."""
    from .data.easy_vqa import build_easy_vqa
    from .infer import Answerer
    from .model.build import build_model

    t0 = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_yaml(RecipeConfig, RECIPE)
    host = _host()  # decides (and prints, once) what precision auto means here
    _check_settings(out, {"format": 2, "recipe": RECIPE.read_text(), "sizes": None if full else QUICK, "balanced_data": BALANCED_DATA, "seed": seed})
    data = build_easy_vqa(data_dir or f"runs/data/easy-vqa{'-balanced' if BALANCED_DATA else ''}", balance=BALANCED_DATA)
    questions = _evaluation_questions(data, out, full)
    print(f"easy-VQA data in {data}; trained models are evaluated on {questions}")
    base_cfg = dataclasses.replace(recipe.model, sparse=dataclasses.replace(recipe.model.sparse, kind="none"))

    def sized(name):
        s = _stage(recipe, name)
        return dataclasses.replace(s, data=str(data / Path(s.data).name), image_folder=str(data), seed=seed,
                                   max_samples=None if full else QUICK.get(name))

    seconds = {}

    def timed(key, fn):
        t = time.perf_counter()
        value = fn()
        seconds[key] = round(time.perf_counter() - t, 1)
        return value

    ckpt = {"align": timed("align", lambda: _train(sized("align"), out / "align", base_cfg, None))}
    ckpt["instruct"] = timed("instruct", lambda: _train(sized("instruct"), out / "instruct", base_cfg, ckpt["align"]))
    if stage3:
        moe = dataclasses.replace(recipe.model.sparse, kind="moe")
        evf = dataclasses.replace(recipe.model.sparse, kind="evf", balance_coef=0.001)  # Eve's alpha
        ckpt["moe"] = timed("sparsify_moe", lambda: _train(sized("sparsify"), out / "sparsify-moe", base_cfg, ckpt["instruct"], sparse=moe))
        ckpt["evf"] = timed("sparsify_evf", lambda: _train(sized("sparsify"), out / "sparsify-evf", base_cfg, ckpt["instruct"], sparse=evf))

    def evaluate_all():
        # before stage 1 there is no word vocabulary: the untrained row feeds the (random) projector output as is
        untrained = dataclasses.replace(base_cfg, projector=dataclasses.replace(base_cfg.projector, word_tokens=False))
        all_test = data / "test_questions.jsonl"
        rows = [_row("untrained", Answerer(build_model(untrained), model_id="untrained"), None, data, all_test, out / "eval-untrained.json", SAMPLE_QUESTIONS),
                _row("stage 1 (align)", Answerer.from_checkpoint(ckpt["align"]), ckpt["align"], data, all_test, out / "eval-align.json", SAMPLE_QUESTIONS),
                ] if early_rows else []
        rows.append(_row("stage 2 (instruct)", Answerer.from_checkpoint(ckpt["instruct"]), ckpt["instruct"], data, questions, out / "eval-instruct.json"))
        if stage3:  # on the same questions as stage 2
            for key, name in (("moe", "stage 3 MoE"), ("evf", "stage 3 EVF")):
                rows.append(_row(name, Answerer.from_checkpoint(ckpt[key]), ckpt[key], data, questions, out / f"eval-{key}.json"))
        return rows

    rows = timed("evaluation", evaluate_all)
    table = format_table(rows)
    from .data.easy_vqa import wording_rule_accuracy

    rule = wording_rule_accuracy(questions)
    table += (f"\nyes/no from the wording alone (negated -> yes, else no; no image): {rule:.2f}; on the balanced part (bal y/n) "
              f"exactly 50.00. Trained rows: {rows[-1 - 2 * stage3]['questions']} questions ({'the whole test split' if full else f'the first {EVAL_NATURAL} of the test split + its balanced yes/no part'})."
              f"\nhost: {host['cpu']} ({'AMX' if host['amx'] else 'no AMX'}), {host['threads']} threads, precision {host['precision']}, {host['date']}")
    print("\n" + table)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    summary = {"rows": [{k: v for k, v in r.items() if k != "correct"} for r in rows], "host": host, "questions": str(questions),
               "table": table, "yes_no_wording_rule": rule, "full": full, "sizes": None if full else QUICK, "seconds": seconds, "checkpoints": ckpt}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ndemo finished in {seconds['total'] / 60:.1f} min; summary in {out / 'summary.json'}")
    return summary
