"""What runs in every rank of a launched job.

Rendezvous comes from the scheduler's environment (no ssh, no hostfile): submitit's
``JobEnvironment`` reads ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` /
``SLURM_JOB_NODELIST`` (or the local executor's equivalents), and :func:`rendezvous_env`
turns them into torch's ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``. The port is derived from the job id, so all ranks (and every requeued run
of the job) agree on it without talking to each other.

Preemption: :class:`~mmtrain.components.preemption.PreemptionWatch` replaces submitit's
signal handlers. submitit would checkpoint from rank 0's signal handler alone, which
cannot work for a collective ZeRO-3 save. Here the training loop saves on all ranks at
the next step boundary; then rank 0 hands over to submitit's own handler, which writes
this job for its next run and requeues it (``scontrol requeue`` on Slurm, exit code 144
to the local controller), or refuses after ``launch.max_timeouts`` time-limit hits.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal

from submitit.core.utils import UncompletedJobError
from submitit.helpers import Checkpointable

from mmtrain.launch import lifecycle, registry

log = logging.getLogger("mmtrain.launch")


def rendezvous_env(job_env) -> dict[str, str]:
    """torch.distributed's env:// variables from a submitit ``JobEnvironment``."""
    hosts = list(job_env.hostnames)
    port = os.environ.get("MASTER_PORT") or str(20000 + int(hashlib.sha1(job_env.job_id.encode()).hexdigest(), 16) % 40000)
    return {
        # one node: loopback, which needs no name resolution
        "MASTER_ADDR": hosts[0] if job_env.num_nodes > 1 else "127.0.0.1",
        "MASTER_PORT": port,
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(job_env.num_nodes, 1)),
        "NODE_RANK": str(job_env.node),
    }


def _configure_host(local_world_size: int) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        cores = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or max(1, len(os.sched_getaffinity(0)) // local_world_size)
        torch.set_num_threads(cores)


class TrainJob(Checkpointable):
    """A submitit job that trains one resolved config. Its inherited ``checkpoint`` (called by
    submitit's handler on rank 0 after our collective save) resubmits this same object,
    which resumes from the run directory."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def __call__(self) -> dict:
        import submitit

        from mmtrain import distributed

        job_env = submitit.JobEnvironment()
        env = rendezvous_env(job_env)
        os.environ.update(env)
        _configure_host(int(env["LOCAL_WORLD_SIZE"]))  # before DeepSpeed is imported: it picks its accelerator then

        from mmtrain.components.preemption import PreemptionWatch
        from mmtrain.config import config_from_dict
        # the trainer is imported here, in the job's rank process, once the environment above is
        # set: the launcher runs the trainer (a downward edge; nothing under mmtrain.train imports
        # this module), and submitting a job (mmtrain.launch.submit pickles a TrainJob) imports no torch
        from mmtrain.train import exit_rank, quiet_library_warnings, train

        quiet_library_warnings()
        cfg = config_from_dict(self.config, "submitted config")
        run_dir, rank, job_id = cfg.train.run_dir, job_env.global_rank, job_env.job_id
        watch = PreemptionWatch(stop_on_term=True)
        if rank == 0:
            lifecycle.record_start(run_dir, job_id, job_env.cluster, job_env.num_tasks)
        code, requeuing = 1, False
        try:
            result = train(cfg, watch)
            requeuing = result["stopped_by"] == "requeue"
            if requeuing:
                self._requeue(watch, rank, run_dir, job_id, result["step"])
            elif rank == 0:
                lifecycle.record_end(run_dir, job_id, job_env.cluster, result["stopped_by"], result["step"],
                                     watch.signal_name)
            code = 0
            return {"step": result["step"], "stopped_by": result["stopped_by"]}
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if requeuing and job_env.cluster == "slurm":
                code = 0  # requeued: this run ended as it should (the local controller reads 144 as "requeue me")
            raise
        except Exception as exc:
            if not isinstance(exc, UncompletedJobError):  # any rank: the first failure of a run is its cause
                lifecycle.record_failure(run_dir, job_id, exc, rank=rank, signal=watch.signal_name)
            raise
        finally:
            watch.restore()
            if job_env.cluster == "debug":  # in the caller's process: leave it usable
                distributed.destroy()
            else:
                # after submitit has written the result: leave without C++ teardown (see exit_rank)
                atexit.register(exit_rank, code)

    @staticmethod
    def _requeue(watch, rank: int, run_dir: str, job_id: str, step: int) -> None:
        from mmtrain import distributed

        submitit_handler = watch.previous_handler(signal.SIGUSR2)
        try:
            if rank == 0 and callable(submitit_handler):
                try:
                    # writes this job for its next run, requeues it and exits (SystemExit); or
                    # raises UncompletedJobError after launch.max_timeouts time-limit hits
                    submitit_handler(signal.SIGUSR2, None)
                except SystemExit:
                    registry.record(run_dir, "requeued", job_id, step=step, signal=watch.signal_name or "another rank's")
                    raise
                except UncompletedJobError as exc:
                    registry.record(run_dir, "not_requeued", job_id, step=step,
                                    signal=watch.signal_name or "another rank's", reason=str(exc))
                    raise
        finally:
            # the other ranks leave only once rank 0 has requeued: an early exit could end the job first
            distributed.barrier()
