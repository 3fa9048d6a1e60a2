"""Export a dense llava-gm model to transformers' LlavaForConditionalGeneration (same weights, same outputs).

Useful to share a model with the transformers ecosystem, and the plain baseline our benchmarks compare against.
Supported: HF vision towers (CLIP, SigLIP, DINOv2), `linear` / `mlp2x_gelu` projectors without pooling, dense LMs.
"""

from __future__ import annotations

import torch

from .errors import LlavaGMError


def to_hf_llava(model, image_token_id: int | None = None):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from .backbones.vision import HFVisionTower

    tower = model.vision_tower
    if not isinstance(tower, HFVisionTower) or model.cfg.projector.pool != 1 or model.cfg.projector.type not in ("mlp2x_gelu", "linear"):
        raise LlavaGMError("export needs an HF vision tower and an unpooled linear/mlp2x_gelu projector")
    if model.cfg.projector.word_tokens:
        raise LlavaGMError("export of a word-token projector is not supported: transformers' Llava feeds the MLP output to the LM")
    if model.sparse_layers:
        raise LlavaGMError("export of sparse (MoE/EVF) models is not supported: transformers' Llava has dense FFNs")
    if model.cfg.projector.type == "linear":
        raise LlavaGMError("transformers' Llava projector is a 2-layer MLP; export supports mlp2x_gelu")
    tok = model.tokenizer
    if image_token_id is None:  # any id works: its embedding is replaced by image features
        image_token_id = tok.convert_tokens_to_ids("<start_of_image>") if "<start_of_image>" in tok.get_vocab() else tok.unk_token_id
    vision_cfg = getattr(tower.model.config, "vision_config", tower.model.config)
    cfg = LlavaConfig(
        vision_config=vision_cfg.to_dict() | {"model_type": vision_cfg.model_type},
        text_config=model.lm.config.get_text_config().to_dict() | {"model_type": model.lm.config.get_text_config().model_type},
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=tower.select_layer,
        vision_feature_select_strategy="default" if tower.num_prefix and tower.drop_cls else "full",
        image_seq_length=model.num_image_tokens,
        multimodal_projector_bias=True,
    )
    hf = LlavaForConditionalGeneration(cfg)
    hf.model.vision_tower.load_state_dict(tower.full_state_dict())
    hf.model.language_model.load_state_dict(model.lm.get_decoder().state_dict())
    hf.lm_head.load_state_dict(model.lm.get_output_embeddings().state_dict())
    net = model.projector.net
    with torch.no_grad():
        for mine, theirs in ((net[0], hf.model.multi_modal_projector.linear_1), (net[2], hf.model.multi_modal_projector.linear_2)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    return hf.to(next(model.lm.parameters()).dtype).eval()
