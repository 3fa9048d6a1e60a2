"""bf16 vs fp32 on this machine: matmul throughput at the shapes of the offline model, in one run.

Shows what `precision: auto` decides on a CPU: no flag tells whether bf16 pays off (AMX: several times fp32;
AVX-512-BF16 alone: slower than fp32 on one host, 2-2.7x faster on another), so `auto` runs a short version of
this measurement once per host (llava_gm/precision.py) and caches it; this script measures at more shapes.

    python bench/precision.py
"""

from __future__ import annotations

import statistics

import torch

from _common import timed


def tflops(m, k, n, dtype, repeats=10):
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / statistics.median(timed(lambda: a @ b, repeats, warmup=3)) / 1e12


def main():
    from llava_gm.precision import cpu_auto_choice, cpu_has_amx

    auto = cpu_auto_choice(say=lambda m: None)
    print(f"CPU has AMX: {cpu_has_amx()}; precision auto on this CPU -> {auto['choice']} "
          f"(its cached micro-benchmark: bf16 {auto['bf16']:.2f} vs fp32 {auto['fp32']:.2f} TFLOP/s, measured {auto['measured']})")
    print(f"{'shape (tokens x in -> out)':<30}{'fp32 TFLOP/s':>14}{'bf16 TFLOP/s':>14}{'bf16/fp32':>11}")
    for m, k, n in [(4096, 640, 2048), (4096, 2048, 640), (4096, 640, 1024), (2048, 384, 1536)]:
        f = [tflops(m, k, n, torch.float32) for _ in range(2)]  # interleaved: the machine is shared
        b = [tflops(m, k, n, torch.bfloat16) for _ in range(2)]
        f, b = max(f), max(b)
        print(f"{f'{m} x {k} -> {n}':<30}{f:>14.3f}{b:>14.3f}{b / f:>11.2f}")


if __name__ == "__main__":
    main()
