"""Run a task with a model (`evaluate`), score an existing answer file (`score`), tabulate runs (`summary`).

Every run writes one results JSON that says exactly what was measured: task version, split, files read,
prompt template, metric variant and the official script followed, decoding settings, the checkpoint's hash,
data problems and skips, and every question's prompt, prediction and score. Next to it: the LLaVA answer file
(`question_id`, `prompt`, `text`) that `score` reads back, and the server submission file where there is one.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

from .. import __version__
from ..errors import LlavaGMError
from ..paths import atomic_write_bytes
from .base import Loaded, Problems, Question, unique_questions, valid_key
from .tasks import TASKS, get_task


def _limit(questions: list[Question], limit: Optional[int]) -> list[Question]:
    """The first questions up to `limit`, keeping groups (MME images, MMBench rotations, MMVP pairs) whole."""
    if limit is None:
        return questions
    gid = lambda q: ("g", q.group) if q.group is not None else ("q", q.key)
    sizes = Counter(gid(q) for q in questions)
    chosen, total = set(), 0
    for q in questions:
        if total >= limit:
            break
        if gid(q) not in chosen:
            chosen.add(gid(q))
            total += sizes[gid(q)]
    return [q for q in questions if gid(q) in chosen]


def _load(task, data, split, image_folder, problems: Problems) -> Loaded:
    """The task's questions with unique ids (a repeated id is a problem: it would score one row's answer against
    another row's truth); any file that is not UTF-8 is one clear error."""
    try:
        loaded = task.load(str(data), split, image_folder, problems)
    except UnicodeDecodeError as e:
        raise LlavaGMError(f"{data}: a file of the {task.name} data is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    loaded.questions = unique_questions(loaded.questions, problems)
    problems.check()
    return loaded


def _drop_incomplete(questions: list[Question], predictions: dict, problems: Problems) -> list[Question]:
    """Questions without a prediction become problems; with on_error=skip their whole group is left out."""
    missing = [q for q in questions if q.key not in predictions]
    named = {p["question_id"] for p in problems.items if valid_key(p.get("question_id"))}  # already have their reason
    for q in missing:
        if q.key not in named:
            problems.add(q.where, "no answer for this question", q.key)
    problems.check("answer")
    bad = {q.group for q in missing if q.group is not None}
    return [q for q in questions if q.key in predictions and (q.group is None or q.group not in bad)]


def _generate(answerer, questions, problems, max_new_tokens, temperature, batch_size, progress) -> dict:
    from tqdm import tqdm

    from ..answer_file import answer_checked, prompt_problem

    predictions = {}
    chunk = max(256, 8 * batch_size)  # bounds the decoded images held at once; the answerer sorts within a chunk
    bar = tqdm(total=len(questions), desc="answering", unit="q", disable=not progress)
    for s in range(0, len(questions), chunk):
        part, items = [], []
        for q in questions[s : s + chunk]:
            try:
                image = q.image() if callable(q.image) else q.image
            except LlavaGMError as e:
                problems.add(q.where, str(e), q.key)
                continue
            too_long = prompt_problem(answerer, q.prompt, image is not None)
            if too_long:
                problems.add(q.where, too_long, q.key)
                continue
            part.append(q)
            items.append({"prompt": q.prompt, "image": image})
        answers, bad = answer_checked(answerer, items, max_new_tokens=max_new_tokens, temperature=temperature,
                                      batch_size=batch_size, progress=False) if items else ([], {})
        for k, msg in bad.items():  # an image file that does not decode: a problem of its row, like a missing one
            problems.add(part[k].where, msg, part[k].key)
        predictions.update((q.key, a.strip()) for q, a in zip(part, answers) if a is not None)
        bar.update(len(questions[s : s + chunk]))
    bar.close()
    problems.check("image")
    return predictions


def _result(task, loaded: Loaded, questions, predictions, per, metrics, problems, data, limit) -> dict:
    records = []
    for q in questions:
        rec = {"question_id": q.key}
        if task.kind == "generate":
            rec.update(prompt=q.prompt, text=predictions[q.key])
        rec.update(per.get(q.key, {}))
        rec["meta"] = {k: v for k, v in q.meta.items() if k != "continuations"}
        records.append(rec)
    return {
        "task": task.name, "task_version": task.version, "split": loaded.split, "data": str(data),
        "files": loaded.files, "official_script": task.official, "metric_variant": task.metric_variant,
        "prompt_template": task.prompt_template, "options": task.options,
        "info": {k: v for k, v in loaded.info.items() if k not in ("header",)},
        "metrics": metrics, "headline": task.headline(metrics),
        "n_questions": len(questions), "limit": limit, "on_error": problems.on_error,
        "n_problems": len(problems.items), "problems": problems.items,
        "llava_gm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "predictions": records,
    }


def _write(task, loaded, questions, predictions, result, output) -> None:
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    files = {"results": str(out)}
    if task.kind == "generate":
        answers = Path(f"{stem}.answers.jsonl")
        with open(answers, "w", encoding="utf-8") as f:
            for q in questions:  # the LLaVA answer-file format, readable by `score`
                f.write(json.dumps({"question_id": q.key, "prompt": q.prompt, "text": predictions[q.key],
                                    "model_id": result.get("model_id")}) + "\n")
        files["answers"] = str(answers)
        subs = task.submission(loaded, questions, predictions, stem)
        if subs:
            files["submission"] = subs
    result["outputs"] = files
    result["info"] = {k: v for k, v in loaded.info.items() if k not in ("header",)}  # submission may add notes
    atomic_write_bytes(out, json.dumps(result, indent=1, default=str).encode())


def evaluate(answerer, task: str, data: str, output: Optional[str] = None, limit: Optional[int] = None,
             batch_size: int = 32, *, split: Optional[str] = None, image_folder: Optional[str] = None,
             max_new_tokens: Optional[int] = None, temperature: float = 0.0, on_error: str = "fail",
             options: Optional[dict] = None, progress: bool = True) -> dict:
    """Read the benchmark, build the prompts, answer them in batches, score, and (with `output`) write the results."""
    t = get_task(task, options)
    problems = Problems(on_error)
    loaded = _load(t, data, split, image_folder, problems)
    questions = _limit(loaded.questions, limit)
    if not questions:
        raise LlavaGMError(f"{data}: no questions to evaluate for task {task}")
    if t.kind == "generate":
        max_new_tokens = max_new_tokens or t.max_new_tokens
        predictions = _generate(answerer, questions, problems, max_new_tokens, temperature, batch_size, progress)
        decoding = {"strategy": "greedy" if temperature == 0 else "sampling", "temperature": temperature,
                    "max_new_tokens": max_new_tokens, "batch_size": batch_size, "sorted_by_length": True,
                    "answers_stripped": True}
    elif t.kind == "loglikelihood":
        lps = answerer.loglikelihood(t.requests(questions), batch_size=batch_size)
        predictions = t.collect(questions, lps)
        decoding = {"method": "sum log-likelihood per option", "batch_size": batch_size}
    else:
        predictions = {"text": answerer.perplexity(questions[0].prompt, stride=int(t.options["stride"]))}
        decoding = {"method": "perplexity", "stride": t.options["stride"]}
    questions = _drop_incomplete(questions, predictions, problems)
    metrics, per = t.score(questions, predictions)
    result = _result(t, loaded, questions, predictions, per, metrics, problems, data, limit)
    result.update(mode="evaluate", model_id=getattr(answerer, "model_id", None),
                  checkpoint_hash=getattr(answerer, "checkpoint_hash", None), decoding=decoding)
    if output:
        _write(t, loaded, questions, predictions, result, output)
    return result


def read_answers(t, path: Path, loaded: Loaded, problems: Problems) -> tuple[dict, dict]:
    """{question key: text} from a LLaVA answer JSONL, plus counts of rows that were ignored."""
    from .base import read_jsonl

    by_key = {q.key: q for q in loaded.questions}
    predictions, where_of, counts, repeated = {}, {}, Counter(), set()
    for where, row in read_jsonl(path, problems):
        if not valid_key(row.get("question_id")):
            problems.add(where, f"question_id must be a number or a string, not {row.get('question_id')!r}")
            continue
        key = t.match_answer(row, by_key)
        if key is None:
            if row.get("question_id") in loaded.ignored_keys:
                counts["ignored_not_in_task"] += 1  # e.g. ScienceQA questions without an image
            else:
                problems.add(where, f"answer for a question not in the data: {row.get('question_id')!r}")
            continue
        if not isinstance(row.get("text"), str):
            problems.add(where, "answer row has no text", key)
            continue
        if key in where_of:  # two answers to one question: neither is taken (with skip, the question is left out)
            problems.add(where, f"second answer for question {key!r} (first at {where_of[key]})", key)
            repeated.add(key)
            continue
        predictions[key], where_of[key] = row["text"], where
        if isinstance(row.get("model_id"), str) and row["model_id"]:
            counts[f"model_id={row['model_id']}"] += 1
    for key in repeated:
        del predictions[key]
    return predictions, dict(counts)


def score(task: str, data: str, answers: str, output: Optional[str] = None, *, split: Optional[str] = None,
          image_folder: Optional[str] = None, on_error: str = "fail", options: Optional[dict] = None) -> dict:
    """Score an existing LLaVA answer file (`question_id`, `text`) against the benchmark, no model needed."""
    t = get_task(task, options)
    if t.kind != "generate":
        raise LlavaGMError(f"task {task} scores log-likelihoods or perplexity, which an answer file does not hold; use eval")
    path = Path(answers).expanduser()
    if not path.is_file():
        raise LlavaGMError(f"answer file not found: {path}")
    problems = Problems(on_error, check_images=False)
    loaded = _load(t, data, split, image_folder, problems)
    predictions, counts = read_answers(t, path, loaded, problems)
    problems.check("answer file")
    questions = _drop_incomplete(loaded.questions, predictions, problems)
    if not questions:
        raise LlavaGMError(f"{path}: no answers match the questions of {data}")
    metrics, per = t.score(questions, predictions)
    result = _result(t, loaded, questions, predictions, per, metrics, problems, data, None)
    models = [k.split("=", 1)[1] for k in counts if k.startswith("model_id=")]
    result.update(mode="score", answers_file=str(path), answer_rows=counts,
                  model_id=models[0] if len(models) == 1 else (models or None), checkpoint_hash=None)
    if output:
        out = Path(output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        stem = out.with_suffix("") if out.suffix == ".json" else out
        subs = t.submission(loaded, questions, predictions, stem)
        result["outputs"] = {"results": str(out), **({"submission": subs} if subs else {})}
        result["info"] = {k: v for k, v in loaded.info.items() if k != "header"}
        atomic_write_bytes(out, json.dumps(result, indent=1, default=str).encode())
    return result


# ---- summary: several tasks (and models) in one table, like the papers' tables -------------------------------


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def summary_table(results: Iterable[dict]) -> tuple[list[str], list[list]]:
    """Rows = models, columns = the tasks' headline numbers in the papers' order."""
    order = {name: i for i, name in enumerate(TASKS)}
    results = sorted(results, key=lambda r: order.get(r["task"], len(order)))
    columns, rows = [], {}
    for r in results:
        label = str(r.get("model_id") or r.get("answers_file") or "model")
        if r.get("checkpoint_hash"):
            label += f" ({r['checkpoint_hash'][:8]})"
        for col, v in r["headline"].items():
            if col not in columns:
                columns.append(col)
            rows.setdefault(label, {})[col] = v
    return ["model"] + columns, [[label] + [vals.get(c) for c in columns] for label, vals in rows.items()]


def summary_markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(results: list[dict], output_dir: str) -> tuple[str, list[str]]:
    """Write summary.md and summary.csv into output_dir; return the Markdown table and the paths."""
    header, rows = summary_table(results)
    md = summary_markdown(header, rows)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([[("" if v is None else v) for v in row] for row in rows])
    (out / "summary.csv").write_text(buf.getvalue())
    return md, [str(out / "summary.md"), str(out / "summary.csv")]


def run_summary(answerers: list, tasks: list[tuple[str, str]], output_dir: str, **kwargs) -> tuple[str, list[dict]]:
    """Evaluate every answerer on every (task, data); results go to output_dir/<model>/<task>.json."""
    results = []
    for a in answerers:
        for name, data in tasks:
            out = Path(output_dir) / str(getattr(a, "model_id", "model")) / f"{name}.json"
            results.append(evaluate(a, name, data, output=str(out), **kwargs))
    md, _ = write_summary(results, output_dir)
    return md, results
