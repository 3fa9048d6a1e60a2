"""Export a trained model: to transformers' LlavaForConditionalGeneration with its processor (`hf`), or to
llava-gm's own self-contained folder (`llava-gm`, read back by `llava_gm.load`). docs/export.md describes both.

`hf` is for dense models that transformers' Llava computes exactly: an HF vision tower (CLIP, SigLIP, DINOv2) at
the resolution it was built for (DINOv2 at any), an unpooled `mlp2x_gelu` projector without word tokens, and a
dense LM whose logits are not soft-capped. Anything else is refused with the reason; `llava-gm` takes every model.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .errors import LlavaGMError
from .paths import atomic_dir

FORMAT = "llava-gm-export"
VERSION = 1
# an existing single token of the vocabulary that a prompt never contains, reused as Llava's image placeholder
IMAGE_TOKEN_CANDIDATES = ("<image>", "<image_soft_token>", "<start_of_image>")


# ---- transformers' Llava ---------------------------------------------------------------------------
def hf_export_problem(model) -> Optional[str]:
    """Why transformers' Llava cannot compute what this model computes; None when it can."""
    from .backbones.vision import HFVisionTower

    p, tower = model.cfg.projector, model.vision_tower
    text_cfg = model.lm.config.get_text_config()
    if model.sparse_layers:
        return f"it has sparse ({model.cfg.sparse.kind.upper()}) layers, and transformers' Llava has dense FFNs only"
    if p.word_tokens:
        return "its projector turns image tokens into words (word_tokens), a step transformers' Llava does not have"
    if p.type != "mlp2x_gelu":
        return f"its projector is {p.type!r}; transformers' Llava has a 2-layer GELU MLP (mlp2x_gelu) only"
    if p.pool != 1:
        return f"its projector pools image tokens ({p.pool}x{p.pool}); transformers' Llava does not pool"
    if not isinstance(tower, HFVisionTower):
        return f"its vision tower {model.cfg.vision.name!r} is not a transformers model (CLIP, SigLIP, DINOv2)"
    if tower.image_size != tower.native_size and tower.kind != "dinov2":
        return (f"its {tower.kind} tower runs at {tower.image_size} px instead of its native {tower.native_size} px "
                "(interpolated position embeddings), which transformers' Llava does not do")
    if tower.drop_cls and tower.num_prefix > 1:
        return "its DINOv2 tower has register tokens, which transformers' Llava does not drop"
    if getattr(text_cfg, "final_logit_softcapping", None):
        return (f"its LM soft-caps its logits (final_logit_softcapping={text_cfg.final_logit_softcapping}, Gemma 2), which "
                "transformers' Llava does not: its logits and sampled answers would differ")
    return None


def _image_token(tokenizer) -> tuple[str, Optional[int]]:
    """(placeholder string, its id); id None when no candidate is a single token and `<image>` must be added."""
    for token in IMAGE_TOKEN_CANDIDATES:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            return token, ids[0]
    return "<image>", None


def _image_processor(tower):
    """An image processor that computes exactly the tower's `preprocess`."""
    if tower.image_size == tower.native_size and tower.kind != "dinov2":
        return copy.deepcopy(tower.processor)  # the tower preprocesses through this very processor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    # the tower's own rule (backbones/vision.py): the whole image resized (bicubic) to a square, no crop, normalised
    size = {"height": tower.image_size, "width": tower.image_size}
    return LlavaImageProcessorPil(size=size, crop_size=size, do_center_crop=False, do_resize=True, resample=3, do_rescale=True,
                                  rescale_factor=1 / 255, do_normalize=True, image_mean=list(tower.processor.image_mean),
                                  image_std=list(tower.processor.image_std), do_convert_rgb=True)


def processor_chat_template(template: str, image_token: str) -> str:
    """The LM's chat template, with list content ({"type": "image"} / {"type": "text"} parts) first rewritten into
    the string our models were trained on: the image placeholder then a newline, then the text ("<image>\\nQ")."""
    prefix = (
        "{%- set ns = namespace(messages=[], text='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set ns.messages = ns.messages + [message] -%}"
        "{%- else -%}{%- set ns.text = '' -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + " + repr(image_token) + " + '\\n' -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': ns.text}] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set messages = ns.messages -%}"
    )
    return prefix + template


