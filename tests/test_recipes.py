"""Recipes by name (shipped as package data) or by path, from any folder."""

import pytest

from llava_gm.config import RecipeConfig, load_yaml
from llava_gm.errors import LlavaGMError
from llava_gm.recipes import names, resolve


def test_a_shipped_name_resolves_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve("offline-default")
    assert path.is_file() and path.parent.name == "recipes" and path.parent.parent.name == "llava_gm"
    assert resolve("offline-default.yaml") == path == resolve("recipes/offline-default.yaml")  # the old spelling too
    assert load_yaml(RecipeConfig, path).model.language.name == "gemma3-270m"
    assert {"offline-default", "llava-gm-2b", "llava-gm-7b", "llava-gemma-2b-dino", "eve"} <= set(names())


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "offline-default.yaml").write_text("stages: []\n")
    assert resolve("offline-default.yaml").resolve() == (tmp_path / "offline-default.yaml").resolve()
    assert resolve("offline-default").parent.name == "recipes"  # a bare name without .yaml is still the shipped one


def test_an_unknown_recipe_is_one_clear_error(tmp_path):
    with pytest.raises(LlavaGMError, match=r"recipe 'nope': no such file, and not a shipped recipe name \(eve, "):
        resolve("nope")
    with pytest.raises(LlavaGMError, match="no such file"):
        resolve(tmp_path / "missing" / "offline-default.yaml")  # a path elsewhere is not silently replaced by the shipped one


def test_train_from_another_folder_finds_the_default_recipe_and_names_missing_data(tmp_path, monkeypatch, capsys):
    from llava_gm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "runs/data/easy-vqa/align.json not found" in err and "llava-gm prepare-data" in err
    assert not (tmp_path / "out").exists()
