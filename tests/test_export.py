"""Exported to transformers' LlavaForConditionalGeneration, a model computes what it computed here."""

import torch

from llava_gm.data.conversation import IMAGE_TOKEN_ID, ConversationEncoder, to_messages
from llava_gm.export import to_hf_llava
from llava_gm.model.build import build_model

import tiny


def test_export_matches_our_logits(tiny_model_config):
    model = build_model(tiny_model_config).eval()
    hf = to_hf_llava(model)
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512)
    ids = enc.encode_prompt(to_messages([{"from": "human", "value": "<image>\nwhat color is the shape?"}], "t"))
    image = tiny.draw_shape("red", "circle")
    pixels = model.vision_tower.preprocess([image])
    with torch.no_grad():
        feats = model.vision_tower(pixels)
        ours_h = model.decoder(inputs_embeds=model.embed(torch.tensor([ids]), feats)).last_hidden_state
        ours = model.logits_from_hidden(ours_h)
        hf_ids = torch.tensor([[hf.config.image_token_id if t == IMAGE_TOKEN_ID else t for t in ids]])
        theirs = hf(input_ids=hf_ids, pixel_values=pixels).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
