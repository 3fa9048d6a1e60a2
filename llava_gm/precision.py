"""Which number format to compute in: bf16 where the hardware multiplies it fast, else fp32.

bf16 pays off on GPUs and on CPUs with AMX tiles. On CPUs with only AVX-512 bf16, PyTorch's bf16 matmul
measures about half the fp32 speed (bench/precision.py prints both), so `auto` keeps those in fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .errors import LlavaGMError


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise LlavaGMError(f"precision {precision!r}: use auto, bf16 or fp32")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_amx()


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    return torch.bfloat16 if use_bf16(device, precision) else torch.float32


def bf16_matmul_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Linear and convolution weights stored in bf16, for a module that only ever runs under bf16 autocast:
    autocast casts them to bf16 at every call anyway, so the outputs are bitwise the same and the per-call
    casts (a third of a ViT's time on a 2-core CPU) are gone. Norms and embeddings keep fp32."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            m.to(torch.bfloat16)
    return module
