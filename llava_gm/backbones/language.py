"""The language model: any transformers causal LM by hub id or local path, or the offline Gemma 3 270M."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..config import LanguageConfig
from ..errors import LlavaGMError

def resolve_language_path(name: str) -> str:
    if name == "gemma3-270m":
        from .offline_gemma import gemma3_270m_dir

        return str(gemma3_270m_dir())
    return name


def load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LlavaGMError(f"cannot load a tokenizer from {path!r}: {e}") from None
    if not getattr(tok, "chat_template", None):
        model_type = getattr(AutoConfig.from_pretrained(path), "model_type", "")
        if model_type.startswith("gemma"):  # e.g. base (non -it) Gemma checkpoints ship no template
            from .chat_templates import GEMMA_CHAT_TEMPLATE

            tok.chat_template = GEMMA_CHAT_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_language_model(cfg: LanguageConfig, dtype: torch.dtype = torch.float32):
    """Return (causal LM, tokenizer). Weights stay in `dtype` (fp32 master weights for training)."""
    path = resolve_language_path(cfg.name)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise LlavaGMError(
            f"cannot load the language model {cfg.name!r}: {e}\n"
            "Give a transformers causal LM hub id (e.g. google/gemma-2b), a local folder, or 'gemma3-270m' (offline)."
        ) from None
    return lm, load_tokenizer(path)


def stop_token_ids(lm, tokenizer) -> list[int]:
    """Ids that end a model turn: eos, the generation config's eos, and Gemma's <end_of_turn>."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(lm.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    return sorted(ids)
