"""The LLaVA model on tiny random backbones loaded by path: merge, loss, generation."""

import dataclasses

import pytest
import torch

from llava_gm.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from llava_gm.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, ConversationEncoder, to_messages
from llava_gm.engine.core import Engine
from llava_gm.model.build import build_model

import tiny


def batch_for(model, convs):
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512)
    encoded = [enc.encode(to_messages(c, "t")) for c in convs]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), model.tokenizer.pad_token_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return ids, labels, mask


CONVS = [
    [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "red"}],
    [{"from": "human", "value": "<image>\nis there a circle?"}, {"from": "gpt", "value": "no"}, {"from": "human", "value": "what is the shape?"}, {"from": "gpt", "value": "A blue rectangle."}],
]


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
def test_loss_on_labelled_positions_equals_full_logits_loss(tmp_path, family, vision):
    lm_dir = tiny.make_lm(tmp_path / "lm", family)
    v_dir = tiny.make_vision(tmp_path / "v", vision)
    model = build_model(ModelConfig(vision=VisionConfig(name=str(v_dir)), language=LanguageConfig(name=str(lm_dir))))
    n_patches = (28 // 7) ** 2
    assert model.num_image_tokens == n_patches  # CLS dropped for CLIP/DINOv2; SigLIP has none
    ids, labels, mask = batch_for(model, CONVS)
    feats = torch.randn(2, n_patches, model.vision_dim)
    out = model(ids, mask, labels, feats)
    # reference: the transformers route with full logits over every position
    embeds = model.embed(ids, feats)
    ref = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert torch.allclose(out.lm_loss, ref, atol=1e-5), (out.lm_loss, ref)
    out.loss.backward()
    assert model.projector.net[0].weight.grad.abs().sum() > 0


def test_image_features_land_exactly_at_image_slots(tiny_model_config):
    model = build_model(tiny_model_config)
    ids, labels, mask = batch_for(model, CONVS)
    feats = torch.randn(2, model.vision_tokens, model.vision_dim)
    embeds = model.embed(ids, feats)
    proj = model.projector(feats)
    slots = ids == IMAGE_TOKEN_ID
    assert torch.equal(embeds[slots], proj.reshape(-1, proj.shape[-1]))
    text = model.lm.get_input_embeddings()(ids.clamp(min=0))
    assert torch.equal(embeds[~slots], text[~slots])


def test_projector_pooling_and_ldp_cut_tokens(tiny_model_config):
    for proj, expected in [(ProjectorConfig(type="linear", pool=2), 4), (ProjectorConfig(type="ldp"), 4), (ProjectorConfig(pool=1), 16)]:
        model = build_model(dataclasses.replace(tiny_model_config, projector=proj))
        assert model.num_image_tokens == expected
        assert model.projector(torch.randn(3, 16, model.vision_dim)).shape == (3, expected, model.lm.config.hidden_size)


def greedy_without_cache(model, prompt, feats, steps):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(steps):
        embeds = model.embed(ids, feats)
        h = model.decoder(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
        nxt = int(model.logits_from_hidden(h[:, -1]).argmax(-1))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_kv_cache_batched_left_padded_generation_matches_plain_greedy(tmp_path, family, tiny_vision_dir):
    lm_dir = tiny.make_lm(tmp_path / "lm", family)
    model = build_model(ModelConfig(vision=VisionConfig(name=str(tiny_vision_dir)), language=LanguageConfig(name=str(lm_dir)))).eval()
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512)
    prompts = [enc.encode_prompt(to_messages([{"from": "human", "value": q}], "t")) for q in ["<image>\nwhat color is the shape?", "<image>\nis there a red circle in the image? yes no"]]
    assert len(prompts[0]) != len(prompts[1])  # so the batch needs left padding
    torch.manual_seed(1)
    feats = torch.randn(2, model.vision_tokens, model.vision_dim)
    batched = Engine(model).generate(prompts, feats, max_new_tokens=12, stop_ids=[])
    for i, p in enumerate(prompts):
        assert batched[i] == greedy_without_cache(model, p, feats[i : i + 1], 12)


def test_generation_stops_at_stop_token(tiny_model_config):
    model = build_model(tiny_model_config).eval()
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512)
    p = enc.encode_prompt(to_messages([{"from": "human", "value": "hello"}], "t"))
    free = Engine(model).generate([p], None, max_new_tokens=8, stop_ids=[])[0]
    stopped = Engine(model).generate([p], None, max_new_tokens=8, stop_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]


def test_sampling_is_reproducible_with_a_seed(tiny_model_config):
    model = build_model(tiny_model_config).eval()
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512)
    p = enc.encode_prompt(to_messages([{"from": "human", "value": "hello"}], "t"))
    a = Engine(model).generate([p], None, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = Engine(model).generate([p], None, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a == b and len(a[0]) == 8


@pytest.mark.parametrize("window, shares", [(512, True), (8, False)])
def test_questions_sharing_an_image_prefill_it_once_with_identical_answers(tmp_path, tiny_vision_dir, window, shares):
    lm_dir = tiny.make_lm(tmp_path / "lm", "gemma3", sliding_window=window)
    model = build_model(ModelConfig(vision=VisionConfig(name=str(tiny_vision_dir)), language=LanguageConfig(name=str(lm_dir)))).eval()
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512)
    qs = ["what color is the shape?", "is there a red circle in the image? yes no", "what is the shape?", "yes"]
    prompts = [enc.encode_prompt(to_messages([{"from": "human", "value": f"<image>\n{q}"}], "t")) for q in qs]
    torch.manual_seed(2)
    feats = torch.randn(2, model.vision_tokens, model.vision_dim)
    index = [0, 1, 0, 1]  # two questions on each of two images: two shared prefixes
    calls = []
    orig = model.embed
    model.embed = lambda ids, f: calls.append(tuple(ids.shape)) or orig(ids, f)
    shared = Engine(model).generate(prompts, feats, index, max_new_tokens=10, stop_ids=[])
    # the prefill ran once per distinct image, unless a short sliding window forbids sharing
    assert calls[0][0] == (2 if shares else 4)
    model.embed = orig
    for i, p in enumerate(prompts):
        assert shared[i] == greedy_without_cache(model, p, feats[index[i] : index[i] + 1], 10)
