"""Do the demo's pinned CPU kernels give the same bits on another processor? Checked under user-mode emulation
(`qemu-x86_64 -cpu MODEL`, Debian's `qemu-user`), where the libraries see the model's CPUID: its vendor
(AuthenticAMD for the EPYC models, which MKL's dispatch reads) and its instruction sets (AVX2 without AVX-512:
TCG emulates none of AVX-512).

    python tools/cpu_portability.py ops [--cpus Haswell EPYC-Rome] [--cpu-isa avx2]   # about a minute
    python tools/cpu_portability.py quick-demo [--cpu EPYC-Rome] [--out DIR] [demo key=value ...]  # hours
                      # (measured: 5 of the 10 stages of replicas=1 "methods=[npo]" lora_rank=0 "taus=[0.5]" in
                      # 30 min beside the test suite; with overrides, against a native run of them)

`ops` runs each op the demo's training and evaluation use on fixed inputs, under the pins of `--cpu-isa`
(mdu_dist/numerics.py, set in the environment before the libraries load, as the demo's workers get them),
natively and under each CPU model, and lists the ops whose output bits differ from the native run's.
`quick-demo` runs `mdu-dist demo --quick` with every process under qemu and compares its results.json byte for
byte with the golden file that tests/test_demo.py holds every machine to (with demo overrides: with the same
quick demo run natively, into `<out>-native`).

An emulated processor is not a real one: qemu computes the approximate instructions (rcpps, rsqrtps) exactly,
where Intel and AMD each have their own tables, so a kernel that uses them differs under emulation as it would
on the other vendor's hardware, not necessarily in the same bits.

qemu-user cannot run a child forked from a multi-threaded guest (the child dies before it reports back), and
megatron's checkpoint writer forks one process per file: for `quick-demo` that writer's own per-file function
runs in the process, file after file (the same bytes on disk, no fork: the native quick demo with this change
gives the golden bytes). The demo's workers start by spawn with this file as their main module, so they get the
change, and qemu as their interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing.spawn
import os
import queue
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "demo_quick_results.json"
PROBE, INSIDE = "--probe", "--inside-qemu"  # the re-executed children
QEMU_NOISE = "TCG doesn't support requested feature"  # qemu names each CPUID feature it does not emulate


def _qemu() -> str:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("qemu-x86_64 not found: install Debian's qemu-user (apt-get install qemu-user)")
    return qemu


def _env(**extra: str) -> dict[str, str]:
    """The children's environment: this checkout's mdu_dist first on the path, and ``extra``."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------------------------------------ ops


def _probe(cpu_isa: str) -> dict[str, str]:
    """Each op's output bytes, hashed: the layers, losses and optimizer step of training, and the float64
    numpy maths of the evaluation's probabilities."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mdu_dist.adamw import PortableAdamW
    from mdu_dist.cpu_kernels import correctly_rounded_sqrt
    from mdu_dist.numerics import pin_process

    pin_process(cpu_isa)
    torch.manual_seed(0)  # the generator is the same code on every host: the same inputs
    h = lambda t: hashlib.sha1(np.ascontiguousarray(t.detach().numpy() if torch.is_tensor(t) else t)  # noqa: E731
                               .tobytes()).hexdigest()[:16]
    a, b, c = torch.randn(95, 32), torch.randn(32, 32), torch.randn(8, 128, 128)
    w, q = torch.randn(352, 128), torch.randn(8, 4, 100, 32)
    out = {"matmul (attention-sized)": h(a @ b), "linear (mlp-sized)": h(F.linear(c, w)), "bmm": h(c @ c),
           "exp": h(a.exp()), "log": h((a.abs() + 1).log()), "softmax": h(c.softmax(-1)),
           "log_softmax": h(c.log_softmax(-1)), "silu": h(F.silu(c)), "sigmoid": h(c.sigmoid()),
           "rsqrt": h((a.abs() + 1).rsqrt()), "sqrt": h(a.abs().sqrt()), "sin (rope)": h((a * 100).sin()),
           "cos (rope)": h((a * 100).cos()), "sum": h(c.sum(-1)), "rms_norm": h(F.rms_norm(c, (128,), eps=1e-5)),
           "sdpa": h(F.scaled_dot_product_attention(q, q, q)),
           "linear with bias (addmm)": h(F.linear(c, w, torch.randn(352))),
           "baddbmm": h(torch.baddbmm(c, c, c, beta=0.5, alpha=2.0))}
    x = torch.randn(8, 100, 128, requires_grad=True)
    loss = F.cross_entropy(F.linear(x, w).reshape(-1, 352), torch.randint(0, 352, (800,)))
    loss.backward()
    out["cross_entropy"], out["cross_entropy grad"] = h(loss.reshape(1)), h(x.grad)
    out["correctly rounded sqrt"] = h(correctly_rounded_sqrt(a.abs()))
    grads = [torch.randn(352, 128), torch.randn(128)]
    norm = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).pow(2).sum().float().pow(0.5)
    out["gradient norm (DeepSpeed's)"] = h(norm.reshape(1))
    for name, make in (("AdamW step (torch's)", torch.optim.AdamW), ("AdamW step (PortableAdamW)", PortableAdamW)):
        params = [torch.nn.Parameter(torch.randn(352, 128, generator=torch.Generator().manual_seed(1)))]
        opt = make(params, lr=1e-3, weight_decay=0.01)
        for _ in range(3):
            params[0].grad = grads[0]
            opt.step()
        out[name] = h(params[0])
    r = np.random.default_rng(0).standard_normal(100_000)
    out["numpy float64 exp"], out["numpy float64 log"] = h(np.exp(r)), h(np.log(np.abs(r) + 1))
    return out


def _run_probe(prefix: list[str], env: dict[str, str], cpu_isa: str) -> dict[str, str]:
    proc = subprocess.run([*prefix, sys.executable, __file__, PROBE, cpu_isa], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode:
        sys.exit(f"the probe failed under {' '.join(prefix) or 'the host CPU'}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def ops(cpus: list[str], cpu_isa: str, as_json: bool = False) -> int:
    """Exit status 1 when some op's bits differ under some CPU model; ``as_json``: one line, op -> those models."""
    from mdu_dist.numerics import numerics_env

    qemu, env = _qemu(), _env(**numerics_env(cpu_isa, 1))
    native = _run_probe([], env, cpu_isa)
    emulated = {cpu: _run_probe([qemu, "-cpu", cpu], env, cpu_isa) for cpu in cpus}
    moved = {op: [cpu for cpu in cpus if emulated[cpu][op] != bits] for op, bits in native.items()}
    if as_json:
        print(json.dumps(moved))
    else:
        print(f"cpu_isa={cpu_isa}: each op's output bits, native against qemu -cpu {' / '.join(cpus)}")
        for op, where in moved.items():
            print(f"  {op:28s} {'differs under ' + ', '.join(where) if where else 'same bits'}")
        print(f"{sum(map(bool, moved.values()))} of {len(moved)} ops differ")
    return 1 if any(moved.values()) else 0


