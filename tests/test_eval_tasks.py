"""Every task end to end from files in its official layout: `evaluate` with a fake answerer, `score` of an answer
file, the results JSON, submission files, data problems (fail vs skip), limits, the summary table and the CLI."""

import argparse
import json
import re
import zipfile
from pathlib import Path

import pytest

from llava_gm.errors import LlavaGMError
from llava_gm.eval import TASKS, evaluate, score, write_summary
from llava_gm.eval import samples
from llava_gm.eval.cli import add_commands


class FakeAnswerer:
    """The Answerer interface, answering by a rule on the prompt."""

    model_id = "fake-model"
    checkpoint_hash = "0123456789abcdef"

    def __init__(self, rule=lambda prompt: "yes", logprob=None, image_rule=None):
        self.rule, self.logprob, self.image_rule, self.calls = rule, logprob, image_rule, []

    def answer(self, items, max_new_tokens=16, temperature=0.0, batch_size=32, progress=True):
        self.calls.append({"n": len(items), "max_new_tokens": max_new_tokens, "batch_size": batch_size})
        for it in items:
            assert ("<image>" in it["prompt"]) == (it["image"] is not None)
        if self.image_rule:
            return [self.image_rule(it["prompt"], str(it["image"])) for it in items]
        return [self.rule(it["prompt"]) for it in items]

    def loglikelihood(self, pairs, batch_size=16):
        return [self.logprob(c, x) for c, x in pairs]

    def perplexity(self, text, stride=512):
        self.stride = stride
        return 12.5


def ask(prompt):
    """The question line of a prompt (after the image tag)."""
    return prompt.split("\n")[1]


# ---- answers that produce known scores for each sample set ---------------------------------------------------

VQAV2 = {"How many dogs are there?": "Two dogs.", "What color is the frisbee?": "Red", "Is it raining?": "Yes"}


def test_vqav2_val(tmp_path):
    data = samples.vqav2_val(tmp_path / "vqa")
    r = evaluate(FakeAnswerer(lambda p: VQAV2[ask(p)]), "vqav2", str(data), output=str(tmp_path / "out" / "vqa.json"))
    m = r["metrics"]
    assert m["accuracy"] == pytest.approx(100 * (1 + 0.3 + 0.6) / 3)
    assert m["per_answer_type"] == pytest.approx({"number": 100, "other": 30, "yes/no": 60})
    saved = json.loads((tmp_path / "out" / "vqa.json").read_text())
    for field in ("task_version", "split", "prompt_template", "metric_variant", "official_script", "decoding", "checkpoint_hash"):
        assert saved[field], field
    assert saved["split"] == "val2014" and saved["checkpoint_hash"] == "0123456789abcdef"
    assert saved["decoding"]["strategy"] == "greedy" and saved["decoding"]["max_new_tokens"] == 128  # LLaVA loader default
    assert {p["question_id"]: p["text"] for p in saved["predictions"]} == {10: "Two dogs.", 11: "Red", 20: "Yes"}
    # the answer file it wrote scores the same without a model
    again = score("vqav2", str(data), saved["outputs"]["answers"])
    assert again["metrics"]["accuracy"] == pytest.approx(m["accuracy"])


def test_vqav2_testdev_submission(tmp_path):
    data = samples.vqav2_testdev(tmp_path / "vqa")
    r = evaluate(FakeAnswerer(lambda p: "Two cats."), "vqav2", str(data), output=str(tmp_path / "o.json"), split="test-dev2015")
    assert r["metrics"] == {"scored_on_server": True} and r["headline"] == {"VQAv2": None}
    sub = json.loads(Path(r["outputs"]["submission"][0]).read_text())
    # every test2015 question, EvalAI-processed answers, "" for the one not in test-dev (as LLaVA's converter)
    assert sub == [{"question_id": 100, "answer": "2 cats"}, {"question_id": 101, "answer": "2 cats"},
                   {"question_id": 102, "answer": ""}]
    with pytest.raises(LlavaGMError, match="--split"):  # two question files: the split must be named
        evaluate(FakeAnswerer(), "vqav2", str(data))


