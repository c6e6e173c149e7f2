"""Launching training jobs with submitit: Slurm, this machine (``local``) or in-process (``debug``).

- :mod:`mmtrain.launch.config`: ``LaunchConfig``, the ``launch`` section of a run config.
- :mod:`mmtrain.launch.submit`: defaults fitted to the cluster, the sbatch options, submission, ``--wait``.
- :mod:`mmtrain.launch.job`: what runs in every rank of a submitit job (rendezvous, requeue).
- :mod:`mmtrain.launch.lifecycle`: what rank 0 records of each run (submitit and plain sbatch jobs alike).
- :mod:`mmtrain.launch.slurm`: what mmtrain asks Slurm (job state, requeue, partitions, refusals).
- :mod:`mmtrain.launch.registry`: a run's job history (``<run_dir>/jobs.jsonl``) for ``mmtrain jobs``.
- :mod:`mmtrain.launch.preflight`: the checks before any rank starts (config, sources, tokenizer).
- :mod:`mmtrain.launch.local`: ranks on this machine (torchrun) for ``mmtrain train`` and ``eval --nproc``.
"""
