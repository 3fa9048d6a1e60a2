"""Answering with a trained checkpoint: batched generation (through the engine, llava_gm/engine/), text
log-likelihoods and perplexity.

The model runs in bf16 where that is fast (GPUs, CPUs with AMX), else fp32; prompts go through the same chat
template as training; image features of files come from the same on-disk cache as training.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image
from tqdm import tqdm

from .backbones.language import stop_token_ids
from .data.conversation import ConversationEncoder
from .data.features import FeatureCache, encode_images
from .errors import LlavaGMError
from .model.build import checkpoint_hash
from .model.fast_lm import FastLM
from .precision import bf16_matmul_weights, compute_dtype, use_bf16

ImageLike = Union[Image.Image, str, Path, None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Answerer:
    def __init__(self, model, model_id: str = "llava-gm", checkpoint_hash: str = "", dtype: Optional[torch.dtype] = None, device=None,
                 fast: Optional[bool] = None, compile: bool = False):
        self.device = torch.device(device) if device else default_device()
        dtype = dtype or compute_dtype(self.device)
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        if model.vision_tower is not None:
            model.vision_tower.float()  # features as in training: fp32 weights under bf16 autocast ...
            if use_bf16(self.device):  # ... whose casts bf16-stored matmul weights skip, bitwise the same
                bf16_matmul_weights(model.vision_tower)
        self.model_id = model_id
        self.checkpoint_hash = checkpoint_hash
        self.encoder = ConversationEncoder(model.tokenizer, model.num_image_tokens, max_length=10**9)
        self.stop_ids = stop_token_ids(model.lm, model.tokenizer)
        self._cache: Optional[FeatureCache] = None
        # the fast path keeps its own fused copy of q/k/v and gate/up (2/3 of the decoder again): on by default on
        # CPUs, where it pays; on a GPU with a large model that copy could cost more memory than there is
        self.use_fast = fast if fast is not None else self.device.type == "cpu"
        self.compile = compile

    @functools.cached_property
    def fast(self) -> Optional[FastLM]:
        """Same weights, leaner generation (model/fast_lm.py): built at the first answer (~2 s for Gemma 3 270M),
        not for log-likelihood work; a snapshot, so the model must not train after it. With `compile`, decode
        steps also go through torch.compile (model/compiled.py: ~25 s per new shape, then faster steps)."""
        return FastLM(self.model.lm, compile=self.compile) if self.use_fast or self.compile else None

    @functools.cached_property
    def engine(self):
        """The generation engine on the fastest backend this Answerer allows (built with `fast` at the first answer)."""
        from .engine.backends import choose_backend
        from .engine.core import Engine

        fast = self.fast
        return Engine(self.model, choose_backend(self.model, fast), head=getattr(fast, "head", None), stop_ids=self.stop_ids)

    @functools.cached_property
    def compiled_tower(self):
        from .model.compiled import CompiledTower

        return CompiledTower(self.model.vision_tower)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], dtype: Optional[torch.dtype] = None, device=None, fast: Optional[bool] = None,
                        compile: bool = False) -> "Answerer":
        """A training checkpoint, or a folder of `llava-gm export --format llava-gm` (every command's --checkpoint takes both)."""
        from .export import load_model

        model = load_model(path)
        return cls(model, model_id=Path(path).name, checkpoint_hash=checkpoint_hash(path), dtype=dtype, device=device, fast=fast,
                   compile=compile)

    # ---- images --------------------------------------------------------------------------------
    def image_features(self, images: list[ImageLike], progress: bool = False) -> dict[int, torch.Tensor]:
        """Features by item index; files go through the on-disk cache, PIL images are encoded directly
        (through the compiled tower with `compile`)."""
        tower = self.model.vision_tower
        out: dict[int, torch.Tensor] = {}
        files = {i: Path(im) for i, im in enumerate(images) if isinstance(im, (str, Path))}
        if files:
            self._cache = self._cache or FeatureCache(tower)
            feats, failed = self._cache.features(list(files.values()), progress=progress)
            if failed:
                raise LlavaGMError(next(iter(failed.values())))
            out.update({i: feats[p] for i, p in files.items()})
        pils = {i: im for i, im in enumerate(images) if isinstance(im, Image.Image)}
        if pils:
            encode = self.compiled_tower if self.compile else lambda ims: encode_images(tower, ims)
            out.update(zip(pils, encode(list(pils.values()))))
        return out

    # ---- generation ----------------------------------------------------------------------------
    def answer(self, items: list[dict], max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               batch_size: int = 32, progress: bool = True, seed: int = 0) -> list[str]:
        """items: {"prompt": user text (with "<image>" iff an image is given), "image": PIL image, path or None}."""
        images = [it.get("image") for it in items]
        prompts = []
        for k, it in enumerate(items):
            text = it["prompt"]
            has_tag = "<image>" in text
            if (images[k] is not None) != has_tag:
                text = f"<image>\n{text}" if images[k] is not None else text.replace("<image>", "").strip()
            prompts.append(self.encoder.encode_prompt([{"role": "user", "content": text}]))
        feats = self.image_features(images, progress=progress)
        # one feature row per distinct image; questions about the same image batch together and share its prefill
        image_key = [(str(im) if isinstance(im, (str, Path)) else id(im)) if im is not None else None for im in images]
        first = {}
        for k, key in enumerate(image_key):
            if key is not None:
                first.setdefault(key, k)
        rank = {key: r for r, key in enumerate(first)}
        order = sorted(range(len(items)), key=lambda k: (rank.get(image_key[k], -1), len(prompts[k])))
        answers: list[str] = [""] * len(items)
        bar = tqdm(total=len(items), desc="answering", unit="q", disable=not progress)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            keys = list(dict.fromkeys(image_key[k] for k in idx if image_key[k] is not None))
            stacked = torch.stack([feats[first[key]] for key in keys]).to(self.device, self.model.projector_dtype) if keys else None
            index = [keys.index(image_key[k]) if image_key[k] is not None else -1 for k in idx]
            out = self.engine.generate([prompts[k] for k in idx], stacked, index, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, seed=seed + start)
            for k, toks in zip(idx, out):
                answers[k] = self.model.tokenizer.decode(toks, skip_special_tokens=True).strip()
            bar.update(len(idx))
        bar.close()
        return answers

    # ---- text-only scoring ---------------------------------------------------------------------
    def _token_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(ids[:, t+1] | ids[:, :t+1]) where targets[:, t] is True, else 0."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.model.modality(None, None, mask):
            hidden = self.model.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        out = torch.zeros(targets.shape, dtype=torch.float32, device=ids.device)
        keep = targets[:, :-1]
        logits = self.model.logits_from_hidden(hidden[:, :-1][keep]).float()
        out[:, :-1][keep] = logits.log_softmax(-1).gather(-1, ids[:, 1:][keep].unsqueeze(-1)).squeeze(-1)
        return out

    @torch.no_grad()
    def loglikelihood(self, pairs: list[tuple[str, str]], batch_size: int = 16, progress: bool = False) -> list[float]:
        """Sum of log p(continuation | context) per pair; plain text with the LM's BOS, no image, no template."""
        tok = self.model.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        encoded = []
        for ctx, cont in pairs:
            c = bos + tok(ctx, add_special_tokens=False)["input_ids"]
            full = bos + tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n_ctx = len(c) if full[: len(c)] == c else len(c) - 1  # a merge across the boundary moves it one left
            if len(full) <= n_ctx:
                raise LlavaGMError(f"empty continuation for context {ctx[:40]!r}")
            encoded.append((full, n_ctx))
        scores = []
        for s in tqdm(range(0, len(encoded), batch_size), desc="log-likelihood", disable=not progress):
            chunk = encoded[s : s + batch_size]
            width = max(len(f) for f, _ in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            targets = torch.zeros_like(ids, dtype=torch.bool)
            for i, (f, n) in enumerate(chunk):
                ids[i, : len(f)] = torch.tensor(f)
                mask[i, : len(f)] = 1
                targets[i, n - 1 : len(f) - 1] = True  # position t predicts token t+1
            lp = self._token_logprobs(ids.to(self.device), mask.to(self.device), targets.to(self.device))
            scores += lp.sum(-1).tolist()
        return scores

    @torch.no_grad()
    def perplexity(self, text: str, stride: int = 512) -> float:
        """Perplexity over `text` in consecutive windows of `stride` tokens (each window starts after BOS).

        Without a BOS token a window's first token has no context: it is not counted."""
        tok = self.model.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise LlavaGMError("perplexity needs a text of at least two tokens")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        total, count = 0.0, 0
        for s in range(0, len(ids), stride):
            window = bos + ids[s : s + stride]
            x = torch.tensor([window], device=self.device)
            targets = torch.ones_like(x, dtype=torch.bool)
            lp = self._token_logprobs(x, torch.ones_like(x), targets)
            total -= float(lp[0, : len(window) - 1].sum())
            count += len(window) - 1
        if count == 0:
            raise LlavaGMError("perplexity without a BOS token needs a stride of at least 2 tokens")
        return math.exp(total / count)
