"""Tiny random causal LMs built in-process for the sparse-layer and analysis tests (helpers, no tests)."""

from __future__ import annotations

import torch

VOCAB = 97


def tiny_lm(family: str = "gemma3", layers: int = 4, seed: int = 0, attn=None, window: int = 64):
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=256, pad_token_id=0)
    if family == "gemma3":
        from transformers import Gemma3TextConfig as C

        cfg = C(**common, sliding_window=window)
    elif family == "gemma2":
        from transformers import Gemma2Config as C

        cfg = C(**common, sliding_window=window)
    else:
        from transformers import GemmaConfig as C

        cfg = C(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def image_mask(batch: int, length: int, start: int = 1, n: int = 6, samples=None) -> torch.Tensor:
    """Image tokens at positions [start, start + n) of the given samples (all by default)."""
    m = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch) if samples is None else samples:
        m[b, start : start + n] = True
    return m
