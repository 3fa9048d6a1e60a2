"""The shipped recipes (YAML package data, so an installed llava-gm finds them from any folder), by name or path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import LlavaGMError


def names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def resolve(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path as given, else a shipped recipe's name ("offline-default", with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    shipped = resources.files(__name__) / f"{name}.yaml"
    if str(path.parent) in (".", "recipes") and shipped.is_file():  # "offline-default" or the old "recipes/offline-default.yaml"
        return Path(str(shipped))
    raise LlavaGMError(f"recipe {str(name_or_path)!r}: no such file, and not a shipped recipe name ({', '.join(names())})")
