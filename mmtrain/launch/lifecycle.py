"""What rank 0 of a job records of each run (``<run_dir>/jobs.jsonl``) and does once training
stopped on a signal. One way for both launchers: ``mmtrain launch`` (submitit,
:class:`mmtrain.launch.job.TrainJob`) and plain ``sbatch slurm/train.sbatch`` (``mmtrain
train --srun``), so ``mmtrain jobs`` reads the runs of either.

The stop itself is :class:`mmtrain.components.preemption.PreemptionWatch`'s: all ranks
saved the same step. Then:

- ``requeue`` (USR2, the time limit is near): back in the queue, at most
  ``launch.max_timeouts`` times (submitit's handler for ``mmtrain launch``,
  :func:`requeue_after_time_limit` for plain sbatch);
- ``stop`` (TERM): end cleanly, exit code 0. Under Slurm the TERM came from a preemption or
  ``scontrol requeue`` (Slurm puts the job back itself) or from ``scancel``: recorded as
  ``preempted`` or ``cancelled`` by what Slurm says of the job.
"""
from __future__ import annotations

import logging
import os
import socket

from mmtrain.launch import registry, slurm

log = logging.getLogger("mmtrain.launch")


def latest_step(run_dir: str) -> int:
    from mmtrain.components.checkpoint import latest_tag, step_of

    try:
        tag = latest_tag(run_dir)
    except FileNotFoundError:  # `latest` names a missing folder: training resumes from an older one and says so
        return 0
    return step_of(tag) if tag else 0


def record_start(run_dir: str, job_id: str, cluster: str, world_size: int, **fields) -> None:
    """``MMTRAIN_JOB_LOG``: the batch script's log, which slurm/train.sbatch names (its jobs record no submission)."""
    if os.environ.get("MMTRAIN_JOB_LOG"):
        fields.setdefault("logs", os.environ["MMTRAIN_JOB_LOG"])
    registry.record(run_dir, "started", job_id, cluster=cluster, step=latest_step(run_dir), world_size=world_size,
                    host=socket.gethostname(), **fields)


def record_failure(run_dir: str, job_id: str, exc: BaseException, rank: int, signal: str = "") -> None:
    """Recorded by every rank that fails: the first ``failed`` of a run is its cause, the later ones
    (a peer that lost its connection) follow from it. ``signal``: one that arrived before (Slurm
    signals every process of a job, so a signal during start-up can end a child process, such as a
    compiler building an extension)."""
    registry.record(run_dir, "failed", job_id, step=latest_step(run_dir), rank=rank, signal=signal or None,
                    error=f"{type(exc).__name__}: {exc}"[:500])


def stop_event(cluster: str, job_id: str) -> str:
    """The event of a run that saved and stopped on TERM: ``preempted`` when Slurm is requeueing the
    job, ``cancelled`` when it is ending it, ``stopped`` where no Slurm says which."""
    requeued = slurm.being_requeued(job_id) if cluster == "slurm" else None
    return {True: "preempted", False: "cancelled", None: "stopped"}[requeued]


def record_end(run_dir: str, job_id: str, cluster: str, stopped_by: str | None, step: int, signal: str) -> None:
    """A run that ended without error: finished, or saved and stopped on TERM (``requeue`` is recorded
    by whoever requeues)."""
    event = "finished" if stopped_by is None else stop_event(cluster, job_id)
    registry.record(run_dir, event, job_id, step=step, signal=signal or None)
    if event == "preempted":
        log.warning("job %s preempted: saved step %d; Slurm requeues it if its partition does, and it resumes there",
                    job_id, step)


def requeue_after_time_limit(run_dir: str, job_id: str, max_timeouts: int, step: int, signal: str) -> bool:
    """Plain sbatch runs (no submitit): put this job back in the queue after the time-limit save, unless
    it was requeued ``max_timeouts`` times already (counted in the job's history: preemptions, which
    Slurm requeues itself, do not count)."""
    done = sum(1 for e in registry.read_events(run_dir) if e["job_id"] == str(job_id) and e["event"] == "requeued")
    if done >= max_timeouts:
        reason = f"time limit reached {done + 1} times; launch.max_timeouts={max_timeouts}"
        registry.record(run_dir, "not_requeued", job_id, step=step, signal=signal or None, reason=reason)
        log.warning("job %s not requeued: %s (saved step %d)", job_id, reason, step)
        return False
    try:
        slurm.requeue(job_id)  # the job's processes get TERM now, KILL KillWait (30 s) later
    except Exception as exc:  # noqa: BLE001 - any failure leaves a saved run to resubmit by hand
        reason = f"scontrol requeue failed: {getattr(exc, 'stderr', '') or exc}".strip()
        registry.record(run_dir, "not_requeued", job_id, step=step, signal=signal or None, reason=reason[:500])
        log.error("could not requeue job %s (%s); step %d is saved: resubmit to resume", job_id, reason, step)
        return False
    registry.record(run_dir, "requeued", job_id, step=step, signal=signal or None)
    log.warning("requeued job %s (time limit %d of at most %d requeues)", job_id, done + 1, max_timeouts)
    return True
