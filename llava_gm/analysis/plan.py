"""`llava-gm plan`: per-GPU memory of every training stage of a recipe, and the largest batch that fits.

The model is built on the `meta` device from the backbones' configs (no weights, no memory), so parameter
counts are exact; which parameters train in a stage comes from the trainer's own `plan_stage`. Bytes per GPU:

  weights      trainable parameters in fp32 (master copy), frozen ones in bf16 (the compute dtype) unless an earlier
               stage trained them (they stay fp32: the trainer's precision policy, llava_gm/train/precision.py)
  compute copy bf16 copies of the fp32 matrices while a step runs (autocast casts each once, kept for backward;
               under FSDP: the gathered bf16 parameters of the root module + 2 decoder layers, and one
               layer's fp32 gradient before its reduce-scatter)
  gradients    4 B per trainable parameter (fp32); with DDP on N > 1 GPUs 4 B more for its gradient buckets
  optimizer    AdamW: exp_avg + exp_avg_sq, 8 B per trainable parameter
  activations  what autograd keeps for backward, per token: a_layer per decoder layer (below) + the layer
               outputs the head reads, and at the labelled positions the fp32 log-softmax over the vocabulary
               (4 V B held; 12 V B at the head's backward, with its gradient and its input's); with activation checkpointing each layer keeps only its input (residual stream:
               4 d B in fp32 when the embeddings train, else 2 d B) and one layer's activations are rebuilt at a time
  tower        the frozen vision tower (fp32 storage) on every GPU (`features: online`); nothing with `cache`

a_layer = c_d d + c_q q + c_kv kv + c_i i + c_h h + c_1 + c_hT h T + c_T T bytes per token, with d the hidden size,
q = heads x head_dim, kv = kv_heads x head_dim, i the FFN width, h the heads and T the sequence length (the T
terms are non-zero only for attention kernels that keep T x T scores, e.g. eager attention). The coefficients are
not guessed: `layer_coefficients` reads them off the tensors PyTorch's autograd saves in one decoder layer of the
same transformers class, in the stage's regime (which weights train, the residual dtype, MoE / EVF / LoRA), on a
few small widths, and solves for them exactly; they are printed with the plan.

Peak: the optimizer state lives through the step; in backward, gradients appear layer by layer as activations are
freed, so the peak is the largest (activations still held + gradients already made) over backward, plus the head's
transient at its start. Every sample is taken at the recipe's max_length (worst case) and every text token labelled
unless --label-tokens says how many are.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig, RecipeConfig, StageConfig
from ..errors import LlavaGMError

GB = 1e9
BF16, FP32 = 2, 4
# the loss head at each labelled position, bytes per vocabulary entry (read with memory_meter.LiveBytes around
# F.cross_entropy(F.linear(h, W).float(), t) under bf16 autocast, then its backward):
HEAD_SAVED = 4  # the fp32 log-softmax, held from the forward until backward reaches the head
HEAD_BACKWARD = 8  # more at the head's backward: the log-softmax's gradient and its input's (fp32)


# ---- configs, offline -------------------------------------------------------------------------------
def snapshot_path(name: str) -> Optional[Path]:
    """The shipped numbers-only config of a hub id or offline backbone name, if there is one."""
    p = resources.files("llava_gm") / "assets" / "configs" / (name.strip("/").replace("/", "--") + ".json")
    return Path(str(p)) if p.is_file() else None


def load_config(name: str, override: Optional[str] = None):
    """A transformers config for a backbone: a local folder / config.json (override first), a shipped snapshot,
    or the local Hugging Face cache. Never downloads."""
    from transformers import AutoConfig

    source = override or name
    path = Path(source)
    if path.is_file():
        return _config_from_json(json.loads(path.read_text()), path)
    if path.is_dir():
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise LlavaGMError(f"{path}: not a transformers model folder ({e})") from None
    snap = snapshot_path(source)
    if snap is not None:
        return _config_from_json(json.loads(snap.read_text()), snap)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        raise LlavaGMError(f"no config for {source!r}: give a local folder or config.json (--lm-config / --vision-config); "
                           f"shipped snapshots: {', '.join(shipped_snapshots())}") from None


def shipped_snapshots() -> list[str]:
    folder = resources.files("llava_gm") / "assets" / "configs"
    return sorted(p.name[:-5].replace("--", "/") for p in folder.iterdir() if p.name.endswith(".json"))


def _config_from_json(data: dict, where) -> object:
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if not k.startswith("_")}
    if "vision_config" in data and "text_config" not in data:  # a whole CLIP / SigLIP config: its tower part
        data = {"model_type": data.get("model_type", "") + "_vision_model", **data["vision_config"]}
    kind = data.pop("model_type", None)
    if not kind:
        raise LlavaGMError(f"{where}: a config needs 'model_type'")
    try:
        return AutoConfig.for_model(kind, **data)
    except (ValueError, TypeError) as e:
        raise LlavaGMError(f"{where}: not a transformers config ({e})") from None


# ---- the model on the meta device ---------------------------------------------------------------------
@dataclass
class MetaModel:
    model: torch.nn.Module  # LlavaGM on meta (lm, projector; sparse layers for stage 3)
    lm_config: object
    vision_params: int  # tower parameters actually run (layers after the selected one are dropped)
    vision_tokens: int  # tokens per image out of the tower
    vision_dim: int
    vision_spec: object  # params_flops.VisionSpec, for the tower's transient activations

    @property
    def text(self):
        c = self.lm_config
        return c.get_text_config() if hasattr(c, "get_text_config") else c


def vision_shape(vc, cfg) -> tuple[int, int, int, object]:
    """(parameters run, tokens out, width, spec) of a ViT tower config, as HFVisionTower uses it."""
    from transformers import AutoModel

    from .params_flops import vision_spec_from_config

    spec = vision_spec_from_config(vc, cfg.select_layer, cfg.image_size)
    with torch.device("meta"):
        tower = AutoModel.from_config(vc)
    n_layers = getattr(vc, "num_hidden_layers")
    per_layer = sum(p.numel() for n, p in tower.named_parameters() if ".layer." in n or ".layers." in n) / n_layers
    params = sum(p.numel() for p in tower.parameters()) - per_layer * (n_layers - spec.layers)
    tokens = (spec.image_size // spec.patch) ** 2 + (0 if cfg.drop_cls else spec.prefix_tokens)
    return int(params), tokens, vc.hidden_size, spec


def build_meta_model(cfg: ModelConfig, lm_config=None, vision_config=None, sparse: bool = False) -> MetaModel:
    from transformers import AutoModelForCausalLM

    from ..model.build import apply_sparse
    from ..model.llava import LlavaGM

    lm_config = lm_config or load_config(cfg.language.name)
    vision_config = vision_config or load_config(cfg.vision.name)
    v_params, v_tokens, v_dim, spec = vision_shape(vision_config, cfg.vision)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config)
        model = LlavaGM(dataclasses.replace(cfg), lm, None, vision_dim=v_dim, vision_tokens=v_tokens)
        if sparse and cfg.sparse.kind != "none":
            apply_sparse(model)
    model.trained_keys, model.history = set(), []
    return MetaModel(model, lm_config, v_params, v_tokens, v_dim, spec)


def lora_params(lm: torch.nn.Module, rank: int) -> int:
    """LoRA adapters on every linear layer of the LM but its head (peft's target_modules='all-linear')."""
    head = lm.get_output_embeddings()
    return sum(rank * (m.in_features + m.out_features) for m in lm.modules() if isinstance(m, torch.nn.Linear) and m is not head)


# ---- activation bytes of one decoder layer, read off autograd ----------------------------------------
FEATURES = ("d", "q", "kv", "i", "h", "1", "hT", "T")
# small widths for the probe: enough independent rows to solve for the 8 coefficients
_PROBE_SHAPES = [  # (hidden, heads, kv_heads (set by _kv_like), head_dim, ffn, T)
    (48, 2, 0, 24, 96, 29), (64, 2, 0, 24, 96, 29), (48, 4, 0, 24, 96, 29), (48, 2, 0, 32, 96, 29), (48, 2, 0, 24, 160, 29),
    (48, 2, 0, 24, 96, 37), (64, 4, 0, 32, 160, 37), (80, 4, 0, 24, 128, 41), (48, 4, 0, 32, 96, 23),
]


@dataclass(frozen=True)
class Regime:
    """How a decoder layer runs in a stage: what trains in it and the dtype of the residual stream."""

    mode: str  # frozen | train | lora | moe | evf
    resid_fp32: bool  # the embeddings are stored in fp32 (they train, or an earlier stage trained them)
    lora_rank: int = 0
    frozen_fp32: bool = False  # frozen weights an earlier stage trained stay fp32 (the trainer's precision policy)


def _kv_like(text_config, shape):
    """The probe keeps the real model's key/value head layout: one shared head (MQA), one per query head (MHA), or
    the same group size (GQA; repeated heads are materialised then, a view for MQA)."""
    hidden, heads, kv, head_dim, ffn, T = shape
    real_heads = text_config.num_attention_heads
    real_kv = getattr(text_config, "num_key_value_heads", None) or real_heads
    if real_kv == 1:
        kv = 1
    elif real_kv == real_heads:
        kv = heads
    else:
        group = real_heads // real_kv
        kv = max(2, heads // group)
        heads = kv * group
    return hidden, heads, kv, head_dim, ffn, T


def _probe_config(text_config, hidden, heads, kv, head_dim, ffn):
    d = text_config.to_dict()
    d.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, intermediate_size=ffn,
             num_hidden_layers=1, vocab_size=64, max_position_embeddings=256)
    if d.get("layer_types"):
        d["layer_types"] = ["full_attention"]
    if d.get("sliding_window"):
        d["sliding_window"] = 4096
    for k in ("query_pre_attn_scalar",):
        if k in d:
            d[k] = head_dim
    return type(text_config)(**d)


def _saved_per_sample(text_config, shape, regime: Regime, sparse_cfg) -> float:
    """Bytes autograd saves inside decoder layer 0 per sample (storage counted once; parameters left out): the
    difference between a batch of 2 and of 1 leaves out what does not grow with the batch (weight casts, rope tables)."""
    from transformers import AutoModelForCausalLM

    from ..model.sparse import decoder_layers, modality, sparse_trainable, sparsify

    hidden, heads, kv, head_dim, ffn, T = shape
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(_probe_config(text_config, hidden, heads, kv, head_dim, ffn))
    trainable: set = set()
    if regime.mode in ("moe", "evf"):
        sparsify(lm, dataclasses.replace(sparse_cfg, kind=regime.mode, layers=[0], capacity_factor_train=None))
        trainable = set(sparse_trainable(lm))
    elif regime.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=regime.lora_rank, lora_alpha=regime.lora_rank, lora_dropout=0.05, target_modules="all-linear"))
        trainable = {n for n, _ in lm.named_parameters() if "lora_" in n}
    elif regime.mode == "train":
        trainable = {n for n, _ in lm.named_parameters()}
    for n, p in lm.named_parameters():
        p.requires_grad_(n in trainable)
        if n not in trainable and p.is_floating_point() and not regime.frozen_fp32:
            p.data = p.data.to(torch.bfloat16)  # frozen weights never trained are stored in the compute dtype
    lm.train()
    layer = decoder_layers(lm)[0]
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    saved: dict[int, int] = {}
    inside = [False]

    def pack(t):
        if inside[0]:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
        return t

    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    dtype = torch.float32 if regime.resid_fp32 else torch.bfloat16
    total = []
    for batch in (1, 2):
        saved.clear()
        x = torch.randn(batch, T, hidden, dtype=dtype, requires_grad=True)
        mask = torch.ones(batch, T, dtype=torch.long)
        mask[-1, -1] = 0  # padding, as in a training batch: the masked attention path
        image = torch.ones(batch, T, dtype=torch.bool)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16), \
                modality(lm, image, image.any(-1), mask.bool()):
            out = lm.get_decoder()(inputs_embeds=x, attention_mask=mask, use_cache=False)
        total.append(sum(saved.values()))
        del out
    return float(total[1] - total[0])


