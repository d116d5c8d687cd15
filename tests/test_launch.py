"""``mdu-dist launch`` without a cluster: the sbatch script submitit generates and each task's environment for
a 4-node x 8-GPU job, sweeps as one job array, requeue with resume, bad input refused before submitting, and
the local executor's 2-process job end to end.

sbatch/srun/sinfo are stand-ins written here (sbatch keeps the script it is given and answers like Slurm), so
these tests run anywhere; tests/test_launch_slurm.py runs the same commands against a real Slurm.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import submitit
from test_trainer import TINY, UNLEARN_TAGS, _cli, _scalars

from mdu_dist.cli import main
from mdu_dist.distributed import process_env
from mdu_dist.launch.plan import writer_rank
from mdu_dist.launch.task import TrainTask, master_port, rendezvous

# A TP=8 x PP=2 layout for the tiny model: 8 heads and KV heads, 4 layers; 4 nodes x 8 GPUs = 32 ranks, DP=2.
TP8 = [*TINY, "model.num_attention_heads=8", "model.num_query_groups=8", "model.hidden_size=128",
       "model.num_layers=4", "parallel.tensor=8", "parallel.pipeline=2"]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch/srun/sinfo stand-ins on PATH; returns the file every submitted script is appended to."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    for name, body in {"sbatch": f'cat "$1" >> {scripts}\necho "Submitted batch job 4242"',
                       "srun": "exit 0", "sinfo": 'printf "debug\\ngpu\\ngpu\\n"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return scripts


def _launch(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["launch", "--config", "configs/llada_tiny.yaml", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_four_nodes_of_eight_gpus_sbatch_script(fake_slurm, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = _launch(capsys, "--executor", "slurm", "--nodes", "4", "--gpus-per-node", "8",
                             "--cpus-per-task", "12", "--partition", "gpu", "--account", "proj",
                             "--timeout-min", "240", *TP8, "launch.additional_parameters={qos: high}",
                             f"train.output_dir={out_dir}")
    assert code == 0, err
    assert "4 node(s) x 8 task(s) = 32 ranks" in out and "job 4242: log " in out
    assert f"tensorboard --logdir {out_dir}/tensorboard" in out
    script = fake_slurm.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))
    want = {"nodes": "4", "ntasks-per-node": "8", "gpus-per-node": "8", "cpus-per-task": "12", "partition": "gpu",
            "account": "proj", "time": "240", "qos": "high", "requeue": "", "signal": "USR2@90",
            "job-name": "mdu-dist", "open-mode": "append"}
    assert {k: flags.get(k) for k in want} == want, script
    # One srun over all 32 tasks, each running submitit's entry point on the pickled task.
    folder = out_dir / "submitit"
    assert re.search(rf"^srun .*python\S* -u -m submitit.core._submit {folder}$", script, re.M), script
    assert flags["output"] == f"{folder}/%j_0_log.out"


def test_per_task_environment_of_a_four_node_job(monkeypatch):
    """Every one of the 32 tasks agrees on world size, master host and port; ranks and local ranks are right;
    CUDA_VISIBLE_DEVICES is left as Slurm set it."""
    seen = set()
    for rank in range(32):
        env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "32",
               "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[017-019,023]", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank % 8), "SLURM_NODEID": str(rank // 8),
               "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)

        got = rendezvous(submitit.JobEnvironment())
        assert got == {"RANK": str(rank), "LOCAL_RANK": str(rank % 8), "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8",
                       "GROUP_RANK": str(rank // 8), "MASTER_ADDR": "gpu017", "MASTER_PORT": str(master_port("4242"))}
        assert "CUDA_VISIBLE_DEVICES" not in got
        penv = process_env({**env, **got})  # what mdu_dist.distributed.init then reads
        assert (penv.rank, penv.local_rank, penv.world_size, penv.master_addr, penv.source) == \
            (rank, rank % 8, 32, "gpu017", "torchrun")
        seen.add((penv.master_addr, penv.master_port))
    assert len(seen) == 1


@pytest.mark.parametrize("tp, dp, pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2), (8, 2, 2), (2, 3, 4), (1, 4, 3)])
def test_the_printed_log_is_the_writer_ranks(tp, dp, pp):
    """The log ``launch`` names is the one with the progress bar and metrics: the trainer's writer (last pipeline
    stage, TP rank 0, DP rank 0), found here from megatron-core's own rank groups."""
    from megatron.core.parallel_state import RankGenerator

    ranks = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    last_stage = {g[-1] for g in ranks.get_ranks("pp")}
    tp0, dp0 = {g[0] for g in ranks.get_ranks("tp")}, {g[0] for g in ranks.get_ranks("dp")}
    assert {writer_rank(tp * dp * pp, pp)} == last_stage & tp0 & dp0


