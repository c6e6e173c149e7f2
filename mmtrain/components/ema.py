"""Exponential moving average of the weights, sharded across ranks at every ZeRO stage,
and always of the fp32 weights the optimizer updates.

Each rank keeps an fp32 EMA of only its own contiguous slice of every (flattened)
parameter, and takes that slice from where the fp32 values live, so an update reads
local memory and never gathers a parameter:

- ZeRO-3: the rank's partition (``p.ds_tensor``: ``ceil(numel / world_size)`` elements from
  ``rank * ceil(numel / world_size)``); in bf16 the optimizer's fp32 master of it.
- ZeRO-1/2, and DeepSpeed's bf16 optimizer at ZeRO-0: the fragment of the parameter that
  this rank's fp32 master partition holds (``p._hp_mapping``); a parameter split across
  two ranks' partitions has a piece on each, one held wholly elsewhere none here.
- bf16 at ZeRO-0 (DeepSpeed's unfused mixed-precision optimizer, which keeps one full fp32
  copy of each parameter on every rank): slice ``rank`` of ``world_size`` equal pieces of
  that fp32 copy.
- otherwise (fp32 ZeRO-0, frozen parameters): the same slice of the module's own weights,
  which then are the fp32 values (frozen ones are never updated).

So EMA memory per rank is about ``4 * n_params / world_size`` bytes at every stage, on the
device of the fp32 values it follows (with optimizer offload, the CPU). Shards are saved per
rank into the checkpoint directory (``ema/rank00000.safetensors``) with the start of each
slice. A resume on the same world size reads only the rank's own file; otherwise
:func:`consolidate` puts the shards back together and each rank re-slices them (export uses
it too, without DeepSpeed).

Per optimizer step the update is one ``torch._foreach_lerp_`` per device over views of those
fp32 values, resolved once at the first update. That holds because DeepSpeed 0.19 updates
its fp32 partitions in place, and loads checkpoints (also universal ones) into them with
``.data.copy_``: ZeRO-3's ``fp32_partitioned_groups_flat``, ZeRO-1/2's
``single_partition_of_fp32_groups``, the BF16 optimizer's ``fp32_groups_flat_partition`` and
ZeRO-0's ``fp32_groups``. (``offload_states``/``reload_states`` would move them; mmtrain
does not call them. NVMe offload, which swaps partitions out, is not offered.)
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

from mmtrain.errors import ConfigError

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
            raise ConfigError(f"ema.decay: expected 0 <= decay < 1 (0 = off), got {self.decay}")

    @property
    def enabled(self) -> bool:
        return self.decay > 0


def shard_bounds(numel: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, stop, shard_size) of rank's slice of a flattened parameter; the last slices may be short or empty."""
    size = math.ceil(numel / world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel), size


def fp32_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(low-precision parameter) -> its fp32 master, for DeepSpeed's ZeRO-0 mixed-precision
    optimizer (parallel ``fp16_groups`` / ``fp32_groups`` lists, also used for bf16); empty
    for any other optimizer (ZeRO-1/2/3 link their masters to the parameters themselves)."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list):
        return {}
    return {id(lp): hp for lp_group, hp_group in zip(low, high) for lp, hp in zip(lp_group, hp_group)
            if isinstance(hp, torch.Tensor) and hp.shape == lp.shape and lp.dtype != torch.float32}


