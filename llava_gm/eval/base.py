"""What every benchmark module shares: the question record, the task interface, data-problem bookkeeping, readers.

A task reads its benchmark in the layout of the official release, turns each question into a `Question`
(the LLaVA-1.5 prompt, the image, the ground truth), and scores a `{key: answer text}` map the way the
official script does. Data problems are collected with the row they come from (file:line) and either stop
the run (on_error="fail", the default) or drop the row and get counted in the results (on_error="skip").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Optional, Union

from ..errors import LlavaGMError

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5 short-answer prompt
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5 multiple choice

ImageRef = Union[str, Callable[[], Any], None]  # a file path, a loader returning a PIL image (MMBench's base64), or none


@dataclass
class Question:
    key: Hashable  # unique within a run; the question_id of answer files
    prompt: str  # user text, with "<image>\n" in front iff there is an image
    image: ImageRef = None
    target: Any = None  # ground truth in whatever form the scorer needs (None where a server holds it)
    meta: dict = field(default_factory=dict)  # category, type, pair/group ids ... (recorded per question)
    where: str = ""  # file:line of the row, for messages
    group: Optional[Hashable] = None  # questions that are scored together (MME image, MMBench rotations, MMVP pair)


@dataclass
class Loaded:
    questions: list[Question]
    split: str
    files: list[str]  # the official files that were read
    info: dict = field(default_factory=dict)  # task-specific facts worth recording (e.g. circular: file|generated)
    ignored_keys: set = field(default_factory=set)  # answer keys that belong to the release but not to this task


class Problems:
    """Data problems with their rows. `fail` stops after reading (showing them all); `skip` drops and counts them."""

    def __init__(self, on_error: str = "fail", check_images: bool = True):
        if on_error not in ("fail", "skip"):
            raise LlavaGMError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.on_error = on_error
        self.check_images = check_images  # scoring an answer file needs no images
        self.items: list[dict] = []

    def add(self, where: str, message: str, key: Hashable = None) -> None:
        self.items.append({"where": where, "problem": message, **({"question_id": key} if key is not None else {})})

    def check(self, what: str = "data") -> None:
        if self.on_error == "fail" and self.items:
            shown = "; ".join(f"{p['where']}: {p['problem']}" for p in self.items[:5])
            more = f" (and {len(self.items) - 5} more)" if len(self.items) > 5 else ""
            raise LlavaGMError(f"{len(self.items)} {what} problem(s): {shown}{more}. "
                               "Fix the rows, or pass --on-bad skip to leave them out (they are counted in the results).")


class Task:
    """One benchmark. Subclasses set the class attributes and implement `load` and `score`."""

    name = ""
    version = "1"
    default_split = ""
    official = ""  # the official script whose rules `score` follows
    metric_variant = ""
    prompt_template = ""
    kind = "generate"  # or "loglikelihood" / "perplexity" (text-only language tasks)
    max_new_tokens = 16  # generation cap; tasks set the official scripts' value; recorded in the results
    downloads = ""  # what to download from where (shown in errors; the docs say more)

    def __init__(self, options: Optional[dict] = None):
        self.options = dict(options or {})
        unknown = set(self.options) - set(self.option_defaults())
        if unknown:
            raise LlavaGMError(f"task {self.name} has no option(s) {sorted(unknown)}; it knows {sorted(self.option_defaults()) or 'none'}")
        self.options = {**self.option_defaults(), **{k: _coerce(v) for k, v in self.options.items()}}

    def option_defaults(self) -> dict:
        return {}

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        raise NotImplementedError

    def score(self, questions: list[Question], predictions: dict) -> tuple[dict, dict]:
        """Return (metrics, per-question records keyed like `predictions`)."""
        raise NotImplementedError

    def match_answer(self, row: dict, by_key: dict) -> Optional[Hashable]:
        """The question key an answer-file row belongs to (LLaVA answers carry `question_id`)."""
        qid = row.get("question_id")
        return qid if qid in by_key else None

    def submission(self, loaded: Loaded, questions: list[Question], predictions: dict, stem: Path) -> list[str]:
        """Write the server's submission file(s) next to `stem`; return their paths. Most tasks have none."""
        return []

    def headline(self, metrics: dict) -> dict:
        """The numbers the papers' tables show, by column name."""
        return {}


def _coerce(value):
    """Options from the command line arrive as text: read true/false and numbers."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "yes", "on"):
        return True
    if value.lower() in ("false", "no", "off"):
        return False
    try:
        return int(value)
    except ValueError:
        return value


# ---- readers that keep row numbers ----------------------------------------------------------------------


def need_file(path: Path, what: str, downloads: str = "") -> Path:
    if not path.is_file():
        hint = f" Download: {downloads}" if downloads else ""
        raise LlavaGMError(f"{what} not found at {path}.{hint}")
    return path


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LlavaGMError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def json_part(obj: Any, key: Optional[str], path: Path, kind: type = list) -> Any:
    """obj[key] (or obj itself) checked to be a `kind`: a wrong file gives a clear message, not a traceback."""
    value = obj.get(key) if key is not None and isinstance(obj, dict) else (obj if key is None else None)
    if not isinstance(value, kind):
        what = f"a '{key}' {kind.__name__}" if key else f"a JSON {kind.__name__}"
        raise LlavaGMError(f"{path}: expected {what}; is this the benchmark's official file?")
    return value


def read_jsonl(path: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """(where, row) for each non-empty line; malformed lines become problems."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(where, f"malformed JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.add(where, "a row must be a JSON object")
                continue
            yield where, row


def image_file(root: Path, name: str, where: str, problems: Problems, key: Hashable = None) -> Optional[str]:
    path = root / name
    if problems.check_images and not path.is_file():
        problems.add(where, f"image not found: {path}", key)
        return None
    return str(path)


def pick_root(data: str, main_file: str) -> tuple[Path, Path]:
    """`data` may be the release folder or its main file: return (folder, main file)."""
    p = Path(data).expanduser()
    if p.is_dir():
        return p, p / main_file
    return p.parent, p


def pct(num: float, den: int) -> float:
    return 100.0 * num / den if den else 0.0
