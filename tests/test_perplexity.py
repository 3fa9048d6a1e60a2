"""Answerer.perplexity against a direct computation on a tiny model, with and without a BOS token."""

import math

import pytest
import torch

from llava_gm.errors import LlavaGMError
from llava_gm.infer import Answerer

TEXT = "the quick brown fox jumps over the lazy dog and the red circle"


class NoBos:
    """The tiny tokenizer as a tokenizer without a BOS token (like GPT-2's) sees it."""

    bos_token_id = None

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


@pytest.fixture(scope="module")
def answerer(tiny_checkpoint):
    return Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32)


def direct_perplexity(answerer, ids, stride, bos):
    """exp(mean -log p(token | the tokens before it in its window)), one plain LM forward per window."""
    nll, count = 0.0, 0
    for s in range(0, len(ids), stride):
        window = bos + ids[s : s + stride]
        x = torch.tensor([window])
        with torch.no_grad():
            logp = answerer.model.lm(input_ids=x).logits.float().log_softmax(-1)[0]
        for t in range(1, len(window)):  # each token predicted from the tokens before it; a window's first is context
            nll -= float(logp[t - 1, window[t]])
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("stride", [512, 5, 2])
def test_perplexity_without_bos_counts_only_predicted_tokens(answerer, monkeypatch, stride):
    tok = answerer.model.tokenizer
    monkeypatch.setattr(answerer.model, "tokenizer", NoBos(tok))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 10
    got = answerer.perplexity(TEXT, stride=stride)
    # (the old code scored each window's first prediction as log p = 0 and still counted it: a lower value)
    assert math.isclose(got, direct_perplexity(answerer, ids, stride, []), rel_tol=1e-4)


def test_perplexity_with_bos_predicts_every_token(answerer):
    tok = answerer.model.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    for stride in (512, 4):
        got = answerer.perplexity(TEXT, stride=stride)
        assert math.isclose(got, direct_perplexity(answerer, ids, stride, [tok.bos_token_id]), rel_tol=1e-4)


def test_perplexity_without_bos_and_stride_one_is_an_error(answerer, monkeypatch):
    monkeypatch.setattr(answerer.model, "tokenizer", NoBos(answerer.model.tokenizer))
    with pytest.raises(LlavaGMError, match="stride of at least 2"):
        answerer.perplexity(TEXT, stride=1)
