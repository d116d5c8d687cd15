"""Typed configuration: dataclasses loaded from YAML, overridden from the command line with ``key.sub=value``.

A config that does not validate fails here, before any process group is created, with one line naming the
file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A run section is defined next to the code it configures when that module imports nothing that imports this
# one (data, methods, optim, launch.config, eval.config); the trainer's section is here, as the trainer sits
# above the models and checkpoints that import ModelConfig. Config composes them.
from mdu_dist.data import DataConfig
from mdu_dist.errors import ConfigError
from mdu_dist.eval.config import EvalConfig
from mdu_dist.launch.config import LaunchConfig
from mdu_dist.methods import MethodConfig
from mdu_dist.models import ARCHS
from mdu_dist.optim import OptimConfig, check_pipeline


ATTENTIONS = ("sdpa", "local", "te")


@dataclass
class ModelConfig:
    """Shape of a masked-diffusion backbone. ``arch`` selects the weight layout and the logit shift."""

    arch: str = "llada"  # llada | dream | llada2 | llada_moe
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 4  # == num_attention_heads for MHA (LLaDA); fewer for GQA (Dream)
    ffn_hidden_size: int = 128
    vocab_size: int = 512
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    mask_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 1
    # Megatron convention: the embedding/head rows are padded to a multiple of this times the TP size so
    # every TP rank holds an equal, aligned vocab slice; padded logits are masked out of every loss.
    make_vocab_size_divisible_by: int = 128
    init_std: float = 0.02
    # Core attention: sdpa (torch's scaled_dot_product_attention: flash / memory-efficient kernels on CUDA) |
    # local (megatron-core's unfused DotProductAttention, which keeps the [b, heads, s, s] probabilities) |
    # te (Transformer Engine's fused attention; only where transformer_engine imports).
    attention: str = "sdpa"
    # Attention by blocks of this many positions (LLaDA2's block diffusion; models.masks): position i attends j iff
    # j // block_size <= i // block_size. 0: full bidirectional attention.
    block_size: int = 0
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (llada2, llada_moe)
    rotary_percent: float = 1.0  # RoPE rotates the first this fraction of each head's dimensions (llada2: 0.5)
    # Mixture of experts (llada2, llada_moe; docs/moe.md). moe_num_experts = 0: every layer has a dense SwiGLU.
    moe_num_experts: int = 0
    moe_topk: int = 0  # experts each token is sent to
    moe_ffn_hidden_size: int = 0  # SwiGLU width of one routed expert
    moe_shared_ffn_hidden_size: int = 0  # SwiGLU width of the shared expert every token also takes (0: none)
    moe_dense_layers: int = 0  # the first this many layers keep a dense SwiGLU of ffn_hidden_size
    moe_score: str = "softmax"  # the router's score: sigmoid (llada2) | softmax (llada_moe)
    moe_renormalize: bool = True  # the chosen experts' scores divided by their sum (softmax: False = as scored)
    moe_num_groups: int = 0  # group-limited choice: the experts form this many groups (0: no groups) ...
    moe_group_topk: int = 0  # ... of which the best this many (by the sum of their top-2 scores) are eligible
    moe_topk_scaling: float = 1.0  # the chosen experts' weights are multiplied by this (llada2: 2.5)
    moe_expert_bias: bool = False  # a per-expert fp32 bias added to the scores to choose experts only; frozen

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def validate(self, where: str = "model") -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"{where}.arch={self.arch!r} is not a known backbone (known: {sorted(ARCHS)})")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}.hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"{where}.num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_query_groups={self.num_query_groups}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"{where}.attention={self.attention!r} must be one of {', '.join(ATTENTIONS)}")
        if self.block_size < 0:
            raise ConfigError(f"{where}.block_size={self.block_size} must be >= 0 (0: full bidirectional attention)")
        if self.block_size and self.attention == "te":
            raise ConfigError(f"{where}.block_size={self.block_size} needs an attention mask, which "
                              f"model.attention=te does not take here; use model.attention=sdpa or local")
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head dim {self.head_dim} must be even for RoPE")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} is outside the vocabulary "
                                  f"[0, {self.vocab_size})")
        rotary = self.head_dim * self.rotary_percent
        if not 0 < self.rotary_percent <= 1 or rotary != int(rotary) or int(rotary) % 2:
            raise ConfigError(f"{where}.rotary_percent={self.rotary_percent} must be in (0, 1] and rotate an even "
                              f"number of the {self.head_dim} dimensions of a head")
        self._validate_moe(where, ARCHS[self.arch].moe)

    def _validate_moe(self, where: str, arch_has_experts: bool) -> None:
        if arch_has_experts != self.is_moe:
            raise ConfigError(f"{where}.moe_num_experts={self.moe_num_experts}: arch {self.arch!r} "
                              + ("has routed experts (set it > 0)" if arch_has_experts else "has no routed experts"))
        if not self.is_moe:
            return
        if not 1 <= self.moe_topk <= self.moe_num_experts:
            raise ConfigError(f"{where}.moe_topk={self.moe_topk} must be in [1, moe_num_experts="
                              f"{self.moe_num_experts}]")
        if self.moe_ffn_hidden_size <= 0 or self.moe_shared_ffn_hidden_size < 0:
            raise ConfigError(f"{where}: moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be positive and "
                              f"moe_shared_ffn_hidden_size={self.moe_shared_ffn_hidden_size} >= 0")
        if not 0 <= self.moe_dense_layers < self.num_layers:
            raise ConfigError(f"{where}.moe_dense_layers={self.moe_dense_layers} must be in [0, num_layers="
                              f"{self.num_layers})")
        if self.moe_score not in ("sigmoid", "softmax"):
            raise ConfigError(f"{where}.moe_score={self.moe_score!r} must be sigmoid or softmax")
        # megatron-core renormalises sigmoid scores always, and softmax ones unless moe_router_pre_softmax.
        if self.moe_score == "sigmoid" and not self.moe_renormalize and self.moe_topk > 1:
            raise ConfigError(f"{where}.moe_renormalize=false: megatron-core always renormalises sigmoid scores")
        if self.moe_expert_bias and self.moe_score != "sigmoid":
            raise ConfigError(f"{where}.moe_expert_bias=true needs moe_score=sigmoid (megatron-core adds the bias "
                              f"to sigmoid scores to choose experts; LLaDA-MoE's HF code would add it to the weights)")
        if self.moe_num_groups:
            g, kept = self.moe_num_groups, self.moe_group_topk
            if self.moe_num_experts % g or not 1 <= kept <= g:
                raise ConfigError(f"{where}: moe_num_groups={g} must divide moe_num_experts={self.moe_num_experts} "
                                  f"and moe_group_topk={kept} be in [1, {g}]")
            # LLaDA2 (and GLM-4-MoE) score a group by the sum of its top-2 experts; megatron-core by its top
            # topk / group_topk, so the two agree only here.
            if self.moe_topk != 2 * kept:
                raise ConfigError(f"{where}.moe_group_topk={kept}: a group is scored by its top-2 experts, which "
                                  f"megatron-core does only when moe_topk = 2 x moe_group_topk (moe_topk="
                                  f"{self.moe_topk})")
        elif self.moe_group_topk:
            raise ConfigError(f"{where}.moe_group_topk={self.moe_group_topk} needs moe_num_groups > 0")


@dataclass
class ParallelConfig:
    """Parallel layout. The data-parallel size is derived: world_size / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1
    # Expert parallelism (routed experts sharded over ranks): refused, see ``validate`` and docs/moe.md.
    expert: int = 1
    backend: str = "auto"  # auto (nccl with CUDA, gloo without) | nccl | gloo
    seed: int = 1234

    def validate(self, where: str = "parallel") -> None:
        if self.tensor < 1 or self.pipeline < 1:
            raise ConfigError(f"{where}: tensor={self.tensor} and pipeline={self.pipeline} must be >= 1")
        if self.expert != 1:
            # megatron-core marks expert parameters allreduce=False under EP; DeepSpeed reads that attribute as "its
            # own MoE parameter" (deepspeed.moe.utils.is_moe_param) and broadcasts / reduces / norms such
            # parameters over expert groups keyed by param.group_name that it builds only for deepspeed.moe layers.
            raise ConfigError(f"{where}.expert={self.expert}: expert parallelism is not supported with DeepSpeed "
                              f"ZeRO here (it would reduce megatron-core's expert gradients over groups it never "
                              f"builds); use parallel.expert=1 with parallel.pipeline and data parallelism (ZeRO), "
                              f"which hold every expert on each pipeline stage")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"{where}.backend={self.backend!r} must be one of auto, nccl, gloo")


