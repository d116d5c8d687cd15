"""Everything ``mdu-dist launch`` decides before submitting: the process layout, the executor, the sweep.

Every check here runs before a job exists, and fails with one ConfigError line naming the value.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from mdu_dist.distributed import resolve_layout
from mdu_dist.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def writer_rank(world_size: int, pipeline: int) -> int:
    """The task whose log shows the progress bar and final metrics: the trainer's writer, the first rank of the
    last pipeline stage (megatron's rank order, tp-cp-ep-dp-pp, puts the stages outermost); 0 without PP. With
    PP across nodes it runs on the last node, not the first."""
    return world_size - world_size // pipeline


def plan_for(cfg) -> Plan:
    """Tasks per node (one per GPU; TP x PP for a CPU job unless set) and a world size TP x PP x DP."""
    launch, tp, pp = cfg.launch, cfg.parallel.tensor, cfg.parallel.pipeline
    tasks = launch.tasks_per_node or launch.gpus_per_node or (tp * pp if launch.nodes == 1 else 0)
    if tasks == 0:
        raise ConfigError(f"launch.nodes={launch.nodes} with no GPUs: set launch.tasks_per_node")
    plan = Plan(launch.nodes, tasks, launch.gpus_per_node)
    if plan.world_size % (tp * pp):
        raise ConfigError(f"launch: nodes={plan.nodes} x tasks_per_node={tasks} = {plan.world_size} processes is "
                          f"not a multiple of parallel.tensor={tp} x parallel.pipeline={pp} (= {tp * pp})")
    resolve_layout(plan.world_size, cfg.parallel, cfg.model)
    return plan


def parse_sweep(specs: list[str]) -> list[list[str]]:
    """``["method.tau=0,0.5", "train.seed=1,2"]`` -> the cartesian product as override lists."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(items):
            raise ConfigError(f"--sweep {spec!r} is not of the form key.sub=v1,v2,...")
        axes.append([f"{key}={v}" for v in items])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def sweep_output_dir(base: str, point: list[str]) -> str:
    """Each sweep point writes under its own directory, named after its values (``tau=0.25``)."""
    name = "_".join(f"{o.partition('=')[0].split('.')[-1]}={o.partition('=')[2]}" for o in point)
    return str(Path(base) / name) if name else base


def point_output_dir(job: str, base: str, point: list[str]) -> str:
    """Where a sweep point writes: ``sweep_output_dir``; but an eval job sweeping ``eval.checkpoint`` writes each
    evaluation into the run's ``eval/``: ``RUN/eval`` for a run directory, ``RUN/eval/step-N`` for a checkpoint
    ``RUN/checkpoints/step-N[/model]`` (then under the other swept values, if any)."""
    checkpoints = [o.partition("=")[2] for o in point if o.partition("=")[0] == "eval.checkpoint"]
    if job != "eval" or not checkpoints:
        return sweep_output_dir(base, point)
    parts = Path(checkpoints[0]).parts
    at = len(parts) - 1 - parts[::-1].index("checkpoints") if "checkpoints" in parts else len(parts)
    out = Path(*parts[:at]) / "eval" / Path(*parts[at + 1: at + 2])  # the step, if one is named
    return sweep_output_dir(str(out), [o for o in point if not o.startswith("eval.checkpoint=")])


def check_slurm(partition: str) -> None:
    """Refuse slurm without its client commands, or a partition sinfo does not list."""
    for tool in ("sbatch", "srun", "sinfo"):
        if shutil.which(tool) is None:
            raise ConfigError(f"launch.executor=slurm but {tool} is not on PATH (not a Slurm login node?)")
    if not partition:
        return
    proc = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ConfigError(f"launch.partition={partition!r}: sinfo failed: {proc.stderr.strip()}")
    known = sorted(set(proc.stdout.split()))
    if partition not in known:
        raise ConfigError(f"launch.partition={partition!r} does not exist (sinfo lists: {', '.join(known)})")


def executor_parameters(cfg, plan: Plan) -> dict[str, Any]:
    """submitit parameters (AutoExecutor names; ``slurm_`` ones are ignored by the local executor)."""
    launch = cfg.launch
    params: dict[str, Any] = dict(
        name=launch.job_name, nodes=plan.nodes, tasks_per_node=plan.tasks_per_node,
        cpus_per_task=launch.cpus_per_task, timeout_min=launch.timeout_min,
        # the signal lets rank 0 checkpoint() and requeue before the kill
        slurm_signal_delay_s=launch.signal_delay_s, slurm_array_parallelism=launch.array_parallelism,
        slurm_additional_parameters={"requeue": True, **launch.additional_parameters},
    )
    if plan.gpus_per_node:
        params["gpus_per_node"] = plan.gpus_per_node
    if launch.partition:
        params["slurm_partition"] = launch.partition
    if launch.account:
        params["slurm_account"] = launch.account
    if launch.setup:
        params["slurm_setup"] = list(launch.setup)
    return params


def job_output_dir(cfg, job: str) -> str:
    """Where a job writes: eval.output_dir for an eval job, else train.output_dir."""
    return cfg.eval.output_dir if job == "eval" else cfg.train.output_dir


def log_folder(cfg, job: str) -> Path:
    """submitit's pickles and logs: launch.folder, else beside what the job writes. (An eval job's went to
    train.output_dir, which it never writes: every eval shared runs/mdu/submitit, where a stale result pickle
    of an earlier job with the same id made ``--wait`` return before the new job had finished.)"""
    return Path(cfg.launch.folder or Path(job_output_dir(cfg, job)) / "submitit").absolute()


def build_executor(cfg, plan: Plan, job: str) -> submitit.AutoExecutor:
    if cfg.launch.executor == "slurm":
        check_slurm(cfg.launch.partition)
    executor = submitit.AutoExecutor(folder=log_folder(cfg, job), cluster=cfg.launch.executor,
                                     slurm_max_num_timeout=cfg.launch.max_requeues)
    executor.update_parameters(**executor_parameters(cfg, plan))
    return executor