def test_array_elements_get_their_own_port(monkeypatch):
    # Array elements may share nodes: the port comes from each element's own SLURM_JOB_ID.
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node1")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "500")

    ports = set()
    for element, job_id in enumerate(("501", "502")):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(element))
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
        ports.add(rendezvous(submitit.JobEnvironment())["MASTER_PORT"])
    assert len(ports) == 2


def test_sweep_is_one_job_array(fake_slurm, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    code, out, err = _launch(capsys, "--executor", "slurm", "--tasks-per-node", "2", "--sweep",
                             "method.tau=0,0.25,0.5,0.75,1", *TINY, f"train.output_dir={out_dir}")
    assert code == 0, err
    script = fake_slurm.read_text()
    assert script.count("#!/bin/bash") == 1 and "#SBATCH --array=0-4%5" in script, script
    values = ("0", "0.25", "0.5", "0.75", "1")
    assert all(f"job 4242_{i} [method.tau={t}]" in out for i, t in enumerate(values)), out
    assert f"tensorboard --logdir {out_dir}" in out
    for i, value in enumerate(values):
        with open(out_dir / "submitit" / f"4242_{i}_submitted.pkl", "rb") as f:
            config = pickle.load(f).function.config
        assert config["method"]["tau"] == float(value)
        assert config["train"]["output_dir"] == str(out_dir / f"tau={value}")  # each point its own run


def test_checkpoint_requeues_with_resume_and_pickles_only_the_config():
    from mdu_dist.config import load_config, to_dict

    task = TrainTask(to_dict(load_config("configs/llada_tiny.yaml", TINY)), "unlearn")
    again = task.checkpoint()
    assert isinstance(again.function, TrainTask) and vars(again.function).keys() == {"config", "job"}
    assert again.function.config["train"]["resume"] == "auto" and task.config["train"]["resume"] == "none"
    pickle.dumps(again)  # what submitit writes for the requeued job


@pytest.mark.parametrize("restarts,want", [("0", "none"), ("1", "auto")])
def test_a_requeued_job_resumes(monkeypatch, restarts, want):
    """`scontrol requeue` (no signal, so no checkpoint() call) still resumes: Slurm counts the restart."""
    import mdu_dist.trainer
    from mdu_dist.config import load_config, to_dict

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # restored after the test; TrainTask overwrites them
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                       "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": restarts}.items():
        monkeypatch.setenv(key, value)
    got = {}
    monkeypatch.setattr(mdu_dist.trainer, "run_job", lambda cfg, job: got.update(cfg=cfg, job=job) or {})
    TrainTask(to_dict(load_config("configs/llada_tiny.yaml", TINY)), "unlearn")()
    assert got["cfg"].train.resume == want and got["job"] == "unlearn"
    assert os.environ["RANK"] == "0" and os.environ["MASTER_ADDR"] == "localhost"


