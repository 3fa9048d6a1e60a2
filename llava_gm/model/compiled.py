"""torch.compile for serving: one-token decode steps (the same maths as `FastDecoder`) and the vision tower.

Decode steps. Why: after `FastDecoder`, a Gemma 3 270M step on a 2-core CPU is ~14 ms of matrix products and
~10 ms of some 70 small ops per layer (norms, rotary, cache, casts), each paying PyTorch's per-op cost. Inductor
fuses those into a few C++ loops and, with freezing, packs the weights for oneDNN itself (measured: step
30 -> 18 ms). Compiling needs fixed shapes, so the keys and values live in a fixed-size cache (`StaticKVCache`,
capacity in steps of 128) written in place.

Vision tower: compiled for one image at a time (one shape); its matrix products run on packed bf16 weights
and its norms and activations are fused: 20.5 -> 8.5 ms for the offline DINOv2 ViT-S/14 at 112 px on 2 cores.

A one-prompt prefill compiles too: the prompt is left-padded to a multiple of 32 tokens (padding the masks
hide), so prompts of similar length share one graph. Batched prefills and prefills onto a cache (questions
sharing an image's prefix) stay on `FastDecoder`.

Costs: 20-40 s to compile each graph on 2 cores (per batch size, padded length and cache capacity), at its first
call; later calls of that shape reuse it, and past MAX_SHAPES shapes the eager path takes the rest. So this is
opt-in (`Answerer(compile=True)`, `--compile`): for a process that answers many questions, not for one. Fused
kernels round differently from eager ones (features and hidden states agree to ~1% in bf16, like any two bf16
kernels). Without a working compiler (no C++ toolchain) the first call says why and the eager path carries on.
"""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fast_lm import FastDecoder, KVCache, _Layer, _Norm

CAPACITY_STEP = 128  # cache slots come in steps of this: each new capacity is a new shape, compiled once
PREFILL_STEP = 32  # prompts are left-padded to a multiple of this, for the same reason
MAX_SHAPES = 8  # shapes compiled per decoder; others (unusual batch sizes or lengths) run the eager fast decoder
# freezing: weights become constants, packed for oneDNN; cpp_wrapper: the graph's calls made from C++, not Python
# (a step has ~200 kernels: measured 0.55x vs 0.69x of the eager step time, for ~1.6x the compile time)
INDUCTOR = {"freezing": True, "cpp_wrapper": True}


class StaticKVCache:
    """Keys and values per layer in fixed [batch, kv_heads, capacity, head_dim] tensors, filled up to `length`.
    The first `offset` slots are padding added by a bucketed prefill: hidden from attention, and absent from the
    caller's attention mask (which describes its own tokens only)."""

    def __init__(self, k: list, v: list, length: int, offset: int = 0):
        self.k, self.v, self.length, self.offset = k, v, length, offset

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def from_growing(cls, cache: KVCache, capacity: int) -> "StaticKVCache":
        return cls([_place(t, capacity) for t in cache.k], [_place(t, capacity) for t in cache.v], cache.k[0].shape[2])

    def grow(self, capacity: int) -> None:
        """Move to a larger capacity (a new shape: the step compiles once more)."""
        self.k = [_place(t[:, :, : self.length], capacity) for t in self.k]
        self.v = [_place(t[:, :, : self.length], capacity) for t in self.v]

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]

    def to_growing(self) -> KVCache:
        """The filled slots without the padding, as the eager decoder keeps them."""
        out = KVCache(len(self.k))
        out.k = [t[:, :, self.offset : self.length] for t in self.k]
        out.v = [t[:, :, self.offset : self.length] for t in self.v]
        return out

    @staticmethod
    def capacity_for(length: int) -> int:
        return -(-(length + 1) // CAPACITY_STEP) * CAPACITY_STEP


def _allow_recompiles(n: int = 64) -> None:
    """Dynamo keeps one cache per code object: every decoder of a process (each checkpoint loaded) and every shape
    share `_Step.forward`'s. Past its limit (8) dynamo silently runs the uncompiled module, so raise it."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


def _give_up(what: str, e: Exception) -> str:
    """Why compiling `what` failed, warned once; the caller carries on with its eager path."""
    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    warnings.warn(f"torch.compile of the {what} failed ({why}); carrying on without it")
    return why


def _place(t: torch.Tensor, capacity: int) -> torch.Tensor:
    b, heads, n, d = t.shape
    out = t.new_zeros(b, heads, capacity, d)
    out[:, :, :n] = t
    return out


class _Slots:
    """The cache as a layer sees it inside the graph: the new key and value written at `index`, in place."""

    def __init__(self, k: list, v: list, index: torch.Tensor):
        self.k, self.v, self.index = k, v, index

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        self.k[i].index_copy_(2, self.index, k)
        self.v[i].index_copy_(2, self.index, v)
        return self.k[i], self.v[i]


class _Step(nn.Module):
    """All layers and the final norm for one new token per row; plain weights, which inductor's freezing packs."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(layer, pack=False) for layer in decoder.layers)
        self.norm = _Norm(decoder.norm)

    def forward(self, h, cos_sin: dict, masks: dict, k: list, v: list, index: torch.Tensor):
        slots = _Slots(k, v, index)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin[layer.layer_type], masks, slots, i)
        return self.norm(h)


