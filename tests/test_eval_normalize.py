"""The VQA answer processors and soft accuracy on known cases (vqaEval.py and the EvalAI processor).

Expected values are what the official scripts return, worked out from their code: vqaEval.py of GT-Vision-Lab/VQA
(PythonEvaluationTools/vqaEvaluation/vqaEval.py) as it is since commit a013f00 (2021; read in the forks
st7ma784/VQA@7f14984 and mlej8/VQA@8056e52, which carry it unchanged) and as it was before (GT-Vision-Lab/VQA@c4e6a0e).
"""

import json

import pytest

from llava_gm.errors import LlavaGMError
from llava_gm.eval import samples
from llava_gm.eval.base import Question
from llava_gm.eval.normalize import (CONTRACTIONS, DEFAULT_VQA_SCORER, evalai_answer, leave_one_out_accuracy,
                                     process_punctuation, textvqa_accuracy, vqa_eval_answer, vqav2_accuracy)
from llava_gm.eval.runner import score
from llava_gm.eval.tasks import get_task


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),        # number word -> digit, final period dropped
    ("3,000", "3000"),              # a digit,digit comma makes every mark vanish
    ("The cat", "cat"),             # articles go
    ("an apple", "apple"),
    ("dont", "don't"),              # contraction map
    ("Yes!", "yes"),                # "!" becomes a space, then split/join
    ("3.5", "3.5"),                 # a period before a digit stays
    ("none", "0"),
    ("left / right", "left right"),  # a mark next to a space is deleted
    ("black/white", "black white"),  # otherwise it becomes a space
    ("  Ten\n", "10"),
    ("", ""),
])
def test_vqa_eval_normalisation(raw, expected):
    assert vqa_eval_answer(raw) == expected


def test_period_strip_count_quirk():
    # vqaEval passes re.UNICODE (32) as re.sub's count: only the first 32 periods go
    text = "a." * 40
    assert process_punctuation(text).count(".") == 8


def test_contraction_map_keeps_its_odd_entries():
    assert CONTRACTIONS["somebody'd"] == "somebodyd"
    assert CONTRACTIONS["youre"] == "you're"
    assert len(CONTRACTIONS) > 100


def test_leave_one_out_exact_values():
    others = ["x"] * 10
    assert leave_one_out_accuracy("a", ["a"] * 10) == 1.0                                  # all ten agree
    assert leave_one_out_accuracy("a", ["a"] + others[:9]) == pytest.approx(0.3)            # 9/10 * 1/3
    assert leave_one_out_accuracy("a", ["a"] * 2 + others[:8]) == pytest.approx(0.6)        # (2*1/3 + 8*2/3)/10
    assert leave_one_out_accuracy("a", ["a"] * 3 + others[:7]) == pytest.approx(0.9)        # (3*2/3 + 7)/10
    assert leave_one_out_accuracy("a", ["a"] * 4 + others[:6]) == 1.0
    assert leave_one_out_accuracy("a", others) == 0.0


OTHERS = ["woman", "boy"]

# (model answer, ten human answers, vqaEval.py since a013f00 = the default, vqaEval.py before a013f00)
VQA_CASES = [
    # the four cases of issue 12
    ("Tennis", ["tennis"] * 10, 0.0, 1.0),                      # humans agree: compared as is, case and all
    ("a kitchen", ["a kitchen"] * 10, 1.0, 0.0),                # ... so the article stays on both sides
    ("Man", ["a man"] * 3 + ["men"] * 3 + ["man"] * 2 + OTHERS, 1.0, 0.6),  # humans disagree: both sides processed
    ("oclock.", ["o'clock"] * 3 + ["oclock"] * 5 + ["noon"] * 2, 1.0, 0.9),  # "oclock" -> "o'clock" on both sides
    # newlines, tabs and outer spaces go from every answer, before the humans are compared with each other
    ("tennis\n", [" tennis"] * 10, 1.0, 0.0),
    ("Yes", ["yes"] * 5 + ["yes "] * 5, 0.0, 1.0),             # stripped, the humans agree: "Yes" != "yes"
    ("red\tcar", ["red car"] * 10, 1.0, 1.0),
    # digits and number words
    ("two", ["two"] * 10, 1.0, 0.0),
    ("two", ["2"] * 2 + ["two"] * 8, 1.0, 0.6),                 # every "two" -> "2" when the humans disagree
    ("Two dogs.", ["2 dogs"] * 10, 0.0, 1.0),
    ("Two dogs.", ["2 dogs"] * 9 + ["two dogs"], 1.0, 1.0),
    ("Ten", ["10"] * 3 + ["11"] * 7, 0.9, 0.9),
    ("3.5", ["3.5"] * 3 + ["3"] * 7, 0.9, 0.9),                 # a period before a digit stays
    ("3.5.", ["3.5"] * 3 + ["3"] * 7, 0.9, 0.9),                # ... a final one goes
    ("3,000", ["3000"] * 10, 0.0, 1.0),
    ("1,000", ["1000"] * 3 + ["100"] * 7, 0.9, 0.9),            # a digit,digit comma: every mark is deleted
    # articles
    ("beach", ["the beach"] * 8 + ["sand"] * 2, 1.0, 0.0),      # before a013f00 humans kept their articles
    ("An apple", ["apple"] * 10, 0.0, 1.0),
    ("a man", ["A man"] * 5 + ["a man"] * 5, 1.0, 0.0),         # case alone makes the humans disagree
    # contractions (the map turns the apostrophe-less spelling into the apostrophe one)
    ("don't", ["dont"] * 3 + ["no"] * 7, 0.9, 0.0),
    ("dont", ["don't"] * 10, 0.0, 1.0),
    ("12 o'clock", ["12 o'clock"] * 4 + ["noon"] * 6, 1.0, 1.0),  # an apostrophe is not punctuation here
    ("oclock", ["o'clock"] * 10, 0.0, 1.0),
    # punctuation: a mark next to a space is deleted, otherwise it becomes a space
    ("X-ray", ["x-ray"] * 3 + ["xray"] * 7, 0.9, 0.9),          # "x ray" on both sides
    ("x - ray", ["x-ray"] * 3 + ["xray"] * 7, 0.9, 0.9),        # "x  ray" -> "x ray"
    ("xray", ["x-ray"] * 3 + ["xray"] * 7, 1.0, 1.0),
    ("x-ray", ["x-ray"] * 10, 1.0, 0.0),
    ("left-hand", ["left-hand"] * 3 + ["right"] * 7, 0.9, 0.9),
    ("red, white", ["red white"] * 3 + ["red"] * 7, 0.9, 0.9),
    ("red,white", ["red white"] * 3 + ["red"] * 7, 0.9, 0.9),
    ("red", ["red!"] * 3 + ["blue"] * 7, 0.9, 0.0),             # "red!" -> "red " -> "red" (before: "red " kept its space)
    ("yes!", ["yes"] * 10, 0.0, 1.0),
    # soft accuracy over the ten leave-one-out subsets
    ("YES", ["yes"] * 9 + ["no"], 1.0, 1.0),
    ("Red", ["red"] + ["orange"] * 9, 0.3, 0.3),
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6, 0.6),
    ("", ["2 dogs"] * 10, 0.0, 0.0),                            # an empty answer scores nothing
]


