"""Relevancy maps: Chefer et al.'s rule, a planted dependency it must find, and the map's invariants on the image."""

import dataclasses
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llava_gm.analysis.relevancy import chefer_relevance, explain, explain_features, overlay_png, paint, relevancy_map, token_grid, view_box
from llava_gm.cli import main
from llava_gm.config import LanguageConfig, ModelConfig, VisionConfig
from llava_gm.infer import Answerer
from llava_gm.model.build import build_model

import tiny

QUESTION = "what color is the shape?"


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("LLAVA_GM_PRECISION", "fp32")


def test_chefer_rule_on_two_layers():
    """R = (I + A2)(I + A1) when every gradient is 1 (mean over heads of the clamped products)."""
    a1 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.1, 0.9]]])
    a2 = torch.tensor([[[1.0, 0.0], [0.8, 0.2]]] * 2)
    g2 = torch.ones_like(a2)
    g1 = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, 1.0]]])  # a negative product is clamped to 0
    cam1 = torch.tensor([[1.0, 0.0], [0.25, 0.7]])
    expected = (torch.eye(2) + a2[0]) @ (torch.eye(2) + cam1)
    assert torch.allclose(chefer_relevance([a1, a2], [g1, g2]), expected)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_vision_dir):
    """A Gemma (1) model whose first answer token depends on image token K only.

    MLPs and every attention output but the last layer's write nothing, so the last layer reads the embeddings.
    Text embeddings are 0 in dims 0 and 1; image tokens are 0 except token K, which the projector writes into dim 0.
    The last layer's values read dim 0 only (so only token K has a value) and its output writes dim 1, which only
    the answer token's (tied) embedding has: more attention to K, higher answer logit.
    """
    lm_dir = tiny.make_lm(tmp_path_factory.mktemp("planted-gemma"), family="gemma")
    cfg = ModelConfig(vision=VisionConfig(name=str(tiny_vision_dir)), language=LanguageConfig(name=str(lm_dir)))
    model = build_model(cfg).eval()
    answer = model.tokenizer.encode("red", add_special_tokens=False)[0]
    with torch.no_grad():
        layers = model.decoder.layers
        for layer in layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
            layer.input_layernorm.weight.zero_()  # Gemma's RMSNorm scales by 1 + w
        last = layers[-1].self_attn
        last.v_proj.weight.zero_()
        last.v_proj.weight[:, 0] = 1.0
        last.o_proj.weight[1, :] = 1.0 / 8
        model.decoder.norm.weight.zero_()
        table = model.lm.get_input_embeddings().weight
        table[:, :2] = 0
        table[answer, 1] = 5.0
        net = model.projector.net
        for lin in (net[0], net[2]):
            lin.weight.zero_()
            lin.bias.zero_()
        net[0].weight[0, 0] = 1.0
        net[2].weight[0, 0] = 1.0
    return model, answer


@pytest.mark.parametrize("k", [3, 9])
def test_the_planted_image_token_is_the_relevant_one(planted, k):
    model, answer = planted
    feats = torch.zeros(model.num_image_tokens, model.vision_dim)
    feats[k, 0] = 3.0
    text, ids, explained, rel, _ = explain_features(model, QUESTION, feats, max_new_tokens=2)
    assert ids[0] == answer and explained == [0]
    assert int(np.argmax(rel)) == k and rel[k] > 0
    assert np.all(np.delete(rel, k) == 0)  # no other image token carries the answer, so none gets relevance
    feats[k] = 0  # the dependency is real: without token K the answer is another
    assert explain_features(model, QUESTION, feats, max_new_tokens=1)[1][0] != answer


@pytest.fixture(scope="module")
def answerer(tiny_model_config):
    """An untrained tiny model: it answers in several tokens (the trained tiny checkpoint answers with an empty string)."""
    with pytest.MonkeyPatch.context() as mp:  # the tower is prepared for the precision of its creation
        mp.setenv("LLAVA_GM_PRECISION", "fp32")
        torch.manual_seed(0)
        yield Answerer(build_model(tiny_model_config), dtype=torch.float32)


