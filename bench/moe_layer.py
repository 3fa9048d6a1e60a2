"""Forward + backward time of our MoE layer against transformers' MixtralSparseMoeBlock and the ideal k x dense FFN.

Shapes are Gemma-3-270M-like: hidden 640, intermediate 2048, GELU-tanh gated FFN; 4 experts, top-2; bf16 autocast
on CPU (fp32 master weights, as in training). All MoE variants compute the same function: the Mixtral block gets our
router and expert weights. Variants run interleaved, `--rounds` times; the medians are reported (the machine may be
shared: look at the spread too).

    .venv/bin/python bench/moe_layer.py [--tokens 4096] [--rounds 5] [--mode autocast|bf16|fp32] [--threads N]

Note: transformers' grouped_mm experts path ignores autocast (it casts the input to the fp32 weights), so under
`--mode autocast` it runs in fp32; compare dtypes like for like with --mode bf16 / fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llava_gm.config import SparseConfig
from llava_gm.model.sparse import SparseFFN

HIDDEN, INTER, EXPERTS, TOP_K = 640, 2048, 4, 2


class GroupedMMSparseFFN(SparseFFN):
    """Our layer with the experts run by torch's grouped_mm on stacked bf16 weights (gated gate/up/down MLPs only)."""

    def _run_experts(self, xs, counts):
        offs = torch.tensor(counts).cumsum(0).to(device=xs.device, dtype=torch.int32)
        dt = torch.bfloat16 if torch.is_autocast_enabled(xs.device.type) else xs.dtype
        stack = lambda name: torch.stack([getattr(e, name).weight for e in self.experts]).to(dt).transpose(1, 2)  # noqa: E731
        xs = xs.to(dt)
        h = self.experts[0].act_fn(F.grouped_mm(xs, stack("gate_proj"), offs=offs)) * F.grouped_mm(xs, stack("up_proj"), offs=offs)
        return [F.grouped_mm(h, stack("down_proj"), offs=offs)]


def build(tokens: int):
    from transformers import Gemma3TextConfig, MixtralConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    dense = Gemma3MLP(Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_activation="gelu_pytorch_tanh"))
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cfg = dict(kind="moe", num_experts=EXPERTS, top_k=TOP_K, renormalize=True)  # Mixtral renormalises its top-k
    ours = SparseFFN(dense, SparseConfig(**cfg, capacity_factor_train=None), HIDDEN, 0)
    ours_cap = SparseFFN(dense, SparseConfig(**cfg, capacity_factor_train=1.5), HIDDEN, 0)
    ours_gmm = GroupedMMSparseFFN(dense, SparseConfig(**cfg, capacity_factor_train=None), HIDDEN, 0)
    with torch.no_grad():  # distinct experts and a router with some spread, as after training
        for e in range(EXPERTS):
            for name, p in ours.experts[e].named_parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ours.router.weight.normal_(std=0.1)
        for other in (ours_cap, ours_gmm):
            other.load_state_dict(ours.state_dict())

    def mixtral(impl: str):
        mc = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                           hidden_act="gelu_pytorch_tanh")
        mc._experts_implementation = impl
        block = MixtralSparseMoeBlock(mc)
        with torch.no_grad():
            block.gate.weight.copy_(ours.router.weight)
            for e, ffn in enumerate(ours.experts):
                block.experts.gate_up_proj[e].copy_(torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight]))
                block.experts.down_proj[e].copy_(ffn.down_proj.weight)
        return block

    x = torch.randn(1, tokens, HIDDEN) * 2.0
    return dense, {"ours (dropless)": ours, "ours (capacity 1.5)": ours_cap, "ours (grouped_mm experts)": ours_gmm,
                   "transformers Mixtral (eager)": mixtral("eager"), "transformers Mixtral (grouped_mm)": mixtral("grouped_mm")}, x


def fwd_bwd(module, x, mode: str) -> float:
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        y = module(x)
    y.float().square().mean().backward()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--mode", choices=["autocast", "bf16", "fp32"], default="autocast",
                    help="autocast: fp32 weights, bf16 autocast (training); bf16: weights and activations bf16; fp32")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dense, moes, x = build(a.tokens)
    for m in (dense, *moes.values()):
        m.train()
    if a.mode == "bf16":  # our router stays fp32 by design
        x = x.bfloat16()
        for m in (dense, *moes.values()):
            m.bfloat16()
    with torch.no_grad():  # same function: our layer and Mixtral's block agree (fp32)
        ref = moes["ours (dropless)"](x).float()
        for name, m in moes.items():
            if "capacity" not in name and not (a.mode == "bf16" and "Mixtral" in name):  # a bf16 router flips some picks
                err = (m(x).float() - ref).abs().max().item()
                assert err < (2e-2 if a.mode == "bf16" else 1e-4) * ref.abs().max().item(), (name, err)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.tokens} tokens, hidden {HIDDEN}, intermediate {INTER}, "
          f"{EXPERTS} experts top-{TOP_K}; {a.mode}; forward + backward; median of {a.rounds} interleaved rounds")
    runs = {"dense FFN (1x)": dense, **moes}
    times = {k: [] for k in runs}
    for name, m in runs.items():  # warm-up
        fwd_bwd(m, x, a.mode)
    for r in range(a.rounds):
        for name, m in runs.items():
            times[name].append(fwd_bwd(m, x, a.mode))
    med = {k: statistics.median(v) for k, v in times.items()}
    ideal = TOP_K * med["dense FFN (1x)"]
    hf = med["transformers Mixtral (eager)"]
    print(f"{'variant':34} {'median ms':>10} {'min..max ms':>17} {'/ ideal':>8} {'/ Mixtral eager':>16}")
    for name, t in med.items():
        lo, hi = min(times[name]), max(times[name])
        print(f"{name:34} {t * 1e3:10.1f} {f'{lo * 1e3:.0f}..{hi * 1e3:.0f}':>17} {t / ideal:8.2f} {t / hf:16.2f}")
    print(f"ideal = {TOP_K} x dense = {ideal * 1e3:.1f} ms")
    ours = med["ours (dropless)"]
    print(f"ours (dropless): {ours / ideal:.2f}x ideal (target <= 1.25), {ours / hf:.2f}x transformers' Mixtral block (target <= 1.0)")


if __name__ == "__main__":
    main()
