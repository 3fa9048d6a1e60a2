"""bf16 vs fp32 on this machine: matmul throughput at the shapes of the offline model, in one run.

Decides what `precision: auto` should mean on a CPU: bf16 pays off only where the hardware has fast bf16
units (AMX tiles); with AVX-512-bf16 alone PyTorch's bf16 matmul is slower than MKL's fp32 one.

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
    from llava_gm.precision import cpu_has_amx, use_bf16

    print(f"CPU has AMX: {cpu_has_amx()}; precision auto on CPU -> {'bf16' if use_bf16(torch.device('cpu')) else 'fp32'}")
    print(f"{'shape (tokens x in -> out)':<30}{'fp32 TFLOP/s':>14}{'bf16 TFLOP/s':>14}{'bf16/fp32':>11}")
    for m, k, n in [(4096, 640, 2048), (4096, 2048, 640), (4096, 640, 1024), (2048, 384, 1536)]:
        f = [tflops(m, k, n, torch.float32) for _ in range(2)]  # interleaved: the machine is shared
        b = [tflops(m, k, n, torch.bfloat16) for _ in range(2)]
        f, b = max(f), max(b)
        print(f"{f'{m} x {k} -> {n}':<30}{f:>14.3f}{b:>14.3f}{b / f:>11.2f}")


if __name__ == "__main__":
    main()