@pytest.mark.parametrize("answer, humans, official, before_2021", VQA_CASES)
def test_vqav2_accuracy_known_answers(answer, humans, official, before_2021):
    assert vqav2_accuracy(answer, humans) == pytest.approx(official)
    assert vqav2_accuracy(answer, humans, "vqaEval-2021") == pytest.approx(official)
    assert vqav2_accuracy(answer, humans, "vqaEval-2016") == pytest.approx(before_2021)


def test_vqa_scorer_names():
    assert DEFAULT_VQA_SCORER == "vqaEval-2021"
    with pytest.raises(LlavaGMError, match="unknown VQA scorer 'vqaEval-2019'.*vqaEval-2021, vqaEval-2016"):
        vqav2_accuracy("a", ["a"] * 10, "vqaEval-2019")
    with pytest.raises(LlavaGMError, match="unknown VQA scorer"):
        get_task("vqav2", {"scorer": "latest"}).load("nowhere", None, None, None)


def test_vqav2_results_name_the_scorer(tmp_path):
    data = samples.vqav2_val(tmp_path / "vqa")
    answers = tmp_path / "answers.jsonl"
    rows = [{"question_id": 10, "text": "Two dogs."}, {"question_id": 11, "text": "Red"}, {"question_id": 20, "text": "yes!"}]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    today = score("vqav2", str(data), str(answers), output=str(tmp_path / "r.json"))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["metrics"]["scorer"] == "vqaEval-2021" and saved["options"] == {"scorer": "vqaEval-2021"}
    assert today["metrics"]["accuracy"] == pytest.approx(100 * (1 + 0.3 + 0.6) / 3)
    old = score("vqav2", str(data), str(answers), options={"scorer": "vqaEval-2016"})
    assert old["metrics"]["scorer"] == "vqaEval-2016" and old["options"]["scorer"] == "vqaEval-2016"
    assert old["metrics"]["accuracy"] == pytest.approx(today["metrics"]["accuracy"])  # these answers agree


def test_vqav2_scorer_option_changes_the_score():
    q = [Question(1, "", None, ["tennis"] * 10, {"answer_type": "other", "question_type": "what sport"}),
         Question(2, "", None, ["a kitchen"] * 10, {"answer_type": "other", "question_type": "what room"})]
    preds = {1: "Tennis", 2: "kitchen"}
    # the local score never applies the submission converter's EvalAI processing (which would lowercase "Tennis")
    today, per = get_task("vqav2").score(q, preds)
    assert today["scorer"] == "vqaEval-2021" and today["accuracy"] == 0 and per[1]["accuracy"] == 0
    old, _ = get_task("vqav2", {"scorer": "vqaEval-2016"}).score(q, preds)
    assert old["scorer"] == "vqaEval-2016" and old["accuracy"] == 50  # "tennis" == "tennis"; "kitchen" != "a kitchen"


def test_textvqa_results_name_the_scorer():
    q = [Question(1, "", None, ["Dakota"] * 10)]
    metrics, _ = get_task("textvqa").score(q, {1: "dakota"})
    assert metrics == {"scorer": "m4c_evaluator-EvalAI", "accuracy": 100.0}


def test_evalai_processor():
    assert evalai_answer("Two dogs.") == "2 dogs"
    assert evalai_answer("3,000") == "3000"
    assert evalai_answer("It's red?") == "it 's red"  # "'s" split off, "?" dropped
    assert evalai_answer("The Dakota") == "dakota"


def test_textvqa_accuracy_processes_both_sides():
    assert textvqa_accuracy("Dakota", ["dakota"] * 8 + ["dakota digital"] * 2) == 1.0
    assert textvqa_accuracy("23", ["23"] * 3 + ["twenty three"] + ["32"] * 6) == pytest.approx(0.9)
    assert textvqa_accuracy("The DAKOTA.", ["Dakota"] * 10) == 1.0
