"""Continuous image tokenizers: pixels <-> normalized latents <-> patch tokens.

The model never sees pixels directly. It sees *latents* produced by an
:class:`ImageTokenizer`, cut into patch tokens by :func:`patchify`:

    images  # B, 3, H, W     float in [-1, 1]
      -> ImageTokenizer.encode
    latents # B, C, H/d, W/d normalized: (z - shift_factor) * scale_factor
      -> patchify(latents, p)
    tokens  # B, (H/d/p) * (W/d/p), p*p*C

and back with :func:`unpatchify` and :meth:`ImageTokenizer.decode`.

The KL-VAE tokenizers (diffusers ``AutoencoderKL``; kinds ``mar_kl16``,
``sd_vae``, ``vae``) live in :mod:`mmtrain.tokenize.vae`. Another VAE means
writing a subclass whose ``_encode_raw`` returns ``vae.encode(x).latent_dist.mode()``
(or ``.sample()``) and whose ``_decode_raw`` returns ``vae.decode(z).sample``,
with ``latent_channels=vae.config.latent_channels``, ``downsample=8`` and the
VAE's published ``scaling_factor``/``shift_factor`` (SD: 0.18215 / 0.0;
FLUX: 0.3611 / 0.1159), then adding its kind to
:func:`mmtrain.tokenize.build.build_image_tokenizer`. Nothing downstream changes,
because every consumer only uses ``latent_channels``, ``downsample`` and encode/decode.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class ImageTokenizer(torch.nn.Module, abc.ABC):
    """Abstract image <-> latent mapping with latent normalization.

    Attributes:
        latent_channels: Channels C of the latents.
        downsample: Spatial factor d: an H x W image gives H/d x W/d latents.
        scale_factor: Multiplier applied after shifting, so latents have
            roughly unit variance. Must be > 0.
        shift_factor: Subtracted from raw latents before scaling.

    Subclasses implement :meth:`_encode_raw` / :meth:`_decode_raw` on
    *unnormalized* latents; the base class handles normalization and input
    checks.
    """

    def __init__(self, latent_channels: int, downsample: int, scale_factor: float, shift_factor: float) -> None:
        super().__init__()
        if not (math.isfinite(scale_factor) and scale_factor > 0):
            raise ValueError(f"image_tokenizer.scale_factor: expected a finite value > 0, got {scale_factor!r}")
        if not math.isfinite(shift_factor):
            raise ValueError(f"image_tokenizer.shift_factor: expected a finite value, got {shift_factor!r}")
        if latent_channels < 1 or downsample < 1:
            raise ValueError(
                f"{type(self).__name__}: latent_channels and downsample must be >= 1, "
                f"got {latent_channels} and {downsample}"
            )
        self.latent_channels = int(latent_channels)
        self.downsample = int(downsample)
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)

    @abc.abstractmethod
    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """images # B, 3, H, W in [-1, 1] -> raw latents # B, C, H/d, W/d."""

    @abc.abstractmethod
    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """raw latents # B, C, h, w -> images # B, 3, h*d, w*d (about [-1, 1])."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H/d, W/d) for an image of ``height`` x ``width`` pixels."""
        self._check_divisible(height, width)
        return self.latent_channels, height // self.downsample, width // self.downsample

    def _check_divisible(self, height: int, width: int) -> None:
        d = self.downsample
        if height % d or width % d:
            raise ValueError(
                f"{type(self).__name__}: image size {height}x{width} must be divisible by "
                f"the downsample factor {d}"
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images # B, 3, H, W float in [-1, 1] -> normalized latents # B, C, H/d, W/d."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__}.encode: expected images shaped (B, 3, H, W), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"{type(self).__name__}.encode: expected float images in [-1, 1], got dtype {images.dtype} "
                "(use pil_to_tensor to convert uint8 images)"
            )
        self._check_divisible(images.shape[2], images.shape[3])
        return (self._encode_raw(images) - self.shift_factor) * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents # B, C, h, w -> images # B, 3, h*d, w*d (not clamped)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.decode: expected latents shaped (B, {self.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )
        return self._decode_raw(latents / self.scale_factor + self.shift_factor)

    def extra_repr(self) -> str:
        return (
            f"latent_channels={self.latent_channels}, downsample={self.downsample}, "
            f"scale_factor={self.scale_factor}, shift_factor={self.shift_factor}"
        )


