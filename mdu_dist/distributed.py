"""Process groups: torch.distributed plus megatron-core's TP x PP x DP groups, from torchrun or Slurm variables.

Rank order follows megatron-core ("tp-cp-ep-dp-pp"): the TP ranks of a group are consecutive, so a TP group
never spans nodes when TP <= GPUs per node.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mdu_dist import cpu_shim
from mdu_dist.config import ConfigError, ModelConfig, ParallelConfig, check_layout


@dataclass(frozen=True)
class ProcessEnv:
    """Where this process sits, as told by its launcher."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | single


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def __str__(self) -> str:
        return f"TP={self.tp} x PP={self.pp} x DP={self.dp} (world size {self.world_size})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list, as ``scontrol show hostnames`` would list it first:
    ``node[01-04,07],gpu3`` -> ``node01``; ``rack[2-3]-n[1-2]`` -> ``rack2-n1``; ``a,b`` -> ``a``."""
    head, depth = [], 0
    for i, ch in enumerate(nodelist):
        if ch == "," and depth == 0:
            break
        if ch == "[":
            depth += 1
            head.append(re.split(r"[,\-\]]", nodelist[i + 1:], maxsplit=1)[0])  # the range's first value
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            head.append(ch)
    if depth or not head:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm host list")
    return "".join(head)


def _slurm_master(env: dict) -> str:
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the master node")
    return first_host(nodes)


def process_env(env: dict | None = None) -> ProcessEnv:
    """Read rank and rendezvous from torchrun's variables, else Slurm's (srun/submitit), else one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # Derived from the job id so that every task of one job agrees without talking to the others.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                          env.get("MASTER_ADDR") or _slurm_master(env), port, "slurm")
    return ProcessEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def resolve_layout(world_size: int, parallel: ParallelConfig, model: ModelConfig | None = None) -> Layout:
    """Check that ``world_size`` factors as TP x PP x DP and that TP/PP can shard ``model``."""
    tp, pp = parallel.tensor, parallel.pipeline
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.tensor={tp} x "
                          f"parallel.pipeline={pp} (= {tp * pp})")
    if model is not None:
        check_layout(model, tp, pp)
    return Layout(world_size, tp, pp)


def backend_for(parallel: ParallelConfig) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init(parallel: ParallelConfig, model: ModelConfig | None = None) -> Layout:
    """Initialise torch.distributed and megatron-core's parallel state for this process.

    Validates the layout before creating any group, so a bad TP/PP/world size fails fast on every rank.
    """
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module for --help
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    penv = process_env()
    layout = resolve_layout(penv.world_size, parallel, model)
    cpu_shim.activate()
    # DeepSpeed (and anything else torchrun-minded) reads these; Slurm and single runs do not set them.
    for key, value in (("RANK", penv.rank), ("LOCAL_RANK", penv.local_rank), ("WORLD_SIZE", penv.world_size),
                       ("MASTER_ADDR", penv.master_addr), ("MASTER_PORT", penv.master_port)):
        os.environ.setdefault(key, str(value))
    if torch.cuda.is_available():
        # The launcher may already have narrowed CUDA_VISIBLE_DEVICES to one GPU per task.
        torch.cuda.set_device(penv.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend_for(parallel), init_method=f"tcp://{penv.master_addr}:{penv.master_port}",
                                rank=penv.rank, world_size=penv.world_size)
    parallel_state.initialize_model_parallel(layout.tp, layout.pp)
    model_parallel_cuda_manual_seed(parallel.seed)
    return layout


def shutdown() -> None:
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module for --help
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
