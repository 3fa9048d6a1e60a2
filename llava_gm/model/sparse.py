"""Sparse FFN layers of stage 3: the LLaVA-GM / MoE-LLaVA mixture of experts and Eve's EVF layer.

`sparsify(lm, cfg)` swaps the `mlp` of chosen decoder layers of any transformers causal LM for a `SparseFFN`
holding deep copies of that mlp ("upcycling"), so one module serves Gemma 1/2/3, Llama, ... alike.

MoE (LLaVA-GM eq. 5-7, MoE-LLaVA): fp32 linear router, softmax, top-k of E experts; output = sum over the kept
    choices of weight * expert(x), weight = the softmax score (optionally renormalised over the kept choices).
    Capacity per expert = ceil(factor * k * tokens / E) (DeepSpeed's top-2 rule); every token's first choice
    is served before any second choice, then in token order; a dropped choice contributes 0 and a token with no
    choice left passes through on the residual. Balance loss (Switch) = E * sum_e f_e * P_e.
EVF (Eve): experts[0] = language FFN (frozen copy), experts[1] = vision FFN (trainable copy), 2-way router.
    A sample without an image runs the language FFN only: no router, no capacity, exactly the stage-2 FFN.
    Capacity per FFN = ceil(C * routed tokens / 2). Allocation: random | gbpr | img_gbpr (see allocate_evf).
    The FFN output is scaled by 1 + p - stop_grad(p): exactly 1 in value (so upcycled copies reproduce the
    stage-2 outputs at the start of stage 3) while the router gets the gradient of Eve's p-weighted output.
    Balance loss (Eve eq. 4) = F_lang * G_lang + F_vis * G_vis.

Each LM forward runs inside `with modality(lm, image_mask, ...)`, which tells the sparse layers which tokens are
image tokens and clears that again on exit (nothing is left on the modules between calls; outside the context
every token is a text token). After a forward, `aux_losses(lm)` returns its weighted auxiliary losses.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SparseConfig
from ..errors import LlavaGMError

TEXT, IMAGE = 0, 1  # modality index in routing records
LANGUAGE, VISION = 0, 1  # EVF expert index


# ---- where the layers are ------------------------------------------------------------------------
def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM: `get_decoder().layers` where it exists, else the longest ModuleList
    whose blocks all have an `mlp` (covers wrappers that hide the decoder)."""
    try:
        layers = getattr(lm.get_decoder(), "layers", None)
    except (AttributeError, NotImplementedError, TypeError):
        layers = None
    if isinstance(layers, nn.ModuleList) and len(layers) and all(hasattr(b, "mlp") for b in layers):
        return layers
    found = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(b, "mlp") for b in m)]
    if not found:
        raise LlavaGMError(f"{type(lm).__name__}: no list of decoder layers with an `mlp` to sparsify")
    return max(found, key=len)


