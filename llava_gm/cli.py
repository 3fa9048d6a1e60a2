"""The `llava-gm` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LlavaGMError


def _add_train(sub):
    p = sub.add_parser("train", help="train one stage, or every stage of a recipe in order")
    p.add_argument("--recipe", default="offline-default", help="a shipped recipe's name (`llava-gm recipes` lists them) or a YAML file")
    p.add_argument("--output", required=True, help="folder for the checkpoints (one sub-folder per stage)")
    p.add_argument("--stage", choices=["align", "instruct", "sparsify"], help="run only this stage of the recipe")
    p.add_argument("--from", dest="init", help="checkpoint to start from (e.g. stage 1's output for stage 2)")
    p.add_argument("--skip-align", action="store_true", help="skip stage 1 (LLaVA-Gemma's no-pretraining ablation)")
    p.add_argument("--data", help="LLaVA JSON for the stage (overrides the recipe)")
    p.add_argument("--image-folder", help="folder the data's image paths are relative to")
    p.add_argument("--lora", action="store_true", help="stage 2 with LoRA adapters instead of the whole LM (Eve)")
    p.add_argument("--sparse", choices=["moe", "evf"], help="stage 3 layer kind (overrides the recipe)")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--on-bad", choices=["fail", "skip"], help="bad samples: stop with an error (default) or skip and count them")
    _add_train_scale(p)
    p.set_defaults(func=cmd_train)


def _add_train_scale(p):
    """Long runs: step checkpoints, resume, streamed features, many processes (docs: README "Training at scale")."""
    p.add_argument("--resume", action="store_true", help="reuse finished stages in --output and continue an interrupted one from its newest step checkpoint")
    p.add_argument("--save-every", type=int, default=500, help="optimizer steps between step checkpoints (0: none; default 500)")
    p.add_argument("--keep-last", type=int, default=2, help="step checkpoints kept (default 2)")
    p.add_argument("--features", choices=["auto", "online", "cache"], default="auto",
                   help="vision features: computed in the step (online, default on GPUs) or from the on-disk cache (default on CPUs)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: a few for online features, 0 for the cache)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: ddp (replicated weights) or fsdp (FSDP2: parameters, gradients and optimizer state sharded)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in the backward: less memory, about a third more compute")


def cmd_train(a):
    import dataclasses

    from .config import RecipeConfig, check_ranges, load_yaml
    from .recipes import resolve

    _positive(a, "max_samples", "epochs", "lr", "batch_size", "grad_accum")  # before anything is read or imported
    a.recipe = resolve(a.recipe)
    recipe = load_yaml(RecipeConfig, a.recipe)
    stages = [s for s in recipe.stages if (a.stage is None or s.name == a.stage) and not (a.skip_align and s.name == "align")]
    if not stages:
        raise LlavaGMError(f"{a.recipe}: no stage {a.stage!r} in the recipe (it has {[s.name for s in recipe.stages]})")
    overrides = {k: v for k, v in {"data": a.data, "image_folder": a.image_folder, "max_samples": a.max_samples, "epochs": a.epochs,
                                   "lr": a.lr, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "on_bad": a.on_bad}.items() if v is not None}
    if a.lora:
        overrides["lora"] = True
    sparse = recipe.model.sparse
    if a.sparse:
        sparse = dataclasses.replace(sparse, kind=a.sparse)
    base_cfg = dataclasses.replace(recipe.model, sparse=dataclasses.replace(sparse, kind="none"))
    init = a.init
    stages = [dataclasses.replace(s, **{k: v for k, v in overrides.items() if k != "lora" or s.name == "instruct"}) for s in stages]
    for s in stages:
        check_ranges(s, f"{a.recipe}: stage {s.name}")
    for stage in stages:  # before any model is built: a missing data file is the common first-run mistake
        if stage.data and not Path(stage.data).is_file():
            raise LlavaGMError(f"stage {stage.name}: data file {stage.data} not found (relative to {Path.cwd()}); pass --data, "
                               "or build easy-VQA for the offline recipe here with `llava-gm prepare-data --output runs/data/easy-vqa`")
    from .train.run import run_stage

    for stage in stages:
        result = run_stage(stage, Path(a.output) / stage.name, model_cfg=base_cfg, init=init, sparse=sparse, resume=a.resume,
                           save_every=a.save_every, keep_last=a.keep_last, features=a.features, workers=a.workers,
                           resume_command=_same_command(a), strategy=a.strategy, activation_checkpointing=a.activation_checkpointing)
        init = result["checkpoint"]
    if int(__import__("os").environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 speaks
        print(f"done: {init}")


def _same_command(a) -> str:
    """The command line that started this run, for messages that say how to continue it."""
    import os
    import shlex

    argv = [x for x in getattr(a, "argv", []) if x != "--resume"]
    launcher = "torchrun --nproc_per_node " + os.environ["WORLD_SIZE"] + " -m llava_gm" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "llava-gm"
    return launcher + " " + shlex.join(argv)


def _add_ask(sub):
    p = sub.add_parser("ask", help="answer one question about one image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", help="image file (omit for a text-only question)")
    p.add_argument("--question", required=True)
    _decoding_args(p, max_new_tokens=128)
    p.set_defaults(func=cmd_ask)


def _decoding_args(p, max_new_tokens):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(a, *names) -> None:
    """Number flags checked before any work (a model load takes a while): a clear message naming the flag."""
    import math

    for name in names:
        v = getattr(a, name, None)
        if v is not None and (isinstance(v, float) and not math.isfinite(v) or v <= 0):
            raise LlavaGMError(f"{_flag(name)} must be a positive number, not {v}")


def _check_decoding(a) -> None:
    import math

    _positive(a, "max_new_tokens")
    if not math.isfinite(a.temperature) or a.temperature < 0:
        raise LlavaGMError(f"--temperature must be 0 (greedy) or positive, not {a.temperature}")
    if not (0 < a.top_p <= 1):
        raise LlavaGMError(f"--top-p must be in (0, 1], not {a.top_p}")


def _text_arg(value: str, flag: str) -> str:
    try:
        value.encode("utf-8")  # undecodable command-line bytes arrive as lone surrogates
    except UnicodeEncodeError:
        raise LlavaGMError(f"{flag} is not valid UTF-8 text; check the terminal's encoding") from None
    return value


def cmd_ask(a):
    from .answer_file import prompt_problem
    from .infer import Answerer

    _check_decoding(a)
    _text_arg(a.question, "--question")
    image = None
    if a.image:
        from .images import load_image

        image = load_image(a.image)
    answerer = Answerer.from_checkpoint(a.checkpoint)
    prompt = f"<image>\n{a.question}" if image is not None else a.question
    problem = prompt_problem(answerer, prompt, image is not None)
    if problem:
        raise LlavaGMError(f"--question: {problem}")
    print(answerer.answer([{"prompt": prompt, "image": image}], max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_p=a.top_p, seed=a.seed, progress=False)[0])


def _add_answer(sub):
    p = sub.add_parser("answer", help="answer a LLaVA question file (question_id, image, text) into an answer file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--questions", required=True, help="JSONL: {question_id, image, text}")
    p.add_argument("--image-folder", default="", help="folder the questions' image paths are relative to")
    p.add_argument("--output", required=True, help="answers JSONL: {question_id, prompt, text, model_id}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--on-bad", choices=["fail", "skip"], default="fail",
                   help="bad rows (malformed, missing or undecodable image, too long): stop (default) or skip and count them")
    p.add_argument("--resume", action="store_true", help="continue a partial --output (a killed run): answer only what is missing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode steps (and the tower for in-memory images): faster steps after ~1 min of "
                        "compiling per batch shape; pays off on long runs")
    _decoding_args(p, max_new_tokens=64)
    p.set_defaults(func=cmd_answer)


def cmd_answer(a):
    from .answer_file import answer_questions

    _check_decoding(a)
    _positive(a, "batch_size")
    answer_questions(a.checkpoint, a.questions, a.image_folder, a.output, batch_size=a.batch_size, on_bad=a.on_bad,
                     compile=a.compile, resume=a.resume, overwrite=a.overwrite, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)


def _add_prepare(sub):
    p = sub.add_parser("prepare-data", help="build the offline easy-VQA data as LLaVA JSON")
    p.add_argument("--output", default="runs/data/easy-vqa")
    p.add_argument("--per-conversation", type=int, default=1, help="questions of an image packed into one multi-turn conversation")
    p.add_argument("--balance", action="store_true", help="as many yes as no answers per yes/no question form in training (no wording prior)")
    p.set_defaults(func=lambda a: print("easy-VQA in LLaVA format: " + str(__import__("llava_gm.data.easy_vqa", fromlist=["x"]).build_easy_vqa(
        a.output, per_conversation=a.per_conversation, balance=a.balance))))


def _add_recipes(sub):
    p = sub.add_parser("recipes", help="list the shipped recipes, or print one (to copy and edit)")
    p.add_argument("name", nargs="?", help="a recipe name or YAML path")

    def run(a):
        from .config import RecipeConfig, load_yaml
        from .recipes import names, resolve

        if not a.name:
            print("\n".join(names()))
            return
        path = resolve(a.name)
        load_yaml(RecipeConfig, path)  # checked as training would check it
        print(f"# {path}\n{path.read_text()}", end="")

    p.set_defaults(func=run)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the offline demo: data, stage 1, stage 2, evaluation, summary")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--full", action="store_true", help="train on all data for the best numbers (slower)")
    p.add_argument("--no-stage3", action="store_true", help="stop after stage 2 (no MoE / EVF variants)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (bench/demo_seeds.py compares seeds)")
    p.set_defaults(func=lambda a: __import__("llava_gm.demo", fromlist=["x"]).run_demo(a.output, full=a.full, stage3=not a.no_stage3, seed=a.seed))


def _add_export(sub):
    p = sub.add_parser("export", help="write a model as a transformers Llava folder (hf) or llava-gm's self-contained folder")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or a llava-gm export")
    p.add_argument("--format", required=True, choices=["hf", "llava-gm"],
                   help="hf: LlavaForConditionalGeneration + processor (dense models); llava-gm: any model, read by llava_gm.load")
    p.add_argument("--output", required=True, help="new folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (once the new one is complete)")
    p.set_defaults(func=lambda a: print(f"exported ({a.format}): " + str(__import__("llava_gm.export", fromlist=["x"]).export_checkpoint(
        a.checkpoint, a.output, a.format, a.overwrite))))


def _add_explain(sub):
    p = sub.add_parser("explain", help="answer a question and write the image overlaid with each image token's relevance")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or a llava-gm export")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--tokens", default="first", help="answer tokens to explain: first (as LLaVA-Gemma), all, or an index")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_explain)


def cmd_explain(a):
    from . import load
    from .analysis.relevancy import explain, overlay_png
    from .images import load_image
    from .paths import atomic_write_bytes

    if Path(a.output).suffix.lower() != ".png":
        raise LlavaGMError(f"--output {a.output}: the map is written as PNG; name the file *.png")
    tokens = int(a.tokens) if a.tokens.lstrip("-").isdigit() else a.tokens
    image = load_image(a.image)
    e = explain(load(a.checkpoint), image, a.question, max_new_tokens=a.max_new_tokens, tokens=tokens)
    atomic_write_bytes(Path(a.output), overlay_png(image, e.relevance, title=f"{a.question} -> {e.answer}", explanation=e))
    print(e.answer)
    print(f"relevancy map of {len(e.token_relevance)} image tokens ({e.grid[0]}x{e.grid[1]} grid) -> {a.output}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-gm", description="Build, train, evaluate and serve lightweight sparse VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_recipes(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_ask(sub)
    _add_answer(sub)
    _add_export(sub)
    _add_explain(sub)
    for module in ("llava_gm.eval.cli", "llava_gm.analysis.cli", "llava_gm.serve.cli",
                   "llava_gm.data.check", "llava_gm.analysis.plan"):
        try:
            __import__(module, fromlist=["add_commands"]).add_commands(sub)
        except ImportError as e:
            if not str(e).startswith("No module named 'llava_gm"):
                raise
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except LlavaGMError as e:
        print(f"llava-gm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llava-gm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
