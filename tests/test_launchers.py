"""launchers/: every script parses (bash -n), and its dry run (MDU_DRY_RUN=1) produces mdu-dist commands that the
real CLI parser and config loader accept, with the layout, resume and dependency settings each script promises.
The sbatch options are read from the #SBATCH lines, as sbatch reads them."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mdu_dist.cli import build_parser
from mdu_dist.config import load_config
from mdu_dist.distributed import resolve_layout
from mdu_dist.launch.plan import parse_sweep, point_output_dir

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ROOT / "launchers"
SCRIPTS = sorted(p for p in LAUNCHERS.rglob("*") if p.suffix in (".sh", ".sbatch"))
# script -> (config, TP)
SBATCH = {"unlearn_llada_8b.sbatch": ("configs/llada_8b.yaml", 2),
          "unlearn_dream_7b.sbatch": ("configs/dream_7b.yaml", 4)}
PIPELINE = LAUNCHERS / "slurm" / "pipeline_tofu.sh"


def run(script: Path, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env={**full, **(env or {})}, capture_output=True,
                          text=True, timeout=60, check=True)


def dry_run(script: Path, *args: str, **env: str) -> list[list[str]]:
    """The commands a dry run prints (stdout and stderr), each split as the shell would."""
    out = run(script, *args, env={"MDU_DRY_RUN": "1", **env})
    return [shlex.split(line) for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def sbatch_options(script: Path) -> dict[str, str]:
    """The #SBATCH header (up to the first command), as sbatch reads it: --key=value -> {key: value}."""
    options = {}
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            flag = line.split("#", 2)[1].split()[1]  # drop the trailing comment
            key, _, value = flag.lstrip("-").partition("=")
            options[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return options


def test_the_launchers_exist_and_parse():
    names = {str(p.relative_to(LAUNCHERS)) for p in SCRIPTS}
    assert {"slurm/unlearn_llada_8b.sbatch", "slurm/unlearn_dream_7b.sbatch", "slurm/pipeline_tofu.sh",
            "torchrun/unlearn.sh"} <= names
    assert (LAUNCHERS / "README.md").is_file()
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True, capture_output=True)


@pytest.mark.parametrize("name", sorted(SBATCH))
def test_sbatch_script_options_layout_and_srun_command(name):
    from mdu_dist.plan import plan, workload

    script = LAUNCHERS / "slurm" / name
    config, tp = SBATCH[name]
    opts = sbatch_options(script)
    assert opts["ntasks-per-node"] == opts["gpus-per-node"] == "8"  # one task per GPU
    assert "requeue" in opts and re.fullmatch(r"B:USR1@\d+", opts["signal"])  # the batch shell gets the signal
    assert {"nodes", "time", "partition", "account", "cpus-per-task", "job-name"} <= set(opts)

    tensorboard, cmd = dry_run(script, SLURM_NTASKS="16")  # as on 2 nodes
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "mdu-dist"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.command, args.config, args.nproc) == ("unlearn", config, 16)
    cfg = load_config(ROOT / args.config, args.overrides)  # every key exists and validates
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.resume, cfg.method.name) == (tp, 1, "auto", "mdu")
    assert cfg.train.save_every > 0  # a requeued job loses at most save_every steps
    assert resolve_layout(16, cfg.parallel, cfg.model).dp == 16 // tp
    assert tensorboard == ["TensorBoard:", "tensorboard", "--logdir", f"{cfg.train.output_dir}/tensorboard"]
    # The layout fits one 8 x 80 GB node by the memory plan, at the script's micro-batch and length.
    rows = plan(cfg, 8, 80.0, workload(cfg, "unlearn", cfg.optim.micro_batch_size, cfg.data.max_length, 0.5))
    (row,) = [r for r in rows if (r.tp, r.pp, r.zero, r.offload) == (tp, 1, cfg.optim.zero_stage, "none")]
    assert row.fits


def test_torchrun_script_runs_the_cli_on_every_gpu_with_extra_overrides():
    tensorboard, cmd = dry_run(LAUNCHERS / "torchrun" / "unlearn.sh", "method.tau=0.25", "train.seed=3", GPUS="4")
    assert cmd[:6] == ["torchrun", "--standalone", "--nproc-per-node", "4", "--no-python", "mdu-dist"]
    args = build_parser().parse_args(cmd[6:])
    assert (args.command, args.nproc) == ("unlearn", 4)
    cfg = load_config(ROOT / args.config, args.overrides)
    assert (cfg.method.tau, cfg.train.seed, cfg.train.resume) == (0.25, 3, "auto")  # the caller's overrides win
    assert resolve_layout(4, cfg.parallel, cfg.model).dp == 2
    assert tensorboard[-1] == f"{cfg.train.output_dir}/tensorboard"


def launches(commands: list[list[str]]):
    """(parsed mdu-dist launch arguments, the configs of its sweep points) for each launch of a dry run."""
    from mdu_dist.launch.command import _output_key, _overrides

    found = []
    for cmd in commands:
        if cmd[:2] != ["mdu-dist", "launch"]:
            continue
        args = build_parser().parse_args(cmd[1:])
        base = _overrides(args)
        first = load_config(ROOT / args.config, base)
        out = _output_key(args.job)
        dirs = [point_output_dir(args.job, first.eval.output_dir if args.job == "eval" else first.train.output_dir, p)
                for p in parse_sweep(args.sweep)]
        found.append((args, [load_config(ROOT / args.config, [*base, *p, f"{out}={d}"])
                             for p, d in zip(parse_sweep(args.sweep), dirs)]))
    return found


