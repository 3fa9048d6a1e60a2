"""The demo end to end on tiny random backbones: its evaluation subset, the balanced yes/no column, resuming."""

import dataclasses
import json

import pytest

pytest.importorskip("easy_vqa")

from llava_gm import demo  # noqa: E402
from llava_gm.config import RecipeConfig, load_yaml, save_yaml  # noqa: E402
from llava_gm.errors import LlavaGMError  # noqa: E402


def test_demo_on_tiny_models_evaluates_the_fixed_subset_and_resumes(tmp_path, monkeypatch, tiny_model_config, capsys):
    recipe = load_yaml(RecipeConfig, demo.RECIPE)
    model = dataclasses.replace(recipe.model, vision=tiny_model_config.vision, language=tiny_model_config.language,
                                projector=dataclasses.replace(recipe.model.projector, pool=2))  # 28 px / 7 -> 4x4 -> 4 tokens
    save_yaml(dataclasses.replace(recipe, model=model), tmp_path / "tiny.yaml")
    monkeypatch.setattr(demo, "RECIPE", tmp_path / "tiny.yaml")
    monkeypatch.setattr(demo, "QUICK", {"align": 16, "instruct": 16, "sparsify": 16})
    monkeypatch.setattr(demo, "SAMPLE_QUESTIONS", 4)
    monkeypatch.setattr(demo, "EVAL_NATURAL", 12)
    monkeypatch.setattr(demo, "EVAL_PER_ANSWER", 2)
    monkeypatch.setattr(demo, "_latency_ms", lambda answerer, image: 0.0)  # timing is not what this test checks
    monkeypatch.chdir(tmp_path)

    s = demo.run_demo("runs/demo", data_dir=str(tmp_path / "easy-vqa"), stage3=False, early_rows=False)  # stage 3: test_sparse
    questions = [json.loads(line) for line in (tmp_path / "runs/demo/eval_questions.jsonl").read_text().splitlines()]
    assert len(questions) == 12 + sum(q["question_id"] >= 12 for q in questions) and len(questions) <= 12 + 16
    assert [r["model"] for r in s["rows"]] == ["stage 2 (instruct)"] and s["rows"][0]["questions"] == len(questions)
    assert s["rows"][0]["yes_no_balanced"] is not None
    assert "bal y/n" in s["table"] and "host:" in s["table"] and s["host"]["precision"] in ("bf16", "fp32")
    assert json.loads((tmp_path / "easy-vqa/build.json").read_text())["balance"] is demo.BALANCED_DATA

    again = demo.run_demo("runs/demo", data_dir=str(tmp_path / "easy-vqa"), stage3=False, early_rows=False)  # reused: same answers
    assert capsys.readouterr().out.count("reusing") == 2
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in s["rows"]]

    monkeypatch.setattr(demo, "QUICK", {"align": 32, "instruct": 16, "sparsify": 16})
    with pytest.raises(LlavaGMError, match="other settings"):  # never reuses stages trained another way
        demo.run_demo("runs/demo", data_dir=str(tmp_path / "easy-vqa"), stage3=False)
