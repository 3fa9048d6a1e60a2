"""Parameter / FLOP counts and routing statistics, on tiny LMs built in-process."""

import argparse
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from test_sparse_helpers import ids, image_mask, tiny_lm
from torch import nn

from llava_gm.analysis.cli import add_commands, format_report, model_report
from llava_gm.analysis.params_flops import (
    VisionSpec,
    count_params,
    flops_per_sample,
    lm_flops,
    lm_param_report_from_config,
    measured_flops,
    param_report,
    vision_spec_from_config,
)
from llava_gm.analysis.routing import collect_routing, summarize, write_report
from llava_gm.config import ModelConfig, SparseConfig
from llava_gm.model.sparse import modality, record_routing, sparsify

D, I, V = 64, 128, 97  # tiny LM: hidden, intermediate, vocab
FFN = 3 * D * I


def _sparse(cfg, **kw):
    lm = tiny_lm(**kw)
    sparsify(lm, cfg)
    return lm


# ---- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,extra,inactive", [
    (SparseConfig(kind="moe"), 2 * (3 * FFN + 4 * D), 2 * 2 * FFN),  # 2 layers: 3 more experts + router; 2 of 4 idle
    (SparseConfig(kind="evf"), 2 * (FFN + 2 * D), 2 * FFN),  # 2 layers: a second FFN + router; one of 2 idle
])
def test_param_counts(cfg, extra, inactive):
    dense = count_params(tiny_lm())
    lm = _sparse(cfg)
    r = param_report(lm)
    assert r["total"] == dense + extra and r["activated"] == r["total"] - inactive and r["sparse_layers"] == [0, 2]
    assert lm_param_report_from_config(lm.config, cfg) == r  # meta-device count from the config alone


def test_gemma_2b_counts_from_config():
    from transformers import GemmaConfig

    c = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                    num_key_value_heads=1, head_dim=256)
    assert lm_param_report_from_config(c)["total"] == 2_506_172_416  # Gemma-2B
    moe = lm_param_report_from_config(c, SparseConfig(kind="moe"))
    ffn = 3 * 2048 * 16384
    assert moe["total"] == 2_506_172_416 + 9 * (3 * ffn + 4 * 2048)
    assert moe["activated"] == moe["total"] - 9 * 2 * ffn


# ---- FLOPs ---------------------------------------------------------------------------------------
def test_lm_flops_by_hand_and_measured():
    lm = tiny_lm(attn="eager", window=64)  # eager attention: torch counts the QK and AV products
    t = 12
    per_layer = 2 * t * (D * 64 + 2 * D * 32 + 64 * D) + 2 * 2 * t * t * 64 + 2 * t * FFN
    by_hand = 4 * per_layer + 2 * t * D * V
    assert lm_flops(lm.config, None, 4, 8)["total"] == by_hand
    assert measured_flops(lm, ids(1, t)) == by_hand
    # MoE top-2 (dropless): 2 FFNs + router in layers 0 and 2; EVF text-only: the dense count
    moe_cfg = SparseConfig(kind="moe", capacity_factor_eval=None)
    moe = copy.deepcopy(lm)
    sparsify(moe, moe_cfg)
    want = by_hand + 2 * (2 * t * FFN + 2 * t * D * 4)
    assert lm_flops(lm.config, moe_cfg, 4, 8)["total"] == want == measured_flops(moe, ids(1, t))
    evf_cfg = SparseConfig(kind="evf")
    evf = copy.deepcopy(lm)
    sparsify(evf, evf_cfg)
    assert lm_flops(lm.config, evf_cfg, 0, t)["total"] == by_hand == measured_flops(evf, ids(1, t))
    img = image_mask(1, t, n=4)
    with modality(evf, img, img.any(1)):
        assert lm_flops(lm.config, evf_cfg, 4, 8)["total"] == by_hand + 2 * 2 * t * D * 2 == measured_flops(evf, ids(1, t))


def test_sliding_window_context():
    lm = tiny_lm(window=4)
    full = tiny_lm(window=64)
    diff = lm_flops(full.config, None, 0, 12)["attention_scores"] - lm_flops(lm.config, None, 0, 12)["attention_scores"]
    sliding = sum(t == "sliding_attention" for t in lm.config.layer_types)
    assert diff == sliding * 2 * 2 * 12 * (12 - 4) * 2 * 32


def test_vision_spec_matches_measured_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=7)
    model = CLIPVisionModel(cfg).eval()
    model.config._attn_implementation = "eager"
    spec = vision_spec_from_config(cfg, select_layer=-1)  # all 3 layers, as the measured full forward runs
    assert spec.tokens == 17 and vision_spec_from_config(cfg).layers == 2  # LLaVA's penultimate layer: 2 layers run
    assert spec.image_flops() == measured_flops(model, torch.zeros(1, 3, 28, 28))


