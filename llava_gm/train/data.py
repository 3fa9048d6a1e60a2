"""A stage's training data as a torch DataLoader: the same batches for a seed and epoch on any number of ranks.

Batches are planned from sample lengths alone (shuffled, then length-grouped within mega-batches), so the plan
costs no image work and is identical on every rank. A global batch is cut into one contiguous slice per rank.
Items carry either cached vision features (read a batch at a time from memory-mapped shards) or preprocessed
pixels for a tower run inside the step (`online`); DataLoader workers do the reading and decoding.
"""

from __future__ import annotations

import functools
import random
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.conversation import IGNORE_INDEX
from ..data.llava_json import Sample
from ..images import load_image


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, world: int = 1) -> list[list[int]]:
    """Global batches of sample indices for one epoch: shuffled, similar lengths together (less padding).

    A function of (lengths, batch_size, seed, epoch) only. With several ranks a final batch smaller than the
    number of ranks is left out (every rank needs a sample)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 16
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: lengths[j])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [b for b in batches if len(b) >= world]


def rank_slice(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    bounds = [len(batch) * r // world for r in range(world + 1)]
    return batch[bounds[rank] : bounds[rank + 1]]


class StageBatches(Sampler):
    """Yields this rank's slice of every global batch, epoch after epoch, from micro-batch `start` on."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, total: int, start: int = 0, rank: int = 0, world: int = 1):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.total, self.start, self.rank, self.world = total, start, rank, world
        self.per_epoch = len(epoch_batches(lengths, batch_size, seed, 0, world))

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.start
        while micro < self.total:
            epoch, index = divmod(micro, self.per_epoch)
            batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch, self.world)
            for b in batches[index:]:
                if micro >= self.total:
                    return
                yield rank_slice(b, self.rank, self.world)
                micro += 1


class StageDataset(Dataset):
    """Sample i as tensors: token ids, labels and its image's features (cache) or pixels (online)."""

    def __init__(self, samples: list[Sample], reader=None, keys: Optional[dict] = None, preprocess=None):
        self.samples, self.reader, self.keys, self.preprocess = samples, reader, keys or {}, preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        item = {"id": s.id, "input_ids": s.encoded.input_ids, "labels": s.encoded.labels, "image": None}
        if s.image is not None:
            if self.preprocess is not None:  # online: a bad image stops the run naming its sample (`llava-gm data check` first)
                item["image"] = self.preprocess([load_image(s.image, f"sample {s.id}")])[0]
            else:
                item["image"] = self.reader.read([self.keys[s.image]])[0]
        return item


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded ids, labels and mask; `images`: stacked features or pixels of the samples that have one."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
    images = [it["image"] for it in items if it["image"] is not None]
    return {"ids": [it["id"] for it in items], "input_ids": ids, "labels": labels, "attention_mask": mask,
            "images": torch.stack(images) if images else None,
            "targets": int((labels[:, 1:] != IGNORE_INDEX).sum())}  # tokens the loss averages over


def make_loader(dataset: StageDataset, sampler: StageBatches, pad_id: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=functools.partial(collate, pad_id=pad_id),
                      persistent_workers=False, prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available())
