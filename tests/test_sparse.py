"""Sparse FFN layers (MoE, EVF): upcycling exactness, capacity, allocation, losses, gradients, checkpoints."""

import copy
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from test_sparse_helpers import ids, image_mask, tiny_lm

from llava_gm.config import SparseConfig
from llava_gm.errors import LlavaGMError
from llava_gm.model.sparse import (
    SparseFFN,
    allocate_evf,
    allocate_topk,
    aux_losses,
    capacity,
    decoder_layers,
    eve_balance_loss,
    record_routing,
    select_layers,
    modality,
    sparse_modules,
    sparse_trainable,
    sparsify,
    switch_balance_loss,
    z_loss,
)

DROPLESS = dict(capacity_factor_train=None, capacity_factor_eval=None)


def moe(**kw):
    return SparseConfig(kind="moe", **kw)


def evf(**kw):
    return SparseConfig(kind="evf", **kw)


def sparse_copy(lm, cfg):
    s = copy.deepcopy(lm)
    sparsify(s, cfg)
    return s


def logits(lm, x, img=None, has=None, token_mask=None):
    with modality(lm, img, has, token_mask):
        return lm(x).logits


# ---- layer choice and structure -------------------------------------------------------------------
def test_select_layers():
    assert select_layers("alternate", 6) == [0, 2, 4]
    assert select_layers("first_half", 6) == [0, 1, 2]
    assert select_layers("second_half", 6) == [3, 4, 5]
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers([3, 1], 6) == [1, 3]
    for bad in ("every_other", [6], [1, 1], []):
        with pytest.raises(LlavaGMError):
            select_layers(bad, 6)


