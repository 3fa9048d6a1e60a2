"""Inference-only fast path for Gemma-family decoders (Gemma 1, 2 and 3): the same weights, fewer and faster ops.

Why: at batch 1 a new token through transformers' eager Gemma costs ~35 ms of decoder body on a 2-core CPU,
~14 ms of it per-op overhead (mask building, cache bookkeeping, a dozen module calls per layer), and PyTorch's
plain bf16 `linear` at one row streams weights at half the speed of oneDNN with weights packed once.
`FastDecoder` reads the weights of a loaded transformers decoder and runs the same maths with q/k/v and
gate/up fused into one product each, weights packed for oneDNN on CPUs and its own KV cache. A layer whose
`mlp` is not a plain Gemma MLP (stage 3's MoE / EVF layers) calls that module as it is.

`GreedyHead` returns the exact argmax token of the vocabulary projection without a full bf16 pass over the
vocabulary (262k x 640 for Gemma 3, the largest matrix of a small model): a 4-bit copy scores every word,
a bound on the 4-bit error keeps only the words that could still be the best, and those are scored again
with the model's own weights. The chosen token is the argmax of the exact scores (ties: lowest id).

Both are snapshots of the weights: build them after training, for answering (the `Answerer` does).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.cache import KVCache  # the engine's one cache


def _can_pack(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """y = x @ W.T with W packed once into oneDNN's blocked layout (CPU); plain `F.linear` elsewhere, or with
    `pack=False` (for torch.compile, whose freezing packs the weight itself)."""

    def __init__(self, weight: torch.Tensor, pack: bool = True):
        super().__init__()
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.packed = None
        if pack and _can_pack(self.weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 1)
                self.weight = None  # the packed copy is all we need
            except (RuntimeError, AttributeError):
                self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, None, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class _Norm(nn.Module):
    """Gemma's RMSNorm, computed in fp32 and scaled by (1 + w): the 1 folded in once."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(1.0 + norm.weight.detach().float(), requires_grad=False)
        self.eps = float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class _Layer(nn.Module):
    """One decoder layer on fused weights; `pack=False` keeps plain weights (for torch.compile)."""

    def __init__(self, layer: nn.Module, pack: bool = True):
        super().__init__()
        attn = layer.self_attn
        self.heads = attn.q_proj.out_features // attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.head_dim = attn.head_dim
        self.qkv = PackedLinear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), pack)
        self.o = PackedLinear(attn.o_proj.weight, pack)
        self.q_norm = _Norm(attn.q_norm) if hasattr(attn, "q_norm") else None
        self.k_norm = _Norm(attn.k_norm) if hasattr(attn, "k_norm") else None
        self.scaling = float(attn.scaling)
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.window = getattr(attn, "sliding_window", None)
        self.layer_type = getattr(attn, "layer_type", None)
        self.input_norm = _Norm(layer.input_layernorm)
        # Gemma 2/3 norm the attention and FFN outputs too; Gemma 1's `post_attention_layernorm` is its pre-FFN norm
        self.sandwich = hasattr(layer, "pre_feedforward_layernorm")
        if self.sandwich:
            self.post_attn_norm = _Norm(layer.post_attention_layernorm)
            self.pre_ffn_norm = _Norm(layer.pre_feedforward_layernorm)
            self.post_ffn_norm = _Norm(layer.post_feedforward_layernorm)
        else:
            self.pre_ffn_norm = _Norm(layer.post_attention_layernorm)
        mlp = layer.mlp
        self.dense = all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        if self.dense:
            self.gate_up = PackedLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), pack)
            self.down = PackedLinear(mlp.down_proj.weight, pack)
            self.act = mlp.act_fn
        else:
            self.mlp = mlp  # a sparse FFN of stage 3: its own routing, called as is

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dense:
            return self.mlp(x)
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(self.act(gate) * up)

    def forward(self, h, cos_sin, masks, cache: KVCache, index: int):
        b, t, _ = h.shape
        x = self.input_norm(h)
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = cache.update(index, k, v)
        mask = masks[self.window]
        if self.softcap:  # Gemma 2: capped scores, which SDPA cannot do
            rep = self.heads // self.kv_heads
            scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * self.scaling
            scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
            a = scores @ v.repeat_interleave(rep, 1)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=self.heads != self.kv_heads)
        a = self.o(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        if self.sandwich:
            h = h + self.post_attn_norm(a)
            return h + self.post_ffn_norm(self.ffn(self.pre_ffn_norm(h)))
        h = h + a
        return h + self.ffn(self.pre_ffn_norm(h))


# nn.Module's call machinery (hooks) costs a few microseconds per call, ~200 calls per token: call forward directly
for _cls in (PackedLinear, _Norm, _Layer):
    _cls.__call__ = _cls.forward


class FastDecoder:
    """Called like a transformers decoder (`inputs_embeds`, `attention_mask` over past + new tokens, `position_ids`,
    `past_key_values`), returns `.last_hidden_state` (final norm applied) and `.past_key_values` (a KVCache)."""

    SUPPORTED = ("GemmaModel", "Gemma2Model", "Gemma3TextModel")

    def __init__(self, decoder: nn.Module):
        self.layers = [_Layer(layer) for layer in decoder.layers]
        self.norm = _Norm(decoder.norm)
        self.rotary = decoder.rotary_emb
        self.rotary_by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters

    @classmethod
    def build(cls, decoder: nn.Module) -> tuple[Optional["FastDecoder"], str]:
        """(fast decoder, "") or (None, why not): other architectures keep transformers' own forward."""
        name = type(decoder).__name__
        if name not in cls.SUPPORTED:
            return None, f"{name} is not a Gemma 1/2/3 decoder"
        if getattr(decoder.config, "use_bidirectional_attention", False):
            return None, "bidirectional attention"
        return cls(decoder), ""

    def masks(self, attention_mask: torch.Tensor, t: int, capacity: Optional[int] = None) -> dict:
        """Boolean [batch, 1, t, keys] masks: causal, padding hidden, and per sliding window (by cache index, as
        transformers counts it). Each token always sees itself, so rows of padding stay finite. `capacity`: keys
        of a fixed-size cache, whose slots past the attention mask's length are hidden (they lie in the future)."""
        s = attention_mask.shape[1]
        key = torch.arange(capacity or s, device=attention_mask.device)
        query = key[s - t : s, None]
        valid = F.pad(attention_mask.bool(), (0, len(key) - s))
        base = (key[None, :] <= query)[None] & valid[:, None, :]
        masks = {}
        for window in {layer.window for layer in self.layers}:
            m = base if not window else base & (key[None, :] > query - window)[None]
            masks[window] = (m | (key[None, :] == query)[None])[:, None]
        return masks

    def cos_sin(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Rotary cos and sin per layer type (Gemma 3's local and global layers use different bases)."""
        out = {}
        for layer in self.layers:
            if layer.layer_type not in out:
                args = (layer.layer_type,) if self.rotary_by_type else ()
                cos, sin = self.rotary(h, position_ids, *args)
                out[layer.layer_type] = (cos[:, None], sin[:, None])
        return out

    @torch.no_grad()
    def __call__(self, inputs_embeds, attention_mask, position_ids, past_key_values: Optional[KVCache] = None, use_cache=True, **_):
        h = inputs_embeds
        cache = past_key_values if past_key_values is not None else KVCache(len(self.layers))
        masks = self.masks(attention_mask, h.shape[1])
        cos_sin = self.cos_sin(h, position_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin[layer.layer_type], masks, cache, i)
        return SimpleNamespace(last_hidden_state=self.norm(h), past_key_values=cache)


class GreedyHead:
    """argmax_i (W h)_i, exact, for few rows of h: a 4-bit screen, then the candidates on the model's weights.

    Hidden states of LMs put most of their length in a few fixed channels (on Gemma 3 270M, 32 of 640 channels
    carry ~55-80% of ||h||^2). Those `OUTLIERS` columns of W stay in bf16 and are multiplied exactly; the other
    columns get a 4-bit copy with per-group (32 columns) scale and offset. For every word i the screen's error is
    then at most ||W_i,rest - Q_i|| ||h_rest|| (Cauchy-Schwarz on the exact quantisation error of that row), plus
    bf16 rounding of the inputs and of the outputs, each at most 2^-8 relative: 2^-6 (||Q_i|| ||h_rest|| +
    ||W_i,out|| ||h_out||) covers both with room for fp32 accumulation.
    Which channels are outliers is measured once on hidden states of a fixed token sequence (`calibration`);
    any choice keeps the bound valid, a good one keeps it tight. The screen's favourite is scored exactly first;
    a word whose upper bound is below that score cannot be the argmax; the rest (tens to hundreds of the
    262k words) are scored on the model's weights in fp32.

    Several rows (a server's batch) share one pass over the weights instead: the model's own product (bf16
    weights, fp32 accumulation, bf16 out) is the screen, whose error is bounded by the rounding of the inputs
    (exactly ||W_i|| ||bf16(h) - h||), of the outputs (2^-8 |y_i|, taken as 2^-7) and the fp32 accumulation
    (2^-12 ||W_i|| ||h||, far above it), and the same exact rescoring follows. The 4-bit kernel's cost grows with
    the rows (on a 2-core AMX host, 8 rows: ~46 ms vs ~38 ms for the bf16 pass; 2026-12-06), the bf16 pass's does not.
    """

    GROUP = 32
    OUTLIERS = 32  # channels kept exact: a multiple of GROUP, so the rest still tiles into groups
    FOURBIT_ROWS = 1  # up to this many rows: the 4-bit screen; more (up to MAX_ROWS): the bf16 screen
    MAX_ROWS = 8  # beyond this, the plain bf16 argmax (what transformers' greedy search takes), not rescored
    MAX_CANDIDATES = 16384

    def __init__(self, weight: torch.Tensor, outliers: torch.Tensor, rest: torch.Tensor, packed, scales_zeros, slack: torch.Tensor,
                 slack_out: torch.Tensor):
        self.weight, self.packed, self.scales_zeros = weight, packed, scales_zeros
        self.outliers, self.rest = outliers, rest  # channel ids multiplied exactly, and those the 4-bit copy holds
        self.out_weight = PackedLinear(weight[:, outliers].to(torch.bfloat16).contiguous()) if len(outliers) else None
        self.slack = slack  # per word: ||W_i,rest - Q_i|| + ||Q_i|| / 64, times ||h_rest|| bounds the 4-bit screen's error
        self.slack_out = slack_out  # per word: ||W_i,out|| / 64, times ||h_out|| bounds the bf16 roundings of the exact part
        self.full = PackedLinear(weight)
        self.norms = torch.cat([weight[r : r + 8192].float().norm(dim=1) for r in range(0, weight.shape[0], 8192)])  # ||W_i||
        self.screened = 0  # candidates scored exactly, over all calls (tests and benches read it)

    @classmethod
    def build(cls, head: nn.Module, calibration: Optional[torch.Tensor] = None) -> tuple[Optional["GreedyHead"], str]:
        """`calibration`: hidden states [n, hidden] whose largest mean |h| channels become the exact ones."""
        w = head.weight.detach()
        if getattr(head, "bias", None) is not None:
            return None, "the output layer has a bias"
        if w.device.type != "cpu" or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return None, "4-bit screening runs on CPUs only"
        n, k = w.shape
        n_out = cls.OUTLIERS if calibration is not None and k > cls.OUTLIERS else 0
        k_rest = k - n_out
        if k_rest % cls.GROUP or n % 16 or k_rest < cls.GROUP:
            return None, f"output layer {n}x{k} does not tile into 4-bit groups of {cls.GROUP}"
        outliers = torch.empty(0, dtype=torch.long)
        if n_out:
            outliers = calibration.float().abs().mean(0).topk(n_out).indices.sort().values
        rest = torch.tensor(sorted(set(range(k)) - set(outliers.tolist())), dtype=torch.long)
        q = torch.empty(n, k_rest, dtype=torch.int32)
        scales_zeros = torch.empty(k_rest // cls.GROUP, n, 2, dtype=torch.bfloat16)
        slack, slack_out = torch.empty(n), torch.empty(n)
        for r in range(0, n, 8192):  # in row blocks: whole-matrix temporaries cost seconds of page faults
            block = w[r : r + 8192].float()
            wf = block[:, rest].view(-1, k_rest // cls.GROUP, cls.GROUP)
            lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
            # the kernel dequantises (q - 8) * scale + zero with bf16 scale and zero: bound the error of exactly that
            scale = ((hi - lo) / 15).clamp(min=1e-12).bfloat16().float()
            zero = (lo + 8 * scale).bfloat16().float()
            qb = torch.round((wf - zero) / scale + 8).clamp(0, 15)
            deq = (qb - 8) * scale + zero
            q[r : r + 8192] = qb.view(-1, k_rest).to(torch.int32)
            scales_zeros[:, r : r + 8192] = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], -1)
            slack[r : r + 8192] = (wf - deq).flatten(1).norm(dim=1) + deq.flatten(1).norm(dim=1) / 64
            slack_out[r : r + 8192] = block[:, outliers].norm(dim=1) / 64
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 8)
        except RuntimeError as e:
            return None, f"4-bit packing failed: {e}"
        return cls(w.to(torch.bfloat16) if w.dtype != torch.float32 else w, outliers, rest, packed, scales_zeros, slack, slack_out), ""

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [rows, hidden] -> token ids [rows]."""
        if h.shape[0] > self.MAX_ROWS:  # a batch: the plain bf16 argmax, as transformers' greedy search takes it
            return self.full(h.to(self.weight.dtype)).float().argmax(-1)
        if h.shape[0] > self.FOURBIT_ROWS:
            return self._screen_full(h)
        hf = h.float()
        h_rest = hf[:, self.rest]
        a = torch._weight_int4pack_mm_for_cpu(h_rest.to(torch.bfloat16), self.packed, self.GROUP, self.scales_zeros).float()
        if self.out_weight is not None:
            h_out = hf[:, self.outliers]
            a = a + self.out_weight(h_out.to(torch.bfloat16))
            upper = torch.addcmul(a, h_out.norm(dim=-1, keepdim=True), self.slack_out)
        upper = torch.addcmul(upper if self.out_weight is not None else a, h_rest.norm(dim=-1, keepdim=True), self.slack)
        out = []
        for row in range(h.shape[0]):
            x = hf[row]
            # a floor from the exact score of the screen's favourite, then every word whose upper bound reaches it
            floor = self.weight[a[row].argmax()].float() @ x
            cand = torch.nonzero(upper[row] >= floor).squeeze(-1)
            if cand.numel() > self.MAX_CANDIDATES:  # a flat distribution: score everything
                out.append(self.full(h[row : row + 1].to(self.weight.dtype)).float().argmax(-1)[0])
                continue
            self.screened += cand.numel()
            exact = self.weight.index_select(0, cand).float() @ x
            out.append(cand[exact.argmax()])  # cand ascends, so ties go to the lowest id
        return torch.stack(out)

    def _screen_full(self, h: torch.Tensor) -> torch.Tensor:
        """The same exact argmax for several rows, screened by one bf16 pass over the vocabulary."""
        hf = h.float()
        h_in = h.to(self.weight.dtype)
        y = self.full(h_in).float()
        top = y.argmax(-1)
        floor = (self.weight.index_select(0, top).float() * hf).sum(-1, keepdim=True)  # exact score of each row's favourite
        # |error| <= 2^-7 |y_i| + ||W_i|| (||bf16(h) - h|| + 2^-12 ||h||): a word below floor - error cannot win
        reach = ((h_in.float() - hf).norm(dim=-1, keepdim=True) + hf.norm(dim=-1, keepdim=True) * 2**-12) * self.norms
        rows, cols = torch.nonzero(y.abs().mul_(2**-7).add_(y).add_(reach) >= floor, as_tuple=True)
        self.screened += rows.numel()
        out = []
        for row in range(h.shape[0]):
            cand = cols[rows == row]
            exact = self.weight.index_select(0, cand).float() @ hf[row]
            out.append(cand[exact.argmax()])  # cand ascends, so ties go to the lowest id
        return torch.stack(out)


class FastLM:
    """The fast pieces that apply to a causal LM; `notes` says which were left out and why. `compile=True` also
    runs one-token decode steps through torch.compile (model/compiled.py)."""

    def __init__(self, lm: nn.Module, compile: bool = False):
        self.decoder, why_decoder = FastDecoder.build(lm.get_decoder())
        self.head, why_head = GreedyHead.build(lm.get_output_embeddings(), self._calibration(lm))
        whys = [("fast decoder", why_decoder), ("screened head", why_head)]
        if compile:
            from .compiled import CompiledDecoder

            compiled, why_compiled = CompiledDecoder.build(lm.get_decoder(), self.decoder)
            self.decoder = compiled or self.decoder
            whys.append(("compiled decode step", why_compiled))
        self.notes = [f"{what}: {why}" for what, why in whys if why]

    def _calibration(self, lm: nn.Module) -> torch.Tensor:
        """Final hidden states of a fixed pseudo-random token sequence: which channels carry most of h (they
        hardly depend on the text)."""
        vocab = lm.get_input_embeddings().weight.shape[0]
        ids = (torch.arange(64) * 7919 + 1000) % vocab
        decoder = self.decoder or lm.get_decoder()
        with torch.no_grad():
            embeds = lm.get_input_embeddings()(ids[None].to(lm.device))
            mask = torch.ones(1, 64, dtype=torch.long, device=lm.device)
            return decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1).last_hidden_state[0].cpu()
