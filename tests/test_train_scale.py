"""Training at scale on tiny models: step checkpoints and exact resume, a non-finite stop, streamed data, DDP."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_gm.config import StageConfig, to_dict
from llava_gm.errors import LlavaGMError
from llava_gm.train.data import epoch_batches, rank_slice
from llava_gm.train.run import run_stage

QUIET = dict(progress=False, say=lambda m: None)
CHILD = Path(__file__).parent / "train_child.py"
ROOT = Path(__file__).parent.parent


def _child(job: dict, tmp_path: Path, name: str = "job.json", torchrun: int = 0, **popen):
    (tmp_path / name).write_text(json.dumps(job))
    cmd = [sys.executable, str(CHILD), str(tmp_path / name)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port", "0"] + cmd[1:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def test_epoch_batches_are_a_function_of_seed_and_epoch_and_split_across_ranks():
    lengths = [5, 3, 9, 1, 7, 2, 8, 4, 6, 10, 11]
    a = epoch_batches(lengths, 4, seed=3, epoch=1)
    assert a == epoch_batches(lengths, 4, seed=3, epoch=1) and a != epoch_batches(lengths, 4, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))  # every sample once per epoch
    assert [rank_slice(b, 0, 2) + rank_slice(b, 1, 2) for b in a] == a  # ranks' slices rebuild the global batch
    assert all(len(b) >= 2 for b in epoch_batches(lengths, 5, seed=0, epoch=0, world=2))  # no rank without a sample


def test_killed_run_resumes_to_bitwise_equal_weights_past_a_damaged_checkpoint(tmp_path, tiny_model_config, shapes_data):
    stage = StageConfig(name="instruct", data=str(shapes_data), lr=3e-3, batch_size=4, grad_accum=2, epochs=4, warmup_ratio=0.2,
                        precision="fp32")
    whole = run_stage(stage, tmp_path / "whole", model_cfg=tiny_model_config, **QUIET)
    assert whole["steps"] == 12
    out = tmp_path / "run" / "instruct"
    job = {"stage": to_dict(stage), "output": str(out), "model": to_dict(tiny_model_config), "save_every": 2, "keep_last": 3,
           "pause_after_save": 0.5}
    child = _child(job, tmp_path)
    steps = out.with_name("instruct.steps")
    deadline = time.time() + 120
    while len(list(steps.glob("step-*"))) < 3 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = sorted(steps.glob("step-*"))
    assert len(saved) == 3 and not out.exists(), (saved, child.stderr.read())
    # a run killed mid-save leaves atomic_dir temporaries; the newest checkpoint is damaged
    (steps / ".step-00000009.tmp1").mkdir()
    (out.parent / ".instruct.tmp2").mkdir()
    (saved[-1] / "weights.safetensors").write_bytes((saved[-1] / "weights.safetensors").read_bytes()[:-100])
    # started again without --resume: told how to continue, nothing touched
    with pytest.raises(LlavaGMError, match=r"interrupted run .* continue it with: llava-gm train X --resume"):
        run_stage(stage, out, model_cfg=tiny_model_config, resume_command="llava-gm train X", **QUIET)
    said = []
    r = run_stage(stage, out, model_cfg=tiny_model_config, resume=True, save_every=2, progress=False, say=said.append)
    assert any("damaged" in m and saved[-1].name in m for m in said), said
    assert any(f"resuming from {saved[-2]}" in m for m in said), said
    a, b = _weights(whole["checkpoint"]), _weights(r["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    log_a = json.loads((Path(whole["checkpoint"]) / "train_log.json").read_text())["steps"]
    log_b = json.loads((out / "train_log.json").read_text())["steps"]
    assert [s["loss"] for s in log_a] == [s["loss"] for s in log_b]
    # nothing left behind: step checkpoints and temporaries are gone
    assert not steps.exists() and [p.name for p in out.parent.iterdir()] == ["instruct"]
    # run again with --resume: the finished stage is reused, without --resume the error names the command
    assert run_stage(stage, out, model_cfg=tiny_model_config, resume=True, **QUIET)["checkpoint"] == str(out)
    with pytest.raises(LlavaGMError, match=r"exists .* continue the run from there: llava-gm train X --resume"):
        run_stage(stage, out, model_cfg=tiny_model_config, resume_command="llava-gm train X", **QUIET)


def test_non_finite_loss_stops_naming_step_and_samples_and_resumes_with_a_lower_rate(tmp_path, tiny_model_config, shapes_data, monkeypatch):
    from llava_gm.model.llava import LlavaGM

    forward, calls = LlavaGM.forward, []

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        calls.append(1)
        if len(calls) == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlavaGM, "forward", poisoned)
    stage = StageConfig(name="align", data=str(shapes_data), lr=1e-2, batch_size=4, epochs=2)
    out = tmp_path / "a"
    with pytest.raises(LlavaGMError, match=r"non-finite loss \(nan\).* at step 5 of 12, on samples s\d+, s\d+, s\d+, s\d+;.*"
                                           r"a.steps/step-00000004; continue from it with a lower rate: C --resume --lr 0.001"):
        run_stage(stage, out, model_cfg=tiny_model_config, save_every=2, resume_command="C", **QUIET)
    assert not out.exists()  # no checkpoint that looks complete
    monkeypatch.setattr(LlavaGM, "forward", forward)
    said = []
    r = run_stage(dataclasses.replace(stage, lr=1e-3), out, model_cfg=tiny_model_config, resume=True, save_every=2,
                  progress=False, say=said.append)
    assert any("resuming with learning rate(s) [0.001] instead of [0.01]" in m for m in said), said
    steps = json.loads((out / "train_log.json").read_text())["steps"]
    assert r["steps"] == len(steps) == 12 and all(torch.isfinite(v).all() for v in _weights(out).values())
    assert steps[4]["lr"] < steps[3]["lr"] / 5  # the new rate took over at step 5


def test_a_second_run_into_the_same_output_fails_naming_the_first(tmp_path, tiny_model_config, shapes_data):
    from llava_gm.train.checkpoint import StepCheckpoints

    holder = StepCheckpoints(tmp_path / "o")
    holder.acquire()
    with pytest.raises(LlavaGMError, match=rf"another llava-gm train \(pid {os.getpid()}\) is writing"):
        run_stage(StageConfig(name="align", data=str(shapes_data)), tmp_path / "o", model_cfg=tiny_model_config, **QUIET)
    holder.release()
