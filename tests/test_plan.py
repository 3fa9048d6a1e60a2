"""`llava-gm plan`: exact parameter counts from meta-device models, and the predicted peak against measured training
steps of a tiny model (within 15%)."""

import dataclasses
import json

import pytest
import torch

from llava_gm.analysis.memory_meter import LiveBytes, measure_training_peak, prepare_stage
from llava_gm.analysis.plan import Setup, load_config, plan_recipe
from llava_gm.cli import main
from llava_gm.config import RecipeConfig, SparseConfig, StageConfig, load_yaml
from llava_gm.errors import LlavaGMError
from llava_gm.model.build import apply_sparse, build_model

B, T, LABELS = 4, 96, 24


@pytest.mark.parametrize("stage", [StageConfig(name="align"), StageConfig(name="instruct"),
                                   StageConfig(name="instruct", train_embeddings=False), StageConfig(name="sparsify")],
                         ids=["align", "instruct", "instruct-frozen-embeddings", "sparsify-moe"])
def test_plan_matches_measured_peak(tiny_model_config, stage):
    cfg = dataclasses.replace(tiny_model_config, sparse=SparseConfig(kind="moe"))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, sparse=SparseConfig(kind="none")))
    model.vision_tower = None
    if stage.name == "sparsify":
        model.cfg.sparse = cfg.sparse
        apply_sparse(model)
    trainable = prepare_stage(model, stage)
    measured = measure_training_peak(model, stage, B, T, LABELS)
    setup = Setup(gpus=1, features="cache", batch_size=B, seq_len=T, label_tokens=LABELS)
    plan = plan_recipe(RecipeConfig(model=cfg, stages=[stage]), setup)[0]
    params = dict(model.named_parameters())
    assert plan.trainable == sum(params[n].numel() for n in trainable)  # exact: the trainer's own plan_stage
    assert plan.trainable + plan.frozen == sum(p.numel() for n, p in params.items())
    assert plan.bytes["weights"] == measured["weights"]  # fp32 trainable + bf16 frozen, as prepare_stage stores them
    assert abs(plan.peak / measured["peak"] - 1) < 0.15, (plan.peak, measured["peak"])


def test_live_bytes_counts_new_storage_once():
    w = torch.randn(1000, 100)
    with LiveBytes() as meter:
        y = w.t()  # a view: nothing new
        z = torch.zeros(250, 100)  # 100 kB
        z.add_(1)  # in place: nothing new
        del z
        a = torch.ones(500, 100)  # 200 kB, after z is gone
    assert meter.peak == 200_000 and meter.now == 200_000
    del y, a


def test_shipped_recipe_offline_and_fsdp_shards_states(tmp_path, capsys):
    recipe = load_yaml(RecipeConfig, "recipes/llava-gm-2b.yaml")
    # the shipped snapshot of google/gemma-2b gives its published size exactly
    from llava_gm.analysis.params_flops import lm_param_report_from_config

    assert lm_param_report_from_config(load_config("google/gemma-2b"))["total"] == 2_506_172_416
    recipe = dataclasses.replace(recipe, stages=[s for s in recipe.stages if s.name == "align"])
    ddp = plan_recipe(recipe, Setup(gpus=8, gpu_memory_gb=80, strategy="ddp"))[0]
    fsdp = plan_recipe(recipe, Setup(gpus=8, gpu_memory_gb=80, strategy="fsdp"))[0]
    assert ddp.batch == 4 and ddp.accumulation == 1  # the recipe's global batch of 32 over 8 GPUs
    for k in ("weights", "optimizer"):
        assert fsdp.bytes[k] == pytest.approx(ddp.bytes[k] / 8)
    assert fsdp.bytes["gradients"] == pytest.approx(ddp.bytes["gradients"] / 2 / 8)  # DDP's buckets: a second copy
    assert ddp.max_batch_checkpointed >= ddp.max_batch >= 1
    assert ddp.peak_checkpointed < ddp.peak
    # the command: a table and a JSON plan, no network
    out = tmp_path / "plan.json"
    assert main(["plan", "--recipe", "recipes/llava-gemma-2b-dino.yaml", "--gpus", "8", "--gpu-memory", "80", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "align" in text and "instruct" in text and "max batch" in text
    assert [s["stage"] for s in json.loads(out.read_text())["stages"]] == ["align", "instruct"]


def test_unknown_backbone_is_one_clear_error(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("model:\n  language: {name: someone/unknown-lm}\nstages:\n  - {name: align}\n")
    with pytest.raises(LlavaGMError, match="--lm-config"):
        load_config("someone/unknown-lm")
    assert main(["plan", "--recipe", str(r)]) == 2
    assert "someone/unknown-lm" in capsys.readouterr().err


@pytest.mark.parametrize("stage,strategy", [(StageConfig(name="align"), "ddp"), (StageConfig(name="instruct", train_embeddings=False), "ddp"),
                                            (StageConfig(name="instruct", train_embeddings=False), "fsdp")],
                         ids=["align-ddp", "instruct-ddp", "instruct-fsdp"])
def test_plan_matches_measured_peak_on_two_processes(tmp_path, tiny_model_config, stage, strategy):
    """Each of 2 processes (gloo) holds the plan's per-GPU peak within 15%: DDP with its gradient buckets (a second
    fp32 copy of the gradients), FSDP2 with its shards and the layers it gathers."""
    import launch
    from llava_gm.config import to_dict

    r = launch.result("plan_child.py", {"model": to_dict(tiny_model_config), "stage": to_dict(stage), "batch": B, "seq_len": T,
                                        "labels": LABELS, "strategy": strategy}, tmp_path, "job.json")
    print(r)
    assert abs(r["plan"] / r["measured"] - 1) < 0.15, r
