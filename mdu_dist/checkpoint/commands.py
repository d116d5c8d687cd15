"""``mdu-dist convert hf-to-dist | dist-to-hf | lora-to-peft | lora-to-hf``, ``mdu-dist reshard`` and ``mdu-dist inspect``."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from mdu_dist.checkpoint.convert import DTYPES, dist_to_hf, hf_to_dist, inspect_checkpoint, reshard
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.hf import CONFIG_FILE, hf_config_to_model_config, read_json
from mdu_dist.checkpoint.lora import adapter_dir, export_merged, export_peft, inspect_lora, is_lora_checkpoint
from mdu_dist.config import ConfigError, config_from_dict, load_config
from mdu_dist.models import ARCHS


def _size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``123`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 1000000")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def _run(fn, args: argparse.Namespace) -> int:
    """Exit status: 0 done; 1 the checkpoint is refused or (inspect) corrupt; 2 a bad config or override."""
    try:
        return fn(args)
    except CheckpointError as e:
        print(f"mdu-dist: error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"mdu-dist: error: {e}", file=sys.stderr)
        return 2


def _model_config(args: argparse.Namespace):
    """The run's ModelConfig: --config YAML (+ overrides), or config.json + overrides, or None (config.json)."""
    if args.config:
        return load_config(args.config, args.overrides).model
    if not args.overrides:
        return None
    path = f"{args.hf_dir}/{CONFIG_FILE}"
    try:
        base = hf_config_to_model_config(read_json(Path(path)), args.model, source=path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return config_from_dict({"model": dataclasses.asdict(base)}, args.overrides, source=path).model


def cmd_hf_to_dist(args: argparse.Namespace) -> int:
    out = hf_to_dist(args.hf_dir, args.out, args.model, args.tp, args.pp, cfg=_model_config(args), dtype=args.dtype,
                     overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out} (TP={args.tp} x PP={args.pp}); `mdu-dist inspect {out}` verifies it")
    return 0


def cmd_dist_to_hf(args: argparse.Namespace) -> int:
    out, notes = dist_to_hf(args.src, args.out, arch=args.model, max_shard_bytes=args.max_shard_size,
                            copy_files_from=args.copy_files_from, dtype=args.dtype, verify=not args.no_verify,
                            overwrite=args.overwrite, progress=not args.no_progress)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def cmd_lora_to_peft(args: argparse.Namespace) -> int:
    print(f"wrote {export_peft(args.src, args.out, overwrite=args.overwrite)} (PEFT LoRA adapter)")
    return 0


def cmd_lora_to_hf(args: argparse.Namespace) -> int:
    out = export_merged(args.src, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                        max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {out} (base + adapters merged)")
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    out, notes = reshard(args.src, args.out, args.tp, args.pp, verify=not args.no_verify, overwrite=args.overwrite,
                         progress=not args.no_progress)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out} (TP={args.tp} x PP={args.pp})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    lora = adapter_dir(args.ckpt)
    lines, problems = (inspect_lora(lora) if is_lora_checkpoint(lora) else
                       inspect_checkpoint(args.ckpt, verify=not args.quick, progress=not args.no_progress))
    print("\n".join(lines))
    for problem in problems:
        print(f"CORRUPT: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _common(p: argparse.ArgumentParser, overwrite: bool = True) -> None:
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add the checkpoint subcommands to the ``mdu-dist`` parser."""
    convert = subparsers.add_parser("convert", help="convert checkpoints between HF layout and dist (TP/PP) layout")
    csub = convert.add_subparsers(dest="direction", required=True)

    h2d = csub.add_parser("hf-to-dist", help="HF-layout safetensors -> megatron-core dist checkpoint for TP x PP",
                          description="Runs TP x PP local CPU processes (or the ranks of torchrun/srun if launched "
                                      "with that many); each reads only its own slices of the HF files.")
    h2d.add_argument("--model", required=True, choices=list(ARCHS), help="the backbone the HF files hold")
    h2d.add_argument("--hf-dir", required=True, help="directory with config.json and model*.safetensors")
    h2d.add_argument("--out", required=True, help="output directory (written atomically)")
    h2d.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the writing layout")
    h2d.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the writing layout")
    h2d.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast (default: as stored)")
    h2d.add_argument("--config", help="run config YAML; must agree with config.json on the model's shape")
    h2d.add_argument("overrides", nargs="*", metavar="model.key=value",
                     help="e.g. model.make_vocab_size_divisible_by=64 (config.json holds no vocab padding)")
    _common(h2d)
    h2d.set_defaults(func=lambda a: _run(cmd_hf_to_dist, a))

    d2h = csub.add_parser("dist-to-hf", help="dist checkpoint -> HF-layout safetensors (+ config.json, tokenizer)")
    d2h.add_argument("--in", dest="src", required=True, help="dist checkpoint directory")
    d2h.add_argument("--out", required=True, help="output HF directory (written atomically)")
    d2h.add_argument("--model", choices=list(ARCHS), help="refuse a checkpoint of another backbone")
    d2h.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file (default 5GB)")
    d2h.add_argument("--copy-files-from", help="HF directory to take tokenizer/code/config.json files from")
    d2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="dtype of every written tensor (default: the checkpoint's)")
    d2h.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256")
    _common(d2h)
    d2h.set_defaults(func=lambda a: _run(cmd_dist_to_hf, a))

    l2p = csub.add_parser("lora-to-peft", help="LoRA checkpoint -> PEFT adapter (adapter_config.json + "
                                               "adapter_model.safetensors, HF module names)")
    l2p.add_argument("--in", dest="src", required=True, help="LoRA checkpoint (step-N or step-N/adapter)")
    l2p.add_argument("--out", required=True, help="output directory (written atomically)")
    _common(l2p)
    l2p.set_defaults(func=lambda a: _run(cmd_lora_to_peft, a))

    l2h = csub.add_parser("lora-to-hf", help="LoRA checkpoint -> HF-layout checkpoint of the base with the "
                                             "adapters merged in")
    l2h.add_argument("--in", dest="src", required=True, help="LoRA checkpoint (step-N or step-N/adapter)")
    l2h.add_argument("--out", required=True, help="output HF directory (written atomically)")
    l2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the base's")
    l2h.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file (default 5GB)")
    _common(l2h)
    l2h.set_defaults(func=lambda a: _run(cmd_lora_to_hf, a))

    rs = subparsers.add_parser("reshard", help="re-save a dist checkpoint's model weights for another TP x PP",
                               description="Model weights only: optimizer or other trainer state is not resharded "
                                           "(the command says so).")
    rs.add_argument("--in", dest="src", required=True, help="dist checkpoint directory")
    rs.add_argument("--out", required=True, help="output directory (written atomically)")
    rs.add_argument("--tp", type=int, default=1, help="target tensor-parallel size")
    rs.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    rs.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256")
    _common(rs)
    rs.set_defaults(func=lambda a: _run(cmd_reshard, a))

    ins = subparsers.add_parser("inspect", help="architecture, layout, parameters, dtype, step; verify every file")
    ins.add_argument("ckpt", help="dist checkpoint, LoRA checkpoint (step-N or its adapter/) or HF-layout directory")
    ins.add_argument("--quick", action="store_true", help="check sizes only, not sha256")
    _common(ins, overwrite=False)
    ins.set_defaults(func=lambda a: _run(cmd_inspect, a))
