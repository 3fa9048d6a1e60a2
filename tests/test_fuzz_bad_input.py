"""Fuzz (issue 13): generated malformed rows, images and settings fed to `answer`, `eval`, `score`, the training data
loader, the image loader and the config/flag checks. Each must end in a result or one LlavaGMError: never another
exception, never a hang, never a wrong number (answers and scores are checked against a reference computed here).

Few examples per property, many properties; derandomized so CI runs the same cases every time.
"""

import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_gm.answer_file import answer_questions
from llava_gm.cli import main
from llava_gm.config import RecipeConfig, load_yaml
from llava_gm.errors import LlavaGMError
from llava_gm.eval.runner import evaluate, score
from llava_gm.images import load_image

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def _bomb() -> bytes:
    raw = bytearray(_png(Image.new("L", (1, 1))))
    raw[16:24] = struct.pack(">II", 30000, 30000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


GOOD = _png(Image.new("RGB", (16, 16), (200, 30, 30)))
IMAGES = {  # name -> bytes (None: no such file); True where the image decodes
    "good.png": (GOOD, True),
    "grey16.png": (_png(Image.fromarray((np.arange(256).reshape(16, 16) * 257).astype(np.uint16))), True),
    "rgba.png": (_png(Image.new("RGBA", (16, 16), (0, 0, 0, 0))), True),
    "trunc.png": (GOOD[: len(GOOD) // 2], False),
    "empty.png": (b"", False),
    "text.png": (b"hello", False),
    "bomb.png": (_bomb(), False),
    "missing.png": (None, False),
}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-images")
    for name, (data, _) in IMAGES.items():
        if data is not None:
            (d / name).write_bytes(data)
    (d / "folder.png").mkdir()
    return d


# ---- generated rows -------------------------------------------------------------------------------------------

ids = st.one_of(st.integers(0, 6), st.sampled_from(["a", "b", ""]), st.booleans(), st.none(), st.just([1]), st.just(1.5))
texts = st.one_of(st.sampled_from(["what color?", "what shape?", "is it red?", "<image>\nwhat?"]), st.text(max_size=8),
                  st.integers(), st.none(), st.just("\ud800"))
image_names = st.one_of(st.none(), st.just(""), st.sampled_from(sorted(IMAGES) + ["folder.png"]), st.integers(), st.just(["good.png"]))
raw_lines = st.one_of(st.binary(max_size=12), st.sampled_from([b"[]", b"5", b"{", b"null", b'"x"', b"\xff\xfe{}", b"{}"]))


FIELDS = {"question_id": ids, "text": texts, "image": image_names}


@st.composite
def question_rows(draw, with_answer=False):
    """Mostly good rows (so that answers and scores are checked too), some with one field broken or missing,
    some not JSON at all; ids sometimes repeat."""
    rows = []
    for i in range(draw(st.integers(1, 7))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            rows.append(draw(raw_lines).replace(b"\n", b" "))
            continue
        row = {"question_id": draw(st.sampled_from([i, i, i, 0])), "text": draw(st.sampled_from(["what color?", "what shape?", "is it red?"])),
               "image": draw(st.sampled_from(["good.png", "grey16.png", "rgba.png", "good.png"]))}
        if with_answer:
            row["answer"] = draw(st.sampled_from(["red", "circle", "yes", "no"]))
        if kind >= 6:  # one field broken (or gone)
            field = draw(st.sampled_from(sorted(FIELDS) + (["answer"] if with_answer else [])))
            if draw(st.booleans()):
                row.pop(field)
            else:
                row[field] = draw(FIELDS.get(field, st.one_of(st.integers(), st.just(""))))
        rows.append(json.dumps(row).encode())
    return rows


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _valid_answer_rows(lines: list[bytes], image_dir: Path) -> dict:
    """Reference rules of `answer`: {question_id: text} of the rows it must answer."""
    good = []
    for raw in lines:
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            continue
        qid, text, image = row["question_id"], row["text"], row.get("image")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or "\ud800" in text:
            continue
        if image not in (None, "") and (not isinstance(image, str) or not (image_dir / image).is_file() or not IMAGES[image][1]):
            continue
        good.append((qid, text))
    counts = {}
    for qid, _ in good:
        counts[qid] = counts.get(qid, 0) + 1
    return {qid: text for qid, text in good if counts[qid] == 1}


class Oracle:
    """A stand-in model that decodes images like the real one and answers by a rule on the question."""

    model_id = "oracle"

    def answer(self, items, **kw):
        for it in items:
            if it.get("image") is not None:
                load_image(it["image"])
        return [_rule(it["prompt"]) for it in items]


def _rule(prompt: str) -> str:
    q = prompt.replace("<image>", "").strip()
    return "red" if "color" in q else ("yes" if "red" in q else f"ans:{q}")


@FUZZ
@given(lines=question_rows(), on_bad=st.sampled_from(["skip", "fail"]))
def test_fuzz_answer(tmp_path_factory, image_dir, lines, on_bad):
    d = tmp_path_factory.mktemp("answer")
    q = _write(d / "q.jsonl", lines)
    out = d / "a.jsonl"
    want = _valid_answer_rows(lines, image_dir)
    try:
        answer_questions(None, q, image_dir, out, answerer=Oracle(), on_bad=on_bad, chunk=3)
    except LlavaGMError as e:
        assert on_bad == "fail" and str(e)
        return
    got = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    event(f"answered {min(len(got), 2)}+ rows")
    assert {r["question_id"]: r["prompt"] for r in got} == want  # exactly the good rows, each once
    assert all(r["text"] == _rule(r["prompt"]) for r in got)  # every answer is its own question's


@FUZZ
@given(lines=question_rows(with_answer=True), on_bad=st.sampled_from(["skip", "fail"]))
def test_fuzz_eval(tmp_path_factory, image_dir, lines, on_bad):
    d = tmp_path_factory.mktemp("eval")
    data = _write(d / "questions.jsonl", lines)
    try:
        r = evaluate(Oracle(), "easy_vqa", str(data), image_folder=str(image_dir), on_error=on_bad, progress=False)
    except LlavaGMError as e:
        assert on_bad == "fail" or "no questions to evaluate" in str(e), e
        return
    assert on_bad == "skip" or r["n_problems"] == 0
    # reference: rows easy-VQA can read, ids unique among them, then those whose image decodes
    readable = []
    for raw in lines:
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if (isinstance(row, dict) and {"question_id", "image", "text"} <= row.keys() and isinstance(row["text"], str)
                and isinstance(row.get("answer"), str) and row["answer"].strip() and isinstance(row["image"], str)
                and (image_dir / row["image"]).is_file() and isinstance(row["question_id"], (int, str))
                and not isinstance(row["question_id"], bool)):
            readable.append(row)
    n = {}
    for row in readable:
        n[row["question_id"]] = n.get(row["question_id"], 0) + 1
    want = {row["question_id"]: row for row in readable if n[row["question_id"]] == 1 and IMAGES[row["image"]][1]}
    assert [p["question_id"] for p in r["predictions"]] == list(want)
    right = [p["text"].lower() == want[p["question_id"]]["answer"].lower() for p in r["predictions"]]
    assert r["metrics"]["accuracy"] == pytest.approx(100.0 * sum(right) / len(right))  # each scored against its own row
    event(f"scored {min(len(right), 2)}+ questions, {min(sum(right), 1)}+ right")


@pytest.fixture(scope="module")
def score_data(tmp_path_factory, image_dir):
    d = tmp_path_factory.mktemp("score-data")
    rows = [{"question_id": i, "image": "good.png", "text": f"q{i}", "answer": a} for i, a in enumerate(["red", "circle", "yes", "no"])]
    return _write(d / "questions.jsonl", [json.dumps(r).encode() for r in rows])


@FUZZ
@given(answers=st.lists(st.one_of(st.fixed_dictionaries({"question_id": st.integers(0, 4), "text": st.sampled_from(["red", "no", "Yes "])}),
                                  st.fixed_dictionaries({"question_id": ids, "text": texts}), raw_lines), max_size=8),
       on_bad=st.sampled_from(["skip", "fail"]))
def test_fuzz_score(tmp_path_factory, image_dir, score_data, answers, on_bad):
    d = tmp_path_factory.mktemp("score")
    lines = [a.replace(b"\n", b" ") if isinstance(a, bytes) else json.dumps(a).encode() for a in answers]
    path = _write(d / "a.jsonl", lines)
    try:
        r = score("easy_vqa", str(score_data), str(path), image_folder=str(image_dir), on_error=on_bad)
    except LlavaGMError as e:
        assert on_bad == "fail" or "no answers match" in str(e), e
        return
    truth = {0: "red", 1: "circle", 2: "yes", 3: "no"}
    seen = {}
    for raw in lines:
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        qid = row.get("question_id") if isinstance(row, dict) else None
        if isinstance(qid, int) and not isinstance(qid, bool) and qid in truth:
            seen.setdefault(row["question_id"], []).append(row.get("text"))
    usable = {k: v[0] for k, v in seen.items() if len(v) == 1 and isinstance(v[0], str)}
    assert {p["question_id"] for p in r["predictions"]} == set(usable)
    hits = [usable[k].strip().lower() == truth[k] for k in usable]
    event(f"scored {min(len(hits), 2)}+ answers, {min(sum(hits), 1)}+ right")
    assert r["metrics"]["accuracy"] == pytest.approx(100.0 * sum(hits) / len(hits))


# ---- the training data loader -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    import tiny

    from llava_gm.data.conversation import ConversationEncoder

    tok = tiny.make_tokenizer(tmp_path_factory.mktemp("tok"))
    return ConversationEncoder(tok, num_image_tokens=4, max_length=64)


turns = st.one_of(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "x", 5]), "value": texts}),
                  st.integers(), st.none(), st.just({"from": "human"}))
