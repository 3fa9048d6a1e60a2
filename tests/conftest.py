import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Feature caches and converted backbones of the tests go to a temp folder, unless the user's cache is wanted."""
    if not os.environ.get("LLAVA_GM_TEST_USE_CACHE"):
        os.environ["LLAVA_GM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return tiny.make_lm(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory):
    return tiny.make_vision(tmp_path_factory.mktemp("tiny-dinov2"))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    return tiny.make_shapes_data(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def tiny_model_config(tiny_lm_dir, tiny_vision_dir):
    from llava_gm.config import LanguageConfig, ModelConfig, VisionConfig

    return ModelConfig(vision=VisionConfig(name=str(tiny_vision_dir)), language=LanguageConfig(name=str(tiny_lm_dir), max_length=256))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model_config, shapes_data):
    """A tiny model trained a few steps of stage 1 + stage 2; loadable with Answerer.from_checkpoint."""
    from llava_gm.config import StageConfig
    from llava_gm.train.run import run_stage

    out = tmp_path_factory.mktemp("ckpt")
    s1 = run_stage(StageConfig(name="align", data=str(shapes_data), lr=1e-3, batch_size=8), out / "align", model_cfg=tiny_model_config, progress=False, say=lambda m: None)
    s2 = run_stage(StageConfig(name="instruct", data=str(shapes_data), lr=1e-3, batch_size=8), out / "instruct", init=s1["checkpoint"], progress=False, say=lambda m: None)
    return s2["checkpoint"]


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, tiny_model_config):
    """An untrained tiny model saved as a checkpoint: its answers are long (a trained tiny model ends at once)."""
    from llava_gm.model.build import build_model, save_checkpoint

    model = build_model(tiny_model_config)
    model.trained_keys = {n for n, _ in model.named_parameters() if not n.startswith("vision_tower.")}
    return str(save_checkpoint(model, tmp_path_factory.mktemp("random") / "random-ckpt"))
