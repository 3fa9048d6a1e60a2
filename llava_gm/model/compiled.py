"""torch.compile for serving: one-token decode steps (the same maths as `FastDecoder`) and the vision tower.

Decode steps. Why: after `FastDecoder`, a Gemma 3 270M step on a 2-core CPU is ~14 ms of matrix products and ~10 ms of some
70 small ops per layer (norms, rotary, cache, casts), each paying PyTorch's per-op cost. Inductor fuses those
into a few C++ loops and, with freezing, packs the weights for oneDNN itself. Compiling needs fixed shapes, so
the keys and values live in a fixed-size cache (`StaticKVCache`, capacity in steps of 128) written in place.

Vision tower: compiled for one image at a time (one shape), with freezing its matrix products run on packed
bf16 weights and its norms and activations fused: 22 ms -> 7 ms for DINOv2 ViT-S/14 at 224 px on 2 cores.

Costs: ~25 s to compile each graph on 2 cores (decode steps: per batch size and cache capacity), at its first
call; later calls of that shape reuse it. So this is opt-in (`Answerer(compile=True)`, `--compile`): for a
process that answers many questions, not for one. Prefill (many tokens at once) stays on `FastDecoder`. Fused
kernels round differently from eager ones (features and hidden states agree to ~1% in bf16, like any two bf16
kernels). Without a working compiler (no C++ toolchain) the first call says why and the eager path carries on.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from ..precision import use_bf16

from .fast_lm import FastDecoder, KVCache, _Layer, _Norm

CAPACITY_STEP = 128


class StaticKVCache:
    """Keys and values per layer in fixed [batch, kv_heads, capacity, head_dim] tensors, filled up to `length`."""

    def __init__(self, cache: KVCache, capacity: int):
        self.length = cache.k[0].shape[2]
        self.capacity = capacity
        self.k = [self._place(t) for t in cache.k]
        self.v = [self._place(t) for t in cache.v]

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        b, heads, n, d = t.shape
        out = t.new_zeros(b, heads, self.capacity, d)
        out[:, :, :n] = t
        return out

    def grow(self, capacity: int) -> None:
        """Move to a larger capacity (a new shape: the step compiles once more)."""
        self.capacity = capacity
        self.k = [self._place(t[:, :, : self.length]) for t in self.k]
        self.v = [self._place(t[:, :, : self.length]) for t in self.v]

    @staticmethod
    def capacity_for(length: int) -> int:
        return -(-(length + 1) // CAPACITY_STEP) * CAPACITY_STEP


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
    """`FastDecoder`'s interface; prefill runs `FastDecoder`, each one-token step a compiled graph."""

    def __init__(self, decoder: nn.Module, fast: FastDecoder):
        self.fast = fast
        self.step = torch.compile(_Step(decoder).eval(), dynamic=False)
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
        h = inputs_embeds
        if h.shape[1] != 1 or past_key_values is None or self.failed:
            if isinstance(past_key_values, StaticKVCache):  # after a failed compile: back to a growing cache
                past_key_values = self._to_growing(past_key_values)
            return self.fast(inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values)
        cache = past_key_values
        if not isinstance(cache, StaticKVCache):
            cache = StaticKVCache(cache, StaticKVCache.capacity_for(cache.k[0].shape[2]))
        elif cache.length + 1 > cache.capacity:
            cache.grow(StaticKVCache.capacity_for(cache.length))
        masks = self.fast.masks(attention_mask, 1, cache.capacity)
        cos_sin = self.fast.cos_sin(h, position_ids)
        index = torch.tensor([cache.length], device=h.device)
        try:
            with torch._inductor.config.patch(freezing=True):  # weights become constants, packed for oneDNN
                out = self.step(h, cos_sin, masks, cache.k, cache.v, index)
        except Exception as e:  # no C++ compiler, an unsupported op: say so once and carry on uncompiled
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile of the decode step failed ({self.failed}); answering without it")
            return self(inputs_embeds, attention_mask, position_ids, cache)
        cache.length += 1
        return SimpleNamespace(last_hidden_state=out, past_key_values=cache)

    @staticmethod
    def _to_growing(cache: StaticKVCache) -> KVCache:
        out = KVCache(len(cache.k))
        out.k = [t[:, :, : cache.length] for t in cache.k]
        out.v = [t[:, :, : cache.length] for t in cache.v]
        return out


class CompiledTower:
    """`encode_images` for in-memory images through a compiled copy of the frozen tower, one image per call."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self.compiled = torch.compile(tower, dynamic=False)
        self.failed: Optional[str] = None

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        from ..data.features import encode_images

        if self.failed:
            return encode_images(self.tower, images)
        device = next(self.tower.parameters()).device
        out = []
        for image in images:
            pixels = self.tower.preprocess([image]).to(device)
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device)), torch._inductor.config.patch(freezing=True):
                    out.append(self.compiled(pixels).to(torch.bfloat16).cpu())
            except Exception as e:  # as for the decode step: say why once, carry on eager
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"torch.compile of the vision tower failed ({self.failed}); encoding without it")
                return encode_images(self.tower, images)
        return torch.cat(out)
