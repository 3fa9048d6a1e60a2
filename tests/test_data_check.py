"""`llava-gm data check`: a folder of good and bad images and rows, every problem found and named, exit code."""

import json

import pytest
from PIL import Image

import tiny
from llava_gm.cli import main
from llava_gm.data.check import check_dataset
from llava_gm.data.conversation import ConversationEncoder

Q = "<image>\nwhat color is the shape?"


def _row(i, image, q=Q, a="red"):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("check")
    (d / "img").mkdir()
    tiny.draw_shape("red", "circle").save(d / "img" / "good.png")
    tiny.draw_shape("blue", "triangle").save(d / "img" / "good2.jpg")
    full = (d / "img" / "good.png").read_bytes()
    (d / "img" / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "img" / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (d / "img" / "empty.png").write_bytes(b"")
    Image.new("L", (10000, 9000)).save(d / "img" / "huge.png")  # 90 Mpx: over the decompression-bomb limit
    rows = [
        _row(0, "img/good.png"),
        _row(1, "img/good2.jpg"),
        _row(2, "img/good.png"),  # an image shared by two rows is decoded once
        _row(3, "img/missing.png"),
        _row(4, "img/truncated.png"),
        _row(5, "img/garbage.png"),
        _row(6, "img/empty.png"),
        _row(7, "img/huge.png"),
        _row(8, "img/good.png", q="what color is the shape?"),  # an image but no <image> tag
        _row(9, None),  # <image> tag but no image
        _row(10, "img/good.png", q="<image>\n<image>\ntwo tags"),
        {"id": "r11", "conversations": [{"from": "gpt", "value": "starts with the model"}, {"from": "human", "value": "?"}]},
        {"id": "r12"},
        _row(13, "img/good.png", a="red " * 200),  # far over max_length once rendered
        _row(14, None, q="a text-only question", a="fine"),
    ]
    path = d / "data.json"
    path.write_text(json.dumps(rows))
    return path


EXPECTED = {  # row -> kind
    3: "missing_image", 4: "truncated_image", 5: "unreadable_image", 6: "unreadable_image", 7: "oversized_image",
    8: "structure", 9: "structure", 10: "structure", 11: "structure", 12: "structure", 13: "too_long",
}


def test_every_problem_found_and_named(dataset, tiny_lm_dir):
    from llava_gm.backbones.language import load_tokenizer

    encoder = ConversationEncoder(load_tokenizer(str(tiny_lm_dir)), num_image_tokens=16, max_length=128)
    report = check_dataset(dataset, "", encoder, workers=2, progress=False)
    found = {p.row: p.kind for p in report.problems}
    assert found == EXPECTED
    assert report.rows == 15 and report.bad_rows == len(EXPECTED)
    assert report.images == 7  # distinct files named by rows that have an image field
    by_row = {p.row: p for p in report.problems}
    assert "missing.png" in by_row[3].message and by_row[3].id == "r3"
    assert "r13" in by_row[13].message and "over the limit of 128" in by_row[13].message
    # lengths come from the chat template: the longest is the over-long row
    assert report.lengths["over_limit"] == 1 and report.lengths["max"] > 128 >= report.lengths["median"]
    # same answer in one process
    assert {p.row: p.kind for p in check_dataset(dataset, "", encoder, workers=1, progress=False).problems} == EXPECTED


def test_without_recipe_no_lengths(dataset):
    report = check_dataset(dataset, "", None, workers=1, progress=False)
    assert {p.row: p.kind for p in report.problems} == {k: v for k, v in EXPECTED.items() if v != "too_long"}
    assert report.max_length is None and "lengths not checked" in report.summary()


def test_cli_report_and_exit_code(dataset, tiny_lm_dir, tiny_vision_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  vision: {{name: '{tiny_vision_dir}'}}\n  language: {{name: '{tiny_lm_dir}', max_length: 128}}\n")
    out = tmp_path / "report.json"
    code = main(["data", "check", str(dataset), "--recipe", str(recipe), "--report", str(out), "--workers", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code != 0
    assert f"{len(EXPECTED)} of 15 rows" in captured.err and "Traceback" not in captured.err
    rep = json.loads(out.read_text())
    assert {p["row"]: p["kind"] for p in rep["problems"]} == EXPECTED
    assert rep["counts"]["structure"] == 5 and rep["counts"]["too_long"] == 1
    # a clean file passes with exit code 0
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([_row(0, "img/good.png"), _row(1, "img/good2.jpg")]))
    assert main(["data", "check", str(clean), "--image-folder", str(dataset.parent), "--recipe", str(recipe), "--no-progress"]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_unreadable_file_is_one_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert main(["data", "check", str(bad), "--no-progress"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