def dependency(commands: list[list[str]]) -> tuple[str, str]:
    (sbatch,) = [c for c in commands if c[0] == "sbatch"]
    return sbatch[sbatch.index("--dependency") + 1], sbatch[sbatch.index("--wrap") + 1]


def test_pipeline_stages_chain_the_tofu_jobs():
    start = dry_run(PIPELINE)
    (ft, ft_cfgs), (twin, twin_cfgs) = launches(start)
    assert (ft.job, ft.executor, twin.job) == ("finetune", "slurm", "finetune")
    assert (ft_cfgs[0].data.finetune, twin_cfgs[0].data.finetune) == ("full", "retain90")
    assert ft_cfgs[0].train.init == twin_cfgs[0].train.init  # the twin starts from the same backbone
    assert dependency(start) == ("afterok:<finetune>:<twin>", "bash launchers/slurm/pipeline_tofu.sh unlearn")

    unlearn = dry_run(PIPELINE, "unlearn")
    (mdu, mdu_cfgs), (base, base_cfgs), (ev, ev_cfgs) = launches(unlearn)
    assert [c.method.tau for c in mdu_cfgs] == [0.25, 0.5, 1.0] and {c.method.name for c in mdu_cfgs} == {"mdu"}
    assert [c.method.name for c in base_cfgs] == ["ga", "graddiff", "npo"]
    runs = Path(ft_cfgs[0].train.output_dir).parent
    for c in mdu_cfgs + base_cfgs:
        assert c.train.init.startswith(f"{ft_cfgs[0].train.output_dir}/checkpoints/step-")
        assert (c.parallel.tensor * c.parallel.pipeline, ft.nodes * ft.gpus_per_node) == (2, 8)
    assert (ev.job, ev_cfgs[0].eval.checkpoint) == ("eval", twin_cfgs[0].train.output_dir)
    # Evaluation on every GPU of a node: TP x DP ranks.
    assert (ev.nodes * ev.gpus_per_node, ev_cfgs[0].parallel.tensor) == (ft.nodes * ft.gpus_per_node, 2)
    assert resolve_layout(8, ev_cfgs[0].parallel, ev_cfgs[0].model).dp == 4
    assert dependency(unlearn) == ("afterok:<mdu>:<baselines>:<eval-twin>",
                                   "bash launchers/slurm/pipeline_tofu.sh eval")

    evals = dry_run(PIPELINE, "eval")
    ((every, every_cfgs),) = launches(evals)  # one launch: one job array, a task per run directory
    evaluated = [c.eval for c in every_cfgs]
    trained = [ft_cfgs[0].train.output_dir] + [c.train.output_dir for c in mdu_cfgs + base_cfgs]
    assert every.job == "eval" and every.nodes * every.gpus_per_node == 8
    assert [e.checkpoint for e in evaluated] == trained  # the directories the sweeps write
    assert {e.retain_model_eval for e in evaluated} == {f"{ev_cfgs[0].eval.output_dir}/eval.json"}
    assert [e.output_dir for e in evaluated] == [f"{t}/eval" for t in trained]
    assert dependency(evals) == ("afterok:<eval>", "bash launchers/slurm/pipeline_tofu.sh report")

    (report,) = dry_run(PIPELINE, "report")
    args = build_parser().parse_args(report[1:])
    assert report[0] == "mdu-dist" and (args.command, args.paths, args.output) == ("report", [str(runs)],
                                                                                     f"{runs}/report")
    # Every eval.json the stages write is below the directory the report reads.
    assert all(Path(e.output_dir).is_relative_to(runs) for e in [*evaluated, ev_cfgs[0].eval])


def test_pipeline_submits_with_the_job_ids_it_read_and_the_latest_checkpoint(tmp_path):
    """Not a dry run: mdu-dist and sbatch stubs on PATH record their arguments; mdu-dist answers as
    ``mdu-dist launch`` does (one ``job <id>...`` line per submitted job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "mdu-dist").write_text(
        "#!/bin/bash\necho \"mdu-dist $*\" >> " + str(calls) + "\n"
        "n=$(grep -c . " + str(calls) + ")\necho \"submitted $3 to slurm\"\n"
        "if [[ $* == *--sweep* ]]; then for i in 0 1 2; do echo \"job 7${n}_$i [x=$i]: log a.out (errors a.err); "
        "output o\"; done; else echo \"job 7${n}: log a.out (errors a.err); output o\"; fi\n"
        "echo 'TensorBoard: tensorboard --logdir o'\n")
    (bin_dir / "sbatch").write_text("#!/bin/bash\necho \"sbatch $*\" >> " + str(calls) + "\necho 99\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    ckpts = tmp_path / "runs" / "tofu-llada8b" / "finetune" / "checkpoints"
    for name in ("step-9", "step-10", ".step-11.partial"):
        (ckpts / name).mkdir(parents=True)
    run(PIPELINE, "unlearn", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, cwd=tmp_path)
    lines = calls.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["mdu-dist", "launch"]] * 3 + [["sbatch", "--parsable"]]
    for line in lines[:2]:  # the newest complete checkpoint: step 10 sorts after 9, the partial one is skipped
        assert "train.init=runs/tofu-llada8b/finetune/checkpoints/step-10/model " in line
    assert "--dependency afterok:71_0:71_1:71_2:72_0:72_1:72_2:73 " in lines[3]
    assert (tmp_path / "runs" / "tofu-llada8b" / "pipeline.log").read_text().count("submitted") == 3
