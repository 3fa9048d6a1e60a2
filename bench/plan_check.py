"""`llava-gm plan` against measured peak memory: training steps of the offline recipe (Gemma 3 270M) on the CPU.

Baseline: the measured peak of 2 training steps per stage, weights included (every tensor storage PyTorch
allocates, counted by llava_gm.analysis.memory_meter.LiveBytes, as torch.cuda.max_memory_allocated counts on a
GPU); also the process's peak RSS growth during the steps (the OS view: allocator caching included). Prints the
plan / measured ratio per stage; the target is within 15%.

    .venv/bin/python bench/plan_check.py [--batch 4] [--seq-len 256] [--labels 64]

Loads the real offline 270M LM (converted into ~/.cache/llava-gm on first use, about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import torch

from _common import ROOT


def rss_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--labels", type=int, default=64, help="labelled tokens per sample")
    ap.add_argument("--stages", default="align,instruct,sparsify")
    a = ap.parse_args()

    from llava_gm.analysis.memory_meter import measure_training_peak, prepare_stage
    from llava_gm.analysis.plan import Setup, plan_recipe
    from llava_gm.config import RecipeConfig, load_yaml
    from llava_gm.model.build import apply_sparse, build_model

    recipe = load_yaml(RecipeConfig, ROOT / "recipes" / "offline-default.yaml")
    cfg = dataclasses.replace(recipe.model, language=dataclasses.replace(recipe.model.language, max_length=a.seq_len))
    base = dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, kind="none"))
    setup = Setup(gpus=1, gpu_memory_gb=1000, features="cache", batch_size=a.batch, label_tokens=a.labels, seq_len=a.seq_len)
    print(f"plan vs measured, {cfg.language.name}, batch {a.batch} x {a.seq_len} tokens, {a.labels} labelled per sample, "
          f"bf16 autocast, {torch.get_num_threads()} threads")
    print(f"{'stage':<10}{'plan GB':>9}{'measured GB':>13}{'ratio':>8}{'RSS growth GB':>15}{'plan - weights':>16}")
    for stage in recipe.stages:
        if stage.name not in a.stages.split(","):
            continue
        torch.manual_seed(0)
        model = build_model(base)
        model.vision_tower = None  # training reads cached features
        if model.cfg.projector.word_tokens:  # stage 1 sets the word vocabulary from its answers: any 64 words here
            model.cfg.projector.word_ids = list(range(1000, 1064))
            model.cfg.projector.word_targets = list(range(1000, 1032))
        if stage.name == "sparsify":
            model.cfg.sparse = cfg.sparse
            apply_sparse(model)
        prepare_stage(model, stage)
        rss0 = rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        m = measure_training_peak(model, stage, a.batch, a.seq_len, a.labels)
        rss_growth = rss_bytes("VmHWM") - rss0
        plan_cfg = dataclasses.replace(cfg, projector=dataclasses.replace(cfg.projector, word_ids=model.cfg.projector.word_ids))
        p = plan_recipe(RecipeConfig(model=plan_cfg, stages=[stage]), setup)[0]
        print(f"{stage.name:<10}{p.peak / 1e9:>9.3f}{m['peak'] / 1e9:>13.3f}{p.peak / m['peak']:>8.3f}{rss_growth / 1e9:>15.3f}"
              f"{(p.peak - m['weights']) / 1e9:>16.3f}")
        del model


if __name__ == "__main__":
    main()
