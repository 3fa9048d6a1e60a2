"""easy-VQA (PyPI `easy-vqa`, MIT) as LLaVA data: captions for stage 1, multi-turn VQA for stage 2, a test split.

Each image holds one coloured shape; its questions ask for the shape, the colour, or yes/no.
Train and test stay apart: the test questions only ever reach evaluation.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

from ..errors import LlavaGMError
from ..paths import atomic_dir

SHAPES = {"circle", "rectangle", "triangle"}
COLORS = {"red", "green", "blue", "yellow", "teal", "brown", "gray", "black"}
CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short caption for the image.",
    "Summarize the image in a few words.",
]


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes_no"
    return "shape" if answer in SHAPES else "color"


def _load(split: str):
    try:
        import easy_vqa
    except ImportError:
        raise LlavaGMError("easy-VQA data needs the PyPI package easy-vqa: pip install easy-vqa") from None
    get_q = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    get_p = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    questions, answers, image_ids = get_q()
    per_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        per_image.setdefault(int(i), []).append((q, a))
    return per_image, get_p()


def _describe(qas: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """The image's colour and shape, read off its answers (open questions, and yes/no ones about a word)."""
    shape = next((a for q, a in qas if a in SHAPES), None)
    color = next((a for q, a in qas if question_type(a) == "color"), None)
    for q, a in qas:
        if a not in ("yes", "no"):
            continue
        present = (a == "yes") != yes_no_form(q)[0]  # "is there not a red shape?" / "is no red shape present?" -> no: present
        for word in q.rstrip("?").split():
            if present and word in SHAPES:
                shape = shape or word
            elif present and word in COLORS:
                color = color or word
    return color, shape


def caption(color: str | None, shape: str | None) -> str:
    """The stage-1 caption of an image from what its answers tell ("A red circle.", "A red shape.", "A circle.")."""
    return f"A {color} {shape}." if color and shape else (f"A {color} shape." if color else f"A {shape}.")


def yes_no_form(question: str) -> tuple[bool, str]:
    """A yes/no question's form: negated or not, and whether it names a colour or a shape."""
    words = re.findall(r"[a-z]+", question.lower())
    return any(w in ("not", "no") for w in words), "color" if any(w in COLORS for w in words) else "shape"


def wording_rule_accuracy(test_questions: Path) -> float:
    """Yes/no accuracy of a rule that never looks at the image: a negated question gets "yes", any other "no".

    easy-VQA's answers follow the wording (one colour of eight is present), so this is the bar a model's yes/no
    score must clear before it shows that the model checks the image.
    """
    rows = [json.loads(line) for line in Path(test_questions).read_text().splitlines() if line.strip()]
    yes_no = [r for r in rows if question_type(r["answer"]) == "yes_no"]
    return 100.0 * sum((r["answer"] == "yes") == yes_no_form(r["text"])[0] for r in yes_no) / len(yes_no)


def balanced_yes_no(rows: list[dict], per_answer: int | None = None) -> list[dict]:
    """The balanced yes/no part of a question list: for each question form, the first k "yes" and the first k
    "no" questions in list order (k = the smaller of the two counts, at most `per_answer`). On it the wording
    alone scores exactly 50%, so a score well above 50% says the model looked at the image. rows: dicts with
    "text" and "answer" (test_questions.jsonl rows)."""
    groups: dict = {}
    for r in rows:
        if question_type(r["answer"]) == "yes_no":
            groups.setdefault(yes_no_form(r["text"]), {"yes": [], "no": []})[r["answer"]].append(r)
    picked = set()
    for by_answer in groups.values():
        k = min(len(by_answer["yes"]), len(by_answer["no"]), per_answer if per_answer is not None else len(rows))
        picked |= {id(r) for r in by_answer["yes"][:k] + by_answer["no"][:k]}
    return [r for r in rows if id(r) in picked]


def evaluation_subset(rows: list[dict], natural: int, per_answer: int) -> list[dict]:
    """A fixed, cheap evaluation set: the first `natural` questions (the split's own mix of types and answers)
    plus a balanced yes/no part (`per_answer` yes and as many no per question form), in question order."""
    keep = {id(r) for r in rows[:natural]} | {id(r) for r in balanced_yes_no(rows, per_answer)}
    return [r for r in rows if id(r) in keep]


