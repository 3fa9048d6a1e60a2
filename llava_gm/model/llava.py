"""The LLaVA model: vision features -> projector -> merged into the LM's embeddings at <image> slots.

A plain module: merge (`embed`), forward and loss. Training computes logits only at labelled positions.
Generation lives in llava_gm/engine/. The vision tower is optional here: training reads cached features.
"""

from __future__ import annotations

import contextlib
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

    def modality(self, input_ids: Optional[torch.Tensor], sample_has_image: Optional[torch.Tensor], token_mask: Optional[torch.Tensor] = None):
        """Context for one LM forward: tells sparse layers which tokens are image tokens and which are padding
        (padding takes no expert capacity); cleared on exit. A no-op without sparse layers."""
        if not self.sparse_layers:
            return contextlib.nullcontext()
        from .sparse import modality

        image_mask = None if input_ids is None else input_ids == IMAGE_TOKEN_ID
        return modality(self.lm, image_mask, sample_has_image, None if token_mask is None else token_mask.bool())

    # ---- training -----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, labels, image_features=None, word_loss: float = 0.0,
                lm_loss: float = 1.0) -> ForwardOutput:
        """`lm_loss=0` (with `word_loss`): only the projector's word loss, no LM forward (a word-token stage 1 in seconds)."""
        self._word_probs = None
        embeds = self.embed(input_ids, image_features)
        words = {}
        if word_loss and self.cfg.projector.word_tokens:
            named = self.word_loss(input_ids, labels)
            if named is not None:
                words["words"] = word_loss * named
        if not lm_loss:
            if not words:
                raise LlavaGMError("lm_loss: 0 trains on the word loss alone: it needs word_loss > 0, a word-token projector "
                                   "and answers that name content words")
            return ForwardOutput(words["words"], words["words"].new_zeros(()), words, int((labels != IGNORE_INDEX).sum()))
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.modality(input_ids, (input_ids == IMAGE_TOKEN_ID).any(1), attention_mask):
            hidden = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos, use_cache=False).last_hidden_state
        # next-token prediction only where a label exists: the vocabulary projection is the big cost
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        n = int(keep.sum())
        if n == 0:
            raise LlavaGMError("a batch has no labelled tokens; every sample must have a gpt turn")
        logits = self.logits_from_hidden(hidden[:, :-1][keep])
        lm = F.cross_entropy(logits.float(), target[keep])
        aux = {}
        if self.sparse_layers:
            from .sparse import aux_losses

            aux = aux_losses(self.lm)
        aux.update(words)
        loss = lm_loss * lm + sum(aux.values(), lm.new_zeros(()))
        return ForwardOutput(loss, lm, aux, n)
