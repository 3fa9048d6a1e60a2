"""Expert-routing statistics over data: per sparse layer, expert load, token drop rate and router entropy,
split by image and text tokens; written as JSON and MoE-LLaVA-style plots.

Counts come from `llava_gm.model.sparse.record_routing`; everything here is a pure function of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch

from ..model.sparse import record_routing

MODALITIES = {"text": [0], "image": [1], "all": [0, 1]}


def collect_routing(model, batches: Iterable[dict]) -> dict[int, dict]:
    """Run model(**batch) for each batch (eval mode, no grad) while recording; return the raw counts per layer.
    `model` is the LLaVA model (its LM at `.lm`) or a bare causal LM."""
    lm = getattr(model, "lm", model)
    was_training = model.training
    model.eval()
    try:
        with record_routing(lm) as stats, torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        model.train(was_training)
    return stats


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def summarize(stats: dict[int, dict]) -> dict:
    """Raw counts -> shares and rates per layer and modality (text, image, all).

    load:        share of the processed (token, expert) assignments each expert ran
    chosen:      share of the router's own picks (top-k for MoE, argmax for EVF), before capacity and priors
    drop_rate:   tokens with no choice kept (they pass through on the residual) / routed tokens
    choice_drop_rate: dropped (token, choice) pairs / (k x routed tokens)
    entropy:     mean router entropy (nats); entropy_norm divides by log(E) (1 = uniform)
    mean_prob:   mean router probability per expert
    """
    if not stats:
        return {"layers": {}}
    first = next(iter(stats.values()))
    summary = {"kind": first["kind"], "num_experts": first["num_experts"], "top_k": first["top_k"], "layers": {}}
    for layer in sorted(stats, key=int):
        s = stats[layer]
        e, k = s["num_experts"], s["top_k"]
        entry = {}
        for name, rows in MODALITIES.items():
            tokens = sum(s["tokens"][r] for r in rows)
            processed = [sum(s["processed"][r][j] for r in rows) for j in range(e)]
            chosen = [sum(s["chosen"][r][j] for r in rows) for j in range(e)]
            entry[name] = {
                "tokens": int(tokens),
                "load": [_div(p, sum(processed)) for p in processed],
                "chosen": [_div(c, sum(chosen)) for c in chosen],
                "drop_rate": _div(sum(s["dropped"][r] for r in rows), tokens),
                "choice_drop_rate": 1.0 - _div(sum(processed), k * tokens) if tokens else 0.0,
                "entropy": _div(sum(s["entropy"][r] for r in rows), tokens),
                "entropy_norm": _div(_div(sum(s["entropy"][r] for r in rows), tokens), math.log(e)),
                "mean_prob": [_div(sum(s["prob"][r][j] for r in rows), tokens) for j in range(e)],
            }
        if any(s.get("bypass", [0, 0])):
            entry["bypass_tokens"] = {"text": int(s["bypass"][0]), "image": int(s["bypass"][1])}
        summary["layers"][str(layer)] = entry
    return summary


def expert_names(summary: dict) -> list[str]:
    if summary.get("kind") == "evf":
        return ["language FFN", "vision FFN"]
    return [f"expert {j}" for j in range(summary.get("num_experts", 0))]


def plot_load(summary: dict, path: Path) -> Path:
    """Per layer, a text bar and an image bar, each stacked by the experts' share of the load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(summary["layers"])
    names = expert_names(summary)
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(layers) + 2), 4))
    width = 0.38
    for offset, modality, hatch in ((-0.2, "text", ""), (0.2, "image", "//")):
        bottom = [0.0] * len(layers)
        for j, name in enumerate(names):
            vals = [summary["layers"][l][modality]["load"][j] for l in layers]
            ax.bar([i + offset for i in range(len(layers))], vals, width, bottom=bottom, color=colors[j % 10], hatch=hatch,
                   edgecolor="white", label=name if modality == "text" else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(layers)), [f"L{l}\ntext | image" for l in layers], fontsize=7)
    ax.set_ylabel("share of processed tokens")
    ax.set_ylim(0, 1)
    ax.set_title(f"{summary.get('kind', '').upper()} expert load per layer (left: text tokens, right: image tokens)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(names), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drop_entropy(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(summary["layers"])
    x = [int(l) for l in layers]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for modality, style in (("text", "o-"), ("image", "s--"), ("all", "^:")):
        a1.plot(x, [summary["layers"][l][modality]["drop_rate"] for l in layers], style, label=modality)
        a2.plot(x, [summary["layers"][l][modality]["entropy_norm"] for l in layers], style, label=modality)
    a1.set(xlabel="layer", ylabel="dropped tokens / tokens", title="token drop rate")
    a2.set(xlabel="layer", ylabel="entropy / log(E)", title="router entropy", ylim=(0, 1.05))
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(stats: dict[int, dict], out_dir) -> dict[str, Path]:
    """routing.json (raw counts + summary), routing_load.png, routing_drop_entropy.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(stats)
    paths = {"json": out / "routing.json"}
    paths["json"].write_text(json.dumps({"summary": summary, "counts": {str(k): v for k, v in stats.items()}}, indent=1))
    if summary["layers"]:
        paths["load_png"] = plot_load(summary, out / "routing_load.png")
        paths["drop_entropy_png"] = plot_drop_entropy(summary, out / "routing_drop_entropy.png")
    return paths