class CompiledDecoder:
    """`FastDecoder`'s interface. A one-prompt prefill from an empty cache (left-padded to a multiple of
    PREFILL_STEP) and each one-token step run a compiled graph; batched prefills and prefills onto an existing
    cache (questions sharing an image's prefix) run `FastDecoder`."""

    def __init__(self, decoder: nn.Module, fast: FastDecoder):
        self.fast = fast
        _allow_recompiles()
        self.step = torch.compile(_Step(decoder).eval(), dynamic=False)
        self.shapes: set = set()  # (batch, new tokens, capacity) compiled so far
        self.failed: Optional[str] = None  # why compiling failed, once it has

    @classmethod
    def build(cls, decoder: nn.Module, fast: Optional[FastDecoder]) -> tuple[Optional["CompiledDecoder"], str]:
        if fast is None:
            return None, "no fast decoder to compile"
        if not all(layer.dense for layer in fast.layers):
            return None, "sparse (MoE / EVF) layers route tokens by value, which a fixed graph cannot"
        return cls(decoder, fast), ""

    @torch.no_grad()
    def __call__(self, inputs_embeds, attention_mask, position_ids, past_key_values=None, use_cache=True, **_):
        h, cache = inputs_embeds, past_key_values
        b, t, _ = h.shape
        if cache is None and b == 1:  # one question at a time is what compiling is for; batches amortise prefill anyway
            offset = -t % PREFILL_STEP
            shape = (b, t + offset, StaticKVCache.capacity_for(t + offset))
            if self._can_compile(shape):
                return self._prefill(h, attention_mask, position_ids, offset, shape[2])
        elif t == 1:
            static = isinstance(cache, StaticKVCache)
            length = cache.length if static else cache.k[0].shape[2]
            capacity = cache.capacity if static and length < cache.capacity else StaticKVCache.capacity_for(length)
            if self._can_compile((b, 1, capacity)):  # decided before any copy of the cache
                if not static:
                    cache = StaticKVCache.from_growing(cache, capacity)
                elif capacity != cache.capacity:
                    cache.grow(capacity)
                mask = F.pad(attention_mask, (cache.offset, 0))
                out = self._run(h, mask, position_ids, cache, torch.tensor([cache.length], device=h.device))
                if out is not None:
                    return out
        if isinstance(cache, StaticKVCache):  # the eager decoder grows its own cache
            cache = cache.to_growing()
        return self.fast(inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache)

    def _can_compile(self, shape: tuple) -> bool:
        if shape in self.shapes:
            return not self.failed
        if self.failed or len(self.shapes) >= MAX_SHAPES:
            return False
        b, t, capacity = shape
        print(f"compiling the decoder for {b} row(s) x {t} token(s), {capacity} cache slots (once per shape, ~1 min)", file=sys.stderr)
        self.shapes.add(shape)
        return True

    def _prefill(self, h, attention_mask, position_ids, offset: int, capacity: int):
        b = h.shape[0]
        layers = self.fast.layers
        cache = StaticKVCache([h.new_zeros(b, l.kv_heads, capacity, l.head_dim) for l in layers],
                              [h.new_zeros(b, l.kv_heads, capacity, l.head_dim) for l in layers], 0, offset)
        padded = F.pad(h, (0, 0, offset, 0))
        out = self._run(padded, F.pad(attention_mask, (offset, 0)), F.pad(position_ids, (offset, 0)), cache,
                        torch.arange(padded.shape[1], device=h.device))
        if out is None:
            return self.fast(inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids)
        out.last_hidden_state = out.last_hidden_state[:, offset:]
        return out

    def _run(self, h, mask, position_ids, cache: StaticKVCache, index: torch.Tensor):
        """The compiled graph on `index`'s slots; None if compiling failed (then never tried again)."""
        masks = self.fast.masks(mask, h.shape[1], cache.capacity)
        cos_sin = self.fast.cos_sin(h, position_ids)
        try:
            with torch._inductor.config.patch(INDUCTOR):
                out = self.step(h, cos_sin, masks, cache.k, cache.v, index)
        except Exception as e:  # no C++ compiler, an unsupported op: say so once and carry on uncompiled
            self.failed = _give_up("decoder", e)
            return None
        cache.length = int(index[-1]) + 1
        return SimpleNamespace(last_hidden_state=out, past_key_values=cache)


class CompiledTower:
    """`encode_images` for in-memory images through a compiled copy of the frozen tower, one image per call.
    Built at the first in-memory image (`Answerer.compiled_tower`), whose encoding compiles it."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        _allow_recompiles()
        self.compiled = torch.compile(tower, dynamic=False)  # forwards `preprocess` and `parameters` to the tower
        self.failed: Optional[str] = None
        print("compiling the vision tower (once, ~30 s)", file=sys.stderr)

    def __call__(self, images: list) -> torch.Tensor:
        from ..data.features import encode_images

        if not self.failed:
            try:
                with torch._inductor.config.patch(INDUCTOR):
                    return torch.cat([encode_images(self.compiled, [image]) for image in images])
            except Exception as e:  # as for the decoder: say why once, carry on eager
                self.failed = _give_up("vision tower", e)
        return encode_images(self.tower, images)
