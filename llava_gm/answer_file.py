"""LLaVA answer files: questions JSONL {question_id, image, text} in, answers JSONL {question_id, prompt, text, model_id} out.

Answers are appended as each chunk of questions finishes, so a killed run keeps what it answered and
`--resume` continues the file. The output is locked while it is written: a second process writing the same
file fails at once instead of losing one of the two outputs. An existing output is never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from .errors import LlavaGMError

SKIP_HINT = "\n(pass --on-bad skip to leave bad rows out and count them)"


def _bad(msg: str, on_bad: str, skipped: list) -> None:
    if on_bad != "skip":
        raise LlavaGMError(msg + SKIP_HINT)
    skipped.append(msg)


def read_questions(path: str | Path, image_folder: str | Path, on_bad: str = "fail") -> tuple[list[dict], list[str]]:
    """Checked question rows (image resolved to a path, `where` = file:line); bad rows fail or are skipped with a
    message each. A question_id that repeats is bad in every row that has it (which answer would be whose?)."""
    path = Path(path)
    if not path.is_file():
        raise LlavaGMError(f"{path}: question file not found")
    folder = Path(image_folder) if image_folder else path.parent
    rows, skipped = [], []
    with open(path, "rb") as f:
        lines = list(enumerate(f, 1))
    for n, raw in lines:
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad(f"{where}: not UTF-8 text (byte {e.start} of the line); save the file as UTF-8", on_bad, skipped)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
                raise ValueError("needs 'question_id' and a string 'text'")
            qid = row["question_id"]
            if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                raise ValueError(f"question_id must be a number or a string, not {qid!r}")
            _check_text(row["text"])
            image = row.get("image")
            if image is not None and image != "":
                if not isinstance(image, str):
                    raise ValueError(f"'image' must be a file name, not {image!r}")
                img = folder / image
                if not img.is_file():
                    raise ValueError(f"image {img} not found (check --image-folder)")
                row["image_path"] = img
            row["where"] = where
            rows.append(row)
        except (json.JSONDecodeError, ValueError) as e:
            _bad(f"{where}: {e}", on_bad, skipped)
    by_id: dict = {}
    for r in rows:
        by_id.setdefault(r["question_id"], []).append(r["where"])
    repeated = {q: w for q, w in by_id.items() if len(w) > 1}
    for qid, wheres in repeated.items():
        _bad(f"{wheres[0]}: question_id {qid!r} repeats in {len(wheres)} rows ({', '.join(wheres[:4])}); ids must be unique",
             on_bad, skipped)
    return [r for r in rows if r["question_id"] not in repeated], skipped


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. "\ud800" in JSON) are no text a tokenizer can take
        raise ValueError("'text' is not valid Unicode text") from None


# ---- limits and bad images, shared with `eval` ----------------------------------------------------------------


def prompt_problem(answerer, prompt: str, has_image: bool) -> Optional[str]:
    """Why the model cannot take this prompt (None if it can): longer than language.max_length tokens, the
    longest sequence the model was trained on. Such questions are refused, not silently truncated."""
    model = getattr(answerer, "model", None)
    if model is None or not hasattr(answerer, "encoder"):
        return None  # a stand-in answerer (tests, a server client) states no limit
    limit = model.cfg.language.max_length
    if has_image and "<image>" not in prompt:
        prompt = f"<image>\n{prompt}"
    # cheap bound first: a token covers at least one UTF-8 byte, so short prompts need no tokenizing
    image_tokens = model.num_image_tokens * prompt.count("<image>")
    if len(prompt.encode("utf-8", "replace")) + image_tokens + 64 <= limit:
        return None
    n = len(answerer.encoder.encode_prompt([{"role": "user", "content": prompt}]))
    if n > limit:
        extra = f" ({image_tokens} of them the image's)" if image_tokens else ""
        return (f"question is {n} tokens long{extra}, over the model's limit of {limit} (language.max_length, the "
                "longest sequence it was trained on); shorten the question")
    return None


def image_problems(items: list[dict]) -> dict[int, str]:
    """{item index: message} for items whose image file cannot be decoded (the feature cache reports only the first)."""
    from .images import load_image

    errors = {}
    for k, it in enumerate(items):
        if isinstance(it.get("image"), (str, Path)):
            try:
                load_image(it["image"])
            except LlavaGMError as e:
                errors[k] = str(e)
    return errors


def answer_checked(answerer, items: list[dict], **decoding) -> tuple[list[Optional[str]], dict[int, str]]:
    """Answers of `items`, with None and a message (by index) for items whose image cannot be decoded, instead of
    one bad file failing the whole batch. Images are only re-checked one by one when the batch fails."""
    try:
        return answerer.answer(items, **decoding), {}
    except LlavaGMError:
        errors = image_problems(items)
        if not errors:
            raise
    keep = [k for k in range(len(items)) if k not in errors]
    answers: list[Optional[str]] = [None] * len(items)
    for k, a in zip(keep, answerer.answer([items[k] for k in keep], **decoding) if keep else []):
        answers[k] = a
    return answers, errors


# ---- the output file --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked_output(path: Path, resume: bool = False, overwrite: bool = False, what: str = "output") -> Iterator:
    """The output opened for appending under an exclusive lock (released when the process ends, even killed).
    An existing non-empty file is an error unless `resume` (keep and continue it) or `overwrite` (start afresh).
    A file this call created stays only if something was written to it."""
    if resume and overwrite:
        raise LlavaGMError("--resume and --overwrite exclude each other")
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    try:
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:  # a folder, no permission, a full disk ...
        raise LlavaGMError(f"{path}: cannot write the {what} here ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()  # the file is the other process's: leave it alone
        raise LlavaGMError(f"{path}: another process is writing this {what} now; wait for it or choose another --output") from None
    try:
        if f.seek(0, os.SEEK_END) and not (resume or overwrite):
            raise LlavaGMError(f"{path} already exists; pass --resume to continue it, --overwrite to replace it, "
                               "or choose another --output")
        if overwrite:
            f.truncate(0)
        yield f
    finally:
        f.flush()
        if not existed and f.seek(0, os.SEEK_END) == 0:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # still holding the lock: nobody else wrote to it
        f.close()


def read_done(f, path: Path, model_id: str) -> set:
    """question_ids already answered in a file being resumed. A torn last line (the run was killed while writing
    it) is cut off; an answer from another model is an error (the file would mix two models)."""
    f.seek(0)
    try:
        data = f.read()
    except UnicodeDecodeError:
        raise LlavaGMError(f"{path}: not UTF-8 text, so not an answer file this command wrote; --overwrite replaces it") from None
    *complete, torn = data.split("\n")
    done = set()
    for n, line in enumerate(complete, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("question_id"), (int, str)):
            raise LlavaGMError(f"{path}:{n}: not an answer row; this file cannot be resumed (--overwrite replaces it)")
        if row.get("model_id") not in (None, model_id):
            raise LlavaGMError(f"{path}:{n}: answer from model {row.get('model_id')!r}, not {model_id!r}; resume with the "
                               "same checkpoint, or --overwrite")
        done.add(row["question_id"])
    if torn:
        f.truncate(len(data.encode("utf-8")) - len(torn.encode("utf-8")))
    f.seek(0, os.SEEK_END)
    return done


def answer_questions(checkpoint, questions, image_folder, output, batch_size=32, on_bad="fail", compile=False,
                     resume=False, overwrite=False, answerer=None, chunk: Optional[int] = None, **decoding) -> Path:
    """Answer a question file into `output`, a chunk at a time (each chunk's answers are on disk before the next)."""
    output = Path(output)
    rows, skipped = read_questions(questions, image_folder, on_bad)
    with locked_output(output, resume, overwrite, "answer file") as out:
        if answerer is None:
            from .infer import Answerer

            answerer = Answerer.from_checkpoint(checkpoint, compile=compile)
        done = read_done(out, output, answerer.model_id) if resume else set()
        todo = [r for r in rows if r["question_id"] not in done]
        written = 0
        chunk = chunk or max(64, 8 * batch_size)
        for s in range(0, len(todo), chunk):
            part, items = [], []
            for r in todo[s : s + chunk]:
                has_image = "image_path" in r
                prompt = f"<image>\n{r['text']}" if has_image and "<image>" not in r["text"] else r["text"]
                problem = prompt_problem(answerer, prompt, has_image)
                if problem:
                    _bad(f"{r['where']}: {problem}", on_bad, skipped)
                    continue
                part.append(r)
                items.append({"prompt": prompt, "image": r.get("image_path")})
            texts, errors = answer_checked(answerer, items, batch_size=batch_size, progress=False, **decoding) if items else ([], {})
            lines = [json.dumps({"question_id": r["question_id"], "prompt": r["text"], "text": t, "model_id": answerer.model_id})
                     for r, t in zip(part, texts) if t is not None]
            if lines:
                out.write("\n".join(lines) + "\n")
                out.flush()
                written += len(lines)
            for k, msg in sorted(errors.items()):
                msg = f"{part[k]['where']}: {msg}"
                if on_bad != "skip":
                    raise LlavaGMError(f"{msg}{SKIP_HINT}\n({written} answers are in {output}; --resume continues it)")
                skipped.append(msg)
    if skipped:
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        print(f"skipped {len(skipped)} bad row(s):\n  " + "\n  ".join(skipped[:10]) + more, file=sys.stderr)
    resumed = f" ({len(done)} were already there)" if done else ""
    print(f"wrote {written} answers to {output}{resumed}")
    return output
