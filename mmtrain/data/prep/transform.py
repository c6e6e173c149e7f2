"""Image transforms of the converters: orientation, RGB, resize, encode, pixel hash."""

from __future__ import annotations

import hashlib
import io

from PIL import ExifTags, Image, ImageOps

# Lanczos keeps downscaled photos sharp; the filter only matters when resizing.
RESAMPLE = Image.Resampling.LANCZOS
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


def target_size(width: int, height: int, resolution: int, mode: str) -> tuple[int, int]:
    """Size after scaling the shorter side to ``resolution`` (before any crop)."""
    if not resolution or mode == "none":
        return width, height
    scale = resolution / min(width, height)
    # max(resolution, ...) so rounding never leaves the shorter side one pixel short.
    if width <= height:
        return resolution, max(resolution, round(height * scale))
    return max(resolution, round(width * scale)), resolution


def resize(image: Image.Image, resolution: int, mode: str) -> Image.Image:
    """Scale the shorter side to ``resolution``; ``center_crop`` then crops a centred square."""
    if not resolution or mode == "none":
        return image
    width, height = image.size
    new_w, new_h = target_size(width, height, resolution, mode)
    if mode == "keep_aspect":
        return image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), RESAMPLE)
    if (width, height) == (resolution, resolution):
        return image
    # The crop of the scaled image, mapped back to source coordinates: resizing only
    # that box gives the same pixels as scale-then-crop without building the full
    # scaled image (huge for a long panorama).
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
    return image.resize((resolution, resolution), RESAMPLE, box=box)


def encode(image: Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    """Encode an RGB image as JPEG (``jpeg_quality``) or PNG; deterministic bytes."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
