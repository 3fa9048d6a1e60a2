"""Relevancy maps: which image tokens an answer rests on (LLaVA-Gemma section 4.2, after Chefer et al., ICCV 2021).

Chefer et al.'s rule for a stack of self-attention layers, with R the token-to-token relevance (identity at the
input): for each layer, in order, A-bar = mean over heads of (dy/dA * A) clamped at 0, then R <- R + A-bar @ R,
where A are the layer's attention probabilities and y the logit of the explained output token. The relevance of
input token j to that output is R[p, j], p the position that predicts it. The LM reads image and text tokens in one
stream, so this is the self-attention rule only (no co-attention terms). As LLaVA-Gemma's Figure 2 does, we explain
the first answer token by default ("gradients on the first relevant output token"); `tokens="all"` averages over
every answer token, an int picks one.

Image tokens go back onto the picture through the tower's view of it (the whole image resized to a square, or a
processor's centre crop) and the projector's grid: pooling and LDP make coarser cells, each painted as one block
(the offline default's 4 word tokens are 4 quadrants: the map cannot be finer than that).
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from ..data.conversation import IMAGE_TOKEN_ID, ConversationEncoder
from ..errors import LlavaGMError

_EAGER = threading.Lock()  # the attention switch is state on the shared LM: one explanation at a time


@dataclass
class Explanation:
    answer: str
    answer_ids: list[int]
    explained: list[int]  # which answer tokens (indices into answer_ids) the relevance is for
    token_relevance: np.ndarray  # [image tokens] raw relevance of each image token the LM saw
    grid: tuple[int, int]  # rows, cols of the spatial image tokens (row-major in token_relevance after any prefix)
    prefix_relevance: np.ndarray  # relevance of non-spatial image tokens (a kept CLS), usually empty
    relevance: np.ndarray  # [H, W] over the input image, scaled to max 1 (all 0 when no image token is relevant)
    box: tuple[float, float, float, float]  # left, top, right, bottom: the part of the image the tower sees
    words: Optional[list[str]] = None  # word-token projector: the word each image token became
    image_size: tuple[int, int] = field(default=(0, 0))  # W, H of the input image


def chefer_relevance(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """R [n, n] from per-layer attention probabilities and their gradients, each [heads, n, n] (layers in order)."""
    n = attentions[0].shape[-1]
    rel = torch.eye(n, dtype=torch.float32, device=attentions[0].device)
    for a, g in zip(attentions, grads):
        cam = (g.float() * a.float()).clamp(min=0).mean(0)
        rel = rel + cam @ rel
    return rel


@contextlib.contextmanager
def _eager_attention(lm):
    """Attention probabilities exist only in transformers' eager attention; restore the faster kernel afterwards."""
    before = lm.config._attn_implementation
    with _EAGER:
        lm.set_attn_implementation("eager")
        try:
            yield
        finally:
            lm.set_attn_implementation(before)


def _unwrap(model_or_answerer):
    model = getattr(model_or_answerer, "model", model_or_answerer)
    if not hasattr(model, "embed") or not hasattr(model, "decoder"):
        raise LlavaGMError("relevancy maps need a llava-gm model or an Answerer")
    return model


def _forward(model, ids: list[int], feats: torch.Tensor, attentions: bool):
    x = torch.tensor([ids], device=feats.device)
    embeds = model.embed(x, feats)
    if attentions:  # gradients flow to the attention maps without touching the weights' requires_grad
        embeds = embeds.detach().requires_grad_(True)
    with model.modality(x, torch.ones(1, dtype=torch.bool, device=x.device), torch.ones_like(x)):
        out = model.decoder(inputs_embeds=embeds, use_cache=False, output_attentions=attentions)
    return out


