"""One process or many under torchrun: who this rank is, its device, and the few collectives training needs.

`torchrun --nproc_per_node N -m llava_gm train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; the process group uses
NCCL on GPUs and gloo on CPUs. If one rank fails it exits non-zero and torchrun stops the others, so an error
never leaves ranks waiting; an error every rank can see (a non-finite loss) is raised on all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Ranks:
    """This process's rank and device; starts the process group once when torchrun launched several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Ranks(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Ranks(dist.get_rank(), world, device)


def all_sum(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sum over ranks (fp64, so sums of per-rank sums stay exact enough to compare runs)."""
    return all_sum_tensor(torch.tensor(values, dtype=torch.float64), ranks).tolist()


def all_sum_tensor(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Element-wise sum over ranks of a tensor (reduced on the rank's device, returned where it came from)."""
    if ranks.world == 1:
        return t
    moved = t.to(ranks.device)
    dist.all_reduce(moved)
    return moved.to(t.device)


def gather(obj, ranks: Ranks) -> list:
    """Every rank's `obj`, in rank order, on every rank (small things only: ids, RNG states)."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, ranks: Ranks):
    """Rank 0's `obj` on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()
