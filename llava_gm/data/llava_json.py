"""LLaVA-format conversation data: reading, checking and encoding samples.

A row: {"id", "image" (optional, relative to the image folder), "conversations": [{"from", "value"}, ...]}
with an "<image>" tag in the text iff the row has an image. Bad rows are an error naming the row,
or, with on_bad="skip", are left out and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import LlavaGMError
from .conversation import IMAGE_TAG, ConversationEncoder, Encoded, SampleError, to_messages


@dataclass
class Sample:
    id: str
    image: Optional[Path]
    encoded: Encoded


@dataclass
class SkipReport:
    """Samples left out with on_bad='skip', by reason; printed and written with the results."""

    reasons: dict = field(default_factory=dict)  # sample id -> message

    def add(self, err: SampleError) -> None:
        self.reasons[err.sample_id] = str(err)

    def __len__(self) -> int:
        return len(self.reasons)

    def summary(self, limit: int = 5) -> str:
        lines = [f"skipped {len(self)} bad sample(s):"] + [f"  {m}" for m in list(self.reasons.values())[:limit]]
        if len(self) > limit:
            lines.append(f"  ... and {len(self) - limit} more")
        return "\n".join(lines)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a LLaVA .json (a list) or .jsonl file; a malformed file or row names its place."""
    path = Path(path)
    if not path.is_file():
        raise LlavaGMError(f"{path}: data file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LlavaGMError(f"{path}:{line}: not UTF-8 text (byte {e.start} of the file); save the file as UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LlavaGMError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlavaGMError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
        if not isinstance(rows, list):
            raise LlavaGMError(f"{path}: expected a JSON list of samples")
    return rows


def check_row(row, index: int, image_folder: Path) -> tuple[str, Optional[Path], list[dict]]:
    """Validate one row's structure; return (id, image path or None, chat messages)."""
    if not isinstance(row, dict):
        raise SampleError(f"#{index}", "row is not a JSON object")
    sid = str(row.get("id", f"#{index}"))
    if "conversations" not in row:
        raise SampleError(sid, "has no 'conversations' field")
    messages = to_messages(row["conversations"], sid)
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON) is no text a tokenizer can take
            raise SampleError(sid, f"turn {i}: 'value' is not valid Unicode text") from None
    tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        raise SampleError(sid, "'image' must be a file name (one image per sample)")
    if image and tags != 1:
        raise SampleError(sid, f"has an image but {tags} '{IMAGE_TAG}' tags in its text; put exactly one '{IMAGE_TAG}' in the first human turn")
    if not image and tags:
        raise SampleError(sid, f"has '{IMAGE_TAG}' in its text but no 'image' field")
    path = None
    if image:
        path = image_folder / image
        if not path.is_file():
            raise SampleError(sid, f"image {path} not found (check --image-folder)")
    return sid, path, messages


def load_samples(path: str | Path, image_folder: str | Path, encoder: ConversationEncoder, on_bad: str = "fail", max_samples: Optional[int] = None) -> tuple[list[Sample], SkipReport]:
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise LlavaGMError(f"max_samples must be a positive whole number, not {max_samples!r}")
    rows = read_rows(path)
    if max_samples:
        rows = rows[:max_samples]
    folder = Path(image_folder) if image_folder else Path(path).parent
    samples, skipped = [], SkipReport()
    for i, row in enumerate(rows):
        try:
            sid, image, messages = check_row(row, i, folder)
            samples.append(Sample(sid, image, encoder.encode(messages, sid)))
        except SampleError as e:
            if on_bad != "skip":
                raise LlavaGMError(f"{path}: {e}\n(pass --on-bad skip to leave bad samples out and count them)") from None
            skipped.add(e)
    if not samples:
        raise LlavaGMError(f"{path}: no usable samples" + (f"\n{skipped.summary()}" if len(skipped) else ""))
    return samples, skipped
