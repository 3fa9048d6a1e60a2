"""`llava-gm data check`: find every problem of a LLaVA-format dataset before a long run, in one pass.

Rows go through the trainer's own checks (llava_json.check_row: structure, speakers, `<image>` tags, the image
file) and, with a recipe, through its chat template and tokenizer (ConversationEncoder.encode) to find samples
over language.max_length. Every distinct image is decoded with the loader every command uses
(llava_gm.images.load_image) in a pool of processes: missing, unreadable, truncated and oversized images are named.
Nothing stops at the first problem: the summary counts them by kind, and the JSON report lists each one with its
row, id and message.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from ..errors import LlavaGMError
from .conversation import SampleError, to_messages

KINDS = {  # kind -> what it means, in the order the summary lists them
    "structure": "row structure: conversations, speakers, turn order, `<image>` tags, 'image' field",
    "template": "does not render through the chat template into labelled turns",
    "too_long": "over language.max_length tokens after rendering",
    "missing_image": "image file not found",
    "unreadable_image": "image file empty, unreadable or in no known format",
    "truncated_image": "image file truncated or corrupt",
    "oversized_image": "image over the decompression-bomb pixel limit",
}


@dataclass
class Problem:
    row: int  # index in the file (0-based)
    id: str
    kind: str
    message: str


@dataclass
class CheckReport:
    data: str
    image_folder: str
    rows: int = 0
    images: int = 0  # distinct image files checked
    max_length: Optional[int] = None  # None: no recipe, lengths not checked
    problems: list = field(default_factory=list)
    lengths: dict = field(default_factory=dict)  # token-length statistics of the rendered samples

    @property
    def bad_rows(self) -> int:
        return len({p.row for p in self.problems})

    def counts(self) -> dict:
        c = Counter(p.kind for p in self.problems)
        return {k: c[k] for k in KINDS if c[k]}

    def to_dict(self) -> dict:
        return {"data": self.data, "image_folder": self.image_folder, "rows": self.rows, "bad_rows": self.bad_rows,
                "images": self.images, "max_length": self.max_length, "counts": self.counts(), "lengths": self.lengths,
                "problems": [asdict(p) for p in self.problems]}

    def summary(self, limit: int = 10) -> str:
        lines = [f"{self.data}: {self.rows} rows, {self.images} distinct images checked; "
                 + (f"{self.bad_rows} rows with problems" if self.problems else "no problems found")]
        if self.max_length is None:
            lines.append("  lengths not checked (give --recipe to render samples through its chat template)")
        elif self.lengths:
            s = self.lengths
            lines.append(f"  tokens per sample (image tokens included): median {s['median']}, p99 {s['p99']}, max {s['max']} "
                         f"(limit {self.max_length})")
        for kind, n in self.counts().items():
            lines.append(f"  {n:>7}  {kind:<17} {KINDS[kind]}")
        for p in self.problems[:limit]:
            lines.append(f"  row {p.row} ({p.id}): {p.message}")
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (all in the JSON report)")
        return "\n".join(lines)


def _image_kind(message: str) -> str:
    """The kind of a load_image error, from its wording (llava_gm/images.py)."""
    if "not found" in message:
        return "missing_image"
    if "megapixel" in message or "too large" in message:
        return "oversized_image"
    if "truncated" in message or "corrupt" in message:
        return "truncated_image"
    return "unreadable_image"


def check_image(path: str) -> Optional[str]:
    """None if the image decodes, else load_image's message. Runs in a worker process."""
    from ..images import load_image

    try:
        load_image(path)
    except LlavaGMError as e:
        return str(e)
    return None


