"""Every task end to end with the real tiny model: official-layout files in, batched generation, results out."""

import json

import pytest

from llava_gm.eval import TASKS, evaluate, score, write_summary
from llava_gm.eval import samples


@pytest.fixture(scope="module")
def answerer(tiny_checkpoint):
    from llava_gm.infer import Answerer

    return Answerer.from_checkpoint(tiny_checkpoint)


def test_every_task_with_the_tiny_model(answerer, tmp_path):
    data = samples.write_samples(tmp_path / "data")
    results = []
    for name in TASKS:
        out = tmp_path / "runs" / f"{name}.json"
        r = evaluate(answerer, name, data[name], output=str(out), batch_size=4, max_new_tokens=3, progress=False)
        saved = json.loads(out.read_text())
        assert saved["checkpoint_hash"] == answerer.checkpoint_hash and saved["model_id"] == answerer.model_id
        assert saved["n_questions"] == r["n_questions"] > 0 and len(saved["predictions"]) == r["n_questions"]
        if TASKS[name].kind == "generate":
            assert all(isinstance(p["text"], str) for p in saved["predictions"])
            # the answer file it wrote scores to the same numbers without the model
            assert score(name, data[name], saved["outputs"]["answers"])["metrics"] == r["metrics"]
        results.append(r)
    md, _ = write_summary(results, str(tmp_path / "summary"))
    assert md.splitlines()[0].startswith("| model | VQAv2 | GQA | SQA-IMG | TextVQA | POPE-Acc")


def test_language_tasks_with_the_tiny_model(answerer, tmp_path):
    r = evaluate(answerer, "lang_mc", str(samples.lang_mc(tmp_path)), progress=False)
    assert {p["question_id"]: len(p["logprobs"]) for p in r["predictions"]} == {"b1": 2, "p1": 2, "m1": 4, "g1": 2}
    assert all(lp < 0 for p in r["predictions"] for lp in p["logprobs"])  # log-probabilities of real continuations
    ppl = evaluate(answerer, "text_ppl", str(samples.text_ppl(tmp_path)), options={"stride": 16})
    assert ppl["metrics"]["perplexity"] > 1
