"""A real single-node Slurm for the tests: munge, slurmctld and slurmd (Debian's packages,
installed by ``make slurm``), started as daemons with their configuration, state, sockets
and logs in one temporary directory. Clients (``sbatch``, ``squeue``, ``scontrol``, ``srun``)
find it through ``SLURM_CONF``, which :meth:`SlurmCluster.env` sets; nothing under
``/etc/slurm`` is written and no system service is started.

The node is this machine with its real core count; no accounting (``sacct`` answers with an
error, as on clusters without slurmdbd), ``select/cons_tres`` and requeue allowed, as on a
typical GPU cluster's partition, without the GPUs.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"  # this machine, the default partition
GPU_PARTITION, GPU_NODES = "gpu", "gpu[001-002]"  # 2 nodes x 8 GPUs x 96 CPUs, down


def missing_reason() -> str:
    """Why no Slurm can start here ("" when it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return (f"Slurm is not installed here ({', '.join(missing)} not found); "
                "`make slurm` installs it (as root, with apt-get)")
    if os.geteuid() != 0:
        return "slurmd runs jobs as their users and must start as root; these tests run as root only"
    return ""


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


SLURM_CONF = """\
# written by tests/slurm_cluster.py: one node, this machine
ClusterName=mmtrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s, least 5)
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# what is sent at a requeue, a preemption or a cancel: TERM, then KILL this much later
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
# a GPU partition as on the clusters mmtrain is for: configured, never up (no slurmd listens on
# its port), so that sbatch and sinfo judge requests for it as they would there
GresTypes=gpu
NodeName={gpu_nodes} NodeAddr=127.0.0.1 Port={dead_port} CPUs=96 RealMemory=1000000 Gres=gpu:8 Feature=a100 State=DOWN
PartitionName={gpu_partition} Nodes={gpu_nodes} MaxTime=INFINITE State=UP
"""
GRES_CONF = "NodeName={gpu_nodes} Name=gpu Count=8\n"


@dataclass
class SlurmCluster:
    root: Path
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    procs: list = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self) -> dict[str, str]:
        """What a client of this cluster needs on top of ``os.environ``."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run(list(args), env={**os.environ, **self.env()}, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def start(self, timeout: float = 60) -> "SlurmCluster":
        (self.root / "munge").mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(exist_ok=True)
        (self.root / "spool").mkdir(exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        self._spawn([_daemon("munged"), "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                     f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/munge/munged.log",
                     f"--seed-file={self.root}/munge/munged.seed", "--foreground"], "munged")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        self.conf.write_text(SLURM_CONF.format(host=self.host, root=self.root, munge_socket=self.munge_socket,
                                               ctld_port=free_port(), slurmd_port=free_port(), cpus=self.cpus,
                                               partition=PARTITION, gpu_partition=GPU_PARTITION, gpu_nodes=GPU_NODES,
                                               dead_port=free_port()))
        (self.root / "gres.conf").write_text(GRES_CONF.format(gpu_nodes=GPU_NODES))
        self._spawn([_daemon("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld")
        self._spawn([_daemon("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd")
        self._wait(self._node_idle, timeout, f"node {self.host} to be idle")
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.stdout", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env()},
                                start_new_session=True)
        self.procs.append((name, proc))

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%T", check=False)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, condition, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while not condition():
            dead = [name for name, p in self.procs if p.poll() is not None]
            if dead or time.time() > end:
                raise RuntimeError(f"Slurm did not start: waiting for {what}; "
                                   f"{'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 30) -> str:
        parts = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout",
                     "slurmd.stdout"):
            path = self.root / name
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons (slurmd first, munged last)."""
        if any(p.poll() is None for name, p in self.procs if name == "slurmctld"):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--full", *jobs, check=False)
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()

    # ------------------------------------------------------------------ job helpers

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        for item in out.stdout.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return ""
