"""Bad input never gives a wrong number, a traceback or lost work (issue 13): one test per case."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from llava_gm.answer_file import answer_questions, locked_output
from llava_gm.cli import main
from llava_gm.config import RecipeConfig, StageConfig, load_yaml
from llava_gm.errors import LlavaGMError
from llava_gm.eval import samples
from llava_gm.eval.runner import evaluate, score
from llava_gm.paths import atomic_dir


class Oracle:
    """Answers easy-VQA questions with the truth of the row whose prompt it is (a perfect model)."""

    model_id = "oracle"

    def __init__(self, truth: dict):
        self.truth, self.calls = truth, 0

    def answer(self, items, **kw):
        from llava_gm.images import load_image

        self.calls += 1
        for it in items:  # decodes its images as the real answerer does (which fails the batch on a bad one)
            if it.get("image") is not None:
                load_image(it["image"])
        return [self.truth.get(it["prompt"], "?") for it in items]


def _easy(tmp_path, rows) -> Path:
    root = tmp_path / "easy"
    for r in rows:
        if isinstance(r.get("image"), str) and not (root / r["image"]).exists():
            (root / r["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (200, 30, 30)).save(root / r["image"])
    root.mkdir(exist_ok=True)
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "questions.jsonl"


ROWS = [{"question_id": 0, "image": "images/0.png", "text": "what shape?", "answer": "triangle", "type": "shape"},
        {"question_id": 1, "image": "images/0.png", "text": "what color?", "answer": "red", "type": "color"},
        {"question_id": 1, "image": "images/1.png", "text": "which shape?", "answer": "circle", "type": "shape"},
        {"question_id": 3, "image": "images/1.png", "text": "is it blue?", "answer": "no", "type": "yes_no"}]


# ---- 1. duplicate question ids ---------------------------------------------------------------------------------


def test_duplicate_ids_in_data_fail_or_leave_every_copy_out(tmp_path):
    data = _easy(tmp_path, ROWS)
    oracle = Oracle({f"<image>\n{r['text']}": r["answer"] for r in ROWS})
    with pytest.raises(LlavaGMError, match=r"question id 1 repeats: 2 rows \(.*questions.jsonl:2, .*questions.jsonl:3\)"):
        evaluate(oracle, "easy_vqa", str(data), progress=False)
    r = evaluate(oracle, "easy_vqa", str(data), on_error="skip", progress=False)
    assert [p["question_id"] for p in r["predictions"]] == [0, 3] and r["n_problems"] == 1
    assert r["metrics"]["accuracy"] == 100.0 and r["metrics"]["per_type"] == {"shape": 100.0, "yes_no": 100.0}
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "text": "x"}) + "\n" for q in (0, 1, 3)))
    with pytest.raises(LlavaGMError, match="question id 1 repeats"):
        score("easy_vqa", str(data), str(answers))


def test_duplicate_answers_are_an_error_and_skipped_exactly(tmp_path):
    rows = [r for r in ROWS if r["text"] != "which shape?"]
    data = _easy(tmp_path, rows)
    answers = tmp_path / "a.jsonl"
    lines = [{"question_id": 0, "text": "triangle"}, {"question_id": 1, "text": "red"}, {"question_id": 1, "text": "blue"},
             {"question_id": 3, "text": "yes"}]
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(LlavaGMError, match=r"second answer for question 1 \(first at .*a.jsonl:2\)"):
        score("easy_vqa", str(data), str(answers))
    r = score("easy_vqa", str(data), str(answers), on_error="skip")
    assert r["n_questions"] == 2 and r["metrics"]["accuracy"] == 50.0  # 0 right, 3 wrong; 1 left out, not guessed


def _duplicate_one(task: str, path: Path) -> None:
    """Repeat one question of a task's sample data in its own file format."""
    p = Path(path)
    if task == "vqav2":
        f = p / "v2_OpenEnded_mscoco_val2014_questions.json"
        d = json.loads(f.read_text())
        d["questions"].append(dict(d["questions"][0]))
        f.write_text(json.dumps(d))
    elif task == "gqa":
        f = p / "testdev_balanced_questions.json"
        text = f.read_text()
        first = json.dumps({"201": json.loads(text)["201"]})[1:-1]
        f.write_text(text[:-1] + ", " + first + "}")  # a key repeated inside the object
    elif task == "scienceqa_img":
        f = p / "pid_splits.json"
        d = json.loads(f.read_text())
        d["test"].append("1")
        f.write_text(json.dumps(d))
    elif task == "textvqa":
        f = p / "TextVQA_0.5.1_val.json"
        d = json.loads(f.read_text())
        d["data"].append(dict(d["data"][0]))
        f.write_text(json.dumps(d))
    elif task == "pope":
        f = p / "coco_pope_random.json"
        f.write_text(f.read_text() + f.read_text().splitlines()[0] + "\n")
    elif task in ("easy_vqa", "lang_mc"):
        p.write_text(p.read_text() + p.read_text().splitlines()[0] + "\n")
    elif task == "mmbench":
        lines = p.read_text().splitlines()
        p.write_text("\n".join(lines + [lines[1]]) + "\n")
    elif task == "mmvp":
        f = p / "Questions.csv"
        lines = f.read_text().splitlines()
        f.write_text("\n".join(lines + [lines[1]]) + "\n")
    else:
        raise AssertionError(task)


