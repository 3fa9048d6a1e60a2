"""The fast inference path computes what transformers computes, and the screened head picks the exact argmax."""

import pytest
import torch

import tiny
from llava_gm.model.fast_lm import FastDecoder, GreedyHead


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_fast_decoder_matches_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny.make_lm(tmp_path, family), dtype=torch.float32).eval()
    dec = lm.get_decoder()
    fast, why = FastDecoder.build(dec)
    assert fast is not None, why
    torch.manual_seed(0)
    lens = [12, 5, 9]  # left padding; 12 decode steps run past the sliding window of 8
    ids = torch.randint(10, 300, (3, max(lens)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, max(lens) - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = dec(inputs_embeds=dec.embed_tokens(ids), attention_mask=mask, position_ids=pos, use_cache=True)
        b = fast(inputs_embeds=dec.embed_tokens(ids), attention_mask=mask, position_ids=pos)
        assert torch.allclose(a.last_hidden_state[mask.bool()], b.last_hidden_state[mask.bool()], atol=1e-4)
        p = pos[:, -1:]
        for _ in range(12):
            mask, p = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), p + 1
            e = dec.embed_tokens(torch.randint(10, 300, (3, 1)))
            a = dec(inputs_embeds=e, attention_mask=mask, position_ids=p, past_key_values=a.past_key_values, use_cache=True)
            b = fast(inputs_embeds=e, attention_mask=mask, position_ids=p, past_key_values=b.past_key_values)
            assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-4)


