"""The VQA answer processors and soft accuracy on known cases (vqaEval.py and the EvalAI processor)."""

import pytest

from llava_gm.eval.normalize import (CONTRACTIONS, evalai_answer, leave_one_out_accuracy, process_punctuation,
                                     textvqa_accuracy, vqa_eval_answer, vqav2_accuracy)


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


def test_vqav2_accuracy_cases():
    assert vqav2_accuracy("Two dogs.", ["2 dogs"] * 10) == 1.0
    assert vqav2_accuracy("3,000", ["3000"] * 10) == 1.0
    assert vqav2_accuracy("", ["2 dogs"] * 10) == 0.0  # an empty answer scores nothing
    assert vqav2_accuracy("Red", ["red"] + ["orange"] * 9) == pytest.approx(0.3)
    assert vqav2_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # humans' answers are not digit-mapped: "two" by three humans never matches the model's "2"
    assert vqav2_accuracy("two", ["two"] * 10) == 0.0
    # disagreeing humans get the punctuation step ("left-hand" -> "left hand") ...
    assert vqav2_accuracy("left-hand", ["left-hand"] * 3 + ["right"] * 7) == pytest.approx(0.9)
    # ... unanimous ones do not, so the processed model answer "left hand" misses them (vqaEval.py as is)
    assert vqav2_accuracy("left-hand", ["left-hand"] * 10) == 0.0
    assert vqav2_accuracy("red", ["red!"] * 3 + ["blue"] * 7) == 0.0  # "red!" -> "red " keeps its space


def test_evalai_processor():
    assert evalai_answer("Two dogs.") == "2 dogs"
    assert evalai_answer("3,000") == "3000"
    assert evalai_answer("It's red?") == "it 's red"  # "'s" split off, "?" dropped
    assert evalai_answer("The Dakota") == "dakota"


def test_textvqa_accuracy_processes_both_sides():
    assert textvqa_accuracy("Dakota", ["dakota"] * 8 + ["dakota digital"] * 2) == 1.0
    assert textvqa_accuracy("23", ["23"] * 3 + ["twenty three"] + ["32"] * 6) == pytest.approx(0.9)
    assert textvqa_accuracy("The DAKOTA.", ["Dakota"] * 10) == 1.0
