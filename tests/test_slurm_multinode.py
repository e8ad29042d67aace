"""The multi-node launch on a real Slurm: `asft train` with training.num_nodes: 2 inside a job of two tasks starts one
torchrun agent per task through srun, and the agents meet at the job's first node (c10d rendezvous).

A one-node cluster cannot give a job two nodes, so the job has two tasks on one node: the launch, the rendezvous
and the two-rank training are those of a two-node run; only the placement of the tasks differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from asft.layout import TRAIN_SUMMARY as SUMMARY
from tests.slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401
from tests.test_training import _log, _spec

pytestmark = pytest.mark.slow


def test_two_torchrun_agents_meet_through_srun(
    slurm_cluster: SlurmCluster, small_demo: Path, tmp_path: Path, config: dict
) -> None:
    spec = _spec(config, "asft", num_nodes=2, num_processes=1, max_steps=2)
    out, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"export PATH={Path(sys.executable).parent}:$PATH ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1\n"
        f"exec asft train --model {small_demo / 'model'} --data {small_demo / 'data/train.jsonl'}"
        f" --spec '{json.dumps(spec)}' --out {out} --checkpoints {checkpoints}\n"
    )
    script.chmod(0o755)
    log = tmp_path / "slurm.log"
    submitted = slurm_cluster.run(
        "sbatch", "--wait", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--mem=6000", f"--output={log}",
        str(script), timeout=600,
    )  # fmt: skip
    text = log.read_text() if log.exists() else ""
    assert submitted.returncode == 0, submitted.stderr + text[-4000:]
    assert "'srun', '--ntasks=2'" in text and "--rdzv-backend=c10d" in text  # the launch `asft train` generated
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert [r["step"] for r in _log(out)] == [1, 2]
