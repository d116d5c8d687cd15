"""The ``mdu-dist launch`` subcommand: check, submit (one job or a sweep as a job array), report."""

from __future__ import annotations

import argparse
from pathlib import Path

from mdu_dist.checkpoint.source import load_job_config
from mdu_dist.config import ConfigError, to_dict
from mdu_dist.eval.run import check_inputs
from mdu_dist.inputs import check_job

JOBS = ("finetune", "unlearn", "eval")
# --flag -> launch.key: the common settings get flags; every other one is a launch.key=value override.
FLAGS = {"executor": "executor", "nodes": "nodes", "gpus_per_node": "gpus_per_node",
         "tasks_per_node": "tasks_per_node", "cpus_per_task": "cpus_per_task", "timeout_min": "timeout_min",
         "partition": "partition", "account": "account"}


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = [f"launch.{key}={getattr(args, flag)}" for flag, key in FLAGS.items()
             if getattr(args, flag) is not None]
    return [*args.overrides, *flags]  # flags last: they win over key=value


def _output_key(job: str) -> str:
    return "eval.output_dir" if job == "eval" else "train.output_dir"


def cmd_launch(args: argparse.Namespace) -> int:
    # deferred: submitit and the launch plan cost ~0.2 s of --help, which does not need them
    import submitit

    from mdu_dist.launch.plan import (build_executor, job_output_dir, log_folder, parse_sweep, plan_for,
                                      point_output_dir, writer_rank)
    from mdu_dist.launch.task import TrainTask

    base = _overrides(args)
    first = load_job_config(args.config, base, args.job)
    plan = plan_for(first)  # the launch section is not swept: one plan and one executor serve all points
    if args.job == "eval" and plan.world_size % first.parallel.tensor:
        raise ConfigError(f"launch: an eval job runs on parallel.tensor={first.parallel.tensor} x DP ranks, but "
                          f"nodes x tasks_per_node = {plan.world_size} is not a multiple of it")
    points = parse_sweep(args.sweep)
    configs = []
    for point in points:
        out = ([f"{_output_key(args.job)}={point_output_dir(args.job, job_output_dir(first, args.job), point)}"]
               if point else [])
        cfg = load_job_config(args.config, [*base, *point, *out], args.job)
        # Bad data or a missing checkpoint fails here, not in a queued job hours later.
        check_inputs(cfg) if args.job == "eval" else check_job(cfg, args.job, plan.world_size)
        configs.append(cfg)
    outputs = [job_output_dir(cfg, args.job) for cfg in configs]
    if len(set(outputs)) < len(outputs):
        twice = next(o for o in outputs if outputs.count(o) > 1)
        raise ConfigError(f"--sweep: two points of the sweep would write to {twice}")
    executor = build_executor(first, plan, args.job)
    tasks = [TrainTask(to_dict(cfg), args.job) for cfg in configs]
    if len(tasks) == 1:
        jobs = [executor.submit(tasks[0])]
    else:
        with executor.batch():  # one Slurm job array
            jobs = [executor.submit(task) for task in tasks]

    print(f"submitted {args.job} to {first.launch.executor}: {plan.nodes} node(s) x {plan.tasks_per_node} "
          f"task(s) = {plan.world_size} ranks; submitit folder {log_folder(first, args.job)}")
    writer = writer_rank(plan.world_size, first.parallel.pipeline)
    for job, point, cfg in zip(jobs, points, configs, strict=True):
        label = f" [{' '.join(point)}]" if point else ""
        log = job.task(writer).paths
        print(f"job {job.job_id}{label}: log {log.stdout} (errors {log.stderr}); "
              f"output {Path(job_output_dir(cfg, args.job)).absolute()}", flush=True)
    if args.job != "eval":
        # A sweep's runs sit side by side under the base output dir; TensorBoard finds each run's events there.
        logdir = Path(first.train.output_dir).absolute()
        print(f"TensorBoard: tensorboard --logdir {logdir if len(configs) > 1 else logdir / 'tensorboard'}",
              flush=True)

    # The local executor's processes belong to this command: stay until they finish.
    if args.wait or first.launch.executor == "local":
        failed = 0
        for job in jobs:
            try:
                final = job.results()[0]  # global rank 0's metrics (reduced over the ranks)
            except submitit.core.utils.UncompletedJobError as e:  # FailedJobError is one too
                failed += 1
                # Any task may be the one that failed, on any node: name every task's log.
                print(f"job {job.job_id} failed ({str(e).splitlines()[0]}); see "
                      f"{job.paths.stderr.with_name(f'{job.job_id}_*_log.err')}")
                continue
            print(f"job {job.job_id} finished: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
        return 1 if failed else 0
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="submit a finetune/unlearn/eval job through submitit (Slurm or local "
                                      "processes)")
    p.add_argument("--config", help="YAML config (its launch section sets the defaults of the flags below)")
    p.add_argument("--job", choices=JOBS, default="unlearn", help="what to run (default unlearn)")
    p.add_argument("--executor", choices=("local", "slurm"), help="local processes or sbatch")
    p.add_argument("--nodes", type=int, help="nodes (slurm)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU (0 = CPU job)")
    p.add_argument("--tasks-per-node", type=int, help="tasks per node for a CPU job (default TP x PP)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per task")
    p.add_argument("--timeout-min", type=int, help="time limit in minutes (the job requeues and resumes)")
    p.add_argument("--partition", help="Slurm partition (checked with sinfo before submitting)")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--sweep", action="append", default=[], metavar="key.sub=v1,v2,...",
                   help="one job per value (a Slurm job array); repeat for a grid; each writes to "
                        "train.output_dir/<key>=<value> (eval.output_dir/... for eval jobs; an eval job sweeping "
                        "eval.checkpoint=RUN1,RUN2,... writes each RUN/eval)")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and print the final metrics "
                                                       "(always with the local executor)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (launch.* too)")
    p.set_defaults(func=cmd_launch)

