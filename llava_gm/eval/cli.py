"""`llava-gm eval`, `llava-gm score` and `llava-gm summary`: `add_commands(subparsers)` adds them to the main CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LlavaGMError
from .runner import evaluate, score, write_summary
from .tasks import TASKS


def _options(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise LlavaGMError(f"--option takes KEY=VALUE, not {p!r}")
        k, v = p.split("=", 1)
        out[k] = v
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=list(TASKS), help="benchmark name")
    p.add_argument("--data", required=True, help="the benchmark's official files (folder or main file); see docs/evaluation.md")
    p.add_argument("--split", help="split to read where the release has several (default: the papers' split)")
    p.add_argument("--image-folder", help="images somewhere else than the release's default place")
    p.add_argument("--on-bad", "--on-error", dest="on_error", choices=["fail", "skip"], default="fail",
                   help="data problems (missing image, malformed row, no answer): stop (default) or skip and count them")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option, e.g. ocr=false")
    p.add_argument("--output", help="results JSON path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (refused without it)")


def _print_result(r: dict) -> None:
    head = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["headline"].items())
    scalars = {k: round(v, 3) if isinstance(v, float) else v for k, v in r["metrics"].items() if isinstance(v, (int, float, bool))}
    print(f"{r['task']} ({r['split']}, {r['n_questions']} questions): {head or 'scored on the server'}")
    print("  " + json.dumps(scalars))
    if r["n_problems"]:
        print(f"  {r['n_problems']} data problem(s) skipped; listed in the results file")
    for name, path in r.get("outputs", {}).items():
        print(f"  {name}: {path}")


def _check_numbers(args) -> None:
    """Number flags checked before the model loads, naming the flag."""
    import math

    for flag in ("limit", "batch_size", "max_new_tokens"):
        v = getattr(args, flag, None)
        if v is not None and v <= 0:
            raise LlavaGMError(f"--{flag.replace('_', '-')} must be a positive number, not {v}")
    t = getattr(args, "temperature", 0.0)
    if not math.isfinite(t) or t < 0:
        raise LlavaGMError(f"--temperature must be 0 (greedy) or positive, not {t}")


def _refuse_existing(output: str, overwrite: bool) -> None:
    """Results (and the answer file beside them) are not replaced without --overwrite."""
    out = Path(output).expanduser()
    stem = out.with_suffix("") if out.suffix == ".json" else out
    existing = [p for p in (out, Path(f"{stem}.answers.jsonl")) if p.exists()]
    if existing and not overwrite:
        raise LlavaGMError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --output")


def cmd_eval(args) -> int:
    from ..infer import Answerer

    _check_numbers(args)
    output = args.output or str(Path("runs") / "eval" / Path(args.checkpoint).name / f"{args.task}.json")
    _refuse_existing(output, args.overwrite)
    answerer = Answerer.from_checkpoint(args.checkpoint)
    r = evaluate(answerer, args.task, args.data, output=output, limit=args.limit, batch_size=args.batch_size,
                 split=args.split, image_folder=args.image_folder, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, on_error=args.on_error, options=_options(args.option),
                 progress=not args.no_progress)
    _print_result(r)
    return 0


def cmd_score(args) -> int:
    if args.output:
        _refuse_existing(args.output, args.overwrite)
    r = score(args.task, args.data, args.answers, output=args.output, split=args.split, image_folder=args.image_folder,
              on_error=args.on_error, options=_options(args.option))
    _print_result(r)
    return 0


def cmd_summary(args) -> int:
    results = []
    for path in args.results or []:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise LlavaGMError(f"cannot read results file {path}: {e}") from None
    specs = []
    for spec in args.task or []:
        if "=" not in spec:
            raise LlavaGMError(f"--task takes NAME=PATH, not {spec!r}")
        name, data = spec.split("=", 1)
        if name not in TASKS:
            raise LlavaGMError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
        specs.append((name, data))
    if specs and not args.checkpoint:
        raise LlavaGMError("--task needs at least one --checkpoint to run")
    if args.checkpoint:
        from ..infer import Answerer

        for ckpt in args.checkpoint:
            answerer = Answerer.from_checkpoint(ckpt)
            for name, data in specs:
                out = Path(args.output_dir) / Path(ckpt).name / f"{name}.json"
                results.append(evaluate(answerer, name, data, output=str(out), limit=args.limit, batch_size=args.batch_size,
                                        on_error=args.on_error, progress=not args.no_progress))
    if not results:
        raise LlavaGMError("nothing to tabulate: give --checkpoint with --task NAME=PATH, or --results files")
    md, paths = write_summary(results, args.output_dir)
    print(md, end="")
    print("written: " + ", ".join(paths))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("eval", help="run a checkpoint on a benchmark and score it as the official tools do")
    p.add_argument("--checkpoint", required=True)
    _common(p)
    p.add_argument("--limit", type=int, help="first N questions (whole MME images / MMBench rotations / MMVP pairs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, help="default: the official scripts' value (128; 1024 for ScienceQA and MMBench)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the papers' setting)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("score", help="score an existing LLaVA answer file (question_id, text) without a model")
    _common(p)
    p.add_argument("--answers", required=True, help="answer JSONL: {question_id, text} per line")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser("summary", help="several tasks (and checkpoints) in one paper-style table (Markdown + CSV)")
    p.add_argument("--checkpoint", action="append", help="checkpoint to evaluate (repeatable)")
    p.add_argument("--task", action="append", metavar="NAME=PATH", help="task and its data (repeatable)")
    p.add_argument("--results", nargs="*", help="existing results JSON files to include")
    p.add_argument("--output-dir", default=str(Path("runs") / "eval" / "summary"))
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--on-bad", "--on-error", dest="on_error", choices=["fail", "skip"], default="fail")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_summary)