def test_sparsify_structure_names_and_fp32_router():
    lm = tiny_lm()
    assert sparsify(lm, SparseConfig(kind="none")) == []
    assert sparsify(lm, moe()) == [0, 2]
    layers = decoder_layers(lm)
    assert isinstance(layers[0].mlp, SparseFFN) and not isinstance(layers[1].mlp, SparseFFN)
    names = dict(lm.named_parameters())
    assert "model.layers.0.mlp.router.weight" in names and "model.layers.2.mlp.experts.3.down_proj.weight" in names
    assert names["model.layers.0.mlp.router.weight"].shape == (4, 64)
    assert not layers[0].mlp.training  # keeps the mode of the FFN it replaced (capacity factor follows it)
    lm.to(torch.bfloat16)
    assert names["model.layers.0.mlp.router.weight"].dtype == torch.float32
    assert names["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    with pytest.raises(LlavaGMError, match="already sparse"):
        sparsify(lm, moe())


def test_sparsify_is_deterministic():
    a, b = tiny_lm(), tiny_lm()
    torch.manual_seed(123)
    sparsify(a, evf())
    torch.manual_seed(456)  # the global RNG must not matter
    sparsify(b, evf())
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ---- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gemma"])
def test_upcycled_moe_renormalised_dropless_equals_dense(family):
    """With top-k weights renormalised and nothing dropped, the upcycled MoE computes the dense model:
    sum_j w_j * FFN(x) with sum_j w_j = 1. Tolerance: max |logit difference| <= 1e-5 in fp32."""
    dense = tiny_lm(family)
    x = ids(2, 12)
    ref = dense(x).logits
    sparse = sparse_copy(dense, moe(renormalize=True, **DROPLESS))
    assert (logits(sparse, x) - ref).abs().max() <= 1e-5
    # eval capacity 2.0 with top-2 of 4 cannot drop a token (an expert holds ceil(2 * 2T / 4) = T slots)
    sparse = sparse_copy(dense, moe(renormalize=True)).eval()
    assert (logits(sparse, x) - ref).abs().max() <= 1e-5
    # the paper's raw softmax weights (no renormalisation) are a different function: the test above is not vacuous
    raw = sparse_copy(dense, moe(renormalize=False, **DROPLESS))
    assert (logits(raw, x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gemma3", "gemma"])
def test_evf_text_only_is_exactly_dense(family):
    dense = tiny_lm(family)
    x = ids(2, 12)
    ref = dense(x).logits
    sparse = sparse_copy(dense, evf())
    for mode in (sparse.eval, sparse.train):
        mode()
        assert torch.equal(logits(sparse, x), ref)  # no modality info at all
        assert torch.equal(logits(sparse, x, torch.zeros(2, 12, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)), ref)
        assert aux_losses(sparse) == {}


def test_evf_mixed_batch_and_upcycled_start():
    """Sample 1 has no image: its logits are the dense ones. Sample 0 has one: at the start of stage 3 the two FFNs
    are copies and the routing weight is 1 in value, so with no token dropped it too matches the dense model."""
    dense = tiny_lm()
    x = ids(2, 12)
    ref = dense(x).logits
    sparse = sparse_copy(dense, evf(allocation="img_gbpr"))
    img = image_mask(2, 12, samples=[0])
    out = logits(sparse, x, img, img.any(1))
    assert (out - ref).abs().max() <= 1e-5
    assert "balance" in aux_losses(sparse)


# ---- capacity and allocation --------------------------------------------------------------------
def _expert_rows(lm):
    rows = defaultdict(list)
    for m in sparse_modules(lm):
        for e, ffn in enumerate(m.experts):
            ffn.register_forward_pre_hook(lambda mod, args, key=(m.layer_idx, e): rows[key].append(args[0].shape[0]))
    return rows


def _bias_router(lm, bias):
    for m in sparse_modules(lm):
        m.router.register_forward_hook(lambda mod, args, out: out + torch.tensor(bias))


@pytest.mark.parametrize("cfg,bias", [(moe(), [8.0, 4.0, 0.0, 0.0]), (evf(allocation="gbpr"), [0.0, 8.0]), (evf(allocation="random"), [0.0, 8.0])])
def test_no_expert_exceeds_capacity(cfg, bias):
    lm = sparse_copy(tiny_lm(), cfg).train()
    _bias_router(lm, bias)  # everyone wants the same expert(s): capacity must bind
    rows = _expert_rows(lm)
    x = ids(2, 16)
    img = image_mask(2, 16)
    n = x.numel()
    with record_routing(lm) as stats:
        logits(lm, x, img, img.any(1))
    cap = capacity(n * lm.model.layers[0].mlp.top_k, lm.model.layers[0].mlp.num_experts, 1.5)
    assert max(r for rs in rows.values() for r in rs) == cap  # full, never over
    assert all(sum(s["dropped"]) > 0 for s in stats.values())


def test_topk_known_answer():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.7, 0.2, 0.1]])
    experts, scores, keep = allocate_topk(probs, k=2, cap=2)
    assert experts.tolist() == [[0, 1], [0, 2], [1, 2], [0, 1]]
    # first choices first (token order): expert 0 takes tokens 0, 1 and is full for token 3; then second choices
    assert keep.tolist() == [[True, True], [True, True], [True, True], [False, False]]
    _, _, keep = allocate_topk(probs, k=2, cap=None)
    assert keep.all()
    _, _, keep = allocate_topk(probs, k=2, cap=2, routed=torch.tensor([True, False, True, True]))
    assert keep.tolist() == [[True, True], [False, False], [True, True], [True, False]]


def _evf_table():
    v = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.2])
    return torch.stack([1 - v, v], 1)


def test_gbpr_keeps_highest_scoring_tokens():
    ffn, keep = allocate_evf(_evf_table(), torch.zeros(5, dtype=torch.bool), "gbpr", cap=2)
    assert ffn.tolist() == [1, 1, 1, 1, 0]
    assert keep.tolist() == [True, False, True, False, True]  # vision keeps 0.9 and 0.8; 0.6 and 0.7 dropped


def test_img_gbpr_modality_prior_and_overflow():
    probs = _evf_table()
    # capacity allows: image tokens -> vision FFN, text tokens -> language FFN, whatever the router prefers
    ffn, keep = allocate_evf(probs, torch.tensor([True, True, False, False, False]), "img_gbpr", cap=3)
    assert ffn.tolist() == [1, 1, 0, 0, 0] and keep.all()
    # language overloaded (4 text tokens, 2 slots): keeps its best scores (tokens 4, 1); the overflow (3, 2) is
    # re-offered to the vision FFN, whose one spare slot takes the higher vision score (token 2)
    is_image = torch.tensor([True, False, False, False, False])
    ffn, keep = allocate_evf(probs, is_image, "img_gbpr", cap=2)
    assert ffn.tolist() == [1, 0, 1, 0, 0]
    assert keep.tolist() == [True, True, True, False, True]
    ffn, keep = allocate_evf(probs, is_image, "img_gbpr", cap=2, share=0.0)  # no re-offer: GBPR with a prior
    assert keep.tolist() == [True, True, False, False, True]


