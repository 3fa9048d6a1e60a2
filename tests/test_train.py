"""Training stages on tiny backbones: the loss falls, the plan freezes what it says, checkpoints reload, bad data is named."""

import dataclasses
import json

import pytest
import torch

from llava_gm.config import ProjectorConfig, StageConfig
from llava_gm.errors import LlavaGMError
from llava_gm.model.build import build_model, load_checkpoint, read_checkpoint_config
from llava_gm.train.run import run_stage
from llava_gm.train.stages import plan_stage

QUIET = dict(progress=False, say=lambda m: None)


def test_training_lowers_the_loss(tmp_path, tiny_model_config, shapes_data):
    r = run_stage(StageConfig(name="instruct", data=str(shapes_data), lr=3e-3, batch_size=8, epochs=6, warmup_ratio=0.1), tmp_path / "c", model_cfg=tiny_model_config, **QUIET)
    assert r["final_loss"] < 0.6 * r["first_loss"], r
    log = json.loads((tmp_path / "c" / "train_log.json").read_text())
    assert len(log["steps"]) == r["steps"] == 18
    assert (tmp_path / "c" / "loss.png").stat().st_size > 1000


def test_stage_plans_train_exactly_their_parts(tiny_model_config):
    model = build_model(tiny_model_config)
    align = set(plan_stage(model, StageConfig(name="align")))
    assert align and all(n.startswith("projector.") for n in align)
    instruct = set(plan_stage(model, StageConfig(name="instruct", train_embeddings=False)))
    emb = model.lm.get_input_embeddings().weight
    names = {n for n, p in model.named_parameters() if p is emb}
    assert align < instruct and not (names & instruct)
    assert not any(n.startswith("vision_tower.") for n in instruct)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == instruct


def test_align_changes_only_the_projector_and_checkpoint_reproduces_logits(tmp_path, tiny_model_config, shapes_data):
    before = build_model(tiny_model_config)
    r = run_stage(StageConfig(name="align", data=str(shapes_data), lr=1e-2, batch_size=8), tmp_path / "a", model_cfg=tiny_model_config, **QUIET)
    after = load_checkpoint(r["checkpoint"])
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {n for n in b if not torch.equal(b[n].float(), a[n].float())}
    assert changed and all(n.startswith("projector.") for n in changed)
    cfg, history = read_checkpoint_config(r["checkpoint"])
    assert history[0]["stage"] == "align" and cfg == tiny_model_config
    # a second load gives the same model, bit for bit
    again = load_checkpoint(r["checkpoint"])
    ids = torch.tensor([[2, 5, 6, 7]])
    x = after.lm(input_ids=ids).logits
    assert torch.equal(x, again.lm(input_ids=ids).logits)


def test_stage_two_from_stage_one_and_lora(tmp_path, tiny_model_config, shapes_data):
    s1 = run_stage(StageConfig(name="align", data=str(shapes_data), batch_size=8), tmp_path / "1", model_cfg=tiny_model_config, **QUIET)
    s2 = run_stage(StageConfig(name="instruct", data=str(shapes_data), lora=True, lora_rank=4, lora_alpha=8, lr=1e-2, batch_size=8), tmp_path / "2", init=s1["checkpoint"], **QUIET)
    m1, m2 = load_checkpoint(s1["checkpoint"]), load_checkpoint(s2["checkpoint"])
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert set(p1) == set(p2)  # LoRA merged back: a plain model again
    q = "lm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(p1[q], p2[q])
    assert [h["stage"] for h in read_checkpoint_config(s2["checkpoint"])[1]] == ["align", "instruct"]


def _bad_data(tmp_path, shapes_data, rows_extra):
    rows = json.loads(shapes_data.read_text())[:6] + rows_extra
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(rows))
    return p


