"""Every multi-node job on a real Slurm of two nodes on this machine (tests/slurm_cluster.py: each slurmd in a
network namespace of its own, with its own address and host name; the node list is ``mdunode[01-02]`` and the
master's name resolves only inside the cluster).

- ``launch --nodes 2`` of 2 x 2 tasks, TP=2 inside each node and DP=2 across them: the loss curve and the final
  weights are bitwise those of the same layout on one node (4 local processes), and within the layout tests'
  1e-4 of TP=1 x DP=2. (No single-process run has this curve: each data-parallel replica draws its own masks.)
- TP=2 x PP=2 with pipeline stage 0 on one node and stage 1 on the other: within 1e-4 of the single process.
- The 2-node job requeued by ``scontrol requeue`` mid-run resumes from its latest complete checkpoint and ends
  with exactly the uninterrupted curve.
- ``launch --job eval`` on 2 nodes (DP=4): the same eval.json numbers as one process, bit for bit.
- ``launchers/slurm/unlearn_{llada_8b,dream_7b}.sbatch``, edited as a user would (tiny config, CPU, 2 nodes x
  2 tasks), submitted with ``sbatch`` and run to the end.

The first test (cluster start, one 2-node job, its two one-node references) is in the default tier; the others
are marked slow (several 4-rank jobs on two cores). docs/multinode.md has the measured times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster_2nodes  # noqa: F401 - the fixture
from test_eval_run import FAST_EVAL
from test_launch_slurm import _first_logged_step, _job_id, _skip_requeue_delay, _wait_gone
from test_trainer import TINY, UNLEARN_TAGS, _cli, _final_weights, _scalars

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["train.max_steps=6", "train.save_every=2"]
CURVES = ("unlearn/forget-loss", "unlearn/retain-loss", "grad-norm", "learning-rate")


def _launch(cluster, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
    return _cli("launch", "--config", "configs/llada_tiny.yaml", "--executor", "slurm", "--nodes", "2",
                "--tasks-per-node", "2", "--partition", cluster.partition, "--timeout-min", "20",
                *(["--wait"] if wait else []), *args)


def _placement(run: Path) -> dict[int, str]:
    """global rank -> the node it ran on, from submitit's per-task logs."""
    where = {}
    for log in (run / "submitit").glob("*_log.out"):
        for host, rank in re.findall(r"JobEnvironment\(.*hostname=(\S+?),.*global_rank=(\d+)\(", log.read_text()):
            where[int(rank)] = host
    return where


def _assert_curves(got: Path, want: Path, tol: float) -> None:
    # dict: a requeued run logs the steps after its checkpoint twice; the resumed allocation's value is the last.
    a, b = ({tag: dict(curves[tag]) for tag in CURVES} for curves in (_scalars(want), _scalars(got)))
    for tag in CURVES:
        assert sorted(a[tag]) == sorted(b[tag]) == [1, 2, 3, 4, 5, 6], (tag, a[tag], b[tag])
        for step, x in a[tag].items():
            y = b[tag][step]
            assert abs(x - y) <= tol * max(1.0, abs(x)), f"{tag} step {step}: {y} != {x} (tolerance {tol})"


