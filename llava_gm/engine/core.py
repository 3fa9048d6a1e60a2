"""Generation as steps: `prefill` turns requests into a running `Batch`, each `step` picks one token per row,
retires the rows that finished and runs the decoder once for the rest, and `join` merges newly prefilled
requests into a running batch. A server calls these directly (continuous batching: a request joins at the next
step, a finished one leaves at once); `generate` runs a fixed set of prompts to the end.

Rows are left-padded: every row's tokens end at the last column, the attention mask hides the padding and
positions skip it, so a row computes what it would compute alone (tests hold this against plain greedy
decoding without a cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch
import torch.nn.functional as F

from ..data.conversation import IMAGE_TOKEN_ID
from .backends import Backend, TransformersBackend
from .cache import KVCache


@dataclass
class Sampling:
    """Per-request decoding settings. temperature 0 = greedy; `seed` makes sampling reproducible."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)


@dataclass(eq=False)
class Sequence:
    """One request in flight. `image`: its image's features out of the vision tower [N, D] (None: text only);
    prompts with equal `image_key` show the same image and share its prefill when they join together."""

    prompt: list[int]
    image: Optional[torch.Tensor] = None
    image_key: Optional[Hashable] = None
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: Optional[set] = None  # token ids that end the answer; None: the engine's (end of turn, eos)
    want_text: bool = True  # keep `text` up to date each step (streaming, stop strings)
    tokens: list[int] = field(default_factory=list)  # the answer's tokens, stop token excluded
    text: str = ""  # the answer's text as far as it is certain (no half stop string, no trailing space)
    sent: int = 0  # characters of `text` already handed out by `take_text`
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False  # set by the owner (client gone): the row leaves at the next step
    generator: Optional[torch.Generator] = None
    experts: list = field(default_factory=list)  # per answer token: {layer: [expert ids]} (with `trace_experts`)

    def take_text(self) -> str:
        """The text added since the last call."""
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece


@dataclass
class Batch:
    seqs: list[Sequence]
    cache: object  # what the backend keeps (a KVCache, or the compiled decoder's fixed-size copy of one)
    mask: torch.Tensor  # [B, S] attention mask over the cache's slots
    pos: torch.Tensor  # [B, 1] position of each row's last token
    last: torch.Tensor  # [B, D] final hidden state of each row's last token
    has_image: torch.Tensor  # [B] bool

    def __len__(self) -> int:
        return len(self.seqs)


