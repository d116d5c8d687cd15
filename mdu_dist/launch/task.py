"""What runs inside each submitit task: rendezvous from the job environment, then the normal trainer.

Nothing but the config (a plain dict) and the job name is pickled, so a requeued job rebuilds everything from
the trainer's latest complete checkpoint (``train.resume=auto``) rather than from pickled state.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import submitit
import torch

from mdu_dist.config import config_from_dict
from mdu_dist.eval.run import run_eval


def master_port(job_id: str) -> int:
    """Every task of one job derives the same port from the job id, without talking to the others."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def rendezvous(env: submitit.JobEnvironment) -> dict[str, str]:
    """torchrun-style variables for this task (what mdu_dist.distributed.init and DeepSpeed read).

    The master is the first host of the allocation. CUDA_VISIBLE_DEVICES is left alone: when Slurm binds one
    GPU per task the task sees a single device, otherwise all of the node's, and distributed.init picks
    ``LOCAL_RANK % device_count``, which is right in both cases.
    """
    return {
        "RANK": str(env.global_rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
        "GROUP_RANK": str(env.node),
        "MASTER_ADDR": env.hostnames[0],
        # raw_job_id is unique per array element (SLURM_JOB_ID), unlike the array's own id.
        "MASTER_PORT": str(master_port(env.raw_job_id)),
    }


def _requeued() -> bool:
    # Slurm counts restarts of a batch job: set after `scontrol requeue` or a requeue on node failure.
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


class TrainTask(submitit.helpers.Checkpointable):
    """One ``finetune``/``unlearn``/``eval`` run; each of the job's tasks calls it once as one rank."""

    def __init__(self, config: dict[str, Any], job: str) -> None:
        self.config = config
        self.job = job

    def __call__(self) -> dict[str, float]:
        # deferred: the trainer imports megatron-core; `launch` only pickles this task
        from mdu_dist.trainer import run_job

        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")
        os.environ.update(rendezvous(submitit.JobEnvironment()))
        overrides = ["train.resume=auto"] if _requeued() else []
        cfg = config_from_dict(self.config, overrides, f"{self.job} job")
        if not torch.cuda.is_available():
            # CPU ranks share the node's cores: one rank per task, cpus_per_task threads each.
            torch.set_num_threads(cfg.launch.cpus_per_task)
        if self.job == "eval":
            return {k: v for k, v in run_eval(cfg).items() if v is not None}
        return run_job(cfg, self.job)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Preemption or time limit (called on global rank 0 only): requeue the same run, resuming from the
        trainer's latest complete checkpoint; at most the steps since it are lost (an eval job starts over)."""
        train = {**self.config["train"], "resume": "auto"}
        return submitit.helpers.DelayedSubmission(TrainTask({**self.config, "train": train}, self.job))
