"""Which number format to compute in: bf16 where this host multiplies it clearly faster than fp32, else fp32.

On GPUs `auto` means bf16 where the card supports it. On CPUs no flag tells: with AMX tiles bf16 matmuls ran
4-8x fp32 (Xeon, 2026-12-06); with AVX-512-BF16 alone they ran 0.5-0.8x fp32 on one host (2026-11-23) and
2-2.7x on another (an EPYC, 2026-12-05). So `auto` measures: a short bf16-vs-fp32 matmul benchmark at the offline
model's shapes (well under a second), run once per host and cached in the llava-gm cache folder, keyed by the
CPU's model name and flags and the torch version. The choice and the figures behind it are printed once per process.
`LLAVA_GM_PRECISION=bf16|fp32` forces what `auto` means (for a comparison, or to mimic another host).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import LlavaGMError
from .paths import atomic_write_bytes, cache_dir

# bf16 must beat fp32 by this much: autocast adds casts around every product, and bf16 rounds more
BF16_MIN_SPEEDUP = 1.2
# (tokens, in, out): a stage-2 batch through Gemma 3 270M's FFN (640 -> 2048 -> 640)
SHAPES = ((512, 640, 2048), (512, 2048, 640))


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def host_key() -> str:
    """What the measurement depends on: the CPU (model name and flags), the thread count, torch's version and
    oneDNN's instruction-set cap (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` makes an AMX host compute as one without)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    fields = {}
    for line in info.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in ("model name", "flags") and k.strip() not in fields:
            fields[k.strip()] = v.strip()
    ident = f"{platform.machine()}|{platform.processor()}|{fields.get('model name')}|{fields.get('flags')}|" \
            f"{torch.get_num_threads()}|{torch.__version__}|{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"  # the cap changes the kernels
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def measure_matmul(repeats: int = 5) -> dict:
    """Best TFLOP/s of fp32 and bf16 matmuls at SHAPES, the two formats interleaved (the host may be busy)."""
    torch.manual_seed(0)
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in SHAPES]
    best = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(repeats):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for a, b in mats:
                a, b = a.to(dtype), b.to(dtype)
                a @ b  # warm-up (oneDNN picks and caches its kernel for the shape)
                t = time.perf_counter()
                a @ b
                dt = time.perf_counter() - t
                best[name] = max(best[name], 2 * a.shape[0] * a.shape[1] * b.shape[1] / dt / 1e12)
    return best


def decide(figures: dict) -> str:
    return "bf16" if figures["bf16"] >= BF16_MIN_SPEEDUP * figures["fp32"] else "fp32"


def _cache_file() -> Path:
    return cache_dir() / "precision.json"


def cpu_auto_choice(measure: Callable[[], dict] = measure_matmul, say: Callable[[str], None] | None = None) -> dict:
    """{"choice", "fp32", "bf16", "key", "measured"}: this host's cached measurement, made now if there is none."""
    key, path = host_key(), _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    fresh = not (isinstance(entry, dict) and {"fp32", "bf16", "choice"} <= entry.keys())
    if fresh:
        figures = measure()
        entry = {"fp32": round(figures["fp32"], 4), "bf16": round(figures["bf16"], 4), "choice": decide(figures),
                 "measured": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "amx": cpu_has_amx()}
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = entry
        atomic_write_bytes(path, json.dumps(cached, indent=1).encode())
    (say or (lambda m: print(m, file=sys.stderr)))(
        f"precision auto -> {entry['choice']} on this CPU: matmul at the model's shapes bf16 {entry['bf16']:.2f} vs fp32 "
        f"{entry['fp32']:.2f} TFLOP/s (bf16 needs {BF16_MIN_SPEEDUP}x; {'measured now' if fresh else 'measured ' + entry['measured']}, "
        f"cached in {path}; LLAVA_GM_PRECISION=bf16|fp32 overrides)")
    return {**entry, "key": key, "fresh": fresh}


@functools.lru_cache(maxsize=None)
def _cpu_auto_bf16() -> bool:
    return cpu_auto_choice()["choice"] == "bf16"  # once per process: measured or read, and printed once


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise LlavaGMError(f"precision {precision!r}: use auto, bf16 or fp32")
    if precision != "auto":
        return precision == "bf16"
    forced = os.environ.get("LLAVA_GM_PRECISION", "auto")
    if forced not in ("auto", "bf16", "fp32"):
        raise LlavaGMError(f"LLAVA_GM_PRECISION={forced!r}: use auto, bf16 or fp32")
    if forced != "auto":
        return forced == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_auto_bf16()


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
