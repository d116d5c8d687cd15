"""HF-layout checkpoints: ``config.json`` and ``model.safetensors``, or shards + ``model.safetensors.index.json``.

The tensors are the backbone's HF names (``mdu_dist.models.dense.to_hf``); config.json is written the way the
backbone's own HF code writes it (LLaDA: OLMo-style keys, model_type "llada"; Dream: Qwen2 keys, model_type
"Dream"; LLaDA2: LLaDA2MoeConfig's keys, model_type "llada2_moe"; LLaDA-MoE: LLaDAMoEConfig's, architectures
"LLaDAMoEModelLM") so the output loads with the original ``trust_remote_code`` models. Every tensor is written in
one dtype except the MoE router's expert bias, kept fp32 (``models.dense.stored_dtype``). No pickle is involved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from mdu_dist.checkpoint.atomic import atomic_dir
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.config import ConfigError, ModelConfig, config_from_dict
from mdu_dist.models.dense import canonical_shapes, hf_parts, hf_rows, hf_shapes, layout_errors, stored_dtype

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


_QWEN_SHAPE = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "vocab_size": "vocab_size", "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings",
    "mask_token_id": "mask_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
    "init_std": "initializer_range",
}
# ModelConfig field -> config.json key, per backbone.
_HF_KEYS: dict[str, dict[str, str]] = {
    "llada": {
        "num_layers": "n_layers", "hidden_size": "d_model", "num_attention_heads": "n_heads",
        "num_query_groups": "n_kv_heads", "ffn_hidden_size": "mlp_hidden_size",
        # LLaDA's embedding/head have ``embedding_size`` rows (>= the tokenizer's ``vocab_size``).
        "vocab_size": "embedding_size",
        "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "max_position_embeddings": "max_sequence_length",
        "mask_token_id": "mask_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
        "init_std": "init_std",
    },
    "dream": {**_QWEN_SHAPE, "ffn_hidden_size": "intermediate_size"},
    # LLaDA2MoeConfig. The shared expert's width is num_shared_experts x moe_intermediate_size (_derived).
    "llada2": {
        **_QWEN_SHAPE, "ffn_hidden_size": "intermediate_size", "rotary_percent": "partial_rotary_factor",
        "moe_num_experts": "num_experts", "moe_topk": "num_experts_per_tok",
        "moe_ffn_hidden_size": "moe_intermediate_size", "moe_dense_layers": "first_k_dense_replace",
        "moe_num_groups": "n_group", "moe_group_topk": "topk_group", "moe_topk_scaling": "routed_scaling_factor",
        "moe_expert_bias": "moe_router_enable_expert_bias",
    },
    # LLaDAMoEConfig (OLMoE-like). Its dense layers are the 0s of moe_layer_freq (_derived).
    "llada_moe": {
        **_QWEN_SHAPE, "ffn_hidden_size": "dense_intermediate_size", "rotary_percent": "partial_rotary_factor",
        "moe_num_experts": "num_experts", "moe_topk": "num_experts_per_tok",
        "moe_ffn_hidden_size": "expert_intermediate_size",
    },
}
# Values of fields a config.json may leave out (the HF code's defaults; LLaDA2's and LLaDA-MoE's mask token is a
# tokenizer/generation setting, not a config.json key).
_OPTIONAL: dict[str, dict[str, Any]] = {
    "llada2": {"mask_token_id": 156895, "eos_token_id": 156892, "moe_expert_bias": True, "rotary_percent": 1.0,
               "moe_num_groups": 0, "moe_group_topk": 0, "moe_topk_scaling": 1.0, "moe_dense_layers": 0},
    # Not partial_rotary_factor: LLaDAConfig defaults it to -1, which makes its RoPE rotate no dimension at all.
    "llada_moe": {"mask_token_id": 156895, "eos_token_id": 156892},
}

# config.json entries that describe the maths mdu-dist implements; a checkpoint that sets them otherwise is
# another model. ``model_type`` (LLaDA-MoE: ``architectures``, its released config.json says model_type llada)
# is what tells the backbones apart.
_FIXED: dict[str, dict[str, Any]] = {
    "llada": {
        "model_type": "llada", "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
        "rope": True, "alibi": False, "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
    },
    "dream": {
        "model_type": "Dream", "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
        "rope_scaling": None,
    },
    "llada2": {
        "model_type": "llada2_moe", "hidden_act": "silu", "tie_word_embeddings": False, "use_qkv_bias": False,
        "use_bias": False, "use_qk_norm": True, "score_function": "sigmoid", "norm_topk_prob": True,
        "rope_scaling": None,
    },
    # Not moe_router_score_function nor norm_topk_prob: modeling_lladamoe.py always takes a softmax over all
    # experts and never renormalises the top-k, whatever they say.
    "llada_moe": {
        "architectures": ["LLaDAMoEModelLM"], "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "qk_layernorm": True, "moe_router_enable_expert_bias": False, "clip_qkv": None,
        "rope_scaling": None,
    },
}
_IDENTITY_KEYS = ("model_type", "architectures")  # checked even when absent from config.json
# Keys the backbone's HF code reads as truth values (``if config.qk_layernorm:``), whose config class defaults
# them to None: null or absent is false, and is checked as such.
_READ_AS_BOOL = {"llada_moe": ("qk_layernorm", "moe_router_enable_expert_bias")}
_ARCHITECTURES = {"llada": ["LLaDAModelLM"], "dream": ["DreamModel"], "llada2": ["LLaDA2MoeModelLM"],
                  "llada_moe": ["LLaDAMoEModelLM"]}
# ModelConfig fields each backbone fixes: LLaDA never has biases, Dream (Qwen2) always q/k/v biases; the MoE
# backbones' routers.
_ARCH_FIELDS: dict[str, dict[str, Any]] = {
    "llada": {"qkv_bias": False}, "dream": {"qkv_bias": True},
    # LLaDA2's config.json has no block size: its releases were post-trained, and are sampled, in blocks of 32.
    "llada2": {"qkv_bias": False, "qk_norm": True, "moe_score": "sigmoid", "moe_renormalize": True, "block_size": 32},
    "llada_moe": {"qkv_bias": False, "qk_norm": True, "moe_score": "softmax", "moe_renormalize": False},
}

# Fields that decide what function the weights compute; a run config must agree with the checkpoint on them.
MUST_MATCH = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "rope_theta", "norm_eps", "qkv_bias", "mask_token_id", "qk_norm", "rotary_percent",
               "moe_num_experts", "moe_topk", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size",
               "moe_dense_layers", "moe_score", "moe_renormalize", "moe_num_groups", "moe_group_topk",
               "moe_topk_scaling", "moe_expert_bias")


def arch_of_hf_config(hf: Mapping[str, Any]) -> str | None:
    """The backbone a config.json describes (by model_type; LLaDA-MoE by its architectures), or None."""
    if hf.get("architectures") == _ARCHITECTURES["llada_moe"]:
        return "llada_moe"
    return {"llada": "llada", "Dream": "dream", "llada2_moe": "llada2"}.get(hf.get("model_type"))


def model_config_to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json contents for ``cfg`` in the backbone's HF style."""
    for name, want in _ARCH_FIELDS[cfg.arch].items():
        if getattr(cfg, name) != want:
            raise ConfigError(f"model.{name}={getattr(cfg, name)!r} cannot be written as a {cfg.arch} config.json "
                              f"({cfg.arch} has {name}={want!r})")
    hf = {"architectures": _ARCHITECTURES[cfg.arch], **_FIXED[cfg.arch]}
    hf.update({key: getattr(cfg, name) for name, key in _HF_KEYS[cfg.arch].items()})
    if cfg.is_moe:
        hf["head_dim"] = cfg.head_dim
    if cfg.arch == "llada":
        hf["vocab_size"] = cfg.vocab_size
    elif cfg.arch == "llada2":
        if cfg.moe_shared_ffn_hidden_size % cfg.moe_ffn_hidden_size:
            raise ConfigError(f"model.moe_shared_ffn_hidden_size={cfg.moe_shared_ffn_hidden_size} is not a multiple "
                              f"of moe_ffn_hidden_size={cfg.moe_ffn_hidden_size}, as LLaDA2's num_shared_experts needs")
        hf["num_shared_experts"] = cfg.moe_shared_ffn_hidden_size // cfg.moe_ffn_hidden_size
        hf["n_group"], hf["topk_group"] = cfg.moe_num_groups or 1, cfg.moe_group_topk or 1
    elif cfg.arch == "llada_moe":
        hf["model_type"] = "lladamoe"  # what dllm's LLaDA-MoE code registers under
        hf["moe_router_score_function"] = "softmax"  # what its router is; modeling_lladamoe.py never reads the key
        hf["moe_layer_freq"] = [0] * cfg.moe_dense_layers + [1] * (cfg.num_layers - cfg.moe_dense_layers)
        hf["shared_expert_intermediate_size"] = cfg.moe_shared_ffn_hidden_size or None
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return hf