def test_img_gbpr_never_drops_with_c_at_least_one():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.rand(50, 2, generator=g).softmax(-1)
        is_image = torch.rand(50, generator=g) < 0.8
        ffn, keep = allocate_evf(probs, is_image, "img_gbpr", cap=capacity(50, 2, 1.5))
        assert keep.all() and torch.bincount(ffn, minlength=2).max() <= capacity(50, 2, 1.5)


def test_random_allocation_respects_capacity():
    probs = torch.tensor([[0.2, 0.8]] * 8)
    kept = set()
    for seed in range(5):
        ffn, keep = allocate_evf(probs, torch.ones(8, dtype=torch.bool), "random", cap=6, generator=torch.Generator().manual_seed(seed))
        assert (ffn == 1).all() and int(keep.sum()) == 6
        kept.add(tuple(keep.tolist()))
    assert len(kept) > 1  # random subsets, not a fixed order


def test_capacity_definition():
    assert capacity(2 * 10, 4, 1.5) == 8  # MoE: ceil(1.5 * k * T / E)
    assert capacity(10, 2, 1.5) == 8  # EVF: ceil(1.5 * T / 2)
    assert capacity(4, 2, 1.5) == 3 and capacity(50, 1, 1.1) == 55


# ---- losses ---------------------------------------------------------------------------------------
def test_balance_losses_known_values():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    # Switch: f = (2/3, 1/3) top-1 choices, P = (2/3, 1/3) -> 2 * (4/9 + 1/9) = 10/9
    assert math.isclose(switch_balance_loss(probs, probs.argmax(-1, keepdim=True)).item(), 10 / 9, rel_tol=1e-6)
    # Eve: token 2 dropped -> F = (1/3, 1/3), G = (2/3, 1/3) -> 2/9 + 1/9 = 1/3
    ffn = torch.tensor([0, 1, 0])
    assert math.isclose(eve_balance_loss(probs, ffn, torch.tensor([True, True, False])).item(), 1 / 3, rel_tol=1e-6)
    # top-2 of 4 with f over all choices: uniform -> 1
    p = torch.full((4, 4), 0.25)
    assert math.isclose(switch_balance_loss(p, torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])).item(), 1.0, rel_tol=1e-6)
    assert math.isclose(z_loss(torch.zeros(3, 2)).item(), math.log(2) ** 2, rel_tol=1e-6)


def test_aux_losses_are_weighted_sums_over_layers():
    lm = sparse_copy(tiny_lm(), moe(balance_coef=0.01, z_loss_coef=0.001)).train()
    seen = []
    for m in sparse_modules(lm):
        m.router.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    logits(lm, ids(2, 12))
    aux = aux_losses(lm)
    bal = sum(switch_balance_loss(l.softmax(-1), l.topk(2, -1).indices) for l in seen)
    assert torch.allclose(aux["balance"], 0.01 * bal) and torch.allclose(aux["z"], 0.001 * sum(z_loss(l) for l in seen))


def test_padding_takes_no_capacity_or_loss():
    lm = sparse_copy(tiny_lm(), moe()).train()
    rows = _expert_rows(lm)
    x = ids(1, 10)
    logits(lm, x)
    alone, alone_rows = aux_losses(lm)["balance"], {k: list(v) for k, v in rows.items()}
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)  # right padding: real tokens see the same context
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], 1).bool()
    logits(lm, padded, token_mask=mask)
    assert torch.allclose(aux_losses(lm)["balance"], alone, atol=1e-6)
    # same tokens per expert as without the padding: capacity counts real tokens, padding runs no expert
    assert all(rows[k][1] == alone_rows[k][0] for k in rows)


# ---- training -------------------------------------------------------------------------------------
def _mark(lm):
    names = set(sparse_trainable(lm))
    for n, p in lm.named_parameters():
        p.requires_grad_(n in names)
    return names


@pytest.mark.parametrize("cfg", [moe(), evf()])
def test_gradients_reach_routers_and_experts(cfg):
    lm = sparse_copy(tiny_lm(), cfg).train()
    names = _mark(lm)
    if cfg.kind == "evf":
        assert not any(".experts.0." in n for n in names) and any(".experts.1." in n for n in names)
    x = ids(4, 16)
    img = image_mask(4, 16, n=8)
    with modality(lm, img, img.any(1)):
        out = lm(x, labels=x)
    (out.loss + sum(aux_losses(lm).values())).backward()
    params = dict(lm.named_parameters())
    for n in names:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in params.items() if n not in names)


