"""Child processes of the tests: a job file for a script in tests/, run as one process or under torchrun (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def write_job(job: dict, folder: Path, name: str) -> Path:
    path = Path(folder) / name
    path.write_text(json.dumps(job))
    return path


def command(script: str, job_file: Path, processes: int = 0) -> list:
    """`python tests/SCRIPT JOB`, or the same under `torchrun --standalone` with `processes` ranks."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes else []
    return [sys.executable, *launcher, str(HERE / script), str(job_file)]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}


def run(script: str, job: dict, folder: Path, name: str, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, write_job(job, folder, name), processes), env=environment(), capture_output=True,
                          text=True, timeout=timeout)


def result(script: str, job: dict, folder: Path, name: str, processes: int = 2, timeout: float = 300) -> dict:
    """The job's last printed JSON line (rank 0's), after checking that it succeeded."""
    done = run(script, job, folder, name, processes, timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
