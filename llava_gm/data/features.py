"""On-disk cache of frozen vision features, keyed by tower and image content.

The tower never trains, so each image goes through it once. Features live in safetensors shards
under <cache>/features/<tower cache_name>/ (at most `shard_size` images a shard, each key an image's SHA-1).
Training reads them a batch at a time from the memory-mapped shards (`read`): nothing gathers a dataset's
features in memory, so memory does not grow with the dataset. `prepare` fills the cache ahead of training.
"""

from __future__ import annotations

import hashlib
import os
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
    return encode_pixels(tower, tower.preprocess(images)).cpu()


def encode_pixels(tower, pixels: torch.Tensor) -> torch.Tensor:
    """Features of preprocessed images, on the tower's device: no gradients, bf16 out (online training features too)."""
    device = next(tower.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device)):
        return tower(pixels.to(device)).to(torch.bfloat16)


def image_key(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


class ShardReader:
    """Reads cached features a batch at a time from memory-mapped shards; small to send to DataLoader workers."""

    max_open = 64

    def __init__(self, index: dict):
        self.index = index  # image key -> shard path
        self._handles, self._pid = {}, os.getpid()

    def __getstate__(self):  # workers open their own handles
        return {"index": self.index, "_handles": {}, "_pid": None}

    def read(self, keys: list[str]) -> torch.Tensor:
        """[len(keys), N, D] features (one open handle per shard and process)."""
        if self._pid != os.getpid():  # a forked worker: handles do not survive a fork
            self._handles, self._pid = {}, os.getpid()
        out = []
        for k in keys:
            shard = self.index[k]
            handle = self._handles.pop(shard, None) or safe_open(str(shard), "pt")
            self._handles[shard] = handle  # most recently used last
            if len(self._handles) > self.max_open:  # a big cache has thousands of shards: bound the open files
                del self._handles[next(iter(self._handles))]
            out.append(handle.get_tensor(k))
        return torch.stack(out)


class FeatureCache:
    def __init__(self, tower, root: Path | None = None, dtype: torch.dtype = torch.bfloat16):
        self.tower = tower
        device = next(tower.parameters()).device
        # features computed under bf16 autocast differ slightly from fp32 ones: never mix them
        # "-img2": images decoded by llava_gm.images (16-bit scaled, transparency on white); features cached from the
        # older decoding (clipped, black behind transparency) are keyed by the same file bytes and must not be reused
        self.root = Path(root or cache_dir() / "features") / f"{tower.cache_name}-{'bf16' if use_bf16(device) else 'fp32'}-img2"
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._index = {}  # image key -> shard path
        for shard in sorted(self.root.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for k in f.keys():
                    self._index[k] = shard

    def prepare(self, paths: list[Path], batch_size: int = 32, progress: bool = True) -> tuple[dict, dict]:
        """Compute the features of images not cached yet; return ({path: cache key}, {path: error message})."""
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
        for p, k in list(keys.items()):
            if p not in failed and k not in self._index:
                failed[p] = f"image {p} could not be encoded"
            if p in failed:
                del keys[p]
        return keys, failed

    def reader(self) -> "ShardReader":
        return ShardReader(self._index)

    def read(self, keys: list[str]) -> torch.Tensor:
        return self.reader().read(keys)

    def features(self, paths: list[Path], batch_size: int = 32, progress: bool = True) -> tuple[dict, dict]:
        """({path: [N, D] features}, {path: error}) for a bounded list of images (one answer batch, a probe set)."""
        keys, failed = self.prepare(paths, batch_size, progress)
        return {p: f for p, f in zip(keys, self.read(list(keys.values())))} if keys else {}, failed

    def _compute(self, paths, keys, failed, batch_size, progress, shard_images: int = 1024, shard_bytes: int = 256 << 20):
        new, size = {}, 0
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
                    size += new[keys[p]].nbytes
            bar.update(len(paths[i : i + batch_size]))
            if len(new) >= shard_images or size >= shard_bytes:  # bounded memory: a shard at a time, however many images
                self._write_shard(new)
                new, size = {}, 0
        bar.close()
        if new:
            self._write_shard(new)

    def _write_shard(self, new: dict) -> None:
        shard = self.root / f"{uuid.uuid4().hex}.safetensors"
        tmp = shard.with_suffix(".tmp")
        save_file(new, str(tmp))
        tmp.rename(shard)  # atomic: readers never see a half-written shard
        for k in new:
            self._index[k] = shard
