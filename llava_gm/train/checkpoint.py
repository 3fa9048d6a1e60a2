"""Step checkpoints of a running stage, next to its output: `<output>.steps/step-00000040/`.

Each holds the trainable weights (safetensors), the trainer state (optimizer, scheduler, micro-batches done,
the loss log, every rank's RNG) and a manifest with the files' SHA-256, so a damaged one is recognised and
resume falls back to the one before. Written atomically; the last `keep_last` are kept; the folder goes
once the stage's checkpoint is written. A lock file makes one run own an output at a time, and lets it remove
temporary folders that a killed run left behind (no run can still be writing them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import LlavaGMError
from ..paths import atomic_dir

WEIGHTS, TRAINER, MANIFEST = "weights.safetensors", "trainer.pt", "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def steps_dir(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".steps")


class StepCheckpoints:
    def __init__(self, output: Path, keep_last: int = 2, say: Callable[[str], None] = print):
        if keep_last < 1:
            raise LlavaGMError(f"keep_last {keep_last}: keep at least 1 step checkpoint")
        self.output, self.dir, self.keep_last, self.say = Path(output), steps_dir(output), keep_last, say
        self._lock = None

    def acquire(self) -> None:
        """Own the output for this run (a second run into it fails, naming the holder); clear stale temporaries."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LlavaGMError(f"another llava-gm train (pid {holder}) is writing {self.output}; wait for it or choose another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd
        # atomic_dir's temporaries (".name.XXXX") of a run killed mid-save: nobody else can own them now
        stale = list(self.dir.glob(".step-*")) + list(self.output.parent.glob(f".{self.output.name}.*"))
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            self.say(f"removed {len(stale)} temporary folder(s) left by an interrupted save")

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def finish(self) -> None:
        """The stage's checkpoint is written: its step checkpoints are no longer needed."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

    def existing(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step-*") if p.is_dir()) if self.dir.is_dir() else []

    def save(self, step: int, weights: dict, trainer: dict) -> Path:
        target = self.dir / f"step-{step:08d}"
        with atomic_dir(target) as tmp:
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            torch.save(trainer, tmp / TRAINER)
            files = {name: _sha256(tmp / name) for name in (WEIGHTS, TRAINER)}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}))
        for old in self.existing()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_latest(self) -> Optional[tuple[Path, dict, dict]]:
        """(folder, weights, trainer state) of the newest intact step checkpoint; damaged ones are named and skipped."""
        for folder in reversed(self.existing()):
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
                for name, digest in manifest["sha256"].items():
                    if _sha256(folder / name) != digest:
                        raise ValueError(f"{name} does not match its checksum")
                weights = load_file(str(folder / WEIGHTS))
                trainer = torch.load(folder / TRAINER, weights_only=True)
                return folder, weights, trainer
            except Exception as e:  # any damage: missing file, bad JSON, truncated tensor data
                self.say(f"warning: step checkpoint {folder} is damaged ({e}); trying the one before")
        return None
