"""Build a LlavaGM from a config, and save / load checkpoints.

A checkpoint folder holds `config.yaml` (the resolved model config and the stages that made it)
and `model.safetensors` with every weight trained so far (projector, LM weights of stage 2,
experts of stage 3). The backbones' untouched weights come from their ids, so a checkpoint
loads on its own wherever those backbones can be loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..backbones.language import load_language_model
from ..backbones.vision import load_vision_tower
from ..config import ModelConfig, from_dict, to_dict
from ..errors import LlavaGMError
from ..paths import atomic_dir
from .llava import LlavaGM


def build_model(cfg: ModelConfig, vision_tower=None, language=None) -> LlavaGM:
    """Backbones from their ids (or given: `language` = (lm, tokenizer)); the vision tower is probed once for its
    feature width and token count."""
    tower = vision_tower or load_vision_tower(cfg.vision)
    with torch.no_grad():
        from PIL import Image

        probe = tower(tower.preprocess([Image.new("RGB", (64, 64))]))
    lm, tokenizer = language or load_language_model(cfg.language)
    model = LlavaGM(cfg, lm, tokenizer, vision_dim=probe.shape[-1], vision_tokens=probe.shape[1])
    model.vision_tower = tower
    if cfg.sparse.kind != "none":
        apply_sparse(model)
    model.trained_keys = set()
    model.history = []
    return model


def apply_sparse(model: LlavaGM) -> None:
    from .sparse import sparsify

    model.sparse_layers = sparsify(model.lm, model.cfg.sparse)


def _trained_state(model: LlavaGM) -> dict:
    # named_parameters lists a tied weight once, which safetensors needs
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if n in model.trained_keys and not n.startswith("vision_tower.")}


def save_checkpoint(model: LlavaGM, path: str | Path, stage: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """Write atomically: a crash mid-save never leaves a half checkpoint at `path`."""
    path = Path(path)
    history = list(getattr(model, "history", [])) + ([stage] if stage else [])
    state = _trained_state(model)
    if path.exists():
        raise LlavaGMError(f"{path} exists; choose a new output folder or remove it")
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.cfg), "history": history}, sort_keys=False))
        for name, data in (extra or {}).items():  # logs and plots travel with the checkpoint
            (tmp / name).write_bytes(data)
    model.history = history
    return path


def checkpoint_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(path) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_checkpoint_config(path: str | Path) -> tuple[ModelConfig, list]:
    path = Path(path)
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file() or not (path / "model.safetensors").is_file():
        raise LlavaGMError(f"{path}: not a llava-gm checkpoint (expected config.yaml and model.safetensors)")
    data = yaml.safe_load(cfg_file.read_text())
    return from_dict(ModelConfig, data["model"], where=str(cfg_file)), data.get("history", [])


def load_checkpoint(path: str | Path, vision_tower=None) -> LlavaGM:
    cfg, history = read_checkpoint_config(path)
    model = build_model(cfg, vision_tower)
    state = load_file(str(Path(path) / "model.safetensors"))
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise LlavaGMError(f"{path}: weights {unknown[:3]} do not fit the model its config describes")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    model.trained_keys = set(state)
    model.history = history
    return model
