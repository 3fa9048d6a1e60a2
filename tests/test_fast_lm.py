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


def test_greedy_head_is_the_exact_argmax():
    torch.manual_seed(0)
    w = (torch.randn(4096, 640) * 0.03).bfloat16()
    head = torch.nn.Linear(640, 4096, bias=False)
    head.weight.data = w
    greedy, why = GreedyHead.build(head)
    assert greedy is not None, why
    for trial in range(40):
        h = torch.randn(2, 640) * 3 if trial % 2 else w[torch.randint(0, 4096, (2,))].float() * 40 + torch.randn(2, 640)
        h = h.bfloat16()
        assert torch.equal(greedy(h), (h.float() @ w.float().t()).argmax(-1))
    assert 0 < greedy.screened < 40 * 2 * 4096  # it screened: fewer words scored exactly than the vocabulary
    assert int(greedy(torch.zeros(1, 640, dtype=torch.bfloat16))[0]) == 0  # all tied: the lowest id


def test_answers_same_with_and_without_fast_path(tiny_checkpoint, shapes_data):
    from llava_gm.infer import Answerer

    items = [{"prompt": "what color is the shape?", "image": p} for p in sorted((shapes_data.parent / "images").glob("*.png"))[:4]]
    assert len(items) == 4
    fast = Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32)
    slow = Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32, fast=False)
    assert fast.fast is not None and fast.fast.decoder is not None
    assert fast.answer(items, max_new_tokens=6, progress=False) == slow.answer(items, max_new_tokens=6, progress=False)
