"""An image tokenizer's latent scale (and shift) measured on shard images: ``mmtrain tokenizer estimate-scale``."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from mmtrain.atomic import atomic_write_text
from mmtrain.data.sources import iter_samples
from mmtrain.errors import ConfigError
from mmtrain.schema import build_dataclass
from mmtrain.tokenize.build import build_image_tokenizer
from mmtrain.tokenize.image import ImageTokenizerConfig, pil_to_tensor
from mmtrain.tokenize.vae import estimate_scale_factor

BATCH_SIZE = 32  # images encoded at once


def shard_image_batches(shards: str, num: int, image_size: int, batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
    """The first ``num`` images of ``shards`` (any source :func:`mmtrain.data.sources.open_source` reads) as
    ``B, 3, H, W`` batches in [-1, 1]: the pixels training sees, decoded and made square as the loader
    does (centre crop)."""
    samples = itertools.islice(iter_samples(shards, image_size=image_size), num)
    while chunk := list(itertools.islice(samples, batch_size)):
        yield pil_to_tensor([s["image"] for s in chunk])


def estimate_scale_on_shards(tokenizer_yaml: str | Path, shards: str, num: int = 1024, image_size: int = 256,
                             with_shift: bool = False, write: str | Path | None = None) -> dict[str, float]:
    """:func:`mmtrain.tokenize.vae.estimate_scale_factor` of the tokenizer ``tokenizer_yaml`` describes
    (its own scale and shift ignored) on ``num`` images of ``shards`` at ``image_size``.

    ``write``: also write a copy of the YAML with the measured ``scale_factor`` / ``shift_factor`` there."""
    with open(tokenizer_yaml) as fh:
        tree = yaml.safe_load(fh) or {}
    try:
        cfg = build_dataclass(ImageTokenizerConfig, {**tree, "scale_factor": 1.0, "shift_factor": 0.0}, "")
    except ConfigError as exc:
        raise ConfigError(f"{tokenizer_yaml}: {exc}") from None
    est = estimate_scale_factor(build_image_tokenizer(cfg), shard_image_batches(shards, num, image_size), num_samples=num,
                                with_shift=with_shift)
    if write:
        atomic_write_text(write, yaml.safe_dump({**tree, "scale_factor": est["scale_factor"], "shift_factor": est["shift_factor"]},
                                                sort_keys=False))
    return est
