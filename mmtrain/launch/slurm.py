"""What mmtrain asks of Slurm itself, through its commands: a job's state, a requeue, the GPUs
of a partition's nodes, and what a refused submission means.

Used by the launcher (before and after submitting), by ``mmtrain jobs`` and by the ranks of
a job (requeue, cancelled or preempted). Imports nothing of mmtrain.

Job state: ``sacct`` where the cluster keeps accounting; many clusters (and every small
one) run without it, and there ``scontrol show job`` answers while the controller still
holds the job (``MinJobAge`` after it ended, 300 s by default).
"""
from __future__ import annotations

import os
import re
import subprocess
import time

# states after which Slurm runs nothing more of the job (a requeued job passes through
# REQUEUED / PENDING, a preempted one that Slurm requeues through PREEMPTED, so neither is here)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "REVOKED", "SPECIAL_EXIT"}


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def accounting_available(job_id: str) -> bool:
    """Whether ``sacct`` answers on this cluster (it exits 1 with "accounting storage is disabled" where not)."""
    out = _run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"])
    return out is not None and out.returncode == 0


def job_state(job_id: str) -> str | None:
    """Slurm's state of ``job_id`` (``RUNNING``, ``PENDING``, ``COMPLETED``, ``CANCELLED``, ...), from
    ``sacct`` or else ``scontrol``; "" when Slurm answers but no longer knows the job, None when
    no Slurm answers here (no commands, controller down)."""
    out = _run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"])
    if out is not None and out.returncode == 0:
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if lines:
            return lines[0].split()[0]  # "CANCELLED by 0" -> CANCELLED
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if out is None:
        return None
    if out.returncode != 0:
        # "Invalid job id specified": the controller answered and forgot the job
        return "" if "invalid job id" in out.stderr.lower() else None
    m = re.search(r"\bJobState=(\S+)", out.stdout)
    return m.group(1) if m else None


