"""One rank of `llava-gm plan` against measured memory on 2 processes (DDP or FSDP2, gloo): run under torchrun.

usage: python tests/plan_child.py JOB.json   (JOB: model, stage, batch, seq_len, labels, strategy ddp|fsdp)
Rank 0 prints one JSON line: the plan's and the measured per-rank peak.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from llava_gm.analysis.memory_meter import measure_training_peak, prepare_stage
from llava_gm.analysis.plan import Setup, plan_recipe
from llava_gm.config import ModelConfig, RecipeConfig, StageConfig, from_dict
from llava_gm.model.build import build_model


def main(job_file: str) -> int:
    job = json.loads(open(job_file).read())
    dist.init_process_group("gloo")
    cfg, stage = from_dict(ModelConfig, job["model"]), from_dict(StageConfig, job["stage"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.vision_tower = None
    prepare_stage(model, stage)
    strategy = job.get("strategy", "ddp")
    measured = measure_training_peak(model, stage, job["batch"], job["seq_len"], job["labels"], ddp=strategy == "ddp",
                                     fsdp=strategy == "fsdp")
    setup = Setup(gpus=dist.get_world_size(), strategy=strategy, features="cache", batch_size=job["batch"], seq_len=job["seq_len"],
                  label_tokens=job["labels"])
    plan = plan_recipe(RecipeConfig(model=cfg, stages=[stage]), setup)[0]
    if dist.get_rank() == 0:
        print(json.dumps({"plan": plan.peak, "measured": measured["peak"], "gradients": plan.bytes["gradients"]}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
