"""Submit a training run through submitit: ``mmtrain launch CONFIG [--nodes ...] [key=value ...]``.

The job is :class:`mmtrain.launch.job.TrainJob` holding the resolved config, so a
requeued job trains exactly what was submitted even if the YAML file changed since.
Everything of the job lands in the run directory::

    <run_dir>/jobs.jsonl                    job history (mmtrain.launch.registry)
    <run_dir>/logs/<job id>/<job id>_<rank>_log.out / .err    per job and rank
    <run_dir>/logs/<job id>/<job id>_submission.sh            the sbatch script (Slurm)
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mmtrain.launch import registry

CLUSTERS = ("slurm", "local", "debug")


@dataclass
class LaunchConfig:
    """Where and how ``mmtrain launch`` runs a job. The flags of ``mmtrain launch`` set these keys.

    Args:
        cluster: ``slurm`` (sbatch through submitit), ``local`` (this machine: one process
            per rank, the same job code, signals and requeue included) or ``debug`` (one rank
            inside the calling process, for pdb). Default ``slurm``.
        nodes: nodes per job; ``local`` and ``debug`` run on one. Default 1.
        gpus_per_node: GPUs per node, one rank each. Default 8.
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
    gpus_per_node: int = 8
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
            raise ValueError(f"launch.cluster: expected one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        if self.nodes < 1:
            raise ValueError(f"launch.nodes: expected >= 1, got {self.nodes}")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "max_timeouts", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"launch.{name}: expected >= 0, got {getattr(self, name)}")
        if self.cluster != "slurm" and self.nodes != 1:
            raise ValueError(f"launch.nodes={self.nodes}: cluster {self.cluster!r} runs on this machine only (nodes=1)")
        parse_time(self.time)  # a bad launch.time fails at load, not at submission
        if not re.fullmatch(r"|auto|\d+[KMGT]?", str(self.mem).strip(), flags=re.IGNORECASE):
            raise ValueError(f"launch.mem: expected auto, 0 (all of a node's memory), a size such as 400G or 512000M "
                             f"(K, M, G, T; plain numbers are MB), or \"\" (not set), got {self.mem!r}")

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time)


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
    raise ValueError(f"launch.time: expected HH:MM, HH:MM:SS, D-HH:MM or minutes (> 0), got {text!r}")


def tasks_per_node(launch: LaunchConfig, nproc_per_node: int) -> int:
    """Ranks per node: ``launch.tasks_per_node``, else one per GPU on Slurm, ``train.nproc_per_node``
    on this machine (``local``, like ``mmtrain train``) and one in-process (``debug``)."""
    if launch.tasks_per_node:
        return launch.tasks_per_node
    if launch.cluster == "debug":
        return 1
    if launch.cluster == "local":
        return nproc_per_node
    return launch.gpus_per_node or nproc_per_node


CPUS_BESIDES_WORKERS = 2  # a rank's own process and its threads (prefetch, pinning, communication)


def cpus_per_task_for(num_workers: int) -> int:
    """The cores a rank needs: one per dataloader worker (``data.num_workers``) plus :data:`CPUS_BESIDES_WORKERS`."""
    return num_workers + CPUS_BESIDES_WORKERS


def mem_per_node(launch: LaunchConfig) -> str:
    """``--mem``: ``launch.mem``, with ``auto`` = ``0`` (all of the node's memory) on GPU nodes, "" (not set) otherwise."""
    mem = str(launch.mem).strip()
    if mem.lower() == "auto":
        return "0" if launch.gpus_per_node > 0 else ""
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
    optional = {"gpus_per_node": launch.gpus_per_node, "cpus_per_task": launch.cpus_per_task or cpus_per_task_for(num_workers),
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
        ex.update_parameters(name=launch.job_name, nodes=1, tasks_per_node=ntasks, gpus_per_node=min(launch.gpus_per_node, ntasks),
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
    job = executor.submit(TrainJob(cfg.to_dict()))
    registry.record(cfg.train.run_dir, "submitted", job.job_id, cluster=launch.cluster, nodes=launch.nodes,
                    tasks_per_node=ntasks, steps=cfg.train.steps, config=config_source,
                    logs=str(logs_folder(cfg.train.run_dir)).replace("%j", str(job.job_id)))
    return job
