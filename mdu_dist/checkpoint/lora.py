"""LoRA checkpoints: a run's adapters in canonical (TP/PP-free) layout, with the frozen base named by its path.

    ADAPTER/lora.json                  format, version, arch, model and lora config, the base, step
    ADAPTER/adapters-{k}.safetensors   the adapters of pipeline stage k (``models.lora`` canonical names, global
                                       layer indices); any TP/PP layout loads them
    ADAPTER/hf_files/                  the tokenizer

The base is ``{"init": <absolute path of an HF or mdu-dist checkpoint>}``, or ``{"init": "", "seed": s}`` for a
randomly initialised (tiny) model, rebuilt from its seed. The base weights are not copied: a LoRA checkpoint is
only valid next to the base it names, which resume checks (path, architecture, shape). The trainer saves
``ADAPTER`` as ``step-N/adapter`` beside ``deepspeed/`` (the adapters' optimizer state).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import Tensor

from mdu_dist.checkpoint.atomic import atomic_dir
from mdu_dist.checkpoint.convert import hf_side_files, load_initial_weights
from mdu_dist.checkpoint.dist import MANIFEST, check_model_matches, open_dist_checkpoint, read_info
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.hf import CONFIG_FILE, check_same_model, open_hf_checkpoint, read_json, write_hf_checkpoint
from mdu_dist.config import ConfigError, LoRAConfig, ModelConfig, config_from_dict
from mdu_dist.models import ARCHS
from mdu_dist.models.dense import init_weights
from mdu_dist.models.lora import (adapter_parameters, canonical_names, gather_adapters, load_adapters, merged,
                                  peft_config, peft_tensors)

LORA_MANIFEST = "lora.json"
ADAPTER_DIR = "adapter"
FORMAT = "mdu-dist lora adapters"
VERSION = 1
HF_FILES_DIR = "hf_files"


@dataclasses.dataclass
class LoRAInfo:
    path: Path
    cfg: ModelConfig
    lora: LoRAConfig
    base: dict[str, Any]
    step: int | None


def is_lora_checkpoint(path: str | Path) -> bool:
    return (Path(path) / LORA_MANIFEST).is_file()


def save_adapters(stage, directory: Path, lora: LoRAConfig, base: dict[str, Any], step: int | None,
                  hf_files: list[Path] = ()) -> None:
    """Collective over every rank: write ``directory`` (which must not hold a previous save). The TP ranks of
    each stage gather its adapters; data-parallel rank 0 and TP rank 0 of that stage writes them (to a temporary
    name, then renamed); global rank 0 writes the manifest and copies ``hf_files``."""
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (checkpoint.source)
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    adapters = gather_adapters(stage, ps.get_tensor_model_parallel_group() if tp > 1 else None)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        name = f"adapters-{ps.get_pipeline_model_parallel_rank()}.safetensors"
        # A fused adapter's A is one tensor repeated per part (PEFT's layout): each is stored in its own right.
        safetensors.torch.save_file({k: v.clone() for k, v in adapters.items()}, str(directory / f".{name}"))
        (directory / f".{name}").replace(directory / name)
    if dist.get_rank() == 0:
        if hf_files:
            (directory / HF_FILES_DIR).mkdir(exist_ok=True)
            for path in hf_files:
                shutil.copy2(path, directory / HF_FILES_DIR / Path(path).name)
        manifest = {"format": FORMAT, "version": VERSION, "arch": stage.cfg.arch,
                    "model": dataclasses.asdict(stage.cfg), "lora": dataclasses.asdict(lora), "base": base,
                    "step": step, "stages": ps.get_pipeline_model_parallel_world_size()}
        tmp = directory / f".{LORA_MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(directory / LORA_MANIFEST)
    dist.barrier()


def read_lora_info(path: str | Path) -> LoRAInfo:
    """Read and check ``path/lora.json``; CheckpointError naming the file otherwise."""
    where = Path(path) / LORA_MANIFEST
    if not where.is_file():
        raise CheckpointError(f"{where}: not found: {path} is not an mdu-dist LoRA checkpoint")
    try:
        manifest = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot be read as JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{where}: not a version {VERSION} {FORMAT!r} manifest")
    try:
        cfg = config_from_dict({"model": manifest["model"], "lora": manifest["lora"]}, source=str(where))
        base = dict(manifest["base"])
        if not isinstance(base.get("init"), str):
            raise ValueError("base.init must be a path string")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    if not cfg.lora.enabled:
        raise CheckpointError(f"{where}: lora.rank is 0")
    return LoRAInfo(Path(path), cfg.model, cfg.lora, base, manifest.get("step"))


def read_adapters(info: LoRAInfo) -> dict[str, Tensor]:
    """Every adapter of the model (canonical names, fp32), checked complete and of the right shapes."""
    out: dict[str, Tensor] = {}
    files = sorted(info.path.glob("adapters-*.safetensors"))
    for file in files:
        try:
            out.update(safetensors.torch.load_file(str(file)))
        except (OSError, safetensors.SafetensorError) as e:
            raise CheckpointError(f"{file}: cannot be read: {e}") from None
    want = canonical_names(info.lora.targets, range(info.cfg.num_layers))
    missing = [k for k in want if k not in out]
    if missing:
        raise CheckpointError(f"{info.path}: {len(missing)} adapter tensor(s) missing, e.g. {missing[0]} "
                              f"(files: {[f.name for f in files]})")
    unexpected = sorted(set(out) - set(want))
    if unexpected:
        raise CheckpointError(f"{info.path}: unexpected adapter tensor {unexpected[0]}")
    return out


def check_base(info: LoRAInfo, init: str, seed: int, cfg: ModelConfig, lora: LoRAConfig) -> None:
    """Refuse to resume adapters onto another base (another path or random seed, architecture or shape) or with
    other adapters (rank, alpha, targets)."""
    where = info.path / LORA_MANIFEST
    for key in ("rank", "alpha", "targets"):
        if getattr(info.lora, key) != getattr(lora, key):
            raise CheckpointError(f"{where}: the adapters have lora.{key}={getattr(info.lora, key)}, the run "
                                  f"lora.{key}={getattr(lora, key)}")
    want = base_of(init, seed)
    if info.base != want:
        raise CheckpointError(f"{where}: the adapters were trained on base {info.base}, not on this run's {want} "
                              f"(train.init, train.seed)")
    if info.cfg.arch != cfg.arch:
        raise CheckpointError(f"{where}: this is a {info.cfg.arch} LoRA checkpoint; the run's model is {cfg.arch}")
    check_same_model(cfg, info.cfg, where)


def base_of(init: str, seed: int) -> dict[str, Any]:
    """The manifest's ``base`` for a run started from ``train.init`` (and ``train.seed`` for a random one)."""
    return {"init": str(Path(init).absolute())} if init else {"init": "", "seed": seed}


