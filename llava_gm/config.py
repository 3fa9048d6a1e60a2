"""Typed configuration: what the model is made of and how each stage trains. YAML in and out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import LlavaGMError


@dataclass
class VisionConfig:
    """A frozen image encoder: a transformers id/path (CLIP, SigLIP, DINOv2) or an offline name."""

    name: str = "dinov2-s14"  # offline: dinov2-s14, efficientnet-lite0; else a hub id or local path
    select_layer: int = -2  # hidden state to take (LLaVA: the penultimate layer)
    drop_cls: bool = True  # keep patch tokens only
    image_size: Optional[int] = None  # resize input to this square size; None = the tower's default


@dataclass
class ProjectorConfig:
    type: Literal["linear", "mlp2x_gelu", "ldp"] = "mlp2x_gelu"
    pool: int = 1  # average-pool image tokens in pool x pool windows (1 = off) to cut tokens on small machines
    # image tokens as words: each image token becomes the embedding of one word of the first stage's answers (the
    # best-scoring one; gradients pass through the softmax), so the LM reads an image as it reads text
    word_tokens: bool = False
    word_ids: Optional[list[int]] = None  # that vocabulary: set by the first stage from its answers' tokens
    word_targets: Optional[list[int]] = None  # its content words (in under half the answers), the word loss's targets


@dataclass
class LanguageConfig:
    name: str = "gemma3-270m"  # offline default, or any transformers causal LM id / local path
    max_length: int = 2048  # longest training sequence; longer samples are an error or skipped


@dataclass
class SparseConfig:
    """Stage 3: which FFNs become sparse layers and how they route (LLaVA-GM MoE or Eve EVF)."""

    kind: Literal["none", "moe", "evf"] = "none"
    layers: Union[str, list[int]] = "alternate"  # alternate | first_half | second_half | all | [explicit indices]
    num_experts: int = 4  # MoE only; EVF always has 2 (language, vision)
    top_k: int = 2  # MoE only
    renormalize: bool = False  # renormalise top-k weights (MoE-LLaVA) vs raw softmax weights (LLaVA-GM eq. 7)
    balance_coef: float = 0.01  # MoE 0.01 (MoE-LLaVA); EVF uses 0.001 (Eve)
    z_loss_coef: float = 0.0
    capacity_factor_train: Optional[float] = 1.5  # None = dropless
    capacity_factor_eval: Optional[float] = 2.0
    allocation: Literal["random", "gbpr", "img_gbpr"] = "img_gbpr"  # EVF token allocation
    evf_capacity: float = 1.5  # EVF capacity C
    img_prior: float = 1.0  # EVF Img-GBPR modality prior added to the routing score
    overflow_share: float = 1.0  # EVF Img-GBPR: share W of overflow tokens re-offered to the other FFN


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    image_token: str = "<image>"  # recorded for reference: LLaVA data marks the image with this fixed tag


@dataclass
class StageConfig:
    """One training stage: what trains, on which data, how fast."""

    name: Literal["align", "instruct", "sparsify"] = "align"
    data: str = ""  # LLaVA-format JSON
    image_folder: str = ""
    lora: bool = False  # stage 2: LoRA adapters instead of the whole LM (Eve)
    lora_rank: int = 64
    lora_alpha: int = 128
    train_embeddings: bool = True  # stage 2: also train the (tied) token embeddings
    word_loss: float = 0.0  # with projector.word_tokens: weight of "the image tokens name every content word of the answer"
    lm_loss: float = 1.0  # weight of the language loss; 0 with word_loss: train the projector's words alone, no LM forward
    lr: float = 1e-3
    projector_lr: Optional[float] = None  # a separate rate for the projector (nanoVLM-style per-module rates); None = lr
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    max_samples: Optional[int] = None  # use only the first N samples (quick runs)
    on_bad: Literal["fail", "skip"] = "fail"  # bad samples: stop with an error naming them, or skip and count them
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPUs and AMX CPUs, else fp32


@dataclass
class RecipeConfig:
    """A whole recipe: the model and the stages that train it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)


def _build(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise LlavaGMError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _build(a, value, where)
            except (LlavaGMError, TypeError, ValueError):
                continue
        raise LlavaGMError(f"{where}: {value!r} does not fit {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise LlavaGMError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LlavaGMError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string: take it as the number it is
            try:
                return float(value)
            except ValueError:
                raise LlavaGMError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise LlavaGMError(f"{where}: expected a number, got {value!r}")
    if tp in (int, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise LlavaGMError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


# ---- ranges: every number checked before any work, naming the field ------------------------------------------

_POS, _NONNEG, _UNIT = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: 0 <= v <= 1, "in [0, 1]")
_RANGES = {
    VisionConfig: {"image_size": _POS},
    ProjectorConfig: {"pool": _POS},
    LanguageConfig: {"max_length": _POS},
    SparseConfig: {"num_experts": _POS, "top_k": _POS, "balance_coef": _NONNEG, "z_loss_coef": _NONNEG,
                   "capacity_factor_train": _POS, "capacity_factor_eval": _POS, "evf_capacity": _POS,
                   "overflow_share": _UNIT, "img_prior": (lambda v: True, "")},
    StageConfig: {"lora_rank": _POS, "lora_alpha": _POS, "word_loss": _NONNEG, "lm_loss": _NONNEG, "lr": _POS, "projector_lr": _POS,
                  "epochs": _POS, "batch_size": _POS, "grad_accum": _POS, "weight_decay": _NONNEG,
                  "betas": (lambda v: 0 <= v < 1, "in [0, 1)"), "warmup_ratio": _UNIT, "max_samples": _POS},
}


def check_ranges(obj: Any, where: str = "config") -> Any:
    """Raise LlavaGMError naming the first number field (of `obj` and the configs inside it) that is not finite or
    is out of its range; return `obj`. Types are checked by `from_dict`; this also covers command-line overrides."""
    import math

    for f in fields(obj):
        value, name = getattr(obj, f.name), f"{where}.{f.name}"
        if is_dataclass(value):
            check_ranges(value, name)
        elif isinstance(value, list) and value and all(is_dataclass(v) for v in value):
            for i, v in enumerate(value):
                check_ranges(v, f"{name}[{i}]")
        rule = _RANGES.get(type(obj), {}).get(f.name)
        if rule is None or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not rule[0](v):
                raise LlavaGMError(f"{name} must be a finite number{' ' + rule[1] if rule[1] else ''}, not {value!r}")
    if isinstance(obj, SparseConfig) and obj.kind == "moe" and obj.top_k > obj.num_experts:
        raise LlavaGMError(f"{where}.top_k ({obj.top_k}) must not exceed num_experts ({obj.num_experts})")
    return obj


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build a dataclass from a plain dict, naming any unknown or mistyped field."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise LlavaGMError(f"{where}: unknown field(s) {sorted(unknown)}; known fields: {sorted(names)}")
    kwargs = {k: _build(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    d = dataclasses.asdict(obj)
    return _plain(d)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def load_yaml(cls: type, path: Union[str, Path]) -> Any:
    """A config file as `cls`, its types and number ranges checked (errors name the file and field)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlavaGMError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise LlavaGMError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise LlavaGMError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise LlavaGMError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LlavaGMError(f"{path}: expected a mapping of fields at the top, got {type(data).__name__}")
    return check_ranges(from_dict(cls, data, where=str(path)), str(path))


def save_yaml(obj: Any, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
