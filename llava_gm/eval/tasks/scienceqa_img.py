"""ScienceQA-IMG (Lu et al. 2022): the test questions that come with an image.

Prompt as LLaVA-1.5's llava_test_CQM-A.json with --single-pred-prompt (also lmms-eval's scienceqa_img):
"Context: {hint}\n" when there is a hint, the question, "A. choice" lines, then the letter instruction.
Scoring follows LLaVA's llava/eval/eval_science_qa.py: the answer is the bare letter, or "X. ..." at the start,
or the single "The answer is X." in the text; anything else (or a letter beyond the choices) is a failure and
counts as wrong. Accuracy is over questions with images ("IMG-Accuracy").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ...errors import LlavaGMError
from ..base import LETTER_ANSWER, Loaded, Problems, Question, Task, image_file, json_part, need_file, pct, read_json

OPTIONS = ["A", "B", "C", "D", "E"]
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # sic: the "." matches any character, as in the script


def sqa_letter(text: str) -> str:
    """The parsed letter, or "FAILED" (eval_science_qa.py's rules, in its order)."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def sqa_choice_index(text: str, n_choices: int) -> int:
    letter = sqa_letter(text)
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def sqa_prompt(p: dict) -> str:
    context = f"Context: {p['hint']}\n" if p.get("hint") else ""
    choices = "\n".join(f"{OPTIONS[i]}. {c}" for i, c in enumerate(p["choices"]))
    return f"<image>\n{context}{p['question']}\n{choices}\n{LETTER_ANSWER}"


class ScienceQAImg(Task):
    name = "scienceqa_img"
    version = "1"
    default_split = "test"
    official = "LLaVA llava/eval/eval_science_qa.py (IMG-Accuracy)"
    metric_variant = "letter extraction (bare letter / 'X. ' / 'The answer is X.'), failures wrong; image questions only"
    prompt_template = "<image>\n[Context: {hint}\\n]{question}\n{A. choice ...}\n" + LETTER_ANSWER
    max_new_tokens = 1024  # LLaVA's model_vqa_science.py
    downloads = "https://github.com/lupantech/ScienceQA (data/scienceqa/problems.json, pid_splits.json, images/test)"

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        split = split or self.default_split
        p = Path(data).expanduser()
        root = p if p.is_dir() else p.parent
        pfile = need_file(root / "problems.json", "ScienceQA problems.json", self.downloads)
        sfile = need_file(root / "pid_splits.json", "ScienceQA pid_splits.json", self.downloads)
        allp, splits = json_part(read_json(pfile), None, pfile, dict), json_part(read_json(sfile), None, sfile, dict)
        if split not in splits:
            raise LlavaGMError(f"split {split!r} not in {sfile} ({', '.join(splits)})")
        if image_folder:
            images = Path(image_folder).expanduser()
        else:  # LLaVA's layout images/test/<pid>/image.png; the release's zip unpacks to test/<pid>/image.png
            images = next((d for d in (root / "images" / split, root / split) if d.is_dir()), root / "images" / split)
        questions, text_only = [], set()
        for pid in splits[split]:
            where = f"{pfile}:{pid}"
            prob = allp.get(pid)
            if not isinstance(prob, dict):
                problems.add(where, f"listed in {sfile.name} but missing from problems.json", pid)
                continue
            if not prob.get("image"):
                text_only.add(pid)  # not part of ScienceQA-IMG; answers for it are ignored, not errors
                continue
            if not isinstance(prob.get("answer"), int) or not prob.get("choices"):
                problems.add(where, "problem lacks choices or an integer answer", pid)
                continue
            path = image_file(images / pid, prob["image"], where, problems, pid)
            if path is None:
                continue
            meta = {"subject": prob.get("subject"), "grade": prob.get("grade"), "n_choices": len(prob["choices"])}
            questions.append(Question(pid, sqa_prompt(prob), path, prob["answer"], meta, where))
        return Loaded(questions, split, [str(pfile), str(sfile)], ignored_keys=text_only)

    def score(self, questions, predictions):
        per, by_subject = {}, {}
        for q in questions:
            text = predictions[q.key]
            idx = sqa_choice_index(text, q.meta["n_choices"])
            ok = idx == q.target
            per[q.key] = {"parsed": sqa_letter(text), "answer": OPTIONS[q.target], "correct": ok}
            by_subject.setdefault(q.meta["subject"], []).append(ok)
        n_ok = sum(r["correct"] for r in per.values())
        metrics = {"img_accuracy": pct(n_ok, len(per)),
                   "failed_extractions": sum(r["parsed"] == "FAILED" for r in per.values()),
                   "per_subject": {s: pct(sum(v), len(v)) for s, v in sorted(by_subject.items(), key=str)}}
        return metrics, per

    def headline(self, metrics):
        return {"SQA-IMG": metrics.get("img_accuracy")}
