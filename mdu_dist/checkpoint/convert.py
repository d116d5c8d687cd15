"""The checkpoint tools: HF -> dist, dist -> HF, reshard, inspect.

hf-to-dist and reshard run one process per rank of the target TP x PP layout
(``mdu_dist.launch.local.run_ranks``); each rank builds its pipeline stage, fills it (from its own row/column
slices of the HF files, or through dist_checkpointing's resharding load) and the ranks save together with
``save_model_checkpoint``.
dist-to-hf and inspect run in one process and stream a layer at a time. Inputs are validated completely in the
calling process before any worker starts or any output exists; outputs appear all at once or not at all.

Memory (per the README): hf-to-dist and reshard hold the model once, spread over the ranks, plus a copy of
each rank's SwiGLU fc1 while megatron saves it (it clones the gate/up halves) and one slice being read;
dist-to-hf holds one layer plus one output shard (twice, while safetensors serialises it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mdu_dist import distributed
from mdu_dist.checkpoint import dist_layout as dl
from mdu_dist.checkpoint.atomic import check_target, partial_path
from mdu_dist.checkpoint.dist import (MANIFEST, MODEL_DIR, CheckpointInfo, progress_bar, integrity_problems,
                                      load_model_checkpoint, open_dist_checkpoint, read_info,
                                      save_model_checkpoint, stored_tensors)
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.hf import (CONFIG_FILE, HFCheckpointReader, arch_of_hf_config, open_hf_checkpoint,
                                    write_hf_checkpoint)
from mdu_dist.checkpoint.steps import TRAINER_STATE, latest_step_or_self
from mdu_dist.config import ConfigError, ModelConfig, ParallelConfig, check_layout
from mdu_dist.launch.local import run_ranks
from mdu_dist.models import ARCHS
from mdu_dist.models.dense import count_active_parameters, count_parameters, init_weights
from mdu_dist.models.mcore import build_stage
from mdu_dist.models.mcore_layout import load_shard, rank_tensor, shard

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of an HF checkpoint directory that are weights (not carried along as tokenizer/code/config files).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")


def hf_side_files(hf_dir: str | Path) -> list[Path]:
    """config.json, tokenizer, HF code and other small top-level files of an HF checkpoint (no weights)."""
    return sorted(p for p in Path(hf_dir).iterdir()
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_WEIGHT_SUFFIXES)
                  and not p.name.endswith(".index.json"))


def _rank() -> tuple[int, int, int, int]:
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module (via eval.run)
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())


def load_hf_into_stage(stage, reader: HFCheckpointReader, progress: bool = False) -> None:
    """Fill this rank's stage from an opened HF checkpoint, reading only the slices this rank owns."""
    tp, tp_rank, pp, pp_rank = _rank()
    own = {k: v for k, v in stage.module.state_dict().items() if not k.endswith("_extra_state")}
    with torch.no_grad():
        for name, param in tqdm(own.items(), desc="read HF slices (rank 0)", disable=not progress, leave=False):
            tensor = rank_tensor(stage.cfg, name, reader.read, tp, tp_rank, pp, pp_rank)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{reader.dir}: {name} of rank (tp {tp_rank}, pp {pp_rank}) would be "
                                      f"{list(tensor.shape)}, the stage has {list(param.shape)}")
            param.copy_(tensor)


def load_initial_weights(stages: list, init: str, seed: int) -> None:
    """Collective: fill each stage (same model, this rank's TP/PP slice) with ``init``: an HF or mdu-dist
    checkpoint directory, or "" for random weights drawn from ``seed`` (tiny models)."""
    m = stages[0].cfg
    if not init:
        tp, tp_rank, pp, pp_rank = _rank()
        state = shard(m, init_weights(m, seed=seed), tp, tp_rank, pp, pp_rank)
        for s in stages:
            load_shard(s.module, state)
    elif (Path(init) / MANIFEST).exists():
        for s in stages:
            load_model_checkpoint(s, init)
    else:
        with open_hf_checkpoint(init, m, m.arch) as reader:
            for s in stages:
                load_hf_into_stage(s, reader)


# --------------------------------------------------------------------------------------------- workers


def _say(show: bool, message: str) -> None:
    if show:
        print(f"mdu-dist: {message}", file=sys.stderr, flush=True)


def _hf_to_dist_rank(hf_dir: str, out: str, cfg: dict, tp: int, pp: int, dtype: str, overwrite: bool,
                     progress: bool) -> None:
    model = ModelConfig(**cfg)
    distributed.init(ParallelConfig(tensor=tp, pipeline=pp, backend="gloo"), model)
    try:
        show = progress and dist.get_rank() == 0
        _say(show, f"{tp * pp} rank(s): building their stages ({dtype})")
        with open_hf_checkpoint(hf_dir, model, model.arch) as reader:
            stage = build_stage(model, DTYPES[dtype])
            _say(show, "reading each rank's slices of the HF files")
            load_hf_into_stage(stage, reader, show)
        _say(show, f"saving with dist_checkpointing (torch_dist) into {partial_path(Path(out)).name}")
        save_model_checkpoint(stage, out, hf_files=hf_side_files(hf_dir), overwrite=overwrite, progress=show,
                              extra={"converted_from": str(Path(hf_dir).absolute())})
    finally:
        distributed.shutdown()


