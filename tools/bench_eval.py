"""``python tools/bench_eval.py``: TOFU evaluation throughput, measured and projected.

1. Measured: the tiny model (configs/llada_tiny.yaml, a 1-step fine-tune made here unless ``--checkpoint``) on
   the first ``--rows`` rows of each TOFU split, through the real ``mdu-dist eval`` path at DP=1 and DP=2, side
   by side, on N ranks started by torchrun with ``--threads`` torch threads per rank (1: DP=N uses N cores, so
   the speed-up is DP's alone; with run_ranks' default of cores / N threads, DP=1's threads contend with
   whatever else runs on a shared machine and the comparison measures that). Time = the evaluation loops only
   (model loading and process start excluded): per split the slowest replica's seconds from eval.json, summed
   over the splits. items/s = rows evaluated (ELBO of every answer and the generation) / that time. Both runs
   must give the same metrics (checked).
2. Projected: the full TOFU evaluation of LLaDA-8B (configs/llada_8b.yaml) on 8 and 64 GPUs. Work: every row of
   the bundled forget10 / retain / real_authors / world_facts ``*_perturbed`` files; ``--num-samples`` ELBO
   samples of each answer, paraphrase and perturbed answer (one forward each, the output layer at the expected
   (A + 1) / 2 masked positions of an A-token answer), and a greedy ``--gen-length``-token generation of
   ``--steps`` full-sequence forwards per row. FLOPs per forward: ``mdu_dist.bench.forward_flops`` (the count
   ``mdu-dist bench`` reports MFU with). Token counts are estimated, not tokenised (LLaDA's tokenizer is not
   bundled): ``--chars-per-token`` characters per token plus ``--template-tokens`` of chat template per prompt.
   Time = FLOPs / (GPUs x bf16 dense peak x ``--mfu``), the work divided evenly over the DP replicas (the
   static balanced assignment of ``mdu-dist eval``). The MFU is an assumption, printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The four evaluated splits' rows for the work count; the retain split is evaluated from retain_perturbed.
SPLITS = ("forget", "retain", "real_authors", "world_facts")


def _cli(*args: str, launcher: list[str] = ("-m",), threads: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(ROOT / "build" / "torch_extensions"))}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, *launcher, "mdu_dist.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"mdu-dist {shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    """One ``mdu-dist eval`` on N torchrun ranks per N in ``args.dp``; items/s over the evaluation loops."""
    checkpoint = args.checkpoint
    if not checkpoint:
        checkpoint = str(work / "model")
        _cli("finetune", "--config", "configs/llada_tiny.yaml", "data.finetune=forget10", "data.limit=8",
             "train.max_steps=1", f"train.output_dir={checkpoint}")
    rows = []
    for dp in args.dp:
        out = work / f"dp{dp}"
        start = time.perf_counter()
        # Under torchrun `mdu-dist eval` takes its world size from the launcher (as with --nproc N, which
        # torchrun's own parser would take for an abbreviation of --nproc-per-node).
        _cli("eval", "--config", "configs/llada_tiny.yaml", f"eval.checkpoint={checkpoint}",
             f"eval.limit={args.rows}", f"eval.num_samples={args.tiny_samples}", f"eval.gen_length={args.tiny_gen}",
             f"eval.steps={args.tiny_gen}", f"eval.block_length={args.tiny_gen}", "eval.progress=false",
             f"eval.output_dir={out}", threads=args.threads,
             launcher=["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp}", "-m"])
        total = time.perf_counter() - start
        result = json.loads((out / "eval.json").read_text())
        seconds = sum(max(per_replica) for per_replica in result["seconds"].values())
        items = sum(len(v["question"]) for v in result["items"].values())
        rows.append({"dp": dp, "items": items, "seconds": seconds, "items_per_s": items / seconds,
                     "command_seconds": total, "metrics": result["metrics"]})
    for r in rows[1:]:
        if r["metrics"] != rows[0]["metrics"]:
            sys.exit(f"DP={r['dp']} gave other metrics than DP={rows[0]['dp']}: not a fair comparison")
    return rows


def full_work(num_samples: int, gen_length: int, steps: int, chars_per_token: float, template_tokens: int) -> dict:
    """Per split: rows, ELBO forwards and their FLOPs, generation forwards and their FLOPs (LLaDA-8B)."""
    from mdu_dist.bench import forward_flops
    from mdu_dist.config import load_config
    from mdu_dist.eval.config import EvalConfig
    from mdu_dist.eval.run import load_items

    m = load_config(str(ROOT / "configs" / "llada_8b.yaml")).model
    sources = EvalConfig()

    def tokens(text: str) -> int:
        return max(1, math.ceil(len(text) / chars_per_token))

    work = {}
    for split in SPLITS:
        items = load_items(split, getattr(sources, split), "", 0)
        elbo = elbo_flops = gen_flops = 0
        for it in items:
            prompt = template_tokens + tokens(it.question)
            for _, a in it.scored():
                s = prompt + tokens(a)
                elbo += num_samples
                elbo_flops += num_samples * forward_flops(m, s, s, (tokens(a) + 1) / 2)
            s = prompt + gen_length
            gen_flops += steps * forward_flops(m, s, s, s)  # the sampler's forward runs the head everywhere
        work[split] = {"rows": len(items), "elbo_forwards": elbo, "elbo_flops": elbo_flops,
                       "gen_forwards": steps * len(items), "gen_flops": gen_flops}
    return work


def main() -> int:
    from mdu_dist.bench import PEAK_BF16

    p = argparse.ArgumentParser(prog="tools/bench_eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8, help="tiny model: first N rows of each split")
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2], help="tiny model: DP sizes measured")
    p.add_argument("--tiny-samples", type=int, default=8, help="tiny model: ELBO samples per answer")
    p.add_argument("--tiny-gen", type=int, default=16, help="tiny model: generated tokens (= steps)")
    p.add_argument("--threads", type=int, default=1, help="tiny model: torch threads per rank")
    p.add_argument("--checkpoint", default="", help="tiny model checkpoint (default: a 1-step fine-tune made here)")
    p.add_argument("--work-dir", default="", help="keep the runs here (default: a temporary directory)")
    p.add_argument("--skip-measure", action="store_true", help="the projection only")
    p.add_argument("--num-samples", type=int, default=128, help="projection: ELBO samples per answer")
    p.add_argument("--gen-length", type=int, default=128, help="projection: generated tokens")
    p.add_argument("--steps", type=int, default=None, help="projection: sampler steps (default: eval.steps)")
    p.add_argument("--chars-per-token", type=float, default=4.0, help="projection: assumed characters per token")
    p.add_argument("--template-tokens", type=int, default=16, help="projection: chat template tokens per prompt")
    p.add_argument("--mfu", type=float, default=0.3, help="projection: assumed model FLOPs utilisation")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="projection: GPU counts")
    args = p.parse_args()
    print("rerun: " + shlex.join([sys.executable, "tools/bench_eval.py", *sys.argv[1:]]), flush=True)

    if not args.skip_measure:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir or tmp)
            rows = measure(args, work)
        cores = os.cpu_count()
        print(f"\n## Measured: tiny LLaDA (configs/llada_tiny.yaml), first {args.rows} rows of each split, "
              f"{args.tiny_samples} ELBO samples, {args.tiny_gen}-token generations; {cores} CPU cores, "
              f"{args.threads} torch thread(s) per rank, started by torchrun\n")
        print("| DP | rows | eval loop s | items/s | speed-up | whole command s |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['dp']} | {r['items']} | {r['seconds']:.1f} | {r['items_per_s']:.3f} | "
                  f"{r['items_per_s'] / rows[0]['items_per_s']:.2f}x | {r['command_seconds']:.1f} |")
        print("\nmetrics identical at every DP size: yes")

    from mdu_dist.config import load_config

    steps = args.steps or load_config(str(ROOT / "configs" / "llada_8b.yaml")).eval.steps
    work = full_work(args.num_samples, args.gen_length, steps, args.chars_per_token, args.template_tokens)
    elbo = sum(w["elbo_flops"] for w in work.values())
    gen = sum(w["gen_flops"] for w in work.values())
    print(f"\n## Projected: full TOFU evaluation of LLaDA-8B (configs/llada_8b.yaml)\n\n"
          f"rows: " + ", ".join(f"{s} {w['rows']}" for s, w in work.items())
          + f"; ELBO forwards {sum(w['elbo_forwards'] for w in work.values()):,} ({args.num_samples} per answer; "
          f"{elbo:.3g} FLOPs), generation forwards {sum(w['gen_forwards'] for w in work.values()):,} "
          f"({args.gen_length} tokens, {steps} steps; {gen:.3g} FLOPs). Assumptions: {args.chars_per_token:g} "
          f"characters per token + {args.template_tokens} template tokens per prompt, MFU {args.mfu:g} of the "
          f"dense bf16 peak (H100 / H200: {PEAK_BF16['H100'] / 1e12:.0f} TFLOP/s), work divided evenly.\n")
    print("| GPUs | ELBO min | generation min | one model min | a dozen models min |\n|---|---|---|---|---|")
    for gpus in args.gpus:
        minutes = 1 / (gpus * PEAK_BF16["H100"] * args.mfu * 60)
        print(f"| {gpus} | {elbo * minutes:.1f} | {gen * minutes:.1f} | {(elbo + gen) * minutes:.1f} | "
              f"{12 * (elbo + gen) * minutes:.1f} |")
    return 0


if __name__ == "__main__":  # spawned ranks re-import this file: only the parent runs the bench
    sys.exit(main())
