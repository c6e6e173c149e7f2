"""FID, sFID, IS, KID and precision/recall from image features, through torch-fidelity's own
metric functions; reference statistics in the ADM reference-batch ``.npz`` format.

A reference file holds what ADM's ``evaluator.py`` reads: ``arr_0`` (uint8 N,H,W,3 reference
images, at most :data:`ADM_REF_IMAGES`), ``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s``
(spatial features), float64. mmtrain adds ``mmtrain_pool`` (the pool features of every
reference image, for KID and precision/recall) and ``mmtrain_meta`` (JSON: extractor, count,
source). An ADM reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``) can be given as
``eval.ref_stats``: its ``mu``/``sigma`` are used as they are, and the KID / precision-recall
features are computed from its ``arr_0`` images.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ADM_REF_IMAGES = 10_000  # images ADM's reference batches carry for precision/recall


@dataclass
class ReferenceStats:
    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    pool: torch.Tensor | None  # N, D: every reference image's pool features (KID, precision/recall)
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64, as torch-fidelity and ADM compute them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features.double())
    return stats["mu"], stats["sigma"]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)[KEY_METRIC_FID]


def reference_key(shard_files: list[str], num_images: int, image_size: int, resize_mode: str, extractor_id: str) -> str:
    """Cache name of reference statistics: changes with any shard file (path, size, mtime; a URL: its size),
    the reference count, the image size and crop, and the feature extractor."""
    from mmtrain.data.storage import is_url, store_for

    parts = [f"{f}:{store_for(f).size(f)}" if is_url(f) else
             f"{os.path.abspath(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in shard_files]
    parts += [str(num_images), str(image_size), resize_mode, extractor_id]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def write_reference_stats(path: Path, images: np.ndarray, features: dict[str, torch.Tensor], meta: dict) -> ReferenceStats:
    """``images`` uint8 (N, H, W, 3) -- the first :data:`ADM_REF_IMAGES` are stored -- and their
    features (all of them) -> ``path``, written under a temporary name and renamed."""
    mu, sigma = statistics(features["pool"])
    mu_s, sigma_s = statistics(features["spatial"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, arr_0=images[:ADM_REF_IMAGES], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
                 mmtrain_pool=features["pool"].numpy().astype(np.float32), mmtrain_meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return ReferenceStats(path, mu, sigma, features["pool"], mu_s, sigma_s, meta)


def read_reference_stats(path: Path, extractor_id: str, features_of_images) -> ReferenceStats:
    """Reference statistics from ``path``: a file mmtrain wrote (its extractor must be
    ``extractor_id``) or an ADM reference batch. ``features_of_images(uint8 NHWC)`` computes
    the pool features an ADM file does not carry."""
    try:
        obj = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read reference statistics (expected an .npz file): {exc}") from None
    with obj:
        keys = set(obj.files)
        meta = json.loads(str(obj["mmtrain_meta"])) if "mmtrain_meta" in keys else {"source": "ADM reference batch"}
        if "mmtrain_meta" in keys and meta.get("extractor") != extractor_id:
            raise ValueError(f"{path}: reference statistics of feature extractor {meta.get('extractor')!r}, but this "
                             f"eval uses {extractor_id!r}; point eval.ref_stats elsewhere or delete the file")
        if "mu" not in keys or "sigma" not in keys:
            raise ValueError(f"{path}: expected keys 'mu' and 'sigma' (ADM reference-batch format), found {sorted(keys)}")
        mu, sigma = obj["mu"].astype(np.float64), obj["sigma"].astype(np.float64)
        mu_s = obj["mu_s"].astype(np.float64) if "mu_s" in keys else None
        sigma_s = obj["sigma_s"].astype(np.float64) if "sigma_s" in keys else None
        if "mmtrain_pool" in keys:
            pool = torch.from_numpy(obj["mmtrain_pool"])
        elif "arr_0" in keys:
            pool = features_of_images(obj["arr_0"])
        else:
            pool = None
    if pool is not None and pool.shape[1] != mu.shape[0]:
        raise ValueError(f"{path}: its statistics have {mu.shape[0]} features but the extractor gives {pool.shape[1]}; "
                         f"they come from another feature extractor")
    return ReferenceStats(path, mu, sigma, pool, mu_s, sigma_s, meta)


def fidelity_metrics(generated: dict[str, torch.Tensor], ref: ReferenceStats, metrics: list[str], *,
                     kid_subset_size: int = 1000, kid_subsets: int = 100, isc_splits: int = 10,
                     prc_neighborhood: int = 3, seed: int = 2020) -> tuple[dict[str, float], dict[str, str]]:
    """Generated-image features -> (values, unavailable). ``metrics`` among fid, isc, kid, prc;
    fid brings sFID when both sides have spatial statistics."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    values: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    pool = generated["pool"]
    n = len(pool)
    if "fid" in metrics:
        if n < 2:
            unavailable["fid"] = f"FID needs at least 2 generated images, got {n}"
        else:
            values["fid"] = frechet_distance(*statistics(pool), ref.mu, ref.sigma)
            if ref.mu_s is not None and "spatial" in generated and generated["spatial"].shape[1] == ref.mu_s.shape[0]:
                values["sfid"] = frechet_distance(*statistics(generated["spatial"]), ref.mu_s, ref.sigma_s)
    if "isc" in metrics:
        out = isc_features_to_metric(generated["logits"], splits=max(1, min(isc_splits, n)), shuffle=True, rng_seed=seed)
        values["isc_mean"], values["isc_std"] = out["inception_score_mean"], out["inception_score_std"]
    for name in ("kid", "prc"):
        if name not in metrics:
            continue
        if ref.pool is None:
            unavailable[name] = f"{ref.path} holds no reference features or images (needs 'arr_0' or 'mmtrain_pool')"
            continue
        if name == "kid":
            size = min(kid_subset_size, n, len(ref.pool))
            out = kid_features_to_metric(pool, ref.pool, kid_subset_size=size, kid_subsets=kid_subsets, rng_seed=seed, verbose=False)
            values["kid_mean"], values["kid_std"] = out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]
        else:
            k = min(prc_neighborhood, n - 1, len(ref.pool) - 1)
            out = prc_features_to_metric(pool, ref.pool, prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
            values["precision"], values["recall"] = out["precision"], out["recall"]
    return values, unavailable