@pytest.mark.parametrize("args,needle", [
    (["--executor", "slurm", "--partition", "nope"],
     "launch.partition='nope' does not exist (sinfo lists: debug, gpu)"),
    (["--executor", "slurm", "--nodes", "3", "--tasks-per-node", "2", "parallel.tensor=4"],
     "launch: nodes=3 x tasks_per_node=2 = 6 processes is not a multiple of parallel.tensor=4 x "
     "parallel.pipeline=1 (= 4)"),
    (["--executor", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--tasks-per-node", "4"],
     "launch.tasks_per_node=4 must equal gpus_per_node=8"),
    (["--executor", "local", "--nodes", "2"], "launch.nodes=2: the local executor runs on this machine only"),
    (["--sweep", "method.tau"], "--sweep 'method.tau' is not of the form key.sub=v1,v2,..."),
])
def test_bad_input_is_refused_before_submitting(fake_slurm, tmp_path, capsys, args, needle):
    out_dir = tmp_path / "run"
    code, out, err = _launch(capsys, *args, *TINY, f"train.output_dir={out_dir}")
    assert code == 2 and needle in err and err.strip().count("\n") == 0, err
    assert not fake_slurm.exists() and not out_dir.exists()


def test_slurm_without_sbatch_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing Slurm on it
    code, out, err = _launch(capsys, "--executor", "slurm", *TINY, f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and "launch.executor=slurm but sbatch is not on PATH" in err, err
    assert not (tmp_path / "run").exists()


def test_local_executor_runs_a_two_process_job(tmp_path):
    out_dir = tmp_path / "local"
    proc = _cli("launch", "--config", "configs/llada_tiny.yaml", "--executor", "local", "--tasks-per-node", "2",
                *TINY, "train.max_steps=2", f"train.output_dir={out_dir}")
    assert re.search(r"^job \d+ finished: .*forget-loss=", proc.stdout, re.M), proc.stdout
    scalars = _scalars(out_dir)
    assert UNLEARN_TAGS <= set(scalars) and [s for s, _ in scalars["unlearn/forget-loss"]] == [1, 2]
    assert len(list((out_dir / "submitit").glob("*_log.out"))) == 2  # two ranks


def test_local_executor_runs_an_eval_job(tmp_path):
    run, out_dir = tmp_path / "finetune", tmp_path / "eval"
    _cli("finetune", "--config", "configs/llada_tiny.yaml", *TINY, "data.finetune=forget10",
         "train.max_steps=1", f"train.output_dir={run}")
    fast = ["eval.limit=2", "eval.num_samples=2", "eval.gen_length=8", "eval.steps=4", "eval.block_length=8",
            "eval.splits=[forget]", "eval.progress=false"]
    # Two tasks, TP=1: the evaluation runs data-parallel on both.
    proc = _cli("launch", "--job", "eval", "--config", "configs/llada_tiny.yaml", "--executor", "local",
                "--tasks-per-node", "2", *TINY, *fast, f"eval.checkpoint={run / 'checkpoints' / 'step-1' / 'model'}",
                f"eval.output_dir={out_dir}")
    assert re.search(r"^job \d+ finished: .*forget_Q_A_Prob=", proc.stdout, re.M), proc.stdout
    result = json.loads((out_dir / "eval.json").read_text())
    assert result["layout"] == {"tensor": 1, "data": 2}
    assert 0.0 < result["metrics"]["forget_Q_A_Prob"] < 1.0


def test_an_eval_job_is_refused_when_tp_does_not_divide_the_tasks(tmp_path, capsys):
    code, _, err = _launch(capsys, "--job", "eval", "--executor", "local", "--tasks-per-node", "3", *TINY,
                           "parallel.tensor=2", "eval.checkpoint=", f"eval.output_dir={tmp_path / 'eval'}")
    assert code == 2 and "is not a multiple of" in err and "parallel.tensor=2" in err, err


def test_an_eval_sweep_over_run_dirs_is_one_job_array_writing_each_run_eval(fake_slurm, tmp_path, capsys):
    import shutil

    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "tau=0.5"
    _cli("finetune", "--config", "configs/llada_tiny.yaml", *TINY, "data.finetune=forget10", "train.max_steps=1",
         f"train.output_dir={run_a}")
    shutil.copytree(run_a, run_b)
    step = run_a / "checkpoints" / "step-1" / "model"
    # No launch.folder: an eval job's submitit folder sits beside its output (eval.output_dir, the sweep's base),
    # not in train.output_dir, which it never writes.
    folder = tmp_path / "evals" / "submitit"
    code, out, err = _launch(capsys, "--job", "eval", "--executor", "slurm", "--tasks-per-node", "2", "--sweep",
                             f"eval.checkpoint={run_a},{run_b},{step}", *TINY, "eval.seed=7",
                             f"eval.output_dir={folder.parent}")
    assert code == 0, err
    assert f"submitit folder {folder}\n" in out, out
    script = fake_slurm.read_text()
    assert script.count("#!/bin/bash") == 1 and "#SBATCH --array=0-2%" in script, script
    wanted = [(run_a, run_a / "eval"), (run_b, run_b / "eval"), (step, run_a / "eval" / "step-1")]
    for i, (checkpoint, output) in enumerate(wanted):
        assert f"job 4242_{i} [eval.checkpoint={checkpoint}]" in out and f"output {output}" in out, out
        with open(folder / f"4242_{i}_submitted.pkl", "rb") as f:
            task = pickle.load(f).function
        assert task.job == "eval" and task.config["eval"]["seed"] == 7
        assert (task.config["eval"]["checkpoint"], task.config["eval"]["output_dir"]) == (str(checkpoint),
                                                                                          str(output))
    # Two points that would write one eval.json: refused before anything is submitted.
    code, _, err = _launch(capsys, "--job", "eval", "--executor", "slurm", "--tasks-per-node", "2", "--sweep",
                           f"eval.checkpoint={run_a},{run_a}", *TINY, f"launch.folder={tmp_path / 'submitit'}")
    assert code == 2 and f"two points of the sweep would write to {run_a / 'eval'}" in err, err