def check_images(paths: list[str], workers: int, progress: bool = True) -> dict[str, Optional[str]]:
    """{path: None or error message}; decoded in `workers` processes (1: in this process)."""
    bar = tqdm(total=len(paths), desc="images", unit="img", disable=not progress)
    results = {}
    try:
        if workers <= 1 or len(paths) < 2:
            for p in paths:
                results[p] = check_image(p)
                bar.update(1)
        else:
            chunk = max(1, min(64, len(paths) // (workers * 8)))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for p, r in zip(paths, pool.map(check_image, paths, chunksize=chunk)):
                    results[p] = r
                    bar.update(1)
    finally:
        bar.close()
    return results


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def check_dataset(data: str | Path, image_folder: str | Path = "", encoder=None, workers: Optional[int] = None,
                  progress: bool = True) -> CheckReport:
    """Check every row of `data`; `encoder` (a ConversationEncoder) adds the template and length checks."""
    from .llava_json import check_row, read_rows

    rows = read_rows(data)
    folder = Path(image_folder) if image_folder else Path(data).parent
    report = CheckReport(str(data), str(folder), rows=len(rows), max_length=encoder.max_length if encoder else None)
    if encoder is not None:  # lengths are measured here, against the limit, so the report can give them
        from .conversation import ConversationEncoder

        encoder = ConversationEncoder(encoder.tokenizer, encoder.num_image_tokens, max_length=1 << 62)
    images: dict[str, list[tuple[int, str]]] = {}  # image path -> rows using it
    lengths = []
    for i, row in enumerate(tqdm(rows, desc="rows", unit="row", disable=not progress)):
        sid = str(row.get("id", f"#{i}")) if isinstance(row, dict) else f"#{i}"
        image = row.get("image") if isinstance(row, dict) else None
        if isinstance(image, str) and image:
            # the image is checked by decoding it below, whatever check_row says of its existence
            images.setdefault(str(folder / image), []).append((i, sid))
        try:
            _, _, messages = check_row(row, i, folder)
        except SampleError as e:
            if not (isinstance(image, str) and image and not (folder / image).is_file() and str(folder / image) in str(e)):
                report.problems.append(Problem(i, sid, "structure", str(e)))
                continue
            messages = to_messages(row["conversations"], sid)  # its only fault is the file: the image pass reports it
        if encoder is None:
            continue
        try:
            n = len(encoder.encode(messages, sid).input_ids)
        except SampleError as e:
            report.problems.append(Problem(i, sid, "template", str(e)))
            continue
        lengths.append(n)
        if n > report.max_length:
            report.problems.append(Problem(i, sid, "too_long", f"sample {sid}: is {n} tokens long, over the limit of "
                                                                f"{report.max_length} (language.max_length)"))
    if lengths:
        s = sorted(lengths)
        report.lengths = {"min": s[0], "median": _percentile(s, 0.5), "p99": _percentile(s, 0.99), "max": s[-1],
                          "over_limit": sum(n > report.max_length for n in s)}
    results = check_images(sorted(images), workers or min(8, os.cpu_count() or 1), progress)
    report.images = len(images)
    for path, message in results.items():
        if message is not None:
            for i, sid in images[path]:
                report.problems.append(Problem(i, sid, _image_kind(message), f"sample {sid}: {message}"))
    report.problems.sort(key=lambda p: (p.row, list(KINDS).index(p.kind)))
    return report


# ---- the command ------------------------------------------------------------------------------------
def recipe_encoder(recipe_path: str):
    """The recipe's chat template, tokenizer, image-token count and max_length, as training renders samples."""
    import torch

    from ..analysis.plan import load_config, vision_shape
    from ..backbones.language import load_tokenizer, resolve_language_path
    from ..config import RecipeConfig, load_yaml
    from ..model.projector import Projector
    from .conversation import ConversationEncoder

    recipe = load_yaml(RecipeConfig, recipe_path)
    cfg = recipe.model
    _, tokens, width, _ = vision_shape(load_config(cfg.vision.name), cfg.vision)
    with torch.device("meta"):
        n_image = Projector(cfg.projector, width, 8).num_tokens(tokens)
    tokenizer = load_tokenizer(resolve_language_path(cfg.language.name))
    return ConversationEncoder(tokenizer, n_image, cfg.language.max_length)


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="dataset tools: `llava-gm data check`")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("check", help="check a LLaVA-format dataset (rows, chat template lengths, images) before training")
    p.add_argument("data", help="LLaVA JSON / JSONL file")
    p.add_argument("--image-folder", default="", help="folder the rows' image paths are relative to (default: the file's folder)")
    p.add_argument("--recipe", help="recipe YAML: also render every sample through its chat template and check max_length")
    p.add_argument("--report", help="write the full report (every problem) to this JSON file")
    p.add_argument("--workers", type=int, help="processes decoding images (default: CPU count, at most 8)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_check)


def cmd_check(a) -> None:
    if a.workers is not None and a.workers < 1:
        raise LlavaGMError("--workers must be at least 1")
    encoder = recipe_encoder(a.recipe) if a.recipe else None
    report = check_dataset(a.data, a.image_folder, encoder, a.workers, progress=not a.no_progress)
    print(report.summary())
    if a.report:
        Path(a.report).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"report: {a.report}")
    if report.problems:
        raise LlavaGMError(f"{a.data}: {len(report.problems)} problem(s) in {report.bad_rows} of {report.rows} rows")