@pytest.mark.parametrize("cfg", [moe(), evf()])
def test_frozen_weights_unchanged_after_step(cfg):
    lm = sparse_copy(tiny_lm(), cfg).train()
    names = _mark(lm)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    x = ids(2, 16)
    img = image_mask(2, 16)
    with modality(lm, img, img.any(1)):
        out = lm(x, labels=x)
    (out.loss + sum(aux_losses(lm).values())).backward()
    opt.step()
    for n, p in lm.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n


@pytest.mark.parametrize("cfg", [moe(), evf()])
def test_state_dict_reloads_into_fresh_sparsified_copy(cfg):
    base = tiny_lm()
    lm = sparse_copy(base, cfg)
    with torch.no_grad():  # stand-in for training
        for n, p in lm.named_parameters():
            if n in set(sparse_trainable(lm)):
                p.add_(torch.randn_like(p) * 0.05)
    x, img = ids(2, 12), image_mask(2, 12)
    ref = logits(lm, x, img, img.any(1))
    # full state dict, strict
    fresh = sparse_copy(base, cfg)
    fresh.load_state_dict(lm.state_dict(), strict=True)
    assert torch.equal(logits(fresh, x, img, img.any(1)), ref)
    # the checkpoint way: only what stage 3 trained, on top of the stage-2 weights
    fresh = sparse_copy(base, cfg)
    trained = {n: p for n, p in lm.state_dict().items() if n in set(sparse_trainable(lm))}
    missing, unexpected = fresh.load_state_dict(trained, strict=False)
    assert not unexpected
    assert torch.equal(logits(fresh, x, img, img.any(1)), ref)


@pytest.mark.parametrize("cfg", [moe(), evf()])
def test_bf16_autocast_forward_backward(cfg):
    lm = sparse_copy(tiny_lm(), cfg).train()
    _mark(lm)
    x, img = ids(2, 16), image_mask(2, 16)
    with modality(lm, img, img.any(1)), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(x, labels=x)
        loss = out.loss + sum(aux_losses(lm).values())
    loss.backward()
    router = sparse_modules(lm)[0].router.weight
    assert router.dtype == torch.float32 and router.grad is not None and torch.isfinite(loss)


# ---- modality plumbing and recording ------------------------------------------------------------------
def test_modality_shape_mismatch_is_an_error_and_the_masks_are_cleared():
    lm = sparse_copy(tiny_lm(), evf())
    with pytest.raises(LlavaGMError, match="modality"), modality(lm, image_mask(2, 5), None):
        lm(ids(2, 12))
    assert all(m._masks == (None, None, None) for m in sparse_modules(lm))  # cleared on the way out of the error
    lm(ids(2, 12))  # outside the context: text only, no stale masks


def test_evf_cached_decoding_routes_text_to_language_ffn():
    lm = sparse_copy(tiny_lm(), evf())
    x = ids(1, 10)
    img = image_mask(1, 10)
    with modality(lm, img, img.any(1)):
        out = lm(x, use_cache=True)
    with record_routing(lm) as stats, modality(lm, torch.zeros(1, 1, dtype=torch.bool), torch.tensor([True])):
        lm(x[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    for s in stats.values():
        assert s["tokens"] == [1.0, 0.0] and s["processed"][0] == [1.0, 0.0]  # one text token, language FFN


def test_record_routing_counts_are_consistent():
    lm = sparse_copy(tiny_lm(), moe()).train()
    _bias_router(lm, [3.0, 1.0, 0.0, 0.0])
    x, img = ids(2, 16), image_mask(2, 16)
    with record_routing(lm) as stats:
        logits(lm, x, img, img.any(1))
        logits(lm, x, img, img.any(1))
    assert set(stats) == {0, 2}
    for s in stats.values():
        assert s["tokens"] == [2 * 20.0, 2 * 12.0]  # two forwards: 20 text + 12 image tokens each
        for m in (0, 1):
            assert sum(s["chosen"][m]) == 2 * s["tokens"][m]
            assert sum(s["processed"][m]) <= 2 * s["tokens"][m]
    assert all(m._record is None for m in sparse_modules(lm))