def test_flops_per_sample_adds_up():
    lm = tiny_lm()
    spec = VisionSpec(hidden=32, layers=2, intermediate=64, patch=7, image_size=28)
    cfg = SparseConfig(kind="moe")
    r = flops_per_sample(lm.config, cfg, spec, image_tokens=16, text_tokens=20, projector_flops=1000)
    assert r["total"] == spec.image_flops() + 1000 + lm_flops(lm.config, cfg, 16, 20)["total"]
    t = flops_per_sample(lm.config, cfg, spec, image_tokens=0, text_tokens=20, projector_flops=1000)
    assert t["vision"] == 0 and t["projector"] == 0 and t["total"] == lm_flops(lm.config, cfg, 0, 20)["total"]
    assert VisionSpec(flops=5e9).image_flops() == 5e9


# ---- routing statistics ---------------------------------------------------------------------------
class _Wrapper(nn.Module):
    """A stand-in for the LLaVA model: .lm, and a forward that sets the modality."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, image_mask):
        with modality(self.lm, image_mask, image_mask.any(1)):
            return self.lm(input_ids)


@pytest.mark.parametrize("kind", ["moe", "evf"])
def test_routing_report(tmp_path, kind):
    model = _Wrapper(_sparse(SparseConfig(kind=kind))).train()
    batches = [{"input_ids": ids(2, 16, seed=s), "image_mask": image_mask(2, 16, n=8)} for s in range(3)]
    stats = collect_routing(model, batches)
    assert model.training  # mode restored
    s = summarize(stats)
    assert list(s["layers"]) == ["0", "2"]
    e = s["layers"]["0"]
    assert e["image"]["tokens"] == 3 * 16 and e["text"]["tokens"] == 3 * 16 and e["all"]["tokens"] == 96
    for m in ("text", "image", "all"):
        assert abs(sum(e[m]["load"]) - 1) < 1e-9 and abs(sum(e[m]["mean_prob"]) - 1) < 1e-6
        assert 0 <= e[m]["drop_rate"] <= 1 and 0 <= e[m]["entropy_norm"] <= 1
    paths = write_report(stats, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["layers"]["2"]["all"]["tokens"] == 96
    for key in ("load_png", "drop_entropy_png"):
        assert paths[key].stat().st_size > 1000


def test_evf_img_gbpr_routing_splits_by_modality():
    lm = _sparse(SparseConfig(kind="evf", allocation="img_gbpr"))
    with record_routing(lm) as stats:
        img = image_mask(2, 16, n=6)
        with modality(lm, img, img.any(1)):
            lm(ids(2, 16))
    e = summarize(stats)["layers"]["0"]
    assert e["image"]["load"] == [0.0, 1.0] and e["text"]["load"] == [1.0, 0.0] and e["all"]["drop_rate"] == 0


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_parsers_and_model_report():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["routing", "--checkpoint", "c", "--data", "d.json", "--output", "o"])
    assert a.func.__name__ == "cmd_routing" and a.batch_size == 8
    a = parser.parse_args(["stats", "--checkpoint", "c", "--text-tokens", "32"])
    assert a.func.__name__ == "cmd_stats" and a.text_tokens == 32

    cfg = ModelConfig(sparse=SparseConfig(kind="moe"))
    lm = _sparse(cfg.sparse)
    proj = nn.Sequential(nn.Linear(32, D), nn.GELU(), nn.Linear(D, D))
    model = SimpleNamespace(lm=lm, projector=proj, vision_tower=None, num_image_tokens=16, vision_tokens=16, vision_dim=32,
                            cfg=cfg, sparse_layers=[0, 2])
    r = model_report(model, text_tokens=20)
    assert r["params"]["parts"]["projector"] == count_params(proj)
    assert r["flops_with_image"]["projector"] == 2 * 16 * (32 * D + D * D)
    assert r["flops_with_image"]["language"] == lm_flops(lm.config, cfg.sparse, 16, 20)
    assert "GFLOPs" in format_report(r)


def test_cli_handlers_on_a_sparse_checkpoint(tmp_path, tiny_model_config, shapes_data, capsys):
    """End to end through the lead's loader and data pipeline: build -> save -> `stats` and `routing`."""
    import dataclasses

    from llava_gm.analysis.cli import cmd_routing, cmd_stats
    from llava_gm.model.build import build_model, save_checkpoint

    cfg = dataclasses.replace(tiny_model_config, sparse=SparseConfig(kind="evf"))
    model = build_model(cfg)
    model.trained_keys = {n for n, _ in model.named_parameters() if ".mlp." in n}
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    cmd_stats(argparse.Namespace(checkpoint=str(ckpt), text_tokens=32, image_tokens=None, json=str(tmp_path / "stats.json")))
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["sparse"] == {"kind": "evf", "layers": [0, 2]} and report["flops_with_image"]["vision"] > 0
    out = tmp_path / "routing"
    cmd_routing(argparse.Namespace(checkpoint=str(ckpt), data=str(shapes_data), image_folder="", output=str(out), max_samples=8, batch_size=4))
    summary = json.loads((out / "routing.json").read_text())["summary"]
    assert summary["layers"]["0"]["image"]["tokens"] > 0 and (out / "routing_load.png").is_file()
    printed = capsys.readouterr().out
    assert "GFLOPs" in printed and "layer 0: load text" in printed
