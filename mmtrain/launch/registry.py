"""A run's job history: one JSON line per event in ``<run_dir>/jobs.jsonl``.

Events: ``submitted`` (by ``mmtrain launch``), then per run of the job, by rank 0:
``started`` (with the step it starts from), and one of (``failed``: by each rank that fails)

- ``finished``: trained to the last step;
- ``requeued``: time limit (USR2): saved and put back in the queue by mmtrain;
- ``not_requeued``: time limit again after ``launch.max_timeouts`` requeues: saved, ended;
- ``preempted``: TERM from Slurm (a preemption, ``scontrol requeue``): saved and ended cleanly;
  Slurm requeues the job when its partition says so;
- ``cancelled``: TERM from ``scancel`` (Slurm ends the job, does not requeue it): saved and ended;
- ``stopped``: TERM where no Slurm tells which of the two: saved and ended;
- ``failed``: an error, recorded with it.

Runs started by ``mmtrain launch`` (submitit) and by ``slurm/train.sbatch`` (plain sbatch +
srun) record the same events, but a ``slurm/train.sbatch`` job records no submission: it is
known from its first start. A Slurm job keeps its id across requeues, so one id collects
several starts. The progress of the job that started last comes from the tail of the run's
``metrics.jsonl`` (:func:`last_metrics`): jobs record steps only when they start and end.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mmtrain.launch import slurm

END_STATES = {"finished": "COMPLETED", "failed": "FAILED", "stopped": "STOPPED", "not_requeued": "TIMEOUT",
              "requeued": "REQUEUED", "preempted": "PREEMPTED", "cancelled": "CANCELLED"}
# the job runs again after these (the scheduler requeued it)
AGAIN = {"requeued", "preempted"}


def registry_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "jobs.jsonl"


def record(run_dir: str | os.PathLike, event: str, job_id: str, **fields) -> None:
    """Append one event. Single-line appends under O_APPEND do not interleave, so a job's
    rank 0 and a user's ``mmtrain launch`` can write concurrently."""
    line = json.dumps({"event": event, "job_id": str(job_id), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})
    path = registry_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(line + "\n")


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """The events recorded so far; a last line still being written (no newline yet) is not one."""
    path = registry_path(run_dir)
    if not path.is_file():
        return []
    text = path.read_text()
    events = []
    for n, line in enumerate(text[:text.rfind("\n") + 1].splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {n}: not a JSON object: {line[:80]!r}") from None
    return events


def _local_running(job_id: str) -> bool:
    """A local job's id is the pid of submitit's controller process."""
    try:
        return b"submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _local_starting(job_id: str) -> bool:
    """The controller's process exists but has not become submitit's controller yet (between fork and
    exec its command line is still its parent's): a local job just submitted."""
    try:
        state = Path(f"/proc/{int(job_id)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z"


# what each state of `mmtrain jobs` means (its legend lists those shown)
MEANINGS = {
    "PENDING": "queued, not started yet (a requeued job waits here too)",
    "RUNNING": "the scheduler says it runs (STARTS counts its runs: each requeue starts it again)",
    "REQUEUED": "stopped at the time limit or by a preemption, saved, and put back in the queue",
    "PREEMPTED": "preempted: saved, and Slurm requeues it if its partition does",
    "COMPLETED": "trained to its last step",
    "FAILED": "ended with an error (the first one recorded is shown below)",
    "TIMEOUT": "time limit reached after launch.max_timeouts requeues: saved, not requeued; launch it again to go on",
    "CANCELLED": "cancelled (scancel): saved and ended",
    "STOPPED": "TERM where no Slurm said why: saved and ended",
    "ENDED": "the scheduler no longer knows the job and it recorded no end: killed (out of memory, node failure, "
             "scancel --signal=KILL) or ended before training started; see its logs",
    "STARTED": "it recorded its start and no end, and no Slurm answers here (sacct/scontrol missing or not "
               "reaching the controller) to say whether it still runs; the time of its last logged step (below) tells",
}


def job_state(cluster: str, job_id: str, events: list[dict]) -> str:
    """The state of one job: the scheduler's while the job is queued or running; once it ended, that
    of its last recorded end (more precise: a time limit not requeued, a cancel after the save), or
    the scheduler's where the job recorded none (killed). ``ENDED``: the scheduler no longer knows
    the job and it recorded no end; ``STARTED``: no Slurm answers here to tell (:data:`MEANINGS`)."""
    last = events[-1]["event"] if events else "submitted"
    recorded = END_STATES[last] if last in END_STATES and last not in AGAIN else None
    if cluster == "slurm":
        state = slurm.job_state(job_id)
        if state:
            return recorded if state in slurm.ENDED and recorded else state
        if state == "":  # Slurm answered and no longer knows the job
            return recorded or "ENDED"
        return "STARTED" if last == "started" else END_STATES.get(last, "PENDING")
    if cluster == "local":
        if _local_running(job_id):
            return "RUNNING"
        if last == "submitted" and _local_starting(job_id):
            return "PENDING"
    return recorded or "ENDED"


def ended(state: str) -> bool:
    """Whether a :func:`job_state` means that the job will run no more."""
    return state in slurm.ENDED or state in ("ENDED", "STOPPED")


def job_table(run_dir: str | os.PathLike, job_id: str | None = None) -> list[dict]:
    """One row per job id (or for ``job_id`` only), in submission order."""
    rows: dict[str, dict] = {}
    started_last = None  # the job that started last: the one that writes metrics.jsonl now or wrote it last
    for ev in read_events(run_dir):
        if ev["event"] == "started":
            started_last = ev["job_id"]
        if job_id is not None and ev["job_id"] != str(job_id):
            continue
        row = rows.setdefault(ev["job_id"], {"job_id": ev["job_id"], "cluster": ev.get("cluster", ""), "submitted": "",
                                             "starts": 0, "events": []})
        row["events"].append(ev)
        if ev["event"] == "submitted":
            row.update(cluster=ev["cluster"], submitted=ev["time"], logs=ev.get("logs", ""))
        elif ev["event"] == "started":
            # a job of `sbatch slurm/train.sbatch` records no submission: its first start says where it runs
            row["starts"] += 1
            row["cluster"] = row["cluster"] or ev.get("cluster", "")
            row["logs"] = row.get("logs") or ev.get("logs", "")
    for row in rows.values():
        ends = [e for e in row["events"] if e["event"] != "submitted"]
        row["state"] = job_state(row["cluster"], row["job_id"], ends)
        row["last_step"] = max((e["step"] for e in row["events"] if "step" in e), default=None)
        row["error"] = next((e.get("error", "") for e in row["events"] if e["event"] == "failed"), "")
        row["logged"] = None
    # metrics.jsonl is the run's: its last record is of the job that started last, which records its steps only
    # when it starts and ends
    if started_last in rows and (logged := last_metrics(run_dir)) is not None:
        row = rows[started_last]
        row["logged"] = logged
        row["last_step"] = max(row["last_step"] or 0, logged["step"])
    return list(rows.values())


def last_metrics(run_dir: str | os.PathLike, tail_bytes: int = 65536) -> dict | None:
    """The last complete record of ``<run_dir>/metrics.jsonl`` (``step``, ``time``, ...), read from the
    file's tail only (a long run's file is large); None when there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - tail_bytes))
            tail = fh.read()
    except OSError:
        return None
    for line in reversed(tail[:tail.rfind(b"\n") + 1].splitlines()):  # a last line still being written is none
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return record
    return None
