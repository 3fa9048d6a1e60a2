"""A few questions of every benchmark, written in the exact layout of its official release.

For the tests (each task read end to end from its real file layout) and for trying the harness without the
downloads: `write_samples(folder)` writes them all and returns {task: path to pass as --data}.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image


def _image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _ann(qid, image_id, answers, answer_type, question_type):
    return {"question_id": qid, "image_id": image_id, "answer_type": answer_type, "question_type": question_type,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def vqav2_val(root: Path) -> Path:
    root = Path(root)
    qs = [{"image_id": 1, "question": "How many dogs are there?", "question_id": 10},
          {"image_id": 1, "question": "What color is the frisbee?", "question_id": 11},
          {"image_id": 2, "question": "Is it raining?", "question_id": 20}]
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": qs})
    # humans disagree on 10, so vqaEval.py normalises both sides there ("Two dogs." -> "2 dogs")
    anns = [_ann(10, 1, ["2 dogs"] * 9 + ["two dogs"], "number", "how many"),
            _ann(11, 1, ["red"] + ["orange"] * 9, "other", "what color is the"),
            _ann(20, 2, ["yes"] * 2 + ["no"] * 8, "yes/no", "is it")]
    _json(root / "v2_mscoco_val2014_annotations.json", {"data_subtype": "val2014", "annotations": anns})
    for i in (1, 2):
        _image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    return root


def vqav2_testdev(root: Path) -> Path:
    root = Path(root)
    dev = [{"image_id": 5, "question": "What is this?", "question_id": 100},
           {"image_id": 5, "question": "How many cats?", "question_id": 101}]
    _json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"data_subtype": "test-dev2015", "questions": dev})
    _json(root / "v2_OpenEnded_mscoco_test2015_questions.json",
          {"data_subtype": "test2015", "questions": dev + [{"image_id": 6, "question": "Why?", "question_id": 102}]})
    _image(root / "test2015" / f"COCO_test2015_{5:012d}.jpg")
    return root


def gqa(root: Path) -> Path:
    root = Path(root)
    qs = {"201": {"imageId": "n1", "question": "What color is the car?", "answer": "red", "fullAnswer": "The car is red.",
                  "isBalanced": True, "types": {"structural": "query", "semantic": "attr", "detailed": "color"}},
          "202": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is.",
                  "isBalanced": True, "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
          "203": {"imageId": "n1", "question": "Unbalanced?", "answer": "no", "isBalanced": False,
                  "types": {"structural": "verify", "semantic": "obj", "detailed": "exist"}}}
    _json(root / "testdev_balanced_questions.json", qs)
    _image(root / "images" / "n1.jpg")
    return root


def scienceqa(root: Path) -> Path:
    root = Path(root)
    probs = {"1": {"question": "Which is a mammal?", "choices": ["frog", "whale", "shark"], "answer": 1,
                   "hint": "Look at the animals.", "image": "image.png", "subject": "natural science", "grade": "grade3", "split": "test"},
             "2": {"question": "Which word is a noun?", "choices": ["run", "cat"], "answer": 1, "hint": "",
                   "image": None, "subject": "language science", "grade": "grade2", "split": "test"},
             "3": {"question": "Which state is farthest north?", "choices": ["Maine", "Texas"], "answer": 0, "hint": "",
                   "image": "image.png", "subject": "social science", "grade": "grade4", "split": "test"},
             "4": {"question": "Train question?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
                   "subject": "natural science", "grade": "grade1", "split": "train"}}
    _json(root / "problems.json", probs)
    _json(root / "pid_splits.json", {"train": ["4"], "val": [], "test": ["1", "2", "3"]})
    for pid in ("1", "3"):
        _image(root / "images" / "test" / pid / "image.png")
    return root


def pope(root: Path) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in {"random": [("Is there a dog in the image?", "yes"), ("Is there a car in the image?", "no")],
                        "popular": [("Is there a person in the image?", "yes"), ("Is there a chair in the image?", "no")],
                        "adversarial": [("Is there a frisbee in the image?", "yes"), ("Is there a cat in the image?", "no")]}.items():
        with open(root / f"coco_pope_{split}.json", "w") as f:
            for i, (text, label) in enumerate(rows, 1):
                f.write(json.dumps({"question_id": i, "image": "COCO_val2014_000000000001.jpg", "text": text, "label": label}) + "\n")
    _image(root / "val2014" / "COCO_val2014_000000000001.jpg")
    return root


MME_SPLIT_LAYOUT = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/


def mme(root: Path) -> Path:
    from .tasks.mme import COGNITION, PERCEPTION

    root = Path(root) / "MME_Benchmark_release_version"
    for sub in PERCEPTION + COGNITION:
        folder = root / sub
        img_dir, qa_dir = (folder / "images", folder / "questions_answers_YN") if sub in MME_SPLIT_LAYOUT else (folder, folder)
        _image(img_dir / "0001.jpg")
        qa_dir.mkdir(parents=True, exist_ok=True)
        (qa_dir / "0001.txt").write_text(f"Is this about {sub}? Please answer yes or no.\tYes\n"
                                         f"Is this about nothing?  Please answer yes or no.\tNo\n")
    return root


def _b64_image(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]


def mmbench(root: Path, name: str = "MMBench_DEV_EN.tsv", answers: bool = True, rotations_in_file: bool = False) -> Path:
    """Two questions (4 and 2 options); optionally the release's rotation rows (index + k*1e6) in the file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    img = _b64_image((10, 120, 200))
    rows = [{"index": 0, "question": "What is shown?", "hint": "nan", "A": "a cat", "B": "a dog", "C": "a bird",
             "D": "a fish", "answer": "B", "category": "image_scene", "image": img, "source": "s",
             "l2-category": "coarse_perception", "comment": "nan", "split": "dev"},
            {"index": 1, "question": "Is the sky above?", "hint": "Look up.", "A": "yes", "B": "no", "C": "", "D": "",
             "answer": "A", "category": "spatial_relationship", "image": img, "source": "s",
             "l2-category": "relation_reasoning", "comment": "", "split": "dev"}]
    if rotations_in_file:
        extra = []
        for r in rows:
            opts = [r[c] for c in "ABCD" if r[c] not in ("", "nan")]
            for k in range(1, len(opts)):
                rot = opts[k:] + opts[:k]
                gt = "ABCD"[("ABCD".index(r["answer"]) - k) % len(opts)]
                extra.append({**r, "index": k * 1_000_000 + r["index"], **dict(zip("ABCD", rot + [""] * (4 - len(rot)))),
                              "answer": gt, "image": str(r["index"])})  # VLMEvalKit points copies at the original image
        rows += extra
    header = MMBENCH_HEADER if answers else [h for h in MMBENCH_HEADER if h != "answer"]
    with open(root / name, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for r in rows:
            w.writerow([r[h] for h in header])
    return root / name


def textvqa(root: Path) -> Path:
    root = Path(root)
    data = [{"question": "what brand is the camera?", "image_id": "aa01", "question_id": 34602,
             "answers": ["dakota"] * 8 + ["dakota digital"] * 2, "set_name": "val"},
            {"question": "what number is on the jersey?", "image_id": "bb02", "question_id": 34603,
             "answers": ["23"] * 3 + ["twenty three"] + ["32"] * 6, "set_name": "val"}]
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    _json(root / "TextVQA_Rosetta_OCR_v0.2_val.json",
          {"data": [{"image_id": "aa01", "ocr_tokens": ["dakota", "digital"]}, {"image_id": "bb02", "ocr_tokens": []}]})
    for d in data:
        _image(root / "train_images" / f"{d['image_id']}.jpg")
    return root


def mmvp(root: Path) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = [(1, "Is the door open or closed?", "(a) Open (b) Closed", "(a)"),
            (2, "Is the door open or closed?", "(a) Open (b) Closed", "(b)"),
            (3, "Is the dog facing left or right?", "(a) Left (b) Right", "(b)"),
            (4, "Is the dog facing left or right?", "(a) Left (b) Right", "(a)")]
    with open(root / "Questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerows(rows)
    for i, *_ in rows:
        _image(root / "MMVP Images" / f"{i}.jpg")
    return root


def easy_vqa(root: Path) -> Path:
    root = Path(root)
    rows = [{"question_id": 0, "image": "images/0.png", "text": "what is the red shape?", "answer": "triangle", "type": "shape"},
            {"question_id": 1, "image": "images/0.png", "text": "what color is the shape?", "answer": "red", "type": "color"},
            {"question_id": 2, "image": "images/0.png", "text": "is there a circle?", "answer": "no", "type": "yes_no"},
            {"question_id": 3, "image": "images/1.png", "text": "is there a blue shape?", "answer": "yes", "type": "yes_no"}]
    for r in rows:
        _image(root / r["image"])
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "questions.jsonl"


def lang_mc(root: Path) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": "b1", "passage": "Cats are mammals.", "question": "are cats mammals", "answer": True},
            {"id": "p1", "goal": "Boil water.", "sol1": "Put the pot on the stove.", "sol2": "Put the pot in the fridge.", "label": 0},
            {"id": "m1", "question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "elementary_mathematics"},
            {"id": "g1", "context": "The sky is", "choices": ["blue", "green"], "answer": "A"}]
    path = root / "lang.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_ppl(root: Path) -> Path:
    path = Path(root) / "text.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    return path


def write_samples(folder: str | Path) -> dict[str, str]:
    """Every task's sample data under `folder`; returns {task: --data value}."""
    f = Path(folder)
    return {"vqav2": str(vqav2_val(f / "vqav2")), "gqa": str(gqa(f / "gqa")), "scienceqa_img": str(scienceqa(f / "scienceqa")),
            "textvqa": str(textvqa(f / "textvqa")), "pope": str(pope(f / "pope")), "mme": str(mme(f / "mme")),
            "mmbench": str(mmbench(f / "mmbench")), "mmvp": str(mmvp(f / "mmvp")), "easy_vqa": str(easy_vqa(f / "easy_vqa")),
            "lang_mc": str(lang_mc(f / "lang")), "text_ppl": str(text_ppl(f / "text"))}
