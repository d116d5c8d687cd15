"""``mdu-dist launch``: finetune/unlearn jobs through submitit on Slurm (or local processes).

- ``config``: the ``launch`` section of a run config (``LaunchConfig``).
- ``plan``: checks done before anything is submitted, the submitit executor, sweeps.
- ``task``: what runs inside each task (rendezvous from submitit's JobEnvironment, requeue with resume).
- ``local``: ``run_ranks``, N local processes (or the ranks a launcher started) for one function.

``config`` and ``local`` import only the config and error modules: mdu_dist.config imports ``LaunchConfig``,
and the checkpoint tools, the trainer's callers and evaluation start their ranks with ``run_ranks``.
"""