def hf_llava(model):
    """(LlavaForConditionalGeneration, LlavaProcessor) computing what `model` computes; LlavaGMError if they cannot."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .backbones.language import stop_token_ids

    problem = hf_export_problem(model)
    if problem:
        raise LlavaGMError(f"cannot export to transformers' Llava: {problem}. Export with --format llava-gm instead")
    tower, lm = model.vision_tower, model.lm
    tokenizer = copy.deepcopy(model.tokenizer)
    token, token_id = _image_token(tokenizer)
    added = token_id is None
    if added:  # a new special token; its id may still fit in the embedding table (tables are often padded)
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        token_id = tokenizer.convert_tokens_to_ids(token)
    text_cfg = lm.config.get_text_config()
    vocab = max(text_cfg.vocab_size, token_id + 1)
    vision_cfg = getattr(tower.model.config, "vision_config", tower.model.config)
    cfg = LlavaConfig(
        vision_config=vision_cfg.to_dict() | {"model_type": vision_cfg.model_type},
        text_config=text_cfg.to_dict() | {"model_type": text_cfg.model_type, "vocab_size": vocab},
        image_token_id=token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=tower.select_layer,  # counted from the embeddings (0), as hidden_states are
        vision_feature_select_strategy="default" if tower.num_prefix and tower.drop_cls else "full",
        image_seq_length=model.num_image_tokens,
        multimodal_projector_bias=True,
    )
    hf = LlavaForConditionalGeneration(cfg)
    hf.model.vision_tower.load_state_dict(tower.full_state_dict())
    decoder = {k: v.float() for k, v in lm.get_decoder().state_dict().items()}
    head = lm.get_output_embeddings().weight.detach().float()
    if vocab > text_cfg.vocab_size:  # the added placeholder's rows: read never (replaced by features), its logit suppressed
        grow = lambda w: torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])])  # noqa: E731
        decoder["embed_tokens.weight"] = grow(decoder["embed_tokens.weight"])
        head = grow(head)
    hf.model.language_model.load_state_dict(decoder)
    with torch.no_grad():
        hf.lm_head.weight.copy_(head)
        net = model.projector.net
        for mine, theirs in ((net[0], hf.model.multi_modal_projector.linear_1), (net[2], hf.model.multi_modal_projector.linear_2)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    gen = GenerationConfig.from_dict(lm.generation_config.to_dict())
    gen.eos_token_id = stop_token_ids(lm, model.tokenizer)  # a model turn ends at <end_of_turn> as well, as ours do
    gen.pad_token_id = model.tokenizer.pad_token_id
    gen.bos_token_id = model.tokenizer.bos_token_id
    gen.do_sample = False
    if added:  # a token our model does not have is never an answer (a reused one stays what it was)
        gen.suppress_tokens = [token_id]
    hf.generation_config = gen
    vision = getattr(tower.model.config, "vision_config", tower.model.config)
    processor = LlavaProcessor(image_processor=_image_processor(tower), tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                               chat_template=processor_chat_template(tokenizer.chat_template, token), image_token=token,
                               num_additional_image_tokens=tower.num_prefix)
    return hf.to(next(lm.parameters()).dtype).eval(), processor


def to_hf_llava(model):
    """transformers' LlavaForConditionalGeneration with the same weights (its `config.image_token_id` marks the image)."""
    return hf_llava(model)[0]


def export_hf(model, output, overwrite: bool = False) -> Path:
    """Write `model` as a transformers Llava folder: AutoModelForImageTextToText / AutoProcessor load it."""
    hf, processor = hf_llava(model)
    with _new_folder(output, overwrite) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(output)


# ---- llava-gm's own folder ---------------------------------------------------------------------------
def export_llava_gm(model, output, overwrite: bool = False, source: Optional[dict] = None) -> Path:
    """Write the self-contained folder of docs/export.md: every weight, the tokenizer and the backbones' configs."""
    from .backbones.vision import HFVisionTower

    tower = model.vision_tower
    cfg = copy.deepcopy(model.cfg)
    cfg.language.name = "language"
    if isinstance(tower, HFVisionTower):
        cfg.vision.name = "vision"
    elif model.cfg.vision.name != "efficientnet-lite0":
        raise LlavaGMError(f"cannot export the vision tower {model.cfg.vision.name!r}: not a transformers model")
    state = _model_state(model)
    with _new_folder(output, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.yaml").write_text(yaml.safe_dump(
            {"format": FORMAT, "version": VERSION, "model": to_dict(cfg), "history": list(getattr(model, "history", [])),
             "source": source or {}}, sort_keys=False))
        lang = tmp / "language"
        model.lm.config.save_pretrained(lang)
        model.lm.generation_config.save_pretrained(lang)
        model.tokenizer.save_pretrained(lang)
        if isinstance(tower, HFVisionTower):  # the frozen tower as a transformers folder, all of its layers
            vis = tmp / "vision"
            tower.model.config.save_pretrained(vis)
            save_file({k: v.detach().float().contiguous() for k, v in tower.full_state_dict().items()}, str(vis / "model.safetensors"),
                      metadata={"format": "pt"})
            tower.processor.save_pretrained(vis)
    return Path(output)


