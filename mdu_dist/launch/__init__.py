"""``mdu-dist launch``: finetune/unlearn jobs through submitit on Slurm (or local processes).

- ``config``: the ``launch`` section of a run config (``LaunchConfig``).
- ``plan``: checks done before anything is submitted, the submitit executor, sweeps.
- ``task``: what runs inside each task (rendezvous from submitit's JobEnvironment, requeue with resume).

Kept import-light: mdu_dist.config imports ``LaunchConfig`` from here.
"""
