"""TextVQA (Singh et al. 2019), val split v0.5.1, as LLaVA-1.5 runs it.

Prompt: the question, then (option `ocr`, on by default as in LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl)
"Reference OCR token: t1, t2, ..." from the Rosetta OCR file, then the short-answer line.
Scoring follows LLaVA's llava/eval/eval_textvqa.py with m4c_evaluator.TextVQAAccuracyEvaluator: every answer
through the EvalAI processor, VQA soft accuracy over the ten human answers (metrics.scorer names it; this is
not vqaEval.py, whose 2021 change does not apply here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ...errors import LlavaGMError
from ..base import SHORT_ANSWER, Loaded, Problems, Question, Task, image_file, index_by, json_part, need_file, pct, pick_root, read_json
from ..normalize import TEXTVQA_SCORER, textvqa_accuracy


def llava_question(prompt: str) -> str:
    """eval_textvqa.py's prompt_processor: the question inside a LLaVA TextVQA prompt, lowercased."""
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return (m.group(1) if m else prompt).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return (lines[0] if len(lines) == 2 else prompt).lower()


class TextVQA(Task):
    name = "textvqa"
    version = "1"
    default_split = "val"
    official = "LLaVA llava/eval/eval_textvqa.py + m4c_evaluator.py (EvalAI answer processor)"
    metric_variant = "VQA soft accuracy (10 leave-one-out subsets), EvalAI normalisation"
    prompt_template = "<image>\n{question}\n[Reference OCR token: {tokens}\\n]" + SHORT_ANSWER
    max_new_tokens = 128  # LLaVA's model_vqa_loader.py default
    downloads = ("https://textvqa.org/dataset (TextVQA_0.5.1_val.json, train_val_images.zip, "
                 "TextVQA_Rosetta_OCR_v0.2_val.json)")

    def option_defaults(self):
        return {"ocr": True}

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        split = split or self.default_split
        root, qfile = pick_root(data, f"TextVQA_0.5.1_{split}.json")
        need_file(qfile, f"TextVQA {split} annotations", self.downloads)
        files = [str(qfile)]
        ocr = {}
        if self.options["ocr"]:
            ofile = root / f"TextVQA_Rosetta_OCR_v0.2_{split}.json"
            if not ofile.is_file():
                raise LlavaGMError(f"OCR tokens file {ofile} not found (download it, or run with --option ocr=false "
                                   "for the prompt without OCR tokens)")
            ocr = {k: d.get("ocr_tokens", []) for k, d in index_by(json_part(read_json(ofile), "data", ofile), "image_id", ofile).items()}
            files.append(str(ofile))
        use_ocr = bool(files[1:])
        images = Path(image_folder).expanduser() if image_folder else root / "train_images"  # val images ship there
        questions = []
        for n, d in enumerate(json_part(read_json(qfile), "data", qfile)):
            where, qid = f"{qfile}:data[{n}]", d.get("question_id") if isinstance(d, dict) else None
            if not isinstance(d, dict) or not {"question_id", "question", "image_id"} <= d.keys():
                problems.add(where, "row lacks question_id, question or image_id", qid)
                continue
            answers = d.get("answers")
            if not answers or len(answers) != 10:  # m4c_evaluator asserts ten human answers
                problems.add(where, f"expected 10 human answers, found {len(answers or [])}", qid)
                continue
            path = image_file(images, f"{d['image_id']}.jpg", where, problems, qid)
            if path is None:
                continue
            text = d["question"]
            tokens = ocr.get(d["image_id"], [])
            if use_ocr and tokens:
                text += "\nReference OCR token: " + ", ".join(tokens)
            meta = {"image_id": d["image_id"], "question": d["question"]}
            questions.append(Question(qid, f"<image>\n{text}\n{SHORT_ANSWER}", path, answers, meta, where))
        return Loaded(questions, split, files, {"ocr_tokens_in_prompt": use_ocr})

    def match_answer(self, row, by_key):
        qid = row.get("question_id")
        if qid in by_key:
            return qid
        # LLaVA's answer files carry the image id as question_id; eval_textvqa.py matches (image, question)
        if "prompt" not in row:
            return None
        if getattr(self, "_index_of", (None,))[0] is not by_key:
            self._index_of = (by_key, {(q.meta["image_id"], q.meta["question"].lower()): k for k, q in by_key.items()})
        return self._index_of[1].get((qid, llava_question(row["prompt"].replace("<image>\n", ""))))

    def score(self, questions, predictions):
        per = {q.key: {"accuracy": textvqa_accuracy(predictions[q.key], q.target)} for q in questions}
        return {"scorer": TEXTVQA_SCORER, "accuracy": pct(sum(r["accuracy"] for r in per.values()), len(per))}, per

    def headline(self, metrics):
        return {"TextVQA": metrics.get("accuracy")}