def local_slice(param: torch.Tensor, rank: int, world_size: int, master: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
    """(start, values): this rank's slice of the flattened ``param``, ``values`` a view of the
    fp32 copy the optimizer updates wherever DeepSpeed keeps one (see the module docstring);
    ``master``: that copy when it is a full tensor of its own (ZeRO-0, see :func:`fp32_masters`)."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3: the partition DeepSpeed keeps on this rank
        start, stop, _ = shard_bounds(param.ds_numel, rank, world_size)
        local = param.ds_tensor.view(-1)
        optimizer = getattr(param, "_z3_optimizer", None)
        if param.requires_grad and optimizer is not None:
            # the optimizer's fp32 partition itself (in fp32 without offload: the same memory as
            # ds_tensor). DeepSpeed's safe_get_local_fp32_param returns this view .to() the
            # accelerator, which under optimizer offload is a fresh copy each call, not a view.
            local, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        return start, local[: stop - start]
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 or the bf16 optimizer: this rank's fp32 master fragment
        mapping = param._hp_mapping
        if mapping is None:  # the parameter lies wholly in other ranks' partitions
            return 0, torch.zeros(0, device=param.device)
        return mapping.lp_fragment_address.start, mapping.hp_fragment.view(-1)
    start, stop, _ = shard_bounds(param.numel(), rank, world_size)
    return start, (master if master is not None else param).detach().view(-1)[start:stop]


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


class ShardedEMA:
    """The EMA shards of one rank. ``module`` is the (possibly ZeRO-3 partitioned) model."""

    def __init__(self, module: torch.nn.Module, cfg: EMAConfig, rank: int, world_size: int, optimizer=None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.params = {name: p for name, p in module.named_parameters()}
        masters = fp32_masters(optimizer)
        self.masters = {name: masters[id(p)] for name, p in self.params.items() if id(p) in masters}
        self.shapes = {name: _shape(p) for name, p in self.params.items()}
        self.starts: dict[str, int] = {}
        self.shards: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            self.starts[name], values = local_slice(p, rank, world_size, self.masters.get(name))
            self.shards[name] = values.detach().float().clone()
        # (shards, fp32 sources) per (device, source dtype), built at the first update: after any checkpoint load
        self._update_groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    def decay_at(self, step: int) -> float:
        return min(self.cfg.decay, (1 + step) / (10 + step)) if self.cfg.warmup else self.cfg.decay

    def _resolve_sources(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Views of the values each shard follows, grouped for ``_foreach_lerp_`` (one device
        and dtype per call). Empty slices (a parameter wholly in other ranks' partitions) are left out."""
        groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for name, p in self.params.items():
            start, source = local_slice(p, self.rank, self.world_size, self.masters.get(name))
            shard = self.shards[name]
            if start != self.starts[name] or source.numel() != shard.numel():
                raise RuntimeError(f"EMA of {name}: the optimizer's slice moved (start {self.starts[name]} -> {start}, "
                                   f"{shard.numel()} -> {source.numel()} elements) after the EMA was built")
            if shard.numel():
                shards, sources = groups.setdefault((source.device, source.dtype), ([], []))
                shards.append(shard)
                sources.append(source.detach())
        for (device, _), (shards, _) in groups.items():
            if any(s.device != device for s in shards):
                raise RuntimeError(f"EMA shards are not on {device}, the device of the weights they follow")
        return list(groups.values())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after each optimizer step; ``step`` counts optimizer steps done before this one."""
        if self._update_groups is None:
            self._update_groups = self._resolve_sources()
        weight = 1.0 - self.decay_at(step)
        for shards, sources in self._update_groups:
            if sources[0].dtype != torch.float32:  # frozen low-precision weights (no fp32 copy exists)
                sources = [s.float() for s in sources]
            torch._foreach_lerp_(shards, sources, weight)

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        """Each rank writes its own file; the caller's barrier makes the set complete."""
        out = Path(ckpt_dir) / EMA_DIR
        out.mkdir(parents=True, exist_ok=True)
        meta = {"world_size": str(self.world_size), "rank": str(self.rank), "shapes": json.dumps(self.shapes),
                "starts": json.dumps(self.starts)}
        tmp = out / f".rank{self.rank:05d}.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.shards.items()}, str(tmp), metadata=meta)
        os.replace(tmp, out / f"rank{self.rank:05d}.safetensors")

    def load(self, ckpt_dir: str | os.PathLike) -> None:
        """This rank's own shard file when it holds exactly this rank's slices (same world size,
        same slice starts); otherwise re-slice the consolidated EMA, whatever world size saved it."""
        if self._load_own_shard(Path(ckpt_dir) / EMA_DIR / f"rank{self.rank:05d}.safetensors"):
            return
        full = consolidate(ckpt_dir)
        missing = sorted(set(self.shards) - set(full))
        if missing:
            raise ValueError(f"{Path(ckpt_dir) / EMA_DIR}: EMA has no entry for parameters {missing[:5]}")
        for name, shard in self.shards.items():
            start = self.starts[name]
            shard.copy_(full[name].view(-1)[start:start + shard.numel()])

    def _load_own_shard(self, file: Path) -> bool:
        if not file.is_file():
            return False
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
            same_slices = (int(meta["world_size"]) == self.world_size and int(meta["rank"]) == self.rank
                           and "starts" in meta and json.loads(meta["starts"]) == self.starts
                           and json.loads(meta["shapes"]) == {k: list(v) for k, v in self.shapes.items()})
            if not same_slices or any(f.get_slice(name).get_shape() != [shard.numel()] for name, shard in self.shards.items()):
                return False
            for name, shard in self.shards.items():
                shard.copy_(f.get_tensor(name))
        return True


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
    out = {name: torch.zeros(math.prod(shape)) for name, shape in shapes.items()}
    covered = {name: torch.zeros(math.prod(shape), dtype=torch.int32) for name, shape in shapes.items()}
    for rank, file in enumerate(files):
        with safe_open(str(file), "pt") as f:
            file_meta = f.metadata()
            # shards written before slices had recorded starts: rank r holds piece r of equal pieces
            starts = json.loads(file_meta["starts"]) if "starts" in file_meta else None
            for name, shape in shapes.items():
                piece = f.get_tensor(name).float()
                start = starts[name] if starts is not None else shard_bounds(math.prod(shape), rank, world_size)[0]
                n = min(piece.numel(), out[name].numel() - start)
                out[name][start:start + n] = piece[:n]
                covered[name][start:start + n] += 1
    for name, count in covered.items():
        if not bool((count == 1).all()):
            raise ValueError(f"{folder}: the EMA shards cover parameter {name} {'partly' if bool((count == 0).any()) else 'twice'}; "
                             f"the shard files do not belong to one checkpoint")
    return {name: out[name].view(shapes[name]) for name in shapes}
