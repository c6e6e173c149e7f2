"""The ``eval`` section of a run config: what ``mmtrain eval caption`` / ``eval generate`` measure."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mmtrain.errors import ConfigError

FEATURE_EXTRACTORS = ("inception", "tiny_random")
GENERATION_METRICS = ("fid", "isc", "kid", "prc", "clip")
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF FID Inception


def weights_dir() -> Path:
    """Where metric weights are looked for when no path is configured: ``$MMTRAIN_WEIGHTS``
    or ``~/.cache/mmtrain/weights``."""
    return Path(os.environ.get("MMTRAIN_WEIGHTS") or Path.home() / ".cache" / "mmtrain" / "weights")


@dataclass
class EvalConfig:
    """Evaluation settings; every key can be set in YAML or as ``eval.key=value``.

    Args:
        shards: eval source, webdataset or MDS (prompts, references, images to caption).
            Default ``""`` = the run's ``data.val_shards``.
        num_samples: samples taken, in order, from ``shards``: images captioned, prompts
            generated per sweep setting. Default 1000.
        batch_size: images per generation / caption batch on one rank. A batch is the unit
            split across ranks and seeded by its index, so results do not depend on the
            number of ranks. Default 16.
        cfg_scales: CFG scales swept by ``eval generate``. Default ``[]`` = ``sample.cfg_scale``.
        ar_steps: AR step counts swept by ``eval generate``. Default ``[]`` = ``sample.ar_steps``.
        metrics: generation metrics to compute among fid (with sFID), isc, kid, prc (precision/recall)
            and clip. Default all five. Attribute accuracy is always computed on synthetic data.
        feature_extractor: ``inception`` (torch-fidelity's port of the TF FID Inception, needs
            ``inception_weights``) or ``tiny_random`` (a seeded random conv net: a smoke test of
            the pipeline, its FID is not comparable to published numbers). Default ``inception``.
        inception_weights: local Inception weights file. Default ``""`` =
            ``$MMTRAIN_WEIGHTS/weights-inception-2015-12-05-6726825d.pth`` (``~/.cache/mmtrain/weights``).
        clip_model: open_clip architecture name. Default ``ViT-B-32``.
        clip_weights: local open_clip checkpoint of ``clip_model``. Default ``""`` =
            ``$MMTRAIN_WEIGHTS/open_clip_<clip_model>.bin``.
        clip_model_config: JSON file of an architecture open_clip does not ship (its name is the
            file stem and must equal ``clip_model``). Default ``""``.
        ref_stats: reference statistics file (ADM reference-batch ``.npz``: ``mu``, ``sigma``,
            ``mu_s``, ``sigma_s``, ``arr_0``). Read when it exists, else computed from ``shards``
            and written there. Default ``""`` = a file in ``stats_cache`` named by a hash of the
            shard files, image size, reference count and feature extractor.
        ref_images: reference images read from ``shards`` for the statistics. Default 0 = ``num_samples``.
        stats_cache: folder of computed reference statistics. Default ``""`` = ``~/.cache/mmtrain/ref_stats``.
        kid_subset_size: KID subset size, capped at the smaller set. Default 1000.
        kid_subsets: KID subsets. Default 100.
        isc_splits: Inception Score splits, capped at the number of samples. Default 10.
        prc_neighborhood: k of the k-NN balls of precision/recall. Default 3.
        report_images: images per setting (and caption examples) shown in the HTML report. Default 32.
        save_samples: also write every generated image as ``samples.npz`` (ADM sample-batch
            format, ``arr_0`` uint8 NHWC) per setting. Default false.
    """

    shards: str = ""
    num_samples: int = 1000
    batch_size: int = 16
    cfg_scales: list[float] = field(default_factory=list)
    ar_steps: list[int] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: list(GENERATION_METRICS))
    feature_extractor: str = "inception"
    inception_weights: str = ""
    clip_model: str = "ViT-B-32"
    clip_weights: str = ""
    clip_model_config: str = ""
    ref_stats: str = ""
    ref_images: int = 0
    stats_cache: str = ""
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    isc_splits: int = 10
    prc_neighborhood: int = 3
    report_images: int = 32
    save_samples: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise ConfigError(f"eval.num_samples and eval.batch_size must be >= 1, got {self.num_samples}, {self.batch_size}")
        if self.feature_extractor not in FEATURE_EXTRACTORS:
            raise ConfigError(f"eval.feature_extractor: expected one of {FEATURE_EXTRACTORS}, got {self.feature_extractor!r}")
        unknown = [m for m in self.metrics if m not in GENERATION_METRICS]
        if unknown:
            raise ConfigError(f"eval.metrics: unknown {unknown}; expected some of {list(GENERATION_METRICS)}")
        if any(s < 1 for s in self.ar_steps):
            raise ConfigError(f"eval.ar_steps: every AR step count must be >= 1, got {self.ar_steps}")
        if self.ref_images < 0:
            raise ConfigError(f"eval.ref_images must be >= 0 (0 = num_samples), got {self.ref_images}")

    @property
    def inception_weights_path(self) -> Path:
        return Path(self.inception_weights) if self.inception_weights else weights_dir() / INCEPTION_WEIGHTS_FILE

    @property
    def clip_weights_path(self) -> Path:
        return Path(self.clip_weights) if self.clip_weights else weights_dir() / f"open_clip_{self.clip_model}.bin"

    @property
    def stats_cache_dir(self) -> Path:
        return Path(self.stats_cache) if self.stats_cache else Path.home() / ".cache" / "mmtrain" / "ref_stats"

    @property
    def num_ref_images(self) -> int:
        return self.ref_images or self.num_samples
