"""Distributed checkpoints of mdu-dist models: megatron-core dist_checkpointing (torch_dist) plus a manifest.

A checkpoint is a directory::

    CKPT/mdu_checkpoint.json  manifest: arch, ModelConfig, the TP/PP layout that wrote it, dtype, step,
                              components, and the size and sha256 of every other file
    CKPT/model/               the model weights (torch_dist); any TP/PP layout can load them (resharding)
    CKPT/<component>/         further sharded state saved with the model (the trainer's optimizer, ...),
                              valid for the layout that wrote it
    CKPT/hf_files/            non-weight files of the HF checkpoint it came from (config.json, tokenizer, code)

``save_model_checkpoint`` / ``load_model_checkpoint`` are collective: every rank of an initialised
``mdu_dist.distributed`` process group calls them with its own pipeline stage. ``open_dist_checkpoint``
reads the weights back in a single process without any process group, one layer at a time.

Pickle: torch_dist keeps its index (``model/.metadata``) as a pickle and megatron keeps ``common.pt`` as a
torch.save file. Before anything else reads them, ``.metadata`` is unpickled here with an allow-list of
torch.distributed.checkpoint's metadata classes, ``common.pt`` is only ever read with ``weights_only=True``,
and no ShardedObject (arbitrary pickled object) is written or read: the model's ``_extra_state`` entries (always
empty with the local layer spec) are left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pickle
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from mdu_dist.checkpoint import dist_layout as dl
from mdu_dist.checkpoint.atomic import check_target, fresh_dir, move_into_place, partial_path
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.hf import check_same_model
from mdu_dist.config import ConfigError, ModelConfig, config_from_dict
from mdu_dist.models import ARCHS
from mdu_dist.models.dense import count_parameters, hf_parts, stored_dtype

MANIFEST = "mdu_checkpoint.json"
FORMAT = "mdu-dist dist checkpoint"
VERSION = 1
MODEL_DIR = "model"
HF_FILES_DIR = "hf_files"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class CheckpointInfo:
    """What ``CKPT/mdu_checkpoint.json`` says about a checkpoint."""

    path: Path
    cfg: ModelConfig
    tp: int
    pp: int
    dtype: torch.dtype
    step: int | None
    components: dict[str, dict[str, Any]]  # name -> {"tp", "pp", "reshardable"}, the model excluded
    files: dict[str, dict[str, Any]]  # relative path -> {"size", "sha256"}
    manifest: dict[str, Any]

    @property
    def arch(self) -> str:
        return self.cfg.arch

    @property
    def hf_files(self) -> list[Path]:
        return [self.path / rel for rel in sorted(self.files) if rel.startswith(HF_FILES_DIR + "/")]


def read_info(path: str | Path) -> CheckpointInfo:
    """Read and check ``path/mdu_checkpoint.json``; CheckpointError naming the file otherwise."""
    path = Path(path)
    where = path / MANIFEST
    if not where.is_file():
        hint = " (an HF checkpoint? use `mdu-dist convert hf-to-dist`)" if (path / "config.json").is_file() else ""
        raise CheckpointError(f"{where}: not found: {path} is not an mdu-dist dist checkpoint{hint}")
    try:
        manifest = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot be read as JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an mdu-dist checkpoint manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{where}: manifest version {manifest.get('version')!r}, this mdu-dist reads "
                              f"version {VERSION}")
    try:
        cfg = config_from_dict({"model": manifest["model"]}, source=str(where)).model
        info = CheckpointInfo(path, cfg, int(manifest["tp"]), int(manifest["pp"]), _DTYPES[manifest["dtype"]],
                              manifest.get("step"), dict(manifest.get("components", {})),
                              dict(manifest["files"]), manifest)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    if manifest.get("arch") != cfg.arch:
        raise CheckpointError(f"{where}: arch {manifest.get('arch')!r} disagrees with model.arch {cfg.arch!r}")
    return info


def check_model_matches(info: CheckpointInfo, cfg: ModelConfig) -> None:
    """Refuse to load ``info`` into a model of shape ``cfg``, naming the first difference."""
    where = info.path / MANIFEST
    if info.arch != cfg.arch:
        raise CheckpointError(f"{where}: this is a {info.arch} checkpoint; it cannot be loaded into a "
                              f"{cfg.arch} model")
    check_same_model(cfg, info.cfg, where)


def _sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def _list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(root: Path, rels: Iterable[str], progress: Callable[[int], None] | None = None
               ) -> dict[str, dict[str, Any]]:
    return {rel: {"size": (root / rel).stat().st_size, "sha256": _sha256(root / rel, progress)} for rel in rels}


def integrity_problems(info: CheckpointInfo, hashes: bool = True, rels: Iterable[str] | None = None,
                       progress: Callable[[int], None] | None = None) -> list[str]:
    """Every missing, resized, altered (``hashes``) or unlisted file, one line each naming the file."""
    problems = []
    root = info.path
    listed = info.files
    for rel in sorted(listed) if rels is None else rels:
        path, want = root / rel, listed[rel]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, the manifest says {want['size']} "
                            f"(truncated or replaced)")
        elif hashes and _sha256(path, progress) != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted)")
    if rels is None:
        problems += [f"{root / rel}: not listed in {MANIFEST} (unexpected file)"
                     for rel in _list_files(root) if rel not in listed]
    return problems


# ------------------------------------------------------------------------------------- pickle safety


def _allowed_global(module: str, name: str) -> bool:
    if module.startswith("torch.distributed.checkpoint.") or module == "torch.distributed.checkpoint":
        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type)  # metadata dataclasses and enums, never a function
    if (module, name) in {("torch", "Size"), ("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                          ("builtins", "set"), ("builtins", "frozenset")}:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(ckpt_dir: Path) -> Any:
    """torch_dist's ``.metadata`` index, unpickled with an allow-list of DCP metadata types only."""
    path = ckpt_dir / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: not a torch_dist index: {type(e).__name__}: {e}") from None


