"""Launching training jobs with submitit: Slurm, this machine (``local``) or in-process (``debug``).

- :mod:`mmtrain.launch.submit`: ``LaunchConfig``, the sbatch options, submission.
- :mod:`mmtrain.launch.job`: what runs in every rank of a job (rendezvous, requeue).
- :mod:`mmtrain.launch.registry`: a run's job history (``<run_dir>/jobs.jsonl``) for ``mmtrain jobs``.
"""
