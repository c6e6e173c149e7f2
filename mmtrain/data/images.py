"""Images in and out of shards: the names every reader and writer agrees on, and the one
decode and resize of a stored image into model pixels.

``IMAGE_EXTENSIONS``: the webdataset member extensions read as the sample's image, in the
order a reader takes them when a sample has several (``KEY.jpg`` before ``KEY.png``), and
the file suffixes ``mmtrain prep folder`` lists. ``IMAGE_FORMATS``: the formats the writers
encode (``jpg`` first: prep's default). ``RESIZE_MODES``: how :func:`decode_image` makes a
non-square image square (``center_crop`` its central square, ``resize`` squashes it).
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


def decode_image(data: Any, size: int, resize_mode: str = "center_crop", fast_jpeg: bool = True,
                 where: str = "") -> np.ndarray:
    """Encoded image bytes (or a PIL image) -> ``size, size, 3`` uint8 RGB (bicubic resize);
    ``size`` 0 keeps the stored size (no crop, no resize).

    Raises ShardDataError naming ``where`` when the bytes are not a decodable image.
    """
    try:
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        w, h = image.size
        if size == 0:  # as stored
            return np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
        side = min(w, h) if resize_mode == "center_crop" else None
        if fast_jpeg and image.format == "JPEG" and min(w, h) >= 2 * size:
            # the decoded size stays >= the request, so the crop still covers size x size
            scale = size / min(w, h)
            image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            sw, sh = image.size
            if (sw, sh) != (w, h):
                w, h = sw, sh
                side = min(w, h) if side else None
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()
        if side is not None and w != h:
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side))
            w = h = side
        if (w, h) != (size, size):
            image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8)
    except ShardDataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ShardDataError(f"{where}: cannot decode image (expected a JPEG/PNG/WebP image file): {exc}") from exc