# ------------------------------------------------------------------------------------------ quick demo


def _write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
    """megatron's write_preloaded_data_multiproc without its fork: each file by its own writer function."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results = {}
    for i, bucket in enumerate(write_buckets):
        local, count = queue.Queue(), queue.Queue()
        count.put(i)
        FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, local, count, True)
        idx, out = local.get()
        if isinstance(out, Exception):
            global_results_queue.put(out)
            return
        results[idx] = out
    global_results_queue.put(results)


def _no_fork_writer() -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_in_process)


if __name__ == "__mp_main__":  # a demo worker, spawned with this file as its main module
    _no_fork_writer()


def _inside(wrapper: str, overrides: list[str]) -> int:
    from mdu_dist.cli import main
    from mdu_dist.numerics import numerics_info

    _no_fork_writer()
    multiprocessing.spawn.set_executable(wrapper)
    seen = numerics_info()
    print(f"[qemu] ATen's CPU capability {seen['cpu_capability']}; numpy's dispatch {seen['numpy_dispatch']}",
          flush=True)
    return main(["demo", "--quick", *overrides])


def _first_difference(got: bytes, want: bytes) -> str:
    i = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    show = lambda s: s[max(0, i - 80):i + 40].decode(errors="replace")  # noqa: E731
    return f"first difference at byte {i}: ...{show(got)}... here, ...{show(want)}... there"


def _run_quick_demo(out: Path, overrides: list[str], cpu: str | None) -> int:
    """The quick demo with the in-process checkpoint writer, under ``qemu -cpu cpu`` (None: natively)."""
    with tempfile.TemporaryDirectory() as tmp:
        python = sys.executable
        if cpu is not None:
            python = str(Path(tmp) / "python")
            Path(python).write_text(f'#!/bin/sh\nexec {_qemu()} -cpu {cpu} {sys.executable} "$@"\n')
            Path(python).chmod(0o755)
        proc = subprocess.Popen([python, __file__, INSIDE, python, f"output_dir={out}", *overrides],
                                stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        for line in proc.stderr:
            if QEMU_NOISE not in line:
                sys.stderr.write(line)
        return proc.wait()


def quick_demo(cpu: str, out: Path, overrides: list[str]) -> int:
    """The emulated quick demo against the golden file; with ``overrides`` (a smaller run: ``replicas=1``)
    against the same run made natively, into ``<out>-native``."""
    if rc := _run_quick_demo(out, overrides, cpu):
        return rc
    if overrides:
        reference = out.with_name(out.name + "-native")
        if rc := _run_quick_demo(reference, overrides, None):
            return rc
        reference = reference / "results.json"
    else:
        reference = GOLDEN
    got, want = (out / "results.json").read_bytes(), reference.read_bytes()
    if got == want:
        print(f"{out / 'results.json'}: {reference}'s bytes, under qemu -cpu {cpu}")
        return 0
    print(f"{out / 'results.json'} under qemu -cpu {cpu} differs from {reference}: {_first_difference(got, want)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PROBE]:
        print(json.dumps(_probe(argv[1])))
        return 0
    if argv[:1] == [INSIDE]:
        return _inside(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("ops", help="each op's bits, native against emulated processors (about a minute)")
    o.add_argument("--cpus", nargs="+", default=["Haswell", "EPYC-Rome"], help="qemu CPU models")
    o.add_argument("--cpu-isa", default="avx2", help="the demo's cpu_isa whose pins apply (mdu_dist/numerics.py)")
    o.add_argument("--json", action="store_true", help="one JSON line: each op -> the models it differs under")
    d = sub.add_parser("quick-demo", help="the quick demo under one emulated processor against the golden file")
    d.add_argument("--cpu", default="EPYC-Rome", help="qemu CPU model (qemu-x86_64 -cpu help lists them)")
    d.add_argument("--out", default="runs/quick_qemu", help="the demo's output_dir")
    d.add_argument("overrides", nargs="*", help="demo key=value overrides")
    args = ap.parse_args(argv)
    if args.cmd == "ops":
        return ops(args.cpus, args.cpu_isa, args.json)
    return quick_demo(args.cpu, Path(args.out).absolute(), args.overrides)


if __name__ == "__main__":
    sys.exit(main())
