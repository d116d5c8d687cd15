"""Optimisation through DeepSpeed: AdamW under ZeRO-1/2/3 (optimizer state optionally offloaded to the CPU),
global-norm clipping, linear warm-up then cosine decay, gradient accumulation, bf16 on GPU / fp32 on CPU. On CPU
without offload the AdamW is ``mdu_dist.adamw.PortableAdamW`` (the same bits on any x86-64 processor).

DeepSpeed sees megatron-core's groups through ``MegatronMPU``: it partitions optimizer state and averages
gradients over the data-parallel group only, and sums gradient norms over the tensor x pipeline group.

One optimizer step (``forward_backward`` does the first part for either case)::

    # PP = 1, any ZeRO stage: DeepSpeed runs the backward
    for mb in microbatches:                       # exactly optim.gradient_accumulation_steps of them
        loss, _ = loss_fn(mb, forward_fn(engine, mb))
        engine.backward(loss)                     # divides by the number of micro-batches
    stats = optimizer_step(engine)

    # PP > 1 (ZeRO-1): megatron-core's schedule runs a plain autograd backward on the raw stage
    run_microbatches(engine.module, microbatches, forward_fn, loss_fn, ...)  # mean over micro-batches
    stats = optimizer_step(engine)

The engine is built with ``managed_gradient_accumulation: false``: backward only accumulates and
``engine.step()`` is the accumulation boundary, where ZeRO-1 reduces the gradients over the data-parallel group,
then clips, updates and advances the schedule. Gradients made outside DeepSpeed therefore need no private
engine calls (DeepSpeed's own PipelineEngine forces the boundary, calls ``allreduce_gradients`` and
``_take_model_step`` itself). ZeRO-2/3 cannot take an external backward: they reduce-scatter from per-parameter
hooks and need DeepSpeed's epilogue after every backward, which only ``engine.backward`` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mdu_dist.adamw import PortableAdamW
from mdu_dist.errors import ConfigError
from mdu_dist.pipeline import ForwardFn, LossFn, run_microbatches

ZERO_STAGES = (1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu")
DTYPES = ("auto", "bf16", "fp32")


@dataclass
class OptimConfig:
    """AdamW, its schedule and how DeepSpeed shards it. Every count is in optimizer steps unless it says so."""

    # Peak learning rate, reached at the end of warm-up.
    lr: float = 1e-5
    # AdamW's decoupled weight decay. Applied to matrices only (ndim >= 2): norms and biases are not decayed
    # (megatron-core's convention).
    weight_decay: float = 0.01
    # AdamW's (beta1, beta2).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW's epsilon, added to the square root of the second moment.
    eps: float = 1e-8
    # Optimizer steps of the whole run; the cosine reaches min_lr here and stays there after.
    total_steps: int = 100
    # Warm-up length as a fraction of total_steps, rounded up (transformers' convention); ignored when
    # warmup_steps is set.
    warmup_ratio: float = 0.0
    # Warm-up length in optimizer steps; overrides warmup_ratio.
    warmup_steps: int | None = None
    # Learning rate at the end of the cosine (absolute, not a ratio of lr).
    min_lr: float = 0.0
    # Maximum global L2 norm of the gradient (over every TP/PP shard, after averaging over DP); 0 disables.
    grad_clip: float = 1.0
    # ZeRO stage: 1 partitions optimizer state over DP, 2 also gradients, 3 also parameters. With pipeline
    # parallelism only 1 is possible.
    zero_stage: int = 1
    # Where the optimizer state and step live: "none" (with the parameters) or "cpu" (ZeRO-Offload, with
    # DeepSpeedCPUAdam).
    offload_optimizer: str = "none"
    # Micro-batches per optimizer step on each data-parallel rank.
    gradient_accumulation_steps: int = 1
    # Rows per micro-batch on each data-parallel rank.
    micro_batch_size: int = 1
    # Parameter, activation and gradient dtype: "auto" is bf16 with CUDA and fp32 without; "bf16"; "fp32".
    # DeepSpeed keeps fp32 master weights and Adam moments either way; under bf16 the micro-batch gradients
    # accumulate in bf16.
    dtype: str = "auto"

    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.total_steps)

    def validate(self, where: str = "optim") -> None:
        if self.zero_stage not in ZERO_STAGES:
            # No stage 0: DeepSpeed reports no gradient norm for it in fp32, and ZeRO-1 over one
            # data-parallel rank partitions nothing anyway.
            raise ConfigError(f"{where}.zero_stage={self.zero_stage!r} must be one of {list(ZERO_STAGES)}")
        if self.offload_optimizer not in OFFLOAD_DEVICES:
            raise ConfigError(f"{where}.offload_optimizer={self.offload_optimizer!r} must be one of "
                              f"{list(OFFLOAD_DEVICES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{where}.dtype={self.dtype!r} must be one of {list(DTYPES)}")
        for name in ("total_steps", "gradient_accumulation_steps", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be > 0")
        for name in ("weight_decay", "grad_clip", "min_lr"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"{where}.min_lr={self.min_lr} is above lr={self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas={self.betas} must be two numbers in [0, 1)")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"{where}.warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(f"{where}.warmup_steps={self.warmup_steps} must be in [0, total_steps="
                              f"{self.total_steps}]")


def check_pipeline(cfg: OptimConfig, pp: int, where: str = "optim") -> None:
    """Refuse ZeRO-2/3 with pipeline parallelism; cheap, so callable before any process group exists.

    Both reduce-scatter gradients from per-parameter hooks and need DeepSpeed's epilogue after every backward,
    which megatron-core's schedule (a plain autograd backward per micro-batch) never runs; DeepSpeed's own
    PipelineEngine asserts the same restriction.
    """
    if pp > 1 and cfg.zero_stage != 1:
        raise ConfigError(f"{where}.zero_stage={cfg.zero_stage} cannot be used with parallel.pipeline={pp}: "
                          "DeepSpeed supports only ZeRO stage 1 with pipeline parallelism; set "
                          f"{where}.zero_stage=1 or parallel.pipeline=1")


def resolve_dtype(cfg: OptimConfig) -> torch.dtype:
    """The dtype to build the model in (megatron's pipeline sends activations in it too)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed asks its ``mpu`` argument for.

    DeepSpeed's "model parallel" group is megatron's tensor x pipeline group: ZeRO sums squared gradient norms
    over it, counting a parameter that is not TP-sharded (megatron marks sharded ones ``tensor_model_parallel``)
    only on tensor rank 0, which it reads from ``get_tensor_model_parallel_rank``. So every pipeline stage
    contributes and replicated norms count once. ``get_model_parallel_rank`` is the rank in the TP x PP group,
    which keeps DeepSpeed's per-rank checkpoint file names distinct across stages.

    Deliberately absent: ``initialize_sequence_parallel`` (its mere presence makes DeepSpeed ignore the DP and
    model-parallel groups) and the sequence-parallel getters (no context parallelism here).
    """

    @staticmethod
    def _ps():
        # deferred: megatron-core costs seconds of start-up; config imports this module for every subcommand
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_group(self):
        return self._ps().get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self.get_model_parallel_group())

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps().get_pipeline_model_parallel_rank()


@dataclass
class WarmupCosine:
    """Learning-rate factor at optimizer step ``k`` (0-based): ``k / warmup`` while ``k < warmup``, then a half
    cosine from 1 down to ``min_ratio`` at ``k = total``, and ``min_ratio`` after.

    The same values as transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` up to ``total``. A plain
    object (not a closure) so torch's LambdaLR saves and restores it with the scheduler's state.
    """

    warmup: int
    total: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        # Written as transformers writes it, so the two agree to the last bit.
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - self.min_ratio) + self.min_ratio


def schedule(cfg: OptimConfig) -> WarmupCosine:
    return WarmupCosine(cfg.num_warmup_steps(), cfg.total_steps, cfg.min_lr / cfg.lr)


def portable_optimizer(cfg: OptimConfig) -> bool:
    """Whether the optimizer is mdu-dist's ``PortableAdamW`` (a CPU run without offload: the same bits on any
    x86-64 processor) rather than one DeepSpeed builds from its config (on GPU torch's fused / foreach AdamW,
    whose CUDA square root is correctly rounded already; with offload DeepSpeedCPUAdam)."""
    return not torch.cuda.is_available() and cfg.offload_optimizer == "none"


def ds_config(cfg: OptimConfig, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's config dict for ``cfg``; the schedule is passed separately (``build_engine``), and so is the
    optimizer where ``portable_optimizer(cfg)``."""
    offload = cfg.offload_optimizer == "cpu"
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if portable_optimizer(cfg):
        # DeepSpeed names the optimizers its ZeRO was tested with by exact type; PortableAdamW is torch's AdamW
        # update with one operation exact.
        optimizer: dict[str, Any] = {"zero_allow_untested_optimizer": True}
    else:
        optimizer = {"optimizer": {
            "type": "AdamW",
            # On GPU without offload: torch's fused / foreach AdamW (needs no compiled kernel). With offload
            # DeepSpeed always uses its DeepSpeedCPUAdam (JIT-built once into TORCH_EXTENSIONS_DIR).
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
                       "torch_adam": not offload},
        }}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        # step() is the accumulation boundary, so gradients made outside engine.backward (megatron's pipeline
        # schedule) are reduced and applied by the same call; see the module docstring.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        **optimizer,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**62,  # the trainer reports; DeepSpeed's own progress lines would interleave
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms or biases; groups that would be empty are left out (DeepSpeed drops them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(model: torch.nn.Module, cfg: OptimConfig):
    """Wrap this rank's stage in a DeepSpeed engine after ``mdu_dist.distributed.init``.

    Build ``model`` with ``resolve_dtype(cfg)``: megatron's pipeline sends activations in the dtype it was built
    with. With bf16 DeepSpeed casts the parameters megatron leaves in fp32 (its local RMSNorm weights).
    Returns the engine; its ``lr_scheduler`` is a torch LambdaLR over ``schedule(cfg)``, stepped by
    ``engine.step()`` and saved/restored with the engine's checkpoints.
    """
    # deferred: DeepSpeed and megatron-core cost seconds of start-up; config imports this module for every subcommand
    import deepspeed
    from megatron.core import parallel_state

    cfg.validate()
    check_pipeline(cfg, parallel_state.get_pipeline_model_parallel_world_size())
    lr_lambda = schedule(cfg)
    groups = param_groups(model, cfg.weight_decay)
    optimizer = (PortableAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
                 if portable_optimizer(cfg) else None)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=None if optimizer else groups,
        config=ds_config(cfg, resolve_dtype(cfg)),
        mpu=MegatronMPU(), lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )
    return engine


@dataclass(frozen=True)
class StepStats:
    grad_norm: float  # global L2 norm of the DP-averaged gradient before clipping (inf if non-finite)
    lr: float  # the learning rate this step used
    # False when DeepSpeed skipped the update for a non-finite gradient; the schedule then does not advance.
    applied: bool


def current_lr(engine) -> float:
    """The learning rate the next ``engine.step()`` will use (every param group shares the schedule)."""
    return float(engine.get_lr()[0])


def forward_backward(engine, microbatches: list[Any], forward_fn: ForwardFn, loss_fn: LossFn, *, seq_length: int,
                     micro_batch_size: int, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
                     ) -> list[dict]:
    """Forward and backward the micro-batches of one optimizer step; gradients are those of their mean loss.

    The contract of ``pipeline.run_microbatches`` (loss dicts back, from the last stage). With PP = 1 every
    micro-batch goes through DeepSpeed's forward and backward, as ZeRO-2/3 require, and ``forward_fn`` receives
    the engine; with PP > 1 megatron-core's schedule runs them on the raw stage, ``engine.module``.
    ``wrap``, if given, builds the model ``forward_fn`` receives around that one (e.g. ``PolicyAndReference``
    with a frozen reference kept outside the engine; the schedule then hands pipeline inputs to the wrapper).
    """
    # deferred: megatron-core costs seconds of start-up; config imports this module for every subcommand
    from megatron.core import parallel_state

    if len(microbatches) != engine.gradient_accumulation_steps():
        raise ValueError(f"{len(microbatches)} micro-batches for one step, but optim.gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()}")
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    model = engine.module if pipelined else engine
    model = model if wrap is None else wrap(model)
    if pipelined:
        return run_microbatches(model, microbatches, forward_fn, loss_fn, seq_length=seq_length,
                                micro_batch_size=micro_batch_size)
    metrics = []
    for mb in microbatches:
        loss, reported = loss_fn(mb, forward_fn(model, mb))
        engine.backward(loss)
        metrics.append(reported)
    return metrics


def optimizer_step(engine) -> StepStats:
    """Reduce the accumulated gradients over DP (ZeRO-1; ZeRO-2/3 already did), clip, update, advance the
    schedule. Call once per optimizer step, after every micro-batch's backward, on every rank."""
    lr = current_lr(engine)
    engine.step()
    norm = engine.get_global_grad_norm()
    return StepStats(float(norm), lr, engine.was_step_applied())