def _planted(n, rows, loud, seed):
    """Hidden states whose channels `loud` are 20x larger, as LMs' are."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, n, generator=g)
    h[:, loud] *= 20
    return h


@pytest.mark.parametrize("calibrate", [False, True])
def test_greedy_head_is_the_exact_argmax(calibrate):
    torch.manual_seed(0)
    w = (torch.randn(4096, 640) * 0.03).bfloat16()
    head = torch.nn.Linear(640, 4096, bias=False)
    head.weight.data = w
    loud = torch.randperm(640)[:24]
    greedy, why = GreedyHead.build(head, _planted(640, 64, loud, 1) if calibrate else None)
    assert greedy is not None, why
    assert len(greedy.outliers) == (32 if calibrate else 0)
    if calibrate:
        assert set(loud.tolist()) <= set(greedy.outliers.tolist())  # the loud channels were found
    for trial in range(40):
        rows = (1, 2, 5)[trial % 3 if trial % 2 else (trial // 2) % 3]  # one row: the 4-bit screen; several: the bf16 one
        if trial % 3 == 0:
            h = torch.randn(rows, 640) * 3
        elif trial % 3 == 1:
            h = w[torch.randint(0, 4096, (rows,))].float() * 40 + torch.randn(rows, 640)
        else:
            h = _planted(640, rows, loud, trial) * 0.3
        for h in (h.bfloat16(), h):  # the model's bf16 states, and fp32 ones (their rounding to bf16 is part of the bound)
            assert torch.equal(greedy(h), (h.float() @ w.float().t()).argmax(-1))
    assert 0 < greedy.screened < 40 * 2 * 5 * 4096  # it screened: fewer words scored exactly than the vocabulary
    for rows in (1, 3):
        assert greedy(torch.zeros(rows, 640, dtype=torch.bfloat16)).tolist() == [0] * rows  # all tied: the lowest id


def test_a_batch_picks_what_each_row_picks_alone_ties_included():
    """The bf16 screen of several rows and the 4-bit screen of one give the same token, exact ties (duplicate
    words) going to the lowest id in both."""
    torch.manual_seed(1)
    w = (torch.randn(4096, 640) * 0.03).bfloat16()
    w[3000], w[3100] = w[17], w[17]  # three identical words
    head = torch.nn.Linear(640, 4096, bias=False)
    head.weight.data = w
    greedy, _ = GreedyHead.build(head, _planted(640, 64, torch.arange(24), 1))
    h = torch.cat([w[[17, 3000, 3100]].float() * 40, torch.randn(5, 640) * 3]).bfloat16()
    alone = torch.cat([greedy(h[i : i + 1]) for i in range(len(h))])
    assert alone[:3].tolist() == [17, 17, 17]
    for rows in (2, 8):
        assert torch.equal(greedy(h[:rows]), alone[:rows])
    screened = greedy.screened
    greedy(h)
    assert greedy.screened - screened < 8 * 64  # the bf16 screen leaves few words to score exactly


def test_exact_outlier_channels_tighten_the_screen():
    torch.manual_seed(0)
    head = torch.nn.Linear(640, 4096, bias=False)
    head.weight.data = (torch.randn(4096, 640) * 0.03).bfloat16()
    loud = torch.randperm(640)[:24]
    plain, _ = GreedyHead.build(head)
    split, _ = GreedyHead.build(head, _planted(640, 64, loud, 1))
    plain.FOURBIT_ROWS = split.FOURBIT_ROWS = 4  # the 4-bit screen for these four rows
    h = (_planted(640, 4, loud, 7) * 0.3).bfloat16()
    assert torch.equal(plain(h), split(h))
    assert split.screened * 3 < plain.screened


def test_answers_same_with_and_without_fast_path(tiny_checkpoint, shapes_data):
    from llava_gm.infer import Answerer

    items = [{"prompt": "what color is the shape?", "image": p} for p in sorted((shapes_data.parent / "images").glob("*.png"))[:4]]
    assert len(items) == 4
    fast = Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32)
    slow = Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32, fast=False)
    assert fast.fast is not None and fast.fast.decoder is not None
    assert fast.answer(items, max_new_tokens=6, progress=False) == slow.answer(items, max_new_tokens=6, progress=False)


def _decode_both(dec, fast, other, lens, steps, seed=0):
    """Prefill left-padded prompts, then `steps` one-token steps through both decoders; yields hidden-state pairs."""
    torch.manual_seed(seed)
    ids = torch.randint(10, 300, (len(lens), max(lens)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, max(lens) - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = fast(inputs_embeds=dec.embed_tokens(ids), attention_mask=mask, position_ids=pos)
        b = other(inputs_embeds=dec.embed_tokens(ids), attention_mask=mask, position_ids=pos)
        yield a.last_hidden_state[mask.bool()], b.last_hidden_state[mask.bool()]
        p = pos[:, -1:]
        for _ in range(steps):
            mask, p = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), p + 1
            e = dec.embed_tokens(torch.randint(10, 300, (len(lens), 1)))
            a = fast(inputs_embeds=e, attention_mask=mask, position_ids=p, past_key_values=a.past_key_values)
            b = other(inputs_embeds=e, attention_mask=mask, position_ids=p, past_key_values=b.past_key_values)
            yield a.last_hidden_state, b.last_hidden_state


@pytest.mark.parametrize("family, lens, shapes", [
    ("gemma2", [12, 5, 9], {(3, 1, 16), (3, 1, 32)}),  # batched prefill stays eager; 12 + 18 tokens outgrow 16 slots
    ("gemma3", [12, 5, 9], {(3, 1, 16), (3, 1, 32)}),
    ("gemma3", [12], {(1, 32, 48), (1, 1, 48), (1, 1, 64)}),  # one prompt: prefill padded to 32
])
def test_compiled_decode_steps_match_the_fast_decoder(tmp_path, family, lens, shapes, monkeypatch):
    from transformers import AutoModelForCausalLM

    from llava_gm.model import compiled
    from llava_gm.model.compiled import CompiledDecoder, StaticKVCache

    monkeypatch.setattr(compiled, "CAPACITY_STEP", 16)  # small, so that 18 steps outgrow a capacity: the cache grows
    lm = AutoModelForCausalLM.from_pretrained(tiny.make_lm(tmp_path, family), dtype=torch.float32).eval()
    dec = lm.get_decoder()
    fast, _ = FastDecoder.build(dec)
    comp, why = CompiledDecoder.build(dec, fast)
    assert comp is not None, why
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    pairs = list(_decode_both(dec, fast, comp, lens, 18))
    assert counters["stats"]["unique_graphs"] - graphs == len(shapes)  # each shape compiled, none run uncompiled
    for a, b in pairs:  # past the sliding window of 8, with Gemma 2's soft-capped attention
        assert torch.allclose(a, b, atol=1e-4)
    assert comp.failed is None and comp.shapes == shapes


def test_compiled_step_failure_falls_back_to_the_fast_decoder(tmp_path):
    from transformers import AutoModelForCausalLM

    from llava_gm.model.compiled import CompiledDecoder

    lm = AutoModelForCausalLM.from_pretrained(tiny.make_lm(tmp_path, "gemma3"), dtype=torch.float32).eval()
    dec = lm.get_decoder()
    fast, _ = FastDecoder.build(dec)
    comp, _ = CompiledDecoder.build(dec, fast)

    def broken(*args):
        raise RuntimeError("no C++ compiler found")

    comp.step = broken
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found"):
        pairs = list(_decode_both(dec, fast, comp, [6, 3], 4))
    assert comp.failed and all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)


def test_compile_is_refused_for_sparse_layers_with_a_reason(tmp_path):
    from transformers import AutoModelForCausalLM

    from llava_gm.model.fast_lm import FastLM

    lm = AutoModelForCausalLM.from_pretrained(tiny.make_lm(tmp_path, "gemma3"), dtype=torch.float32).eval()
    lm.get_decoder().layers[1].mlp = torch.nn.Sequential(torch.nn.Linear(64, 64))  # stands in for an MoE layer
    fl = FastLM(lm, compile=True)
    assert any("sparse (MoE / EVF) layers" in n for n in fl.notes)


def test_answers_same_with_compile(tiny_checkpoint, shapes_data):
    from PIL import Image

    from llava_gm.infer import Answerer

    paths = sorted((shapes_data.parent / "images").glob("*.png"))[:3]
    items = [{"prompt": "what color is the shape?", "image": Image.open(p).convert("RGB")} for p in paths]  # in memory: the compiled tower
    eager = Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32)
    comp = Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32, compile=True)
    assert comp.answer(items, max_new_tokens=6, batch_size=1, progress=False) == eager.answer(items, max_new_tokens=6, batch_size=1, progress=False)
    # two questions about one image share its compiled prefill, then continue on the eager decoder's cache
    shared = items[:2] + [{"prompt": "what shape is this?", "image": items[0]["image"]}]
    assert comp.answer(shared, max_new_tokens=6, progress=False) == eager.answer(shared, max_new_tokens=6, progress=False)
    assert comp.compiled_tower.failed is None and comp.fast.decoder.failed is None
    feats = comp.image_features([it["image"] for it in items])
    want = eager.image_features([it["image"] for it in items])
    assert all(torch.allclose(feats[i].float(), want[i].float(), atol=1e-2) for i in range(3))
