"""POPE (Li et al. 2023): object hallucination on COCO val2014, splits random / popular / adversarial.

Scoring follows LLaVA's llava/eval/eval_pope.py: keep the first sentence (text before the first "."), drop
commas, split on spaces; "No", "no" or "not" among the words means no, anything else means yes. Per split:
accuracy, precision, recall, F1 of "yes" and the yes-ratio of the predictions. (The script divides by zero
when nothing is predicted "yes"; here precision/F1 are 0 then, and the confusion counts are recorded.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...errors import LlavaGMError
from ..base import SHORT_ANSWER, Loaded, Problems, Question, Task, image_file, read_jsonl

SPLITS = ("random", "popular", "adversarial")


def pope_yes_no(text: str) -> str:
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds: list[str], labels: list[str]) -> dict:
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(preds)
    return {"accuracy": 100 * (tp + tn) / n if n else 0.0, "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * preds.count("yes") / n if n else 0.0,
            "TP": tp, "FP": fp, "TN": tn, "FN": fn, "n": n}


class POPE(Task):
    name = "pope"
    version = "1"
    default_split = "random,popular,adversarial"
    official = "LLaVA llava/eval/eval_pope.py"
    metric_variant = "first-sentence yes/no parse; acc / precision / recall / F1 / yes-ratio per split"
    prompt_template = "<image>\n{text}\n" + SHORT_ANSWER
    max_new_tokens = 128  # LLaVA's model_vqa_loader.py default
    downloads = "https://github.com/AoiDragon/POPE (output/coco/coco_pope_*.json) and COCO val2014 images"

    def option_defaults(self):
        return {"dataset": "coco"}  # the POPE release also has aokvqa_pope_* and gqa_pope_* files

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        p = Path(data).expanduser()
        root = p if p.is_dir() else p.parent
        wanted = (split or self.default_split).split(",")
        if unknown := set(wanted) - set(SPLITS):
            raise LlavaGMError(f"unknown POPE split(s) {sorted(unknown)}; choose from {', '.join(SPLITS)}")
        files = [root / f"{self.options['dataset']}_pope_{s}.json" for s in wanted]
        if p.is_file():  # one split file given directly
            files, wanted = [p], [p.stem.rsplit("_", 1)[-1]]
        if not all(f.is_file() for f in files):
            missing = [str(f) for f in files if not f.is_file()]
            raise LlavaGMError(f"POPE files not found: {', '.join(missing)}. Download: {self.downloads}")
        images = Path(image_folder).expanduser() if image_folder else root / "val2014"
        questions = []
        for s, f in zip(wanted, files):
            for where, row in read_jsonl(f, problems):
                qid = row.get("question_id")
                key = f"{s}/{qid}"  # ids restart at 1 in every split file
                if not {"question_id", "image", "text", "label"} <= row.keys():
                    problems.add(where, "row lacks question_id, image, text or label", key)
                    continue
                if row["label"] not in ("yes", "no"):
                    problems.add(where, f"label must be yes or no, not {row['label']!r}", key)
                    continue
                path = image_file(images, row["image"], where, problems, key)
                if path:
                    questions.append(Question(key, f"<image>\n{row['text']}\n{SHORT_ANSWER}", path, row["label"], {"split": s}, where))
        return Loaded(questions, ",".join(wanted), [str(f) for f in files])

    def match_answer(self, row, by_key):
        key = row.get("question_id")
        if key not in by_key and (row.get("split") or row.get("category")):  # per-file id plus its split
            key = f"{row.get('split') or row.get('category')}/{key}"
        return key if key in by_key else None

    def score(self, questions, predictions):
        per, by_split = {}, {}
        for q in questions:
            pred = pope_yes_no(predictions[q.key])
            per[q.key] = {"parsed": pred, "label": q.target, "correct": pred == q.target}
            by_split.setdefault(q.meta["split"], ([], []))
            by_split[q.meta["split"]][0].append(pred)
            by_split[q.meta["split"]][1].append(q.target)
        splits = {s: pope_metrics(*by_split[s]) for s in SPLITS if s in by_split}
        avg = lambda k: sum(m[k] for m in splits.values()) / len(splits) if splits else 0.0
        metrics = {"per_split": splits, "mean_f1": avg("f1"), "mean_accuracy": avg("accuracy")}
        return metrics, per

    def headline(self, metrics):
        return {"POPE-Acc": metrics.get("mean_accuracy"), "POPE-F1": metrics.get("mean_f1")}
