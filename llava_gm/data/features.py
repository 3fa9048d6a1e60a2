"""On-disk cache of frozen vision features, keyed by tower and image content.

The tower never trains, so each image goes through it once. Features live in safetensors shards
under <cache>/features/<tower cache_name>/, one shard per extraction run, each key an image's SHA-1.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import LlavaGMError
from ..images import load_image
from ..paths import cache_dir
from ..precision import use_bf16


def encode_images(tower, images: list) -> torch.Tensor:
    """Run the frozen tower once (bf16 autocast where it is fast); training and inference share this path."""
    device = next(tower.parameters()).device
    pixels = tower.preprocess(images).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device)):
        return tower(pixels).to(torch.bfloat16).cpu()


def image_key(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


class FeatureCache:
    def __init__(self, tower, root: Path | None = None, dtype: torch.dtype = torch.bfloat16):
        self.tower = tower
        device = next(tower.parameters()).device
        # features computed under bf16 autocast differ slightly from fp32 ones: never mix them
        self.root = Path(root or cache_dir() / "features") / f"{tower.cache_name}-{'bf16' if use_bf16(device) else 'fp32'}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._index = {}  # image key -> shard path
        for shard in sorted(self.root.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for k in f.keys():
                    self._index[k] = shard

    def features(self, paths: list[Path], batch_size: int = 32, progress: bool = True) -> tuple[dict, dict]:
        """Return ({path: [N, D] features}, {path: error message for unreadable images})."""
        keys, failed = {}, {}
        for p in dict.fromkeys(paths):
            try:
                keys[p] = image_key(p)
            except OSError as e:
                failed[p] = f"cannot read image {p}: {e.strerror or e}"
        missing = [p for p, k in keys.items() if k not in self._index]
        missing = list({keys[p]: p for p in missing}.values())  # identical images are computed once
        if missing:
            self._compute(missing, keys, failed, batch_size, progress)
        out = {}
        by_shard: dict[Path, list] = {}
        for p, k in keys.items():
            if p not in failed and k in self._index:
                by_shard.setdefault(self._index[k], []).append((p, k))
        for shard, items in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                for p, k in items:
                    out[p] = f.get_tensor(k)
        for p in keys:
            if p not in out and p not in failed:
                failed[p] = f"image {p} could not be encoded"
        return out, failed

    def _compute(self, paths, keys, failed, batch_size, progress):
        new = {}
        bar = tqdm(total=len(paths), desc=f"vision features ({self.tower.cache_name})", unit="img", disable=not progress)
        for i in range(0, len(paths), batch_size):
            chunk, images = [], []
            for p in paths[i : i + batch_size]:
                try:
                    images.append(load_image(p))
                    chunk.append(p)
                except LlavaGMError as e:
                    failed[p] = f"cannot decode image ({e})"
            if chunk:
                feats = encode_images(self.tower, images)
                for p, f in zip(chunk, feats):
                    new[keys[p]] = f.to(self.dtype).contiguous()
            bar.update(len(paths[i : i + batch_size]))
        bar.close()
        if new:
            shard = self.root / f"{uuid.uuid4().hex}.safetensors"
            tmp = shard.with_suffix(".tmp")
            save_file(new, str(tmp))
            tmp.rename(shard)  # atomic: readers never see a half-written shard
            for k in new:
                self._index[k] = shard
