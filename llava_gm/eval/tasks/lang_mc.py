"""Language multiple choice by option log-likelihood (Eve's language tasks: BoolQ, PIQA, MMLU style), text only.

Each option is scored as sum log p(option | context) with no chat template and no image; the prediction is
the best option (acc) and the best per character (acc_norm), as lm-evaluation-harness does. JSONL rows in any of:
- BoolQ: {"passage", "question", "answer": true/false | "label": 0/1}
  context "{passage}\\nQuestion: {question}?\\nAnswer:", options " no" / " yes"
- PIQA: {"goal", "sol1", "sol2", "label"}: context "Question: {goal}\\nAnswer:", options " {sol1}" / " {sol2}"
- MMLU: {"question", "choices": [...], "answer": index or letter, "subject"?}: the lm-eval MMLU prompt
  ("The following are multiple choice questions (with answers) about {subject}.", "A. ..." lines, "Answer:"),
  options " A" / " B" / ...
- generic: {"context", "choices": [...], "answer": index or letter}: options are the choices, with a space in
  front unless they start with whitespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...errors import LlavaGMError
from ..base import Loaded, Problems, Question, Task, pct, read_jsonl

LETTERS = "ABCDEFGHIJ"


def _gold(answer, n: int) -> int:
    if isinstance(answer, bool):
        return int(answer)
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[:n]:
        return LETTERS.index(answer.upper())
    if isinstance(answer, int) and 0 <= answer < n:
        return answer
    raise ValueError(f"answer {answer!r} does not name one of {n} options")


def mc_request(row: dict) -> tuple[str, str, list[str], int]:
    """(format, context, continuations, gold index) for a row in one of the supported layouts."""
    if "passage" in row:
        gold = row["answer"] if "answer" in row else row["label"]
        return "boolq", f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", [" no", " yes"], _gold(gold, 2)
    if "goal" in row:
        return "piqa", f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], _gold(row["label"], 2)
    choices = row["choices"]
    if "context" in row:
        conts = [c if c[:1].isspace() else " " + c for c in choices]
        return "generic", row["context"], conts, _gold(row["answer"], len(choices))
    subject = str(row.get("subject", "")).replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return "mmlu", f"{head}{row['question'].strip()}\n{lines}\nAnswer:", [f" {LETTERS[i]}" for i in range(len(choices))], _gold(row["answer"], len(choices))


class LangMC(Task):
    name = "lang_mc"
    version = "1"
    default_split = "test"
    official = "lm-evaluation-harness style log-likelihood multiple choice (Eve's language benchmarks)"
    metric_variant = "acc (sum log-likelihood) and acc_norm (per character); text only, no chat template"
    prompt_template = "BoolQ / PIQA / MMLU / generic contexts, see the module docstring"
    kind = "loglikelihood"
    downloads = "any JSONL in BoolQ / PIQA / MMLU (HF cais/mmlu) / generic layout"

    def option_defaults(self):
        return {"name": ""}  # the column name in summaries (default: the file name)

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        path = Path(data).expanduser()
        if not path.is_file():
            raise LlavaGMError(f"multiple-choice JSONL not found at {path}")
        questions, formats = [], set()
        for n, (where, row) in enumerate(read_jsonl(path, problems)):
            key = row.get("id", row.get("idx", n))
            try:
                fmt, ctx, conts, gold = mc_request(row)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                problems.add(where, f"not a BoolQ / PIQA / MMLU / generic row ({e})", key)
                continue
            formats.add(fmt)
            questions.append(Question(key, ctx, None, gold, {"continuations": conts, "subject": row.get("subject")}, where))
        keys = [q.key for q in questions]
        if len(set(keys)) != len(keys):
            raise LlavaGMError(f"{path}: ids repeat; give each row a unique id")
        self.options["name"] = self.options["name"] or path.stem
        return Loaded(questions, split or self.default_split, [str(path)], {"formats": sorted(formats)})

    def requests(self, questions: list[Question]) -> list[tuple[str, str]]:
        return [(q.prompt, c) for q in questions for c in q.meta["continuations"]]

    def collect(self, questions: list[Question], logprobs: list[float]) -> dict:
        """Split the flat log-likelihood list back per question."""
        out, i = {}, 0
        for q in questions:
            n = len(q.meta["continuations"])
            out[q.key] = logprobs[i : i + n]
            i += n
        return out

    def score(self, questions, predictions):
        per, by_subject = {}, {}
        for q in questions:
            lps, conts = predictions[q.key], q.meta["continuations"]
            pred = max(range(len(lps)), key=lambda i: lps[i])
            pred_norm = max(range(len(lps)), key=lambda i: lps[i] / max(1, len(conts[i].encode("utf-8"))))
            per[q.key] = {"logprobs": lps, "pred": pred, "pred_norm": pred_norm, "answer": q.target, "correct": pred == q.target}
            if q.meta["subject"]:
                by_subject.setdefault(q.meta["subject"], []).append(pred == q.target)
        metrics = {"acc": pct(sum(r["correct"] for r in per.values()), len(per)),
                   "acc_norm": pct(sum(r["pred_norm"] == r["answer"] for r in per.values()), len(per))}
        if by_subject:
            metrics["per_subject"] = {s: pct(sum(v), len(v)) for s, v in sorted(by_subject.items())}
        return metrics, per

    def headline(self, metrics):
        return {self.options["name"] or "LangMC": metrics.get("acc")}