@dataclass
class TrainConfig:
    """The run itself. Sizes are per data-parallel replica."""

    init: str = ""  # HF checkpoint directory to start from; "" = random init (tiny models only)
    tokenizer: str = ""  # tokenizer directory; "" = the init directory's, else one trained on the data
    output_dir: str = "runs/mdu"
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0 = run the epochs)
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: str = "none"  # none | auto (latest complete checkpoint in output_dir/checkpoints)
    seed: int = 0
    # Activation recomputation of the policy (models.mcore.RECOMPUTE): none | selective (core attention) |
    # full (every layer). The frozen reference runs under no_grad and stores nothing either way.
    recompute: str = "none"
    progress: bool = True  # the tqdm bar (TensorBoard scalars are written either way)

    def validate(self, where: str = "train") -> None:
        for name in ("epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        if self.max_steps < 0 or self.save_every < 0:
            raise ConfigError(f"{where}: max_steps and save_every must be >= 0")
        if self.resume not in ("none", "auto"):
            raise ConfigError(f"{where}.resume={self.resume!r} must be none or auto")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"{where}.recompute={self.recompute!r} must be none, selective or full")


LORA_TARGETS = ("qkv", "attn-out", "mlp-in", "mlp-out")
LORA_REFERENCES = ("adapters-off", "copy")