def base_tensors(info: LoRAInfo) -> Iterator[tuple[str, Tensor]]:
    """(canonical name, tensor) of the base model in canonical order, one at a time where the source allows."""
    init, m = info.base["init"], info.cfg
    if not init:
        yield from init_weights(m, seed=int(info.base["seed"])).items()
    elif (Path(init) / MANIFEST).is_file():
        yield from open_dist_checkpoint(init, verify="size").canonical_tensors()
    else:
        with open_hf_checkpoint(init, m, m.arch) as reader:
            for name in ARCHS[m.arch].canonical_names(m.num_layers, m.qkv_bias):
                yield name, reader.read(name)


def merged_tensors(info: LoRAInfo, adapters: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """The base's canonical tensors with every adapter folded in (``models.lora.merged``)."""
    for name, tensor in base_tensors(info):
        if f"{name}.lora_A" in adapters:
            tensor = merged(tensor, adapters[f"{name}.lora_A"], adapters[f"{name}.lora_B"], info.lora)
        yield name, tensor


def load_lora_checkpoint(stage, info: LoRAInfo) -> None:
    """Collective: base and adapters of ``info`` into a stage built with ``info.lora``."""
    load_initial_weights([stage], info.base["init"], int(info.base.get("seed", 0)))
    load_adapters_into(stage, info)


def load_adapters_into(stage, info: LoRAInfo) -> None:
    """Collective: the adapters of ``info`` into this rank's slice of ``stage.lora`` (any TP/PP layout)."""
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (checkpoint.source)
    from megatron.core import parallel_state as ps

    try:
        load_adapters(stage, read_adapters(info), ps.get_tensor_model_parallel_world_size(),
                      ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                      ps.get_pipeline_model_parallel_rank())
    except ValueError as e:
        raise CheckpointError(f"{info.path}: {e}") from None


# -------------------------------------------------------------------------------------------- exports


def adapter_dir(path: str | Path) -> Path:
    """The LoRA checkpoint at ``path``: ``path`` itself or the ``adapter/`` of a trainer checkpoint."""
    path = Path(path)
    return path / ADAPTER_DIR if not is_lora_checkpoint(path) and is_lora_checkpoint(path / ADAPTER_DIR) else path


def _base_side(info: LoRAInfo) -> tuple[torch.dtype, dict | None, list[Path]]:
    """The base's dtype, config.json contents (None: none known) and non-weight files (tokenizer, code)."""
    init, m = info.base["init"], info.cfg
    if not init:
        return torch.float32, None, []
    if (Path(init) / MANIFEST).is_file():
        base = read_info(init)
        side = {p.name: p for p in base.hf_files}
        config = read_json(side[CONFIG_FILE]) if CONFIG_FILE in side else None
        return base.dtype, config, list(side.values())
    with open_hf_checkpoint(init, m, m.arch) as reader:
        dtype = reader.dtype or torch.float32
    return dtype, read_json(Path(init) / CONFIG_FILE), hf_side_files(init)


def export_peft(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` under the backbone's HF module
    names), which ``peft.PeftModel.from_pretrained(<HF model of the base>, out)`` loads."""
    info = read_lora_info(adapter_dir(src))
    tensors = peft_tensors(info.cfg.arch, read_adapters(info))
    with atomic_dir(Path(out), overwrite) as tmp:
        config = peft_config(info.cfg.arch, info.lora, info.base["init"])
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        safetensors.torch.save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                                    metadata={"format": "pt"})
        for path in sorted((info.path / HF_FILES_DIR).glob("*")):
            shutil.copy2(path, tmp / path.name)
    return Path(out)


def export_merged(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                  max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write an HF-layout checkpoint of the base with the adapters folded in (W + alpha/r B A, in fp32, then cast
    to ``dtype``, default the base's), with the base's config.json and side files and the run's tokenizer."""
    info = read_lora_info(adapter_dir(src))
    adapters = read_adapters(info)
    base_dtype, base_config, side = _base_side(info)
    dtype = dtype or base_dtype
    files = {p.name: p for p in side}
    files.update({p.name: p for p in sorted((info.path / HF_FILES_DIR).glob("*"))})
    arch = ARCHS[info.cfg.arch]
    stream = ((arch.hf_name(name), t.to(dtype)) for name, t in merged_tensors(info, adapters))
    return write_hf_checkpoint(out, info.cfg, stream, dtype, max_shard_bytes=max_shard_bytes, base_config=base_config,
                               extra_files=list(files.values()), overwrite=overwrite)


def inspect_lora(path: Path) -> tuple[list[str], list[str]]:
    """(report lines, problems) of a LoRA checkpoint: its manifest, every adapter tensor, and its base."""
    info = read_lora_info(path)
    m, lora, problems = info.cfg, info.lora, []
    try:
        read_adapters(info)
    except CheckpointError as e:
        problems.append(str(e))
    base = info.base["init"] or f"random initialisation, seed {info.base.get('seed')}"
    init = info.base["init"]
    try:
        if init and (Path(init) / MANIFEST).is_file():
            check_model_matches(read_info(init), m)
            base += " (an mdu-dist checkpoint of this shape)"
        elif init:
            with open_hf_checkpoint(init, m, m.arch):
                base += " (an HF checkpoint of this shape)"
    except (CheckpointError, ConfigError) as e:
        problems.append(f"{path / LORA_MANIFEST}: base: {e}")
    lines = [f"{path}: mdu-dist LoRA checkpoint (adapters only; base named below)",
             f"architecture: {m.arch}, {m.num_layers} layers x {m.hidden_size}, {m.num_attention_heads} heads / "
             f"{m.num_query_groups} KV heads, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}",
             f"lora: rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets "
             f"{', '.join(lora.targets)}; {adapter_parameters(m, lora, 1, m.num_layers):,} adapter parameters",
             f"base: {base}",
             f"step: {info.step if info.step is not None else '-'}",
             "integrity: every adapter tensor read, the base checked: "
             + ("OK" if not problems else f"{len(problems)} problem(s)")]
    return lines, problems
