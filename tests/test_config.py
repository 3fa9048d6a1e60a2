from pathlib import Path

import pytest

from llava_gm.config import ModelConfig, RecipeConfig, StageConfig, from_dict, load_yaml, save_yaml, to_dict
from llava_gm.errors import LlavaGMError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_yaml_round_trip(tmp_path):
    r = RecipeConfig(stages=[StageConfig(name="align", lr=1e-3), StageConfig(name="instruct", lora=True, betas=(0.9, 0.95))])
    save_yaml(r, tmp_path / "r.yaml")
    assert load_yaml(RecipeConfig, tmp_path / "r.yaml") == r


def test_unknown_and_mistyped_fields_are_named():
    with pytest.raises(LlavaGMError, match=r"config.vision: unknown field\(s\) \['nmae'\]"):
        from_dict(ModelConfig, {"vision": {"nmae": "x"}})
    with pytest.raises(LlavaGMError, match="config.projector.type: 'mlp3x' is not one of"):
        from_dict(ModelConfig, {"projector": {"type": "mlp3x"}})
    with pytest.raises(LlavaGMError, match="config.data: expected str, got 3"):
        from_dict(StageConfig, {"name": "align", "data": 3})


def test_sparse_layers_accept_names_and_lists():
    assert from_dict(ModelConfig, {"sparse": {"layers": [1, 3]}}).sparse.layers == [1, 3]
    assert from_dict(ModelConfig, {"sparse": {"layers": "first_half"}}).sparse.layers == "first_half"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load(path):
    r = load_yaml(RecipeConfig, path)
    assert r.stages and r.stages[0].name in ("align", "instruct")
    assert to_dict(r)["model"]["language"]["name"]


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"offline-default", "llava-gm-2b", "llava-gm-7b", "llava-gemma-2b-dino"} <= names
