"""A training run in its own process, for tests that kill it, measure its memory or run it under torchrun.

usage: python tests/train_child.py JOB.json   (JOB: stage, output, model, and run_stage keyword arguments)
With "pause_after_save": seconds, it sleeps after each step checkpoint, so a test can kill it mid-stage.
With "fail_on_rank": [rank, n], that rank's n-th sample read fails as a bad image would (the other ranks read fine).
Prints one JSON line (rank 0): the result and this process's peak RSS in MiB.
"""

import json
import os
import resource
import sys
import time

from llava_gm.config import ModelConfig, SparseConfig, StageConfig, from_dict
from llava_gm.errors import LlavaGMError
from llava_gm.train.run import run_stage


def main(job_file: str) -> int:
    job = json.loads(open(job_file).read())
    pause = job.pop("pause_after_save", 0)
    if pause:
        from llava_gm.train import checkpoint

        save = checkpoint.StepCheckpoints.save

        def slow_save(self, *a, **k):
            out = save(self, *a, **k)
            time.sleep(pause)
            return out

        checkpoint.StepCheckpoints.save = slow_save
    fail = job.pop("fail_on_rank", None)
    if fail and int(os.environ.get("RANK", "0")) == fail[0]:
        from llava_gm.train import data

        read, calls = data.StageDataset.__getitem__, []

        def bad_read(self, i):
            calls.append(i)
            if len(calls) == fail[1]:
                raise LlavaGMError(f"sample {self.samples[i].id}: bad image (test: read on rank {fail[0]} only)")
            return read(self, i)

        data.StageDataset.__getitem__ = bad_read
    stage = from_dict(StageConfig, job.pop("stage"))
    model = from_dict(ModelConfig, job.pop("model")) if "model" in job else None
    if "sparse" in job:
        job["sparse"] = from_dict(SparseConfig, job["sparse"])
    try:
        r = run_stage(stage, job.pop("output"), model_cfg=model, progress=False, say=lambda m: None, **job)
    except LlavaGMError as e:
        print(f"llava-gm: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({**r, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
