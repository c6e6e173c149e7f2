"""Training data: webdataset shards streamed, decoded and batched per rank.

Each rank (and each dataloader worker) draws shards with replacement from its own
deterministic RNG stream, so ranks never need to agree on an epoch boundary and a
restart can start a fresh stream (seeded with the resume step) instead of replaying
the samples it already saw.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from mmtrain.data.shards import decode_sample, list_shards
from mmtrain.tokenize.image import pil_to_tensor


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed.

    Args:
        train_shards: directory of ``*.tar`` shards, one ``.tar`` or a brace pattern.
            Default ``data/synthetic/train``.
        val_shards: the same for evaluation. Default ``data/synthetic/val``.
        image_size: images are resized to this square size. Default 32.
        shuffle_buffer: samples held for in-stream shuffling. Default 500.
        num_workers: dataloader worker processes per rank (0 = in-process). Default 1.
    """

    train_shards: str = "data/synthetic/train"
    val_shards: str = "data/synthetic/val"
    image_size: int = 32
    shuffle_buffer: int = 500
    num_workers: int = 1


def _to_training_example(sample: dict, image_size: int) -> tuple[torch.Tensor, str, int]:
    image = sample["image"]
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), resample=3)  # bicubic
    label = sample.get("label")
    return pil_to_tensor([image])[0], sample["caption"], -1 if label is None else label  # 3, H, W in [-1, 1]


def _collate(batch: list) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    images, captions, labels = zip(*batch)
    return torch.stack(images), list(captions), torch.tensor(labels, dtype=torch.long)


def _worker_seed(base: int) -> int:
    info = get_worker_info()
    return base * 1009 + (info.id if info is not None else 0)


class _SeededShards(wds.ResampledShards):
    """Resampled shards whose RNG depends only on (seed, rank, worker)."""

    def __init__(self, urls: list[str], seed: int):
        super().__init__(urls, seed=seed, deterministic=True, worker_seed=lambda: _worker_seed(0))


def build_train_loader(cfg: DataConfig, micro_batch_size: int, rank: int, seed: int, resume_step: int) -> DataLoader:
    """An endless loader of (images B,3,H,W in [-1,1], captions, labels B; -1 = none) for this rank."""
    urls = list_shards(cfg.train_shards)
    stream_seed = (seed * 1_000_003 + rank) * 1_000_003 + resume_step
    pipeline = wds.DataPipeline(
        _SeededShards(urls, seed=stream_seed),
        wds.tarfile_to_samples(),
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 100), rng=random.Random(stream_seed)),
        wds.map(decode_sample),
        wds.map(lambda s: _to_training_example(s, cfg.image_size)),
    )
    return DataLoader(pipeline, batch_size=micro_batch_size, num_workers=cfg.num_workers, collate_fn=_collate,
                      persistent_workers=cfg.num_workers > 0)
