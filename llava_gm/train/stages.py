"""Stage plans: what each training stage trains. Stages are data, not code paths.

align     projector only                         (LLaVA-GM, LLaVA-Gemma, Eve stage 1)
instruct  projector + whole LM, or LoRA adapters (LLaVA-GM full / Eve LoRA stage 2)
sparsify  routers + experts (MoE) or router + vision FFN (EVF) only (stage 3)
"""

from __future__ import annotations

import re
from collections import OrderedDict

from ..config import StageConfig
from ..errors import LlavaGMError


def _is_embedding(model, name: str) -> bool:
    emb = model.lm.get_input_embeddings().weight
    return dict(model.named_parameters()).get(name) is emb


def plan_stage(model, stage: StageConfig) -> list[str]:
    """Set requires_grad for the stage; return the names of the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    names: list[str] = []
    for n, p in model.named_parameters():
        if n.startswith("projector."):
            names.append(n)
    if stage.name == "instruct":
        if stage.lora:
            names += [n for n, p in model.named_parameters() if "lora_" in n]
        else:
            names += [n for n, p in model.named_parameters() if n.startswith("lm.") and (stage.train_embeddings or not _is_embedding(model, n))]
    elif stage.name == "sparsify":
        if not model.sparse_layers:
            raise LlavaGMError("stage 'sparsify' needs model.sparse.kind set to 'moe' or 'evf' in the config")
        from ..model.sparse import sparse_trainable

        names = ["lm." + n for n in sparse_trainable(model.lm)]  # the projector stays as stage 2 left it
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    return names


def _group(name: str) -> str:
    """Collapse layer indices so the plan reads as a short table."""
    return re.sub(r"\.\d+\.", ".*.", name).rsplit(".", 1)[0]


def describe_plan(model, trainable: list[str]) -> str:
    train = set(trainable)
    groups: "OrderedDict[tuple[str, bool], int]" = OrderedDict()
    total = sum(p.numel() for p in model.parameters())
    n_train = 0
    for n, p in model.named_parameters():
        key = (_group(n), n in train)
        groups[key] = groups.get(key, 0) + p.numel()
        n_train += p.numel() if n in train else 0
    lines = [f"stage plan: {n_train:,} of {total:,} parameters train ({100 * n_train / max(total, 1):.1f}%)"]
    for (g, t), c in groups.items():
        if t:
            lines.append(f"  train  {g:<60} {c:>13,}")
    frozen = OrderedDict()
    for (g, t), c in groups.items():
        if not t:
            top = ".".join(g.split(".")[:2])
            frozen[top] = frozen.get(top, 0) + c
    for g, c in frozen.items():
        lines.append(f"  frozen {g:<60} {c:>13,}")
    return "\n".join(lines)