def test_gqa(tmp_path):
    data = samples.gqa(tmp_path / "gqa")
    rule = {"What color is the car?": "Red.", "Is the sky blue?": "Yes"}
    r = evaluate(FakeAnswerer(lambda p: rule[ask(p)]), "gqa", str(data), output=str(tmp_path / "g.json"))
    assert r["n_questions"] == 2 and r["metrics"]["accuracy"] == 100  # the unbalanced question is not scored
    preds = json.loads(Path(r["outputs"]["submission"][0]).read_text())
    assert preds == [{"questionId": "201", "prediction": "red"}, {"questionId": "202", "prediction": "yes"}]


def test_scienceqa_img(tmp_path):
    data = samples.scienceqa(tmp_path / "sqa")
    fake = FakeAnswerer(lambda p: "B" if "mammal" in p else "The answer is B.")
    r = evaluate(fake, "scienceqa_img", str(data))
    assert r["n_questions"] == 2  # the text-only test question is not part of ScienceQA-IMG
    assert r["metrics"]["img_accuracy"] == 50
    prompt = r["predictions"][0]["prompt"]
    assert prompt == ("<image>\nContext: Look at the animals.\nWhich is a mammal?\nA. frog\nB. whale\nC. shark\n"
                      "Answer with the option's letter from the given choices directly.")
    # a LLaVA answer file over the whole test split: the text-only answer is ignored and counted
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": "1", "text": "B"}, {"question_id": "2", "text": "B"}, {"question_id": "3", "text": "A"}]))
    s = score("scienceqa_img", str(data), str(answers))
    assert s["metrics"]["img_accuracy"] == 100 and s["answer_rows"]["ignored_not_in_task"] == 1


POPE = {"dog": "Yes.", "car": "No, there is not", "person": "yes", "chair": "Yes", "frisbee": "No", "cat": "no"}


def test_pope(tmp_path):
    data = samples.pope(tmp_path / "pope")
    r = evaluate(FakeAnswerer(lambda p: POPE[re.search(r"Is there an? (\w+)", p).group(1)]), "pope", str(data))
    s = r["metrics"]["per_split"]
    assert s["random"]["accuracy"] == 100 and s["random"]["f1"] == 100 and s["random"]["yes_ratio"] == 50
    assert s["popular"]["precision"] == 50 and s["popular"]["f1"] == pytest.approx(200 / 3)
    assert s["adversarial"]["f1"] == 0 and s["adversarial"]["yes_ratio"] == 0
    assert r["metrics"]["mean_f1"] == pytest.approx((100 + 200 / 3 + 0) / 3)
    assert r["headline"]["POPE-Acc"] == pytest.approx(200 / 3)
    one = evaluate(FakeAnswerer(), "pope", str(data), split="adversarial")
    assert one["n_questions"] == 2 and list(one["metrics"]["per_split"]) == ["adversarial"]


def mme_rule(p, image):
    right = "No" if "about nothing" in p else "Yes"
    if "/existence/" in image and right == "No":
        return "Maybe"  # "other": wrong
    if "/count/" in image and right == "Yes":
        return "No"
    return right


