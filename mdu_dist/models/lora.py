"""LoRA adapters on megatron-core's tensor-parallel linears, and their canonical (TP/PP-free) layout.

An adapted linear computes ``y = W x + (alpha / r) B A dropout(x)`` with A [r, in] and B [out, r]. One factor is
split like the base weight, the other replicated over the tensor-parallel group (PEFT's megatron sharding: only
rank-sized activations cross ranks):

- column-parallel base (QKV, SwiGLU fc1; W split by output rows): A replicated, B split by rows like W;
- row-parallel base (attention output, fc2; W split by input columns): A split by columns like W, B replicated.

The split factor carries megatron's ``tensor_model_parallel`` attribute, so DeepSpeed counts its gradient norm on
every TP rank and the replicated one on TP rank 0 only (once).

Canonical adapters are named after the HF modules they adapt, ``layers.{i}.{q,k,v,o,gate,up,down}.lora_{A,B}``
(PEFT's layout: a fused QKV or gate/up adapter is one A repeated for each part, and B's rows split like the
base weight's), so ``mcore_layout.rank_tensor`` shards B of a column-parallel and A of a row-parallel adapter
exactly as it shards the base weight (QKV interleave and [gate_r; up_r] included), and the PEFT export is a
renaming. Initialisation: each fused A drawn in full from (seed, layer, target), kaiming-uniform like PEFT, then
sliced; B zero.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mdu_dist.config import LoRAConfig, ModelConfig
from mdu_dist.models import ARCHS
from mdu_dist.models.dense import canonical_shapes
from mdu_dist.models.mcore_layout import layer_range, rank_tensor


@dataclass(frozen=True)
class Target:
    module: str  # the megatron linear inside a TransformerLayer
    parts: tuple[str, ...]  # the canonical (HF) tensors its weight fuses
    column: bool  # column-parallel base (else row-parallel)


TARGETS = {
    "qkv": Target("self_attention.linear_qkv", ("q", "k", "v"), True),
    "attn-out": Target("self_attention.linear_proj", ("o",), False),
    "mlp-in": Target("mlp.linear_fc1", ("gate", "up"), True),
    "mlp-out": Target("mlp.linear_fc2", ("down",), False),
}


class _GradAllReduce(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over ``group``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ForwardAllReduce(torch.autograd.Function):
    """Sum over ``group`` in the forward; identity backward (every rank already holds the summed output's
    gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def lora_delta(x: Tensor, a: Tensor, b: Tensor, scale: float, column: bool,
               group: dist.ProcessGroup | None) -> Tensor:
    """The adapter's addition to a tensor-parallel linear's output, ``scale * B (A x)``, on this rank's shards.

    Column-parallel base (x whole, A [r, in] replicated, B [out/tp, r] this rank's rows)::

        h = A x;  y_local = scale * B_local h
        backward: dh = sum over ranks of scale * B_r^T dy_r (all-reduce), dA = dh x^T, dx = A^T dh (whole)

    Row-parallel base (x [.., in/tp] this rank's columns, A [r, in/tp] its columns, B [out, r] replicated)::

        h = sum over ranks of A_r x_r (all-reduce);  y = scale * B h (whole, like the base's reduced output)
        backward: dh = scale * B^T dy (identical on every rank), dB = scale * dy h^T, dA_r = dh x_r^T, dx_r = A_r^T dh

    ``group`` None: one rank holds everything; no communication.
    """
    h = x @ a.t()
    if column:
        if group is not None:
            h = _GradAllReduce.apply(h, group)
    elif group is not None:
        h = _ForwardAllReduce.apply(h, group)
    return scale * (h @ b.t())


class Adapter(nn.Module):
    """The factors of one adapted linear on one rank; ``delta(x)`` is its addition to the base output."""

    def __init__(self, target: Target, in_local: int, out_local: int, cfg: LoRAConfig, in_full: int,
                 tp_rank: int, group: dist.ProcessGroup | None, dtype: torch.dtype):
        super().__init__()
        # deferred: megatron-core costs seconds of start-up; checkpoint.lora imports this module for every subcommand
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.target, self.group, self.in_full, self.tp_rank = target, group, in_full, tp_rank
        self.scale, self.dropout = cfg.alpha / cfg.rank, cfg.dropout
        self.lora_A = nn.Parameter(torch.zeros(cfg.rank, in_local, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_local, cfg.rank, dtype=dtype))
        split, dim = (self.lora_B, 0) if target.column else (self.lora_A, 1)
        set_tensor_model_parallel_attributes(split, True, dim, 1)

    def delta(self, x: Tensor) -> Tensor:
        if self.dropout and self.training:
            x = x * self._dropout_mask(x)
        return lora_delta(x, self.lora_A, self.lora_B, self.scale, self.target.column, self.group)

    def _dropout_mask(self, x: Tensor) -> Tensor:
        # Drawn over the whole input width from the default generator (the same on every TP rank of a replica)
        # and sliced for a row-parallel input, so the mask does not depend on TP.
        width = x.shape[-1] if self.target.column else self.in_full
        keep = torch.rand(*x.shape[:-1], width, device=x.device) >= self.dropout
        if not self.target.column:
            keep = keep[..., self.tp_rank * x.shape[-1]: (self.tp_rank + 1) * x.shape[-1]]
        return keep.to(x.dtype) / (1.0 - self.dropout)


class LoRA(nn.Module):
    """Every adapter of one pipeline stage, ``layers[j][target]`` for the stage's local layer j; ``enabled``
    switches them all (``adapters_disabled``)."""

    def __init__(self, layers: list[dict[str, Adapter]], first_layer: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({_key(t): a for t, a in per.items()}) for per in layers)
        self.first_layer = first_layer
        self.enabled = True

    def adapters(self) -> Iterator[tuple[int, str, Adapter]]:
        """(global layer index, target, adapter)."""
        for j, per in enumerate(self.layers):
            for key, adapter in per.items():
                yield self.first_layer + j, _target(key), adapter


def _key(target: str) -> str:
    return target.replace("-", "_")


def _target(key: str) -> str:
    return key.replace("_", "-")


def add_adapters(stage: nn.Module, cfg: LoRAConfig, tp: int, tp_rank: int, pp: int, pp_rank: int,
                 group: dist.ProcessGroup | None, input_requires_grad: bool) -> LoRA:
    """Freeze ``stage`` (a ``DiffusionLM``), give it ``stage.lora`` (adapters initialised from ``cfg.seed``)
    hooked into its decoder's linears, and return it.

    ``input_requires_grad``: make the first stage's decoder input require grad. megatron's full recompute is a
    reentrant checkpoint whose backward runs only if an input requires grad; with the embedding frozen, nothing
    would, and the first stage's adapters would get no gradient.
    """
    m = stage.cfg
    dtype = next(stage.module.parameters()).dtype
    stage.module.requires_grad_(False)
    shapes = canonical_shapes(m)
    layers = []
    for layer in stage.module.decoder.layers:
        per = {}
        for name in cfg.targets:
            t = TARGETS[name]
            base = layer.get_submodule(t.module)
            out_local, in_local = base.weight.shape
            in_full = shapes[f"layers.0.{t.parts[0]}"][1]
            per[name] = Adapter(t, in_local, out_local, cfg, in_full, tp_rank, group, dtype)
        layers.append(per)
    first = layer_range(m.num_layers, pp, pp_rank).start
    lora = LoRA(layers, first)
    for j, layer in enumerate(stage.module.decoder.layers):
        for name, adapter in layers[j].items():
            layer.get_submodule(TARGETS[name].module).register_forward_hook(_hook(lora, adapter), with_kwargs=True)
    stage.lora = lora
    load_adapters(stage, initial_adapters(m, cfg, range(first, first + len(layers))), tp, tp_rank, pp, pp_rank)
    if input_requires_grad and getattr(stage.module, "pre_process", False):
        stage.module.embedding.register_forward_hook(_require_grad)
    return lora


def _hook(lora: LoRA, adapter: Adapter):
    def hook(module, args, kwargs, output):
        if not lora.enabled:
            return None
        x = args[0] if args else kwargs["input_"]
        out, bias = output
        return out + adapter.delta(x).to(out.dtype), bias

    return hook


def _require_grad(module, args, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_()
    return None


@contextlib.contextmanager
def adapters_disabled(stage: nn.Module) -> Iterator[None]:
    """The stage computes its base weights (theta_0 while only adapters train) inside; restored even on error."""
    lora = stage.lora
    before, lora.enabled = lora.enabled, False
    try:
        yield
    finally:
        lora.enabled = before


# ------------------------------------------------------------------------------------- canonical layout


def canonical_names(targets: list[str], layers: range) -> list[str]:
    return [f"layers.{i}.{part}.lora_{f}" for i in layers for t in targets for part in TARGETS[t].parts
            for f in "AB"]


def initial_adapters(m: ModelConfig, cfg: LoRAConfig, layers: range) -> dict[str, Tensor]:
    """Canonical initial adapters of ``layers``: each fused A kaiming-uniform (bound 1/sqrt(in), PEFT's
    ``kaiming_uniform_(a=sqrt(5))``) from a generator seeded by (seed, layer, target), repeated for its parts;
    B zero. Independent of TP and PP."""
    shapes = canonical_shapes(m)
    out = {}
    for i in layers:
        for k, name in enumerate(TARGETS):
            if name not in cfg.targets:
                continue
            parts = TARGETS[name].parts
            in_full = shapes[f"layers.{i}.{parts[0]}"][1]
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i * len(TARGETS) + k)
            a = (torch.rand(cfg.rank, in_full, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(in_full)
            for part in parts:
                out[f"layers.{i}.{part}.lora_A"] = a.float()
                out[f"layers.{i}.{part}.lora_B"] = torch.zeros(shapes[f"layers.{i}.{part}"][0], cfg.rank)
    return out


def load_adapters(stage: nn.Module, canonical: Mapping[str, Tensor], tp: int, tp_rank: int, pp: int,
                  pp_rank: int) -> None:
    """Copy this rank's shards of canonical adapters into ``stage.lora``; ValueError naming what is missing."""
    m = stage.cfg

    def reader(factor: str):
        def read(name: str, rows, cols) -> Tensor:
            key = f"{name}.lora_{factor}"
            if key not in canonical:
                raise ValueError(f"adapter tensor {key} is missing")
            t = canonical[key]
            t = t if rows is None else t[rows]
            return t if cols is None else t[:, cols]
        return read

    with torch.no_grad():
        for i, name, adapter in stage.lora.adapters():
            t = TARGETS[name]
            weight = f"decoder.layers.{i - stage.lora.first_layer}.{t.module}.weight"
            split = rank_tensor(m, weight, reader("B" if t.column else "A"), tp, tp_rank, pp, pp_rank)
            whole = [reader("A" if t.column else "B")(f"layers.{i}.{p}", None, None) for p in t.parts]
            if any(not torch.equal(whole[0], w) for w in whole[1:]):
                raise ValueError(f"layers.{i}.{{{','.join(t.parts)}}}.lora_A differ: mdu-dist's fused {name} "
                                 "adapter has one A for all of them")
            a, b = (whole[0], split) if t.column else (split, whole[0])
            for param, value in ((adapter.lora_A, a), (adapter.lora_B, b)):
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"layers.{i} {name} adapter: expected {tuple(param.shape)}, got "
                                     f"{tuple(value.shape)} (another rank or model shape?)")
                param.copy_(value)


def gather_adapters(stage: nn.Module, group: dist.ProcessGroup | None) -> dict[str, Tensor]:
    """Collective over the TP group: this stage's adapters in canonical layout (fp32, on the CPU), on every
    TP rank. Inverts ``load_adapters``: QKV's B rows de-interleaved per query group, fc1's [gate_r; up_r]."""
    m = stage.cfg
    hd, groups = m.head_dim, m.num_query_groups
    per_group = m.num_attention_heads // groups * hd
    out = {}

    def whole(t: Tensor) -> list[Tensor]:
        t = t.detach().float().contiguous()
        if group is None:
            return [t.cpu()]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        return [p.cpu() for p in parts]

    for i, name, adapter in stage.lora.adapters():
        t, c = TARGETS[name], f"layers.{i}."
        a, b = adapter.lora_A.detach().float().cpu(), adapter.lora_B.detach().float().cpu()
        if name == "qkv":
            fused = torch.cat(whole(adapter.lora_B)).reshape(groups, per_group + 2 * hd, -1)
            pieces = [p.reshape(-1, p.shape[-1]) for p in fused.split([per_group, hd, hd], dim=1)]
        elif name == "mlp-in":
            halves = [p.chunk(2) for p in whole(adapter.lora_B)]
            pieces = [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
        else:
            pieces = [torch.cat(whole(adapter.lora_A), dim=1)]
        for part, piece in zip(t.parts, pieces, strict=True):
            out[c + part + ".lora_A"] = a if t.column else piece
            out[c + part + ".lora_B"] = piece if t.column else b
    return out


def merged(weight: Tensor, a: Tensor, b: Tensor, cfg: LoRAConfig) -> Tensor:
    """A base weight with its adapter folded in: W + (alpha / r) B A, computed in fp32."""
    return (weight.float() + (cfg.alpha / cfg.rank) * (b.float() @ a.float())).to(weight.dtype)


# ------------------------------------------------------------------------------------------------ PEFT


def peft_target_regex(arch: str, targets: list[str]) -> str:
    """PEFT's ``target_modules`` as a regex over full module names (PEFT full-matches a string): exactly the
    adapted block modules. A plain suffix list would also catch LLaDA's head ``model.transformer.ff_out``, which
    shares its suffix with every block's down projection ``...blocks.{i}.ff_out``."""
    names = ARCHS[arch].layer_names
    modules = [re.escape(names[p].removesuffix(".weight")).replace(r"\{i\}", r"\d+")
               for t in targets for p in TARGETS[t].parts]
    return "^(" + "|".join(modules) + ")$"


def peft_tensors(arch: str, canonical: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical adapters under PEFT's keys: ``base_model.model.<HF module>.lora_{A,B}.weight``."""
    out = {}
    for name, tensor in canonical.items():
        base, factor = name.rsplit(".", 1)
        module = ARCHS[arch].hf_name(base).removesuffix(".weight")
        out[f"base_model.model.{module}.{factor}.weight"] = tensor
    return out


def peft_config(arch: str, cfg: LoRAConfig, base: str) -> dict:
    return {"peft_type": "LORA", "task_type": None, "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": peft_target_regex(arch, cfg.targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "base_model_name_or_path": base, "inference_mode": True}


def adapter_parameters(m: ModelConfig, cfg: LoRAConfig, tp: int, layers: int) -> int:
    """Adapter parameters held by one TP rank of a stage of ``layers`` layers (the replicated factor whole, the
    split one its 1/tp)."""
    shapes = canonical_shapes(m)
    total = 0
    for name in cfg.targets:
        t = TARGETS[name]
        out = sum(shapes[f"layers.0.{p}"][0] for p in t.parts)
        in_ = shapes[f"layers.0.{t.parts[0]}"][1]
        total += cfg.rank * (in_ + out // tp) if t.column else cfg.rank * (in_ // tp + out)
    return layers * total
