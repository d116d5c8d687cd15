"""``mdu-dist launch --executor slurm`` against a real Slurm (tests/slurm_cluster.py starts one on loopback).

- A 2-task MDU job of the tiny model, ranks joined by gloo, finishes; its log and TensorBoard events are right.
- Preemption: the job gets submitit's signal mid-run, rank 0 requeues it, the new allocation resumes from the
  latest complete checkpoint and ends with exactly the loss curve of the uninterrupted job.

About two minutes on two cores (cluster start ~5 s, two MDU jobs of 6 steps, one of them requeued), so it is
part of `make test` (.ci/run).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401 - the fixture
from test_trainer import TINY, UNLEARN_TAGS, _cli, _scalars

STEPS = ["train.max_steps=6", "train.save_every=2"]


def _launch(cluster, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("launch", "--config", "configs/llada_tiny.yaml", "--executor", "slurm", "--job", "unlearn",
                "--tasks-per-node", "2", "--partition", cluster.partition, "--timeout-min", "20", *extra, *TINY, *STEPS,
                f"train.output_dir={out}")


def _job_id(proc: subprocess.CompletedProcess) -> str:
    match = re.search(r"^job (\d+)", proc.stdout, re.M)
    assert match, proc.stdout
    return match.group(1)


def _wait_gone(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if not state.strip():
            return
        time.sleep(1)
    raise AssertionError(f"job {job_id} still queued/running after {timeout:.0f} s")


def _first_logged_step(run: Path) -> int:
    """First forget-loss step in the newest event file (each allocation's rank 0 writes its own)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    assert len(files) == 2, files  # one per allocation
    acc = EventAccumulator(str(files[-1]))
    acc.Reload()
    return min(e.step for e in acc.Scalars("unlearn/forget-loss"))


def _skip_requeue_delay(job_id: str, timeout: float = 60) -> None:
    """Slurm holds a requeued batch job for two minutes (its BeginTime); a real cluster waits, the test need
    not: once the job is back in the queue, make it eligible now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        if "Restarts=1" in info and "JobState=PENDING" in info:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} was not requeued within {timeout:.0f} s of the preemption signal")


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("whole")
    proc = _launch(slurm_cluster, out, "--wait")
    assert "TensorBoard: tensorboard --logdir" in proc.stdout and "finished: " in proc.stdout, proc.stdout
    return out


def test_two_task_job_runs_and_logs(uninterrupted):
    scalars = _scalars(uninterrupted)
    assert UNLEARN_TAGS <= set(scalars), f"missing TensorBoard tags: {UNLEARN_TAGS - set(scalars)}"
    assert [s for s, _ in scalars["unlearn/forget-loss"]] == [1, 2, 3, 4, 5, 6]
    logs = sorted((uninterrupted / "submitit").glob("*_log.out"))
    assert len(logs) == 2, logs  # one per task
    assert all("Job completed successfully" in p.read_text() for p in logs)
    assert (uninterrupted / "checkpoints" / "step-6").is_dir()


def test_preempted_job_requeues_resumes_and_matches(slurm_cluster, uninterrupted, tmp_path):  # noqa: F811
    out = tmp_path / "preempted"
    job_id = _job_id(_launch(slurm_cluster, out))
    mid = out / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while not mid.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mid.exists(), "the job never saved step 2"
    assert not (out / "checkpoints" / "step-6").exists(), "the job finished before it could be preempted"
    # What Slurm does on preemption with a grace time: SIGTERM, then submitit's USR2, to every task.
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _skip_requeue_delay(job_id)
    _wait_gone(job_id, timeout=400)

    rank0 = (out / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "Requeued job" in rank0 and "Job completed successfully" in rank0, rank0[-3000:]
    restarts = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts, restarts
    # The second allocation resumed from a checkpoint (step 2 or later) rather than starting over.
    resumed = _first_logged_step(out)
    assert resumed >= 3, f"the requeued job logged from step {resumed}: it did not resume"
    a, b = _scalars(uninterrupted), _scalars(out)
    for tag in ("unlearn/forget-loss", "unlearn/retain-loss", "grad-norm", "learning-rate"):
        # Steps after the resumed checkpoint are logged twice; the resumed run's value is the last one.
        assert dict(a[tag]) == dict(b[tag]), f"{tag}: requeued {dict(b[tag])} != uninterrupted {dict(a[tag])}"