def test_mme(tmp_path):
    data = samples.mme(tmp_path)
    r = evaluate(FakeAnswerer(image_rule=mme_rule), "mme", str(data), output=str(tmp_path / "mme.json"))
    m = r["metrics"]
    assert m["subtasks"]["existence"]["score"] == 50 and m["subtasks"]["count"]["score"] == 50
    assert m["perception"] == 8 * 200 + 50 + 50 and m["cognition"] == 800 and m["complete"]
    assert r["predictions"][0]["prompt"].endswith("Is this about existence?\nAnswer the question using a single word or phrase.")
    # LLaVA answer files give both questions of an image one id and tell them apart by the prompt
    rows = [{"question_id": p["question_id"].split("#")[0], "prompt": p["prompt"].replace("<image>\n", ""), "text": p["text"]}
            for p in r["predictions"]]
    (tmp_path / "llava.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    s = score("mme", str(data), str(tmp_path / "llava.jsonl"))
    assert s["metrics"]["perception"] == m["perception"] and s["metrics"]["cognition"] == 800


def test_mme_missing_subtask_is_a_problem(tmp_path):
    data = samples.mme(tmp_path)
    import shutil

    shutil.rmtree(Path(data) / "OCR")
    with pytest.raises(LlavaGMError, match="OCR is missing"):
        evaluate(FakeAnswerer(), "mme", str(data))
    r = evaluate(FakeAnswerer(), "mme", str(data), on_error="skip")
    assert r["n_problems"] == 1 and r["metrics"]["complete"] is False
    r = evaluate(FakeAnswerer(), "mme", str(data), options={"subtasks": "existence,count"})
    assert r["n_questions"] == 4 and r["n_problems"] == 0


def mmbench_rule(p):
    opts = dict(re.findall(r"\n([A-D])\. ([^\n]+)", p))
    if opts.get("A") == "a fish":  # the fourth rotation of question 0 goes wrong
        return "A"
    want = "a dog" if "a dog" in opts.values() else "yes"
    return next(k for k, v in opts.items() if v == want)


@pytest.mark.parametrize("in_file", [False, True])
def test_mmbench_circular(tmp_path, in_file):
    data = samples.mmbench(tmp_path, rotations_in_file=in_file)
    r = evaluate(FakeAnswerer(mmbench_rule), "mmbench", str(data))
    m = r["metrics"]
    assert r["info"]["circular_rows"] == ("file" if in_file else "generated")
    assert m["rows"] == 6 and m["questions"] == 2
    assert m["circular_accuracy"] == 50 and m["vanilla_accuracy"] == 100  # q0 right in 3 of 4 rotations: wrong
    assert m["per_category"]["category/image_scene"] == 0 and m["per_category"]["category/spatial_relationship"] == 100
    first = next(p for p in r["predictions"] if p["question_id"] == 1)
    assert first["prompt"] == ("<image>\nLook up.\nIs the sky above?\nA. yes\nB. no\n"
                               "Answer with the option's letter from the given choices directly.")


def test_mmbench_test_submission(tmp_path):
    data = samples.mmbench(tmp_path, name="MMBench_TEST_EN.tsv", answers=False)
    r = evaluate(FakeAnswerer(lambda p: "B"), "mmbench", str(data), output=str(tmp_path / "o.json"))
    assert r["metrics"] == {"scored_on_server": True} and r["split"] == "dev"  # the split column says dev here
    xlsx = Path(r["outputs"]["submission"][0])
    with zipfile.ZipFile(xlsx) as z:
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
    header = re.findall(r"<t xml:space=\"preserve\">([^<]*)</t>", sheet)[:8]
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "split"]
    assert sheet.count("<row ") == 3 and ">B</t>" in sheet
    openpyxl = pytest.importorskip("openpyxl")
    rows = list(openpyxl.load_workbook(xlsx).active.values)
    assert rows[0][:7] == ("index", "question", "A", "B", "C", "D", "prediction") and rows[1][0] == 0


