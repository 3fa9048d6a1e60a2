"""MMBench (Liu et al. 2023): multiple choice with circular evaluation, from the release TSV.

Reading follows LLaVA's llava/eval/model_vqa_mmbench.py (prompt: hint, question, "A. option" lines, the letter
instruction; options stop at the first empty one) with pandas' notion of an empty cell. Scoring follows
VLMEvalKit's exact-matching mode (vlmeval/dataset/utils/multiple_choice.py mcq_circular_eval / mcq_vanilla_eval,
with can_infer from vlmeval/utils/matching_util.py as it is since 2026, see `infer_option`): no external judge.
Rows whose index differ by multiples of 1e6 are rotations of one question (index % 1e6); the question counts
only if every rotation's extracted option is right. `vanilla_accuracy` is the single pass on the original rows:
a prediction counts when can_infer extracts the right option from it, whatever its length. A TSV without rotation rows (index < 1e6 only) gets them generated as LLaVA's --all-rounds does.
For the test split (no answers) the submission .xlsx is written like LLaVA's convert_mmbench_for_submission.py.
"""

from __future__ import annotations

import base64
import csv
import re
import sys
from pathlib import Path
from typing import Optional

from ...errors import LlavaGMError
from ..base import LETTER_ANSWER, Loaded, Problems, Question, Task, need_file, pct
from ..xlsx import write_xlsx

LETTERS = ["A", "B", "C", "D"]  # MMBench has at most four options
ROUND = 1_000_000  # index = rotation * 1e6 + question index
# pandas.read_table's default missing-value strings: LLaVA and VLMEvalKit read the TSV with pandas
NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
REJECTIONS = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
              "I'm sorry, but without the image provided", "Cannot determine the answer"]
DROPPED_IN_SUBMISSION = {"hint", "category", "source", "image", "comment", "l2-category"}


def _missing(v) -> bool:
    return v is None or v in NA_STRINGS


API_FAILURE = "Failed to obtain answer via API"  # VLMEvalKit's marker for a failed API call: no letter taken
# the fallback for "The correct answer is **B**"-style answers (VLMEvalKit PR #1552); no word boundary after the letter
ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def infer_option(answer: str, choices: dict) -> Optional[str]:
    """can_infer_option: 'Z' for a refusal; else the one option letter standing alone among the answer's words
    if it first appears among the last four words; else 'Z' standing alone when no letter does; else the
    letter of "answer is X"; else None. (VLMEvalKit's VERBOSE-only "A is a quantifier" check is not applied.)"""
    if API_FAILURE in answer:
        return None
    if any(r in answer for r in REJECTIONS):
        return "Z"
    words = answer
    for c in ".()[],:;!*#{}":
        words = words.replace(c, " ")
    words = words.split()
    present = [c for c in choices if c in words]
    if len(present) == 1:
        if words.index(present[0]) > len(words) - 5:
            return present[0]
    elif not present and "Z" in words:
        return "Z"
    m = ANSWER_IS.search(answer)
    return m.group(1).upper() if m and m.group(1).upper() in choices else None


def infer_text(answer: str, choices: dict) -> Optional[str]:
    """can_infer_text: the one option whose text appears in the answer (lowercased), for answers at most twice
    as long as all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def mmbench_option(answer: str, choices: dict) -> Optional[str]:
    """can_infer: the option letter VLMEvalKit's exact matching extracts from an answer, 'Z' or None."""
    return infer_option(answer, choices) or infer_text(answer, choices)


def mmbench_prompt(question: str, hint: Optional[str], options: list[str]) -> str:
    text = f"{hint}\n{question}" if hint is not None else question
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return f"<image>\n{text}\n{LETTER_ANSWER}"


def _image_loader(b64: str, where: str):
    def load():
        from ...images import load_image

        try:
            data = base64.b64decode(b64)
        except (ValueError, TypeError) as e:  # a broken cell: say which row
            raise LlavaGMError(f"{where}: image cell is not base64 ({e})") from None
        return load_image(data, where)

    return load


