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
