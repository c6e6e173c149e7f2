"""Train a small KL autoencoder on the user's shards, for people without a pretrained VAE.

Loss = mean squared reconstruction error + ``kl_weight`` * KL(posterior || N(0, I)) and,
when local VGG-16 weights are given, ``perceptual_weight`` * a VGG feature distance (the
LPIPS idea without its learned linear heads); the LDM recipe's adversarial term is left out.
Nothing is downloaded: without ``perceptual_weights`` there is no perceptual term. The result is a diffusers
``AutoencoderKL`` folder plus a tokenizer YAML pointing at it, with the latent scale
measured on the training images: ``tokenizer.image=OUT/tokenizer.yaml`` trains on it and
``mmtrain prep latents --tokenizer OUT/tokenizer.yaml`` precomputes its latents.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

log = logging.getLogger("mmtrain.tokenize")


@dataclass
class VAETrainConfig:
    """Small-VAE training.

    Args:
        arch: diffusers ``AutoencoderKL`` kwargs. Default: the ``tokenizers/small_vae.yaml``
            architecture (3 levels of 32/64/64 channels, 4 latent channels, downsample 4).
        image_size: training images are resized to this square size. Default 32.
        steps: optimizer steps. Default 300.
        batch_size: images per step. Default 32.
        lr: AdamW learning rate. Default 1e-3.
        kl_weight: weight of the KL term (LDM uses 1e-6). Default 1e-6.
        seed: initial weights and data order. Default 0.
        num_scale_samples: images used to measure the latent scale at the end. Default 512.
        perceptual_weights: a local torchvision ``vgg16`` state_dict (``.pth``); "" = no
            perceptual term. Default "".
        perceptual_weight: weight of the VGG feature distance. Default 1.0.
    """

    arch: dict = field(default_factory=lambda: {
        "block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32})
    image_size: int = 32
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    num_scale_samples: int = 512
    perceptual_weights: str = ""
    perceptual_weight: float = 1.0


class VGGFeatureDistance(torch.nn.Module):
    """Mean squared distance of unit-normalised VGG-16 features (relu1_2, relu2_2, relu3_3), frozen."""

    LAYERS = (3, 8, 15)

    def __init__(self, weights_path: str):
        super().__init__()
        from torchvision.models import vgg16

        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"perceptual_weights={weights_path}: no such file (a torchvision vgg16 state_dict)")
        net = vgg16()
        try:
            net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        except RuntimeError as exc:
            raise ValueError(f"perceptual_weights={weights_path}: not a torchvision vgg16 state_dict: {exc}") from None
        self.features = net.features[: max(self.LAYERS) + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = ((x + 1) / 2 - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(((fa - fb) ** 2).sum(1).mean() for fa, fb in zip(self._feats(a), self._feats(b)))


def _image_batches(shards: str, size: int, batch_size: int, seed: int, buffer: int = 2048):
    """Endless batches (B, 3, size, size in [-1, 1]): repeated passes over the shards through a
    seeded shuffle buffer, so memory stays bounded whatever the dataset size."""
    import random

    from mmtrain.data.sources import iter_samples
    from mmtrain.tokenize.image import pil_to_tensor

    rng = random.Random(seed)
    pool: list = []
    batch: list = []
    while True:
        seen = 0
        for sample in iter_samples(shards, image_size=size):  # center-cropped as the training loader does
            seen += 1
            pool.append(sample["image"])
            if len(pool) < buffer:
                continue
            batch.append(pool.pop(rng.randrange(len(pool))))
            if len(batch) == batch_size:
                yield pil_to_tensor(batch)
                batch = []
        if not seen:
            raise ValueError(f"{shards}: no images to train the VAE on")
        rng.shuffle(pool)
        while len(pool) > buffer // 2:  # drain half, keep the rest mixing with the next pass
            batch.append(pool.pop())
            if len(batch) == batch_size:
                yield pil_to_tensor(batch)
                batch = []


def write_tokenizer_yaml(path: str | Path, tree: dict, by: str = "`mmtrain tokenizer train-vae`") -> Path:
    """Write an image tokenizer section (:class:`~mmtrain.tokenize.image.ImageTokenizerConfig` fields) as a
    tokenizer.yaml: what ``tokenizer.image=PATH`` and ``prep latents --tokenizer PATH`` take (a relative
    ``path`` in it is read against the file's folder)."""
    from mmtrain.atomic import atomic_write_text

    atomic_write_text(path, f"# written by {by}; use as tokenizer.image=THIS_FILE (training) and --tokenizer THIS_FILE "
                            "(prep latents)\n" + yaml.safe_dump(dict(tree), sort_keys=False))
    return Path(path)


def train_vae(shards: str, out_dir: str | Path, cfg: VAETrainConfig, progress: bool = True) -> dict:
    """Train, save ``out_dir/vae`` (diffusers) and ``out_dir/tokenizer.yaml``; returns the final figures."""
    from diffusers import AutoencoderKL

    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.image import ImageTokenizerConfig
    from mmtrain.tokenize.vae import estimate_scale_factor

    # built before the seed: VGG's own initialisation draws random numbers, and the VAE's
    # initialisation and posterior samples must not depend on whether the term is on
    perceptual = VGGFeatureDistance(cfg.perceptual_weights) if cfg.perceptual_weights else None
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**cfg.arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    batches = _image_batches(shards, cfg.image_size, cfg.batch_size, cfg.seed)
    start, recent = time.perf_counter(), []
    bar = tqdm(range(cfg.steps), desc="train-vae", unit="step", disable=not progress)
    for step in bar:
        x = next(batches)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = torch.mean((recon - x) ** 2)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel value, so kl_weight does not depend on resolution
        loss = rec + cfg.kl_weight * kl
        if perceptual is not None:
            loss = loss + cfg.perceptual_weight * perceptual(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [float(rec.detach())])[-20:]
        bar.set_postfix(mse=f"{sum(recent) / len(recent):.4f}", img_per_s=f"{(step + 1) * cfg.batch_size / (time.perf_counter() - start):.0f}")
    elapsed = time.perf_counter() - start
    log.info("train-vae: %d steps in %.0f s (%.0f images/s), recent reconstruction MSE %.4f",
             cfg.steps, elapsed, cfg.steps * cfg.batch_size / elapsed, sum(recent) / len(recent))

    out_dir = Path(out_dir)
    vae.eval().save_pretrained(out_dir / "vae")
    tok_cfg = ImageTokenizerConfig(kind="vae", path=str((out_dir / "vae").resolve()))
    scale_batches = itertools.islice(_image_batches(shards, cfg.image_size, cfg.batch_size, cfg.seed + 1),
                                     max(1, cfg.num_scale_samples // cfg.batch_size))
    est = estimate_scale_factor(build_image_tokenizer(tok_cfg), scale_batches, num_samples=cfg.num_scale_samples)
    write_tokenizer_yaml(out_dir / "tokenizer.yaml", {"kind": "vae", "path": tok_cfg.path,
                                                       "scale_factor": est["scale_factor"], "shift_factor": 0.0})
    return {"steps": cfg.steps, "seconds": elapsed, "recent_mse": sum(recent) / len(recent), **est}