def _assert_weights(got: Path, want: Path, tol: float) -> None:
    a, b = _final_weights(want, 6), _final_weights(got, 6)
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert (b[key] - tensor).abs().max().item() <= tol, f"weight {key} differs"


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    # Not under pytest's basetemp: on a machine shared by several pytest sessions, a newer one prunes older
    # basetemps, and these runs last minutes.
    root = Path(tempfile.mkdtemp(prefix="mdu-multinode-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tmp_path(scratch, request) -> Path:
    """This module's tmp_path: a directory of its own under ``scratch``."""
    path = scratch / re.sub(r"\W", "_", request.node.name)
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def tp2_dp2(slurm_cluster_2nodes, scratch) -> Path:  # noqa: F811
    out = scratch / "tp2-dp2-2nodes"
    proc = _launch(slurm_cluster_2nodes, "--job", "unlearn", *TINY, *STEPS, "parallel.tensor=2",
                   f"train.output_dir={out}")
    assert "finished: " in proc.stdout, proc.stdout
    return out


def test_tp2_inside_nodes_dp2_across_them_equals_one_node(tp2_dp2, tmp_path):
    # Ranks 0-1 (one TP group, DP replica 0) on the first node, 2-3 on the second: the DP all-reduce and the
    # rendezvous cross the nodes, the TP all-reduces stay inside them.
    assert _placement(tp2_dp2) == {0: "mdunode01", 1: "mdunode01", 2: "mdunode02", 3: "mdunode02"}
    logs = sorted((tp2_dp2 / "submitit").glob("*_log.out"))
    assert len(logs) == 4 and all("Job completed successfully" in p.read_text() for p in logs)
    assert UNLEARN_TAGS <= set(_scalars(tp2_dp2))
    one_node, tp1 = tmp_path / "one-node", tmp_path / "tp1-dp2"
    _cli("unlearn", "--nproc", "4", "--config", "configs/llada_tiny.yaml", *TINY, *STEPS, "parallel.tensor=2",
         f"train.output_dir={one_node}")
    _cli("unlearn", "--nproc", "2", "--config", "configs/llada_tiny.yaml", *TINY, *STEPS, f"train.output_dir={tp1}")
    _assert_curves(tp2_dp2, one_node, tol=0.0)
    _assert_weights(tp2_dp2, one_node, tol=0.0)
    _assert_curves(tp2_dp2, tp1, tol=1e-4)
    _assert_weights(tp2_dp2, tp1, tol=1e-4)


@pytest.mark.slow
def test_pipeline_stages_on_different_nodes_match_one_process(slurm_cluster_2nodes, tmp_path):  # noqa: F811
    run, single = tmp_path / "tp2-pp2", tmp_path / "single"
    proc = _launch(slurm_cluster_2nodes, "--job", "unlearn", *TINY, *STEPS, "parallel.tensor=2",
                   "parallel.pipeline=2", f"train.output_dir={run}")
    # megatron's rank order (tp-cp-ep-dp-pp): stage 0 is ranks 0-1, stage 1 ranks 2-3.
    assert _placement(run) == {0: "mdunode01", 1: "mdunode01", 2: "mdunode02", 3: "mdunode02"}
    # The log launch names is the one with the progress and metrics: rank 2's, on the second node.
    log = re.search(r"^job \d+: log \S+ \(errors (\S+)\)", proc.stdout, re.M)
    assert log and log.group(1).endswith("_2_log.err"), proc.stdout
    assert "forget-loss=" in Path(log.group(1)).read_text()
    _cli("unlearn", "--config", "configs/llada_tiny.yaml", *TINY, *STEPS, f"train.output_dir={single}")
    _assert_curves(run, single, tol=1e-4)
    _assert_weights(run, single, tol=1e-4)


@pytest.mark.slow
def test_requeued_two_node_job_resumes_and_matches(slurm_cluster_2nodes, tp2_dp2, tmp_path):  # noqa: F811
    out = tmp_path / "requeued"
    job_id = _job_id(_launch(slurm_cluster_2nodes, "--job", "unlearn", *TINY, *STEPS, "parallel.tensor=2",
                             f"train.output_dir={out}", wait=False))
    mid = out / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while not mid.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mid.exists(), "the job never saved step 2"
    assert not (out / "checkpoints" / "step-6").exists(), "the job finished before it could be requeued"
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _skip_requeue_delay(job_id)
    _wait_gone(job_id, timeout=400)

    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in info and "JobState=COMPLETED" in info, info
    assert _first_logged_step(out) >= 3, "the requeued job did not resume from a checkpoint"
    _assert_curves(out, tp2_dp2, tol=0.0)
    _assert_weights(out, tp2_dp2, tol=0.0)


@pytest.mark.slow
def test_two_node_eval_equals_one_process(slurm_cluster_2nodes, tp2_dp2, tmp_path):  # noqa: F811
    checkpoint = tp2_dp2 / "checkpoints" / "step-6" / "model"
    single, multi = tmp_path / "single", tmp_path / "two-nodes"
    _cli("eval", "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL, f"eval.checkpoint={checkpoint}",
         f"eval.output_dir={single}")
    _launch(slurm_cluster_2nodes, "--job", "eval", *TINY, *FAST_EVAL, f"eval.checkpoint={checkpoint}",
            f"eval.output_dir={multi}")
    assert len(list((multi / "submitit").glob("*_log.out"))) == 4  # its logs beside its output
    want, got = (json.loads((d / "eval.json").read_text()) for d in (single, multi))
    assert got["layout"] == {"tensor": 1, "data": 4}
    assert got["items"] == want["items"] and got["metrics"] == want["metrics"]


@pytest.mark.slow
def test_a_run_directory_on_node_local_disk_is_refused_naming_the_nodes(slurm_cluster_2nodes, tmp_path):  # noqa: F811
    run = slurm_cluster_2nodes.node_local / "run"  # each node writes its own copy: no checkpoint could resume
    proc = _cli("launch", "--config", "configs/llada_tiny.yaml", "--executor", "slurm", "--nodes", "2",
                "--tasks-per-node", "2", "--partition", slurm_cluster_2nodes.partition, "--timeout-min", "20",
                "--wait", *TINY, *STEPS, "parallel.tensor=2", f"train.output_dir={run}",
                f"launch.folder={tmp_path / 'submitit'}", check=False)
    failed = re.search(r"^job (\d+) failed .*; see (\S+)$", proc.stdout, re.M)
    assert proc.returncode == 1 and failed, proc.stdout + proc.stderr
    assert failed.group(2) == f"{tmp_path / 'submitit'}/{failed.group(1)}_*_log.err"  # every task's log
    want = (f"train.output_dir={run} is not one directory shared by every node: rank 0 (mdunode01) wrote a file "
            "there that rank(s) 2, 3 (mdunode02) do not see")
    for task in range(4):  # every rank stops with the same line, none hangs in a collective
        assert want in next((tmp_path / "submitit").glob(f"*_{task}_log.err")).read_text()


def _edited_sbatch(script: str, config: str, tmp_path: Path) -> Path:
    """The launcher as a user edits it for this cluster: 2 nodes x 2 CPU tasks, the tiny config, a short run."""
    text = (ROOT / "launchers" / "slurm" / script).read_text()
    edits = [(r"--nodes=\d+", "--nodes=2"), (r"--ntasks-per-node=\d+", "--ntasks-per-node=2"),
             (r"#SBATCH --gpus-per-node=.*\n", ""), (r"#SBATCH --account=.*\n", ""),
             (r"--cpus-per-task=\d+", "--cpus-per-task=1"), (r"--partition=\S+", "--partition=debug"),
             (r"--time=\S+", "--time=00:20:00"), (r"CONFIG=\S+", f"CONFIG={config}"),
             (r"TP=\d PP=\d", "TP=2 PP=1"),
             (r"(srun_mdu\.sh\" unlearn \\\n)(?s:.*)", r"\1    " + " ".join([*TINY, *STEPS]) + "\n")]
    for pattern, new in edits:
        text, n = re.subn(pattern, new, text)
        assert n == 1, f"{script}: no line matches {pattern!r}: the launcher changed, update this test"
    copy = tmp_path / script
    copy.write_text(text)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("script, config", [("unlearn_llada_8b.sbatch", "configs/llada_tiny.yaml"),
                                            ("unlearn_dream_7b.sbatch", "configs/dream_tiny.yaml")])
def test_sbatch_launchers_run_on_two_nodes(slurm_cluster_2nodes, tmp_path, script, config):  # noqa: F811
    init, out = tmp_path / "init", tmp_path / "run"
    _cli("finetune", "--config", config, *TINY, "data.finetune=forget10", "train.max_steps=1",
         f"train.output_dir={init}")
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "INIT": str(init / "checkpoints" / "step-1" / "model"), "OUT": str(out)}
    sbatch = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={tmp_path}/%x-%j.out",
                             str(_edited_sbatch(script, config, tmp_path))],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env},
                            timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert sbatch.returncode == 0, f"{sbatch.stderr}\n{logs[-4000:]}"
    assert "unlearn finished: " in logs, logs[-4000:]
    assert [s for s, _ in _scalars(out)["unlearn/forget-loss"]] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "step-6").is_dir()
