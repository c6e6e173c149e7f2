"""Exponential moving average of the weights, sharded like ZeRO-3 at every ZeRO stage.

Each rank keeps an fp32 EMA of only its own slice of every parameter: the flattened
parameter cut into ``world_size`` contiguous pieces of ``ceil(numel / world_size)``
elements, rank r owning piece r. That is exactly ZeRO-3's partition (``p.ds_tensor``),
so under ZeRO-3 the update reads the local partition and never gathers a parameter;
under ZeRO-0/1/2 the same slice is cut from the full parameter. EMA memory per rank is
therefore ``4 * n_params / world_size`` bytes at every stage.

Shards are saved per rank into the checkpoint directory (``ema/rank00000.safetensors``)
with their world size, and :func:`consolidate` puts them back together on one process,
so a resume with another world size re-slices them and export needs no DeepSpeed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EMA_DIR = "ema"


@dataclass
class EMAConfig:
    """EMA of the weights.

    Args:
        decay: per-optimizer-step decay; 0 turns the EMA off. Default 0.9999 (CausalFusion / MAR).
        warmup: use ``min(decay, (1 + step) / (10 + step))`` so an early EMA is not
            dominated by the random initialisation. Default false (the papers' constant decay).
    """

    decay: float = 0.9999
    warmup: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay: expected 0 <= decay < 1 (0 = off), got {self.decay}")

    @property
    def enabled(self) -> bool:
        return self.decay > 0


def shard_bounds(numel: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, stop, shard_size) of rank's slice of a flattened parameter; the last slices may be short or empty."""
    size = math.ceil(numel / world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel), size


def local_shard(param: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice of ``param`` (padded to the shard size), as a view where possible."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3: the partition DeepSpeed keeps on this rank
        local = param.ds_tensor.view(-1)
        if local.dtype != torch.float32 and param.requires_grad:
            # bf16 training: average the optimizer's fp32 master partition, not its bf16 rounding
            from deepspeed.utils import safe_get_local_fp32_param

            master = safe_get_local_fp32_param(param).view(-1)
            return master if master.numel() == local.numel() else torch.cat([master, master.new_zeros(local.numel() - master.numel())])
        return local
    start, stop, size = shard_bounds(param.numel(), rank, world_size)
    flat = param.detach().view(-1)[start:stop]
    return flat if stop - start == size else torch.cat([flat, flat.new_zeros(size - (stop - start))])


def _numel(param: torch.Tensor) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


class ShardedEMA:
    """The EMA shards of one rank. ``module`` is the (possibly ZeRO-3 partitioned) model."""

    def __init__(self, module: torch.nn.Module, cfg: EMAConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.params = {name: p for name, p in module.named_parameters()}
        self.shapes = {name: _shape(p) for name, p in self.params.items()}
        self.shards = {name: local_shard(p, rank, world_size).detach().float().clone() for name, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        return min(self.cfg.decay, (1 + step) / (10 + step)) if self.cfg.warmup else self.cfg.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after each optimizer step; ``step`` counts optimizer steps done before this one."""
        d = self.decay_at(step)
        for name, p in self.params.items():
            self.shards[name].lerp_(local_shard(p, self.rank, self.world_size).float(), 1.0 - d)

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        """Each rank writes its own file; the caller's barrier makes the set complete."""
        out = Path(ckpt_dir) / EMA_DIR
        out.mkdir(parents=True, exist_ok=True)
        meta = {"world_size": str(self.world_size), "rank": str(self.rank), "shapes": json.dumps(self.shapes)}
        tmp = out / f".rank{self.rank:05d}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.shards.items()}, str(tmp), metadata=meta)
        os.replace(tmp, out / f"rank{self.rank:05d}.safetensors")

    def load(self, ckpt_dir: str | os.PathLike) -> None:
        """Re-slice the saved EMA for this rank, whatever world size saved it."""
        full = consolidate(ckpt_dir)
        missing = sorted(set(self.shards) - set(full))
        if missing:
            raise ValueError(f"{Path(ckpt_dir) / EMA_DIR}: EMA has no entry for parameters {missing[:5]}")
        for name, shard in self.shards.items():
            start, stop, _ = shard_bounds(full[name].numel(), self.rank, self.world_size)
            shard.zero_()
            shard[: stop - start] = full[name].view(-1)[start:stop]


def has_ema(ckpt_dir: str | os.PathLike) -> bool:
    return (Path(ckpt_dir) / EMA_DIR).is_dir()


def consolidate(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 EMA state dict from the per-rank shards of one checkpoint."""
    folder = Path(ckpt_dir) / EMA_DIR
    files = sorted(folder.glob("rank*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no EMA shards (was the run trained with ema.decay=0?)")
    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    world_size, shapes = int(meta["world_size"]), json.loads(meta["shapes"])
    if len(files) != world_size:
        raise FileNotFoundError(f"{folder}: {len(files)} EMA shard files, but the run had {world_size} ranks")
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in shapes:
                pieces[name].append(f.get_tensor(name))
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        out[name] = torch.cat(pieces[name])[:numel].view(shape).clone()
    return out
