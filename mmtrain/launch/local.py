"""Ranks on this machine: ``python -m torch.distributed.run`` for ``mmtrain train`` and ``mmtrain eval --nproc``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from mmtrain.launch.preflight import cuda_available


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, module_args: list[str], extra_env: dict[str, str] | None = None) -> int:
    """``python -m MODULE_ARGS`` as ``nproc`` ranks on this machine, the cores shared between them; its exit code."""
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if not cuda_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", *module_args]
    return subprocess.call(cmd, env=env)