class PixelTokenizer(ImageTokenizer):
    """Identity tokenizer: latents are the pixels (C=3, d=1).

    Useful for small synthetic datasets and tests, where a VAE would only add
    cost and blur.

    Args:
        scale_factor: Default 1.0 (pixels are already in [-1, 1]).
        shift_factor: Default 0.0.
    """

    def __init__(self, scale_factor: float = 1.0, shift_factor: float = 0.0) -> None:
        super().__init__(latent_channels=3, downsample=1, scale_factor=scale_factor, shift_factor=shift_factor)

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


@dataclass
class ImageTokenizerConfig:
    """Which image tokenizer to build (see ``tokenizers/*.yaml``): the run's ``tokenizer.image``, which
    also takes the path of such a file (:func:`load_image_tokenizer_yaml`).

    Attributes:
        kind: Tokenizer name (:mod:`mmtrain.tokenize.build`). Default ``"pixels"``. The VAE kinds
            ``mar_kl16``, ``sd_vae`` and ``vae`` live in
            :mod:`mmtrain.tokenize.vae`.
        scale_factor: Latent scale, > 0. Default 1.0.
        shift_factor: Latent shift. Default 0.0.
        path: VAE kinds only. A local diffusers ``AutoencoderKL`` folder, or
            (``mar_kl16``/``sd_vae``) an original LDM/MAR checkpoint file that
            is converted on load. Never downloaded. Default ``""`` (none).
        allow_random: VAE kinds only. With ``path`` empty, build a randomly
            initialized VAE instead of failing (tests/plumbing demos only: its
            latents are not a useful image code). Default False.
        sample_posterior: VAE kinds only. Encode to a sample of the posterior
            instead of its mean. Default False.
        arch: Kind ``vae`` only. diffusers ``AutoencoderKL`` constructor
            kwargs for a random-init VAE (needs ``allow_random``). Default {}.
    """

    kind: str = "pixels"
    scale_factor: float = 1.0
    shift_factor: float = 0.0
    path: str = ""
    allow_random: bool = False
    sample_posterior: bool = False
    arch: dict[str, Any] = field(default_factory=dict)


def load_image_tokenizer_yaml(path: str | os.PathLike, where: str = "tokenizer.image") -> dict[str, Any]:
    """The image tokenizer section a ``tokenizer.yaml`` holds (``tokenizers/*.yaml``, or the one
    ``mmtrain tokenizer train-vae`` / ``estimate-scale --write`` write), as a mapping of
    :class:`ImageTokenizerConfig` fields with a relative ``path`` resolved against the YAML's folder.

    Raises :class:`~mmtrain.errors.ConfigError` naming ``where`` and the file when it is missing,
    not YAML or not a mapping; its keys and types are checked where the mapping is built
    (:func:`image_tokenizer_config`, or the run config's loader)."""
    import yaml

    from mmtrain.errors import ConfigError

    text = os.fspath(path)
    file = Path(text).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}={os.fspath(path)}: no such tokenizer file (expected a tokenizer.yaml such as "
                          "tokenizers/sd_vae.yaml or the one `mmtrain tokenizer train-vae` writes, or a mapping of "
                          "image tokenizer fields" + ("" if text.endswith((".yaml", ".yml")) else
                                                      f"; to choose a kind, set {where}.kind={text}") + ")")
    try:
        tree = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}={os.fspath(path)}: cannot read it as YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}={os.fspath(path)}: expected a mapping of image tokenizer fields "
                          f"({', '.join(f.name for f in dataclasses.fields(ImageTokenizerConfig))}), got {tree!r}")
    tree = dict(tree)
    vae_path = tree.get("path")
    if isinstance(vae_path, str) and vae_path and not Path(vae_path).expanduser().is_absolute():
        tree["path"] = str((file.resolve().parent / vae_path).resolve())
    return tree


