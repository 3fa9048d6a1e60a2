"""The engine's one KV cache: keys and values per layer, [batch, kv_heads, length, head_dim].

Every backend reads and writes this (transformers' decoder through a `DynamicCache` view of the same tensors,
the compiled decoder through a fixed-size copy it converts back at the engine's boundaries). Rows can be
selected (finished requests leave, one shared prefill is copied to several prompts) and two caches can be
joined (requests that arrive while others decode): the shorter is padded on the left, where the attention mask
hides it, so every row's real tokens stay contiguous at the right end.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Keys and values per layer, [batch, kv_heads, length, head_dim]; grows by concatenation."""

    def __init__(self, num_layers: int):
        self.k: list[Optional[torch.Tensor]] = [None] * num_layers
        self.v: list[Optional[torch.Tensor]] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], 2), torch.cat([self.v[i], v], 2)
        self.k[i], self.v[i] = k, v
        return k, v

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Row b of the batch becomes row index[b] (rows dropped, or one shared prefill copied to several prompts)."""
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]

    def trim_left(self, n: int) -> None:
        """Drop the first n slots (padding no row needs any more)."""
        if n:
            self.k = [t[:, :, n:] for t in self.k]
            self.v = [t[:, :, n:] for t in self.v]

    @classmethod
    def join(cls, a: "KVCache", b: "KVCache") -> "KVCache":
        """a's rows then b's rows, the shorter left-padded with zeros (the caller pads its attention mask alike)."""
        n = max(a.length, b.length)
        out = cls(len(a.k))
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, n - t.shape[2], 0))  # noqa: E731
        out.k = [torch.cat([pad(x), pad(y)]) for x, y in zip(a.k, b.k)]
        out.v = [torch.cat([pad(x), pad(y)]) for x, y in zip(a.v, b.v)]
        return out
