"""easy-VQA (PyPI `easy-vqa`): the foundation's offline benchmark, one coloured shape per image.

Data: a JSONL of `{"question_id", "image", "text", "answer", "type"}` (type: yes_no / shape / color), images
relative to the file's folder: what `llava_gm.data.easy_vqa.build_easy_vqa` writes as test_questions.jsonl,
or what `write_easy_vqa_jsonl` writes. `--data easy_vqa:test` reads the installed package directly.
Score: exact match after lowercasing and stripping punctuation and spaces; overall and per type, and on the
balanced yes/no part (per question form as many "yes" as "no" answers: the wording alone scores 50% there).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Optional

from ...data.easy_vqa import balanced_yes_no, question_type
from ...errors import LlavaGMError
from ..base import SHORT_ANSWER, Loaded, Problems, Question, Task, image_file, pct, read_jsonl

TYPES = ("yes_no", "shape", "color")
_PUNCT = str.maketrans("", "", string.punctuation)


def easy_vqa_normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def package_rows(split: str = "test") -> list[dict]:
    """The installed easy-vqa package's questions as rows with absolute image paths."""
    try:
        import easy_vqa
    except ImportError:
        raise LlavaGMError("easy-VQA needs the PyPI package easy-vqa: pip install easy-vqa") from None
    if split not in ("train", "test"):
        raise LlavaGMError(f"easy-VQA splits are train and test, not {split!r}")
    texts, answers, image_ids = easy_vqa.get_test_questions() if split == "test" else easy_vqa.get_train_questions()
    paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
    return [{"question_id": k, "image": paths[int(i)], "text": t, "answer": a, "type": question_type(a)}
            for k, (t, a, i) in enumerate(zip(texts, answers, image_ids))]


def write_easy_vqa_jsonl(out_dir: str | Path, split: str = "test") -> Path:
    """Write <out_dir>/questions.jsonl with images copied to <out_dir>/images/ (relative paths)."""
    import shutil

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = package_rows(split)
    for r in rows:
        name = f"images/{Path(r['image']).name}"
        if not (out_dir / name).is_file():
            shutil.copyfile(r["image"], out_dir / name)
        r["image"] = name
    path = out_dir / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class EasyVQA(Task):
    name = "easy_vqa"
    version = "2"  # 2: the bare question as prompt (answers are single words, learned from the training data)
    default_split = "test"
    official = "none (foundation benchmark): exact match after normalisation"
    metric_variant = "exact match after lowercase, punctuation and whitespace stripped; overall and per type"
    prompt_template = "<image>\n{text}"
    downloads = "pip install easy-vqa (then --data easy_vqa:test), or the folder `llava-gm` data prep writes"

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        if data.startswith("easy_vqa:"):
            split = data.split(":", 1)[1] or split or "test"
            rows = [(f"easy_vqa:{split}:{r['question_id']}", r) for r in package_rows(split)]
            root, files = Path("/"), [f"easy-vqa package ({split})"]
        else:
            p = Path(data).expanduser()
            if p.is_dir():
                p = next((p / n for n in ("questions.jsonl", "test_questions.jsonl") if (p / n).is_file()), p / "questions.jsonl")
            if not p.is_file():
                raise LlavaGMError(f"easy-VQA questions not found at {p}. Download: {self.downloads}")
            rows, root, files = list(read_jsonl(p, problems)), p.parent, [str(p)]
            split = split or self.default_split
        root = Path(image_folder).expanduser() if image_folder else root
        questions = []
        for where, r in rows:
            key = r.get("question_id")
            if not {"question_id", "image", "text"} <= r.keys():
                problems.add(where, "row lacks question_id, image or text", key)
                continue
            if not isinstance(r["text"], str):
                problems.add(where, f"text must be a string, not {r['text']!r}", key)
                continue
            if not isinstance(r.get("answer"), str) or not r["answer"].strip():
                problems.add(where, "question has no answer", key)
                continue
            kind = r.get("type") or question_type(r["answer"])
            if kind not in TYPES:
                problems.add(where, f"type must be one of {TYPES}, not {kind!r}", key)
                continue
            path = image_file(root, r["image"], where, problems, key)
            if path:
                text = r["text"].replace("<image>", "").replace(SHORT_ANSWER, "").strip()
                questions.append(Question(key, f"<image>\n{text}", path, r["answer"], {"type": kind}, where))
        return Loaded(questions, split, files)

    def score(self, questions, predictions):
        per, by_type = {}, {}
        for q in questions:
            ok = easy_vqa_normalize(predictions[q.key]) == easy_vqa_normalize(q.target)
            per[q.key] = {"answer": q.target, "correct": ok}
            by_type.setdefault(q.meta["type"], []).append(ok)
        metrics = {"accuracy": pct(sum(r["correct"] for r in per.values()), len(per)),
                   "per_type": {t: pct(sum(by_type[t]), len(by_type[t])) for t in TYPES if t in by_type}}
        # the yes/no questions that the wording alone answers at exactly 50%: does the model look at the image?
        balanced = balanced_yes_no([{"text": q.prompt, "answer": easy_vqa_normalize(q.target), "key": q.key} for q in questions])
        if balanced:
            metrics["yes_no_balanced"] = pct(sum(per[r["key"]]["correct"] for r in balanced), len(balanced))
            metrics["yes_no_balanced_questions"] = len(balanced)
        return metrics, per

    def headline(self, metrics):
        return {"easy-VQA": metrics.get("accuracy")}
