"""Decoder backends behind one typed interface.

A backend runs the language model's decoder on new tokens: embeddings [B, T, D], the attention mask over past
and new tokens [B, S], the new tokens' positions [B, T] and the cache of the past (None when empty), and returns
the final hidden states [B, T, D] and the cache holding past + new. `as_cache` turns whatever it keeps into the
engine's `KVCache` (for joining batches). The output layer is not the backend's: the engine picks tokens, with
the screened greedy head (model/fast_lm.py `GreedyHead`) where it applies.

- `TransformersBackend`: transformers' own decoder, the reference; any causal LM, MoE and EVF layers included.
- `FastBackend`: model/fast_lm.py `FastDecoder` (Gemma 1/2/3, fused and packed weights; sparse layers called as is).
- `CompiledBackend`: model/compiled.py `CompiledDecoder` (torch.compile'd steps on a fixed-size cache; dense only).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Protocol

import torch
from torch import nn

from .cache import KVCache


class Backend(Protocol):
    name: str

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]: ...

    def as_cache(self, cache: Any) -> KVCache: ...


class TransformersBackend:
    """transformers' decoder on a `DynamicCache` view of the engine's cache (full-length layers: sliding windows
    are applied by the attention mask, by cache index, as the fast decoder does)."""

    name = "transformers"

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        # newer transformers name the argument `cache` (`past_key_values` is deprecated there)
        self.cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    @torch.no_grad()
    def __call__(self, embeds, mask, positions, cache: Optional[KVCache]):
        from transformers import DynamicCache

        past = DynamicCache(ddp_cache_data=list(zip(cache.k, cache.v))) if cache is not None and cache.length else DynamicCache()
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{self.cache_arg: past})
        layers = out.past_key_values.layers
        new = KVCache(len(layers))
        new.k, new.v = [layer.keys for layer in layers], [layer.values for layer in layers]
        return out.last_hidden_state, new

    def as_cache(self, cache: KVCache) -> KVCache:
        return cache


class FastBackend:
    """model/fast_lm.py's eager decoder; it writes the engine's `KVCache` itself."""

    name = "fast"

    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, embeds, mask, positions, cache: Optional[KVCache]):
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache)
        return out.last_hidden_state, out.past_key_values

    def as_cache(self, cache: KVCache) -> KVCache:
        return cache


class CompiledBackend(FastBackend):
    """model/compiled.py's decoder: keeps a fixed-size copy of the cache between steps (written in place by the
    compiled graph), handed back to the engine as a `KVCache` when batches join."""

    name = "compiled"

    def as_cache(self, cache) -> KVCache:
        from ..model.compiled import StaticKVCache

        return cache.to_growing() if isinstance(cache, StaticKVCache) else cache


def choose_backend(model, fast=None) -> Backend:
    """The fastest backend `fast` (a `FastLM` built from the model's weights, or None) offers; else the reference."""
    decoder = getattr(fast, "decoder", None)
    if decoder is None:
        return TransformersBackend(model.decoder)
    from ..model.compiled import CompiledDecoder

    return CompiledBackend(decoder) if isinstance(decoder, CompiledDecoder) else FastBackend(decoder)