@functools.lru_cache(maxsize=None)
def _coefficients(config_json: str, config_cls: str, regime: Regime, sparse_json: str) -> dict:
    import numpy as np
    from transformers import AutoConfig

    from ..config import SparseConfig, from_dict

    text_config = AutoConfig.for_model(config_cls, **json.loads(config_json))
    sparse_cfg = from_dict(SparseConfig, json.loads(sparse_json))
    rows, ys = [], []
    for shape in _PROBE_SHAPES:
        shape = _kv_like(text_config, shape)
        hidden, heads, kv, head_dim, ffn, T = shape
        per_sample = _saved_per_sample(text_config, shape, regime, sparse_cfg)
        rows.append([hidden, heads * head_dim, kv * head_dim, ffn, heads, 1, heads * T, T])
        ys.append(per_sample / T)
    coef, *_ = np.linalg.lstsq(np.array(rows, float), np.array(ys), rcond=None)
    return {f: float(round(c, 2)) for f, c in zip(FEATURES, coef)}


def layer_coefficients(text_config, regime: Regime, sparse_cfg=None) -> dict:
    """Bytes per token of one decoder layer = sum(coef[f] * f) over FEATURES (see the module docstring)."""
    from ..config import SparseConfig, to_dict

    d = {k: v for k, v in text_config.to_dict().items() if k not in ("architectures", "transformers_version", "model_type")}
    return _coefficients(json.dumps(d, sort_keys=True, default=str), text_config.model_type, regime,
                         json.dumps(to_dict(sparse_cfg or SparseConfig()), sort_keys=True))