class Engine:
    """Generation for one `LlavaGM` over one decoder backend; `head` (a `GreedyHead`) picks greedy tokens exactly
    without a full pass over the vocabulary. `trace_experts`: record which experts of sparse layers each answer
    token used (MoE: the router's top-k; EVF: the FFN it went to), into `Sequence.experts`."""

    def __init__(self, model, backend: Optional[Backend] = None, head=None, stop_ids=(), trace_experts: bool = False):
        self.model = model
        self.backend = backend or TransformersBackend(model.decoder)
        self.head = head
        self.tokenizer = model.tokenizer
        self.stop_ids = set(stop_ids)
        self.trace_experts = trace_experts and bool(model.sparse_layers)
        self.window = getattr(model.lm.config.get_text_config(), "sliding_window", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.lm.parameters()).device

    # ---- one decoder call ----------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, feats, mask, pos, cache, has_image, token_mask):
        embeds = self.model.embed(ids, feats)
        with self.model.modality(ids, has_image, token_mask):
            return self.backend(embeds, mask, pos, cache)

    # ---- prefill -------------------------------------------------------------------------------
    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, p in enumerate(seqs):  # every sequence ends at the last column
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> Batch:
        """Run the prompts; the batch's first `step` picks their first tokens. Prompts that show the same image
        with the same tokens up to it (several questions about one image) share one prefill of that prefix,
        whose cache is then copied to each of them."""
        device = self.device
        for s in seqs:
            if s.stop_ids is None:
                s.stop_ids = self.stop_ids
            if s.generator is None and s.sampling.temperature > 0:
                s.generator = torch.Generator(device)
                if s.sampling.seed is not None:
                    s.generator.manual_seed(s.sampling.seed)
                else:
                    s.generator.seed()
            if (s.image is not None) != (IMAGE_TOKEN_ID in s.prompt):
                raise ValueError("a prompt has <image> slots iff its sequence has image features")
        prompts = [s.prompt for s in seqs]
        keys = [(s.image_key if s.image_key is not None else id(s.image)) if s.image is not None else None for s in seqs]
        images = {k: s.image for k, s in zip(keys, seqs) if k is not None}  # one feature row per distinct image
        slot = {k: r for r, k in enumerate(images)}
        feats = torch.stack(list(images.values())).to(device, self.model.projector_dtype) if images else None
        has_image = torch.tensor([k is not None for k in keys], device=device)
        cuts = [max(i for i, t in enumerate(p) if t == IMAGE_TOKEN_ID) + 1 if k is not None else 0 for p, k in zip(prompts, keys)]
        groups: dict = {}
        owner = [groups.setdefault((k, tuple(p[:c])), len(groups)) for p, k, c in zip(prompts, keys, cuts)]
        longest = max(len(p) for p in prompts) + max(len(p) - c for p, c in zip(prompts, cuts)) + max(s.sampling.max_tokens for s in seqs)
        shared = (all(k is not None for k in keys) and len(groups) < len(prompts) and all(c < len(p) for p, c in zip(prompts, cuts))
                  and (not self.window or longest <= self.window))  # the padding between prefix and suffix must not push tokens out of a window
        if shared:
            ids, mask = self._left_pad([list(key[1]) for key in groups])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            rows = feats[[slot[key[0]] for key in groups]]
            _, cache = self._forward(ids, rows, mask, pos, None, torch.ones(len(groups), dtype=torch.bool, device=device), mask)
            cache.reorder_cache(torch.tensor(owner, device=device))  # each prompt gets its prefix's keys and values
            suffix, suffix_mask = self._left_pad([p[c:] for p, c in zip(prompts, cuts)])
            # padding sits between prefix and suffix; the mask hides it and positions skip it
            mask = torch.cat([mask[owner], suffix_mask], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -suffix.shape[1] :]
            hidden, cache = self._forward(suffix, None, mask, pos, cache, has_image, suffix_mask)
        else:
            ids, mask = self._left_pad(prompts)
            rows = feats[[slot[k] for k in keys if k is not None]] if feats is not None else None
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden, cache = self._forward(ids, rows, mask, pos, None, has_image, mask)
        return Batch(list(seqs), cache, mask, pos[:, -1:], hidden[:, -1], has_image)

    # ---- decode --------------------------------------------------------------------------------
    def _pick(self, batch: Batch) -> list[int]:
        """One token per row: greedy rows through the screened head (or a plain argmax), sampled rows each with
        their own temperature, top-p and generator."""
        out = [0] * len(batch)
        greedy = [i for i, s in enumerate(batch.seqs) if s.sampling.temperature <= 0]
        sampled = [i for i, s in enumerate(batch.seqs) if s.sampling.temperature > 0]
        if greedy:
            h = batch.last[greedy]
            # the screened head's argmax is the exact one; a final soft cap keeps the order, so it is the same
            ids = self.head(h) if self.head is not None else self.model.logits_from_hidden(h).float().argmax(-1)
            for i, t in zip(greedy, ids.tolist()):
                out[i] = t
        if sampled:
            logits = self.model.logits_from_hidden(batch.last[sampled]).float()
            for row, i in enumerate(sampled):
                s = batch.seqs[i].sampling
                out[i] = int(sample(logits[row : row + 1] / s.temperature, s.top_p, batch.seqs[i].generator)[0])
        return out

    @torch.no_grad()
    def step(self, batch: Batch) -> Optional[Batch]:
        """Pick each row's next token, finish the rows that are done (or cancelled), run the decoder once for the
        others; the running batch, or None when every row has finished."""
        picked = self._pick(batch)
        for seq, token in zip(batch.seqs, picked):
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                continue
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            else:
                seq.tokens.append(token)
                if len(seq.tokens) >= seq.sampling.max_tokens:
                    seq.finish_reason = "length"
            if seq.want_text or seq.sampling.stop:
                self._update_text(seq)
        keep = [i for i, s in enumerate(batch.seqs) if s.finish_reason is None]
        if not keep:
            return None
        if len(keep) < len(batch):
            batch = self.select(batch, keep)
        ids = torch.tensor([[picked[i]] for i in keep], device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
        batch.pos = batch.pos + 1
        with self._tracing(batch):
            # decoded tokens are text tokens (embedded as words: no image slots)
            with self.model.modality(torch.zeros_like(ids), batch.has_image):
                hidden, batch.cache = self.backend(self.model.lm.get_input_embeddings()(ids), batch.mask, batch.pos, batch.cache)
        batch.last = hidden[:, -1]
        return batch

    def select(self, batch: Batch, rows: list[int]) -> Batch:
        """Only these rows, in this order; padding no remaining row needs is cut from the cache's left end."""
        idx = torch.tensor(rows, device=batch.mask.device)
        batch.cache.reorder_cache(idx)
        mask = batch.mask[idx]
        cut = 0
        if isinstance(batch.cache, KVCache):  # the compiled decoder's fixed-size cache keeps its slots
            cut = int(mask.any(0).long().argmax())
            batch.cache.trim_left(cut)
        return Batch([batch.seqs[i] for i in rows], batch.cache, mask[:, cut:], batch.pos[idx], batch.last[idx], batch.has_image[idx])

    def join(self, a: Optional[Batch], b: Batch) -> Batch:
        """a's rows then b's, as one batch (b freshly prefilled while a was decoding)."""
        if a is None:
            return b
        cache = KVCache.join(self.backend.as_cache(a.cache), self.backend.as_cache(b.cache))
        n = cache.length
        mask = torch.cat([F.pad(a.mask, (n - a.mask.shape[1], 0)), F.pad(b.mask, (n - b.mask.shape[1], 0))])
        return Batch(a.seqs + b.seqs, cache, mask, torch.cat([a.pos, b.pos]), torch.cat([a.last, b.last]), torch.cat([a.has_image, b.has_image]))

    # ---- text ----------------------------------------------------------------------------------
    def _update_text(self, seq: Sequence) -> None:
        """`text` = the decoded answer, cut at the first stop string; while unfinished, held back: a tail that
        may be the start of a stop string, an incomplete character, trailing space (stripped at the end)."""
        full = self.tokenizer.decode(seq.tokens, skip_special_tokens=True).lstrip()
        hits = [full.find(s) for s in seq.sampling.stop if s and s in full]
        if hits:
            full = full[: min(hits)]
            seq.finish_reason = "stop"
        if seq.finish_reason:
            text = full.rstrip()
        else:
            text = full.rstrip("\ufffd").rstrip()
            hold = 0
            for s in seq.sampling.stop:
                hold = max([hold] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
            text = text[: len(text) - hold].rstrip()
        sent = seq.text[: seq.sent]
        if text.startswith(sent):  # text handed out is never taken back
            seq.text = text
        elif seq.finish_reason:
            seq.text = sent

    # ---- expert tracing ------------------------------------------------------------------------
    def _tracing(self, batch: Batch):
        """While a decode step runs: which experts each row's token goes to, per sparse layer (router hooks)."""
        import contextlib

        if not self.trace_experts:
            return contextlib.nullcontext()
        from ..model.sparse import sparse_modules

        seqs, has_image = batch.seqs, batch.has_image.tolist()
        picks: dict[int, list] = {}

        def hook(layer):
            def run(module, inputs, logits):
                probs = logits.float().softmax(-1)
                if layer.kind == "evf":  # routed rows only: those of samples with an image; the others use the language FFN
                    rows = [i for i, h in enumerate(has_image) if h]
                    chosen = dict(zip(rows, probs.argmax(-1)[:, None].tolist()))
                    picks[layer.layer_idx] = [chosen.get(i, [0]) for i in range(len(has_image))]
                else:
                    picks[layer.layer_idx] = probs.topk(layer.top_k, -1).indices.tolist()
            return run

        @contextlib.contextmanager
        def tracing():
            handles = [m.router.register_forward_hook(hook(m)) for m in sparse_modules(self.model.lm)]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
                for i, seq in enumerate(seqs):  # the token just fed in is the answer's last one
                    seq.experts.append({layer: rows[i] for layer, rows in picks.items()})

        return tracing()

    # ---- all at once ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], image_features: Optional[torch.Tensor] = None, image_index: Optional[list[int]] = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, stop_ids=None, seed: Optional[int] = None) -> list[list[int]]:
        """Each prompt's new tokens, stop token excluded. `image_features` [n_images, N, D]; `image_index[i]` says
        which of them prompt i shows (-1: none); without it, the prompts with slots take the images in order.
        With sampling, prompt i draws from a generator seeded `seed + i` (or at random without a seed)."""
        if image_index is None:
            it = iter(range(len(prompts)))
            image_index = [next(it) if IMAGE_TOKEN_ID in p else -1 for p in prompts]
        seqs = [Sequence(p, image=image_features[k] if k >= 0 else None, image_key=k if k >= 0 else None,
                         sampling=Sampling(max_new_tokens, temperature, top_p, None if seed is None else seed + i),
                         stop_ids=None if stop_ids is None else set(stop_ids), want_text=False)
                for i, (p, k) in enumerate(zip(prompts, image_index))]
        batch = self.prefill(seqs)
        while batch is not None:
            batch = self.step(batch)
        return [s.tokens for s in seqs]


def sample(logits: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p, renormalised."""
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(cut, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