def image_tokenizer_config(spec: str | os.PathLike | dict[str, Any] | ImageTokenizerConfig = "pixels",
                           where: str = "tokenizer.image", **fields: Any) -> ImageTokenizerConfig:
    """The :class:`ImageTokenizerConfig` of a kind name, a ``tokenizer.yaml`` path, a mapping or a config,
    with ``fields`` (those not None) set over it; keys and types checked as the run config checks them.

    A string is a ``tokenizer.yaml`` when it ends in ``.yaml``/``.yml`` or names an existing file,
    otherwise a kind (``pixels``, ``sd_vae``, ...). Errors are ConfigErrors naming ``where``."""
    from mmtrain.schema import build_dataclass

    if isinstance(spec, ImageTokenizerConfig):
        tree = dataclasses.asdict(spec)
    elif isinstance(spec, dict):
        tree = dict(spec)
    elif is_tokenizer_yaml(spec):
        tree = load_image_tokenizer_yaml(spec, where)
    else:
        tree = {"kind": os.fspath(spec)}
    tree.update({k: v for k, v in fields.items() if v is not None})
    return build_dataclass(ImageTokenizerConfig, tree, where)


def is_tokenizer_yaml(spec: Any) -> bool:
    """Whether ``spec`` (a ``tokenizer.image`` value or ``--tokenizer`` argument) names a tokenizer.yaml file
    rather than a kind: a path ending in ``.yaml``/``.yml``, or an existing file."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    text = os.fspath(spec)
    return text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).expanduser().is_file()


# ------------------------------------------------------------------ patches
def _check_patch_size(patch_size: int) -> None:
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size: expected an int >= 1, got {patch_size!r}")


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut latents into non-overlapping square patches, one token per patch.

    Tokens run row-major over the patch grid; inside a token the values are
    ordered (p_row, p_col, channel).

    latents # B, C, H, W -> tokens # B, (H/p)*(W/p), p*p*C
    """
    _check_patch_size(patch_size)
    if latents.dim() != 4:
        raise ValueError(f"patchify: expected latents shaped (B, C, H, W), got {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: latent height {h} and width {w} must both be divisible by patch_size {p}")
    x = latents.reshape(b, c, h // p, p, w // p, p)  # B, C, gh, p_row, gw, p_col
    x = x.permute(0, 2, 4, 3, 5, 1)  # B, gh, gw, p_row, p_col, C
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Exact inverse of :func:`patchify`.

    tokens # B, (height/p)*(width/p), p*p*C -> latents # B, C, height, width
    (``height``/``width`` are in latent pixels).
    """
    _check_patch_size(patch_size)
    p = patch_size
    if tokens.dim() != 3:
        raise ValueError(f"unpatchify: expected tokens shaped (B, N, D), got {tuple(tokens.shape)}")
    if height % p or width % p:
        raise ValueError(f"unpatchify: height {height} and width {width} must both be divisible by patch_size {p}")
    b, n, d = tokens.shape
    gh, gw = height // p, width // p
    if n != gh * gw:
        raise ValueError(
            f"unpatchify: got {n} tokens, but a {height}x{width} latent with patch_size {p} has {gh * gw}"
        )
    if d % (p * p):
        raise ValueError(f"unpatchify: token dim {d} is not a multiple of patch_size**2 = {p * p}")
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, p, p, c)  # B, gh, gw, p_row, p_col, C
    x = x.permute(0, 5, 1, 3, 2, 4)  # B, C, gh, p_row, gw, p_col
    return x.reshape(b, c, height, width)


# ---------------------------------------------------------------- PIL glue
def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images (all the same size) -> float tensor # B, 3, H, W in [-1, 1]."""
    if not images:
        raise ValueError("pil_to_tensor: got an empty list of images")
    arrays = []
    size0 = images[0].size
    for i, im in enumerate(images):
        if im.size != size0:
            raise ValueError(
                f"pil_to_tensor: images[{i}] has size {im.size} (W, H) but images[0] has {size0}; "
                "resize/crop them to one size first"
            )
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))  # H, W, 3
    x = torch.from_numpy(np.stack(arrays))  # B, H, W, 3 uint8
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Float tensor # B, 3, H, W (about [-1, 1]) -> RGB PIL images (clamped, rounded)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"tensor_to_pil: expected a tensor shaped (B, 3, H, W), got {tuple(x.shape)}")
    u8 = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    arrays = np.ascontiguousarray(u8.permute(0, 2, 3, 1).cpu().numpy())  # B, H, W, 3
    # An H, W, 3 uint8 array is read as RGB.
    return [Image.fromarray(a) for a in arrays]
