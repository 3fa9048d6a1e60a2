"""`precision: auto` on a CPU: decided by a measurement made once per host and cached."""

import json

import pytest
import torch

from llava_gm import precision
from llava_gm.errors import LlavaGMError


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_GM_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAVA_GM_PRECISION", raising=False)
    precision._cpu_auto_bf16.cache_clear()
    yield tmp_path
    precision._cpu_auto_bf16.cache_clear()


def test_decision_needs_bf16_clearly_faster():
    assert precision.decide({"fp32": 0.2, "bf16": 0.5}) == "bf16"  # an AVX-512-BF16 host where bf16 wins (EPYC)
    assert precision.decide({"fp32": 0.2, "bf16": 0.1}) == "fp32"  # one where it loses
    assert precision.decide({"fp32": 0.2, "bf16": 0.2 * precision.BF16_MIN_SPEEDUP * 0.99}) == "fp32"  # within the margin


def test_measured_once_then_read_from_the_cache(fresh_cache, monkeypatch):
    calls, said = [], []

    def fake():
        calls.append(1)
        return {"fp32": 0.18, "bf16": 0.42}

    first = precision.cpu_auto_choice(measure=fake, say=said.append)
    second = precision.cpu_auto_choice(measure=fake, say=said.append)
    assert len(calls) == 1 and first["fresh"] and not second["fresh"]
    assert first["choice"] == second["choice"] == "bf16"
    assert "bf16 0.42 vs fp32 0.18" in said[0] and "measured now" in said[0] and "cached" in said[1]
    stored = json.loads((fresh_cache / "precision.json").read_text())
    assert stored[precision.host_key()]["choice"] == "bf16"
    # another torch version (or CPU) is another host: measured again
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    third = precision.cpu_auto_choice(measure=lambda: {"fp32": 0.3, "bf16": 0.1}, say=said.append)
    assert third["fresh"] and third["choice"] == "fp32" and len(json.loads((fresh_cache / "precision.json").read_text())) == 2
    # oneDNN capped below AMX computes as a host without it: measured again too
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert precision.cpu_auto_choice(measure=fake, say=said.append)["fresh"]


def test_a_broken_cache_file_is_measured_over(fresh_cache):
    (fresh_cache / "precision.json").write_text("{not json")
    r = precision.cpu_auto_choice(measure=lambda: {"fp32": 0.3, "bf16": 0.1}, say=lambda m: None)
    assert r["fresh"] and r["choice"] == "fp32"


def test_use_bf16_on_cpu_follows_the_cached_choice_and_the_override(fresh_cache, monkeypatch):
    monkeypatch.setattr(precision, "measure_matmul", lambda: {"fp32": 0.2, "bf16": 1.5})
    cpu = torch.device("cpu")
    assert precision.use_bf16(cpu) is True and precision.compute_dtype(cpu) == torch.bfloat16
    assert precision.use_bf16(cpu, "fp32") is False  # a recipe's explicit choice wins
    monkeypatch.setenv("LLAVA_GM_PRECISION", "fp32")
    assert precision.use_bf16(cpu) is False
    monkeypatch.setenv("LLAVA_GM_PRECISION", "fp16")
    with pytest.raises(LlavaGMError, match="LLAVA_GM_PRECISION"):
        precision.use_bf16(cpu)
    with pytest.raises(LlavaGMError, match="precision 'half'"):
        precision.use_bf16(cpu, "half")


def test_the_real_measurement_is_short_and_positive():
    figures = precision.measure_matmul(repeats=1)
    assert figures["fp32"] > 0 and figures["bf16"] > 0