def layer_bytes_per_token(coef: dict, text_config, seq_len: int) -> float:
    c = text_config
    heads = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    values = {"d": c.hidden_size, "q": heads * hd, "kv": kv * hd, "i": c.intermediate_size, "h": heads, "1": 1,
              "hT": heads * seq_len, "T": seq_len}
    return max(0.0, sum(coef[f] * values[f] for f in FEATURES))


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass
class Setup:
    gpus: int = 1
    gpu_memory_gb: float = 80.0
    strategy: str = "ddp"  # ddp | fsdp (one GPU: plain)
    batch_size: Optional[int] = None  # per device; None = the recipe's global batch / gpus
    checkpointing: bool = False  # activation checkpointing of the decoder layers
    features: str = "online"  # online: the tower runs in the step on every GPU; cache: features read from disk
    label_tokens: Optional[int] = None  # labelled tokens per sample; None = every text token (worst case)
    seq_len: Optional[int] = None  # None = the recipe's language.max_length


@dataclass
class StagePlan:
    stage: str
    trains: str
    trainable: int
    frozen: int
    batch: int  # per device
    accumulation: int
    seq_len: int
    bytes: dict = field(default_factory=dict)  # component -> bytes per GPU
    peak: float = 0.0
    peak_checkpointed: float = 0.0
    fits: bool = False
    max_batch: int = 0  # largest per-device batch that fits (without / with checkpointing)
    max_batch_checkpointed: int = 0
    coefficients: dict = field(default_factory=dict)  # per decoder-layer regime


