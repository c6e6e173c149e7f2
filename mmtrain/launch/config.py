"""The ``launch`` section of a run config: where and how ``mmtrain launch`` runs a job.

Plain data and its parsers, nothing that submits: the run-level config imports this, and
the launcher (:mod:`mmtrain.launch.submit`) reads it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmtrain.errors import ConfigError

CLUSTERS = ("slurm", "local", "debug")
AUTO = "auto"


@dataclass
class LaunchConfig:
    """Where and how ``mmtrain launch`` runs a job. The flags of ``mmtrain launch`` set these keys.

    Args:
        cluster: ``slurm`` (sbatch through submitit), ``local`` (this machine: one process
            per rank, the same job code, signals and requeue included) or ``debug`` (one rank
            inside the calling process, for pdb). Default ``slurm``.
        nodes: nodes per job; ``local`` and ``debug`` run on one. Default 1.
        gpus_per_node: GPUs per node, one rank each; 0 = none (CPU ranks, no GPU request).
            ``auto`` = what the nodes have: on Slurm the GPUs (``gpu`` GRES) of the
            partition's nodes as ``sinfo`` reports them (0 on a partition without GPUs), on
            ``local`` this machine's CUDA devices; resolved once, at submission, and the
            resolved number is what the job's saved config holds. Default ``auto``.
        tasks_per_node: ranks per node; 0 = ``gpus_per_node``, or ``train.nproc_per_node``
            when ``gpus_per_node`` is 0 (CPU ranks). Default 0.
        cpus_per_task: CPU cores per rank (``--cpus-per-task``); 0 = ``data.num_workers + 2``:
            one per dataloader worker, one for the rank's own process and one for its threads
            (shard prefetch, batch pinning, communication); Slurm's own default is usually one
            core per task. Default 0.
        partition: ``--partition``; "" = not set. Default "".
        account: ``--account``; "" = not set. Default "".
        qos: ``--qos``; "" = not set. Default "".
        constraint: ``--constraint`` (node features, e.g. ``a100``); "" = not set. Default "".
        mem: memory per node (``--mem``: ``400G``, ``512000M``; ``0`` = all of the node's memory);
            ``auto`` = ``0`` when the job takes GPUs (``gpus_per_node`` > 0: its nodes are GPU nodes
            whose memory serves their ranks), not set on CPU-only jobs; "" = not set (Slurm's
            default). Default ``auto``.
        exclusive: whole nodes only (``--exclusive``). Default false.
        time: time limit of each run of the job: ``HH:MM`` (hours, minutes; note that plain
            sbatch reads ``12:00`` as 12 minutes), ``HH:MM:SS``, ``D-HH:MM`` or minutes as an
            integer. Default ``24:00``.
        max_timeouts: how often a job that reached its time limit is requeued; preemptions
            are always requeued. Default 3.
        signal_delay_s: USR2 arrives this many seconds before the time limit: room for the
            step in flight and one checkpoint save. Default 120.
        setup: shell lines run before the ranks start (``module load cuda``,
            ``source .venv/bin/activate``). Default none.
        job_name: the Slurm job name. Default ``mmtrain``.
    """

    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int | str = AUTO
    tasks_per_node: int = 0
    cpus_per_task: int = 0
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    mem: str = "auto"
    exclusive: bool = False
    time: str = "24:00"
    max_timeouts: int = 3
    signal_delay_s: int = 120
    setup: list[str] = field(default_factory=list)
    job_name: str = "mmtrain"

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"launch.cluster: expected one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        if self.nodes < 1:
            raise ConfigError(f"launch.nodes: expected >= 1, got {self.nodes}")
        if isinstance(self.gpus_per_node, str):
            if self.gpus_per_node.strip().lower() != AUTO:
                raise ConfigError(f"launch.gpus_per_node: expected a number of GPUs (0 = none) or auto, "
                                  f"got {self.gpus_per_node!r}")
            self.gpus_per_node = AUTO
        elif self.gpus_per_node < 0:
            raise ConfigError(f"launch.gpus_per_node: expected >= 0 or auto, got {self.gpus_per_node}")
        for name in ("tasks_per_node", "cpus_per_task", "max_timeouts", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"launch.{name}: expected >= 0, got {getattr(self, name)}")
        if self.cluster != "slurm" and self.nodes != 1:
            raise ConfigError(f"launch.nodes={self.nodes}: cluster {self.cluster!r} runs on this machine only (nodes=1)")
        parse_time(self.time)  # a bad launch.time fails at load, not at submission
        if not re.fullmatch(r"|auto|\d+[KMGT]?", str(self.mem).strip(), flags=re.IGNORECASE):
            raise ConfigError(f"launch.mem: expected auto, 0 (all of a node's memory), a size such as 400G or 512000M "
                              f"(K, M, G, T; plain numbers are MB), or \"\" (not set), got {self.mem!r}")

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time)

    @property
    def gpus(self) -> int:
        """``gpus_per_node`` once resolved (:func:`mmtrain.launch.submit.resolve_gpus_per_node`)."""
        if self.gpus_per_node == AUTO:
            raise RuntimeError("launch.gpus_per_node=auto was not resolved before use")
        return int(self.gpus_per_node)


def parse_time(text: str) -> int:
    """``HH:MM`` / ``HH:MM:SS`` / ``D-HH:MM[:SS]`` / ``MINUTES`` -> whole minutes (seconds round up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?", str(text).strip())
    if m:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
        if minutes < 60 and seconds < 60:
            total = (days * 24 + hours) * 60 + minutes + (seconds > 0)
            if total > 0:
                return total
    elif str(text).strip().isdigit() and int(text) > 0:
        return int(text)
    raise ConfigError(f"launch.time: expected HH:MM, HH:MM:SS, D-HH:MM or minutes (> 0), got {text!r}")
