"""The engine's step API: requests joining a running batch, leaving it, stop strings, streaming and per-request
sampling all give what each request would get alone."""

import dataclasses

import pytest
import torch

from llava_gm.config import SparseConfig
from llava_gm.data.conversation import ConversationEncoder
from llava_gm.engine.backends import FastBackend, TransformersBackend
from llava_gm.engine.core import Engine, Sampling, Sequence
from llava_gm.infer import Answerer
from llava_gm.model.build import build_model


@pytest.fixture(scope="module", params=["fast", "transformers"])
def answerer(request, tiny_checkpoint):
    a = Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32, fast=request.param == "fast")
    assert isinstance(a.engine.backend, FastBackend if request.param == "fast" else TransformersBackend)
    return a


def _seqs(answerer, shapes_data, n_tokens=10, **sampling):
    """Two image questions (one image shared) and a text one."""
    enc = answerer.encoder
    folder = shapes_data.parent / "images"
    feats = answerer.image_features([folder / "0.png", folder / "1.png"])
    out = []
    for q, k in [("what color is the shape?", 0), ("what is the shape?", 0), ("is there a red circle?", None), ("yes", 1)]:
        prompt = enc.encode_prompt([{"role": "user", "content": f"<image>\n{q}" if k is not None else q}])
        out.append(Sequence(prompt, image=feats[k] if k is not None else None, image_key=k,
                            sampling=Sampling(max_tokens=n_tokens, **sampling), stop_ids=set()))
    return out


def _alone(engine, seq):
    fresh = dataclasses.replace(seq, tokens=[], text="", sent=0, finish_reason=None, generator=None, experts=[])
    batch = engine.prefill([fresh])
    while batch is not None:
        batch = engine.step(batch)
    return fresh


def test_requests_join_and_leave_mid_decode_with_unchanged_answers(answerer, shapes_data):
    engine = answerer.engine
    seqs = _seqs(answerer, shapes_data)
    seqs[1].sampling = Sampling(max_tokens=4)  # leaves early
    alone = [_alone(engine, s) for s in seqs]
    batch = engine.prefill(seqs[:2])
    for _ in range(3):
        batch = engine.step(batch)
    batch = engine.join(batch, engine.prefill(seqs[2:]))  # two more arrive while two decode
    assert len(batch) == 4
    sizes = []
    while batch is not None:
        sizes.append(len(batch))
        batch = engine.step(batch)
    assert sizes[0] == 4 and min(sizes) < 4  # the short one left while the others went on
    for s, a in zip(seqs, alone):
        assert s.tokens == a.tokens and s.finish_reason == a.finish_reason == "length"
        assert len(s.tokens) == s.sampling.max_tokens


def test_a_cancelled_request_leaves_at_the_next_step(answerer, shapes_data):
    engine = answerer.engine
    seqs = _seqs(answerer, shapes_data)[:3]
    want = _alone(engine, seqs[0]).tokens
    batch = engine.step(engine.prefill(seqs))
    seqs[1].cancelled = True
    batch = engine.step(batch)
    assert seqs[1].finish_reason == "cancelled" and len(batch) == 2
    while batch is not None:
        batch = engine.step(batch)
    assert seqs[0].tokens == want


@pytest.fixture(scope="module")
def random_model(tiny_model_config):
    """An untrained model: its greedy answers are long runs of ordinary words (the trained one ends at once)."""
    return build_model(tiny_model_config).eval()


@pytest.mark.parametrize("fast", [False, True])
def test_stop_strings_cut_the_answer_and_streaming_adds_up(random_model, fast):
    from llava_gm.model.fast_lm import FastLM

    engine = Engine(random_model, FastBackend(FastLM(random_model.lm).decoder) if fast else None)
    enc = ConversationEncoder(random_model.tokenizer, random_model.num_image_tokens, 512)
    prompt = enc.encode_prompt([{"role": "user", "content": "describe the image briefly"}])
    free = _alone(engine, Sequence(prompt, sampling=Sampling(max_tokens=16), stop_ids=set()))
    full = engine.tokenizer.decode(free.tokens, skip_special_tokens=True).strip()
    assert free.text == full and len(full) > 6
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    seq = Sequence(prompt, sampling=Sampling(max_tokens=16, stop=(stop, "never appears")), stop_ids=set())
    batch = engine.prefill([seq])
    pieces = []
    while batch is not None:
        batch = engine.step(batch)
        pieces.append(seq.take_text())
    assert seq.finish_reason == "stop" and seq.text == full[: full.find(stop)].rstrip()
    assert "".join(pieces) == seq.text and stop not in seq.text and len(seq.tokens) < 16
    assert sum(bool(p) for p in pieces) > 1  # streamed in several pieces


def test_sampling_is_per_request_and_reproducible_by_seed(answerer, shapes_data):
    engine = answerer.engine
    seqs = _seqs(answerer, shapes_data, temperature=1.0, top_p=0.9, seed=5)
    seqs[2].sampling = Sampling(max_tokens=10)  # a greedy row in the same batch
    together = engine.prefill(seqs)
    while together is not None:
        together = engine.step(together)
    for s in seqs:
        assert s.tokens == _alone(engine, s).tokens
    other = _seqs(answerer, shapes_data, temperature=1.0, top_p=0.9, seed=6)[0]
    assert _alone(engine, other).tokens != seqs[0].tokens  # another seed, another answer (10 tokens from ~400 words)


@pytest.mark.parametrize("kind", ["moe", "evf"])
def test_expert_tracing_names_the_experts_each_answer_token_used(tiny_model_config, kind):
    model = build_model(dataclasses.replace(tiny_model_config, sparse=SparseConfig(kind=kind))).eval()
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512)
    torch.manual_seed(0)
    feats = torch.randn(model.vision_tokens, model.vision_dim)
    seq = Sequence(enc.encode_prompt([{"role": "user", "content": "<image>\nwhat is it?"}]), image=feats,
                   sampling=Sampling(max_tokens=5), stop_ids=set())
    engine = Engine(model, trace_experts=True)
    batch = engine.prefill([seq])
    while batch is not None:
        batch = engine.step(batch)
    plain = _alone(Engine(model), seq)
    assert seq.tokens == plain.tokens  # tracing changes nothing
    assert len(seq.experts) == 4  # every answer token fed back (the 5th ends the answer unfed)
    top_k = 2 if kind == "moe" else 1
    n_experts = 4 if kind == "moe" else 2
    for per_token in seq.experts:
        assert sorted(per_token) == model.sparse_layers
        assert all(len(e) == top_k and all(0 <= x < n_experts for x in e) for e in per_token.values())