def _reshard_rank(src: str, out: str, tp: int, pp: int, overwrite: bool, progress: bool) -> None:
    info = read_info(src)
    distributed.init(ParallelConfig(tensor=tp, pipeline=pp, backend="gloo"), info.cfg)
    try:
        show = progress and dist.get_rank() == 0
        _say(show, f"{tp * pp} rank(s): building their stages, loading TP={info.tp} PP={info.pp} weights into them")
        stage = build_stage(info.cfg, info.dtype)
        load_model_checkpoint(stage, src, verify="size")
        _say(show, f"saving with dist_checkpointing (torch_dist) into {partial_path(Path(out)).name}")
        extra = dict(info.manifest.get("extra", {}))
        extra["resharded_from"] = {"path": str(info.path.absolute()), "tp": info.tp, "pp": info.pp,
                                   "components_left_out": sorted(info.components)}
        save_model_checkpoint(stage, out, step=info.step, hf_files=info.hf_files, extra=extra,
                              overwrite=overwrite, progress=show)
    finally:
        distributed.shutdown()


# ------------------------------------------------------------------------------------------ operations


def _cleanup_partial(out: Path) -> None:
    shutil.rmtree(partial_path(out), ignore_errors=True)


def hf_to_dist(hf_dir: str | Path, out: str | Path, arch: str, tp: int, pp: int, *,
               cfg: ModelConfig | None = None, dtype: str | None = None, overwrite: bool = False,
               progress: bool = True) -> Path:
    """Convert an HF-layout ``arch`` checkpoint to a dist checkpoint written by a TP x PP layout.

    ``cfg`` (optional) must agree with config.json on the model's shape; it can set what config.json does
    not hold (``make_vocab_size_divisible_by``). ``dtype`` casts (default: as stored; required if mixed).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if arch not in ARCHS:
        raise CheckpointError(f"unknown model {arch!r} (known: {', '.join(ARCHS)})")
    if cfg is not None and cfg.arch != arch:
        raise CheckpointError(f"the model config is {cfg.arch!r} but --model is {arch!r}")
    with open_hf_checkpoint(hf_dir, cfg, arch) as reader:  # validates everything before any work
        model = reader.cfg
        if dtype is None:
            if reader.dtype is None:
                odd = next(n for n, d in reader.dtypes.items() if d != reader.dtypes[reader.names[0]])
                raise CheckpointError(f"{hf_dir}: tensors have mixed dtypes (e.g. {reader.names[0]} is "
                                      f"{reader.dtypes[reader.names[0]]}, {odd} is {reader.dtypes[odd]}): "
                                      f"choose one with --dtype")
            dtype = str(reader.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    try:
        check_layout(model, tp, pp)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    check_target(out, overwrite)
    try:
        run_ranks(_hf_to_dist_rank, tp * pp, str(hf_dir), str(out.absolute()), dataclasses.asdict(model), tp, pp,
                  dtype, overwrite, progress, cpu_only=True)
    finally:
        _cleanup_partial(out.absolute())
    return out


def model_checkpoint_dir(path: str | Path) -> tuple[Path, list[str]]:
    """The mdu-dist model checkpoint at ``path``: ``path`` itself, ``path/model`` of a trainer checkpoint
    (``step-N/{model, deepspeed, trainer_state.json}``), or that of a run directory's latest complete step; with
    the names of what sits beside it there."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        path = latest_step_or_self(path)
    if not (path / MANIFEST).is_file() and (path / "model" / MANIFEST).is_file():
        return path / "model", sorted(p.name for p in path.iterdir() if p.name != "model")
    return path, []


