"""Projectors from vision features to the LM's embedding width, with optional token pooling."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ProjectorConfig
from ..errors import LlavaGMError


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, N, D] tokens -> [B, D, s, s] map; the tokens must form a square grid."""
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise LlavaGMError(f"image tokens ({x.shape[1]}) do not form a square grid; pooling and LDP need one")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side), side


class LDP(nn.Module):
    """Lightweight Downsample Projector (MobileVLM, used by Eve): a pointwise MLP, then two depthwise
    conv blocks, the second with stride 2, so the LM sees a quarter of the image tokens."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.dw1 = nn.Conv2d(lm_dim, lm_dim, 3, 1, 1, groups=lm_dim, bias=False)
        self.pw1 = nn.Conv2d(lm_dim, lm_dim, 1)
        self.dw2 = nn.Conv2d(lm_dim, lm_dim, 3, 2, 1, groups=lm_dim, bias=False)
        self.pw2 = nn.Conv2d(lm_dim, lm_dim, 1)
        self.act = nn.Hardswish()

    def forward(self, x):
        g, _ = _grid(self.mlp(x))
        g = g + self.pw1(self.act(self.dw1(g)))  # residual block at full resolution
        g = self.pw2(self.act(self.dw2(g)))  # stride-2 block: 4x fewer tokens
        return g.flatten(2).transpose(1, 2)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, vision_dim: int, lm_dim: int):
        super().__init__()
        self.pool = cfg.pool
        if cfg.type == "linear":
            self.net = nn.Linear(vision_dim, lm_dim)
        elif cfg.type == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        elif cfg.type == "ldp":
            self.net = LDP(vision_dim, lm_dim)
        else:
            raise LlavaGMError(f"projector.type {cfg.type!r}: use linear, mlp2x_gelu or ldp")
        self.type = cfg.type
        if cfg.word_tokens:  # inverse temperature of the word softmax, log scale: a flat softmax would learn nothing
            self.word_logit_scale = nn.Parameter(torch.tensor(math.log(30.0)))

    def num_tokens(self, vision_tokens: int) -> int:
        side = math.isqrt(vision_tokens)
        if self.pool > 1:
            side = side // self.pool
            vision_tokens = side * side
        if self.type == "ldp":
            side = (side + 1) // 2
            vision_tokens = side * side
        return vision_tokens

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            g, _ = _grid(feats)
            feats = torch.nn.functional.avg_pool2d(g, self.pool).flatten(2).transpose(1, 2)
        return self.net(feats)
