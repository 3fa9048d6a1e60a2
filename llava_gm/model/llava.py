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
        if proj.shape[0] * proj.shape[1] != n_slots:
            raise LlavaGMError(f"{n_slots} image slots in the text but {proj.shape[0]} images x {proj.shape[1]} tokens of features")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), proj.to(embeds.dtype))

    @property
    def projector_dtype(self):
        return next(self.projector.parameters()).dtype

    def _set_modality(self, input_ids: Optional[torch.Tensor], sample_has_image: Optional[torch.Tensor]):
        if self.sparse_layers:
            from .sparse import set_modality

            image_mask = None if input_ids is None else input_ids == IMAGE_TOKEN_ID
            set_modality(self.lm, image_mask, sample_has_image)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, labels, image_features=None) -> ForwardOutput:
        embeds = self.embed(input_ids, image_features)
        self._set_modality(input_ids, (input_ids == IMAGE_TOKEN_ID).any(1))
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
        loss = lm_loss + sum(aux.values()) if aux else lm_loss
        return ForwardOutput(loss, lm_loss, aux, n)

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        image_features: Optional[torch.Tensor] = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Optional[list[int]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> list[list[int]]:
        """Batched generation with a KV cache. `prompts` hold IMAGE_TOKEN_ID slots; `image_features`
        holds the features of every image in prompt order. Returns the new tokens of each prompt, stop token excluded."""
        device = next(self.lm.parameters()).device
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        has_image = (ids == IMAGE_TOKEN_ID).any(1)
        embeds = self.embed(ids, None if image_features is None else image_features.to(device))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self._set_modality(ids, has_image)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        last = out.last_hidden_state[:, -1]
        stop = torch.tensor(stop_ids or [], device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        new = []
        for step in range(max_new_tokens):
            logits = self.logits_from_hidden(last).float()
            if temperature > 0:
                nxt = _sample(logits / temperature, top_p, generator)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new.append(nxt)
            done = done | torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            self._set_modality(torch.zeros_like(nxt[:, None]), has_image)  # decoded tokens are text
            step_embeds = self.lm.get_input_embeddings()(nxt[:, None])
            out = self.decoder(inputs_embeds=step_embeds, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            last = out.last_hidden_state[:, -1]
        tokens = torch.stack(new, 1).tolist()
        result = []
        stops = set(stop_ids or [])
        for row in tokens:
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