def reshard(src: str | Path, out: str | Path, tp: int, pp: int, *, verify: bool = True,
            overwrite: bool = False, progress: bool = True) -> tuple[Path, list[str]]:
    """Re-save the model weights of dist checkpoint ``src`` for a TP x PP layout; returns (out, notes).

    Model weights are always resharded (dist_checkpointing). Optimizer and other training state (components
    saved with the model, and a trainer checkpoint's DeepSpeed state) are not: the notes say what was left out,
    and the output manifest records it. ``src`` may be a trainer checkpoint (``step-N``); the output is a
    model-only dist checkpoint that keeps the step.
    """
    src, out = Path(src), Path(out)
    src, beside = model_checkpoint_dir(src)
    info = read_info(src)
    try:
        check_layout(info.cfg, tp, pp)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    check_target(out, overwrite)
    _verify(info, verify, progress)
    notes = []
    if beside:
        notes.append(f"{src.parent} is a trainer checkpoint: its {', '.join(beside)} (optimizer, scheduler and "
                     f"trainer state, saved for TP={info.tp} PP={info.pp}) are NOT resharded; {out} holds the model "
                     f"weights (step {info.step}) only. Start a new run from them with train.init={out} (fresh "
                     f"optimizer), or resume from {src.parent} with TP={info.tp} PP={info.pp} to keep that state.")
    for name, comp in sorted(info.components.items()):
        notes.append(f"component {name!r} (saved for TP={comp.get('tp')} PP={comp.get('pp')}) is NOT resharded: "
                     f"`mdu-dist reshard` carries model weights only, so {out} has no {name} state; a run resumed "
                     f"from it starts {name} afresh. To keep it, resume from {src} with its own layout "
                     f"(TP={info.tp} PP={info.pp}; only the data-parallel size may change).")
    if (tp, pp) == (info.tp, info.pp):
        notes.append(f"{src} already has TP={tp} PP={pp}: the output is a re-saved copy of its model weights")
    try:
        run_ranks(_reshard_rank, tp * pp, str(src), str(out.absolute()), tp, pp, overwrite, progress, cpu_only=True)
    finally:
        _cleanup_partial(out.absolute())
    return out, notes


def _verify(info: CheckpointInfo, verify: bool, progress: bool) -> None:
    bar = progress_bar(sum(f["size"] for f in info.files.values()), "sha256", progress and verify)
    problems = integrity_problems(info, hashes=verify, progress=bar.update)
    bar.close()
    if problems:
        raise CheckpointError("; ".join(problems))


