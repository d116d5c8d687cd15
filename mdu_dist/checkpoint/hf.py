"""HF-layout checkpoints: ``config.json`` and ``model.safetensors``, or shards + ``model.safetensors.index.json``.

The tensors are the backbone's HF names (``mdu_dist.models.dense.to_hf``); config.json is written the way the
backbone's own HF code writes it (LLaDA: OLMo-style keys, model_type "llada"; Dream: Qwen2 keys, model_type
"Dream") so the output loads with the original ``trust_remote_code`` models. No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from mdu_dist.config import ConfigError, ModelConfig, config_from_dict
from mdu_dist.models import ARCHS
from mdu_dist.models.dense import layout_errors

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or tensor."""


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
    "dream": {
        "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
        "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
        "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size", "rope_theta": "rope_theta",
        "norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings",
        "mask_token_id": "mask_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
        "init_std": "initializer_range",
    },
}

# config.json entries that describe the maths mdu-dist implements; a checkpoint that sets them otherwise is
# another model. ``model_type`` is what tells a Dream checkpoint from a LLaDA one.
_FIXED: dict[str, dict[str, Any]] = {
    "llada": {
        "model_type": "llada", "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
        "rope": True, "alibi": False, "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
    },
    "dream": {
        "model_type": "Dream", "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
        "rope_scaling": None,
    },
}
_ARCHITECTURES = {"llada": ["LLaDAModelLM"], "dream": ["DreamModel"]}
_QKV_BIAS = {"llada": False, "dream": True}  # LLaDA never has biases; Dream (Qwen2) always has q/k/v biases

# Fields that decide what function the weights compute; a run config must agree with the checkpoint on them.
_MUST_MATCH = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "rope_theta", "norm_eps", "qkv_bias", "mask_token_id")


def model_config_to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json contents for ``cfg`` in the backbone's HF style."""
    if cfg.qkv_bias != _QKV_BIAS[cfg.arch]:
        raise ConfigError(f"model.qkv_bias={cfg.qkv_bias} cannot be written as a {cfg.arch} config.json "
                          f"({cfg.arch} has qkv_bias={_QKV_BIAS[cfg.arch]})")
    hf = {"architectures": _ARCHITECTURES[cfg.arch], **_FIXED[cfg.arch]}
    hf.update({key: getattr(cfg, name) for name, key in _HF_KEYS[cfg.arch].items()})
    if cfg.arch == "llada":
        hf["vocab_size"] = cfg.vocab_size
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return hf


def hf_config_to_model_config(hf: Mapping[str, Any], arch: str, source: str = CONFIG_FILE) -> ModelConfig:
    """ModelConfig described by a config.json dict; ConfigError naming ``source`` and the key otherwise."""
    if arch not in _HF_KEYS:
        raise ConfigError(f"{source}: unknown arch {arch!r} (known: {sorted(_HF_KEYS)})")
    for key, want in _FIXED[arch].items():
        if key == "model_type" or key in hf:
            if hf.get(key) != want:
                raise ConfigError(f"{source}: {key}={hf.get(key)!r} but a {arch} checkpoint has {key}={want!r}")
    fields: dict[str, Any] = {"arch": arch, "qkv_bias": _QKV_BIAS[arch]}
    for name, key in _HF_KEYS[arch].items():
        if key == "embedding_size" and hf.get(key) is None:
            key = "vocab_size"
        if key not in hf and name == "init_std":
            continue  # only fresh initialisation uses it: keep the ModelConfig default
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r} (needed for {arch} {name})")
        fields[name] = hf[key]
    return config_from_dict({"model": fields}, source=source).model


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
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    names = list(ARCHS[cfg.arch].hf_names(cfg.num_layers, cfg.qkv_bias).values())
    hf_config = model_config_to_hf_config(cfg, hf_dict[names[0]].dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp, which is 0700) so the checkpoint gets the usual umask permissions.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        _write_tensors(tmp, names, hf_dict, max_shard_bytes)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old)


def load_hf_checkpoint(hf_dir: str | Path, cfg: ModelConfig | None,
                       arch: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read an HF-layout ``arch`` checkpoint: (its ModelConfig, HF name -> tensor in the stored dtype, on CPU).

    With ``cfg``, config.json must agree with it on every field that shapes the model and ``cfg`` is
    returned; without, the config comes from config.json. Every tensor is checked (names and shapes, from
    the safetensors headers) before any data is read. Raises CheckpointError naming the file or tensor.
    """
    hf_dir = Path(hf_dir)
    if cfg is not None and cfg.arch != arch:
        raise ValueError(f"cfg.arch={cfg.arch!r} but arch={arch!r}")
    config_path = hf_dir / CONFIG_FILE
    try:
        file_cfg = hf_config_to_model_config(_read_json(config_path), arch, source=str(config_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if cfg is None:
        cfg = file_cfg
    else:
        _check_same_model(cfg, file_cfg, config_path)

    files = _tensor_files(hf_dir)
    errors = layout_errors(cfg, _collect(files, lambda f, name: f.get_slice(name).get_shape()))
    if errors:
        raise CheckpointError(f"{hf_dir}: does not match the {arch} config: " + "; ".join(errors))
    return cfg, _collect(files, lambda f, name: f.get_tensor(name))


def _check_same_model(cfg: ModelConfig, file_cfg: ModelConfig, config_path: Path) -> None:
    for name in _MUST_MATCH:
        want, got = getattr(cfg, name), getattr(file_cfg, name)
        if want != got:
            raise CheckpointError(f"{config_path}: the checkpoint has {name}={got!r} but the model config "
                                  f"has {name}={want!r}")


def _tensor_files(hf_dir: Path) -> dict[Path, list[str] | None]:
    """safetensors file -> the tensor names to read from it (None: all of them)."""
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level must be a JSON object")
    return data


def _collect(files: dict[Path, list[str] | None], fetch: Callable[[Any, str], Any]) -> dict[str, Any]:
    """name -> ``fetch(open safetensors file, name)`` over every file; errors name the file (and tensor)."""
    out = {}
    for path, names in files.items():
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                stored = f.keys()
                absent = sorted(set(names or ()) - set(stored))
                if absent:
                    raise CheckpointError(f"{path}: has no tensor(s) {', '.join(absent)} listed in {INDEX_FILE}")
                for name in names or stored:
                    out[name] = fetch(f, name)
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") \
                from None
    return out
