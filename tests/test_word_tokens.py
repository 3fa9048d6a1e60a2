"""Word-token projectors: stage 1 can train the words alone (lm_loss: 0), without any LM forward."""

import dataclasses
import json

import pytest

from llava_gm.config import StageConfig
from llava_gm.errors import LlavaGMError
from llava_gm.model.llava import LlavaGM
from llava_gm.train.run import run_stage

QUIET = dict(progress=False, say=lambda m: None)


@pytest.fixture
def word_config(tiny_model_config):
    return dataclasses.replace(tiny_model_config, projector=dataclasses.replace(tiny_model_config.projector, pool=2, word_tokens=True))


def test_words_alone_never_run_the_language_model_and_learn_the_words(tmp_path, word_config, shapes_data, monkeypatch):
    def no_decoder(self):
        raise AssertionError("lm_loss: 0 must not run the LM")

    monkeypatch.setattr(LlavaGM, "decoder", property(no_decoder))
    stage = StageConfig(name="align", data=str(shapes_data), lr=1e-2, batch_size=8, epochs=8, word_loss=1.0, lm_loss=0.0)
    r = run_stage(stage, tmp_path / "a", model_cfg=word_config, **QUIET)
    steps = json.loads((tmp_path / "a" / "train_log.json").read_text())["steps"]
    assert all(s["lm_loss"] == 0.0 for s in steps)
    first, last = steps[0]["aux_words"], steps[-1]["aux_words"]
    assert last < 0.5 * first, (first, last)
    monkeypatch.undo()  # the checkpoint is a whole model: it loads and answers
    from llava_gm.model.build import read_checkpoint_config

    cfg, _ = read_checkpoint_config(r["checkpoint"])
    assert cfg.projector.word_ids  # the stage fixed its word vocabulary


def test_words_alone_need_a_word_loss(tmp_path, word_config, shapes_data):
    stage = StageConfig(name="align", data=str(shapes_data), batch_size=8, word_loss=0.0, lm_loss=0.0)
    with pytest.raises(LlavaGMError, match="lm_loss: 0"):
        run_stage(stage, tmp_path / "a", model_cfg=word_config, **QUIET)


def test_the_memory_plan_of_words_alone_holds_no_language_model_activations(word_config):
    from llava_gm.analysis.plan import Setup, plan_recipe
    from llava_gm.config import RecipeConfig

    setup = Setup(gpus=1, features="cache", batch_size=4, seq_len=96, label_tokens=24)
    with_lm, alone = (plan_recipe(RecipeConfig(model=word_config, stages=[StageConfig(name="align", word_loss=1.0, lm_loss=w)]), setup)[0]
                      for w in (1.0, 0.0))
    # what is held is the projector's input and output: a few kB, against the LM's layers and vocabulary head
    assert 0 < alone.bytes["activations"] < 0.01 * with_lm.bytes["activations"]
    assert alone.bytes["weights"] == with_lm.bytes["weights"] and alone.peak < with_lm.peak