def test_textvqa(tmp_path):
    data = samples.textvqa(tmp_path / "tv")
    rule = {"what brand is the camera?": "Dakota", "what number is on the jersey?": "23"}
    r = evaluate(FakeAnswerer(lambda p: rule[ask(p)]), "textvqa", str(data))
    assert r["metrics"]["accuracy"] == pytest.approx(95)
    assert r["info"]["ocr_tokens_in_prompt"] is True
    assert r["predictions"][0]["prompt"] == ("<image>\nwhat brand is the camera?\nReference OCR token: dakota, digital\n"
                                             "Answer the question using a single word or phrase.")
    no_ocr = evaluate(FakeAnswerer(lambda p: rule[ask(p)]), "textvqa", str(data), options={"ocr": "false"})
    assert "Reference OCR token" not in no_ocr["predictions"][0]["prompt"] and no_ocr["options"]["ocr"] is False
    # LLaVA's answer files name the image in question_id; the question comes from the prompt
    rows = [{"question_id": "aa01", "prompt": "what brand is the camera?\nReference OCR token: dakota, digital\n"
             "Answer the question using a single word or phrase.", "text": "dakota"},
            {"question_id": 34603, "text": "twenty three"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    s = score("textvqa", str(data), str(tmp_path / "a.jsonl"))
    assert s["metrics"]["accuracy"] == pytest.approx((1 + 0.3) / 2 * 100)


def test_mmvp(tmp_path):
    data = samples.mmvp(tmp_path / "mmvp")
    answers = iter(["A", "(b)", "B", "B"])  # the last is wrong: pair 2 fails
    r = evaluate(FakeAnswerer(lambda p: next(answers)), "mmvp", str(data), batch_size=1)
    assert r["metrics"]["question_accuracy"] == 75 and r["metrics"]["pair_accuracy"] == 50
    assert r["predictions"][0]["prompt"].startswith("<image>\nIs the door open or closed?\nA. Open\nB. Closed\n")


def test_easy_vqa(tmp_path):
    data = samples.easy_vqa(tmp_path / "ev")
    rule = {"what is the red shape?": "Triangle.", "what color is the shape?": "RED", "is there a circle?": "No",
            "is there a blue shape?": "no"}
    r = evaluate(FakeAnswerer(lambda p: rule[ask(p)]), "easy_vqa", str(data))
    assert r["metrics"]["accuracy"] == 75
    assert r["metrics"]["per_type"] == {"yes_no": 50, "shape": 100, "color": 100}


def test_easy_vqa_from_the_package(tmp_path):
    pytest.importorskip("easy_vqa")
    r = evaluate(FakeAnswerer(lambda p: "yes"), "easy_vqa", "easy_vqa:test", limit=20)
    assert r["n_questions"] == 20 and r["split"] == "test" and set(r["metrics"]["per_type"]) <= {"yes_no", "shape", "color"}


def test_lang_mc(tmp_path):
    data = samples.lang_mc(tmp_path)
    gold = {" yes", " Put the pot on the stove.", " B", " green"}  # the generic row's answer is "blue": wrong
    fake = FakeAnswerer(logprob=lambda ctx, cont: 0.0 if cont in gold else -1.0)
    r = evaluate(fake, "lang_mc", str(data), output=str(tmp_path / "mc.json"))
    assert r["metrics"]["acc"] == 75 and r["metrics"]["acc_norm"] == 75
    assert r["info"]["formats"] == ["boolq", "generic", "mmlu", "piqa"]
    assert r["headline"] == {"lang": 75} and r["decoding"]["method"].startswith("sum log-likelihood")
    mmlu = next(p for p in r["predictions"] if p["question_id"] == "m1")
    assert mmlu["logprobs"] == [-1.0, 0.0, -1.0, -1.0] and mmlu["pred"] == 1
    with pytest.raises(LlavaGMError, match="log-likelihood"):
        score("lang_mc", str(data), str(tmp_path / "mc.json"))


def test_text_ppl(tmp_path):
    fake = FakeAnswerer()
    r = evaluate(fake, "text_ppl", str(samples.text_ppl(tmp_path)), options={"stride": "64"})
    assert r["metrics"]["perplexity"] == 12.5 and fake.stride == 64 and r["headline"] == {"PPL text": 12.5}


def test_every_task_has_a_sample_and_runs(tmp_path):
    data = samples.write_samples(tmp_path)
    assert set(data) == set(TASKS)
    for name, path in data.items():
        fake = FakeAnswerer(lambda p: "A", logprob=lambda c, x: -len(x))
        r = evaluate(fake, name, path, output=str(tmp_path / "runs" / f"{name}.json"))
        assert r["n_questions"] > 0 and r["headline"], name
        assert json.loads(Path(r["outputs"]["results"]).read_text())["task"] == name


# ---- data problems: reported with their row, never silently changing the score ------------------------------


def test_missing_image_fails_or_is_skipped_and_counted(tmp_path):
    data = samples.vqav2_val(tmp_path / "vqa")
    (data / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(LlavaGMError, match=r"questions.json:question\[2\]: image not found"):
        evaluate(FakeAnswerer(), "vqav2", str(data))
    r = evaluate(FakeAnswerer(lambda p: VQAV2[ask(p)]), "vqav2", str(data), on_error="skip")
    assert r["n_questions"] == 2 and r["n_problems"] == 1 and r["problems"][0]["question_id"] == 20
    assert r["metrics"]["accuracy"] == pytest.approx(100 * (1 + 0.3) / 2)


def test_malformed_row_is_reported_with_its_line(tmp_path):
    data = samples.pope(tmp_path / "pope")
    f = data / "coco_pope_popular.json"
    f.write_text(f.read_text() + "{not json\n" + json.dumps({"question_id": 9, "image": "x.jpg", "text": "?", "label": "maybe"}) + "\n")
    with pytest.raises(LlavaGMError) as e:
        evaluate(FakeAnswerer(), "pope", str(data))
    assert "coco_pope_popular.json:3: malformed JSON" in str(e.value) and "2 data problem(s)" in str(e.value)
    r = evaluate(FakeAnswerer(), "pope", str(data), on_error="skip")
    assert r["n_questions"] == 6 and r["n_problems"] == 2


def test_question_without_answer_is_a_problem(tmp_path):
    data = samples.easy_vqa(tmp_path / "ev")
    lines = data.read_text().splitlines()
    row = json.loads(lines[1])
    del row["answer"]
    data.write_text("\n".join([lines[0], json.dumps(row)] + lines[2:]) + "\n")
    with pytest.raises(LlavaGMError, match="questions.jsonl:2: question has no answer"):
        evaluate(FakeAnswerer(), "easy_vqa", str(data))


def test_answer_file_problems(tmp_path):
    data = samples.gqa(tmp_path / "gqa")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": "201", "text": "red"}) + "\n")
    with pytest.raises(LlavaGMError, match="no answer for this question"):
        score("gqa", str(data), str(answers))
    r = score("gqa", str(data), str(answers), on_error="skip")
    assert r["n_questions"] == 1 and r["n_problems"] == 1 and r["metrics"]["accuracy"] == 100
    answers.write_text("".join(json.dumps(x) + "\n" for x in [{"question_id": "201", "text": "red"},
                                                             {"question_id": "201", "text": "blue"},
                                                             {"question_id": 202, "text": "yes"},
                                                             {"question_id": "999", "text": "?"}]))
    with pytest.raises(LlavaGMError) as e:
        score("gqa", str(data), str(answers))
    assert "a.jsonl:2: second answer" in str(e.value) and "a.jsonl:4: answer for a question not in the data" in str(e.value)


def test_skipping_one_answer_of_an_mme_image_drops_the_image(tmp_path):
    data = samples.mme(tmp_path)
    r = evaluate(FakeAnswerer(image_rule=mme_rule), "mme", str(data), output=str(tmp_path / "m.json"))
    rows = [json.loads(l) for l in Path(r["outputs"]["answers"]).read_text().splitlines()]
    Path(tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows if x["question_id"] != "count/0001.jpg#1"))
    s = score("mme", str(data), str(tmp_path / "a.jsonl"), on_error="skip")
    assert s["n_questions"] == 26 and "count" not in s["metrics"]["subtasks"]


def test_limit_keeps_groups_whole(tmp_path):
    mme = evaluate(FakeAnswerer(), "mme", str(samples.mme(tmp_path)), limit=3)
    assert mme["n_questions"] == 4  # two whole images
    mmb = evaluate(FakeAnswerer(mmbench_rule), "mmbench", str(samples.mmbench(tmp_path)), limit=1)
    assert mmb["n_questions"] == 4 and mmb["metrics"]["questions"] == 1  # all rotations of question 0


def test_generation_is_batched_with_settings_passed_through(tmp_path):
    fake = FakeAnswerer()
    evaluate(fake, "pope", str(samples.pope(tmp_path)), batch_size=4, max_new_tokens=3)
    assert fake.calls == [{"n": 6, "max_new_tokens": 3, "batch_size": 4}]


# ---- summary and command line -------------------------------------------------------------------------------


def test_summary_table(tmp_path):
    data = samples.write_samples(tmp_path / "d")
    results = [evaluate(FakeAnswerer(lambda p: "yes"), t, data[t]) for t in ("pope", "gqa", "mme")]
    md, paths = write_summary(results, str(tmp_path / "sum"))
    lines = md.splitlines()
    assert lines[0] == "| model | GQA | POPE-Acc | POPE-F1 | MME-P | MME-C |"  # the papers' column order
    assert lines[2].startswith("| fake-model (01234567) | 50.0 | 50.0 | 66.7 | 500.0 | 200.0 |")
    assert (tmp_path / "sum" / "summary.csv").read_text().splitlines()[0] == "model,GQA,POPE-Acc,POPE-F1,MME-P,MME-C"


def _cli(argv):
    parser = argparse.ArgumentParser(prog="llava-gm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_eval_score_summary(tmp_path, monkeypatch, capsys):
    import sys
    import types

    data = samples.gqa(tmp_path / "gqa")
    # the CLI loads checkpoints through llava_gm.infer.Answerer; a stand-in module keeps torch out of this test
    fake_infer = types.SimpleNamespace(Answerer=types.SimpleNamespace(from_checkpoint=lambda path: FakeAnswerer(lambda p: "red")))
    monkeypatch.setitem(sys.modules, "llava_gm.infer", fake_infer)
    out = tmp_path / "r" / "gqa.json"
    assert _cli(["eval", "--checkpoint", "ck", "--task", "gqa", "--data", str(data), "--output", str(out), "--batch-size", "2"]) == 0
    assert "gqa (testdev_balanced, 2 questions): GQA 50.00" in capsys.readouterr().out
    assert _cli(["score", "--task", "gqa", "--data", str(data), "--answers", str(out.with_suffix(".answers.jsonl"))]) == 0
    assert "GQA 50.00" in capsys.readouterr().out
    assert _cli(["summary", "--results", str(out), "--output-dir", str(tmp_path / "s")]) == 0
    assert "| fake-model (01234567) | 50.0 |" in capsys.readouterr().out
    assert _cli(["summary", "--checkpoint", "ck", "--task", f"gqa={data}", "--output-dir", str(tmp_path / "s2"), "--no-progress"]) == 0
    assert (tmp_path / "s2" / "ck" / "gqa.json").is_file()
    with pytest.raises(LlavaGMError, match="NAME=PATH"):
        _cli(["summary", "--checkpoint", "ck", "--task", "gqa"])
    with pytest.raises(LlavaGMError, match="no option"):
        _cli(["score", "--task", "gqa", "--data", str(data), "--answers", str(out), "--option", "bogus=1"])


def test_a_wrong_file_is_named_not_a_traceback(tmp_path):
    data = samples.vqav2_val(tmp_path / "vqa")
    (data / "v2_OpenEnded_mscoco_val2014_questions.json").write_text("[]")
    with pytest.raises(LlavaGMError, match="expected a 'questions' list"):
        evaluate(FakeAnswerer(), "vqav2", str(data))
    with pytest.raises(LlavaGMError, match="unknown task"):
        evaluate(FakeAnswerer(), "vqa", str(data))


def test_easy_vqa_reads_the_prepared_folder(tmp_path):
    # the folder `llava-gm prepare-data` writes holds test_questions.jsonl with images relative to it
    path = samples.easy_vqa(tmp_path / "ev")
    path.rename(path.parent / "test_questions.jsonl")
    r = evaluate(FakeAnswerer(lambda p: "red"), "easy_vqa", str(tmp_path / "ev"))
    assert r["n_questions"] == 4 and r["metrics"]["per_type"]["color"] == 100
