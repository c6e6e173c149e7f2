"""Images in and out of shards: the names every reader and writer agrees on, and the one
decode and resize of a stored image into pixels.

``IMAGE_EXTENSIONS``: the webdataset member extensions read as the sample's image, in the
order a reader takes them when a sample has several (``KEY.jpg`` before ``KEY.png``), and
the file suffixes ``mmtrain prep folder`` lists. ``IMAGE_FORMATS``: the formats the writers
encode (``jpg`` first: prep's default).

Resize modes, one vocabulary for every command (:func:`resize_image` implements them all):

- ``center_crop``: the central square (shorter side), scaled to ``size`` x ``size``;
- ``resize``: the whole image squashed to ``size`` x ``size``;
- ``keep_aspect``: the shorter side scaled to ``size``, the aspect ratio kept, no crop;
- ``none``: as stored.

``RESIZE_MODES`` (``center_crop``, ``resize``) are the ones that give square model pixels:
the training loader and eval (``data.resize_mode``), inference, VAE training, ``tokenizer
estimate-scale``, ``mmtrain caption`` and ``prep latents --resize-mode`` accept these.
``PREP_RESIZE_MODES`` adds ``keep_aspect`` and ``none`` for ``mmtrain prep folder|manifest|
coco|wds --resize-mode``, which store images rather than feed a model. A dataset prepped with
``center_crop`` or ``resize`` at the training size is read back with identical pixels.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from mmtrain.data.errors import ShardDataError

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png")
RESIZE_MODES: tuple[str, ...] = ("center_crop", "resize")
PREP_RESIZE_MODES: tuple[str, ...] = (*RESIZE_MODES, "keep_aspect", "none")
# One filter for every path, so a prepped image and a loader-resized one are the same pixels.
RESAMPLE = Image.Resampling.BICUBIC


def sniff_extension(data: bytes) -> str:
    """The webdataset member extension for encoded image bytes, from their magic number:
    ``png``, ``webp``, else ``jpg`` (for MDS images, which have no extension of their own)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def resized_size(width: int, height: int, size: int, resize_mode: str) -> tuple[int, int]:
    """The ``(width, height)`` :func:`resize_image` gives a ``width`` x ``height`` image (``size`` 0: as stored)."""
    if not size or resize_mode == "none":
        return width, height
    if resize_mode != "keep_aspect":
        return size, size
    scale = size / min(width, height)
    # max(size, ...) so rounding never leaves the shorter side one pixel short.
    if width <= height:
        return size, max(size, round(height * scale))
    return max(size, round(width * scale)), size


def resize_image(image: Image.Image, size: int, resize_mode: str = "center_crop") -> Image.Image:
    """``image`` resized by ``resize_mode`` (see the module docstring); ``size`` 0 keeps it as stored.

    Returns ``image`` itself when nothing changes, so a caller can tell (prep passes the
    source bytes through then). ValueError naming the mode when it is unknown.
    """
    if resize_mode not in PREP_RESIZE_MODES:
        raise ValueError(f"resize_mode: expected one of {list(PREP_RESIZE_MODES)}, got {resize_mode!r}")
    if not size or resize_mode == "none":
        return image
    width, height = image.size
    target = resized_size(width, height, size, resize_mode)
    if resize_mode == "center_crop" and width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != target:
        image = image.resize(target, resample=RESAMPLE)
    return image


def decode_image(data: Any, size: int, resize_mode: str = "center_crop", fast_jpeg: bool = True,
                 where: str = "") -> np.ndarray:
    """Encoded image bytes (or a PIL image) -> uint8 RGB array, resized by :func:`resize_image`
    (``size, size, 3`` for the :data:`RESIZE_MODES`); ``size`` 0 keeps the stored size.

    ``fast_jpeg`` lets libjpeg decode a JPEG at least twice the requested size at a reduced
    scale first (the training loader's ``data.fast_jpeg_decode``). Raises ShardDataError
    naming ``where`` when the bytes are not a decodable image.
    """
    if resize_mode not in PREP_RESIZE_MODES:  # the caller's mistake, not the image's
        raise ValueError(f"resize_mode: expected one of {list(PREP_RESIZE_MODES)}, got {resize_mode!r}")
    try:
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        w, h = image.size
        if size and fast_jpeg and image.format == "JPEG" and min(w, h) >= 2 * size:
            # the decoded size stays >= the request, so the crop still covers size x size
            scale = size / min(w, h)
            image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()
        return np.asarray(resize_image(image, size, resize_mode), dtype=np.uint8)
    except ShardDataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ShardDataError(f"{where}: cannot decode image (expected a JPEG/PNG/WebP image file): {exc}") from exc
