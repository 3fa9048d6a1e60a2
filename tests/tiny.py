"""Tiny random backbones saved to folders and loaded back by path, through the code users use."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "user model what color is the shape ? is there a red circle in the image ? yes no",
    "A blue rectangle. A green triangle. Describe the image briefly. Answer the question using a single word or phrase.",
    "the quick brown fox jumps over the lazy dog . red green blue yellow gray black teal brown circle rectangle triangle",
]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ["circle", "rectangle", "triangle"]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llava_gm.backbones.chat_templates import GEMMA_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_lm(folder: Path, family: str = "gemma3", layers: int = 4, sliding_window: int = 8) -> Path:
    """A tiny random Gemma 1/2/3 causal LM + tokenizer in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tok = make_tokenizer(folder)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gemma3":
        from transformers import Gemma3TextConfig as C

        cfg = C(**common, sliding_window=sliding_window)
    elif family == "gemma2":
        from transformers import Gemma2Config as C

        cfg = C(**common, sliding_window=8)
    else:
        from transformers import GemmaConfig as C

        cfg = C(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    return folder


def make_vision(folder: Path, kind: str = "dinov2", image_size: int = 28) -> Path:
    """A tiny random CLIP / SigLIP / DINOv2 vision model + its image processor in `folder`."""
    import torch

    folder = Path(folder)
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=image_size, patch_size=7)
    if kind == "clip":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        model = CLIPVisionModel(CLIPVisionConfig(**common))
        proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    elif kind == "siglip":
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        model = SiglipVisionModel(SiglipVisionConfig(**common))
        proc = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(**common))
        proc = BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def draw_shape(color: str, shape: str, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    box = (6, 6, size - 6, size - 6)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "rectangle":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(size // 2, 6), (6, size - 6), (size - 6, size - 6)], fill=COLORS[color])
    return im


def make_shapes_data(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """LLaVA JSON of coloured-shape images with one question each; returns the JSON path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        draw_shape(color, shape).save(folder / "images" / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": color},
            {"from": "human", "value": "what is the shape?"}, {"from": "gpt", "value": shape}]})
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path