def _model_state(model) -> dict:
    """Every parameter and persistent buffer outside the vision tower, each tensor once (tied weights are one)."""
    persistent = set(model.state_dict())
    items = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in persistent]
    return {n: t.detach().contiguous() for n, t in items if not n.startswith("vision_tower.")}


def is_export(path) -> bool:
    try:
        return (yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}).get("format") == FORMAT
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def load_export(path):
    """The LlavaGM of a folder written by `export_llava_gm`, with its vision tower attached."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .backbones.language import load_tokenizer
    from .backbones.vision import load_vision_tower
    from .model.build import build_model

    path = Path(path)
    cfg_file = path / "config.yaml"
    try:
        data = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LlavaGMError(f"{cfg_file}: cannot read it ({e}); is {path} an exported llava-gm folder?") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LlavaGMError(f"{cfg_file}: not a llava-gm export (format: {FORMAT} expected)")
    if data.get("version") != VERSION:
        raise LlavaGMError(f"{cfg_file}: export format version {data.get('version')}; this llava-gm reads version {VERSION}")
    cfg = from_dict(ModelConfig, data["model"], where=str(cfg_file))
    for sub in ["language"] + (["vision"] if cfg.vision.name == "vision" else []):
        if not (path / sub).is_dir():
            raise LlavaGMError(f"{path}: the {sub}/ folder is missing; the export is incomplete")
    if cfg.vision.name == "vision":
        cfg.vision.name = str(path / "vision")
    try:
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path / "language"), dtype=torch.float32)
        lm.generation_config = GenerationConfig.from_pretrained(path / "language")
    except (OSError, ValueError) as e:
        raise LlavaGMError(f"{path / 'language'}: cannot build the language model ({e})") from None
    model = build_model(cfg, vision_tower=load_vision_tower(cfg.vision), language=(lm, load_tokenizer(str(path / "language"))))
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise LlavaGMError(f"{path / 'model.safetensors'}: cannot read the weights ({e})") from None
    expected = _model_state(model)
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise LlavaGMError(f"{path / 'model.safetensors'}: weights do not fit the model of config.yaml "
                           f"(missing {missing[:3]}, unknown {unknown[:3]})")
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, v in state.items():
            if targets[k].shape != v.shape:
                raise LlavaGMError(f"{path / 'model.safetensors'}: {k} has shape {tuple(v.shape)}, the model needs {tuple(targets[k].shape)}")
            targets[k].copy_(v)
    model.trained_keys = set(state)
    model.history = data.get("history", [])
    return model


# ---- both --------------------------------------------------------------------------------------------
class _new_folder:
    """atomic_dir that refuses an existing folder unless `overwrite`; an overwritten folder is replaced only once
    the new one is complete, so a failed export never loses the old one."""

    def __init__(self, output, overwrite: bool):
        self.output = Path(output)
        if self.output.exists() and not overwrite:
            raise LlavaGMError(f"{self.output} exists; choose a new output folder or pass --overwrite")
        self.staged = self.output.parent / f".{self.output.name}.new" if self.output.exists() else None

    def __enter__(self) -> Path:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)  # a crashed earlier overwrite
        self._ctx = atomic_dir(self.staged or self.output)
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        if exc[0] is None and self.staged is not None:
            old = self.output.parent / f".{self.output.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            self.output.rename(old)
            self.staged.rename(self.output)
            shutil.rmtree(old, ignore_errors=True)
        return False


def load_model(path):
    """The LlavaGM of an export folder or of a training checkpoint (what every --checkpoint accepts)."""
    from .model.build import load_checkpoint

    return load_export(path) if is_export(path) else load_checkpoint(path)


def load(path, **answerer_kwargs):
    """`llava_gm.load`: an exported folder (or a training checkpoint) as an Answerer, in one call."""
    from .infer import Answerer

    if not Path(path).is_dir():
        raise LlavaGMError(f"{path}: no such model folder (an export of `llava-gm export --format llava-gm` or a checkpoint)")
    return Answerer.from_checkpoint(path, **answerer_kwargs)


def export_checkpoint(checkpoint, output, fmt: str, overwrite: bool = False) -> Path:
    """`llava-gm export`: a training checkpoint (or an export) to `fmt` ("hf" or "llava-gm")."""
    from .model.build import checkpoint_hash

    if Path(output).exists() and not overwrite:  # before minutes of loading
        raise LlavaGMError(f"{output} exists; choose a new output folder or pass --overwrite")
    model = load_model(checkpoint)
    model.eval()
    if fmt == "hf":
        return export_hf(model, output, overwrite)
    if fmt == "llava-gm":
        return export_llava_gm(model, output, overwrite, source={"checkpoint": str(checkpoint), "hash": checkpoint_hash(checkpoint)})
    raise LlavaGMError(f"export format {fmt!r}: use hf or llava-gm")
