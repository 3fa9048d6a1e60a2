"""VQAv2 (Goyal et al. 2017), as in the papers' tables: test-dev answers scored by the EvalAI server.

Scoring follows the VQA API's vqaEval.py (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py)
as it is since commit a013f00 (2021; option scorer=vqaEval-2016 for the file before it, see normalize.py):
soft accuracy min(1, matching humans among the other nine / 3) averaged over the ten leave-one-out subsets,
overall, per answer type and per question type, for splits with annotations (val2014). The scorer's name is
in the results (metrics.scorer). For test-dev the submission file is written like LLaVA's
scripts/convert_vqav2_for_submission.py: every test2015 question (when that question file is present),
answers through the EvalAI processor, "" for questions not asked; that post-processing belongs to the
submission file only, never to the local score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..base import SHORT_ANSWER, Loaded, Problems, Question, Task, image_file, index_by, json_part, need_file, pct, read_json
from ..normalize import DEFAULT_VQA_SCORER, evalai_answer, vqa_scorer
from ...errors import LlavaGMError

QUESTIONS = "v2_OpenEnded_mscoco_{split}_questions.json"
ANNOTATIONS = "v2_mscoco_{split}_annotations.json"
IMAGE_DIR = {"val2014": "val2014", "train2014": "train2014", "test-dev2015": "test2015", "test2015": "test2015"}


class VQAv2(Task):
    name = "vqav2"
    version = "1"
    default_split = "test-dev2015"
    official = ("GT-Vision-Lab/VQA vqaEval.py at a013f00 (2021) or later (val); EvalAI server (test-dev) via LLaVA "
                "convert_vqav2_for_submission.py")
    metric_variant = "soft accuracy, 10 leave-one-out subsets, vqaEval answer normalisation (version: metrics.scorer)"
    prompt_template = "<image>\n{question}\n" + SHORT_ANSWER
    max_new_tokens = 128  # LLaVA's model_vqa_loader.py default
    downloads = "https://visualqa.org/download.html (questions, annotations) and COCO images (val2014 / test2015)"

    def option_defaults(self):
        return {"scorer": DEFAULT_VQA_SCORER}  # vqaEval-2016: the vqaEval.py before a013f00, for old numbers

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        vqa_scorer(self.options["scorer"])  # an unknown name fails before anything is read
        p = Path(data).expanduser()
        root = p if p.is_dir() else p.parent
        if split is None:
            if p.is_file():
                split = p.name.removeprefix("v2_OpenEnded_mscoco_").removesuffix("_questions.json")
            else:
                found = sorted(f.name for f in root.glob(QUESTIONS.format(split="*")))
                if len(found) != 1:
                    raise LlavaGMError(f"{root}: found question files {found or 'none'}; choose one with --split "
                                       f"({', '.join(IMAGE_DIR)}). Download: {self.downloads}")
                split = found[0].removeprefix("v2_OpenEnded_mscoco_").removesuffix("_questions.json")
        if split not in IMAGE_DIR:
            raise LlavaGMError(f"unknown VQAv2 split {split!r}; one of {', '.join(IMAGE_DIR)}")
        qfile = need_file(root / QUESTIONS.format(split=split), f"VQAv2 {split} questions", self.downloads)
        afile = root / ANNOTATIONS.format(split=split)
        annotations = {}
        if afile.is_file():
            annotations = index_by(json_part(read_json(afile), "annotations", afile), "question_id", afile)
        images = Path(image_folder).expanduser() if image_folder else root / IMAGE_DIR[split]
        questions = []
        for n, q in enumerate(json_part(read_json(qfile), "questions", qfile)):
            where, qid = f"{qfile}:question[{n}]", q.get("question_id") if isinstance(q, dict) else None
            if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= q.keys():
                problems.add(where, "row lacks question_id, image_id or question", qid)
                continue
            target = None
            if afile.is_file():
                ann = annotations.get(qid)
                if ann is None or len(ann.get("answers", [])) == 0:
                    problems.add(where, f"question has no answers in {afile.name}", qid)
                    continue
                target = [a["answer"] for a in ann["answers"]]
            name = f"COCO_{IMAGE_DIR[split]}_{q['image_id']:012d}.jpg"
            path = image_file(images, name, where, problems, qid)
            if path is None:
                continue
            meta = {"image_id": q["image_id"]}
            if target is not None:
                meta.update(answer_type=ann.get("answer_type"), question_type=ann.get("question_type"))
            questions.append(Question(qid, f"<image>\n{q['question']}\n{SHORT_ANSWER}", path, target, meta, where))
        files = [str(qfile)] + ([str(afile)] if afile.is_file() else [])
        return Loaded(questions, split, files, {"annotations": afile.is_file(), "root": str(root)})

    def score(self, questions, predictions):
        accuracy = vqa_scorer(self.options["scorer"])
        per, by_ans, by_q = {}, {}, {}
        scored = [q for q in questions if q.target is not None]
        for q in scored:
            acc = accuracy(predictions[q.key], q.target)
            per[q.key] = {"accuracy": acc}
            by_ans.setdefault(q.meta["answer_type"], []).append(acc)
            by_q.setdefault(q.meta["question_type"], []).append(acc)
        if not scored:  # test-dev / test: the server holds the answers
            return {"scored_on_server": True}, {q.key: {} for q in questions}
        mean = lambda xs: pct(sum(xs), len(xs))
        metrics = {"scorer": self.options["scorer"], "accuracy": mean([r["accuracy"] for r in per.values()]),
                   "per_answer_type": {k: mean(v) for k, v in sorted(by_ans.items())},
                   "per_question_type": {k: mean(v) for k, v in sorted(by_q.items())}}
        return metrics, per

    def submission(self, loaded, questions, predictions, stem):
        if loaded.info["annotations"]:
            return []
        root = Path(loaded.info["root"])
        full = root / QUESTIONS.format(split="test2015")
        # the server wants every test2015 question: LLaVA fills the ones not asked with ""
        if full.is_file():
            ids = [q["question_id"] for q in json_part(read_json(full), "questions", full)]
            loaded.info["submission_covers"] = f"all of {full.name}; questions not asked answered with \"\""
        else:
            ids = [q.key for q in questions]
            loaded.info["submission_covers"] = (f"only the asked questions: put {full.name} next to the test-dev file "
                                                "if the server asks for every test2015 question")
        rows = [{"question_id": i, "answer": evalai_answer(predictions[i]) if i in predictions else ""} for i in ids]
        out = Path(f"{stem}.vqav2_{loaded.split}_submission.json")
        out.write_text(json.dumps(rows))
        return [str(out)]

    def headline(self, metrics):
        return {"VQAv2": metrics.get("accuracy")}