def test_map_invariants_and_the_answer_is_the_answerers(answerer):
    image = tiny.draw_shape("green", "triangle", size=40).crop((0, 0, 40, 26))  # not square: H x W of the input
    answer, rel = relevancy_map(answerer, image, QUESTION, max_new_tokens=4)
    assert answer and answer == answerer.answer([{"prompt": QUESTION, "image": image}], max_new_tokens=4, progress=False)[0]
    # a bare model answers greedily in the explained pass itself: the same answer as the Answerer's engine
    bare = explain(answerer.model, image, QUESTION, max_new_tokens=4)
    assert bare.answer == answer and bare.relevance.shape == rel.shape
    assert rel.shape == (26, 40) and rel.dtype == np.float32 and np.isfinite(rel).all()
    assert rel.min() >= 0 and (rel.max() == 1 or rel.max() == 0)
    e = explain(answerer, image, QUESTION, max_new_tokens=4, tokens="all")
    assert e.token_relevance.shape == (answerer.model.num_image_tokens,) and (e.token_relevance >= 0).all()
    assert e.explained == list(range(len(e.answer_ids))) and e.grid == (4, 4)
    png = overlay_png(image, e.relevance, title="q", explanation=e)
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_tokens_map_onto_their_cells_of_the_image(tmp_path, tiny_model_config):
    """Pooling and LDP make coarser cells; a centre-cropping processor maps onto the crop only."""
    def fake(pool, kind, tokens, seen):
        return SimpleNamespace(cfg=SimpleNamespace(projector=SimpleNamespace(pool=pool, type=kind)), vision_tokens=tokens,
                               num_image_tokens=seen, vision_tower=None)

    assert token_grid(fake(4, "mlp2x_gelu", 64, 4)) == (0, 2, 4, 8)  # the offline default: 8x8 patches, 4 tokens
    assert token_grid(fake(1, "ldp", 49, 16)) == (0, 4, 2, 7)
    quadrants = paint(np.array([1.0, 0.0, 0.5, 0.25]), 2, 4, 8, (0, 0, 40, 30), 40, 30)
    assert quadrants[0, 0] == 1 and quadrants[0, 39] == 0 and quadrants[29, 0] == 0.5 and quadrants[29, 39] == 0.25
    assert (quadrants[:15, :20] == 1).all() and (quadrants[15:, 20:] == 0.25).all()
    ldp = paint(np.arange(16, dtype=np.float32), 4, 2, 7, (0, 0, 28, 28), 28, 28)
    assert ldp[27, 27] == 15 and ldp[0, 0] == 0 and ldp[0, 8] == 1  # the last cell is one patch wide (7 = 2+2+2+1)
    clip = build_model(dataclasses.replace(tiny_model_config, vision=VisionConfig(name=str(tiny.make_vision(tmp_path, kind="clip")))))
    assert view_box(clip.vision_tower, 40, 30) == (5.0, 0.0, 35.0, 30.0)  # shortest edge to 28, centre crop 28x28
    assert view_box(build_model(tiny_model_config).vision_tower, 40, 30) == (0.0, 0.0, 40.0, 30.0)


def test_word_tokens_are_named(tiny_model_config):
    cfg = dataclasses.replace(tiny_model_config, projector=dataclasses.replace(tiny_model_config.projector, pool=2, word_tokens=True))
    model = build_model(cfg)
    words = ["red", "blue", "circle", "triangle"]
    model.cfg.projector.word_ids = [model.tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
    e = explain(model, tiny.draw_shape("red", "circle"), QUESTION, max_new_tokens=2)
    assert e.grid == (2, 2) and len(e.words) == 4 and set(e.words) <= {model.tokenizer.decode([i]).strip() for i in model.cfg.projector.word_ids}
    assert e.relevance.shape == (32, 32)


def test_explain_command(tmp_path, tiny_checkpoint, shapes_data, capsys):
    image = shapes_data.parent / "images" / "0.png"
    out = tmp_path / "map.png"
    assert main(["explain", "--checkpoint", tiny_checkpoint, "--image", str(image), "--question", QUESTION, "--output", str(out),
                 "--max-new-tokens", "3"]) == 0
    assert Image.open(out).format == "PNG"
    assert capsys.readouterr().out.endswith("\n")
    assert main(["explain", "--checkpoint", tiny_checkpoint, "--image", str(tmp_path / "none.png"), "--question", "q",
                 "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "none.png" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