class MMBench(Task):
    name = "mmbench"
    version = "1"
    default_split = "dev"
    official = ("VLMEvalKit mcq_circular_eval / mcq_vanilla_eval + can_infer (matching_util.py as of 2026: last-4-words "
                "letter window, 'answer is X' fallback, option text for short answers), exact matching, no judge; "
                "LLaVA model_vqa_mmbench.py prompt")
    metric_variant = "circular accuracy (all rotations right), rule-based option extraction, overall and per category"
    prompt_template = "<image>\n[{hint}\\n]{question}\n{A. option ...}\n" + LETTER_ANSWER
    max_new_tokens = 1024  # LLaVA's model_vqa_mmbench.py
    downloads = "MMBench_DEV_EN.tsv / MMBench_TEST_EN.tsv from https://github.com/open-compass/MMBench (or LLaVA's mmbench_dev_20230712.tsv)"

    def option_defaults(self):
        return {"circular": True}  # False scores single-pass accuracy on the original rows only

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        path = Path(data).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.tsv"))
            if len(found) != 1:
                raise LlavaGMError(f"{path}: give the MMBench .tsv file itself (found {[f.name for f in found] or 'none'})")
            path = found[0]
        need_file(path, "MMBench TSV", self.downloads)
        csv.field_size_limit(sys.maxsize)  # base64 images are long cells
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None) or []
            table = [(n, dict(zip(header, cells))) for n, cells in enumerate(reader, 2)]
        if not {"index", "question", "A", "B"} <= set(header):
            raise LlavaGMError(f"{path}: not an MMBench TSV (needs index, question, A, B, ... columns)")
        has_answers = "answer" in header
        images = {}
        for n, row in table:
            try:
                row["index"] = int(row["index"])
            except (KeyError, ValueError):
                row["index"] = None
            images[row["index"]] = row.get("image", "")
        rows, by_index = [], {}
        for n, row in table:
            where, idx = f"{path}:{n}", row["index"]
            if idx is None:
                problems.add(where, "index is not an integer")
                continue
            options = []
            for letter in LETTERS:  # LLaVA stops at the first empty option
                if letter not in row or _missing(row[letter]):
                    break
                options.append(row[letter])
            answer = row.get("answer") if has_answers else None
            if has_answers and (_missing(answer) or answer not in LETTERS[: len(options)]):
                problems.add(where, f"answer {answer!r} is not one of the options {LETTERS[: len(options)]}", idx)
                continue
            b64 = images.get(idx, "")
            if len(b64) <= 64 and b64.strip().isdigit():  # VLMEvalKit TSVs point rotations at the original's image
                b64 = images.get(int(b64), "")
            if len(b64) <= 64:
                problems.add(where, "no image (empty image cell)", idx)
                continue
            item = {"index": idx, "question": row["question"], "hint": None if _missing(row.get("hint")) else row["hint"],
                    "options": options, "answer": answer, "where": where, "image": b64,
                    "category": row.get("category"), "l2": row.get("l2-category"), "split": row.get("split")}
            rows.append(item)
            by_index[idx] = item
        generated = False
        if has_answers and self.options["circular"] and not any(r["index"] >= ROUND for r in rows):
            generated = True  # rotate the options ourselves (LLaVA's --all-rounds)
            for r in list(rows):
                n = len(r["options"])
                for k in range(1, n):
                    gt = (LETTERS.index(r["answer"]) - k) % n
                    rows.append({**r, "index": k * ROUND + r["index"], "options": r["options"][k:] + r["options"][:k],
                                 "answer": LETTERS[gt], "where": f"{r['where']} (rotation {k})"})
        if not self.options["circular"]:
            rows = [r for r in rows if r["index"] < ROUND]
        questions = []
        for r in rows:
            main = by_index.get(r["index"] % ROUND, r)
            meta = {"index": r["index"], "options": dict(zip(LETTERS, r["options"])),
                    "category": main["category"], "l2_category": main["l2"]}
            questions.append(Question(r["index"], mmbench_prompt(r["question"], r["hint"], r["options"]),
                                      _image_loader(r["image"], r["where"]), r["answer"], meta, r["where"],
                                      group=r["index"] % ROUND))
        split = split or next((r["split"] for r in rows if r["split"]), None) or ("test" if "TEST" in path.name.upper() else "dev")
        info = {"circular_rows": "generated" if generated else "file", "header": header, "tsv": str(path)}
        return Loaded(questions, split, [str(path)], info)

    def match_answer(self, row, by_key):
        key = row.get("question_id")
        if row.get("round_id"):  # LLaVA --all-rounds: round r rotates the options r times, as the generated rows do
            key = int(row["round_id"]) * ROUND + int(key)
        return key if key in by_key else None

    def score(self, questions, predictions):
        if any(q.target is None for q in questions):
            return {"scored_on_server": True}, {q.key: {} for q in questions}
        per, groups = {}, {}
        for q in questions:
            opt = mmbench_option(predictions[q.key], q.meta["options"])
            per[q.key] = {"parsed": opt, "answer": q.target, "correct": opt == q.target}
            groups.setdefault(q.group, []).append(q)
        hits, by_cat = {}, {}
        for g, qs in groups.items():
            hits[g] = all(per[q.key]["correct"] for q in qs)
            main = min(qs, key=lambda q: q.key)
            for name in (f"category/{main.meta['category']}", f"l2-category/{main.meta['l2_category']}"):
                by_cat.setdefault(name, []).append(hits[g])
        # single pass on the original rows, as VLMEvalKit's vanilla exact matching: can_infer on any answer
        mains = [q for q in questions if q.key == q.group]
        vanilla = [per[q.key]["parsed"] == q.target for q in mains]
        metrics = {"circular_accuracy": pct(sum(hits.values()), len(hits)), "questions": len(hits),
                   "rows": len(questions), "vanilla_accuracy": pct(sum(vanilla), len(vanilla)),
                   "per_category": {k: pct(sum(v), len(v)) for k, v in sorted(by_cat.items())}}
        for q in questions:
            per[q.key]["question_correct"] = hits[q.group]
        return metrics, per

    def submission(self, loaded, questions, predictions, stem):
        if any(q.target is not None for q in questions):
            return []  # dev: scored here
        header = [c for c in loaded.info["header"] if c not in DROPPED_IN_SUBMISSION]
        after = max(i for i, c in enumerate(header) if c in LETTERS + ["question", "index"]) + 1
        header = header[:after] + ["prediction"] + header[after:]
        rows = []
        with open(loaded.info["tsv"], encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            cols = next(reader)
            for cells in reader:
                row = dict(zip(cols, cells))
                idx = int(row["index"])
                row["index"] = idx
                row["prediction"] = predictions.get(idx)
                rows.append([None if c != "prediction" and _missing(row.get(c)) else row.get(c) for c in header])
        out = write_xlsx(f"{stem}.mmbench_{loaded.split}_submission.xlsx", header, rows)
        return [str(out)]

    def headline(self, metrics):
        return {"MMB": metrics.get("circular_accuracy")}
