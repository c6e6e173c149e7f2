"""``build_image_tokenizer``: the image tokenizer a config names, built explicitly.

Every kind is listed here, above the modules that implement them (:mod:`mmtrain.tokenize.image`
for ``pixels``, :mod:`mmtrain.tokenize.vae` for the KL-VAEs), so neither imports the other to
register itself. A new tokenizer is a subclass of :class:`~mmtrain.tokenize.image.ImageTokenizer`
and one more branch below.
"""
from __future__ import annotations

from mmtrain.tokenize.image import ImageTokenizer, ImageTokenizerConfig, PixelTokenizer

VAE_KINDS = ("mar_kl16", "sd_vae", "vae")
KINDS = ("pixels", *VAE_KINDS)


def check_image_tokenizer(cfg: ImageTokenizerConfig, where: str = "tokenizer.image") -> None:
    """What building ``cfg`` needs from the filesystem, checked without loading anything (the preflight
    of ``mmtrain train``, so a VAE path left unset in a recipe stops the run before any rank starts):
    a known kind, and a VAE kind's ``path`` set (unless ``allow_random``) and present. Raises a
    ConfigError naming ``where``'s keys."""
    from pathlib import Path

    from mmtrain.errors import ConfigError

    if cfg.kind not in KINDS:
        raise ConfigError(f"{where}.kind: unknown kind {cfg.kind!r}; known kinds: {sorted(KINDS)}")
    if cfg.kind not in VAE_KINDS or (cfg.allow_random and not cfg.path):
        return
    if not cfg.path:
        raise ConfigError(f"{where}.path is not set: kind {cfg.kind!r} needs a local diffusers AutoencoderKL folder"
                          + (" or an original checkpoint file" if cfg.kind != "vae" else "")
                          + f" (weights are never downloaded); set {where}.path=/path/to/vae, or "
                          f"{where}=path/to/tokenizer.yaml (e.g. the one `mmtrain tokenizer train-vae` writes)")
    if not Path(cfg.path).expanduser().exists():
        raise ConfigError(f"{where}.path={cfg.path}: no such file or folder (kind {cfg.kind!r}: a local diffusers "
                          "AutoencoderKL folder or a checkpoint file)")


def build_image_tokenizer(cfg: ImageTokenizerConfig) -> ImageTokenizer:
    """Instantiate the tokenizer named by ``cfg.kind``."""
    if cfg.kind == "pixels":
        return PixelTokenizer(scale_factor=cfg.scale_factor, shift_factor=cfg.shift_factor)
    if cfg.kind in VAE_KINDS:
        # imported here, so that pixel-only users never pay for diffusers
        try:
            from mmtrain.tokenize.vae import build_vae_tokenizer
        except ImportError as exc:
            raise ImportError(f"image_tokenizer.kind={cfg.kind!r} needs diffusers, which failed to import: {exc}") from exc
        return build_vae_tokenizer(cfg)
    raise ValueError(f"image_tokenizer.kind: unknown kind {cfg.kind!r}; known kinds: {sorted(KINDS)}")
