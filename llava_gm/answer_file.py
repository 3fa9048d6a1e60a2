"""LLaVA answer files: questions JSONL {question_id, image, text} in, answers JSONL {question_id, prompt, text, model_id} out."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LlavaGMError
from .paths import atomic_write_bytes


def read_questions(path: str | Path, image_folder: str | Path, on_bad: str = "fail") -> tuple[list[dict], list[str]]:
    """Checked question rows (image resolved to a path); bad rows fail or are skipped with a message each."""
    path = Path(path)
    if not path.is_file():
        raise LlavaGMError(f"{path}: question file not found")
    folder = Path(image_folder) if image_folder else path.parent
    rows, skipped = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
                raise ValueError("needs 'question_id' and a string 'text'")
            if row.get("image"):
                img = folder / row["image"]
                if not img.is_file():
                    raise ValueError(f"image {img} not found (check --image-folder)")
                row["image_path"] = img
            rows.append(row)
        except (json.JSONDecodeError, ValueError) as e:
            msg = f"{path}:{n}: {e}"
            if on_bad != "skip":
                raise LlavaGMError(msg + "\n(pass --on-bad skip to leave bad rows out and count them)") from None
            skipped.append(msg)
    return rows, skipped


def answer_questions(checkpoint, questions, image_folder, output, batch_size=32, on_bad="fail", compile=False, **decoding) -> Path:
    from .infer import Answerer

    rows, skipped = read_questions(questions, image_folder, on_bad)
    answerer = Answerer.from_checkpoint(checkpoint, compile=compile)
    items = [{"prompt": (f"<image>\n{r['text']}" if "image_path" in r and "<image>" not in r["text"] else r["text"]),
              "image": r.get("image_path")} for r in rows]
    texts = answerer.answer(items, batch_size=batch_size, **decoding)
    lines = [json.dumps({"question_id": r["question_id"], "prompt": r["text"], "text": t, "model_id": answerer.model_id}) for r, t in zip(rows, texts)]
    atomic_write_bytes(Path(output), ("\n".join(lines) + "\n").encode())  # all answers or none
    if skipped:
        print(f"skipped {len(skipped)} bad row(s):\n  " + "\n  ".join(skipped[:5]), file=__import__("sys").stderr)
    print(f"wrote {len(lines)} answers to {output}")
    return Path(output)
