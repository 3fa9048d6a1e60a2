"""The LLaVA model: vision features -> projector -> merged into the LM's embeddings at <image> slots.

Training computes logits only at labelled positions; generation keeps a KV cache and runs
batched with left padding. The vision tower is optional here: training reads cached features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from ..errors import LlavaGMError
from .projector import Projector


@dataclass
class ForwardOutput:
    loss: torch.Tensor  # language loss + auxiliary losses
    lm_loss: torch.Tensor
    aux: dict  # name -> weighted auxiliary loss (sparse layers)
    num_labels: int


class LlavaGM(nn.Module):
    def __init__(self, cfg: ModelConfig, lm, tokenizer, vision_dim: int, vision_tokens: int):
        super().__init__()
        self.cfg = cfg
        self.lm = lm
        self.tokenizer = tokenizer
        self.projector = Projector(cfg.projector, vision_dim, lm.config.get_text_config().hidden_size)
        self.vision_dim = vision_dim
        self.vision_tokens = vision_tokens  # tokens per image out of the tower
        self.num_image_tokens = self.projector.num_tokens(vision_tokens)  # tokens per image the LM sees
        self.sparse_layers: list[int] = []
        self.vision_tower: Optional[nn.Module] = None  # attached for inference on raw images

    # ---- pieces -------------------------------------------------------------------------------
    @property
    def decoder(self):
        return self.lm.get_decoder()

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm.get_output_embeddings()(h)
        cap = getattr(self.lm.config.get_text_config(), "final_logit_softcapping", None)
        if cap:  # Gemma 2 caps its logits; skipping it would change the model
            logits = torch.tanh(logits / cap) * cap
        return logits

    def embed(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with projected image features scattered into the IMAGE_TOKEN_ID slots."""
        image_mask = input_ids == IMAGE_TOKEN_ID
        embeds = self.lm.get_input_embeddings()(input_ids.clamp(min=0))
        n_slots = int(image_mask.sum())
        if n_slots == 0:
            return embeds
        if image_features is None:
            raise LlavaGMError("the input has <image> slots but no image features were given")
        proj = self.projector(image_features.to(self.projector_dtype))
        if self.cfg.projector.word_tokens:
            proj = self.to_words(proj)
        if proj.shape[0] * proj.shape[1] != n_slots:
            raise LlavaGMError(f"{n_slots} image slots in the text but {proj.shape[0]} images x {proj.shape[1]} tokens of features")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), proj.to(embeds.dtype))

    def to_words(self, proj: torch.Tensor) -> torch.Tensor:
        """[B, T, D] projector outputs -> the scaled embedding of each token's best word (straight-through).

        Scores: s * cos(proj, e_w) over the vocabulary `word_ids`. Forward uses the one best word, exactly as a text
        token would embed (a soft mix of words the LM does not read as words: measured, yes/no stays at the wording
        rule); backward goes through the softmax. The softmax is kept for the word loss.
        """
        table = self.lm.get_input_embeddings()
        ids = self.cfg.projector.word_ids
        if not ids:
            raise LlavaGMError("projector.word_tokens needs projector.word_ids: train a first stage (align) with it on")
        words = table.weight[torch.tensor(ids, device=table.weight.device)].float()
        query = F.normalize(proj.float(), dim=-1) * self.projector.word_logit_scale.exp()
        soft = torch.softmax(query @ F.normalize(words, dim=-1).T, dim=-1)
        self._word_probs = soft
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        mixed = (hard + soft - soft.detach()) @ words
        scale = getattr(table, "embed_scale", None)  # Gemma multiplies its embeddings by sqrt(width)
        return (mixed * scale.float() if scale is not None else mixed).to(proj.dtype)

    def word_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """-log of the image tokens' mean probability for each content word in a sample's labels (bag of words)."""
        probs = getattr(self, "_word_probs", None)
        targets = self.cfg.projector.word_targets
        if probs is None or not targets:
            return None
        where = [self.cfg.projector.word_ids.index(t) for t in targets]
        pooled = probs.mean(1)[:, where]  # [images, content words]
        with_image = labels[(input_ids == IMAGE_TOKEN_ID).any(1)]  # image k belongs to the k-th sample showing one
        named = (with_image.unsqueeze(-1) == torch.tensor(targets, device=labels.device)).any(1).to(pooled.dtype)
        count = named.sum(-1)
        if not bool((count > 0).any()):
            return None
        per_sample = -(torch.log(pooled + 1e-9) * named).sum(-1) / count.clamp(min=1)
        return per_sample[count > 0].mean()

    @property
    def projector_dtype(self):
        return next(self.projector.parameters()).dtype

    def _set_modality(self, input_ids: Optional[torch.Tensor], sample_has_image: Optional[torch.Tensor], token_mask: Optional[torch.Tensor] = None):
        """Tell sparse layers which tokens are image tokens and which are padding (padding takes no expert capacity)."""
        if self.sparse_layers:
            from .sparse import set_modality

            image_mask = None if input_ids is None else input_ids == IMAGE_TOKEN_ID
            set_modality(self.lm, image_mask, sample_has_image, None if token_mask is None else token_mask.bool())

    # ---- training -----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, labels, image_features=None, word_loss: float = 0.0) -> ForwardOutput:
        self._word_probs = None
        embeds = self.embed(input_ids, image_features)
        self._set_modality(input_ids, (input_ids == IMAGE_TOKEN_ID).any(1), attention_mask)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos, use_cache=False).last_hidden_state
        # next-token prediction only where a label exists: the vocabulary projection is the big cost
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        n = int(keep.sum())
        if n == 0:
            raise LlavaGMError("a batch has no labelled tokens; every sample must have a gpt turn")
        logits = self.logits_from_hidden(hidden[:, :-1][keep])
        lm_loss = F.cross_entropy(logits.float(), target[keep])
        aux = {}
        if self.sparse_layers:
            from .sparse import aux_losses

            aux = aux_losses(self.lm)
        if word_loss and self.cfg.projector.word_tokens:
            named = self.word_loss(input_ids, labels)
            if named is not None:
                aux["words"] = word_loss * named
        loss = lm_loss + sum(aux.values()) if aux else lm_loss
        return ForwardOutput(loss, lm_loss, aux, n)

    # ---- generation ---------------------------------------------------------------------------
    def _left_pad(self, seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, p in enumerate(seqs):  # every sequence ends at the last column
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        image_features: Optional[torch.Tensor] = None,
        image_index: Optional[list[int]] = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Optional[list[int]] = None,
        generator: Optional[torch.Generator] = None,
        fast=None,
    ) -> list[list[int]]:
        """Batched generation with a KV cache; returns each prompt's new tokens, stop token excluded.

        `prompts` hold IMAGE_TOKEN_ID slots. `image_features` [n_images, N, D]; `image_index[i]` says which of them
        prompt i shows (-1: none); without it, the prompts with slots take the images in order. Prompts that show
        the same image with the same tokens up to it (several questions about one image) share one prefill of that
        prefix, whose KV cache is then copied to each of them. `fast` (a `fast_lm.FastLM` built from these weights)
        swaps in the lean decoder and the screened greedy head.
        """
        device = next(self.lm.parameters()).device
        decoder = fast.decoder if fast is not None and fast.decoder is not None else self.decoder
        if image_index is None:
            it = iter(range(len(prompts)))
            image_index = [next(it) if IMAGE_TOKEN_ID in p else -1 for p in prompts]
        if image_features is not None:
            image_features = image_features.to(device)
        has_image = torch.tensor([k >= 0 for k in image_index], device=device)
        cuts = [max(i for i, t in enumerate(p) if t == IMAGE_TOKEN_ID) + 1 if k >= 0 else 0 for p, k in zip(prompts, image_index)]
        groups: dict = {}
        owner = [groups.setdefault((k, tuple(p[:c])), len(groups)) for p, k, c in zip(prompts, image_index, cuts)]
        window = getattr(self.lm.config.get_text_config(), "sliding_window", None)
        longest = max(len(p) for p in prompts) + max(len(p) - c for p, c in zip(prompts, cuts)) + max_new_tokens
        shared = (all(k >= 0 for k in image_index) and len(groups) < len(prompts) and all(c < len(p) for p, c in zip(prompts, cuts))
                  and (not window or longest <= window))  # the padding between prefix and suffix must not push tokens out of a window
        if shared:
            prefixes = [list(key[1]) for key in groups]
            ids, mask = self._left_pad(prefixes, device)
            feats = image_features[[key[0] for key in groups]]
            self._set_modality(ids, torch.ones(len(prefixes), dtype=torch.bool, device=device), mask)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = decoder(inputs_embeds=self.embed(ids, feats), attention_mask=mask, position_ids=pos, use_cache=True).past_key_values
            cache.reorder_cache(torch.tensor(owner, device=device))  # each prompt gets its prefix's keys and values
            suffix, suffix_mask = self._left_pad([p[c:] for p, c in zip(prompts, cuts)], device)
            # padding sits between prefix and suffix; the mask hides it and positions skip it
            mask = torch.cat([mask[owner], suffix_mask], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -suffix.shape[1] :]
            self._set_modality(suffix, has_image, suffix_mask)
            out = decoder(inputs_embeds=self.embed(suffix, None), attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        else:
            ids, mask = self._left_pad(prompts, device)
            feats = None
            if image_features is not None and any(k >= 0 for k in image_index):
                feats = image_features[[k for k in image_index if k >= 0]]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            self._set_modality(ids, has_image, mask)
            out = decoder(inputs_embeds=self.embed(ids, feats), attention_mask=mask, position_ids=pos, use_cache=True)
        head = fast.head if fast is not None and temperature == 0 else None
        return self._decode(decoder, head, out, mask, pos[:, -1:], has_image, max_new_tokens, temperature, top_p, stop_ids, generator)

    def _decode(self, decoder, head, out, mask, pos, has_image, max_new_tokens, temperature, top_p, stop_ids, generator) -> list[list[int]]:
        """Token-by-token continuation from a prefill's output (logits only at the last position)."""
        pad = self.tokenizer.pad_token_id
        cache, last = out.past_key_values, out.last_hidden_state[:, -1]
        stop = torch.tensor(stop_ids or [], device=mask.device)
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        new = []
        for step in range(max_new_tokens):
            if temperature > 0:
                nxt = _sample(self.logits_from_hidden(last).float() / temperature, top_p, generator)
            elif head is not None:  # the screened head; a final soft cap keeps the order, so the argmax is the same
                nxt = head(last)
            else:
                nxt = self.logits_from_hidden(last).float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new.append(nxt)
            done = done | torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            self._set_modality(torch.zeros_like(nxt[:, None]), has_image)  # decoded tokens are text
            out = decoder(inputs_embeds=self.lm.get_input_embeddings()(nxt[:, None]), attention_mask=mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)
            cache, last = out.past_key_values, out.last_hidden_state[:, -1]
        stops = set(stop_ids or [])
        result = []
        for row in torch.stack(new, 1).tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            result.append(row[:cut])
        return result


def _sample(logits: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(cut, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