def explain_features(model_or_answerer, question: str, image_features: torch.Tensor, max_new_tokens: int = 128,
                     tokens: Union[str, int] = "first", answer: Optional[str] = None
                     ) -> tuple[str, list[int], list[int], np.ndarray, Optional[list[str]]]:
    """(answer, answer ids, explained indices, relevance of each image token, words) for one image's features [N, D].

    `answer` (text) is explained as given, token by token (teacher-forced); without it the answer is greedy, from
    the very forward pass that is explained (recomputed whole at each step: no cache)."""
    from ..backbones.language import stop_token_ids

    model = _unwrap(model_or_answerer)
    device = next(model.lm.parameters()).device
    feats = image_features.to(device, model.projector_dtype)[None]
    text = question if "<image>" in question else f"<image>\n{question}"
    prompt = ConversationEncoder(model.tokenizer, model.num_image_tokens, 10**9).encode_prompt([{"role": "user", "content": text}])
    if prompt.count(IMAGE_TOKEN_ID) != model.num_image_tokens:
        raise LlavaGMError("a relevancy map explains one image: the question may hold at most one <image>")
    if answer is not None:
        answer_ids = model.tokenizer.encode(answer, add_special_tokens=False) if answer else []
    else:
        stops = set(stop_token_ids(model.lm, model.tokenizer))
        answer_ids = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                h = _forward(model, prompt + answer_ids, feats, attentions=False).last_hidden_state[0, -1]
                nxt = int(model.logits_from_hidden(h).float().argmax())
                if nxt in stops:
                    break
                answer_ids.append(nxt)
        answer = model.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    words = None
    if model.cfg.projector.word_tokens:  # the word each image token became (the straight-through forward's choice)
        with torch.no_grad():
            model.embed(torch.tensor([prompt], device=device), feats)
            chosen = model._word_probs[0].argmax(-1).tolist()
        words = [model.tokenizer.decode([model.cfg.projector.word_ids[c]]).strip() for c in chosen]
    if not answer_ids:
        return answer, answer_ids, [], np.zeros(model.num_image_tokens, dtype=np.float32), words
    if tokens == "first":
        explained = [0]
    elif tokens == "all":
        explained = list(range(len(answer_ids)))
    elif isinstance(tokens, int) and -len(answer_ids) <= tokens < len(answer_ids):
        explained = [tokens % len(answer_ids)]
    else:
        raise LlavaGMError(f"tokens={tokens!r}: use 'first', 'all' or an answer token index below {len(answer_ids)}")
    ids = prompt + answer_ids[: max(explained)]  # the last explained token is predicted, not read
    slots = [i for i, t in enumerate(prompt) if t == IMAGE_TOKEN_ID]
    with torch.enable_grad(), _eager_attention(model.lm):
        out = _forward(model, ids, feats, attentions=True)
        attn = list(out.attentions or ())  # [1, heads, n, n] per layer
        if len(attn) != len(model.decoder.layers) or any(a is None or not a.requires_grad for a in attn):
            raise LlavaGMError("the language model returned no attention probabilities to explain (eager attention needed)")
        total = np.zeros(len(slots), dtype=np.float64)
        for k in explained:
            pos = len(prompt) + k - 1
            logit = model.logits_from_hidden(out.last_hidden_state[0, pos])[answer_ids[k]]
            grads = torch.autograd.grad(logit, attn, retain_graph=k != explained[-1])
            rel = chefer_relevance([a[0].detach() for a in attn], [g[0] for g in grads])
            total += rel[pos, slots].double().cpu().numpy()
    return answer, answer_ids, explained, (total / len(explained)).astype(np.float32), words


def token_grid(model) -> tuple[int, int, int, int]:
    """(prefix tokens, grid side, patches per cell, tower patch side) of the image tokens the LM sees."""
    p = model.cfg.projector
    tower_tokens = model.vision_tokens
    side = math.isqrt(tower_tokens)
    prefix = 0
    if side * side != tower_tokens:  # a kept CLS (drop_cls: false); only an unpooled linear/MLP projector allows it
        prefix = getattr(model.vision_tower, "num_prefix", 0)
        side = math.isqrt(tower_tokens - prefix)
        if side * side != tower_tokens - prefix:
            raise LlavaGMError(f"{tower_tokens} image tokens form no square grid; cannot map them onto the image")
    step, g = 1, side
    if p.pool > 1:
        step, g = p.pool, side // p.pool
    if p.type == "ldp":  # stride-2 depthwise conv, padding 1: token (i, j) is centred on cell (2i, 2j)
        step, g = step * 2, (g + 1) // 2
    if prefix + g * g != model.num_image_tokens:
        raise LlavaGMError(f"cannot place {model.num_image_tokens} image tokens on a {g}x{g} grid")
    return prefix, g, step, side


def view_box(tower, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a width x height image that the tower's preprocessing keeps (a centre crop), in image pixels."""
    from ..backbones.vision import HFVisionTower

    if not (isinstance(tower, HFVisionTower) and tower.image_size == tower.native_size and tower.kind != "dinov2"):
        return 0.0, 0.0, float(width), float(height)  # the whole image resized to a square (backbones/vision.py)
    proc = tower.processor
    size, crop = proc.size, getattr(proc, "crop_size", None)
    if getattr(size, "shortest_edge", None):
        sx = sy = size.shortest_edge / min(width, height)
    elif getattr(size, "height", None) and getattr(size, "width", None):
        sx, sy = size.width / width, size.height / height
    else:
        return 0.0, 0.0, float(width), float(height)
    if not getattr(proc, "do_center_crop", False) or crop is None or not crop.height:
        return 0.0, 0.0, float(width), float(height)
    cw, ch = min(crop.width / sx, width), min(crop.height / sy, height)
    left, top = (width - cw) / 2, (height - ch) / 2
    return left, top, left + cw, top + ch


def paint(values: np.ndarray, grid: int, step: int, side: int, box, width: int, height: int) -> np.ndarray:
    """[H, W] map: each token's value over its block of the tower's patch grid inside `box` (0 outside)."""
    out = np.zeros((height, width), dtype=np.float32)
    left, top, right, bottom = box
    cell_w, cell_h = (right - left) / side, (bottom - top) / side
    for r in range(grid):
        for c in range(grid):
            y0, y1 = top + r * step * cell_h, top + min((r + 1) * step, side) * cell_h
            x0, x1 = left + c * step * cell_w, left + min((c + 1) * step, side) * cell_w
            out[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))] = values[r * grid + c]
    return out