def being_requeued(job_id: str) -> bool | None:
    """Asked by a job's own rank after TERM: whether Slurm is putting this job back in the queue (a
    preemption in REQUEUE mode, ``scontrol requeue``) rather than ending it (``scancel``). A requeue
    counts the restart at once (``Restarts`` above this run's ``SLURM_RESTART_COUNT``); the job state
    reads COMPLETING either way. None when scontrol does not answer."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    m = re.search(r"\bRestarts=(\d+)", out.stdout) if out is not None and out.returncode == 0 else None
    if m is None:
        return None
    return int(m.group(1)) > int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue(job_id: str) -> None:
    """``scontrol requeue JOB``: the job ends now and goes back to the queue with its id."""
    subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True, text=True, timeout=60)


def partition_nodes(partition: str = "") -> tuple[int, int] | None:
    """(GPUs, CPUs) of the smallest node of ``partition`` (the default partition when ""), so that a
    request that fits them fits every node; GPUs from the ``gpu`` GRES that ``sinfo`` reports
    (``gpu:8``, ``gpu:a100:8(S:0-1)``; ``(null)``: none). None when ``sinfo`` does not answer;
    ValueError naming the partitions there are when it has no such partition."""
    # a short limit: where no controller is configured, sinfo looks for one in DNS for a minute
    out = _run(["sinfo", "-h", "-N", "-o", "%P|%G|%c"], timeout=15)
    if out is None or out.returncode != 0:
        return None
    nodes, names = [], []
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 3:
            continue
        name, gres, cpus = parts
        default = name.endswith("*")  # sinfo marks the default partition with *
        name = name.rstrip("*")
        names.append(name + ("*" if default else ""))
        if name != partition and not (default and not partition):
            continue
        gpus = sum(int(m.group(1)) for item in gres.split(",") if (m := re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())))
        nodes.append((gpus, int(cpus) if cpus.strip().isdigit() else 1))
    if not nodes:
        known = ", ".join(sorted(set(names))) or "none"
        raise ValueError(f"launch.partition: {'no partition ' + repr(partition) if partition else 'no default partition'}"
                         f" on this cluster (its partitions, * = default: {known})")
    return min(g for g, _ in nodes), min(c for _, c in nodes)


def _queue_state(job_id: str) -> tuple[str, str]:
    """(state, reason) as ``squeue`` has them; ("", "") once the job left the queue."""
    out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r"])
    if out is None or out.returncode != 0 or "|" not in out.stdout:
        return "", ""
    state, reason = out.stdout.strip().split("|", 1)
    return state, reason.strip() if reason.strip() not in ("None", "(null)") else ""


def pending_reason(job_id: str) -> str:
    """Why a pending job waits (``Priority``, ``Resources``, ``PartitionConfig``...); "" if it does not."""
    state, reason = _queue_state(job_id)
    return reason if state == "PENDING" else ""


# pending for one of these, a job never starts as it was submitted (clusters that set
# EnforcePartLimits refuse such jobs at submission instead)
NEVER_STARTS = {
    "PartitionConfig": ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "nodes", "constraint"),
    "PartitionNodeLimit": ("nodes",),
    "PartitionTimeLimit": ("time",),
    "BadConstraints": ("constraint", "gpus_per_node", "mem"),
    "InvalidQOS": ("qos",),
    "InvalidAccount": ("account",),
}


def never_starts(job_id: str, wait_s: float = 3.0) -> str:
    """The reason Slurm gives for holding a just-submitted job that it will never start as asked,
    once its scheduler looked at it (within ``wait_s``); "" when it gave no such reason or the job
    is no longer pending."""
    end = time.time() + wait_s
    while True:
        state, reason = _queue_state(job_id)
        if state != "PENDING" or reason or time.time() > end:
            return reason if state == "PENDING" and reason in NEVER_STARTS else ""
        time.sleep(0.25)


# what sbatch says -> the options of `mmtrain launch` that decide it
_SBATCH_CAUSES = (
    (r"generic resource|gres", ("gpus_per_node",)),
    (r"invalid partition", ("partition",)),
    (r"invalid account", ("account", "partition")),
    (r"invalid qos", ("qos",)),
    (r"time limit", ("time", "partition")),
    (r"invalid feature|constraint", ("constraint",)),
    (r"memory", ("mem",)),
    (r"node count|nodes", ("nodes", "partition")),
    (r"node configuration is not available|more processors|cpu count",
     ("nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "mem", "constraint")),
)


def _asked(causes: list[str], options: dict) -> str:
    """" (asked for --gpus-per-node 8, ...)": the options that decide it, those set, with their values."""
    asked = [f"--{n.replace('_', '-')} {options[n]}" for n in causes if options.get(n) not in (None, "", False, 0)]
    return f" (asked for {', '.join(asked)})" if asked else f" (check {', '.join('--' + n.replace('_', '-') for n in causes)})"


def explain_never_starts(job_id: str, reason: str, options: dict) -> str:
    return (f"Slurm accepted job {job_id} but holds it for good ({reason}: the partition cannot give what it asks)"
            f"{_asked(list(NEVER_STARTS[reason]), options)}")


def explain_sbatch_error(message: str, options: dict) -> str:
    """One line from sbatch's refusal: what Slurm said and which options (with the values asked) decide it.
    ``options``: ``mmtrain launch`` option name (``gpus_per_node``) -> the value submitted."""
    said = [line.split("error:", 1)[1].strip() for line in message.splitlines() if "error:" in line]
    said = [s for s in said if s] or [line.strip() for line in message.splitlines() if line.strip()][-1:]
    text = "; ".join(dict.fromkeys(said))
    causes: list[str] = []
    for pattern, names in _SBATCH_CAUSES:
        if re.search(pattern, text, flags=re.IGNORECASE):
            causes += [n for n in names if n not in causes]
            break
    return f"sbatch refused the job: {text or 'no reason given'}{_asked(causes, options)}"
