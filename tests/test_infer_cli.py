"""Answering from a checkpoint: the Answerer, `llava-gm ask` and `llava-gm answer` in LLaVA's file formats."""

import json
import math

import pytest
import torch

from llava_gm.cli import main
from llava_gm.infer import Answerer


@pytest.fixture(scope="module")
def answerer(tiny_checkpoint):
    return Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32)


def test_batched_answers_equal_one_at_a_time(answerer, shapes_data):
    folder = shapes_data.parent / "images"
    items = [{"prompt": "<image>\nwhat color is the shape?", "image": folder / f"{i}.png"} for i in range(5)]
    items.append({"prompt": "is there a red circle in the image?", "image": None})
    batched = answerer.answer(items, max_new_tokens=6, batch_size=4, progress=False)
    single = [answerer.answer([it], max_new_tokens=6, progress=False)[0] for it in items]
    assert batched == single


def test_loglikelihood_is_the_sum_of_token_logprobs(answerer):
    tok = answerer.model.tokenizer
    ctx, cont = "the quick brown", " fox jumps"
    ll = answerer.loglikelihood([(ctx, cont), ("red", " green")])
    ids = torch.tensor([[tok.bos_token_id] + tok(ctx + cont, add_special_tokens=False)["input_ids"]])
    n_ctx = 1 + len(tok(ctx, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = answerer.model.lm(input_ids=ids).logits
    logp = logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    assert math.isclose(ll[0], float(logp[n_ctx - 1 :].sum()), rel_tol=1e-4)
    # perplexity is exp of the mean negative log-likelihood over the text's tokens after BOS
    full = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    assert math.isclose(answerer.perplexity(ctx + cont), math.exp(-float(logp.sum()) / len(full)), rel_tol=1e-4)


def test_ask_prints_an_answer(tiny_checkpoint, shapes_data, capsys):
    assert main(["ask", "--checkpoint", tiny_checkpoint, "--image", str(shapes_data.parent / "images" / "0.png"), "--question", "what color is the shape?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # one answer line (a tiny random model's answer may be empty)
    assert main(["ask", "--checkpoint", tiny_checkpoint, "--image", "nope.png", "--question", "q"]) == 2
    assert "nope.png: image not found" in capsys.readouterr().err


def test_answer_file_round_trip_and_bad_rows(tmp_path, tiny_checkpoint, shapes_data, capsys):
    q = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "image": f"images/{i}.png", "text": "what color is the shape?"} for i in range(3)]
    q.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "a.jsonl"
    assert main(["answer", "--checkpoint", tiny_checkpoint, "--questions", str(q), "--image-folder", str(shapes_data.parent), "--output", str(out), "--max-new-tokens", "3"]) == 0
    answers = [json.loads(l) for l in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2]
    assert set(answers[0]) == {"question_id", "prompt", "text", "model_id"} and answers[0]["prompt"] == "what color is the shape?"
    # a bad row fails by its line and writes nothing; with --on-bad skip it is left out and counted
    q.write_text(q.read_text() + '{"question_id": 9, "image": "images/none.png", "text": "q"}\n')
    out2 = tmp_path / "b.jsonl"
    assert main(["answer", "--checkpoint", tiny_checkpoint, "--questions", str(q), "--image-folder", str(shapes_data.parent), "--output", str(out2)]) == 2
    assert "q.jsonl:4: image" in capsys.readouterr().err and not out2.exists()
    assert main(["answer", "--checkpoint", tiny_checkpoint, "--questions", str(q), "--image-folder", str(shapes_data.parent), "--output", str(out2), "--on-bad", "skip", "--max-new-tokens", "2"]) == 0
    assert len(out2.read_text().splitlines()) == 3 and "skipped 1 bad row" in capsys.readouterr().err


def test_answer_file_with_compile_writes_the_same_answers(tmp_path, tiny_checkpoint, shapes_data):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": f"images/{i}.png", "text": "what shape is it?"}) + "\n" for i in range(3)))
    outs = []
    for flag in ([], ["--compile"]):
        outs.append(tmp_path / f"a{len(flag)}.jsonl")
        assert main(["answer", "--checkpoint", tiny_checkpoint, "--questions", str(q), "--image-folder", str(shapes_data.parent),
                     "--output", str(outs[-1]), "--max-new-tokens", "5", *flag]) == 0
    assert outs[0].read_text() == outs[1].read_text()
