"""easy-VQA as LLaVA data: captions from the answers, questions per conversation, train and test apart."""

import json

import pytest

pytest.importorskip("easy_vqa")

import random  # noqa: E402
from collections import Counter  # noqa: E402

from llava_gm.data.easy_vqa import (  # noqa: E402
    _describe, balance_yes_no, balanced_yes_no, build_easy_vqa, evaluation_subset, question_type, wording_rule_accuracy, yes_no_form)
from llava_gm.errors import LlavaGMError  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_easy_vqa(tmp_path_factory.mktemp("ev") / "easy-vqa", per_conversation=3, balance=True)


def _answers(instruct):
    return [(r["conversations"][k]["value"], r["conversations"][k + 1]["value"]) for r in instruct for k in range(0, len(r["conversations"]), 2)]


def test_splits_are_complete_and_apart(data):
    instruct = json.loads((data / "instruct.json").read_text())
    test = [json.loads(l) for l in (data / "test_questions.jsonl").read_text().splitlines()]
    qas = _answers(instruct)
    # the test split stays whole; training keeps every open question (38,575 minus the yes/no surplus)
    assert len(test) == 9673 and len(qas) == 20466
    assert sum(a not in ("yes", "no") for _, a in qas) == 10168
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


def test_every_description_agrees_with_every_answer_of_its_image():
    # "is no red shape present?" -> yes means red is absent: format 2 read it as present (11% of captions wrong)
    from llava_gm.data.easy_vqa import COLORS, SHAPES, _load

    assert _describe([("is no yellow shape present?", "yes"), ("what shape is present?", "circle")]) == (None, "circle")
    assert _describe([("is no teal shape present?", "no")]) == ("teal", None)
    for split in ("train", "test"):
        per_image, _ = _load(split)
        for qas in per_image.values():
            color, shape = _describe(qas)
            for q, a in qas:
                if a not in ("yes", "no"):
                    continue
                negated, form = yes_no_form(q)
                named = next(w for w in q.rstrip("?").split() if w in (COLORS if form == "color" else SHAPES))
                known = color if form == "color" else shape
                if known is not None:
                    assert ((a == "yes") != negated) == (named == known), (q, a, color, shape)


def test_data_of_an_older_format_is_rebuilt(tmp_path):
    old = build_easy_vqa(tmp_path / "ev")
    (old / "build.json").write_text(json.dumps({"format": 2, "seed": 0, "per_conversation": 1, "balance": False}))
    (old / "align.json").write_text("[]")
    assert len(json.loads((build_easy_vqa(tmp_path / "ev") / "align.json").read_text())) > 3900


def test_training_yes_no_answers_are_balanced_per_question_form(data):
    qas = _answers(json.loads((data / "instruct.json").read_text()))
    counts = Counter((yes_no_form(q.replace("<image>", "")), a) for q, a in qas if a in ("yes", "no"))
    forms = {f for f, _ in counts}
    assert len(forms) == 4 and all(counts[(f, "yes")] == counts[(f, "no")] for f in forms)
    assert yes_no_form("is there not a red shape?") == (True, "color") and yes_no_form("is a circle present?") == (False, "shape")


def test_balance_keeps_the_minority_and_open_questions():
    items = [(i, "is there a red shape?", "no") for i in range(7)] + [(7, "is there a red shape?", "yes")]
    items += [(8, "what is the shape?", "circle"), (9, "is no circle present?", "yes")]
    kept = balance_yes_no(items, random.Random(0))
    assert Counter(a for _, _, a in kept) == Counter({"no": 1, "yes": 1, "circle": 1})  # the unpaired "yes" has no partner


def test_a_folder_built_with_other_settings_is_an_error_not_reused(data):
    with pytest.raises(LlavaGMError, match="other settings"):
        build_easy_vqa(data, per_conversation=3)  # unbalanced (the default) is another build
    assert build_easy_vqa(data, per_conversation=3, balance=True) == data


def test_wording_rule_is_the_bar_for_yes_no(data, tmp_path):
    rows = [{"text": "is there not a red shape?", "answer": "yes"}, {"text": "is there a circle?", "answer": "yes"},
            {"text": "is no blue shape present?", "answer": "no"}, {"text": "is a circle present?", "answer": "no"},
            {"text": "what is the shape?", "answer": "circle"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert wording_rule_accuracy(tmp_path / "q.jsonl") == 50.0
    # on easy-VQA's test split the rule answers 5,890 of 7,136 yes/no questions right without an image
    assert round(wording_rule_accuracy(data / "test_questions.jsonl"), 2) == 82.54


def test_balanced_yes_no_part_takes_the_first_k_of_each_answer_per_form():
    rows = [{"text": t, "answer": a, "id": i} for i, (t, a) in enumerate([
        ("is there a red shape?", "no"), ("is there a blue shape?", "no"), ("is there a teal shape?", "yes"),
        ("is there not a circle?", "yes"), ("what is the shape?", "circle"), ("is there a gray shape?", "yes"),
        ("is there a green shape?", "no")])]
    assert [r["id"] for r in balanced_yes_no(rows)] == [0, 1, 2, 5]  # colour form: 2 yes, 2 no; negated shape has no "no"
    assert [r["id"] for r in balanced_yes_no(rows, per_answer=1)] == [0, 2]
    assert [r["id"] for r in evaluation_subset(rows, natural=2, per_answer=1)] == [0, 1, 2]


def test_on_the_balanced_test_part_the_wording_scores_exactly_half(data):
    from llava_gm.eval.runner import evaluate

    rows = [json.loads(line) for line in (data / "test_questions.jsonl").read_text().splitlines()]
    part = balanced_yes_no(rows)
    assert len(part) == 2 * (307 + 319 + 312 + 308)  # per form the smaller answer count, twice
    assert Counter(r["answer"] for r in part) == Counter({"yes": 1246, "no": 1246})
    subset = evaluation_subset(rows, natural=600, per_answer=64)
    assert len(subset) == 824 and subset[:10] == rows[:10]

    class WordingRule:  # negated -> yes, else no: never looks at the image
        def answer(self, items, **kw):
            return ["yes" if yes_no_form(it["prompt"])[0] else "no" for it in items]

    (data / "subset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in subset))
    m = evaluate(WordingRule(), "easy_vqa", str(data / "subset.jsonl"), progress=False)["metrics"]
    assert m["yes_no_balanced"] == 50.0 and m["yes_no_balanced_questions"] == len(balanced_yes_no(subset)) >= 512
    assert m["per_type"]["yes_no"] > 50.0  # on the natural mix the same rule looks better than chance