@pytest.mark.parametrize("row, message", [
    ({"id": "nofile", "image": "images/missing.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}, "sample nofile: image .*missing.png not found"),
    ({"id": "notag", "image": "images/0.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sample notag: has an image but 0 '<image>' tags"),
    ({"id": "noimage", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}, "sample noimage: has '<image>' in its text but no 'image' field"),
    ({"id": "long", "image": "images/0.png", "conversations": [{"from": "human", "value": "<image>\n" + "red " * 400}, {"from": "gpt", "value": "a"}]}, "sample long: is \\d+ tokens long, over the limit of 256"),
    ({"id": "noconv"}, "sample noconv: has no 'conversations'"),
])
def test_bad_samples_fail_by_name_or_are_skipped_and_counted(tmp_path, tiny_model_config, shapes_data, row, message):
    data = _bad_data(tmp_path, shapes_data, [row])
    stage = StageConfig(name="align", data=str(data), image_folder=str(shapes_data.parent), batch_size=4)
    with pytest.raises(LlavaGMError, match=message):
        run_stage(stage, tmp_path / "out", model_cfg=tiny_model_config, **QUIET)
    assert not (tmp_path / "out").exists()  # nothing written half-way
    stage.on_bad = "skip"
    r = run_stage(stage, tmp_path / "out", model_cfg=tiny_model_config, **QUIET)
    assert r["skipped"] == 1 and r["samples"] == 6
    assert list(json.loads((tmp_path / "out" / "train_log.json").read_text())["skipped"]) == [row["id"]]


def test_unreadable_image_is_named(tmp_path, tiny_model_config, shapes_data):
    (shapes_data.parent / "images" / "broken.png").write_bytes(b"not a png")
    row = {"id": "broken", "image": "images/broken.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    data = _bad_data(tmp_path, shapes_data, [row])
    with pytest.raises(LlavaGMError, match="sample broken: cannot decode image"):
        run_stage(StageConfig(name="align", data=str(data), image_folder=str(shapes_data.parent)), tmp_path / "o", model_cfg=tiny_model_config, **QUIET)


def test_malformed_json_names_the_place(tmp_path, tiny_model_config):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "conversations": []}\n{"id": oops}\n')
    with pytest.raises(LlavaGMError, match=r"d.jsonl:2: not valid JSON"):
        run_stage(StageConfig(name="align", data=str(p)), tmp_path / "o", model_cfg=tiny_model_config, **QUIET)


def test_existing_output_is_never_overwritten(tmp_path, tiny_model_config, shapes_data):
    (tmp_path / "o").mkdir()
    with pytest.raises(LlavaGMError, match="exists"):
        run_stage(StageConfig(name="align", data=str(shapes_data)), tmp_path / "o", model_cfg=tiny_model_config, **QUIET)


def test_features_are_computed_once_and_reused(tmp_path, tiny_model_config, shapes_data):
    from llava_gm.backbones.vision import load_vision_tower
    from llava_gm.data.features import FeatureCache

    tower = load_vision_tower(tiny_model_config.vision)
    paths = sorted((shapes_data.parent / "images").glob("[0-9]*.png"))[:5]
    calls = []
    orig = tower.forward
    tower.forward = lambda x: calls.append(len(x)) or orig(x)
    a, _ = FeatureCache(tower, root=tmp_path).features(paths, progress=False)
    b, _ = FeatureCache(tower, root=tmp_path).features(paths, progress=False)
    from llava_gm.data.features import image_key

    assert calls == [len({image_key(p) for p in paths})]  # identical images are encoded once
    assert calls[0] > 1
    assert all(torch.equal(a[p], b[p]) for p in paths)


def test_word_tokens_take_their_words_from_stage_one_and_embed_exactly_one_word(tmp_path, tiny_model_config, shapes_data):
    cfg = dataclasses.replace(tiny_model_config, projector=ProjectorConfig(word_tokens=True))
    r = run_stage(StageConfig(name="align", data=str(shapes_data), batch_size=8, word_loss=1.0), tmp_path / "a", model_cfg=cfg, **QUIET)
    model = load_checkpoint(r["checkpoint"])
    ids, targets = model.cfg.projector.word_ids, model.cfg.projector.word_targets
    tok = model.tokenizer
    rows = json.loads(shapes_data.read_text())
    per_sample = [{t for turn in row["conversations"] if turn["from"] == "gpt" for t in tok(turn["value"], add_special_tokens=False)["input_ids"]}
                  for row in rows]
    assert set(ids) == set().union(*per_sample)  # every answer token, no end-of-turn or special token
    assert set(targets) == {t for t in ids if sum(t in s for s in per_sample) < len(rows) / 2}
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert all(step["aux_words"] > 0 for step in log["steps"])  # the word loss was on
    # each image token is exactly one word's scaled embedding, the best-scoring one
    table = model.lm.get_input_embeddings()
    scale = float(getattr(table, "embed_scale", 1.0))
    words = table.weight[ids].float().detach()
    with torch.no_grad():
        out = model.to_words(torch.randn(2, 3, words.shape[1]))
        best = model._word_probs.argmax(-1)
        torch.testing.assert_close(out, words[best] * scale)
        assert torch.allclose(model._word_probs.sum(-1), torch.ones(2, 3))
    # gradients reach the projector through the softmax
    proj = torch.randn(1, 2, words.shape[1], requires_grad=True)
    model.to_words(proj).sum().backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    # stage 2 keeps stage 1's words
    r2 = run_stage(StageConfig(name="instruct", data=str(shapes_data), batch_size=8, max_samples=8), tmp_path / "b", init=r["checkpoint"], **QUIET)
    assert read_checkpoint_config(r2["checkpoint"])[0].projector.word_ids == ids
    from llava_gm.infer import Answerer  # and it answers through the KV-cache path

    row = rows[0]
    answer = Answerer.from_checkpoint(r2["checkpoint"]).answer([{"prompt": row["conversations"][0]["value"], "image": str(shapes_data.parent / row["image"])}], max_new_tokens=3, progress=False)
    assert isinstance(answer[0], str)


def test_word_loss_without_word_tokens_is_an_error_naming_the_setting(tmp_path, tiny_model_config, shapes_data):
    with pytest.raises(LlavaGMError, match="word_tokens"):
        run_stage(StageConfig(name="align", data=str(shapes_data), word_loss=1.0), tmp_path / "a", model_cfg=tiny_model_config, **QUIET)
    assert not (tmp_path / "a").exists()
