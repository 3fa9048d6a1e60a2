"""easy-VQA as LLaVA data: captions from the answers, questions per conversation, train and test apart."""

import json

import pytest

pytest.importorskip("easy_vqa")

from llava_gm.data.easy_vqa import _describe, build_easy_vqa, question_type  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_easy_vqa(tmp_path_factory.mktemp("ev") / "easy-vqa", per_conversation=3)


def test_splits_are_complete_and_apart(data):
    instruct = json.loads((data / "instruct.json").read_text())
    test = [json.loads(l) for l in (data / "test_questions.jsonl").read_text().splitlines()]
    assert len(test) == 9673 and sum(len(r["conversations"]) // 2 for r in instruct) == 38575
    assert all(r["image"].startswith("images/train/") for r in instruct)
    assert all(q["image"].startswith("images/test/") for q in test)
    assert len({q["image"] for q in test}) == 1000 and (data / test[0]["image"]).is_file()
    assert {q["type"] for q in test} == {"yes_no", "shape", "color"}


def test_conversations_pack_questions_and_tag_the_image_once(data):
    instruct = json.loads((data / "instruct.json").read_text())
    assert max(len(r["conversations"]) for r in instruct) == 6  # 3 questions per conversation
    for r in instruct[:200]:
        texts = [t["value"] for t in r["conversations"]]
        assert texts[0].startswith("<image>\n") and sum("<image>" in t for t in texts) == 1
        assert all(question_type(a) in ("yes_no", "shape", "color") for a in texts[1::2])


def test_captions_agree_with_the_answers(data):
    align = json.loads((data / "align.json").read_text())
    assert len(align) > 3900
    assert _describe([("what is the blue shape?", "circle"), ("is there not a red shape?", "yes")]) == (None, "circle")
    assert _describe([("is there a red shape?", "yes"), ("does the image not contain a triangle?", "no")]) == ("red", "triangle")
    assert all(r["conversations"][1]["value"].startswith("A ") for r in align[:50])