def _derived(hf: Mapping[str, Any], arch: str, source: str) -> dict[str, Any]:
    """ModelConfig fields a backbone's config.json states in its own terms."""
    if arch == "llada2":
        shared = hf.get("num_shared_experts", 0) or 0
        out = {"moe_shared_ffn_hidden_size": shared * hf.get("moe_intermediate_size", 0)}
        if (hf.get("n_group") or 1) == 1:  # one group holding every expert: no group-limited choice
            out.update(moe_num_groups=0, moe_group_topk=0)
        return out
    if arch == "llada_moe":
        freq = hf.get("moe_layer_freq")
        layers = hf.get("num_hidden_layers")
        if (not isinstance(freq, list) or sorted(freq) != freq or set(freq) - {0, 1} or 1 not in freq
                or len(freq) != layers):
            raise ConfigError(f"{source}: moe_layer_freq={freq!r}: mdu-dist runs dense layers (0) first, then MoE "
                              f"layers (1), as a list of one entry per layer (num_hidden_layers={layers!r})")
        return {"moe_dense_layers": freq.count(0), "moe_shared_ffn_hidden_size": hf.get("shared_expert_intermediate_size") or 0}
    return {}


def hf_config_to_model_config(hf: Mapping[str, Any], arch: str, source: str = CONFIG_FILE) -> ModelConfig:
    """ModelConfig described by a config.json dict; ConfigError naming ``source`` and the key otherwise."""
    if arch not in _HF_KEYS:
        raise ConfigError(f"{source}: unknown arch {arch!r} (known: {sorted(_HF_KEYS)})")
    as_bool = _READ_AS_BOOL.get(arch, ())
    for key, want in _FIXED[arch].items():
        if key in _IDENTITY_KEYS or key in as_bool or key in hf:
            got = bool(hf.get(key)) if key in as_bool else hf.get(key)
            if got != want:
                raise ConfigError(f"{source}: {key}={hf.get(key)!r} but a {arch} checkpoint has {key}={want!r}")
    fields: dict[str, Any] = {"arch": arch, **_ARCH_FIELDS[arch]}
    optional = _OPTIONAL.get(arch, {})
    for name, key in _HF_KEYS[arch].items():
        if key == "embedding_size" and hf.get(key) is None:
            key = "vocab_size"
        if hf.get(key) is None and name in optional:
            fields[name] = optional[name]
            continue
        if key not in hf and name == "init_std":
            continue  # only fresh initialisation uses it: keep the ModelConfig default
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r} (needed for {arch} {name})")
        fields[name] = hf[key]
    fields.update(_derived(hf, arch, source))
    cfg = config_from_dict({"model": fields}, source=source).model
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise ConfigError(f"{source}: head_dim={hf['head_dim']} but hidden_size / num_attention_heads = {cfg.head_dim}")
    return cfg