def explain(model_or_answerer, image, question: str, max_new_tokens: int = 128, tokens: Union[str, int] = "first") -> Explanation:
    """Answer `question` about `image` (a path, bytes or PIL image) and explain the answer on the image: an Answerer's
    answer (what `llava-gm ask` prints), or for a bare LlavaGM the greedy answer of the explained forward pass."""
    from ..data.features import encode_images
    from ..images import load_image

    model = _unwrap(model_or_answerer)
    if model.vision_tower is None:
        raise LlavaGMError("relevancy maps need the model's vision tower (load the model with llava_gm.load or Answerer)")
    image = load_image(image)
    feats = encode_images(model.vision_tower, [image])[0]
    answer = None
    if model_or_answerer is not model:  # an Answerer: explain its answer, the one `llava-gm ask` prints
        answer = model_or_answerer.answer([{"prompt": question, "image": image}], max_new_tokens=max_new_tokens, progress=False)[0]
    answer, ids, explained, rel, words = explain_features(model, question, feats, max_new_tokens, tokens, answer)
    prefix, grid, step, side = token_grid(model)
    box = view_box(model.vision_tower, *image.size)
    spatial = rel[prefix:]
    top = float(spatial.max()) if spatial.size else 0.0
    relevance = paint(spatial / top if top > 0 else spatial, grid, step, side, box, *image.size)
    return Explanation(answer, ids, explained, rel, (grid, grid), rel[:prefix], relevance, box, words, image.size)


def relevancy_map(model_or_answerer, image, question: str, **kwargs) -> tuple[str, np.ndarray]:
    """(answer text, [H, W] relevance of each pixel's image token, scaled to max 1) for the web page and scripts."""
    e = explain(model_or_answerer, image, question, **kwargs)
    return e.answer, e.relevance


def overlay_png(image, relevance: np.ndarray, title: str = "", explanation: Optional[Explanation] = None, alpha: float = 0.55) -> bytes:
    """PNG bytes: the image with the relevance map laid over it (and the token grid and words, when given)."""
    from matplotlib.figure import Figure

    from ..images import load_image

    image = load_image(image)
    w, h = image.size
    if relevance.shape != (h, w):
        raise LlavaGMError(f"relevance map is {relevance.shape}, the image {h}x{w}")
    fig = Figure(figsize=(6, 6 * h / w + (0.6 if title else 0)), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1 if not title else 1 - 0.6 / fig.get_figheight()))
    ax.imshow(image)
    im = ax.imshow(relevance, cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if explanation is not None:
        _draw_grid(ax, explanation)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.01, label="relevance (max = 1)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _draw_grid(ax, e: Explanation) -> None:
    """Cell borders of coarse grids (up to 8x8) and the word each cell became (word-token projectors)."""
    g = e.grid[0]
    if g > 8:
        return
    left, top, right, bottom = (v - 0.5 for v in e.box)  # imshow centres pixel i at i: its edges are at i -/+ 0.5
    spatial = e.token_relevance[len(e.prefix_relevance) :]
    top_value = float(spatial.max()) or 1.0
    for k in range(g + 1):
        x = left + (right - left) * k / g
        y = top + (bottom - top) * k / g
        ax.plot([x, x], [top, bottom], color="white", lw=0.8)
        ax.plot([left, right], [y, y], color="white", lw=0.8)
    for r in range(g):
        for c in range(g):
            label = f"{spatial[r * g + c] / top_value:.2f}"
            if e.words:
                label = f"{e.words[len(e.prefix_relevance) + r * g + c]}\n{label}"
            ax.text(left + (right - left) * (c + 0.5) / g, top + (bottom - top) * (r + 0.5) / g, label, ha="center", va="center",
                    color="white", fontsize=9, bbox={"facecolor": "black", "alpha": 0.4, "pad": 1, "edgecolor": "none"})
