"""Where this rank's tensors live and how ranks agree: the one module that talks to
``torch.distributed``.

Device: rank ``LOCAL_RANK`` of a node uses ``cuda:LOCAL_RANK`` when CUDA is there (and
makes it the current device, which NCCL and DeepSpeed's accelerator read), else the CPU.

Backend: NCCL when the rank's device is a GPU, gloo on CPU. NCCL reduces CUDA tensors
only, so every collective here builds its tensor on :func:`device` (a CPU tensor in an
NCCL all-reduce raises "No backend type associated with device type cpu"); the same
code runs on CPU with gloo, which is where the tests run it.

Host reads: a collective here returns a Python value, i.e. it waits for the device. The
training loop calls them once per optimizer step (finite flag, preemption) or once per
log step (metric sums, peak memory), never per micro-batch.

Every function works without a process group (one process): it then answers for that
process alone.

Before the group exists ranks agree through the run directory, a filesystem every rank sees
(in multi-node jobs a shared one, as checkpoints need): :func:`wait_for_path` waits for a
file or directory that rank 0 creates by an atomic rename, with no collective and so no
collective timeout involved (used while rank 0 converts a checkpoint, which can take longer
than any sensible ``train.dist_timeout_s``).
"""
from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("mmtrain.distributed")

_device: torch.device | None = None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made current) when CUDA is available, else ``cpu``."""
    global _device
    if _device is None:
        if torch.cuda.is_available():
            _device = torch.device("cuda", local_rank() % torch.cuda.device_count())
            torch.cuda.set_device(_device)
        else:
            _device = torch.device("cpu")
    return _device


def resolve_device(name: str | None) -> torch.device:
    """A ``--device`` argument: ``None``/``auto`` = :func:`device`; ``cuda`` = this rank's GPU;
    ``cpu``; or an explicit ``cuda:N``. Raises naming the argument when CUDA is asked for but absent."""
    if name in (None, "", "auto"):
        return device()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if name == "cuda":
            return device()
        dev = torch.device(name)
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def backend_for(dev: torch.device) -> str:
    return "nccl" if dev.type == "cuda" else "gloo"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def launched_rank() -> int:
    """This process's rank as its launcher set it (``RANK``: torchrun, ``mmtrain train --srun``,
    ``mmtrain launch``), readable before :func:`init`; 0 for a lone process."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of ranks the launcher started (``WORLD_SIZE``), readable before :func:`init`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wait_for_path(path: str | os.PathLike, timeout_s: float, what: str, poll_s: float = 1.0,
                  log_every_s: float = 60.0) -> float:
    """Block until ``path`` exists, i.e. until another rank has renamed it into place: no
    collective, so no collective timeout. Logs how long it has waited every ``log_every_s``;
    raises TimeoutError naming ``what`` (which should say which setting bounds the wait) after
    ``timeout_s``. Returns the seconds waited."""
    path = Path(path)
    t0 = time.monotonic()
    next_log = 0.0
    while True:
        waited = time.monotonic() - t0
        if path.exists():
            if waited >= log_every_s:
                log.warning("rank %d: %s is there after %.0f s", launched_rank(), path, waited)
            return waited
        if waited >= timeout_s:
            raise TimeoutError(f"rank {launched_rank()}: waited {waited:.0f} s for {what}, but {path} did not appear")
        if waited >= next_log:
            log.warning("rank %d: waiting for %s (%.0f s of at most %.0f s)", launched_rank(), what, waited, timeout_s)
            next_log += log_every_s
        time.sleep(min(poll_s, max(timeout_s - waited, 0.0)))


def init(timeout_s: int, with_deepspeed: bool = False) -> tuple[int, int, torch.device]:
    """Join the ranks the launcher started (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``):
    (rank, world size, device). ``with_deepspeed`` lets DeepSpeed create the group (it keeps
    its own handle on it). One process without those variables stays alone."""
    dev = device()
    if is_initialized():
        return rank(), world_size(), dev
    timeout = timedelta(seconds=timeout_s)
    if with_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend_for(dev), timeout=timeout)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend_for(dev), timeout=timeout,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    if (rank(), world_size()) != (launched_rank(), launched_world_size()):
        # what the ranks decided before joining (a universal conversion) assumed the launcher's numbers
        raise RuntimeError(f"the process group says rank {rank()} of {world_size()}, the launcher's RANK/WORLD_SIZE "
                           f"said {launched_rank()} of {launched_world_size()}: start the ranks with torchrun, "
                           f"`mmtrain train --srun` or `mmtrain launch`, which set both")
    return rank(), world_size(), dev


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device().index])
        else:
            dist.barrier()


def _reduce(values: torch.Tensor, op) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(values, op=op)
    return values


def all_true(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a bool tensor on this rank's device, e.g. "every loss so far was
    finite") is true on every rank. One host read."""
    return bool(_reduce(flag.detach().to(device=device(), dtype=torch.int32).reshape(1), dist.ReduceOp.MIN).item())


def sum_over_ranks(values: torch.Tensor) -> list[float]:
    """Element-wise sums over ranks of a 1-D float tensor (on any device), as Python floats."""
    return _reduce(values.detach().to(device=device(), dtype=torch.float64).clone(), dist.ReduceOp.SUM).tolist()


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maxima over ranks of a few Python numbers."""
    return _reduce(torch.tensor(values, dtype=torch.float64).to(device()), dist.ReduceOp.MAX).tolist()


def agreed_code(code: int) -> int:
    """The largest of every rank's ``code``: the same answer on every rank (preemption)."""
    return int(max_over_ranks([float(code)])[0])


def gather_objects(obj: Any) -> list | None:
    """Every rank's picklable ``obj`` on rank 0, in rank order; None on the other ranks."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def to_device(tensor: torch.Tensor | None, dev: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Copy a host tensor to ``dev`` without waiting for the device. The copy goes from pinned
    memory (pinned here if the loader did not), so it overlaps compute; a plain ``.to(cuda)``
    of pageable memory synchronizes with the stream."""
    if tensor is None:
        return None
    if dev.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    tensor = tensor.to(dev, non_blocking=True)
    return tensor if dtype is None else tensor.to(dtype)