def _regime_of(stage: StageConfig, emb_fp32: bool, lm_fp32: bool) -> Regime:
    if stage.name == "instruct" and stage.lora:
        return Regime("lora", emb_fp32, stage.lora_rank, lm_fp32)
    if stage.name == "instruct":
        return Regime("train", stage.train_embeddings or emb_fp32, 0, lm_fp32)
    return Regime("frozen", emb_fp32, 0, lm_fp32)  # align; sparsify: everything but the sparse layers


def _trains(stage: StageConfig, sparse_kind: str) -> str:
    if stage.name == "align":
        return "projector"
    if stage.name == "instruct":
        return "projector + LoRA adapters" if stage.lora else "projector + whole LM" + ("" if stage.train_embeddings else " (not the embeddings)")
    return "MoE routers + experts" if sparse_kind == "moe" else "EVF routers + vision FFNs"


class StageModel:
    """The memory model of one stage: fixed parts computed once, activations as a function of the batch."""

    def __init__(self, meta: MetaModel, stage: StageConfig, setup: Setup, trained_before: frozenset = frozenset()):
        from ..model.sparse import decoder_layers, sparse_modules, sparse_param_names
        from ..train.stages import plan_stage

        self.meta, self.stage, self.setup = meta, stage, setup
        model = meta.model
        params = dict(model.named_parameters())
        if stage.lora and stage.name == "instruct":  # the LM stays frozen; its adapters are counted apart
            names = {n for n in params if n.startswith("projector.")}
            for n, p in params.items():
                p.requires_grad_(n in names)
        else:
            names = set(plan_stage(model, stage))
        self.lora = lora_params(model.lm, stage.lora_rank) if stage.lora and stage.name == "instruct" else 0
        self.trainable = sum(params[n].numel() for n in names) + self.lora
        total = sum(p.numel() for p in model.parameters())
        self.frozen = total - (self.trainable - self.lora)
        # the trainer's precision policy: trainable weights fp32; frozen ones in bf16 unless an earlier stage trained
        # them (they keep the fp32 they were saved in); run_stage counts a new sparse layer as trained when its FFN was
        lm_trained = any(n.startswith("lm.") for n in trained_before)
        sparse_names = sparse_param_names(model)
        fp32 = {n for n in params if n in names or n in trained_before or (lm_trained and n in sparse_names)}
        self.frozen_fp32 = sum(p.numel() for n, p in params.items() if n in fp32 and n not in names)
        self.trained_after = set(trained_before) | names | sparse_names
        if self.lora:  # merged into the LM's linears when the stage ends
            self.trained_after |= {n for n in params if n.startswith("lm.") and ".layers." in n}
        # every fp32 matrix used under autocast has a bf16 copy held for backward (a tied embedding too, for the head)
        emb = model.lm.get_input_embeddings().weight
        head = model.lm.get_output_embeddings().weight
        self.cast = sum(p.numel() for n, p in params.items() if n in fp32 and p.ndim >= 2 and (p is not emb or p is head)) + self.lora
        layers = decoder_layers(model.lm)
        sparse_idx = {m.layer_idx for m in sparse_modules(model.lm)}
        text = meta.text
        emb_name = next(n for n, p in params.items() if p is emb)
        self.regime = _regime_of(stage, emb_name in fp32, lm_trained)
        self.layer_regimes = []
        for i in range(len(layers)):
            r = dataclasses.replace(self.regime, mode=model.cfg.sparse.kind) if i in sparse_idx else self.regime
            self.layer_regimes.append(r)
        self.layer_grads = [FP32 * sum(p.numel() for n, p in layers[i].named_parameters(prefix=f"L{i}") if p.requires_grad) for i in range(len(layers))]
        if self.lora:  # adapters on the layers' linears: spread over the layers
            self.layer_grads = [g + FP32 * self.lora / len(layers) for g in self.layer_grads]
        self.other_grads = FP32 * self.trainable - sum(self.layer_grads)  # projector, embeddings, final norm
        self.coefficients = {f"{r.mode}{'' if r.mode in ('moe', 'evf') or r.resid_fp32 else ' (bf16 residual)'}": layer_coefficients(text, r, model.cfg.sparse)
                             for r in dict.fromkeys(self.layer_regimes)}
        self._coef = {r: layer_coefficients(text, r, model.cfg.sparse) for r in dict.fromkeys(self.layer_regimes)}
        # gradients are needed back to the first layer that trains or, when the projector trains, to the input
        trains_input = any(n.startswith("projector.") for n in names) or stage.name == "instruct"
        self.first_needed = 0 if trains_input else min((i for i, g in enumerate(self.layer_grads) if g), default=len(layers))
        self.layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        self.root_size = total - sum(self.layer_sizes)
        self.weights = FP32 * (self.trainable - self.lora) + FP32 * self.frozen_fp32 + BF16 * (self.frozen - self.frozen_fp32) + FP32 * self.lora
        self.tower = FP32 * meta.vision_params if setup.features == "online" else 0.0  # the tower keeps its fp32 storage
        self.seq_len = setup.seq_len or model.cfg.language.max_length
        self.image_tokens = model.num_image_tokens

    def _n(self) -> int:
        return max(1, self.setup.gpus)

    def states(self) -> dict:
        n = self._n()
        fsdp = self.setup.strategy == "fsdp" and n > 1
        shard = n if fsdp else 1
        out = {"weights": self.weights / shard, "gradients": FP32 * self.trainable / shard, "optimizer": 2 * FP32 * self.trainable / shard}
        if fsdp:  # root module (embeddings, projector) stays gathered; two layers gathered at a time; one layer's fp32 grads
            big = max(self.layer_sizes)
            out["compute copy"] = BF16 * (self.root_size + 2 * big) + max(self.layer_grads)
        else:
            out["compute copy"] = BF16 * self.cast
            if n > 1:  # DDP's gradient buckets (gradient_as_bucket_view off, PyTorch's default): a second fp32 copy
                out["gradients"] += FP32 * self.trainable
        out["tower"] = self.tower
        return out

    def activations(self, batch: int, checkpointing: bool) -> tuple[list[float], float, float]:
        """(per decoder layer, other held activations, head transient at the start of backward), bytes."""
        text = self.meta.text
        T = self.seq_len
        tokens = batch * T
        resid = FP32 if self.regime.resid_fp32 else BF16
        projector = batch * self.image_tokens * BF16 * (self.meta.vision_dim + 3 * text.hidden_size)
        features = batch * self.meta.vision_tokens * self.meta.vision_dim * BF16
        if not self.stage.lm_loss:  # the word loss alone: no LM forward, only the projector's activations
            return [0.0] * len(self.layer_regimes), projector + features, 0.0
        per_layer = []
        for i, r in enumerate(self.layer_regimes):
            if i < self.first_needed:
                per_layer.append(0.0)
                continue
            full = tokens * layer_bytes_per_token(self._coef[r], text, T)
            per_layer.append(tokens * resid * text.hidden_size if checkpointing else full)
        if checkpointing:  # one layer's activations rebuilt at a time in backward
            biggest = max(tokens * layer_bytes_per_token(self._coef[r], text, T) for r in self.layer_regimes)
        else:
            biggest = 0.0
        labels = self.setup.label_tokens if self.setup.label_tokens is not None else max(1, T - self.image_tokens)
        vocab = text.vocab_size
        head = batch * labels * (HEAD_SAVED * vocab + BF16 * text.hidden_size)
        final_norm = tokens * (FP32 + FP32 + BF16) * text.hidden_size
        other = head + final_norm + projector + features + biggest
        transient = batch * labels * HEAD_BACKWARD * vocab
        return per_layer, other, transient

    def peak(self, batch: int, checkpointing: bool) -> tuple[float, dict]:
        s = self.states()
        per_layer, other, transient = self.activations(batch, checkpointing)
        grads_layers = [g / (self._n() if self.setup.strategy == "fsdp" and self._n() > 1 else 1) for g in self.layer_grads]
        grads_other = s["gradients"] - sum(grads_layers)
        accumulate = self.stage.grad_accum > 1
        # backward: the head first (its transient, the tied embedding's / projector's gradients), then layers last to first
        held = sum(per_layer) + other
        made = grads_other if not accumulate else s["gradients"]
        worst = held + made + transient
        for a, g in zip(reversed(per_layer), reversed(grads_layers)):
            held -= a
            made += 0 if accumulate else g
            worst = max(worst, held + a + made)  # the layer's gradient appears before its activations go
        fixed = s["weights"] + s["optimizer"] + s["tower"]
        step = fixed + s["compute copy"] + worst
        optimizer_step = fixed + s["gradients"]  # activations gone, every gradient there
        parts = dict(s, activations=sum(per_layer) + other)
        return max(step, optimizer_step), parts

    def largest_batch(self, checkpointing: bool, limit: float, cap: int = 4096) -> int:
        lo, hi = 0, 1
        while hi <= cap and self.peak(hi, checkpointing)[0] <= limit:
            lo, hi = hi, hi * 2
        hi = min(hi, cap + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak(mid, checkpointing)[0] <= limit else (lo, mid)
        return lo


def plan_recipe(recipe: RecipeConfig, setup: Setup, lm_config=None, vision_config=None) -> list[StagePlan]:
    if setup.strategy not in ("ddp", "fsdp"):
        raise LlavaGMError(f"--strategy {setup.strategy!r}: use ddp or fsdp")
    if setup.gpus < 1 or setup.gpu_memory_gb <= 0:
        raise LlavaGMError("--gpus must be at least 1 and --gpu-memory positive")
    cfg = recipe.model
    lm_config = lm_config or load_config(cfg.language.name)
    vision_config = vision_config or load_config(cfg.vision.name)
    plans = []
    trained: frozenset = frozenset()  # what earlier stages of the recipe trained: it stays fp32 when frozen
    for stage in recipe.stages:
        meta = build_meta_model(cfg, lm_config, vision_config, sparse=stage.name == "sparsify")
        sm = StageModel(meta, stage, setup, trained)
        trained = frozenset(sm.trained_after)
        global_batch = stage.batch_size * stage.grad_accum
        batch = setup.batch_size or max(1, math.ceil(global_batch / setup.gpus))
        accumulation = max(1, math.ceil(global_batch / (batch * setup.gpus)))
        limit = setup.gpu_memory_gb * GB
        peak, parts = sm.peak(batch, setup.checkpointing)
        plans.append(StagePlan(
            stage=stage.name, trains=_trains(stage, cfg.sparse.kind), trainable=sm.trainable, frozen=sm.frozen, batch=batch,
            accumulation=accumulation, seq_len=sm.seq_len, bytes=parts, peak=peak,
            peak_checkpointed=sm.peak(batch, True)[0], fits=peak <= limit,
            max_batch=sm.largest_batch(False, limit), max_batch_checkpointed=sm.largest_batch(True, limit),
            coefficients=sm.coefficients))
    return plans


def format_plan(plans: list[StagePlan], setup: Setup, recipe_name: str) -> str:
    gpu = f"{setup.gpus} GPU{'s' if setup.gpus > 1 else ''} x {setup.gpu_memory_gb:g} GB, {setup.strategy if setup.gpus > 1 else 'one process'}"
    lines = [f"plan for {recipe_name} on {gpu}; features {setup.features}; GB per GPU (1e9 bytes)"]
    head = f"{'stage':<10}{'trains':<30}{'trainable':>11}{'batch':>7}{'weights':>9}{'copy':>7}{'grads':>7}{'adam':>7}{'tower':>7}{'activ.':>8}{'peak':>8}{'ckpt':>8}  fits  max batch (ckpt)"
    lines += [head, "-" * len(head)]
    for p in plans:
        b = p.bytes
        lines.append(
            f"{p.stage:<10}{p.trains:<30}{p.trainable / 1e6:>10,.0f}M{p.batch:>4}x{p.accumulation:<2}"
            f"{b['weights'] / GB:>9.1f}{b['compute copy'] / GB:>7.1f}{b['gradients'] / GB:>7.1f}{b['optimizer'] / GB:>7.1f}"
            f"{b['tower'] / GB:>7.1f}{b['activations'] / GB:>8.1f}{p.peak / GB:>8.1f}{p.peak_checkpointed / GB:>8.1f}"
            f"  {'yes ' if p.fits else 'NO  '}  {p.max_batch} ({p.max_batch_checkpointed})")
    lines.append(f"batch: per device x accumulation steps for the recipe's global batch; sequences of {plans[0].seq_len} tokens, "
                 + ("every text token labelled (worst case)" if setup.label_tokens is None else f"{setup.label_tokens} labelled tokens per sample"))
    lines.append("activation bytes per token per decoder layer (coefficients of d, q, kv, i, h, 1, hT, T):")
    seen = {}
    for p in plans:
        for k, c in p.coefficients.items():
            seen[k] = c
    for k, c in seen.items():
        lines.append(f"  {k:<22} " + " + ".join(f"{v:g}*{f}" for f, v in c.items() if abs(v) > 1e-6))
    return "\n".join(lines)


def plan_to_json(plans: list[StagePlan], setup: Setup) -> dict:
    return {"setup": dataclasses.asdict(setup), "stages": [dataclasses.asdict(p) for p in plans]}


# ---- the command ------------------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory of every stage of a recipe, whether it fits, the largest batch that does")
    p.add_argument("--recipe", required=True, help="recipe YAML")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB (1e9 bytes) per GPU")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--batch-size", type=int, help="per-device batch (default: the recipe's global batch / gpus)")
    p.add_argument("--features", choices=["online", "cache"], default="online",
                   help="online: the frozen tower runs in the step on every GPU; cache: features read from disk")
    p.add_argument("--checkpointing", action="store_true", help="decide 'fits' with activation checkpointing on")
    p.add_argument("--seq-len", type=int, help="tokens per sample (default: the recipe's language.max_length)")
    p.add_argument("--label-tokens", type=int, help="labelled tokens per sample (default: every text token, the worst case)")
    p.add_argument("--lm-config", help="local folder or config.json for the language model (instead of the recipe's id)")
    p.add_argument("--vision-config", help="local folder or config.json for the vision tower")
    p.add_argument("--json", help="also write the plan to this JSON file")
    p.set_defaults(func=cmd_plan)


def cmd_plan(a) -> None:
    from ..config import load_yaml

    for name, v in (("--batch-size", a.batch_size), ("--seq-len", a.seq_len), ("--label-tokens", a.label_tokens)):
        if v is not None and v < 1:
            raise LlavaGMError(f"{name} must be at least 1")
    recipe = load_yaml(RecipeConfig, a.recipe)
    setup = Setup(gpus=a.gpus, gpu_memory_gb=a.gpu_memory, strategy=a.strategy, batch_size=a.batch_size, checkpointing=a.checkpointing,
                  features=a.features, label_tokens=a.label_tokens, seq_len=a.seq_len)
    lm = load_config(recipe.model.language.name, a.lm_config)
    vision = load_config(recipe.model.vision.name, a.vision_config)
    plans = plan_recipe(recipe, setup, lm, vision)
    print(format_plan(plans, setup, a.recipe))
    if a.json:
        Path(a.json).write_text(json.dumps(plan_to_json(plans, setup), indent=1))
        print(f"written: {a.json}")
