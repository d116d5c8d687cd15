"""The quick demo on another processor model, emulated: `mdu-dist demo --quick` with every process under
`qemu-x86_64 -cpu MODEL` (user-mode emulation, Debian's `qemu-user`), then its results.json compared byte for
byte with the golden file that tests/test_demo.py holds every machine to.

    python tools/quick_demo_under_qemu.py [--cpu EPYC-Rome] [--out runs/quick_qemu] [demo key=value ...]

The libraries inside see the emulated CPUID: another vendor (AuthenticAMD for the EPYC models, which MKL's
dispatch reads) and the model's instruction sets (EPYC-Rome: AVX2 without AVX-512, so numpy and ATen see a
host without it). Emulation is slow: the quick demo (about 40 s natively) takes tens of minutes.

qemu-user cannot run a child forked from a multi-threaded guest (the child dies before it reports back), and
megatron's checkpoint writer forks one process per file; here that writer's own per-file function runs in
the process, file after file: the same bytes on disk, no fork (the native quick demo with this change gives
the golden bytes). The demo's workers start by spawn, with this file as their main module, so they get the
change and qemu as their interpreter.
"""

from __future__ import annotations

import argparse
import multiprocessing.spawn
import os
import queue
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "demo_quick_results.json"
INSIDE = "--inside-qemu"  # the re-executed driver: its interpreter is the wrapper given after this flag


def _write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
    """megatron's write_preloaded_data_multiproc without its fork: each file by its own writer function."""
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


FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_in_process)


def _inside(wrapper: str, overrides: list[str]) -> int:
    from mdu_dist.cli import main
    from mdu_dist.numerics import numerics_info

    multiprocessing.spawn.set_executable(wrapper)
    seen = numerics_info()  # before the pins: what the emulated processor offers
    print(f"[qemu] ATen's CPU capability {seen['cpu_capability']}; numpy's dispatch {seen['numpy_dispatch']}",
          flush=True)
    return main(["demo", "--quick", *overrides])


def _first_difference(got: bytes, want: bytes) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"first difference at byte {i}: ...{got[max(0, i - 80):i + 40].decode(errors='replace')}... here, "
            f"...{want[max(0, i - 80):i + 40].decode(errors='replace')}... in the golden file")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [INSIDE]:
        return _inside(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", default="EPYC-Rome", help="qemu CPU model (qemu-x86_64 -cpu help lists them)")
    ap.add_argument("--out", default="runs/quick_qemu", help="the demo's output_dir")
    ap.add_argument("overrides", nargs="*", help="demo key=value overrides")
    args = ap.parse_args(argv)
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("qemu-x86_64 not found: install Debian's qemu-user (apt-get install qemu-user)")
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "python"
        wrapper.write_text(f'#!/bin/sh\nexec {qemu} -cpu {args.cpu} {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        out = Path(args.out).absolute()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([str(wrapper), __file__, INSIDE, str(wrapper), f"output_dir={out}",
                                 *args.overrides], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for line in proc.stderr:  # qemu names every feature of the model it does not emulate, per process
            if "TCG doesn't support requested feature" not in line:
                sys.stderr.write(line)
        if proc.wait():
            return proc.returncode
    got, want = (out / "results.json").read_bytes(), GOLDEN.read_bytes()
    if got == want:
        print(f"{out / 'results.json'}: the golden file's bytes, under qemu -cpu {args.cpu}")
        return 0
    print(f"{out / 'results.json'} differs from {GOLDEN} under qemu -cpu {args.cpu}: {_first_difference(got, want)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
