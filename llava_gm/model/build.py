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
from ..config import ModelConfig, check_ranges, from_dict, to_dict
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
    with atomic_dir(path, loser_fails=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.cfg), "history": history,
                                                         "weights": _manifest(state)}, sort_keys=False))
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


def _manifest(state: dict) -> dict:
    """What model.safetensors must hold: every weight's shape and dtype (checked at load time)."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in sorted(state.items())}


def _read_config_file(path: Path) -> dict:
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file() or not (path / "model.safetensors").is_file():
        raise LlavaGMError(f"{path}: not a llava-gm checkpoint (expected config.yaml and model.safetensors)")
    try:
        data = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LlavaGMError(f"{cfg_file}: not valid YAML ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise LlavaGMError(f"{cfg_file}: has no 'model:' section; the checkpoint is damaged or not a llava-gm checkpoint")
    return data


def read_checkpoint_config(path: str | Path) -> tuple[ModelConfig, list]:
    path = Path(path)
    data = _read_config_file(path)
    cfg = check_ranges(from_dict(ModelConfig, data["model"], where=f"{path / 'config.yaml'}: model"), f"{path / 'config.yaml'}: model")
    history = data.get("history") or []
    if not isinstance(history, list):
        raise LlavaGMError(f"{path / 'config.yaml'}: 'history' must be a list of stages")
    return cfg, history


def _read_weights(path: Path) -> dict:
    file = path / "model.safetensors"
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for empty, truncated or garbled files
        raise LlavaGMError(f"{file}: cannot be read as safetensors ({e}); the file is damaged (an interrupted copy?)") from None


def check_weights(path: Path, state: dict, params: dict, manifest: Optional[dict]) -> None:
    """Every weight the checkpoint's config lists is in model.safetensors with its shape and dtype, and every weight
    fits the model; a checkpoint written before manifests existed must at least hold its projector."""
    where = path / "model.safetensors"
    problems = []
    if manifest is not None:
        if not isinstance(manifest, dict):
            raise LlavaGMError(f"{path / 'config.yaml'}: 'weights' must be a mapping; the checkpoint is damaged")
        missing = sorted(set(manifest) - set(state))
        if missing:
            problems.append(f"{len(missing)} weight(s) missing, e.g. {missing[:3]}")
        extra = sorted(set(state) - set(manifest))
        if extra:
            problems.append(f"{len(extra)} weight(s) that config.yaml does not list, e.g. {extra[:3]}")
        for k in sorted(set(manifest) & set(state)):
            want, v = manifest[k], state[k]
            got = {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            if not isinstance(want, dict) or want.get("shape") != got["shape"] or want.get("dtype") != got["dtype"]:
                problems.append(f"{k} is {got['dtype']} {got['shape']}, config.yaml says {want}")
    else:
        missing = sorted(k for k in params if k.startswith("projector.") and k not in state)
        if missing:
            problems.append(f"projector weight(s) missing: {missing[:3]}")
    unknown = [k for k in state if k not in params]
    if unknown:
        problems.append(f"weights {unknown[:3]} are not in the model its config describes")
    for k in state:
        if k in params and (state[k].shape != params[k].shape or not state[k].is_floating_point()):
            problems.append(f"{k} is {state[k].dtype} {list(state[k].shape)}, the model needs {list(params[k].shape)} floats")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged run's weights: answering with them crashes or gives gibberish
        problems.append(f"{len(bad)} weight(s) hold NaN or infinite values, e.g. {bad[:3]} (the run that wrote them diverged)")
    if problems:
        raise LlavaGMError(f"{where} does not match its config.yaml: " + "; ".join(problems[:4]) +
                           (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "") +
                           "; retrain, or restore the checkpoint's own files")


def load_checkpoint(path: str | Path, vision_tower=None) -> LlavaGM:
    path = Path(path)
    cfg, history = read_checkpoint_config(path)
    manifest = _read_config_file(path).get("weights")
    state = _read_weights(path)  # before building: a damaged file fails fast
    model = build_model(cfg, vision_tower)
    params = dict(model.named_parameters())
    check_weights(path, state, params, manifest)
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    model.trained_keys = set(state)
    model.history = history
    return model
