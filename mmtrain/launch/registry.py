"""A run's job history: one JSON line per event in ``<run_dir>/jobs.jsonl``.

Events: ``submitted`` (by ``mmtrain launch``), then per run of the job, by rank 0:
``started`` (with the step it starts from), and one of ``finished``, ``requeued``,
``stopped`` (saved on TERM, not requeued by us), ``not_requeued`` (too many timeouts) or
``failed``. A Slurm job keeps its id across requeues, so one id collects several starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

END_STATES = {"finished": "COMPLETED", "failed": "FAILED", "stopped": "STOPPED", "not_requeued": "TIMEOUT",
              "requeued": "REQUEUED"}


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
    path = registry_path(run_dir)
    if not path.is_file():
        return []
    events = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {n}: not a JSON object: {line[:80]!r}") from None
    return events


def _slurm_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True,
                             timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    lines = [l.strip() for l in out.stdout.splitlines() if l.strip()]
    return lines[0].split()[0] if out.returncode == 0 and lines else None


def _local_running(job_id: str) -> bool:
    """A local job's id is the pid of submitit's controller process."""
    try:
        return b"submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def job_state(cluster: str, job_id: str, events: list[dict]) -> str:
    """The scheduler's state when it can tell (sacct; a live local controller), else the last event's."""
    if cluster == "slurm":
        state = _slurm_state(job_id)
        if state:
            return state
    elif cluster == "local" and _local_running(job_id):
        return "RUNNING"
    last = events[-1]["event"] if events else "submitted"
    if last == "started":
        # a started run that recorded no end: still running (Slurm without sacct) or killed
        return "RUNNING?" if cluster == "slurm" else "ENDED"
    return END_STATES.get(last, "PENDING" if cluster == "slurm" else "ENDED")


def job_table(run_dir: str | os.PathLike) -> list[dict]:
    """One row per job id, in submission order."""
    rows: dict[str, dict] = {}
    for ev in read_events(run_dir):
        row = rows.setdefault(ev["job_id"], {"job_id": ev["job_id"], "cluster": ev.get("cluster", ""), "submitted": "",
                                             "starts": 0, "events": []})
        row["events"].append(ev)
        if ev["event"] == "submitted":
            row.update(cluster=ev["cluster"], submitted=ev["time"], logs=ev.get("logs", ""))
        elif ev["event"] == "started":
            row["starts"] += 1
            row["cluster"] = row["cluster"] or ev.get("cluster", "")
    for row in rows.values():
        ends = [e for e in row["events"] if e["event"] != "submitted"]
        row["state"] = job_state(row["cluster"], row["job_id"], ends)
        row["last_step"] = max((e["step"] for e in row["events"] if "step" in e), default=None)
    return list(rows.values())
