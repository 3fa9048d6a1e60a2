"""FSDP2 and activation checkpointing for the trainer.

`--strategy fsdp` (under torchrun, 2+ processes) shards parameters, gradients and optimizer state with PyTorch's
FSDP2 (`fully_shard`): one unit per decoder layer, the root (embeddings, projector, final norm, tied head) last.
Its `MixedPrecisionPolicy` follows the trainer's precision policy (train/precision.py): parameters gathered in the
compute dtype (bf16 where bf16 is fast, else fp32), gradients reduced in fp32, fp32 master weights and optimizer
state in the shards. A sparse layer's router is its own unit gathered in fp32 (routing decisions flip on rounding).
The vision tower (frozen; used outside the model's forward for online features) is left out: every rank keeps it.

`--activation-checkpointing` recomputes each decoder layer's activations in the backward (torch.utils.checkpoint,
non-reentrant) instead of keeping them: less memory, about a third more compute. Parameter names do not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.sparse import SparseFFN, decoder_layers


def checkpoint_layers(model) -> int:
    """Recompute every decoder layer in the backward; returns how many. A sparse layer's token masks (set by
    `modality` for the forward only) are captured and set again for the recomputation, so it routes alike."""
    layers = decoder_layers(model.lm)
    for layer in layers:
        if getattr(layer, "_llava_gm_checkpointed", False):
            continue
        inner, sparse = layer.forward, [m for m in layer.modules() if isinstance(m, SparseFFN)]

        def forward(*args, _inner=inner, _sparse=sparse, _layer=layer, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _inner(*args, **kwargs)
            masks = [m._masks for m in _sparse]

            def run(*a, **k):
                before = [m._masks for m in _sparse]
                for m, mk in zip(_sparse, masks):
                    m._masks = mk
                try:
                    return _inner(*a, **k)
                finally:
                    for m, mk in zip(_sparse, before):
                        m._masks = mk

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._llava_gm_checkpointed = True
    return len(layers)


def mixed_precision(compute: torch.dtype, reduce: torch.dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute, reduce_dtype=reduce)


def shard(model, policy) -> None:
    """fully_shard the model in place: routers (fp32), decoder layers, then the root. Build the optimizer after."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(policy.compute, policy.reduce)
    fp32 = mixed_precision(torch.float32, policy.reduce)
    for layer in decoder_layers(model.lm):
        for m in layer.modules():
            if isinstance(m, SparseFFN):
                fully_shard(m.router, mp_policy=fp32)
        fully_shard(layer, mp_policy=mp)
    tower = getattr(model, "vision_tower", None)
    ignored = set(tower.parameters()) if isinstance(tower, nn.Module) else None
    # fully_shard refuses 0-d parameters (the word-token projector's logit scale): they train as shape [1] and
    # become scalars again in gather_weights, so checkpoints look as from one process
    model._fsdp_scalars = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.ndim == 0 and not (ignored and p in ignored):
                module._parameters[name] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
                model._fsdp_scalars.append((module, name))
    fully_shard(model, mp_policy=mp, ignored_params=ignored)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model, opt, trainable: list[str]) -> tuple[dict, dict]:
    """The trainable weights and the optimizer state, whole, on rank 0's CPU (other ranks get {}); every rank calls."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    keep = set(trainable)
    weights = get_model_state_dict(model, options=_options(cpu_offload=True))
    optim = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
    return {k: v for k, v in weights.items() if k in keep}, optim


def load_full_state(model, opt, weights: dict, optim: dict) -> None:
    """Every rank read the same step checkpoint: each takes its shards of the weights and optimizer state."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))
    set_optimizer_state_dict(model, opt, optim, options=_options())


def gather_weights(model) -> None:
    """After training: every sharded parameter becomes a plain parameter holding the whole tensor, on every rank,
    so the checkpoint is written as from one process (and a LoRA stage can merge). Every rank calls (collectives,
    in the same order everywhere). The model is for saving after this, not for more FSDP steps."""
    from torch.distributed.tensor import DTensor

    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in done:  # a tied weight (embeddings and head) is one parameter in two modules
                    done[id(p)] = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
    for module, name in getattr(model, "_fsdp_scalars", []):
        p = module._parameters[name]
        module._parameters[name] = nn.Parameter(p.detach().reshape(()), requires_grad=p.requires_grad)
