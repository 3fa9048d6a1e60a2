"""Vision-tower speed-ups change nothing: trimmed layers and bf16-stored weights give the same features."""

import pytest
import torch

import tiny
from llava_gm.backbones.vision import HFVisionTower
from llava_gm.config import VisionConfig
from llava_gm.precision import bf16_matmul_weights


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
@pytest.mark.parametrize("select", [-2, 1, -1])
def test_unused_layers_dropped_features_unchanged(tmp_path, kind, select):
    from transformers import AutoModel

    path = tiny.make_vision(tmp_path, kind)
    tower = HFVisionTower(VisionConfig(name=str(path), select_layer=select), str(path))
    full = AutoModel.from_pretrained(path).eval()
    full = getattr(full, "vision_model", full)
    encoder = getattr(tower.model, "vision_model", tower.model).encoder
    kept = len(encoder.layers if hasattr(encoder, "layers") else encoder.layer)
    assert kept == select % 4  # 3 layers: hidden state i is the output of layer i
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = full(pixel_values=px, output_hidden_states=True).hidden_states[select]
    want = want[:, tower.num_prefix :] if tower.drop_cls else want
    assert torch.equal(tower(px), want)


def test_select_layer_out_of_range_is_a_clear_error(tmp_path):
    from llava_gm.errors import LlavaGMError

    path = tiny.make_vision(tmp_path, "dinov2")
    with pytest.raises(LlavaGMError, match="select_layer 7 is out of range for a 3-layer tower"):
        HFVisionTower(VisionConfig(name=str(path), select_layer=7), str(path))


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_bf16_stored_weights_give_bitwise_the_same_autocast_features(tmp_path, kind):
    path = tiny.make_vision(tmp_path, kind)
    tower = HFVisionTower(VisionConfig(name=str(path)), str(path)).float()
    images = [tiny.draw_shape("red", s, 28) for s in ("circle", "triangle")]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        px = tower.preprocess(images)
        want = tower(px)
        got = bf16_matmul_weights(tower)(px)
    assert any(p.dtype == torch.bfloat16 for p in tower.parameters())
    assert torch.equal(got, want)
