"""Image transforms of the converters: orientation, RGB, encode, pixel hash.

Resizing is not here: prep resizes with :func:`mmtrain.data.images.resize_image`, the one
resize every reader of model pixels uses, so a prepped image is the pixels training sees.
"""

from __future__ import annotations

import hashlib
import io

from PIL import ExifTags, Image, ImageOps

PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent areas become white.

    A plain ``convert("RGB")`` drops alpha and exposes whatever colour the
    transparent pixels happen to hold (often black), which is not what the image shows.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def oriented(image: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation tag; return the image and whether it changed.

    Checked here rather than by identity: ``exif_transpose`` returns a copy even
    when there is nothing to do.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image), True
    return image, False


def pixel_hash(image: Image.Image) -> str:
    """BLAKE2b-128 of the size and RGB pixels: equal for re-encoded lossless copies."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def encode(image: Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    """Encode an RGB image as JPEG (``jpeg_quality``) or PNG; deterministic bytes."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