def balance_yes_no(items: list[tuple], rng: random.Random) -> list[tuple]:
    """Keep as many "yes" as "no" answers within each yes/no question form; other questions all stay.

    easy-VQA's yes/no answers follow the wording: "is there a red shape?" is "no" 7 times in 8 (one colour of
    eight is present), so a model can score 83% on them without looking at the image (measured: every stage-2
    model we trained on the natural data answered them from the text alone). Balanced answers, as VQA v2 built
    its pairs, leave the image as the only way to answer. items: (image_id, question, answer).
    """
    groups: dict = {}
    for it in items:
        if question_type(it[2]) == "yes_no":
            groups.setdefault((yes_no_form(it[1]), it[2]), []).append(it)
    drop = set()
    for (form, answer), members in groups.items():
        other = len(groups.get((form, "no" if answer == "yes" else "yes"), []))
        if len(members) > other:
            drop |= {id(it) for it in rng.sample(members, len(members) - other)}
    return [it for it in items if id(it) not in drop]


def build_easy_vqa(out_dir: str | Path, seed: int = 0, per_conversation: int = 1, balance: bool = False) -> Path:
    """Write align.json, instruct.json, test_questions.jsonl and images/ into out_dir (once; atomic).

    `per_conversation` questions of an image go into one multi-turn conversation. The default is 1: in easy-VQA
    the turns give each other away ("what is the blue shape?" tells the colour, and an earlier answer tells the
    rest), so a model trained on packed turns learns to copy from the conversation instead of looking at the
    image (measured: 48% test accuracy after 400 packed conversations, against single-question training).
    `balance` evens out yes and no in the training questions (see balance_yes_no); the test split stays whole.
    It is off by default here; the demo turns it on (docs/yes-no.md). With continuous image tokens a
    balanced-trained model did not learn to check the image in the demo's budget (yes/no 49.7% vs 83.1% from the
    prior); with word tokens it is the way to take the wording shortcut away.
    """
    out_dir = Path(out_dir)
    settings = {"format": 3, "seed": seed, "per_conversation": per_conversation, "balance": balance}
    if (out_dir / "instruct.json").is_file():
        marker = out_dir / "build.json"
        built = json.loads(marker.read_text()) if marker.is_file() else {"format": 1}
        if marker.is_file() and built.get("format", 1) < settings["format"] and {**built, "format": 0} == {**settings, "format": 0}:
            # our own output of an older version (format 2 read "is no red shape present?" -> yes as red: 11% of the
            # captions were wrong): rebuilt, since nothing in it is the user's
            print(f"rebuilding {out_dir}: it holds easy-VQA data of an older llava-gm (format {built.get('format', 1)})")
            shutil.rmtree(out_dir)
        elif built != settings:
            raise LlavaGMError(f"{out_dir} holds easy-VQA data built with other settings ({built}, wanted {settings}); "
                               "remove the folder to rebuild it, or choose another output folder")
        else:
            return out_dir
    rng = random.Random(seed)
    with atomic_dir(out_dir) as tmp:
        align, instruct = [], []
        for split in ("train", "test"):
            per_image, paths = _load(split)
            (tmp / "images" / split).mkdir(parents=True)
            for image_id in sorted(per_image):
                shutil.copyfile(paths[image_id], tmp / "images" / split / f"{image_id}.png")
            if split == "test":
                with open(tmp / "test_questions.jsonl", "w") as f:
                    qid = 0
                    for image_id in sorted(per_image):
                        for q, a in per_image[image_id]:
                            f.write(json.dumps({"question_id": qid, "image": f"images/test/{image_id}.png", "text": q, "answer": a, "type": question_type(a)}) + "\n")
                            qid += 1
                continue
            kept = [(i, q, a) for i in sorted(per_image) for q, a in per_image[i]]
            if balance:
                kept = balance_yes_no(kept, random.Random(seed + 1))  # its own stream: captions stay as before
            train_qas: dict[int, list] = {}
            for i, q, a in kept:
                train_qas.setdefault(i, []).append((q, a))
            for image_id in sorted(per_image):
                image = f"images/train/{image_id}.png"
                color, shape = _describe(per_image[image_id])  # captions read every answer, balanced away or not
                qas = train_qas.get(image_id, [])
                if color or shape:
                    align.append({"id": f"easyvqa-cap-{image_id}", "image": image, "conversations": [
                        {"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
                        {"from": "gpt", "value": caption(color, shape)}]})
                rng.shuffle(qas)
                for c in range(0, len(qas), per_conversation):  # LLaVA-1.5 packs an image's questions into turns
                    turns = []
                    for k, (q, a) in enumerate(qas[c : c + per_conversation]):
                        # no "Answer ... single word" suffix: every answer here is one word, and eval prompts stay short
                        turns += [{"from": "human", "value": f"<image>\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
                    instruct.append({"id": f"easyvqa-{image_id}-{c}", "image": image, "conversations": turns})
        rng.shuffle(align)  # so that the first N samples (--max-samples) cover many images
        rng.shuffle(instruct)
        (tmp / "align.json").write_text(json.dumps(align))
        (tmp / "instruct.json").write_text(json.dumps(instruct))
        (tmp / "build.json").write_text(json.dumps(settings))
    return out_dir
