"""Submit a training run through submitit: ``mmtrain launch CONFIG [--nodes ...] [key=value ...]``.

The job is :class:`mmtrain.launch.job.TrainJob` holding the resolved config, so a
requeued job trains exactly what was submitted even if the YAML file changed since.
Everything of the job lands in the run directory::

    <run_dir>/jobs.jsonl                    job history (mmtrain.launch.registry)
    <run_dir>/logs/<job id>/<job id>_<rank>_log.out / .err    per job and rank
    <run_dir>/logs/<job id>/<job id>_submission.sh            the sbatch script (Slurm)
"""
from __future__ import annotations

import contextlib
import io
import logging
import shlex
import sys
import time
from pathlib import Path

from mmtrain.launch import registry, slurm
from mmtrain.launch.config import AUTO, LaunchConfig

log = logging.getLogger("mmtrain.launch")


class SubmissionError(RuntimeError):
    """The scheduler refused the job; the message says what it said and which options decide it."""


def fit_to_cluster(launch: LaunchConfig, nproc_per_node: int, num_workers: int) -> list[str]:
    """Settle what defaults to the cluster, before the script is written: ``gpus_per_node=auto`` from
    the partition's nodes (Slurm, ``sinfo``) or this machine's CUDA devices (local), and a default
    ``--cpus-per-task`` (``data.num_workers + 2``) that the partition's nodes cannot give every rank
    lowered to what they can. Returns what it decided, one line each, for the log."""
    notes = []
    node = slurm.partition_nodes(launch.partition) if launch.cluster == "slurm" else None
    where = f"partition {launch.partition!r}" if launch.partition else "the default partition"
    if launch.gpus_per_node == AUTO:
        if launch.cluster == "slurm":
            launch.gpus_per_node = node[0] if node else 0
            notes.append(f"launch.gpus_per_node=auto: {launch.gpus_per_node} ({where}'s nodes, sinfo)" if node else
                         "launch.gpus_per_node=auto: 0, sinfo did not answer here (set --gpus-per-node)")
        else:
            import torch

            count = torch.cuda.device_count()
            launch.gpus_per_node = count if launch.cluster == "local" else min(count, 1)
            notes.append(f"launch.gpus_per_node=auto: {launch.gpus_per_node} (this machine's CUDA devices)")
    if node and not launch.cpus_per_task:
        ntasks, need = tasks_per_node(launch, nproc_per_node), cpus_per_task_for(num_workers)
        if ntasks * need > node[1]:
            launch.cpus_per_task = max(1, node[1] // ntasks)
            notes.append(f"--cpus-per-task {launch.cpus_per_task}: {where}'s nodes have {node[1]} CPUs for {ntasks} "
                         f"ranks, fewer than data.num_workers + 2 = {need} each (loader workers will share cores)")
        if ntasks > node[1]:
            notes.append(f"{ntasks} ranks per node but {where}'s nodes have {node[1]} CPUs: Slurm will not start "
                         "this job (lower --tasks-per-node)")
    return notes


def tasks_per_node(launch: LaunchConfig, nproc_per_node: int) -> int:
    """Ranks per node: ``launch.tasks_per_node``, else one per GPU on Slurm, ``train.nproc_per_node``
    on this machine (``local``, like ``mmtrain train``) and one in-process (``debug``)."""
    if launch.tasks_per_node:
        return launch.tasks_per_node
    if launch.cluster == "debug":
        return 1
    if launch.cluster == "local":
        return nproc_per_node
    return launch.gpus or nproc_per_node


CPUS_BESIDES_WORKERS = 2  # a rank's own process and its threads (prefetch, pinning, communication)


def cpus_per_task_for(num_workers: int) -> int:
    """The cores a rank needs: one per dataloader worker (``data.num_workers``) plus :data:`CPUS_BESIDES_WORKERS`."""
    return num_workers + CPUS_BESIDES_WORKERS


def mem_per_node(launch: LaunchConfig) -> str:
    """``--mem``: ``launch.mem``, with ``auto`` = ``0`` (all of the node's memory) on GPU nodes, "" (not set) otherwise."""
    mem = str(launch.mem).strip()
    if mem.lower() == "auto":
        return "0" if launch.gpus > 0 else ""
    return mem


def sbatch_parameters(launch: LaunchConfig, ntasks_per_node: int, num_workers: int) -> dict:
    """submitit's Slurm parameters (sbatch option names with ``_``) for this launch config;
    ``num_workers`` (``data.num_workers``) sizes the default ``--cpus-per-task``."""
    params: dict = {
        "job_name": launch.job_name,
        "nodes": launch.nodes,
        "ntasks_per_node": ntasks_per_node,
        "time": launch.timeout_min,
        "signal_delay_s": launch.signal_delay_s,
        # one failed rank ends the step at once instead of leaving the others in a collective
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"requeue": True},
    }
    optional = {"gpus_per_node": launch.gpus, "cpus_per_task": launch.cpus_per_task or cpus_per_task_for(num_workers),
                "partition": launch.partition, "account": launch.account, "qos": launch.qos,
                "constraint": launch.constraint, "mem": mem_per_node(launch), "exclusive": launch.exclusive,
                "setup": list(launch.setup)}
    params.update({k: v for k, v in optional.items() if v})
    return params