def _weights_only_common_strategy():
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (mdu_dist.checkpoint)
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    class WeightsOnlyCommonLoad(TorchCommonLoadStrategy):
        """megatron's common.pt loader, with weights_only=True stated rather than left to torch's default."""

        def load_common(self, checkpoint_dir):
            path = Path(checkpoint_dir) / COMMON_STATE_FNAME
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise CheckpointError(f"{path}: missing") from None
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{path}: cannot be read with weights_only=True: {e}") from None

    return WeightsOnlyCommonLoad()


def model_sharded_state_dict(stage) -> dict[str, Any]:
    """The stage's megatron sharded state dict without its ``_extra_state`` ShardedObjects."""
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (mdu_dist.checkpoint)
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for key, value in stage.module.sharded_state_dict().items():
        if isinstance(value, ShardedObject):
            if not key.endswith("_extra_state"):
                raise CheckpointError(f"unexpected ShardedObject {key} in the model's sharded state dict")
            continue
        out[key] = value
    return out


# ------------------------------------------------------------------------------------- collective I/O


def _agree(error: str | None) -> None:
    """Collective: raise the first rank's error on every rank, so no rank proceeds alone."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def _collective_hash(root: Path, rels: list[str], progress: bool) -> dict[str, dict[str, Any]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    bar = progress_bar(sum((root / r).stat().st_size for r in rels[rank::world]), "sha256", progress and rank == 0)
    mine = hash_files(root, rels[rank::world], bar.update)
    bar.close()
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return dict(sorted((rel, entry) for part in parts for rel, entry in part.items()))


def progress_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def _stage_layout(stage) -> tuple[int, int, torch.dtype]:
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (mdu_dist.checkpoint)
    from megatron.core import parallel_state as ps

    dtype = next(stage.module.parameters()).dtype
    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(), dtype


def save_model_checkpoint(stage, directory: str | Path, *, step: int | None = None,
                          components: Mapping[str, Mapping[str, Any]] | None = None,
                          hf_files: Iterable[Path] = (), extra: Mapping[str, Any] | None = None,
                          overwrite: bool = False, progress: bool = False) -> Path:
    """Collective: save every rank's stage (and ``components``, e.g. {"optimizer": its sharded state dict})
    as one checkpoint, all or nothing.

    All ranks write into ``.NAME.partial`` next to ``directory``; once every file is hashed (the ranks share
    the work), rank 0 writes the manifest and renames it into place. ``hf_files`` are copied to
    ``hf_files/`` by rank 0; ``extra`` is stored in the manifest as is.
    """
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (mdu_dist.checkpoint)
    from megatron.core import dist_checkpointing

    out = Path(directory).absolute()
    tmp = partial_path(out)
    rank = dist.get_rank()
    tp, pp, dtype = _stage_layout(stage)
    error = None
    if rank == 0:
        try:
            check_target(out, overwrite)
            fresh_dir(tmp)
            for name in [MODEL_DIR, *(components or {})]:
                (tmp / name).mkdir()
            if hf_files:
                (tmp / HF_FILES_DIR).mkdir()
                for path in hf_files:
                    shutil.copy2(path, tmp / HF_FILES_DIR / Path(path).name)
        except (CheckpointError, OSError) as e:
            error = str(e)
    _agree(error)
    try:
        dist_checkpointing.save(model_sharded_state_dict(stage), str(tmp / MODEL_DIR))
        for name, sharded in (components or {}).items():
            dist_checkpointing.save(dict(sharded), str(tmp / name))
        dist.barrier()
        files = _collective_hash(tmp, _list_files(tmp), progress)
        error = None
        if rank == 0:
            try:
                manifest = {
                    "format": FORMAT, "version": VERSION, "arch": stage.cfg.arch,
                    "model": dataclasses.asdict(stage.cfg), "tp": tp, "pp": pp,
                    "dtype": str(dtype).removeprefix("torch."), "step": step,
                    "parameters": count_parameters(stage.cfg),
                    "components": {name: {"tp": tp, "pp": pp, "reshardable": False} for name in components or {}},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extra": dict(extra or {}), "files": files,
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                move_into_place(tmp, out)
            except (OSError, TypeError, ValueError) as e:
                error = f"{out}: could not finish the checkpoint: {e}"
        _agree(error)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model_checkpoint(stage, directory: str | Path, *, verify: str | None = "size",
                          progress: bool = False) -> CheckpointInfo:
    """Collective: load the model weights of checkpoint ``directory`` into every rank's stage, whatever TP/PP
    layout saved them (dist_checkpointing reshards). Returns the manifest's information.

    ``verify``: "size" (default) checks every file's size, "sha256" its hash too (the ranks share the work),
    None nothing. A checkpoint of another architecture or shape is refused naming the field.
    """
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (mdu_dist.checkpoint)
    from megatron.core import dist_checkpointing

    info = read_info(directory)
    check_model_matches(info, stage.cfg)
    tp, _, dtype = _stage_layout(stage)
    if verify == "sha256":
        rels = sorted(info.files)
        rank, world = dist.get_rank(), dist.get_world_size()
        bar = progress_bar(sum(info.files[r]["size"] for r in rels[rank::world]), "sha256", progress and rank == 0)
        mine = integrity_problems(info, True, rels[rank::world], bar.update)
        bar.close()
        _agree("; ".join(mine) if mine else None)
    elif verify == "size":
        problems = integrity_problems(info, hashes=False)
        if problems:
            raise CheckpointError("; ".join(problems))
    _check_tensors(info, read_dcp_metadata(info.path / MODEL_DIR), info.tp)

    loaded = dist_checkpointing.load(model_sharded_state_dict(stage), str(info.path / MODEL_DIR),
                                     common_strategy=_weights_only_common_strategy())
    result = stage.module.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{info.path / MODEL_DIR}: the loaded state does not fit the stage: missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    _zero_vocab_padding(stage)
    return info


def load_component(directory: str | Path, name: str, sharded_state_dict: Mapping[str, Any]) -> dict:
    """Collective: load component ``name`` (saved by ``save_model_checkpoint(components=...)``) of a
    checkpoint written by this same TP/PP layout."""
    # deferred: megatron-core costs seconds of start-up; every subcommand imports this module (mdu_dist.checkpoint)
    from megatron.core import dist_checkpointing

    info = read_info(directory)
    if name not in info.components:
        raise CheckpointError(f"{info.path / MANIFEST}: no component {name!r} (has: {sorted(info.components)})")
    read_dcp_metadata(info.path / name)
    return dist_checkpointing.load(dict(sharded_state_dict), str(info.path / name),
                                   common_strategy=_weights_only_common_strategy())


def _zero_vocab_padding(stage) -> None:
    """Rows past the true vocabulary are padding: zero, whatever a checkpoint of another layout held there."""
    with torch.no_grad():
        for module in (getattr(stage.module, "embedding", None), getattr(stage.module, "output_layer", None)):
            if module is None:
                continue
            weight = module.word_embeddings.weight if hasattr(module, "word_embeddings") else module.weight
            start = stage.vocab_start
            first_pad = max(0, stage.cfg.vocab_size - start)
            if first_pad < weight.shape[0]:
                weight[first_pad:].zero_()


def _check_tensors(info: CheckpointInfo, md: Any, tp: int) -> None:
    """The torch_dist index holds every expected global tensor, with its global shape, as floats.

    (Dtypes may differ between tensors: megatron's local-spec RMSNorm keeps float32 weights in a bf16 stage.)
    """
    where = info.path / MODEL_DIR / ".metadata"
    stored = getattr(md, "state_dict_metadata", {})
    for key, shape in dl.global_shapes(info.cfg, tp).items():
        entry = stored.get(key)
        if entry is None or not hasattr(entry, "size"):
            raise CheckpointError(f"{where}: no tensor {key} (not a {info.arch} model checkpoint?)")
        if tuple(entry.size) != shape:
            raise CheckpointError(f"{where}: tensor {key} has shape {list(entry.size)}, expected {list(shape)}")
        if not entry.properties.dtype.is_floating_point:
            raise CheckpointError(f"{where}: tensor {key} is {entry.properties.dtype}, not a float type")


# ------------------------------------------------------------------------- single-process streaming read


class _ReadInto:
    """The part of a DCP LoadPlanner that FileSystemReader.read_data uses: where each read item goes."""

    def __init__(self, dest: Tensor):
        self.dest = dest

    def resolve_tensor(self, item) -> Tensor:
        view = self.dest
        for dim, (offset, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, item, tensor) -> None:
        pass

    def load_bytes(self, item, value) -> None:
        raise CheckpointError(f"{item.storage_index.fqn}: refusing to unpickle a non-tensor item")


class DistCheckpointReader:
    """A dist checkpoint's weights, read in one process without a process group, one layer at a time.

    Reads exactly the stored chunks that overlap the requested layer (torch.load(weights_only=True) on
    each), through torch.distributed.checkpoint's FileSystemReader. Build it with ``open_dist_checkpoint``.
    """

    def __init__(self, info: CheckpointInfo, md: Any):
        # deferred: torch.distributed.checkpoint costs ~1 s of start-up; every subcommand imports this module
        from torch.distributed.checkpoint import FileSystemReader

        self.info, self.cfg, self._md = info, info.cfg, md
        self._reader = FileSystemReader(str(info.path / MODEL_DIR))
        self._reader.set_up_storage_reader(md, True)

    def read(self, key: str, layer: int | None = None) -> Tensor:
        """Global tensor ``key``, or its slice ``layer`` (without the layer axis) for a per-layer key."""
        # deferred: torch.distributed.checkpoint costs ~1 s of start-up; every subcommand imports this module
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        entry = self._md.state_dict_metadata[key]
        shape = tuple(entry.size)
        offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
        sizes = shape if layer is None else (1, *shape[1:])
        out = torch.empty(sizes, dtype=entry.properties.dtype)
        items = create_read_items_for_chunk_list(
            key, entry, [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))])
        files = sorted({self._md.storage_data[i.storage_index].relative_path for i in items})
        try:
            self._reader.read_data(LoadPlan(items), _ReadInto(out)).wait()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt chunk fails in many ways; name the files
            names = ", ".join(str(self.info.path / MODEL_DIR / f) for f in files)
            raise CheckpointError(f"{names}: cannot read tensor {key}"
                                  f"{'' if layer is None else f' layer {layer}'}: {type(e).__name__}: {e}") from None
        return out if layer is None else out[0]

    def canonical_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """(canonical name, tensor) in canonical (= HF file) order, holding one layer at a time, cast to
        ``dtype`` (default: the manifest's; the expert bias stays fp32, ``models.dense.stored_dtype``)."""
        cfg, dtype = self.cfg, dtype or self.info.dtype
        names = ARCHS[cfg.arch].canonical_names(cfg)
        yield "embed", self.read(dl.EMBED)[: cfg.vocab_size].to(dtype)
        for i in range(cfg.num_layers):
            layer = dl.canonical_layer(cfg, i, {key: self.read(*dl.stored_key(cfg, key, i))
                                                for key in dl.layer_keys(cfg, i)})
            for name in names:
                if name.startswith(f"layers.{i}."):
                    yield name, layer[name].to(stored_dtype(name, dtype))
        yield "final_norm", self.read(dl.FINAL_NORM).to(dtype)
        yield "lm_head", self.read(dl.HEAD)[: cfg.vocab_size].to(dtype)

    def hf_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """(HF name, tensor) in HF file order; canonical tensors that share an HF tensor are concatenated."""
        parts = hf_parts(self.cfg)
        pending: list[Tensor] = []
        for name, tensor in self.canonical_tensors(dtype):
            hf = ARCHS[self.cfg.arch].hf_name(name)
            pending.append(tensor)
            if len(pending) == len(parts[hf]):
                yield hf, pending[0] if len(pending) == 1 else torch.cat(pending)
                pending = []


def open_dist_checkpoint(path: str | Path, verify: str | None = "sha256",
                         progress: Callable[[int], None] | None = None) -> DistCheckpointReader:
    """Open a dist checkpoint for single-process reading: manifest, file integrity (``verify``: "sha256",
    "size" or None) and the torch_dist index (every expected tensor, shape and dtype) are checked first."""
    info = read_info(path)
    if verify:
        problems = integrity_problems(info, hashes=verify == "sha256", progress=progress)
        if problems:
            raise CheckpointError("; ".join(problems))
    md = read_dcp_metadata(info.path / MODEL_DIR)
    _check_tensors(info, md, info.tp)
    return DistCheckpointReader(info, md)


def stored_tensors(info: CheckpointInfo) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (global shape, dtype) of every tensor in the checkpoint's model/ index."""
    md = read_dcp_metadata(info.path / MODEL_DIR)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


__all__ = ["CheckpointInfo", "DistCheckpointReader", "MANIFEST", "check_model_matches", "hash_files",
           "integrity_problems", "load_component", "load_model_checkpoint", "model_sharded_state_dict",
           "open_dist_checkpoint", "read_dcp_metadata", "read_info", "save_model_checkpoint", "stored_tensors"]
