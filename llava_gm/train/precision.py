"""What training stores and computes in which dtype: one decision for one process or many, CPU or GPU.

`precision` (auto | bf16 | fp32; auto asks llava_gm.precision.use_bf16 whether bf16 is fast here) gives:
- compute: the autocast dtype of the forward and backward;
- trainable weights and optimizer state: fp32 (master weights: small updates must not round away);
- frozen weights that no stage trained: stored in the compute dtype (autocast casts them at every use anyway,
  and a frozen 2B LM in bf16 takes half the memory); the vision tower keeps its own storage;
- gradient reduction across ranks: fp32 (gradients of fp32 master weights);
- vision features: bf16 (the cache's dtype; the tower runs under bf16 autocast where that is fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..precision import use_bf16


@dataclass(frozen=True)
class TrainPrecision:
    compute: torch.dtype
    frozen: torch.dtype
    trainable: torch.dtype = torch.float32
    reduce: torch.dtype = torch.float32
    features: torch.dtype = torch.bfloat16

    @property
    def autocast(self) -> bool:
        return self.compute != torch.float32


def train_precision(device: torch.device, precision: str = "auto") -> TrainPrecision:
    compute = torch.bfloat16 if use_bf16(device, precision) else torch.float32
    return TrainPrecision(compute=compute, frozen=compute)


def store(model, policy: TrainPrecision) -> None:
    """Cast the model's weights in place to the policy's storage dtypes (before the optimizer is built)."""
    for n, p in model.named_parameters():
        if not p.is_floating_point() or n.startswith("vision_tower."):
            continue
        if p.requires_grad:
            want = policy.trainable
        elif n in model.trained_keys:
            continue  # weights an earlier stage trained keep the dtype they were saved in (fp32)
        else:
            want = policy.frozen
        if p.dtype != want:
            p.data = p.data.to(want)
