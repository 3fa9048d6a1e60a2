"""What every benchmark module shares: the question record, the task interface, data-problem bookkeeping, readers.

A task reads its benchmark in the layout of the official release, turns each question into a `Question`
(the LLaVA-1.5 prompt, the image, the ground truth), and scores a `{key: answer text}` map the way the
official script does. Data problems are collected with the row they come from (file:line) and either stop
the run (on_error="fail", the default) or drop the row and get counted in the results (on_error="skip").
"""

from __future__ import annotations

import json
from collections import Counter
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
    """A JSON file; a key that repeats inside one object is an error (json.load would keep the last one silently)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=lambda pairs: _unique_pairs(pairs, path))
    except json.JSONDecodeError as e:
        raise LlavaGMError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise LlavaGMError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _unique_pairs(pairs: list, path: Path) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        counts = Counter(k for k, _ in pairs)
        repeated = sorted(k for k, c in counts.items() if c > 1)
        raise LlavaGMError(f"{path}: key(s) {repeated[:5]} repeat inside one JSON object; each id must be unique")
    return out


def json_part(obj: Any, key: Optional[str], path: Path, kind: type = list) -> Any:
    """obj[key] (or obj itself) checked to be a `kind`: a wrong file gives a clear message, not a traceback."""
    value = obj.get(key) if key is not None and isinstance(obj, dict) else (obj if key is None else None)
    if not isinstance(value, kind):
        what = f"a '{key}' {kind.__name__}" if key else f"a JSON {kind.__name__}"
        raise LlavaGMError(f"{path}: expected {what}; is this the benchmark's official file?")
    return value


def index_by(rows: list, key: str, path: Path) -> dict:
    """{row[key]: row} for a list of JSON objects (annotations, OCR tokens). A key that repeats is an error: a plain
    dict would keep the last row silently and score questions against it."""
    out, first = {}, {}
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LlavaGMError(f"{path}: entry {n} is not a JSON object; is this the benchmark's official file?")
        k = row.get(key)
        if isinstance(k, (list, dict)):
            raise LlavaGMError(f"{path}: entry {n}: {key} must be a number or a string, not {k!r}")
        if k in out:
            raise LlavaGMError(f"{path}: {key} {k!r} appears twice (entries {first[k]} and {n}); each must be unique")
        out[k], first[k] = row, n
    return out


def read_jsonl(path: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """(where, row) for each non-empty line; malformed lines become problems."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.add(where, f"not UTF-8 text (byte {e.start} of the line); save the file as UTF-8")
                continue
            if not line.strip():
                continue
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
    if not isinstance(name, str) or not name.strip():
        problems.add(where, f"image must be a file name, not {name!r}", key)
        return None
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


def valid_key(key: Any) -> bool:
    """Question ids are numbers or strings (JSON true/false, lists and objects are not ids)."""
    return isinstance(key, (int, str)) and not isinstance(key, bool)


def unique_questions(questions: list[Question], problems: Problems) -> list[Question]:
    """Every question id must name one question: an id that repeats makes its answer and ground truth ambiguous
    (a wrong score either way), so each repeat is a problem, and with on_error=skip all its rows (and their
    groups) are left out."""
    rows: dict = {}
    bad_groups = set()
    for q in questions:
        if not valid_key(q.key):
            problems.add(q.where, f"question id must be a number or a string, not {q.key!r}")
            bad_groups.add(("q", id(q)) if q.group is None else ("g", q.group))
            continue
        rows.setdefault(q.key, []).append(q)
    for key, qs in rows.items():
        if len(qs) > 1:
            problems.add(qs[0].where, f"question id {key!r} repeats: {len(qs)} rows ({', '.join(q.where for q in qs[:4])})", key)
            bad_groups.update(("q", key) if q.group is None else ("g", q.group) for q in qs)
    if not bad_groups:
        return questions
    gid = lambda q: ("g", q.group) if q.group is not None else ("q", q.key if valid_key(q.key) else id(q))
    return [q for q in questions if gid(q) not in bad_groups]
