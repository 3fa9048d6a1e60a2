"""MMVP (Tong et al. 2024, "Eyes Wide Shut"): 150 pairs of CLIP-blind images, one two-option question each.

The release (Questions.csv + "MMVP Images/<Index>.jpg") is graded by GPT-4 in its scripts/gpt_grader.py; here,
as lmms-eval's mmvp task does, the options are shown as "A. ... / B. ..." with the letter instruction and the
answer letter is extracted by rules (no judge): a leading letter ("A", "(a)", "B."), "answer is X", or the one
option whose text the answer contains. Anything else is wrong. Metrics: question accuracy and pair accuracy
(a pair, rows 2k-1 and 2k, counts when both are right), as the grader's "accuracy" is the pair one.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional

from ..base import LETTER_ANSWER, Loaded, Problems, Question, Task, image_file, need_file, pct, pick_root

_OPTION = re.compile(r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)", re.IGNORECASE | re.DOTALL)


def parse_options(text: str) -> list[str]:
    return [t for _, t in _OPTION.findall(text.strip())]


def mmvp_letter(answer: str, options: list[str]) -> str:
    """'A', 'B', ... or '' when no option can be read off the answer."""
    letters = [chr(65 + i) for i in range(len(options))]
    t = answer.strip()
    m = re.match(r"\(?([A-Z])\)?(?:[.):\s]|$)", t) or re.match(r"\(([a-z])\)", t)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = re.search(r"answer is:?\s*\(?([A-Za-z])\b", t)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    found = [letters[i] for i, o in enumerate(options) if o and o.lower() in t.lower()]
    return found[0] if len(found) == 1 else ""


class MMVP(Task):
    name = "mmvp"
    version = "1"
    default_split = "test"
    official = "MMVP release (Questions.csv, pairs) with lmms-eval's mmvp prompt; rule-based letters instead of gpt_grader.py"
    metric_variant = "rule-based letter extraction; question accuracy and pair accuracy"
    prompt_template = "<image>\n{Question}\nA. {option a}\nB. {option b}\n" + LETTER_ANSWER
    max_new_tokens = 128  # answers are letters; generation stops at the end of turn
    downloads = "https://huggingface.co/datasets/MMVP/MMVP (Questions.csv, MMVP Images/)"

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        root, qfile = pick_root(data, "Questions.csv")
        need_file(qfile, "MMVP Questions.csv", self.downloads)
        images = Path(image_folder).expanduser() if image_folder else root / "MMVP Images"
        questions = []
        with open(qfile, encoding="utf-8-sig", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                where = f"{qfile}:{n}"
                try:
                    index = int(row["Index"])
                    options = parse_options(row["Options"])
                    answer = row["Correct Answer"].strip().strip("()").upper()
                except (KeyError, ValueError, AttributeError):
                    problems.add(where, "row needs Index, Question, Options and Correct Answer")
                    continue
                letters = [chr(65 + i) for i in range(len(options))]
                if len(options) < 2 or answer not in letters:
                    problems.add(where, f"cannot read options {row['Options']!r} / answer {row['Correct Answer']!r}", index)
                    continue
                path = image_file(images, f"{index}.jpg", where, problems, index)
                if path is None:
                    continue
                lines = "\n".join(f"{l}. {o}" for l, o in zip(letters, options))
                prompt = f"<image>\n{row['Question'].strip()}\n{lines}\n{LETTER_ANSWER}"
                questions.append(Question(index, prompt, path, answer, {"options": options}, where, group=(index - 1) // 2))
        return Loaded(questions, "test", [str(qfile)])

    def score(self, questions, predictions):
        per, pairs = {}, {}
        for q in questions:
            letter = mmvp_letter(predictions[q.key], q.meta["options"])
            per[q.key] = {"parsed": letter, "answer": q.target, "correct": letter == q.target}
            pairs.setdefault(q.group, []).append(per[q.key]["correct"])
        complete = [oks for oks in pairs.values() if len(oks) == 2]
        metrics = {"question_accuracy": pct(sum(r["correct"] for r in per.values()), len(per)),
                   "pair_accuracy": pct(sum(all(oks) for oks in complete), len(complete)),
                   "pairs": len(complete), "incomplete_pairs": len(pairs) - len(complete)}
        return metrics, per

    def headline(self, metrics):
        return {"MMVP": metrics.get("pair_accuracy")}
