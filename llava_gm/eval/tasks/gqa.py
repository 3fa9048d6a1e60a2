"""GQA (Hudson & Manning 2019), testdev-balanced as in LLaVA-1.5.

Scoring: LLaVA's scripts/convert_gqa_for_eval.py turns an answer into `text.rstrip('.').lower()`, then GQA's
official eval.py counts exact matches (accuracy, per structural and semantic type, binary vs open) over the
balanced questions. The predictions file for eval.py (`[{"questionId", "prediction"}]`) is written too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..base import SHORT_ANSWER, Loaded, Problems, Question, Task, image_file, json_part, need_file, pct, pick_root, read_json


def gqa_prediction(text: str) -> str:
    """convert_gqa_for_eval.py: strip trailing periods, lowercase (nothing else)."""
    return text.rstrip(".").lower()


class GQA(Task):
    name = "gqa"
    version = "1"
    default_split = "testdev_balanced"
    official = "LLaVA scripts/convert_gqa_for_eval.py + GQA eval.py (gqadataset.org)"
    metric_variant = "exact match after rstrip('.') and lowercase; balanced questions"
    prompt_template = "<image>\n{question}\n" + SHORT_ANSWER
    max_new_tokens = 128  # LLaVA's model_vqa_loader.py default
    downloads = "https://cs.stanford.edu/people/dorarad/gqa/download.html (questions1.2.zip, images.zip)"

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        split = split or self.default_split
        root, qfile = pick_root(data, f"{split}_questions.json")
        need_file(qfile, f"GQA {split} questions", self.downloads)
        images = Path(image_folder).expanduser() if image_folder else root / "images"
        questions = []
        for qid, q in json_part(read_json(qfile), None, qfile, dict).items():
            where = f"{qfile}:{qid}"
            if not isinstance(q, dict):
                problems.add(where, "a question must be a JSON object", qid)
                continue
            if not q.get("isBalanced", True):  # eval.py scores the balanced questions only
                continue
            if "answer" not in q or "imageId" not in q or "question" not in q:
                problems.add(where, "row lacks question, imageId or answer", qid)
                continue
            path = image_file(images, f"{q['imageId']}.jpg", where, problems, qid)
            if path is None:
                continue
            types = q.get("types", {})
            meta = {"structural": types.get("structural"), "semantic": types.get("semantic")}
            questions.append(Question(qid, f"<image>\n{q['question']}\n{SHORT_ANSWER}", path, q["answer"], meta, where))
        return Loaded(questions, split, [str(qfile)])

    def score(self, questions, predictions):
        per, groups = {}, {}
        for q in questions:
            pred = gqa_prediction(predictions[q.key])
            ok = float(pred == q.target)
            per[q.key] = {"prediction": pred, "correct": bool(ok)}
            # eval.py: "open" questions are the structural type "query", the rest are binary
            kind = "open" if q.meta["structural"] == "query" else "binary"
            for g in (f"structural/{q.meta['structural']}", f"semantic/{q.meta['semantic']}", kind):
                groups.setdefault(g, []).append(ok)
        acc = lambda xs: pct(sum(xs), len(xs))
        metrics = {"accuracy": acc([float(r["correct"]) for r in per.values()]),
                   "binary": acc(groups.get("binary", [])), "open": acc(groups.get("open", [])),
                   "per_type": {g: acc(v) for g, v in sorted(groups.items()) if "/" in g}}
        return metrics, per

    def match_answer(self, row, by_key):
        key = str(row.get("question_id"))  # GQA ids are strings; some writers make them numbers
        return key if key in by_key else None

    def submission(self, loaded, questions, predictions, stem):
        # the input of GQA's eval.py, for anyone who wants its other metrics (consistency, validity, ...)
        out = Path(f"{stem}.{loaded.split}_predictions.json")
        out.write_text(json.dumps([{"questionId": q.key, "prediction": gqa_prediction(predictions[q.key])} for q in questions]))
        return [str(out)]

    def headline(self, metrics):
        return {"GQA": metrics.get("accuracy")}
