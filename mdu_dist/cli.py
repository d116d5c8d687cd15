"""The ``mdu-dist`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import sys
import warnings

import torch

from mdu_dist import __version__
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.source import load_job_config
from mdu_dist.config import Config, ConfigError
from mdu_dist.data import DataError
from mdu_dist.distributed import process_env, resolve_layout
from mdu_dist.eval.run import main_eval
from mdu_dist.inputs import check_job
from mdu_dist.launch.local import launched_world_size, run_ranks
from mdu_dist.models.dense import canonical_shapes, count_active_parameters, count_parameters, init_weights
from mdu_dist.models.arch import is_moe_layer
from mdu_dist.models.mcore_layout import layer_range, shard


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken optional install is reported, not fatal
        return f"not available ({type(e).__name__})"
    return getattr(mod, "__version__", "unknown")


def _devices() -> str:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} CUDA device(s): " + ", ".join(names)
    return f"no CUDA device; CPU with {os.cpu_count()} cores (gloo backend, megatron-core via mdu_dist.cpu_shim)"


def cmd_info(args: argparse.Namespace) -> int:
    cfg = load_job_config(args.config, args.overrides, "info")
    print(f"mdu-dist {__version__} | Python {platform.python_version()}")
    for module in ("torch", "megatron.core", "deepspeed", "transformers", "submitit"):
        print(f"  {module:<14} {_version(module)}")
    print(f"devices: {_devices()}")

    penv = process_env()
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    world = args.world_size or (penv.world_size if penv.source != "single" else tp * pp)
    layout = resolve_layout(world, cfg.parallel, cfg.model)
    print(f"launcher: {penv.source}; parallel layout: {layout}")

    m = cfg.model
    total = count_parameters(m)
    print(f"model: {m.arch}, {m.num_layers} layers x {m.hidden_size}, {m.num_attention_heads} heads / "
          f"{m.num_query_groups} KV heads, ffn {m.ffn_hidden_size}, vocab {m.vocab_size} "
          f"(padded to {m.padded_vocab_size(tp)} for TP={tp})")
    print(f"parameters: {total:,} ({total / 1e9:.3f}e9)")
    if m.is_moe:
        active = count_active_parameters(m)
        print(f"active parameters per token: {active:,} ({active / 1e9:.3f}e9): {m.moe_topk} of {m.moe_num_experts} "
              f"routed experts in layers {m.moe_dense_layers}..{m.num_layers - 1}"
              + (", plus the shared expert" if m.moe_shared_ffn_hidden_size else ""))
        # Model cards may leave out the input embedding (a row lookup per token): LLaDA-MoE's "1.4B active".
        rows, width = canonical_shapes(m)["embed"]
        lookup = rows * width
        print(f"  without the input embedding ({rows} x {width}): {total - lookup:,} "
              f"({(total - lookup) / 1e9:.3f}e9) in all, {active - lookup:,} ({(active - lookup) / 1e9:.3f}e9) active")
    weights = init_weights(m, device="meta")
    for pp_rank in range(pp):
        state = shard(m, weights, tp, 0, pp, pp_rank)
        per_rank = sum(t.numel() for t in state.values())
        print(f"pipeline stage {pp_rank}: {per_rank:,} parameters per TP rank; shapes on each of its {tp} TP ranks:")
        shown = _layers_shown(m, pp, pp_rank)
        for name, t in state.items():
            layer = re.match(r"decoder\.layers\.(\d+)\.", name)
            if layer and int(layer.group(1)) not in shown or re.search(r"local_experts\.[1-9]", name):
                continue  # the other layers (and experts) of a stage have the shapes of the ones shown
            print(f"  {name:<60} {tuple(t.shape)}")
    return 0


def _layers_shown(m, pp: int, pp_rank: int) -> set[int]:
    """Stage-local indices of the first layer of each kind (dense, MoE) in stage ``pp_rank``."""
    first: dict[bool, int] = {}
    for j, i in enumerate(layer_range(m.num_layers, pp, pp_rank)):
        first.setdefault(is_moe_layer(m, i), j)
    return set(first.values())


def cmd_train(args: argparse.Namespace) -> int:
    """``finetune`` / ``unlearn``: in this process when a launcher (torchrun, srun) started it (on its world size:
    TP x PP x DP), else on ``--nproc`` local processes (default TP x PP)."""
    # deferred: the trainer imports TensorBoard (~0.7 s), which only training needs
    from mdu_dist.trainer import run_job

    cfg = load_job_config(args.config, args.overrides, args.command)
    nproc = args.nproc or launched_world_size() or cfg.parallel.tensor * cfg.parallel.pipeline
    check_job(cfg, args.command, nproc)  # every input, before any process starts or anything is written
    results = run_ranks(run_job, nproc, cfg, args.command)
    final = results[-1]
    print(f"{args.command} finished: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    print(f"checkpoints: {cfg.train.output_dir}/checkpoints   TensorBoard: "
          f"tensorboard --logdir {cfg.train.output_dir}/tensorboard")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``eval``: TOFU metrics of ``eval.checkpoint`` on ``--nproc`` local ranks (TP x DP; or under a launcher)."""
    cfg = load_job_config(args.config, args.overrides, "eval")
    metrics = main_eval(cfg, args.nproc)
    shown = {k: v for k, v in metrics.items() if v is not None and not k.endswith("_f1")}
    print("eval finished: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    print(f"results: {cfg.eval.output_dir}/eval.json and {cfg.eval.output_dir}/eval.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # deferred: the demo imports the trainer and TensorBoard (~0.7 s)
    from mdu_dist.demo import main_demo

    return main_demo(args.config, args.overrides, quick=args.quick)


# The keys most finetune / unlearn runs set, listed by their --help; every key is in docs/configuration.md.
TRAIN_KEYS = {
    "train.init": "an mdu-dist checkpoint (.../model) or an HF directory; '' = random",
    "train.output_dir": "checkpoints, TensorBoard logs, the trained tokenizer",
    "train.resume": "auto: continue from the latest complete checkpoint",
    "parallel.tensor": "tensor-parallel size; divides heads, KV heads, FFN width",
    "parallel.pipeline": "pipeline-parallel size; divides the layers",
    "optim.zero_stage": "DeepSpeed ZeRO stage 1, 2 or 3 (PP > 1: 1 only)",
    "optim.offload_optimizer": "cpu: optimizer state and step on the CPU",
}
UNLEARN_KEYS = {
    "method.name": "mdu, ga, graddiff, npo, simnpo, wga or dpo",
    "method.tau": "MDU target softmax(tau x anchor logits); 0 uniform, 1 raw anchor",
}


def key_help(keys: dict[str, str]) -> str:
    """The --help epilog: one line per key: name, default, meaning."""
    defaults = Config()
    lines = [f"  {key:<24} {getattr(getattr(defaults, key.split('.')[0]), key.split('.')[1])!r:<11} {text}"
             for key, text in keys.items()]
    return "\n".join(["most used keys (key=value; default; every key: docs/configuration.md):",
                      *lines])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdu-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, the parallel layout and the model's per-rank shapes")
    info.add_argument("--config", help="YAML config (default: the built-in tiny LLaDA)")
    info.add_argument("--world-size", type=int, help="world size to plan for (default: launcher's, else TP x PP)")
    info.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    info.set_defaults(func=cmd_info)
    for job, text in (("finetune", "teach a backbone a dataset with the masked-diffusion SFT loss"),
                      ("unlearn", "unlearn the forget set with MDU or a baseline (method.name)")):
        keys = {**TRAIN_KEYS, **(UNLEARN_KEYS if job == "unlearn" else {})}
        p = sub.add_parser(job, help=text, description=text, epilog=key_help(keys),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML config (default: the built-in defaults)")
        p.add_argument("--nproc", type=int, help="local processes when not under a launcher (default TP x PP; under "
                                                  "torchrun / srun: the launcher's world size)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="TOFU metrics (probability, ROUGE-L, truth ratio, forget quality, model "
                                     "utility) of a checkpoint: eval.json and eval.md")
    ev.add_argument("--config", help="YAML config (default: the built-in defaults)")
    ev.add_argument("--nproc", type=int, help="local processes when not under a launcher: TP x DP, the work "
                                             "divided over the DP replicas (default parallel.tensor)")
    ev.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (eval.checkpoint=...)")
    ev.set_defaults(func=cmd_eval)
    demo = sub.add_parser("demo", help="the whole pipeline on CPU: fine-tune, unlearn (MDU and baselines), "
                                       "evaluate, results table and plots")
    demo.add_argument("--config", default=None, help="demo YAML (default: the package's own, mdu_dist/resources/demo.yaml)")
    demo.add_argument("--quick", action="store_true", help="a minutes-long smoke run (tiny sizes, few steps)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="demo setting overrides")
    demo.set_defaults(func=cmd_demo)
    importlib.import_module("mdu_dist.checkpoint.commands").register(sub)
    importlib.import_module("mdu_dist.launch.command").register(sub)
    importlib.import_module("mdu_dist.plan").register(sub)
    importlib.import_module("mdu_dist.bench").register(sub)
    importlib.import_module("mdu_dist.eval.report").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # megatron-core announces at import that it falls back from apex/TE to its local (exact) paths.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"mdu-dist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
