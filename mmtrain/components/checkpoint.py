"""DeepSpeed checkpoints of a run: save, keep-last-K, resume, and consolidated loading.

Layout: ``<run_dir>/checkpoints/step00000100/`` (DeepSpeed's sharded files plus our
``client_state``) and ``<run_dir>/checkpoints/latest`` naming the newest complete one.
``latest`` is written by rank 0 only after every rank finished writing its shards
(DeepSpeed's own ``latest`` can be written before other ranks are done), and is
replaced atomically, so a crash mid-save leaves it pointing at the previous checkpoint.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmtrain.atomic import atomic_write_text


@dataclass
class CheckpointConfig:
    """When to checkpoint and what to keep.

    Args:
        every_steps: save every N optimizer steps (and always at the end). Default 100.
        keep_last: complete checkpoints kept; older ones are deleted. Default 3.
    """

    every_steps: int = 100
    keep_last: int = 3

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint's tag, or None for a fresh run."""
    path = checkpoint_root(run_dir) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (checkpoint_root(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {tag!r}, but {checkpoint_root(run_dir) / tag} is missing")
    return tag


def save(engine, run_dir: str | os.PathLike, step: int, state: dict, keep_last: int) -> str:
    """Collective: every rank must call it. ``state`` is stored under the ``mmtrain`` key."""
    root = checkpoint_root(run_dir)
    tag = tag_for_step(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"mmtrain": state}, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(root / "latest", tag)
        _prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)


def resume(engine, run_dir: str | os.PathLike) -> dict | None:
    """Load the latest checkpoint into the engine (model, optimizer, scheduler).

    Returns our client state (the dict saved under the ``mmtrain`` key) or None.
    """
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(checkpoint_root(run_dir)), tag=tag)
    if client_state is None:
        raise RuntimeError(f"failed to load checkpoint {checkpoint_root(run_dir) / tag}")
    return client_state["mmtrain"]


def load_model_state(run_dir: str | os.PathLike, tag: str | None = None) -> tuple[dict, dict]:
    """Consolidated fp32 model state dict and client_state, on one process, no DeepSpeed init.

    Works for ZeRO-3 (gathers the per-rank shards) and ZeRO-0/1/2 (full module state).
    """
    root = checkpoint_root(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {root} (expected a 'latest' file; has the run trained and saved?)")
    ckpt_dir = root / tag
    zero3_files = sorted(ckpt_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    plain_files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    if zero3_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        meta = torch.load(zero3_files[0], map_location="cpu", weights_only=False)
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    elif plain_files:
        meta = torch.load(plain_files[0], map_location="cpu", weights_only=False)
        state = {k: v.float() for k, v in meta["module"].items()}
    else:
        raise FileNotFoundError(f"{ckpt_dir}: no DeepSpeed *model_states.pt file")
    if "mmtrain" not in meta:
        raise ValueError(f"{ckpt_dir}: not an mmtrain checkpoint (no 'mmtrain' client state)")
    return state, meta["mmtrain"]