GOOD_CONV = [{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red"}]
conversations = st.one_of(st.lists(turns, max_size=4), st.just(GOOD_CONV), st.just(GOOD_CONV), st.none(), st.text(max_size=3))
training_rows = st.one_of(
    st.fixed_dictionaries({"conversations": st.just(GOOD_CONV), "image": st.sampled_from(["good.png", "grey16.png", "rgba.png"])}),
    st.fixed_dictionaries({"conversations": conversations}, optional={"image": image_names}), st.integers(), st.none())


@FUZZ
@given(rows=st.lists(training_rows, min_size=1, max_size=6),
       jsonl=st.booleans(), on_bad=st.sampled_from(["skip", "fail"]))
def test_fuzz_training_loader(tmp_path_factory, image_dir, encoder, rows, jsonl, on_bad):
    from llava_gm.data.llava_json import load_samples

    d = tmp_path_factory.mktemp("train")
    for i, r in enumerate(rows):
        if isinstance(r, dict):
            r["id"] = f"s{i}"  # unique ids: the skip report is by id
    p = d / ("d.jsonl" if jsonl else "d.json")
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    try:
        samples, skipped = load_samples(p, image_dir, encoder, on_bad=on_bad)
    except LlavaGMError as e:
        assert on_bad == "fail" or "no usable samples" in str(e), e
        return
    assert len(samples) + len(skipped) == len(rows) and (on_bad == "skip" or len(skipped) == 0)
    event(f"{min(len(samples), 2)}+ samples, {min(len(skipped), 1)}+ skipped")
    for s in samples:
        assert s.image is None or IMAGES.get(s.image.name, (None, False))[0] is not None
        assert len(s.encoded.input_ids) == len(s.encoded.labels) <= 64


# ---- images ---------------------------------------------------------------------------------------------------


def _mutate(data: bytes, cut: int, flips: list) -> bytes:
    b = bytearray(data[: max(0, len(data) - cut)])
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


SOURCES = [_png(Image.new(m, (12, 10))) for m in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16")]
for fmt in ("JPEG", "GIF", "TIFF", "BMP", "WEBP"):
    _b = io.BytesIO()
    Image.new("RGB", (12, 10), (10, 200, 30)).save(_b, fmt)
    SOURCES.append(_b.getvalue())


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(src=st.sampled_from(SOURCES), cut=st.one_of(st.just(0), st.integers(0, 64)),
       flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=3))
def test_fuzz_images(src, cut, flips):
    try:
        im = load_image(_mutate(src, cut, flips), "row 1")
    except LlavaGMError as e:
        assert str(e).startswith("row 1: image")
        event("refused")
        return
    event("decoded")
    assert im.mode == "RGB" and im.size[0] * im.size[1] > 0
    np.asarray(im)  # pixels are there


# ---- settings -----------------------------------------------------------------------------------------------------

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.sampled_from(["5e-5", "1e3", "fast", ""]),
                    st.booleans(), st.none(), st.just([1, 2]))
STAGE_FIELDS = ["lr", "epochs", "batch_size", "grad_accum", "max_samples", "warmup_ratio", "weight_decay", "projector_lr", "lora_rank"]
POSITIVE = {"lr", "epochs", "batch_size", "grad_accum", "max_samples", "projector_lr", "lora_rank"}


@FUZZ
@given(values=st.dictionaries(st.sampled_from(STAGE_FIELDS), numbers, min_size=1, max_size=3))
def test_fuzz_recipe_numbers(tmp_path_factory, values):
    import yaml

    p = tmp_path_factory.mktemp("recipe") / "r.yaml"
    p.write_text(yaml.safe_dump({"stages": [{"name": "align", **values}]}))
    try:
        stage = load_yaml(RecipeConfig, p).stages[0]
    except LlavaGMError as e:
        assert "r.yaml" in str(e) and any(f in str(e) for f in values)
        return
    for f in values:
        v = getattr(stage, f)
        if v is None:
            continue
        assert not isinstance(v, (bool, str)) and math.isfinite(v)
        assert v > 0 if f in POSITIVE else 0 <= v <= (1 if f == "warmup_ratio" else math.inf)


FLAGS = {"--max-samples": st.integers(-3, 3), "--epochs": st.one_of(st.floats(allow_nan=True), st.integers(-2, 2)),
         "--lr": st.one_of(st.floats(allow_nan=True), st.sampled_from(["1e-3", "-1", "nan", "inf"])),
         "--batch-size": st.integers(-2, 2), "--grad-accum": st.integers(-2, 2)}


@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(sorted(FLAGS)), data=st.data())
def test_fuzz_train_flags(tmp_path_factory, capsys, flag, data):
    value = str(data.draw(FLAGS[flag]))
    d = tmp_path_factory.mktemp("flags")
    capsys.readouterr()  # what earlier examples printed
    try:
        rc = main(["train", "--recipe", str(d / "none.yaml"), "--output", str(d / "o"), flag, value])
    except SystemExit as e:  # argparse: not a number of the flag's type (one usage line)
        assert e.code == 2
        return
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and not (d / "o").exists()
    ok = math.isfinite(float(value)) and float(value) > 0
    assert (f"{flag} must be a positive number" in err) != ok  # a good value gets as far as the (missing) recipe


# ---- the real model: a few rows end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_answerer(tiny_checkpoint):
    from llava_gm.infer import Answerer

    return Answerer.from_checkpoint(tiny_checkpoint)


@settings(max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=question_rows())
def test_fuzz_answer_with_the_tiny_model(tmp_path_factory, image_dir, tiny_answerer, lines):
    d = tmp_path_factory.mktemp("answer-real")
    q = _write(d / "q.jsonl", lines)
    out = d / "a.jsonl"
    answer_questions(None, q, image_dir, out, answerer=tiny_answerer, on_bad="skip", max_new_tokens=2)
    got = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert {r["question_id"]: r["prompt"] for r in got} == _valid_answer_rows(lines, image_dir)
