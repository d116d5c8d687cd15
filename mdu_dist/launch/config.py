"""The ``launch`` section of a run config: where and how ``mdu-dist launch`` runs a job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mdu_dist.errors import ConfigError

EXECUTORS = ("local", "slurm")


@dataclass
class LaunchConfig:
    executor: str = "local"  # local (processes on this machine) | slurm (sbatch through submitit)
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU job
    # One task per GPU; 0 = gpus_per_node, or parallel.tensor x parallel.pipeline for a CPU job (one replica).
    tasks_per_node: int = 0
    cpus_per_task: int = 1
    timeout_min: int = 60
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    job_name: str = "mdu-dist"
    folder: str = ""  # submitit's pickles and logs; "" = <train / eval.output_dir>/submitit
    max_requeues: int = 3  # time-limit requeues before giving up (preemptions do not count)
    signal_delay_s: int = 90  # the preemption/time-limit signal comes this long before the kill
    array_parallelism: int = 16  # sweep jobs running at once
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, venv activate)
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH flags, e.g. {qos: high}

    def validate(self, where: str = "launch") -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"{where}.executor={self.executor!r} must be one of {', '.join(EXECUTORS)}")
        for name in ("nodes", "cpus_per_task", "timeout_min", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        for name in ("gpus_per_node", "tasks_per_node", "max_requeues", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 0")
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ConfigError(f"{where}.tasks_per_node={self.tasks_per_node} must equal gpus_per_node="
                              f"{self.gpus_per_node}: one task drives one GPU")
        if self.executor == "local" and self.nodes != 1:
            raise ConfigError(f"{where}.nodes={self.nodes}: the local executor runs on this machine only (nodes=1)")