# MME's ids are its image file paths (unique by construction); text_ppl has one question
@pytest.mark.parametrize("task", ["vqav2", "gqa", "scienceqa_img", "textvqa", "pope", "easy_vqa", "mmbench", "mmvp", "lang_mc"])
def test_every_task_refuses_repeated_ids(tmp_path, task):
    data = samples.write_samples(tmp_path)[task]
    _duplicate_one(task, Path(data))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("")
    with pytest.raises(LlavaGMError, match=r"question id \S+ repeats: 2 rows|repeat inside one JSON object|ids repeat"):
        score(task, data, str(answers)) if task != "lang_mc" else evaluate(None, task, data, progress=False)


def test_repeated_annotation_or_ocr_rows_are_named(tmp_path):
    paths = samples.write_samples(tmp_path)
    answers = tmp_path / "a.jsonl"
    answers.write_text("")
    f = Path(paths["vqav2"]) / "v2_mscoco_val2014_annotations.json"
    d = json.loads(f.read_text())
    d["annotations"].append({**d["annotations"][0], "answers": [{"answer": "7"}] * 10})  # a second truth for question 10
    f.write_text(json.dumps(d))
    with pytest.raises(LlavaGMError, match=r"annotations.json: question_id 10 appears twice \(entries 0 and 3\)"):
        score("vqav2", paths["vqav2"], str(answers))
    f = Path(paths["textvqa"]) / "TextVQA_Rosetta_OCR_v0.2_val.json"
    d = json.loads(f.read_text())
    d["data"].append({"image_id": "aa01", "ocr_tokens": ["other"]})
    f.write_text(json.dumps(d))
    with pytest.raises(LlavaGMError, match="image_id 'aa01' appears twice"):
        score("textvqa", paths["textvqa"], str(answers))


# ---- 3. two writers of one output -----------------------------------------------------------------------------


