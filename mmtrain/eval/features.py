"""Image feature extractors for FID / sFID / IS / KID / precision-recall.

An extractor maps uint8 images (N, 3, H, W) to three feature sets:

* ``pool``: the FID / KID / precision-recall features (Inception pool_3, 2048);
* ``logits``: class logits for the Inception Score (Inception's 1008 unbiased logits);
* ``spatial``: the sFID features of ADM's evaluator (first 7 channels of ``mixed_6/conv``,
  17x17, flattened channels-last: 2023).

``inception`` is torch-fidelity's port of the TF 2015-12-05 FID Inception, loaded from a local
file. ``tiny_random`` is a seeded random conv net for tests and smoke runs: it measures
distances between image sets, but its numbers are not comparable to published FIDs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class MetricUnavailable(Exception):
    """A metric cannot run here (weights not found, ...); the message says why and where it looked."""


class InceptionFeatures(nn.Module):
    def __init__(self, weights: Path):
        super().__init__()
        if not weights.is_file():
            raise MetricUnavailable(f"Inception weights not found at {weights} (set eval.inception_weights, "
                                    f"or put torch-fidelity's {weights.name} there)")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
        self._spatial: torch.Tensor | None = None
        # TF graph block mixed_6 is Mixed_6d here; its first op ``conv`` is the 1x1 branch
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        stat = weights.stat()
        self.id = f"inception-v3-compat:{weights.name}:{stat.st_size}"

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images)  # N, 2048 / N, 1008
        spatial = self._spatial[:, :7].permute(0, 2, 3, 1).flatten(1)  # N, 17*17*7
        return {"pool": pool.float(), "logits": logits.float(), "spatial": spatial.float()}


class TinyRandomFeatures(nn.Module):
    """Two random conv layers at 64x64: pool 256 (64 channels averaged per image quadrant, so
    layout counts), logits 10, spatial 8x8x4 = 256."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 32, 4, stride=4)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.head = nn.Linear(256, 10)
        with torch.no_grad():
            for p in self.parameters():  # He init: unit-scale features whatever the depth
                p.copy_(torch.randn(p.shape, generator=gen) * ((2.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
        self.id = f"tiny_random:{seed}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(images.float(), size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 128) / 128  # N, 3, 64, 64
        h = F.relu(self.conv1(x))  # N, 32, 16, 16
        s = F.relu(self.conv2(h))  # N, 64, 8, 8
        pool = F.adaptive_avg_pool2d(s, 2).flatten(1)  # N, 256
        return {"pool": pool, "logits": 10 * self.head(pool), "spatial": s[:, :4].permute(0, 2, 3, 1).flatten(1)}


def build_feature_extractor(kind: str, inception_weights: Path, device: torch.device | str = "cpu") -> nn.Module:
    """Raises :class:`MetricUnavailable` when the weights are not there."""
    if kind == "tiny_random":
        net = TinyRandomFeatures()
    elif kind == "inception":
        net = InceptionFeatures(Path(inception_weights))
    else:
        raise ValueError(f"eval.feature_extractor={kind!r}: expected inception or tiny_random")
    return net.to(device).eval()


def images_to_uint8(images) -> torch.Tensor:
    """PIL images (same size) or a uint8 (N, H, W, 3) array -> (N, 3, H, W) uint8."""
    import numpy as np

    array = images if isinstance(images, np.ndarray) else np.stack([np.asarray(im.convert("RGB")) for im in images])
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {array.dtype} {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def extract_features(net: nn.Module, images, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Features of PIL images or a uint8 (N, H, W, 3) array, batched on the extractor's device, returned on CPU."""
    device = next(net.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch_size):
        out = net(images_to_uint8(images[i:i + batch_size]).to(device))
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}
