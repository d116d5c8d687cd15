"""``mdu-dist bench``: the unlearning step's costs, measured side by side in one run.

(a) steps: the trainer's whole step (forward, backward, optimizer) for masked-diffusion SFT and for MDU on the
    same rows, length, masks and starting weights, in one process. MDU's forget term does SFT's work plus one
    no-grad anchor forward, so MDU(alpha=0) / SFT(same rows) has a floor of about 4/3 (forward 1 + backward 2,
    plus 1); with the retain term (alpha=1, 2 policy passes + 1 anchor) against SFT on forget + retain rows the
    floor is 7/6. Kinds are interleaved repeat by repeat so that load from other processes hits all alike.
(b) kl: ``vocab_parallel_divergence`` (group=None) against a naive full-vocabulary KL (log_softmax of both,
    autograd) at LLaDA's and Dream's vocabularies: time of forward + backward, and peak bytes of the storages
    allocated during them (``LiveBytes``; the inputs are not counted, the gradient is).
(c) throughput: tokens/s of the MDU step (forget + retain tokens per step / step time) at each TP size, on
    TP local processes joined by gloo (the CPU threads are split between them).
(d) attention: the SFT step with SDPA and with megatron's local (unfused) core attention side by side, at each
    of ``--attention-seq-lens``: step time and peak memory.
(e) lora (``--lora-rank R``): the MDU step with every parameter trained (and a frozen reference copy) against
    LoRA rank R (the base frozen, the reference = the policy with its adapters off) on the same rows and masks:
    step time, peak memory of the step, and the bytes held between steps (parameters, reference, optimizer's
    fp32 master and Adam moments: ``resident_bytes``).
MDU at tau = 0 (``mdu_tau0``: uniform target, no anchor pass, no reference) is timed against SFT too: its floor
is 1. Peak memory of a step (every kind): of its forward and backward on the same micro-batch, untimed, outside
DeepSpeed (``step_peak_bytes``); CUDA's peak allocated bytes above what was allocated before, on CPU the
storages allocated meanwhile (``LiveBytes``).

Steps use synthetic random token rows of a fixed length rather than TOFU rows, whose padded length varies by
step; the trainer, objective and model are the real ones. Timings are medians over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mdu_dist import distributed
from mdu_dist.config import Config, load_config
from mdu_dist.data import Pairs
from mdu_dist.launch.local import run_ranks
from mdu_dist.losses.divergence import chunk_rows, vocab_parallel_divergence
from mdu_dist.methods import microbatch_loss, prepare
from mdu_dist.models.mcore import build_stage
from mdu_dist.models.paired import PolicyAndReference
from mdu_dist.pipeline import run_microbatches

LLADA_VOCAB, DREAM_VOCAB = 126464, 152064
# A small LLaDA-shaped model: big enough that the transformer, not Python overhead, dominates a CPU step.
SMALL = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=4",
         "model.ffn_hidden_size=688", "model.vocab_size=32768", "model.max_position_embeddings=4096",
         "optim.lr=1e-5", "optim.warmup_steps=0"]
# mdu_forget: alpha=0; mdu_tau0: alpha=0 and tau=0; sft_2x: SFT on forget + retain rows. ``kind@attention``
# runs the kind with model.attention=attention; ``kind+lora`` with the config's lora section (otherwise rank 0).
SECTIONS = ("steps", "kl", "throughput", "attention", "lora")
STEP_KINDS = ("sft", "mdu_forget", "mdu_tau0", "sft_2x", "mdu")


# ------------------------------------------------------------------------------------------ (b) the KL


def naive_kl(logits: torch.Tensor, anchor: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(z) || softmax(tau a)) per row the direct way: both full-vocabulary log-softmaxes alive at once
    and every intermediate kept by autograd. What the vocab-parallel kernel is measured against."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, float64 for the tests' reference
    logp = F.log_softmax(logits.to(dtype), -1)
    logq = F.log_softmax(tau * anchor.detach().to(dtype), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def parallel_kl(logits: torch.Tensor, anchor: torch.Tensor, tau: float, chunk_size: int | None = None
                ) -> torch.Tensor:
    """The kernel MDU's loss uses, on one process holding the whole vocabulary."""
    return vocab_parallel_divergence(logits, anchor, None, vocab_start=0, vocab_size=logits.shape[1],
                                     direction="forward", tau=tau, chunk_size=chunk_size)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages allocated by the ops run under it (inputs made outside are not counted):
    each new storage counts from its creation until its last reference dies (weakref.finalize). Also the
    probe of tests/test_divergence.py's memory bound; CPU has no allocator statistics to ask instead."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self.tracked:  # views and in-place ops alias inputs
                self.tracked.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def kl_inputs(rows: int, vocab: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits, anchor = torch.randn(rows, vocab, generator=g) * 3, torch.randn(rows, vocab, generator=g) * 3
    return logits.to(device), anchor.to(device)


def _sync() -> None:
    """Wait for queued GPU work, so that a host clock measures it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _forward_backward(fn: Callable, logits: torch.Tensor, anchor: torch.Tensor) -> None:
    z = logits.detach().requires_grad_(True)
    fn(z, anchor).sum().backward()


def measure_kl(fn: Callable, rows: int, vocab: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward, and peak live bytes of one such call."""
    logits, anchor = kl_inputs(rows, vocab, device="cuda" if torch.cuda.is_available() else "cpu")
    times = []
    for i in range(warmup + repeats):
        _sync()
        start = time.perf_counter()
        _forward_backward(fn, logits, anchor)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    with LiveBytes() as mode:
        _forward_backward(fn, logits, anchor)
    return {"seconds": statistics.median(times), "peak_bytes": mode.peak}


def bench_kl(rows: list[int], vocabs: list[int], chunks: list[int], tau: float, warmup: int, repeats: int
             ) -> list[dict]:
    out = []
    for vocab in vocabs:
        for n in rows:
            naive = measure_kl(lambda z, a: naive_kl(z, a, tau), n, vocab, warmup, repeats)
            for chunk in (c or chunk_rows(vocab) for c in chunks):
                par = measure_kl(lambda z, a, c=chunk: parallel_kl(z, a, tau, c), n, vocab, warmup, repeats)
                out.append({"vocab": vocab, "rows": n, "chunk": chunk, "naive_s": naive["seconds"],
                            "parallel_s": par["seconds"], "naive_peak_bytes": naive["peak_bytes"],
                            "parallel_peak_bytes": par["peak_bytes"],
                            "time_ratio": par["seconds"] / naive["seconds"],
                            "memory_ratio": par["peak_bytes"] / naive["peak_bytes"],
                            "memory_ratio_less_grad": _less_grad(par["peak_bytes"], naive["peak_bytes"],
                                                                 n * vocab * 4)})
    return out


def _less_grad(kernel: int, naive: int, grad: int) -> float:
    """Peak ratio without the [N, V] float32 gradient both must return: the kernel holds it from the start of
    its forward (it forms the gradient there), so its peak less the gradient is exact; for the naive version it
    may undercount (its peak can come before the gradient exists), which only makes the ratio less flattering
    to the kernel."""
    return (kernel - grad) / max(naive - grad, 1)


# ------------------------------------------------------------------------------- (a) and (c) the steps


def _random_pairs(cfg: Config, rows: int, seq_len: int, seed: int):
    """Random token rows, the first quarter prompt and the rest response; the mask token never appears."""
    m = cfg.model
    ids = torch.randint(0, m.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    ids[ids == m.mask_token_id] = (m.mask_token_id + 1) % m.vocab_size
    response = torch.zeros(rows, seq_len, dtype=torch.bool)
    response[:, seq_len // 4:] = True
    return Pairs(ids, response)


def _trainer(cfg: Config, job: str, overrides: dict[str, object]):
    """A real Trainer whose step runs on the micro-batches the bench sets in ``fixed``."""
    # deferred: the trainer imports TensorBoard (~0.7 s); the CLI imports this module for --help
    from mdu_dist.trainer import Trainer

    class FixedBatchTrainer(Trainer):
        fixed: list = []

        def _microbatches(self, step):
            return self.fixed

    method = dataclasses.replace(cfg.method, **overrides)
    return FixedBatchTrainer(dataclasses.replace(cfg, method=method), job)


def forward_flops(m, tokens: int, seq_len: int, head_rows: int) -> int:
    """Matmul FLOPs of one forward pass over ``tokens`` tokens in sequences of ``seq_len`` (bidirectional: every
    token attends to all ``seq_len``), the output layer run at ``head_rows`` positions only, as the trainer does:

        per token and layer  2 (2 h^2 + 2 h kv + 3 h f)  (q, o; k, v; gate, up, down)  +  4 s h  (QK^T, AV)
        output layer         2 h V per row where it runs
    """
    h, f, v = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    kv = m.num_query_groups * m.head_dim
    per_token_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * seq_len * h
    return tokens * m.num_layers * per_token_layer + head_rows * 2 * h * v


def step_flops(m, mb) -> int:
    """Model FLOPs of one training step on micro-batch ``mb``: forward + backward (3 forwards) of the policy
    rows, one forward of the reference rows (MDU's anchor, NPO's theta_0), each at its own logit positions."""
    seq_len = mb.ids.shape[1]
    policy = mb.positions[: mb.n_policy]
    reference = mb.positions[mb.n_policy:]
    return (3 * forward_flops(m, policy.numel(), seq_len, int(policy.sum()))
            + forward_flops(m, reference.numel(), seq_len, int(reference.sum())))


# Dense bf16 tensor-core peaks (FLOP/s), by the name torch reports; MFU = model FLOP/s / peak.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if device_name and k in device_name), None)


def _peak_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()`` and the peak bytes allocated while it runs, beyond what was allocated before it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    with LiveBytes() as mode:
        out = fn()
    return out, mode.peak


def step_peak_bytes(trainer) -> int:
    """Peak bytes of one forward and backward of ``trainer``'s step on its micro-batches (activations, logits,
    gradients), through a fresh copy of its model outside DeepSpeed: DeepSpeed's gradient hooks allocate a
    reduce bucket of its own size (2 GB by default) in every backward, whatever the model does."""
    cfg, mbs = trainer.cfg, trainer.fixed
    dtype, device = next(trainer.policy.parameters()).dtype, next(trainer.policy.parameters()).device
    reference = build_stage(cfg.model, dtype).to(device) if trainer.reference is not None else None
    policy = build_stage(cfg.model, dtype, cfg.train.recompute, cfg.lora if cfg.lora.enabled else None)
    model = PolicyAndReference(policy.to(device), reference, trainer.adapters_off)

    def forward_backward():
        run_microbatches(model, mbs, lambda m, mb: mb.forward(m),
                         lambda mb, logits: (microbatch_loss(trainer.objective, mb, logits, trainer.vocab)[0], {}),
                         seq_length=mbs[0].ids.shape[1], micro_batch_size=mbs[0].ids.shape[0])

    return _peak_bytes(forward_backward)[1]


def resident_bytes(trainer) -> int:
    """Bytes a trainer holds between steps: the policy's and the reference's parameters, and the ZeRO optimizer's
    fp32 master partitions and Adam moments (gradients are freed by the step)."""
    opt = trainer.engine.optimizer
    tensors = [*trainer.policy.parameters(), *(trainer.reference.parameters() if trainer.reference else ())]
    tensors += list(getattr(opt, "single_partition_of_fp32_groups", ()))
    tensors += [v for state in opt.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_worker(cfg: Config, kinds: tuple[str, ...], seq_len: int, warmup: int, repeats: int, threads: int
                ) -> dict:
    """One rank: build the trainers ``kinds`` need, then time their steps, interleaved; then one more step of
    each for its peak memory."""
    # A fixed thread count per rank: on a loaded machine, OpenMP teams wider than the free cores spin at
    # their barriers and a step's time then says more about the neighbours than about the step.
    torch.set_num_threads(threads)
    distributed.init(cfg.parallel, cfg.model)
    try:
        b = cfg.optim.micro_batch_size
        forget, retain = _random_pairs(cfg, b, seq_len, 1), _random_pairs(cfg, b, seq_len, 2)
        both = type(forget)(torch.cat([forget.input_ids, retain.input_ids]),
                            torch.cat([forget.response_mask, retain.response_mask]))
        # Each kind: (job, method overrides, batch parts, policy rows with a gradient).
        spec = {"sft": ("finetune", {}, {"train": forget}, b),
                "mdu_forget": ("unlearn", {"name": "mdu", "alpha": 0.0}, {"forget": forget}, b),
                "mdu_tau0": ("unlearn", {"name": "mdu", "alpha": 0.0, "tau": 0.0}, {"forget": forget}, b),
                "sft_2x": ("finetune", {}, {"train": both}, 2 * b),
                "mdu": ("unlearn", {"name": "mdu", "alpha": 1.0}, {"forget": forget, "retain": retain}, 2 * b)}
        trainers, tokens, flops = {}, {}, {}
        for kind in kinds:
            base, _, attention = kind.partition("@")
            job, overrides, parts, rows = spec[base.removesuffix("+lora")]
            kind_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention)) \
                if attention else cfg
            rank = cfg.lora.rank if base.endswith("+lora") else 0
            kind_cfg = dataclasses.replace(kind_cfg, lora=dataclasses.replace(cfg.lora, rank=rank))
            trainers[kind] = _trainer(kind_cfg, job, overrides)
            # The same generator seed: SFT's and MDU's forget rows get the same t and the same masks.
            mb = prepare(trainers[kind].objective, parts, torch.Generator().manual_seed(0))
            trainers[kind].fixed = [mb.to(distributed.device())]
            tokens[kind] = rows * seq_len
            flops[kind] = step_flops(cfg.model, mb)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(warmup + repeats):
            for kind in kinds:
                _sync()
                start = time.perf_counter()
                trainers[kind].train_step(i)
                _sync()
                if i >= warmup:
                    times[kind].append(time.perf_counter() - start)
        medians = {k: statistics.median(v) for k, v in times.items()}
        peaks = {k: step_peak_bytes(trainers[k]) for k in kinds}
        return {k: {"seconds": medians[k], "tokens": tokens[k], "tokens_per_s": tokens[k] / medians[k],
                    "model_flops": flops[k], "tflops_per_s": flops[k] / medians[k] / 1e12, "all_seconds": v,
                    "peak_bytes": peaks[k], "resident_bytes": resident_bytes(trainers[k]),
                    "trainable": sum(p.numel() for p in trainers[k].policy.parameters() if p.requires_grad)}
                for k, v in times.items()}
    finally:
        distributed.shutdown()


def paired_ratio(a: dict, b: dict) -> dict[str, float]:
    """a / b three ways. ``paired``: the median over repeats of a_i / b_i, steps timed back to back, so each pair
    shares the load other processes put on the machine (the robust one on a shared CPU); ``medians``: the ratio
    of the medians; ``minima``: of the fastest steps (the least disturbed)."""
    pairs = [x / y for x, y in zip(a["all_seconds"], b["all_seconds"], strict=True)]
    return {"paired": statistics.median(pairs), "medians": a["seconds"] / b["seconds"],
            "minima": min(a["all_seconds"]) / min(b["all_seconds"])}


def run_steps(cfg: Config, kinds: tuple[str, ...], seq_len: int, warmup: int, repeats: int, threads: int
              ) -> dict:
    world = cfg.parallel.tensor * cfg.parallel.pipeline
    return run_ranks(step_worker, world, cfg, kinds, seq_len, warmup, repeats, threads)[0]


# ---------------------------------------------------------------------------------------------- report


def machine() -> dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _mfu(tflops_per_s: float, peak: float | None) -> str:
    return f"{tflops_per_s * 1e12 / peak:.1%}" if peak else "n/a (no known peak)"


def format_report(result: dict) -> str:
    peak = peak_flops(result["machine"]["cuda"])
    lines = []
    if result.get("steps"):
        lines += _steps_report(result, peak)
    if result.get("kl"):
        lines += _kl_report(result)
    if result.get("throughput"):
        lines += ["", "(c) MDU step (forget + retain tokens) by TP size, gloo on CPU",
                  "| TP | s/step | tokens/s |", "|---|---|---|"]
        lines += [f"| {tp} | {v['seconds']:.3f} | {v['tokens_per_s']:.0f} |"
                  for tp, v in result["throughput"].items()]
    if result.get("attention"):
        lines += _attention_report(result)
    if result.get("lora"):
        lines += _lora_report(result)
    return "\n".join(lines).strip("\n")


def _lora_report(result: dict) -> list[str]:
    r = result["lora"]
    full, lora = r["steps"]["mdu"], r["steps"]["mdu+lora"]
    lines = ["", f"(e) MDU step, every parameter vs LoRA rank {r['rank']} on {', '.join(r['targets'])} "
                 "(same rows and masks)",
             "| step | trainable | s/step | peak MiB (step) | resident MiB (params, reference, optimizer) |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['trainable']} | {v['seconds']:.3f} | {_mib(v['peak_bytes'])} | "
              f"{_mib(v['resident_bytes'])} |" for k, v in r["steps"].items()]
    t = r["time_ratio"]
    lines.append(f"LoRA / full: time {t['paired']:.3f} (median of paired ratios; ratio of medians {t['medians']:.3f}),"
                 f" peak memory {lora['peak_bytes'] / full['peak_bytes']:.3f}, resident memory "
                 f"{lora['resident_bytes'] / full['resident_bytes']:.3f}")
    return lines


def _steps_report(result: dict, peak: float | None) -> list[str]:
    s = result["steps"]
    lines = ["(a) one training step, same rows/length/masks (median s)",
             "| step | policy tokens | s/step | tokens/s | model TFLOP/s | MFU | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['tokens']} | {v['seconds']:.3f} | {v['tokens_per_s']:.0f} | {v['tflops_per_s']:.3g} | "
              f"{_mfu(v['tflops_per_s'], peak)} | {_mib(v['peak_bytes'])} |" for k, v in s.items()]
    for name, r in result["ratios"].items():
        lines.append(f"{name}: {r['paired']:.3f} (median of paired ratios; ratio of medians {r['medians']:.3f}, "
                     f"of minima {r['minima']:.3f})")
    return lines


def _kl_report(result: dict) -> list[str]:
    lines = ["", "(b) KL forward + backward: vocab-parallel kernel (group=None) vs naive full-vocabulary",
              "| vocab | rows | chunk | naive s | kernel s | time ratio | naive MiB | kernel MiB | memory ratio | "
              "less gradient |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['vocab']} | {r['rows']} | {r['chunk']} | {r['naive_s']:.3f} | {r['parallel_s']:.3f} | "
              f"{r['time_ratio']:.2f} | {_mib(r['naive_peak_bytes'])} | {_mib(r['parallel_peak_bytes'])} | "
              f"{r['memory_ratio']:.2f} | {r['memory_ratio_less_grad']:.2f} |" for r in result["kl"]]
    return lines


def _attention_report(result: dict) -> list[str]:
    lines = ["", "(d) SFT step, SDPA vs megatron's local core attention",
             "| tokens | SDPA s/step | local s/step | time ratio | SDPA peak MiB | local peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for n, r in result["attention"].items():
        a, b = r["sft@sdpa"], r["sft@local"]
        lines.append(f"| {n} | {a['seconds']:.3f} | {b['seconds']:.3f} | {a['seconds'] / b['seconds']:.2f} | "
                     f"{_mib(a['peak_bytes'])} | {_mib(b['peak_bytes'])} | {a['peak_bytes'] / b['peak_bytes']:.2f} |")
    return lines


def run_bench(args: argparse.Namespace) -> dict:
    # data.limit: the trainers read (and ignore) a few TOFU rows; max_steps: the schedule spans the timed steps.
    overrides = ([] if args.tiny else SMALL) + ["data.limit=16", f"optim.micro_batch_size={args.micro_batch_size}",
                                                f"train.max_steps={args.warmup + args.repeats}",
                                                f"train.output_dir={args.output_dir}", *args.overrides]
    cfg = load_config(args.config, overrides)
    sections = set(args.sections)
    steps, ratios, kl, throughput, attention, lora = {}, {}, [], {}, {}, {}
    if "steps" in sections:
        steps = run_steps(cfg, STEP_KINDS, args.seq_len, args.warmup, args.repeats, args.threads)
        ratios = {"MDU(alpha=0) / SFT (floor 4/3)": paired_ratio(steps["mdu_forget"], steps["sft"]),
                  "MDU(tau=0, alpha=0) / SFT (floor 1)": paired_ratio(steps["mdu_tau0"], steps["sft"]),
                  "MDU(alpha=1) / SFT on forget+retain rows (floor 7/6)": paired_ratio(steps["mdu"],
                                                                                        steps["sft_2x"])}
    torch.set_num_threads(args.threads)
    if "kl" in sections:
        kl = bench_kl(args.kl_rows, args.kl_vocab, args.kl_chunks, args.tau, 1, args.kl_repeats)
    for tp in args.tp if "throughput" in sections else ():
        tp_cfg = load_config(args.config, [*overrides, f"parallel.tensor={tp}"])
        throughput[tp] = run_steps(tp_cfg, ("mdu",), args.seq_len, args.warmup, args.repeats, args.threads)["mdu"]
    if "attention" in sections:
        attention = {n: run_steps(cfg, ("sft@sdpa", "sft@local"), n, args.warmup, args.repeats, args.threads)
                     for n in args.attention_seq_lens}
    if "lora" in sections and args.lora_rank > 0:
        lora_cfg = load_config(args.config, [*overrides, f"lora.rank={args.lora_rank}"])
        pair = run_steps(lora_cfg, ("mdu", "mdu+lora"), args.seq_len, args.warmup, args.repeats, args.threads)
        lora = {"rank": args.lora_rank, "targets": lora_cfg.lora.targets, "steps": pair,
                "time_ratio": paired_ratio(pair["mdu+lora"], pair["mdu"])}
    return {"machine": machine(), "config": args.config, "overrides": overrides, "seq_len": args.seq_len,
            "warmup": args.warmup, "repeats": args.repeats, "kl_repeats": args.kl_repeats,
            "threads_per_rank": args.threads, "steps": steps, "ratios": ratios, "kl": kl,
            "throughput": throughput, "attention": attention, "lora": lora}


def cmd_bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        args.output_dir = args.output_dir or tmp  # the trainers' tokenizer; no checkpoint is written
        result = run_bench(args)
    report = format_report(result)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"JSON: {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(f"# mdu-dist bench\n\nMachine: {result['machine']}\n\n{report}\n")
        print(f"Markdown: {args.markdown}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/llada_tiny.yaml", help="base YAML (default llada_tiny)")
    p.add_argument("--tiny", action="store_true", help="keep the config's model (default: a small LLaDA shape, "
                                                      "4 x 256, vocab 32768)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--kl-repeats", type=int, default=3, help="timed KL repeats (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the KL)")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--kl-rows", type=int, nargs="+", default=[256, 1024], help="masked positions")
    p.add_argument("--kl-vocab", type=int, nargs="+", default=[LLADA_VOCAB, DREAM_VOCAB])
    p.add_argument("--kl-chunks", type=int, nargs="+", default=[0, 1024],
                   help="kernel chunk sizes in rows; 0 = the kernel's own byte-sized default, chunk_rows(V)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes for the throughput table")
    p.add_argument("--output-dir", default="", help="where the trainers keep their tokenizer (default: a temp dir)")
    p.add_argument("--attention-seq-lens", type=int, nargs="*", default=[],
                   help="sequence lengths of table (d), SDPA vs local attention (default: none)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="table (e): the MDU step with every parameter vs LoRA of this rank (lora.* overrides set "
                        "the rest; default 0: no table)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="which tables to run (default all; lora needs --lora-rank)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="also write the tables here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time SFT vs MDU steps, the vocab-parallel KL vs a naive one, and tokens/s "
                                     "by TP size; prints tables and writes JSON")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