def dist_to_hf(src: str | Path, out: str | Path, *, arch: str | None = None,
               max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES, copy_files_from: str | Path | None = None,
               dtype: str | None = None, verify: bool = True, overwrite: bool = False,
               progress: bool = True) -> tuple[Path, list[str]]:
    """Export the model weights of dist checkpoint ``src`` as an HF-layout checkpoint; returns (out, notes).

    Tensor names, config.json (the original one, updated) and the HF side files (tokenizer, code) come back
    as the source HF checkpoint had them; ``copy_files_from`` takes side files from another HF directory
    (for checkpoints that did not start as HF ones). Every tensor is written in ``dtype`` (default: the
    checkpoint's, i.e. the HF checkpoint's it was converted from). One layer is read at a time.
    """
    src, out = Path(src), Path(out)
    src, _ = model_checkpoint_dir(src)
    info = read_info(src)
    if arch is not None and info.arch != arch:
        raise CheckpointError(f"{src / MANIFEST}: this is a {info.arch} checkpoint, not {arch}")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    out_dtype = DTYPES[dtype] if dtype else info.dtype
    check_target(out, overwrite)
    _verify(info, verify, progress)
    reader = open_dist_checkpoint(src, verify=None)
    side = {p.name: p for p in info.hf_files}
    if copy_files_from is not None:
        side.update({p.name: p for p in hf_side_files(copy_files_from)})
    base_config = None
    if CONFIG_FILE in side:
        try:
            base_config = json.loads(side[CONFIG_FILE].read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{side[CONFIG_FILE]}: cannot be read as JSON: {e}") from None
    total = count_parameters(info.cfg) * torch.empty((), dtype=out_dtype).element_size()
    with tqdm(total=total, desc="write HF", unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
        write_hf_checkpoint(out, info.cfg, reader.hf_tensors(out_dtype), out_dtype, max_shard_bytes=max_shard_bytes,
                            base_config=base_config, extra_files=list(side.values()), overwrite=overwrite,
                            progress=bar.update)
    notes = [f"component {name!r} is not part of an HF checkpoint: not exported" for name in sorted(info.components)]
    return out, notes


# ---------------------------------------------------------------------------------------------- inspect


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def inspect_checkpoint(path: str | Path, *, verify: bool = True, progress: bool = True
                       ) -> tuple[list[str], list[str]]:
    """(report lines, problems) for a dist checkpoint (files checked against the manifest: sizes, and
    sha256 with ``verify``) or an HF-layout one (every header read)."""
    path = Path(path)
    if not (path / MANIFEST).is_file() and (path / CONFIG_FILE).is_file():
        return _inspect_hf(path)
    trainer_dir = path
    path, beside = model_checkpoint_dir(path)
    info = read_info(path)
    m = info.cfg
    lines = []
    if beside:
        try:
            state = json.loads((trainer_dir / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            state = "unreadable or missing"
        lines += [f"{trainer_dir}: trainer checkpoint ({TRAINER_STATE}: {state}); beside the model: "
                  f"{', '.join(beside)} (not covered by the manifest's checksums)"]
    lines += [
        f"{path}: mdu-dist dist checkpoint (megatron-core torch_dist), format version {info.manifest['version']}",
        f"architecture: {m.arch}, {m.num_layers} layers x {m.hidden_size}, {m.num_attention_heads} heads / "
        f"{m.num_query_groups} KV heads, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}"
        f"{', q/k/v biases' if m.qkv_bias else ''}",
        *_moe_lines(m),
        f"layout: saved by TP={info.tp} x PP={info.pp} (vocabulary padded to {m.padded_vocab_size(info.tp)}); "
        + ("loads into any PP that divides the layers, at TP=1 (MoE)" if m.is_moe else
           "loads into any TP/PP that divides the model"),
        f"parameters: {_parameters(m)}",
        f"dtype: {str(info.dtype).removeprefix('torch.')}",
        f"step: {info.step if info.step is not None else '- (not a training checkpoint)'}",
        "components: model" + "".join(f", {n} (TP={c.get('tp')} PP={c.get('pp')}, not reshardable)"
                                      for n, c in sorted(info.components.items())),
        f"files: {len(info.files)}, {_human(sum(f['size'] for f in info.files.values()))}"
        + (f" (HF side files: {', '.join(p.name for p in info.hf_files)})" if info.hf_files else ""),
    ]
    for key in ("converted_from", "resharded_from"):
        if key in info.manifest.get("extra", {}):
            lines.append(f"{key.replace('_', ' ')}: {info.manifest['extra'][key]}")
    bar = progress_bar(sum(f["size"] for f in info.files.values()), "sha256", progress and verify)
    problems = integrity_problems(info, hashes=verify, progress=bar.update)
    bar.close()
    if not any(str(path / MODEL_DIR / ".metadata") in p for p in problems):
        try:
            stored = stored_tensors(info)
            for key, shape in dl.global_shapes(m, info.tp).items():
                if key not in stored:
                    problems.append(f"{path / MODEL_DIR / '.metadata'}: no tensor {key}")
                elif stored[key][0] != shape:
                    problems.append(f"{path / MODEL_DIR / '.metadata'}: tensor {key} is {list(stored[key][0])}, "
                                    f"expected {list(shape)}")
        except CheckpointError as e:
            problems.append(str(e))
    lines.append(f"integrity: {'sha256 and size' if verify else 'size only'} of every file checked: "
                 + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return lines, problems


def _moe_lines(m: ModelConfig) -> list[str]:
    if not m.is_moe:
        return []
    shared = f" + a shared expert of {m.moe_shared_ffn_hidden_size}" if m.moe_shared_ffn_hidden_size else ""
    groups = f", {m.moe_num_groups} groups keep {m.moe_group_topk}" if m.moe_num_groups else ""
    return [f"experts: layers {m.moe_dense_layers}..{m.num_layers - 1} route each token to {m.moe_topk} of "
            f"{m.moe_num_experts} experts of {m.moe_ffn_hidden_size}{shared} ({m.moe_score} router{groups}"
            f"{', expert bias' if m.moe_expert_bias else ''}, x{m.moe_topk_scaling:g})"]


def _parameters(m: ModelConfig) -> str:
    total = f"{count_parameters(m):,}"
    return f"{total} ({count_active_parameters(m):,} active per token)" if m.is_moe else total


def _inspect_hf(path: Path) -> tuple[list[str], list[str]]:
    try:
        hf_config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: cannot be read as JSON: {e}") from None
    arch = arch_of_hf_config(hf_config) if isinstance(hf_config, dict) else None
    if arch is None:
        raise CheckpointError(f"{path / CONFIG_FILE}: model_type {hf_config.get('model_type')!r} is not one of llada, "
                              f"Dream, llada2_moe (nor are its architectures LLaDAMoEModelLM)")
    with open_hf_checkpoint(path, None, arch) as reader:
        m = reader.cfg
        dtypes = sorted({str(d).removeprefix("torch.") for d in reader.dtypes.values()})
        lines = [f"{path}: HF-layout {arch} checkpoint ({len(reader.files)} safetensors file(s))",
                 f"architecture: {m.arch}, {m.num_layers} layers x {m.hidden_size}, {m.num_attention_heads} heads / "
                 f"{m.num_query_groups} KV heads, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}", *_moe_lines(m),
                 f"parameters: {_parameters(m)}", f"dtype: {', '.join(dtypes)}",
                 "integrity: every safetensors header, size and tensor shape checked: OK (HF files carry no "
                 "checksums)"]
    return lines, []


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "dist_to_hf", "hf_side_files", "hf_to_dist", "inspect_checkpoint",
           "load_hf_into_stage", "model_checkpoint_dir", "reshard"]
