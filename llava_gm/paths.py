"""Where llava-gm keeps converted weights and cached features, and how it writes them safely."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """Root for converted backbones and feature caches: $LLAVA_GM_CACHE or ~/.cache/llava-gm."""
    root = Path(os.environ.get("LLAVA_GM_CACHE", Path.home() / ".cache" / "llava-gm")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_dir(target: Path, loser_fails: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed onto `target` in one step.

    Readers never see a half-written folder and a finished one is never clobbered. If another process finished
    `target` first: a cache (the default) keeps the winner's copy, which is as good as ours; with `loser_fails`
    (checkpoints, where the two differ) ours is kept beside it as `<target>.conflict-<pid>` and the loser fails,
    saying so, instead of reporting success for a result that is not there.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            if not loser_fails:
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race: the winner's copy is complete
                return
            kept = target.with_name(f"{target.name}.conflict-{os.getpid()}")
            os.rename(tmp, kept)
            from .errors import LlavaGMError

            raise LlavaGMError(f"{target} was written by another process while this one ran (two runs with one output "
                               f"folder?); this run's result is kept at {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