@dataclass
class LoRAConfig:
    """Low-rank adapters (``models.lora``): ``rank`` 0 trains every parameter; above 0 only the adapters train
    and the base stays frozen."""

    rank: int = 0
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    # Which linears of every layer get an adapter: qkv (attention q/k/v), attn-out (attention output),
    # mlp-in (SwiGLU gate and up), mlp-out (down).
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    seed: int = 0  # draws A (B starts at zero)
    # The reference of MDU's anchor, NPO, SimNPO and DPO: adapters-off (the policy with its adapters switched off:
    # theta_0, no second copy) | copy (a separate frozen copy, as without LoRA).
    reference: str = "adapters-off"

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self, where: str = "lora") -> None:
        if self.rank < 0:
            raise ConfigError(f"{where}.rank={self.rank} must be >= 0 (0 = off)")
        if not self.alpha > 0:
            raise ConfigError(f"{where}.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise ConfigError(f"{where}.targets is empty: name some of {', '.join(LORA_TARGETS)}")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ConfigError(f"{where}.targets: {t!r} is not one of {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"{where}.targets={self.targets} names a target twice")
        if self.reference not in LORA_REFERENCES:
            raise ConfigError(f"{where}.reference={self.reference!r} must be one of {', '.join(LORA_REFERENCES)}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> None:
        for section in (self.model, self.parallel, self.data, self.method, self.optim, self.train, self.eval,
                        self.launch, self.lora):
            section.validate()
        if self.lora.enabled and self.optim.zero_stage == 3:
            # ZeRO-3 partitions the frozen base too; untested with adapters here.
            raise ConfigError(f"lora.rank={self.lora.rank} needs optim.zero_stage 1 or 2 (got 3)")
        check_layout(self.model, self.parallel.tensor, self.parallel.pipeline)
        check_data_layout(self.data.layout, self.model)
        check_pipeline(self.optim, self.parallel.pipeline)
        self.eval.check_sampler(self.model.arch)


def check_data_layout(layout: str, model: ModelConfig) -> None:
    """``data.layout=block`` needs the blocks of ``model.block_size`` and logits that are not shifted (both
    copies' columns predict their own tokens)."""
    if layout != "block":
        return
    if model.block_size < 1:
        raise ConfigError(f"data.layout=block needs model.block_size > 0 (got {model.block_size}); LLaDA2 uses 32")
    if ARCHS[model.arch].shift_logits:
        raise ConfigError(f"data.layout=block: model.arch={model.arch} shifts its logits; the two-copy layout is "
                          f"for unshifted block-diffusion models (llada2)")


def check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    """Refuse a TP/PP layout that cannot shard ``model``; naming the offending value."""
    if model.num_attention_heads % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide num_attention_heads={model.num_attention_heads}")
    if model.num_query_groups % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide the KV heads "
                          f"(num_query_groups={model.num_query_groups})")
    if model.ffn_hidden_size % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide ffn_hidden_size={model.ffn_hidden_size}")
    if model.num_layers % pp:
        raise ConfigError(f"parallel.pipeline={pp} does not divide num_layers={model.num_layers}")
    if model.is_moe and tp > 1:
        # megatron-core's MoE layers refuse to train under TP without sequence parallelism, which mdu-dist's
        # models do not run; pipeline and data parallelism shard an MoE model exactly.
        raise ConfigError(f"parallel.tensor={tp}: the {model.arch} mixture-of-experts layers run with "
                          f"parallel.tensor=1 only (megatron-core needs sequence parallelism for MoE under TP); "
                          f"use parallel.pipeline and data parallelism (ZeRO) instead")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, _, raw = text.partition("=")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _build(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str] = ()) -> dict:
    """A copy of the config tree ``data`` with each ``key.sub=value`` set (not validated yet)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    for text in overrides:
        keys, value = _parse_override(text)
        _set_dotted(tree, keys, value)
    return tree


def config_from_dict(data: dict, overrides: list[str] = (), source: str = "<dict>", cls: type = Config) -> Any:
    try:
        cfg = _build(cls, apply_overrides(data, overrides), "")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def read_config_file(path: str | Path | None) -> tuple[dict, str]:
    """The YAML tree of ``path`` and the name errors give it; ``None``: no file, the defaults."""
    if path is None:
        return {}, "<defaults>"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data or {}, str(path)


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = Config) -> Any:
    """Load ``path`` (YAML), apply ``key.sub=value`` overrides, validate; ``path=None`` starts from defaults."""
    data, source = read_config_file(path)
    return config_from_dict(data, overrides, source, cls)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
