"""Frozen vision towers ("elastic"): CLIP, SigLIP and DINOv2 through transformers, plus offline encoders.

Every tower carries its own preprocessing and a `cache_name` that identifies its features,
so cached features are never mixed between towers, layers or resolutions.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor

from ..config import VisionConfig
from ..errors import LlavaGMError

OFFLINE_VISION = {"dinov2-s14", "efficientnet-lite0"}


class HFVisionTower(torch.nn.Module):
    """CLIP / SigLIP / DINOv2 vision model; returns one hidden layer's patch tokens [B, N, D]."""

    def __init__(self, cfg: VisionConfig, path: str):
        super().__init__()
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise LlavaGMError(f"cannot load the vision tower {cfg.name!r}: {e}") from None
        kind = config.model_type
        if kind in ("clip", "clip_vision_model"):
            from transformers import CLIPVisionModel as cls
        elif kind in ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"):
            from transformers import SiglipVisionModel as cls
        elif kind == "dinov2":
            from transformers import Dinov2Model as cls
        else:
            raise LlavaGMError(f"vision tower {cfg.name!r} is a {kind!r} model; supported: CLIP, SigLIP, DINOv2, {sorted(OFFLINE_VISION)}")
        self.model = cls.from_pretrained(path).eval().requires_grad_(False)
        vc = getattr(self.model.config, "vision_config", self.model.config)
        self.kind = "siglip" if kind.startswith("siglip") else kind.replace("_vision_model", "")
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.native_size = vc.image_size
        self.image_size = cfg.image_size or vc.image_size
        self.hidden_size = vc.hidden_size
        self.select_layer = cfg.select_layer
        # SigLIP has no CLS token; DINOv2 may also carry register tokens after CLS
        self.num_prefix = 0 if self.kind == "siglip" else 1 + getattr(vc, "num_register_tokens", 0)
        self.drop_cls = cfg.drop_cls
        self._drop_unused_layers()
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name.strip("/"))
        self.cache_name = f"{safe}@{self.image_size}_L{cfg.select_layer}{'' if cfg.drop_cls else '_cls'}"

    def _drop_unused_layers(self) -> None:
        """Layers after the selected one never reach the features (LLaVA's penultimate layer: 1 of 12-24 layers of
        compute): drop them and index the selected layer from the front, so outputs are unchanged."""
        encoder = getattr(self.model, "vision_model", self.model).encoder
        name = "layers" if hasattr(encoder, "layers") else "layer"
        layers = getattr(encoder, name)
        n = len(layers)
        if not -n - 1 <= self.select_layer <= n:
            raise LlavaGMError(f"vision select_layer {self.select_layer} is out of range for a {n}-layer tower")
        self.select_layer %= n + 1  # hidden_states[i] is the output of layer i (0: the embeddings)
        setattr(encoder, name, layers[: self.select_layer])
        # kept outside the module tree (no compute, no device moves) for exports, which write whole towers
        self.__dict__["_unused_layers"] = list(layers[self.select_layer :])
        self._layers_key = ("vision_model.encoder." if hasattr(self.model, "vision_model") else "encoder.") + name

    def full_state_dict(self) -> dict:
        """The tower's weights including the dropped layers, keyed as in the original model."""
        sd = self.model.state_dict()
        for i, layer in enumerate(self._unused_layers, start=self.select_layer):
            sd.update({f"{self._layers_key}.{i}.{k}": v for k, v in layer.state_dict().items()})
        return sd

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        images = [im.convert("RGB") for im in images]
        if self.image_size == self.native_size and self.kind != "dinov2":
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        # an explicit size: resize the whole image to a square (no crop) and normalise as the tower expects
        mean = torch.tensor(self.processor.image_mean).view(3, 1, 1)
        std = torch.tensor(self.processor.image_std).view(3, 1, 1)
        size = (self.image_size, self.image_size)
        arrays = [torch.from_numpy(np.asarray(im.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images]
        return (torch.stack(arrays) - mean) / std

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.kind in ("clip", "siglip") and pixel_values.shape[-1] != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        feats = out.hidden_states[self.select_layer]
        return feats[:, self.num_prefix :] if self.drop_cls else feats


def load_vision_tower(cfg: VisionConfig) -> torch.nn.Module:
    if cfg.name == "efficientnet-lite0":
        from .offline_efficientnet import EfficientNetLite0Tower

        return EfficientNetLite0Tower(image_size=cfg.image_size or 224)
    if cfg.name == "dinov2-s14":
        from .offline_dinov2 import dinov2_s14_dir

        return HFVisionTower(cfg, str(dinov2_s14_dir()))
    return HFVisionTower(cfg, cfg.name)