def hf_model_keys(hf: Mapping[str, Any], source: str = CONFIG_FILE) -> dict[str, Any]:
    """The ModelConfig keys a config.json fixes (backbone, shape, router, special token ids), checked; the
    backbone is told by ``arch_of_hf_config``."""
    arch = arch_of_hf_config(hf)
    if arch is None:
        known = ", ".join(f"{a} ({names[0]})" for a, names in _ARCHITECTURES.items())
        raise ConfigError(f"{source}: model_type={hf.get('model_type')!r} (architectures="
                          f"{hf.get('architectures')!r}) is not a backbone mdu-dist knows (known: {known})")
    cfg = hf_config_to_model_config(hf, arch, source)
    # config.json holds no vocabulary padding and no attention kernel; an initialisation scale only sometimes
    unset = {"make_vocab_size_divisible_by", "attention"} | ({"init_std"} if _HF_KEYS[arch]["init_std"] not in hf
                                                              else set())
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unset}


def save_hf_checkpoint(out_dir: str | Path, cfg: ModelConfig, hf_dict: Mapping[str, Tensor],
                       max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write ``hf_dict`` (HF names of ``cfg.arch``) and config.json to ``out_dir``, all or nothing.

    Everything is written into a temporary sibling directory that is renamed to ``out_dir`` at the end, so a
    failure never leaves a half-written ``out_dir``. With ``max_shard_bytes``, tensors are split in model order
    into shards of at most that size (a larger tensor gets a shard of its own), as HF's save_pretrained does.
    """
    out_dir = Path(out_dir)
    errors = layout_errors(cfg, {name: t.shape for name, t in hf_dict.items()})
    if errors:
        raise CheckpointError(f"{out_dir}: refusing to save: " + "; ".join(errors))
    names = list(hf_shapes(cfg))
    hf_config = model_config_to_hf_config(cfg, hf_dict[names[0]].dtype)
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        _write_tensors(tmp, names, hf_dict, max_shard_bytes)
    return out_dir


def _write_tensors(directory: Path, names: list[str], hf_dict: Mapping[str, Tensor],
                   max_shard_bytes: int | None) -> None:
    sizes = {n: hf_dict[n].numel() * hf_dict[n].element_size() for n in names}
    shards = _split(names, sizes, max_shard_bytes) if max_shard_bytes else [names]
    if len(shards) == 1:
        _save(directory / SINGLE_FILE, names, hf_dict)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _save(directory / file, shard, hf_dict)
        weight_map.update({n: file for n in shard})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_checkpoint(out_dir: str | Path, cfg: ModelConfig, tensors: Iterable[tuple[str, Tensor]],
                        dtype: torch.dtype, *, max_shard_bytes: int | None = None,
                        base_config: Mapping[str, Any] | None = None, extra_files: Iterable[Path] = (),
                        overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Write an HF-layout checkpoint from a stream of (HF name, tensor) pairs in model order, all or nothing.

    The shard plan and every safetensors header come from the shapes, so each tensor is written to its file as
    it arrives and dropped: nothing beyond what the stream itself holds stays in memory. config.json is
    ``base_config`` (the source checkpoint's, keeping keys mdu-dist does not model, e.g. ``auto_map``) updated
    with ``cfg`` and ``dtype``. ``extra_files`` (tokenizer, HF code) are copied. ``progress(nbytes)`` is called
    after each tensor.
    """
    out_dir = Path(out_dir)
    shapes = hf_shapes(cfg)
    names = list(shapes)
    dtypes = {hf: stored_dtype(cs[0], dtype) for hf, cs in hf_parts(cfg).items()}
    sizes = {n: math.prod(shapes[n]) * torch.empty((), dtype=dtypes[n]).element_size() for n in names}
    shards = _split(names, sizes, max_shard_bytes) if max_shard_bytes else [names]
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])
    ours = model_config_to_hf_config(cfg, dtype)
    owned = set(_HF_KEYS[cfg.arch].values()) | set(_FIXED[cfg.arch]) | {"architectures", "torch_dtype"}
    hf_config = dict(base_config or {})
    hf_config.update({k: v for k, v in ours.items() if k in owned or k not in hf_config})

    with atomic_dir(out_dir, overwrite) as tmp:
        for path in extra_files:
            if path.name not in (CONFIG_FILE, INDEX_FILE) and not path.name.endswith(".safetensors"):
                shutil.copy2(path, tmp / path.name)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        stream = iter(tensors)
        for shard, file in zip(shards, files):
            with open(tmp / file, "wb") as f:
                _write_safetensors_header(f, shard, shapes, dtypes)
                for want in shard:
                    name, tensor = next(stream, (None, None))
                    if name != want:
                        raise CheckpointError(f"{out_dir}: tensor stream gave {name} where {want} was due")
                    if tuple(tensor.shape) != shapes[name] or tensor.dtype != dtypes[name]:
                        raise CheckpointError(f"{out_dir}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                                              f"expected {dtypes[name]} {list(shapes[name])}")
                    f.write(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().data)
                    del tensor
                    if progress is not None:
                        progress(sizes[name])
        extra, _ = next(stream, (None, None))
        if extra is not None:
            raise CheckpointError(f"{out_dir}: tensor stream gave an unexpected tensor {extra}")
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: f for shard, f in zip(shards, files) for n in shard}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors_header(f, names: list[str], shapes: Mapping[str, tuple[int, ...]],
                              dtypes: Mapping[str, torch.dtype]) -> None:
    """The safetensors header for ``names`` stored back to back in this order (the format: u64 little-endian
    header length, JSON header padded with spaces to 8 bytes, then the raw little-endian tensor bytes)."""
    if sys.byteorder != "little":
        raise CheckpointError("writing safetensors needs a little-endian machine")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = math.prod(shapes[name]) * torch.empty((), dtype=dtypes[name]).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtypes[name]], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def _split(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _save(path: Path, names: list[str], hf_dict: Mapping[str, Tensor]) -> None:
    tensors = {n: hf_dict[n].detach().to("cpu").contiguous() for n in names}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def load_hf_checkpoint(hf_dir: str | Path, cfg: ModelConfig | None,
                       arch: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read an HF-layout ``arch`` checkpoint: (its ModelConfig, HF name -> tensor in the stored dtype, on CPU).

    With ``cfg``, config.json must agree with it on every field that shapes the model and ``cfg`` is
    returned; without, the config comes from config.json. Every tensor is checked (names and shapes, from
    the safetensors headers) before any data is read. Raises CheckpointError naming the file or tensor.
    Holds the whole model in memory: use ``open_hf_checkpoint`` to stream a large one.
    """
    with open_hf_checkpoint(hf_dir, cfg, arch) as reader:
        return reader.cfg, {name: reader.tensor(name) for name in reader.names}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class HFCheckpointReader:
    """An HF-layout checkpoint opened for streaming: every header validated, tensors read one at a time.

    Tensors (or a block of rows / columns of one) are read through safetensors' memory map, so reading a
    slice materialises only that slice. Build it with ``open_hf_checkpoint``; use it as a context manager.
    """

    def __init__(self, hf_dir: Path, cfg: ModelConfig, hf_config: dict[str, Any],
                 handles: dict[Path, Any], where: dict[str, Path], dtypes: dict[str, torch.dtype]):
        self.dir, self.cfg, self.hf_config = hf_dir, cfg, hf_config
        self._handles, self._where, self.dtypes = handles, where, dtypes
        self._rows = hf_rows(cfg)  # canonical -> (HF name, its first row there)
        self._shapes = canonical_shapes(cfg)
        self._hf_len = {name: shape[0] for name, shape in hf_shapes(cfg).items()}
        self.names = list(self._hf_len)  # HF names in model order

    @property
    def files(self) -> list[Path]:
        return list(self._handles)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of every tensor (but the fp32 ones of ``models.dense.stored_dtype``: the expert bias), or
        None when they differ."""
        kept = {hf for hf, cs in hf_parts(self.cfg).items() if stored_dtype(cs[0], torch.bfloat16) == torch.float32}
        kinds = {d for name, d in self.dtypes.items() if name not in kept}
        return kinds.pop() if len(kinds) == 1 else None

    def tensor(self, name: str) -> Tensor:
        return self.slice(name)

    def slice(self, name: str, rows: slice | None = None, cols: slice | None = None) -> Tensor:
        """HF tensor ``name`` (rows ``rows`` and/or columns ``cols`` of it only), a fresh CPU tensor."""
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: no tensor {name}")
        path = self._where[name]
        try:
            view = self._handles[path].get_slice(name)
            if rows is None and cols is None:
                out = view[:]
            elif cols is None:
                out = view[rows]
            else:
                out = view[rows or slice(None), cols]
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name}: {e}") from None
        return out.contiguous()

    def read(self, canonical: str, rows: slice | None = None, cols: slice | None = None) -> Tensor:
        """Like ``slice`` with a canonical name (``layers.3.q``, ``embed``); a canonical tensor that is a block of
        rows of a fused HF tensor (LLaDA2's [q; k; v]) is read as that block."""
        name, first = self._rows[canonical]
        start, stop, _ = (rows or slice(None)).indices(self._shapes[canonical][0])
        if rows is None and self._shapes[canonical][0] == self._hf_len[name]:
            return self.slice(name, None, cols)
        return self.slice(name, slice(first + start, first + stop), cols)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_hf_checkpoint(hf_dir: str | Path, cfg: ModelConfig | None, arch: str) -> HFCheckpointReader:
    """Open an HF-layout ``arch`` checkpoint for streaming, validating it completely without reading data.

    config.json (against ``cfg`` when given, as ``load_hf_checkpoint``), the index, every shard's header and
    size (a truncated file fails here), every tensor name and shape are checked first; CheckpointError names
    the file or tensor.
    """
    hf_dir = Path(hf_dir)
    if cfg is not None and cfg.arch != arch:
        raise ValueError(f"cfg.arch={cfg.arch!r} but arch={arch!r}")
    config_path = hf_dir / CONFIG_FILE
    hf_config = read_json(config_path)
    try:
        file_cfg = hf_config_to_model_config(hf_config, arch, source=str(config_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if cfg is None:
        cfg = file_cfg
    else:
        check_same_model(cfg, file_cfg, config_path)

    files = _tensor_files(hf_dir)
    handles: dict[Path, Any] = {}
    where: dict[str, Path] = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path, names in files.items():
        try:
            handle = safetensors.safe_open(str(path), framework="pt", device="cpu")
            stored = handle.keys()
            absent = sorted(set(names or ()) - set(stored))
            if absent:
                raise CheckpointError(f"{path}: has no tensor(s) {', '.join(absent)} listed in {INDEX_FILE}")
            for name in names or stored:
                view = handle.get_slice(name)
                shapes[name], where[name] = view.get_shape(), path
                kind = view.get_dtype()
                if kind not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has dtype {kind}, not a float type")
                dtypes[name] = _DTYPES[kind]
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") \
                from None
        handles[path] = handle
    errors = layout_errors(cfg, shapes)
    if errors:
        raise CheckpointError(f"{hf_dir}: does not match the {arch} config: " + "; ".join(errors))
    return HFCheckpointReader(hf_dir, cfg, hf_config, handles, where, dtypes)


def check_same_model(cfg: ModelConfig, file_cfg: ModelConfig, config_path: Path) -> None:
    for name in MUST_MATCH:
        want, got = getattr(cfg, name), getattr(file_cfg, name)
        if want != got:
            raise CheckpointError(f"{config_path}: the checkpoint has {name}={got!r} but the model config "
                                  f"has {name}={want!r}")


def _tensor_files(hf_dir: Path) -> dict[Path, list[str] | None]:
    """safetensors file -> the tensor names to read from it (None: all of them)."""
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no weight_map")
        files: dict[Path, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(hf_dir / file, []).append(name)
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index_path} is missing")
        return files
    if (hf_dir / SINGLE_FILE).is_file():
        return {hf_dir / SINGLE_FILE: None}
    raise CheckpointError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level must be a JSON object")
    return data
