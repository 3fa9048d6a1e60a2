"""Measured memory of training steps on the CPU, to hold `llava-gm plan` to account.

`LiveBytes` counts the bytes of every tensor storage PyTorch creates while it is active and frees them when the
storage dies (what `torch.cuda.max_memory_allocated` reports on a GPU, here for any device): its `peak` is the
high-water mark. `measure_training_peak` runs a few training steps of a stage exactly as the trainer does (the
stage's plan_stage, frozen weights in bf16, bf16 autocast, fused AdamW, gradient clipping) on synthetic batches of
a fixed length, and returns the peak of weights + everything the steps allocate.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID


def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and not hasattr(t, "_local_tensor")


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new (and not ours if it predates the meter)
        # (tensor subclasses without storage of their own, FSDP's DTensors, are skipped: their local ops come here too)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _plain(t)}
        for t in tree_flatten(out)[0]:
            if _plain(t) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if st.nbytes() and key not in self.live and key not in inputs:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    weakref.finalize(st, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def synthetic_batch(model, batch: int, seq_len: int, label_tokens: int, seed: int = 0) -> dict:
    """A batch as collate makes it: every sample seq_len tokens, one image, the last label_tokens labelled."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.num_image_tokens
    vocab = model.lm.config.get_text_config().vocab_size
    ids = torch.randint(4, vocab, (batch, seq_len), generator=g)
    ids[:, 2 : 2 + n_img] = IMAGE_TOKEN_ID
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, seq_len - label_tokens :] = ids[:, seq_len - label_tokens :]
    feats = torch.randn(batch, model.vision_tokens, model.vision_dim, generator=g).to(torch.bfloat16)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "image_features": feats}


def prepare_stage(model, stage) -> list[str]:
    """What run_stage does before its loop: the stage's trainable set; frozen weights no stage trained stored in bf16."""
    from ..train.stages import plan_stage

    trainable = plan_stage(model, stage)
    for n, p in model.named_parameters():
        if not p.requires_grad and n not in model.trained_keys and not n.startswith("vision_tower.") and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    return trainable


def measure_training_peak(model, stage, batch: int, seq_len: int, label_tokens: int, steps: int = 2, ddp: bool = False,
                          fsdp: bool = False) -> dict:
    """Peak bytes of `steps` training steps of `stage` (model already prepared with prepare_stage; the vision tower,
    if attached, is left out: training reads cached features). Under torchrun, this rank's peak: `ddp` wraps the
    model in DistributedDataParallel (its gradient buckets are allocated inside the measurement); `fsdp` shards it
    as the trainer does (FSDP2, bf16 gathering, fp32 reduction) and counts the rank's shards as its weights."""
    if fsdp:
        from ..train.precision import TrainPrecision
        from ..train.sharding import shard

        shard(model, TrainPrecision(compute=torch.bfloat16, frozen=torch.bfloat16))
    params = [p for n, p in model.named_parameters() if p.requires_grad]

    def local(p):
        return getattr(p, "_local_tensor", p).untyped_storage().nbytes()

    weights = sum(local(p) for n, p in model.named_parameters() if not n.startswith("vision_tower."))
    data = [synthetic_batch(model, batch, seq_len, label_tokens, seed=s) for s in range(steps)]
    model.train()
    with LiveBytes() as meter:
        net = model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, broadcast_buffers=False, init_sync=False)
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([g for g in ({"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}) if g["params"]],
                                lr=1e-5, fused=True)
        for b in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(**b, word_loss=stage.word_loss)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out
    model.eval()
    return {"weights": weights, "steps_peak": meter.peak, "peak": weights + meter.peak}
