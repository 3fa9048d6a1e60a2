"""MME (Fu et al. 2023): 14 yes/no subtasks, two questions per image.

Scoring follows MME's eval_tool/calculation.py: the lowercased answer is "yes"/"no" if it is exactly that,
else "yes" if its first four characters contain "yes", else "no" if they contain "no", else "other" (wrong).
Per subtask: acc over questions, acc+ over images (both questions right), score = (acc + acc+) x 100.
Perception is the sum of 10 subtasks (max 2000), cognition of 4 (max 800).
The prompt is LLaVA-1.5's (and lmms-eval's): " Please answer yes or no." replaced by the short-answer line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ...errors import LlavaGMError
from ..base import SHORT_ANSWER, Loaded, Problems, Question, Task, pct

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
_YES_NO_PROMPT = re.compile(r"\s*Please answer yes or no\.")


def mme_yes_no(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _bare(question: str) -> str:
    """The question without image tag and answer-format instructions (to match LLaVA answer files)."""
    q = question.replace("<image>", "").replace(SHORT_ANSWER, "")
    return " ".join(_YES_NO_PROMPT.sub("", q).split())


class MME(Task):
    name = "mme"
    version = "1"
    default_split = "all"
    official = "MME eval_tool/calculation.py (+ LLaVA's convert_answer_to_mme.py prompt handling)"
    metric_variant = "per subtask (acc + acc+) x 100; perception (10 subtasks) and cognition (4) apart"
    prompt_template = "<image>\n{question without ' Please answer yes or no.'}\n" + SHORT_ANSWER
    max_new_tokens = 128  # LLaVA's model_vqa_loader.py default
    downloads = "MME_Benchmark_release_version from https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation"

    def option_defaults(self):
        return {"subtasks": "all"}  # or a comma list; a full run needs all 14 (a missing one is a data problem)

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        root = Path(data).expanduser()  # images live next to their questions
        if not any((root / s).is_dir() for s in PERCEPTION + COGNITION) and (root / "MME_Benchmark").is_dir():
            root = root / "MME_Benchmark"  # some copies nest the subtasks one level down
        wanted = PERCEPTION + COGNITION if self.options["subtasks"] == "all" else self.options["subtasks"].split(",")
        if bad := set(wanted) - set(PERCEPTION + COGNITION):
            raise LlavaGMError(f"unknown MME subtask(s) {sorted(bad)}")
        if not any((root / s).is_dir() for s in wanted):
            raise LlavaGMError(f"no MME subtask folders in {root}. Download: {self.downloads}")
        questions = []
        for sub in wanted:
            folder = root / sub
            if not folder.is_dir():
                problems.add(str(folder), f"subtask {sub} is missing, so the total would not be MME's")
                continue
            split_layout = (folder / "images").is_dir() and (folder / "questions_answers_YN").is_dir()
            qa_dir, img_dir = (folder / "questions_answers_YN", folder / "images") if split_layout else (folder, folder)
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next((img_dir / (txt.stem + s) for s in IMAGE_SUFFIXES if (img_dir / (txt.stem + s)).is_file()), None)
                if image is None:
                    problems.add(str(txt), f"no image {txt.stem}.jpg/.png in {img_dir}")
                    continue
                rows = [line.rstrip("\n") for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
                pair = []
                for n, line in enumerate(rows, 1):
                    parts = line.split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        problems.add(f"{txt}:{n}", "expected 'question<TAB>Yes|No'")
                        continue
                    pair.append((parts[0], parts[1].strip().lower()))
                if len(pair) != 2:  # acc+ is defined over the two questions of an image
                    problems.add(str(txt), f"an image needs exactly 2 questions, found {len(pair)}")
                    continue
                llava_id = f"{sub}/{image.name}"  # LLaVA's question_id (shared by both questions)
                for k, (question, answer) in enumerate(pair):
                    prompt = f"<image>\n{_YES_NO_PROMPT.sub('', question).strip()}\n{SHORT_ANSWER}"
                    meta = {"subtask": sub, "image": image.name, "question": question}
                    questions.append(Question(f"{llava_id}#{k}", prompt, str(image), answer, meta, f"{txt}:{k + 1}", group=llava_id))
        return Loaded(questions, "all" if wanted == PERCEPTION + COGNITION else ",".join(wanted), [str(root)])

    def match_answer(self, row, by_key):
        qid = row.get("question_id")
        if qid in by_key:
            return qid
        # LLaVA's answer files give both questions of an image the same id: tell them apart by the prompt
        asked = _bare(str(row.get("prompt", row.get("text_prompt", ""))))
        for k in (f"{qid}#0", f"{qid}#1"):
            if k in by_key and _bare(by_key[k].meta["question"]) == asked:
                return k
        return None

    def score(self, questions, predictions):
        per, images = {}, {}
        for q in questions:
            parsed = mme_yes_no(predictions[q.key])
            per[q.key] = {"parsed": parsed, "answer": q.target, "correct": parsed == q.target}
            images.setdefault((q.meta["subtask"], q.group), []).append(per[q.key]["correct"])
        subtasks = {}
        for (sub, _), oks in images.items():
            s = subtasks.setdefault(sub, {"questions": 0, "correct": 0, "images": 0, "both": 0})
            s["questions"] += len(oks)
            s["correct"] += sum(oks)
            s["images"] += 1
            s["both"] += len(oks) == 2 and all(oks)
        for s in subtasks.values():
            s["acc"] = pct(s["correct"], s["questions"])
            s["acc_plus"] = pct(s["both"], s["images"])
            s["score"] = s["acc"] + s["acc_plus"]
        order = [t for t in PERCEPTION + COGNITION if t in subtasks]
        metrics = {"perception": sum(subtasks[t]["score"] for t in PERCEPTION if t in subtasks),
                   "cognition": sum(subtasks[t]["score"] for t in COGNITION if t in subtasks),
                   "other_answers": sum(r["parsed"] == "other" for r in per.values()),
                   "subtasks": {t: subtasks[t] for t in order},
                   "complete": set(order) == set(PERCEPTION + COGNITION)}
        return metrics, per

    def headline(self, metrics):
        return {"MME-P": metrics.get("perception"), "MME-C": metrics.get("cognition")}