def logs_folder(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute() / "logs" / "%j"


def submitit_command(folder: Path, python: str = sys.executable) -> str:
    """What every task runs: submitit's entry point, which loads the pickled job."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(launch: LaunchConfig, run_dir: str | Path, nproc_per_node: int, num_workers: int) -> str:
    """The sbatch script ``launch`` submits on Slurm (``mmtrain launch --dry-run`` prints it)."""
    # submitit's own renderer, the function its SlurmExecutor calls, so this is the text sbatch gets
    from submitit.slurm.slurm import _make_sbatch_string

    folder = logs_folder(run_dir)
    return _make_sbatch_string(command=submitit_command(folder), folder=folder,
                               **sbatch_parameters(launch, tasks_per_node(launch, nproc_per_node), num_workers))


def build_executor(launch: LaunchConfig, run_dir: str | Path, nproc_per_node: int, num_workers: int):
    import submitit

    folder = logs_folder(run_dir)
    ntasks = tasks_per_node(launch, nproc_per_node)
    if launch.cluster == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=launch.max_timeouts)
        ex.update_parameters(**{f"slurm_{k}": v for k, v in sbatch_parameters(launch, ntasks, num_workers).items()})
    elif launch.cluster == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local", local_max_num_timeout=launch.max_timeouts)
        ex.update_parameters(name=launch.job_name, nodes=1, tasks_per_node=ntasks, gpus_per_node=min(launch.gpus, ntasks),
                             timeout_min=launch.timeout_min, **({"local_setup": list(launch.setup)} if launch.setup else {}))
        # LocalExecutor honours signal_delay_s but AutoExecutor does not pass it through
        ex._executor.parameters["signal_delay_s"] = launch.signal_delay_s
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="debug")
        ex.update_parameters(name=launch.job_name, timeout_min=launch.timeout_min)
    return ex


def submit(cfg, config_source: str = ""):
    """Submit ``cfg`` (a resolved :class:`mmtrain.config.Config`); returns the submitit job.

    ``train.run_dir`` is made absolute first: the job may start in another directory."""
    from mmtrain.launch.job import TrainJob

    cfg.train.run_dir = str(Path(cfg.train.run_dir).absolute())
    launch = cfg.launch
    ntasks = tasks_per_node(launch, cfg.train.nproc_per_node)
    executor = build_executor(launch, cfg.train.run_dir, cfg.train.nproc_per_node, cfg.data.num_workers)
    options = {**vars(launch), "tasks_per_node": ntasks, "mem": mem_per_node(launch),
               "cpus_per_task": launch.cpus_per_task or cpus_per_task_for(cfg.data.num_workers)}
    try:
        # submitit prints sbatch's refusal itself before raising it; it is reported once, below
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(TrainJob(cfg.to_dict()))
    except Exception as exc:
        from submitit.core.utils import FailedJobError

        if not isinstance(exc, FailedJobError):
            raise
        raise SubmissionError(slurm.explain_sbatch_error(str(exc), options)) from None
    if launch.cluster == "slurm" and (reason := slurm.never_starts(job.job_id)):
        job.cancel(check=False)
        raise SubmissionError(slurm.explain_never_starts(job.job_id, reason, options) + "; cancelled it")
    registry.record(cfg.train.run_dir, "submitted", job.job_id, cluster=launch.cluster, nodes=launch.nodes,
                    tasks_per_node=ntasks, steps=cfg.train.steps, config=config_source,
                    logs=str(logs_folder(cfg.train.run_dir)).replace("%j", str(job.job_id)))
    return job


def wait(run_dir: str | Path, job_id: str, cluster: str, poll_s: float = 5.0, echo=print) -> dict:
    """Until the job runs no more (requeues included): its :func:`mmtrain.launch.registry.job_table` row.
    Prints each change of state. Reads the job's state from the scheduler and its recorded events,
    not from submitit's poll, which waits forever for a job that ended without writing its result
    (killed, out of memory) where Slurm keeps no accounting."""
    if cluster == "slurm" and not slurm.accounting_available(job_id):
        echo("this cluster keeps no Slurm accounting (sacct): job states come from scontrol while the controller "
             f"knows the job, then from {registry.registry_path(run_dir)}")
    seen = None
    while True:
        row = registry.job_table(run_dir, job_id=job_id)[0]
        state, reason = row["state"], ""
        if state == "PENDING" and cluster == "slurm":
            reason = slurm.pending_reason(job_id)
            state = f"PENDING ({reason})" if reason else state
        if state != seen:
            seen = state
            step = "" if row["last_step"] is None else f", last recorded step {row['last_step']}"
            echo(f"job {job_id}: {seen} (run {max(row['starts'], 1)}{step})")
            if reason in slurm.NEVER_STARTS:
                echo(f"job {job_id} cannot start as submitted ({reason}): `scancel {job_id}`, then submit with "
                     "fewer resources; `scontrol show job` says what it asks for")
        if registry.ended(row["state"]):
            return row
        time.sleep(poll_s)


def outcome(row: dict) -> tuple[bool, str]:
    """(finished, one line) for a job that ended: how its last run ended, from its recorded events."""
    events = row["events"]
    starts = [i for i, e in enumerate(events) if e["event"] == "started"]
    last_run = events[starts[-1] + 1:] if starts else []
    by_event = {e["event"]: e for e in last_run}
    failed = next((e for e in last_run if e["event"] == "failed"), None)  # the first: the cause
    job = f"job {row['job_id']}"
    if failed is not None:
        after = f" after {failed['signal']}" if failed.get("signal") else ""
        return False, (f"{job} failed{after} (rank {failed.get('rank', 0)}, latest checkpoint step {failed['step']}): "
                       f"{failed['error'].strip()}")
    if "finished" in by_event and row["state"] == "COMPLETED":
        return True, f"{job} finished at step {by_event['finished']['step']} after {row['starts']} run(s)"
    for event in ("not_requeued", "cancelled", "stopped", "preempted"):
        if event in by_event:
            e = by_event[event]
            why = f": {e['reason']}" if e.get("reason") else ""
            return False, f"{job} {event.replace('_', ' ')} after saving step {e['step']}{why} (state {row['state']})"
    return False, f"{job} ended {row['state']} without recording how; see its logs: {row.get('logs') or '-'}"


def run_debug(job) -> tuple[bool, str]:
    """(finished, one line) of a ``debug`` job, which runs in this process when its result is asked for."""
    try:
        result = job.results()[0]
    except Exception as exc:
        return False, f"job {job.job_id} failed: {failure_line(exc)}"
    return True, f"job {job.job_id} done at step {result['step']}" + (f" ({result['stopped_by']})" if result["stopped_by"] else "")


def failure_line(exc: BaseException) -> str:
    """The last line of the job's traceback: the error that ended it. submitit's ``FailedJobError``
    carries the job's traceback between dashed lines; other exceptions are their own message."""
    parts = str(exc).split("----------------------")
    trace = [line for line in (parts[1] if len(parts) > 2 else str(exc)).splitlines() if line.strip()]
    return trace[-1].strip() if trace else str(exc)
