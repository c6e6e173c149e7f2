"""KL-VAE image tokenizers backed by diffusers ``AutoencoderKL``.

Three ``image_tokenizer.kind`` values (:func:`mmtrain.tokenize.build.build_image_tokenizer`
imports this module on demand):

* ``mar_kl16``: MAR's KL-16 VAE (f16, 16 channels; ``tokenizers/mar_kl16.yaml``).
* ``sd_vae``: the Stable Diffusion KL-f8 VAE (f8, 4 channels; ``tokenizers/sd_vae.yaml``).
* ``vae``: any diffusers ``AutoencoderKL`` folder, or a random-init one from
  ``arch`` kwargs (``tokenizers/small_vae.yaml``).

Weights come only from ``image_tokenizer.path`` (a local diffusers folder, or
for ``mar_kl16``/``sd_vae`` an original LDM/MAR checkpoint file converted on
load by :mod:`mmtrain.tokenize.convert_vae`). Nothing is ever downloaded: a
missing path is an error unless ``allow_random: true``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mmtrain.tokenize.convert_vae import (
    KNOWN_ARCHES,
    build_vae,
    ldm_vae_config,
    load_ldm_vae,
)
from mmtrain.tokenize.image import ImageTokenizer, ImageTokenizerConfig

_CKPT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class VAETokenizer(ImageTokenizer):
    """ImageTokenizer around a (frozen) diffusers ``AutoencoderKL``.

    ``latent_channels`` is ``vae.config.latent_channels`` and ``downsample`` is
    ``2 ** (len(vae.config.block_out_channels) - 1)`` (one stride-2 stage per
    level but the last).

    Args:
        vae: A diffusers ``AutoencoderKL``. It is put in eval mode and its
            parameters are frozen: the tokenizer is fixed during training.
        scale_factor: Default 1.0 (MAR KL-16 uses 0.2325, SD 0.18215).
        shift_factor: Default 0.0.
        sample_posterior: Default False: encode to the posterior mean, so
            encode is a deterministic function and pre-computed latent caches
            are reproducible. The official MAR training (``engine_mar.py``)
            instead draws ``posterior.sample()`` each step, a mild
            augmentation; set True to match it when encoding on the fly.
        generator: Optional ``torch.Generator`` for posterior samples. Default None.
    """

    def __init__(self, vae, scale_factor: float = 1.0, shift_factor: float = 0.0, sample_posterior: bool = False,
                 generator: torch.Generator | None = None) -> None:
        cfg = vae.config
        super().__init__(latent_channels=int(cfg.latent_channels),
                         downsample=2 ** (len(cfg.block_out_channels) - 1),
                         scale_factor=scale_factor, shift_factor=shift_factor)
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = bool(sample_posterior)
        self.generator = generator

    def train(self, mode: bool = True) -> VAETokenizer:
        # The VAE is frozen; keep it in eval mode even inside a module tree
        # that is switched to train mode (no dropout in it either way, but this
        # keeps the tokenizer a fixed function).
        super().train(mode)
        self.vae.eval()
        return self

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images.to(self._vae_dtype())).latent_dist
        z = dist.sample(generator=self.generator) if self.sample_posterior else dist.mode()
        return z.to(images.dtype)

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self._vae_dtype())).sample.to(latents.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sample_posterior={self.sample_posterior}"


# ------------------------------------------------------------------ loading
def _load_diffusers_dir(path: Path):
    from diffusers import AutoencoderKL

    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"image_tokenizer.path: {path} is a folder without config.json; expected a diffusers AutoencoderKL "
            "folder (see mmtrain.tokenize.convert_vae to make one)"
        )
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False).eval()


RANDOM_INIT_SEED = 0


def load_vae(cfg: ImageTokenizerConfig):
    """The ``AutoencoderKL`` that ``cfg`` (kind ``mar_kl16``/``sd_vae``/``vae``) names.

    Rules: ``path`` a folder -> diffusers ``from_pretrained`` (local only);
    ``path`` a file -> original LDM/MAR checkpoint, converted with the kind's
    architecture (kind ``vae`` has none, so it needs a folder); ``path`` empty
    -> random init only if ``allow_random`` (``mar_kl16``/``sd_vae``: their
    full-size architecture; ``vae``: ``AutoencoderKL(**arch)``).
    """
    kind = cfg.kind
    ldm_arch = KNOWN_ARCHES.get(kind)
    if cfg.arch and kind != "vae":
        raise ValueError(f"image_tokenizer.arch is only used by kind 'vae'; kind {kind!r} has a fixed architecture")
    if not cfg.path:
        if not cfg.allow_random:
            raise ValueError(
                f"image_tokenizer.kind={kind!r} needs image_tokenizer.path: a local diffusers AutoencoderKL folder"
                + (" or an original checkpoint file" if ldm_arch else "")
                + " (weights are never downloaded); set image_tokenizer.allow_random: true for a random-init VAE "
                "(tests/demos only)"
            )
        if ldm_arch is None and not cfg.arch:
            raise ValueError("image_tokenizer.kind='vae' with an empty path needs image_tokenizer.arch "
                             "(diffusers AutoencoderKL kwargs) to build a random-init VAE")
        # A fixed seed: every rank, and a later sampling process, must build the same random VAE,
        # or training latents and decoded samples would belong to different codes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            if ldm_arch is not None:
                return build_vae(ldm_vae_config(**ldm_arch))
            try:
                return build_vae(cfg.arch)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"image_tokenizer.arch: diffusers AutoencoderKL rejected {cfg.arch!r}: {exc}") from exc
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        vae = _load_diffusers_dir(path)
        if ldm_arch is not None:
            _check_matches_arch(vae, ldm_arch, kind, path)
        return vae
    if path.is_file():
        if ldm_arch is None:
            raise ValueError(
                f"image_tokenizer.path: {path} is a checkpoint file, but kind 'vae' has no architecture to convert it "
                "with; use kind mar_kl16/sd_vae, or convert it to a diffusers folder first"
            )
        if path.suffix not in _CKPT_SUFFIXES:
            raise ValueError(f"image_tokenizer.path: {path} has suffix {path.suffix!r}; expected one of {_CKPT_SUFFIXES}")
        return load_ldm_vae(path, ldm_arch)
    raise FileNotFoundError(f"image_tokenizer.path: {path} does not exist (kind {kind!r})")


def _check_matches_arch(vae, ldm_arch: dict[str, Any], kind: str, path: Path) -> None:
    want = ldm_vae_config(**ldm_arch)
    got = vae.config
    for key in ("latent_channels", "block_out_channels", "layers_per_block"):
        if list(_as_list(got[key])) != list(_as_list(want[key])):
            raise ValueError(
                f"image_tokenizer.path: {path} has {key}={got[key]!r} but kind {kind!r} expects {want[key]!r}; "
                "use kind 'vae' for other architectures"
            )


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def build_vae_tokenizer(cfg: ImageTokenizerConfig) -> VAETokenizer:
    """The tokenizer of kinds ``mar_kl16``, ``sd_vae`` and ``vae``."""
    return VAETokenizer(load_vae(cfg), scale_factor=cfg.scale_factor, shift_factor=cfg.shift_factor,
                        sample_posterior=cfg.sample_posterior)


# ------------------------------------------------------------ normalization
@torch.no_grad()
def estimate_scale_factor(tokenizer: ImageTokenizer, images_iter: Iterable[torch.Tensor], num_samples: int = 1024,
                          with_shift: bool = False) -> dict[str, float]:
    """Latent normalization from data, as SD/MAR chose theirs (1 / std of raw latents).

    Encodes raw (unnormalized) latents of up to ``num_samples`` images and
    returns ``scale_factor = 1 / std`` over all latent elements, so that
    ``(z - shift_factor) * scale_factor`` has unit std.

    Args:
        tokenizer: Any ImageTokenizer (its own scale/shift are ignored).
        images_iter: Batches # B, 3, H, W in [-1, 1] on the tokenizer's device.
        num_samples: Images to use (the last batch is cut). Default 1024.
        with_shift: Also return ``shift_factor = mean`` (FLUX style); default
            False returns 0.0 (SD/MAR style: scale only).

    Returns:
        dict with ``scale_factor``, ``shift_factor``, ``mean``, ``std``, ``num_samples``.
    """
    if num_samples < 1:
        raise ValueError(f"estimate_scale_factor: num_samples must be >= 1, got {num_samples}")
    total = 0.0
    total_sq = 0.0
    count = 0
    seen = 0
    for images in images_iter:
        images = images[: num_samples - seen]
        z = tokenizer._encode_raw(images).double()  # raw latents: before the tokenizer's own normalization
        total += z.sum().item()
        total_sq += z.square().sum().item()
        count += z.numel()
        seen += images.shape[0]
        if seen >= num_samples:
            break
    if count < 2:
        raise ValueError("estimate_scale_factor: images_iter gave no images")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / (count - 1)  # unbiased, like torch.std
    std = var ** 0.5
    if std == 0.0:
        raise ValueError("estimate_scale_factor: latents have zero std; cannot normalize")
    return {"scale_factor": 1.0 / std, "shift_factor": mean if with_shift else 0.0, "mean": mean, "std": std,
            "num_samples": seen}