def select_layers(spec, num_layers: int) -> list[int]:
    """'alternate' = 0, 2, 4, ... (MoE-LLaVA's `sparse` mode, range(0, L, 2), which LLaVA-GM and Eve build on),
    'first_half', 'second_half', 'all', or an explicit list of indices."""
    named = {
        "alternate": range(0, num_layers, 2),
        "first_half": range(0, num_layers // 2),
        "second_half": range(num_layers // 2, num_layers),
        "all": range(num_layers),
    }
    if isinstance(spec, str):
        if spec not in named:
            raise LlavaGMError(f"sparse.layers: {spec!r} is not one of {sorted(named)} or a list of layer indices")
        return list(named[spec])
    idx = [int(i) for i in spec]
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad or len(set(idx)) != len(idx) or not idx:
        raise LlavaGMError(f"sparse.layers: {list(spec)} must be distinct indices in [0, {num_layers})")
    return sorted(idx)


def sparse_modules(lm: nn.Module) -> list["SparseFFN"]:
    return [m for m in lm.modules() if isinstance(m, SparseFFN)]


def sparse_param_names(root: nn.Module) -> set[str]:
    """Names (as in root.named_parameters()) of every parameter of the sparse layers under `root`."""
    ids = {id(m) for m in sparse_modules(root)}
    return {f"{prefix}.{n}" for prefix, m in root.named_modules() if id(m) in ids for n, _ in m.named_parameters()}


# ---- pure routing functions (unit-tested on hand-made tables) -------------------------------------
def capacity(assignments: int, num_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor * assignments / num_experts); assignments = k * tokens (MoE) or tokens (EVF)."""
    return math.ceil(factor * assignments / num_experts - 1e-9)  # epsilon: 1.1 * 50 is 55.00000000000001 in floats


def first_come(expert: torch.Tensor, candidate: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """Entries are in priority order; keep an entry if it is a candidate and fewer than `cap` earlier
    candidates chose the same expert."""
    onehot = F.one_hot(expert, num_experts) * candidate[:, None]
    rank = onehot.cumsum(0).gather(1, expert[:, None]).squeeze(1)  # 1-based rank within its expert
    return candidate & (rank <= cap)


def allocate_topk(probs: torch.Tensor, k: int, cap: Optional[int], routed: Optional[torch.Tensor] = None):
    """MoE allocation. probs [N, E] -> (experts [N, k], scores [N, k], keep [N, k]).
    Priority (DeepSpeed / MoE-LLaVA): all first choices, then all second choices, ...; within a rank, token order."""
    n, num_experts = probs.shape
    scores, experts = probs.topk(k, dim=-1)
    cand = torch.ones(n, dtype=torch.bool, device=probs.device) if routed is None else routed
    cand = cand[:, None].expand(n, k)
    if cap is None:
        return experts, scores, cand.clone()
    keep = first_come(experts.t().reshape(-1), cand.t().reshape(-1), num_experts, cap)  # choice-major order
    return experts, scores, keep.view(k, n).t()


def allocate_evf(probs: torch.Tensor, is_image: torch.Tensor, method: str, cap: int, prior: float = 1.0, share: float = 1.0,
                 generator: Optional[torch.Generator] = None):
    """EVF allocation of routed tokens. probs [N, 2] (language, vision) -> (ffn [N], keep [N]).

    random:   each token goes to its argmax FFN; an overloaded FFN keeps a random `cap` of its tokens.
    gbpr:     an overloaded FFN keeps its `cap` tokens of highest routing probability (Eve's GBPR).
    img_gbpr: score = p + prior on the token's own modality column (image -> vision, text -> language); each
              token goes to its argmax score, an overloaded FFN keeps its `cap` highest scores, and a random
              share `share` of the overflow is re-offered to the other FFN, which takes the highest scores that
              fit its spare slots. Tokens left out are dropped (residual only).
    """
    n = probs.shape[0]
    score = probs
    if method == "img_gbpr":
        score = probs + prior * F.one_hot(is_image.long(), 2).to(probs.dtype)
    ffn = score.argmax(-1)
    if method == "random":
        priority = torch.rand(n, generator=generator, device=probs.device)
    elif method in ("gbpr", "img_gbpr"):
        priority = score.gather(1, ffn[:, None]).squeeze(1)
    else:
        raise LlavaGMError(f"sparse.allocation: {method!r} is not one of random, gbpr, img_gbpr")
    order = priority.argsort(descending=True, stable=True)
    keep = torch.empty_like(ffn, dtype=torch.bool)
    keep[order] = first_come(ffn[order], torch.ones(n, dtype=torch.bool, device=probs.device), 2, cap)
    if method == "img_gbpr" and share > 0 and not bool(keep.all()):
        over = (~keep).nonzero().squeeze(1)
        take = int(math.floor(share * over.numel() + 0.5))
        over = over[torch.randperm(over.numel(), generator=generator, device=probs.device)[:take]] if take < over.numel() else over
        other = 1 - ffn[over]
        spare = (cap - torch.bincount(ffn[keep], minlength=2)).clamp(min=0)
        by_score = score[over, other].argsort(descending=True, stable=True)
        over, other = over[by_score], other[by_score]
        onehot = F.one_hot(other, 2)
        rank = onehot.cumsum(0).gather(1, other[:, None]).squeeze(1)
        ok = rank <= spare[other]
        ffn = ffn.clone()
        ffn[over[ok]] = other[ok]
        keep[over[ok]] = True
    return ffn, keep


def switch_balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e; f_e = share of the router's top-k choices (before capacity) on expert e,
    P_e = mean router probability of e. 1.0 when perfectly balanced."""
    num_experts = probs.shape[-1]
    f = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype) / experts.numel()
    return num_experts * (f * probs.mean(0)).sum()


def eve_balance_loss(probs: torch.Tensor, ffn: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eve eq. 4: F_l * G_l + F_v * G_v; F = share of routed tokens each FFN processed (after allocation),
    G = mean routing probability."""
    f = torch.bincount(ffn[keep], minlength=2).to(probs.dtype) / max(probs.shape[0], 1)
    return (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits, -1).square().mean()


# ---- the module ---------------------------------------------------------------------------------
class Router(nn.Linear):
    """Linear gate kept in fp32 whatever the model's dtype or autocast: routing decisions flip on rounding."""

    def __init__(self, hidden: int, num_experts: int, device=None):
        super().__init__(hidden, num_experts, bias=False, device=device, dtype=torch.float32)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:  # model.to(bfloat16) / .half() leave the router in fp32
            self.weight.data = self.weight.data.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class _Record:
    """Routing counts of one layer, accumulated over forwards while recording (rows: text, image)."""

    def __init__(self, num_experts: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.tokens, self.dropped, self.entropy, self.bypass = z(2), z(2), z(2), z(2)
        self.chosen, self.processed, self.prob = z(2, num_experts), z(2, num_experts), z(2, num_experts)

    @torch.no_grad()
    def add(self, modality, probs, chosen, processed, dropped, bypass=None):
        m = modality.long().cpu()
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        self.tokens += torch.bincount(m, minlength=2).double()
        self.entropy.index_add_(0, m, ent.double().cpu())
        self.prob.index_add_(0, m, probs.double().cpu())
        self.chosen.index_add_(0, m, chosen.double().cpu())
        self.processed.index_add_(0, m, processed.double().cpu())
        self.dropped.index_add_(0, m, dropped.double().cpu())
        if bypass is not None:
            self.bypass += torch.bincount(bypass.long().cpu(), minlength=2).double()

    def as_dict(self) -> dict:
        return {k: v.tolist() for k, v in vars(self).items()}


class SparseFFN(nn.Module):
    """A decoder layer's FFN replaced by `num_experts` copies of it and a router (kind 'moe' or 'evf')."""

    def __init__(self, mlp: nn.Module, cfg: SparseConfig, hidden_size: int, layer_idx: int, init_std: float = 0.02):
        super().__init__()
        if cfg.kind not in ("moe", "evf"):
            raise LlavaGMError(f"sparse.kind {cfg.kind!r}: a sparse layer is 'moe' or 'evf'")
        self.cfg = dataclasses.replace(cfg)
        self.kind = cfg.kind
        self.layer_idx = layer_idx
        self.num_experts = cfg.num_experts if cfg.kind == "moe" else 2
        self.top_k = cfg.top_k if cfg.kind == "moe" else 1
        if not 1 <= self.top_k <= self.num_experts:
            raise LlavaGMError(f"sparse.top_k = {cfg.top_k} must be between 1 and num_experts = {cfg.num_experts}")
        if cfg.kind == "evf" and cfg.allocation not in ("random", "gbpr", "img_gbpr"):
            raise LlavaGMError(f"sparse.allocation: {cfg.allocation!r} is not one of random, gbpr, img_gbpr")
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(self.num_experts))
        device = next(mlp.parameters()).device
        self.router = Router(hidden_size, self.num_experts, device=device)
        # seeded by the layer index: the same config rebuilds the same module whatever the global RNG did
        g = torch.Generator().manual_seed(layer_idx)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=g) * init_std)
        self._masks: tuple = (None, None, None)  # image_mask, sample_has_image, token_mask: set only inside `modality`
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: Optional[dict] = None  # what last_aux is made of (for the balance loss over all ranks)
        self._record: Optional[_Record] = None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer_idx}, experts={self.num_experts}, top_k={self.top_k}"

    # which tokens are what, flattened to [N]
    def _token_masks(self, lead: torch.Size, device):
        image_mask, has_image, token_mask = self._masks
        n = math.prod(lead)

        def flat(m, what):
            if m is None:
                return None
            if tuple(m.shape) != tuple(lead):
                raise LlavaGMError(f"modality: {what} has shape {tuple(m.shape)} but this forward has tokens {tuple(lead)}; "
                                   "give the masks of the forward run inside `with modality(lm, ...)`")
            return m.reshape(-1).to(device=device, dtype=torch.bool)

        image = flat(image_mask, "image_mask")
        valid = flat(token_mask, "token_mask")
        if has_image is None and image_mask is not None:
            has_image = image_mask.any(-1)
        if has_image is not None:
            if has_image.numel() != lead[0] or len(lead) != 2:
                raise LlavaGMError(f"modality: sample_has_image has {has_image.numel()} entries but this forward has tokens {tuple(lead)}")
            has_image = has_image.to(device=device, dtype=torch.bool)[:, None].expand(lead).reshape(-1)
        if image is None:
            image = torch.zeros(n, dtype=torch.bool, device=device)
        return image, has_image, valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d)
        image, has_image, valid = self._token_masks(lead, x.device)
        self.last_aux, self.last_stats = {}, None
        if self.kind == "evf":
            routed = None if has_image is None else (has_image if valid is None else has_image & valid)
            if routed is None or not bool(routed.any()):
                if self._record is not None:
                    self._record.bypass += torch.bincount(image.long().cpu(), minlength=2).double()
                out = self.experts[LANGUAGE](x)  # text-only: exactly the stage-2 FFN
                if self.training and torch.is_grad_enabled():
                    # the router and vision FFN still take part in the graph (zero gradient), so a rank whose
                    # batch has no image reduces the same gradients as the others (DDP, FSDP): adds exactly 0
                    none = xf[:0]
                    out = out + (self.experts[VISION](none).sum() + self.router(none).sum()).to(out.dtype) * 0
                return out
            experts, weights, keep = self._route_evf(xf, image, routed)
        else:
            experts, weights, keep = self._route_moe(xf, image, valid)
        return self._dispatch(xf, experts, weights, keep).view(x.shape)

    def _aux(self, logits, balance, counts, total, probs, scale):
        """The layer's weighted auxiliary losses, and the statistics they are made of (for `global_aux_losses`):
        balance = scale * sum_e (counts_e / total) * (sum of probs_e / tokens); z = mean squared log-partition."""
        if self.cfg.balance_coef:
            self.last_aux["balance"] = self.cfg.balance_coef * balance
        if self.cfg.z_loss_coef:
            self.last_aux["z"] = self.cfg.z_loss_coef * z_loss(logits)
        if self.cfg.balance_coef or self.cfg.z_loss_coef:
            self.last_stats = {"counts": counts.detach().double(), "total": float(total), "tokens": float(probs.shape[0]),
                               "prob_sum": probs.sum(0), "scale": float(scale),
                               "z_sum": torch.logsumexp(logits, -1).square().sum() if self.cfg.z_loss_coef else None}

    def _route_moe(self, xf, image, valid):
        logits = self.router(xf)
        probs = logits.softmax(-1)
        factor = self.cfg.capacity_factor_train if self.training else self.cfg.capacity_factor_eval
        n_routed = xf.shape[0] if valid is None else int(valid.sum())
        cap = None if factor is None else capacity(self.top_k * n_routed, self.num_experts, factor)
        experts, scores, keep = allocate_topk(probs, self.top_k, cap, valid)
        weights = scores * keep
        if self.cfg.renormalize:  # over the choices that were kept (DeepSpeed's top-2 does the same)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
        r = slice(None) if valid is None else valid
        if n_routed:
            chosen = experts[r]
            self._aux(logits[r], switch_balance_loss(probs[r], chosen), torch.bincount(chosen.reshape(-1), minlength=self.num_experts),
                      chosen.numel(), probs[r], self.num_experts)
        if self._record is not None and n_routed:
            oh = F.one_hot(experts[r], self.num_experts)
            self._record.add(image[r], probs[r].detach(), oh.sum(1), (oh * keep[r][..., None]).sum(1), ~keep[r].any(-1))
        return experts, weights, keep

    def _route_evf(self, xf, image, routed):
        idx = routed.nonzero().squeeze(1)
        logits = self.router(xf[idx])
        probs = logits.softmax(-1)
        cfg = self.cfg
        cap = capacity(idx.numel(), 2, cfg.evf_capacity)
        ffn, keep = allocate_evf(probs.detach(), image[idx], cfg.allocation, cap, cfg.img_prior, cfg.overflow_share)
        p = probs.gather(1, ffn[:, None]).squeeze(1)
        w = (1.0 + p - p.detach()) * keep  # value 1 (or 0 if dropped); gradient of Eve's p-weighted output
        self._aux(logits, eve_balance_loss(probs, ffn, keep), torch.bincount(ffn[keep], minlength=2), max(probs.shape[0], 1), probs, 1)
        if self._record is not None:
            oh = F.one_hot(ffn, 2)
            self._record.add(image[idx], probs.detach(), F.one_hot(probs.argmax(-1), 2), oh * keep[:, None], ~keep,
                             bypass=image[~routed])
        # tokens of samples without an image (and padding of those with one): language FFN, weight 1
        n = xf.shape[0]
        experts = torch.zeros(n, 1, dtype=torch.long, device=xf.device).index_put((idx,), ffn[:, None])
        keep_all = torch.ones(n, 1, dtype=torch.bool, device=xf.device).index_put((idx,), keep[:, None])
        weights = torch.ones(n, 1, dtype=torch.float32, device=xf.device).index_put((idx,), w[:, None])
        return experts, weights, keep_all

    def _dispatch(self, xf, experts, weights, keep):
        """Group kept (token, choice) pairs by expert with one sort, run each expert once on its contiguous
        block, weight in fp32 and sum a token's choices."""
        n, k = experts.shape
        slots = keep.reshape(-1).nonzero().squeeze(1)
        e, order = experts.reshape(-1)[slots].sort(stable=True)
        slots = slots[order]
        counts = torch.bincount(e, minlength=self.num_experts).tolist()
        dev = xf.device.type
        if torch.is_autocast_enabled(dev):  # cast once here, not once per expert linear (same values)
            xf = xf.to(torch.get_autocast_dtype(dev))
        ys = torch.cat(self._run_experts(xf.index_select(0, slots // k), counts))  # index_select: faster backward than xf[idx]
        out_dtype = ys.dtype  # what the FFN itself returns (bf16 under autocast), as the dense layer would
        ys = ys.float() * weights.reshape(-1)[slots, None]
        # index_copy into (token, choice) rows, then sum a token's choices: faster on CPU than index_add_ (a scatter)
        out = ys.new_zeros(n * k, ys.shape[-1]).index_copy(0, slots, ys)
        return (out.view(n, k, -1).sum(1) if k > 1 else out).to(out_dtype)

    def _run_experts(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Outputs for the rows of xs, grouped by expert (counts[e] rows each), as a list of blocks in that order.
        One call per expert; any mlp module works (bench/moe_layer.py measures a grouped_mm variant)."""
        return [ffn(chunk) for ffn, chunk in zip(self.experts, xs.split(counts))]

    def trainable_parameter_names(self) -> list[str]:
        """MoE: router + all experts. EVF: router + vision FFN (the language FFN stays the frozen stage-2 FFN)."""
        keep = ("router.", "experts.") if self.kind == "moe" else ("router.", f"experts.{VISION}.")
        return [n for n, _ in self.named_parameters() if n.startswith(keep)]


# ---- the API the model and trainer call ------------------------------------------------------------
def sparsify(lm: nn.Module, cfg: SparseConfig) -> list[int]:
    """Replace the `mlp` of the layers `cfg.layers` selects with SparseFFNs upcycled from it; return their indices.
    kind 'none' changes nothing. Parameter names: <layer>.mlp.router.weight, <layer>.mlp.experts.<e>.<mlp param>."""
    if cfg.kind == "none":
        return []
    layers = decoder_layers(lm)
    idx = select_layers(cfg.layers, len(layers))
    text_cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for i in idx:
        if isinstance(layers[i].mlp, SparseFFN):
            raise LlavaGMError(f"decoder layer {i} is already sparse; sparsify a model once")
    for i in idx:
        mlp = layers[i].mlp
        layers[i].mlp = SparseFFN(mlp, cfg, text_cfg.hidden_size, i, getattr(text_cfg, "initializer_range", 0.02)).train(mlp.training)
    return idx


@contextmanager
def modality(lm: nn.Module, image_mask: Optional[torch.Tensor], sample_has_image: Optional[torch.Tensor],
             token_mask: Optional[torch.Tensor] = None):
    """Tell the sparse layers about the tokens of the forwards run inside; cleared on exit, errors included.
    image_mask [B, T]: image-token positions; sample_has_image [B]: samples with an image anywhere (needed in
    cached decoding, where T = 1); token_mask [B, T] (optional, the attention mask): False = padding, which takes
    no capacity and no loss. All None = text only."""
    mods = sparse_modules(lm)
    for m in mods:
        m._masks = (image_mask, sample_has_image, token_mask)
    try:
        yield
    finally:
        for m in mods:
            m._masks = (None, None, None)


def aux_losses(lm: nn.Module) -> dict[str, torch.Tensor]:
    """Weighted auxiliary losses of the last forward summed over sparse layers ({} if none)."""
    total: dict[str, torch.Tensor] = {}
    for m in sparse_modules(lm):
        for k, v in m.last_aux.items():
            total[k] = total[k] + v if k in total else v
    return total


def global_aux_losses(lm: nn.Module, all_reduce, world: int) -> dict[str, torch.Tensor]:
    """The auxiliary losses of the last forward taken over every rank's tokens, as one process with the whole batch
    would take them: the routing counts and token numbers of all ranks are summed (one `all_reduce` of a float64
    vector, every layer at once); each rank keeps the differentiable part of its own tokens, scaled by `world`, so
    the mean over ranks (what DDP and FSDP do to gradients, and what the trainer logs) is the whole batch's loss
    and gradient. Balance: scale * sum_e (C_e / C) * (P_e / N), C_e choices of expert e and C all choices of all
    ranks, P_e this rank's sum of router probabilities, N all ranks' tokens; z: this rank's sum / N.
    (DeepSpeed-MoE and Megatron take the balance loss per rank, a different loss once ranks route differently.)"""
    mods = sparse_modules(lm)
    if not mods:
        return {}
    parts = []
    for m in mods:
        s = m.last_stats
        parts.append(torch.zeros(m.num_experts + 2, dtype=torch.float64) if s is None else
                     torch.cat([s["counts"].cpu(), torch.tensor([s["total"], s["tokens"]], dtype=torch.float64)]))
    summed = all_reduce(torch.cat(parts)).split([m.num_experts + 2 for m in mods])
    total: dict[str, torch.Tensor] = {}
    for m, g in zip(mods, summed):
        s, counts, choices, tokens = m.last_stats, g[:-2], float(g[-2]), float(g[-1])
        if s is None or tokens == 0:
            continue
        terms = {}
        if m.cfg.balance_coef:
            f = (counts / choices).to(s["prob_sum"].device, s["prob_sum"].dtype)
            terms["balance"] = m.cfg.balance_coef * s["scale"] * (f * s["prob_sum"]).sum() * (world / tokens)
        if m.cfg.z_loss_coef:
            terms["z"] = m.cfg.z_loss_coef * s["z_sum"] * (world / tokens)
        for k, v in terms.items():
            total[k] = total[k] + v if k in total else v
    return total


def sparse_trainable(lm: nn.Module) -> list[str]:
    """Names (as in lm.named_parameters()) of what stage 3 trains."""
    names = []
    for prefix, m in lm.named_modules():
        if isinstance(m, SparseFFN):
            names += [f"{prefix}.{n}" for n in m.trainable_parameter_names()]
    return names


@contextmanager
def record_routing(lm: nn.Module):
    """Count routing over the forwards run inside; yields a dict filled on exit: {layer: routing_stats entry}."""
    stats: dict[int, dict] = {}
    mods = sparse_modules(lm)
    for m in mods:
        m._record = _Record(m.num_experts)
    try:
        yield stats
    finally:
        stats.update(routing_stats(lm))
        for m in mods:
            m._record = None


def routing_stats(lm: nn.Module) -> dict[int, dict]:
    """Counts so far while recording, per sparse layer. Rows are [text, image]; counts are of routed tokens:
    tokens, chosen [2, E] (router top-k picks, EVF: router argmax), processed [2, E] (what the experts ran),
    dropped (tokens with no choice kept), entropy (sum of router entropy, nats), prob [2, E] (sum of router
    probabilities), bypass (EVF tokens of image-less samples: language FFN, no router)."""
    out = {}
    for m in sparse_modules(lm):
        if m._record is not None:
            out[m.layer_idx] = {"kind": m.kind, "num_experts": m.num_experts, "top_k": m.top_k, **m._record.as_dict()}
    return out
