"""Answer normalisation and soft accuracy as the official VQA tools do them, quirks included.

Two processors exist:
- vqaEval.py, the VQA API's scorer (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), for
  VQAv2 val. Two versions matter (`VQA_SCORERS`):
  * "vqaEval-2021" (the default; the file as it is since commit a013f00 "Fixed processing answers bug", 2021):
    newlines/tabs/outer spaces go from the model's answer and every human answer; only when the ten humans
    disagree are BOTH sides put through processPunctuation and processDigitArticle; when they all agree the
    stripped strings are compared as they are (no lowercasing, no digit or article mapping).
  * "vqaEval-2016" (the file before a013f00, kept to compare with old numbers): the model's answer is always
    fully processed; humans' answers are never stripped, and get processPunctuation only when they disagree.
- `evalai_answer`: the EvalAI answer processor (MMF / LLaVA's llava/eval/m4c_evaluator.py), used for
  TextVQA and for LLaVA's VQAv2 submission files. It lowercases and drops commas and "?" first.

The quirks are kept on purpose (matching the scripts is the point): the period regex's lookbehind is
misspelt as a lookahead, `re.sub` is passed `re.UNICODE` as its *count* (32 replacements at most), and
the contraction map has a few odd entries ("somebody'd" -> "somebodyd").
"""

from __future__ import annotations

import re
from typing import Callable

from ..errors import LlavaGMError

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so any "." not before a digit goes
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # vqaEval.py
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")  # m4c_evaluator.py
_SUB_COUNT = int(re.UNICODE)  # sic: the scripts pass re.UNICODE (32) where re.sub expects count

# The contraction map both scripts share: answers written without apostrophes get them back.
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|havent haven't
hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm
Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't
notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've
shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've
somebodyll somebody'll|somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd|thered've there'd've
there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've
theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll
whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've
yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've
youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_PAIRS.replace("\n", "|").split("|") if pair)


def process_punctuation(text: str, comma_strip: re.Pattern = COMMA_STRIP) -> str:
    """A mark next to a space (or any text with a digit,digit comma) is deleted; otherwise it becomes a space."""
    out = text
    drop_all = comma_strip.search(text) is not None
    for p in PUNCTUATION:
        if drop_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, _SUB_COUNT)


def process_digit_article(text: str) -> str:
    """Lowercase, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def strip_answer(answer: str) -> str:
    """vqaEval.py's first step: newlines and tabs become spaces, outer spaces go."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_eval_answer(answer: str) -> str:
    """An answer through vqaEval.py's full processing (strip, processPunctuation, processDigitArticle)."""
    return process_digit_article(process_punctuation(strip_answer(answer)))


def evalai_answer(answer: str) -> str:
    """EvalAIAnswerProcessor.__call__ (m4c_evaluator.py): for TextVQA and VQAv2 submissions."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer, EVALAI_COMMA_STRIP))


def leave_one_out_accuracy(answer: str, humans: list[str]) -> float:
    """min(1, #other humans who gave `answer` / 3), averaged over the subsets that leave one human out."""
    if not humans:
        return 0.0
    same = sum(h == answer for h in humans)
    # leaving out a matching human leaves same-1 matches, leaving out another leaves `same`
    return sum(min(1.0, (same - (h == answer)) / 3) for h in humans) / len(humans)


def vqa_eval_2021_accuracy(prediction: str, humans: list[str]) -> float:
    """vqaEval.py since a013f00: both sides stripped; both processed only when the humans disagree."""
    res, gts = strip_answer(prediction), [strip_answer(h) for h in humans]
    if len(set(gts)) > 1:
        res, gts = vqa_eval_answer(res), [vqa_eval_answer(h) for h in gts]
    return leave_one_out_accuracy(res, gts)


def vqa_eval_2016_accuracy(prediction: str, humans: list[str]) -> float:
    """vqaEval.py before a013f00: the model answer fully processed; humans' answers, unstripped, get the
    punctuation step only, and only if they differ."""
    res = vqa_eval_answer(prediction)
    gts = [process_punctuation(h) for h in humans] if len(set(humans)) > 1 else list(humans)
    return leave_one_out_accuracy(res, gts)


DEFAULT_VQA_SCORER = "vqaEval-2021"
VQA_SCORERS: dict[str, Callable[[str, list[str]], float]] = {
    "vqaEval-2021": vqa_eval_2021_accuracy,  # GT-Vision-Lab/VQA vqaEval.py at a013f00 (2021) and after
    "vqaEval-2016": vqa_eval_2016_accuracy,  # the same file before a013f00
}


def vqa_scorer(name: str) -> Callable[[str, list[str]], float]:
    if name not in VQA_SCORERS:
        raise LlavaGMError(f"unknown VQA scorer {name!r}; one of {', '.join(VQA_SCORERS)} "
                           f"(default {DEFAULT_VQA_SCORER}, the official vqaEval.py today)")
    return VQA_SCORERS[name]


def vqav2_accuracy(prediction: str, humans: list[str], scorer: str = DEFAULT_VQA_SCORER) -> float:
    """One question's VQAv2 accuracy (0..1) under the named vqaEval.py version."""
    return vqa_scorer(scorer)(prediction, humans)


TEXTVQA_SCORER = "m4c_evaluator-EvalAI"  # LLaVA's eval_textvqa.py: TextVQAAccuracyEvaluator + EvalAIAnswerProcessor


def textvqa_accuracy(prediction: str, humans: list[str]) -> float:
    """m4c_evaluator.TextVQAAccuracyEvaluator: both sides through the EvalAI processor."""
    gts = [evalai_answer(h) for h in humans]
    return leave_one_out_accuracy(evalai_answer(prediction), gts)