def test_atomic_dir_loser_fails_and_keeps_its_result(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(LlavaGMError, match=r"written by another process .* kept at .*ckpt.conflict-\d+"):
        with atomic_dir(target, loser_fails=True) as tmp:
            (tmp / "mine").write_text("mine")
            target.mkdir()  # the other process finished first
            (target / "theirs").write_text("theirs")
    assert (target / "theirs").exists() and not (target / "mine").exists()
    kept = next(tmp_path.glob("ckpt.conflict-*"))
    assert (kept / "mine").read_text() == "mine"
    with atomic_dir(target) as tmp:  # a cache: the winner's copy is as good as ours
        (tmp / "mine").write_text("x")
    assert not (target / "mine").exists() and len(list(tmp_path.glob(".ckpt.*"))) == 0


def test_second_answer_process_fails_instead_of_losing_output(tmp_path):
    out = tmp_path / "a.jsonl"
    with locked_output(out) as f:
        f.write("{}\n")
        with pytest.raises(LlavaGMError, match="another process is writing"):
            with locked_output(out, overwrite=True):
                pass
    assert out.read_text() == "{}\n"
    with pytest.raises(LlavaGMError, match="already exists; pass --resume"):
        with locked_output(out):
            pass
    with pytest.raises(LlavaGMError, match="cannot write the output here"):
        with locked_output(tmp_path):
            pass


# ---- 4. checkpoints are checked -------------------------------------------------------------------------------


def _copy(ckpt, tmp_path, name="c") -> Path:
    dst = tmp_path / name
    shutil.copytree(ckpt, dst)
    return dst


def test_damaged_checkpoints_are_named(tmp_path, tiny_checkpoint):
    from llava_gm.model.build import load_checkpoint

    c = _copy(tiny_checkpoint, tmp_path)
    state = load_file(str(c / "model.safetensors"))
    cfg = yaml.safe_load((c / "config.yaml").read_text())
    assert set(cfg["weights"]) == set(state)
    # another stage's weights (the projector only) beside this config
    save_file({k: v for k, v in state.items() if k.startswith("projector.")}, str(c / "model.safetensors"))
    with pytest.raises(LlavaGMError, match=r"model.safetensors does not match its config.yaml: \d+ weight\(s\) missing, e.g. \['lm\."):
        load_checkpoint(c)
    # a diverged run's weights
    k = next(iter(state))
    save_file({**state, k: state[k] * float("nan")}, str(c / "model.safetensors"))
    with pytest.raises(LlavaGMError, match=r"1 weight\(s\) hold NaN or infinite values"):
        load_checkpoint(c)
    # a weight of the wrong shape
    k = next(k for k in state if k.startswith("projector.") and state[k].dim() == 2)
    save_file({**state, k: state[k][:1].contiguous()}, str(c / "model.safetensors"))
    with pytest.raises(LlavaGMError, match=f"{k} is float32 \\[1, "):
        load_checkpoint(c)
    for data, msg in ((b"", "cannot be read as safetensors"), ((Path(tiny_checkpoint) / "model.safetensors").read_bytes()[:1000],
                                                             "cannot be read as safetensors")):
        (c / "model.safetensors").write_bytes(data)
        with pytest.raises(LlavaGMError, match=msg):
            load_checkpoint(c)
    shutil.copy(Path(tiny_checkpoint) / "model.safetensors", c / "model.safetensors")
    (c / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(LlavaGMError, match="config.yaml: not valid YAML"):
        load_checkpoint(c)
    (c / "config.yaml").write_text(yaml.safe_dump({"history": []}))
    with pytest.raises(LlavaGMError, match="has no 'model:' section"):
        load_checkpoint(c)
    # a checkpoint written before manifests: at least the projector must be there
    old = {k: v for k, v in cfg.items() if k != "weights"}
    (c / "config.yaml").write_text(yaml.safe_dump(old))
    save_file({k: v for k, v in state.items() if not k.startswith("projector.")}, str(c / "model.safetensors"))
    with pytest.raises(LlavaGMError, match="projector weight\\(s\\) missing"):
        load_checkpoint(c)


# ---- 5. image modes through the model ------------------------------------------------------------------------


def test_16_bit_and_transparent_images_give_the_features_of_their_8_bit_equivalent(tmp_path, tiny_checkpoint):
    from llava_gm.infer import Answerer

    a8 = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    Image.fromarray(a8).convert("RGB").save(tmp_path / "grey8.png")
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    rgb = Image.new("RGB", (32, 32), (255, 255, 255))
    rgb.paste((30, 30, 220), (8, 8, 24, 24))
    rgb.save(tmp_path / "shape.png")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((30, 30, 220, 255), (8, 8, 24, 24))
    rgba.save(tmp_path / "shape-rgba.png")
    answerer = Answerer.from_checkpoint(tiny_checkpoint)
    f = answerer.image_features([tmp_path / n for n in ("grey8.png", "grey16.png", "shape.png", "shape-rgba.png")])
    assert f[0].equal(f[1]) and f[2].equal(f[3])


# ---- 6. settings ----------------------------------------------------------------------------------------------


def test_yaml_float_without_dot_and_ranges(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - name: align\n    lr: 5e-5\n")
    assert load_yaml(RecipeConfig, p).stages[0].lr == 5e-5
    for field, value, msg in (("lr", "-1", "lr must be a finite number > 0, not -1.0"), ("lr", ".nan", "lr must be a finite number > 0, not nan"),
                              ("epochs", "0", "epochs must be a finite number > 0"), ("batch_size", "0", "batch_size must be a finite number > 0"),
                              ("max_samples", "-5", "max_samples must be"), ("lr", "fast", "lr: expected a number, got 'fast'"),
                              ("batch_size", "true", "batch_size: expected int, got True"), ("betas", "[0.9, 1.0]", "betas must be")):
        p.write_text(f"stages:\n  - name: align\n    {field}: {value}\n")
        with pytest.raises(LlavaGMError, match=f"r.yaml.stages\\[0\\].{msg}".replace("(", "\\(").replace(")", "\\)").replace("[0.", "\\[0.")):
            load_yaml(RecipeConfig, p)
    p.write_text("- a list")
    with pytest.raises(LlavaGMError, match="expected a mapping of fields at the top"):
        load_yaml(RecipeConfig, p)


@pytest.mark.parametrize("flag,value", [("--max-samples", "0"), ("--max-samples", "-5"), ("--epochs", "0"), ("--epochs", "-1"),
                                        ("--batch-size", "0"), ("--grad-accum", "0"), ("--lr", "-1"), ("--lr", "nan")])
def test_train_flags_checked_before_any_work(tmp_path, capsys, flag, value):
    # the recipe does not even exist: the flag is refused before anything is read or built
    assert main(["train", "--recipe", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "o"), flag, value]) == 2
    assert f"{flag} must be a positive number, not" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ---- 7. bad bytes honour --on-bad ---------------------------------------------------------------------------------


def _bomb(path: Path) -> None:
    import struct
    import zlib

    raw = bytearray(io.BytesIO().getvalue())
    b = io.BytesIO()
    Image.new("L", (1, 1)).save(b, "PNG")
    raw = bytearray(b.getvalue())
    raw[16:24] = struct.pack(">II", 20000, 20000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


def _answer_rows(tmp_path, shapes_data, extra: list[bytes]) -> Path:
    folder = shapes_data.parent
    good = (folder / "images" / "0.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    _bomb(tmp_path / "bomb.png")
    lines = [json.dumps({"question_id": 0, "image": str(folder / "images" / "0.png"), "text": "what color is the shape?"}).encode(),
             json.dumps({"question_id": 1, "image": str(tmp_path / "trunc.png"), "text": "what color?"}).encode(),
             json.dumps({"question_id": 2, "image": str(tmp_path / "bomb.png"), "text": "what color?"}).encode(), *extra]
    q = tmp_path / "q.jsonl"
    q.write_bytes(b"\n".join(lines) + b"\n")
    return q


def test_answer_skips_bad_bytes_naming_file_and_row(tmp_path, tiny_checkpoint, shapes_data, capsys):
    extra = [b'{"question_id": 3, "text": "caf\xe9"}', b'{"question_id": 4, "image": 5, "text": "q"}', b'{"question_id": 5, "text": 5}',
             json.dumps({"question_id": 6, "text": "what color is it? " * 400}).encode()]
    q = _answer_rows(tmp_path, shapes_data, extra)
    out = tmp_path / "a.jsonl"
    args = ["answer", "--checkpoint", tiny_checkpoint, "--questions", str(q), "--output", str(out), "--max-new-tokens", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{q}:4: not UTF-8 text" in err and err.count("\n") <= 3  # one clear message, no traceback
    assert main(args + ["--on-bad", "skip"]) == 0
    err = capsys.readouterr().err
    assert "skipped 6 bad row(s)" in err
    for where, what in ((2, "trunc.png: image is truncated or corrupt"), (3, "bomb.png: image is over the"), (4, "not UTF-8"),
                        (5, "'image' must be a file name, not 5"), (6, "needs 'question_id' and a string 'text'")):
        assert f"{q}:{where}: " in err and what in err, (where, what, err)
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [0]


def test_answer_fail_names_the_row_of_a_truncated_image(tmp_path, tiny_checkpoint, shapes_data, capsys):
    q = _answer_rows(tmp_path, shapes_data, [])
    q.write_text("\n".join(q.read_text().splitlines()[:2]) + "\n")  # a good row and a truncated image
    out = tmp_path / "a.jsonl"
    assert main(["answer", "--checkpoint", tiny_checkpoint, "--questions", str(q), "--output", str(out), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{q}:2: {tmp_path / 'trunc.png'}: image is truncated" in err and "--resume continues it" in err
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [0]  # the good answer is kept


def test_question_past_the_token_limit_is_refused(tmp_path, tiny_checkpoint, capsys):
    assert main(["ask", "--checkpoint", tiny_checkpoint, "--question", "what color is the shape? " * 200]) == 2
    assert "--question: question is" in (err := capsys.readouterr().err) and "over the model's limit of 256 (language.max_length" in err
    assert main(["ask", "--checkpoint", tiny_checkpoint, "--question", "caf\udce9"]) == 2
    assert "--question is not valid UTF-8" in capsys.readouterr().err


def test_eval_skips_undecodable_images_and_non_utf8_rows(tmp_path):
    rows = [r for r in ROWS if r["text"] != "which shape?"]
    data = _easy(tmp_path, rows)
    (data.parent / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data.write_bytes(data.read_bytes() + b'{"question_id": 7, "image": "images/0.png", "text": "caf\xe9", "answer": "x"}\n'
                     + json.dumps({"question_id": 8, "image": 5, "text": "q", "answer": "no"}).encode() + b"\n"
                     + json.dumps({"question_id": 9, "image": "images/0.png", "text": 5, "answer": "no"}).encode() + b"\n")
    oracle = Oracle({f"<image>\n{r['text']}": r["answer"] for r in rows})
    with pytest.raises(LlavaGMError, match="not UTF-8"):
        evaluate(oracle, "easy_vqa", str(data), progress=False)
    r = evaluate(oracle, "easy_vqa", str(data), on_error="skip", progress=False)
    assert [p["question_id"] for p in r["predictions"]] == [0, 1] and r["metrics"]["accuracy"] == 100.0
    problems = {p["where"].rsplit(":", 1)[1]: p["problem"] for p in r["problems"]}
    assert "image must be a file name, not 5" in problems["5"] and "text must be a string" in problems["6"]
    assert "not UTF-8" in problems["4"] and "1.png: image is" in problems["3"]


def test_non_utf8_files_are_one_clear_error(tmp_path):
    from llava_gm.data.llava_json import read_rows

    p = tmp_path / "d.json"
    p.write_bytes(b'[{"id": "a", "conversations": []}]\n\xff\n')
    with pytest.raises(LlavaGMError, match=r"d.json:2: not UTF-8 text"):
        read_rows(p)
    y = tmp_path / "r.yaml"
    y.write_bytes(b"stages: \xff\n")
    with pytest.raises(LlavaGMError, match="not UTF-8"):
        load_yaml(RecipeConfig, y)
    data = samples.write_samples(tmp_path / "s")["vqav2"]
    f = Path(data) / "v2_OpenEnded_mscoco_val2014_questions.json"
    f.write_bytes(f.read_bytes().replace(b"dogs", b"d\xf6gs"))
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 10, "text": "2"}) + "\n")
    with pytest.raises(LlavaGMError, match="questions.json: not UTF-8 text"):
        score("vqav2", data, str(answers))
    f.write_bytes(f.read_bytes().replace(b"d\xf6gs", b"dogs"))
    answers.write_bytes(b'{"question_id": 10, "text": "2 d\xf6gs"}\n')
    with pytest.raises(LlavaGMError, match=r"a.jsonl:1: not UTF-8 text"):
        score("vqav2", data, str(answers))


# ---- 8. finished work is kept; nothing is overwritten unasked ---------------------------------------------------------


class Killed(Oracle):
    def __init__(self, truth, die_at_call):
        super().__init__(truth)
        self.die_at_call = die_at_call

    def answer(self, items, **kw):
        if self.calls + 1 == self.die_at_call:
            raise KeyboardInterrupt
        return super().answer(items, **kw)


def test_answer_writes_as_it_goes_and_resumes(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "text": f"q{i}"}) + "\n" for i in range(10)))
    truth = {f"q{i}": f"a{i}" for i in range(10)}
    out, whole = tmp_path / "a.jsonl", tmp_path / "whole.jsonl"
    answer_questions(None, q, "", whole, answerer=Oracle(truth), chunk=3)
    with pytest.raises(KeyboardInterrupt):
        answer_questions(None, q, "", out, answerer=Killed(truth, die_at_call=3), chunk=3)
    assert len(out.read_text().splitlines()) == 6  # two chunks were on disk before the kill
    with open(out, "a") as f:
        f.write('{"question_id": 6, "pro')  # a line torn by the kill
    with pytest.raises(LlavaGMError, match="already exists; pass --resume"):
        answer_questions(None, q, "", out, answerer=Oracle(truth), chunk=3)
    resumed = Oracle(truth)
    answer_questions(None, q, "", out, answerer=resumed, chunk=3, resume=True)
    assert out.read_text() == whole.read_text() and resumed.calls == 2  # only the 4 missing questions
    answer_questions(None, q, "", out, answerer=Oracle({}), chunk=3, overwrite=True)
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["?"] * 10
    with pytest.raises(LlavaGMError, match="answer from model 'other', not 'oracle'"):
        out.write_text(json.dumps({"question_id": 0, "text": "x", "model_id": "other"}) + "\n")
        answer_questions(None, q, "", out, answerer=Oracle(truth), resume=True)


def test_eval_refuses_to_overwrite_before_loading_anything(tmp_path, capsys):
    data = samples.write_samples(tmp_path)["easy_vqa"]
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert main(["eval", "--checkpoint", str(tmp_path / "no-such-ckpt"), "--task", "easy_vqa", "--data", data, "--output", str(out)]) == 2
    assert "r.json already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "{}"
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": "no"}) + "\n" for i in range(4)))
    assert main(["score", "--task", "easy_vqa", "--data", data, "--answers", str(answers), "--output", str(out)]) == 2
    assert main(["score", "--task", "easy_vqa", "--data", data, "--answers", str(answers), "--output", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["metrics"]["accuracy"] == 25.0
