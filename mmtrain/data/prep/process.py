"""Per-candidate work, run in worker processes: read, check, decode, resize, encode.

A candidate either comes back as a kept sample (encoded image + caption + metadata
+ pixel hash) or as a drop with its reason. Nothing here raises for bad data: a
broken file is a drop, so one bad image never stops a run of millions. Duplicates
are decided later, in the parent, because that needs every earlier sample.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmtrain.data.images import resize_image, resized_size
from mmtrain.data.prep.candidate import ByteRef, Candidate, group_hash
from mmtrain.data.prep.config import PrepConfig
from mmtrain.data.prep.transform import PIL_FORMAT, encode, oriented, pixel_hash, to_rgb


@dataclass(frozen=True)
class ProcessOptions:
    """The subset of :class:`PrepConfig` a worker needs (see there for meanings)."""

    resolution: int
    resize_mode: str
    min_size: int
    max_aspect: float
    min_caption_words: int
    max_caption_words: int
    image_format: str
    jpeg_quality: int
    passthrough: bool
    dedup: bool

    @classmethod
    def from_config(cls, cfg: PrepConfig) -> ProcessOptions:
        return cls(
            resolution=cfg.resolution, resize_mode=cfg.resize_mode, min_size=cfg.min_size,
            max_aspect=float(cfg.max_aspect), min_caption_words=cfg.min_caption_words,
            max_caption_words=cfg.max_caption_words, image_format=cfg.image_format,
            jpeg_quality=cfg.jpeg_quality, passthrough=cfg.passthrough, dedup=cfg.dedup,
        )


@dataclass
class Processed:
    """The outcome for one candidate: ``reason`` is None when the sample is kept.

    Attributes:
        key, source, group_hash: From the candidate.
        reason, detail: Why it was dropped (one of ``DROP_REASONS``) and the specifics.
        orig_size: (width, height) from the image header when it could be read, for
            the resolution histogram (also filled for later-dropped samples).
        image: Encoded image bytes in ``image_format``.
        caption: Stripped caption.
        meta: The output ``json`` object.
        label: Class label or None.
        pixel_hash: Hex BLAKE2b-128 of the decoded pixels ("" when dedup is off).
    """

    key: str
    source: str
    group_hash: str
    reason: str | None = None
    detail: str = ""
    orig_size: tuple[int, int] | None = None
    image: bytes = b""
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    label: int | None = None
    pixel_hash: str = ""


class _Reader:
    """Reads files and tar members, keeping a batch's tar files open once."""

    def __init__(self) -> None:
        self._tars: dict[str, Any] = {}

    def read(self, ref: ByteRef) -> bytes:
        if isinstance(ref, str):
            with open(ref, "rb") as f:
                return f.read()
        path, offset, size = ref
        handle = self._tars.get(path)
        if handle is None:
            handle = self._tars[path] = open(path, "rb")  # noqa: SIM115 -- closed in close()
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise EOFError(f"{path}: member truncated at byte {offset + len(data)} (expected {size} bytes)")
        return data

    def close(self) -> None:
        for handle in self._tars.values():
            handle.close()
        self._tars.clear()


def parse_label(raw: Any) -> int:
    """A non-negative integer from an int, an integral float or decimal text."""
    if isinstance(raw, bool):
        raise ValueError(f"label must be an integer, got {raw!r}")  # noqa: TRY004 -- callers treat every bad label as ValueError
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"label must be an integer, got {raw!r}")
        raw = int(raw)
    value = raw if isinstance(raw, int) else int(str(raw).strip())
    if value < 0:
        raise ValueError(f"label must be >= 0, got {value}")
    return value


def _drop(out: Processed, reason: str, detail: str) -> Processed:
    out.reason, out.detail = reason, detail
    return out


def process_candidate(opts: ProcessOptions, cand: Candidate, reader: _Reader) -> Processed:
    """Turn one candidate into a kept sample or a drop (never raises for bad data)."""
    out = Processed(key=cand.key, source=cand.source, group_hash=group_hash(cand.group))

    label = cand.label
    if cand.label_ref is not None:
        try:
            label = parse_label(reader.read(cand.label_ref))
        except (ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
            return _drop(out, "bad_label", f"class label: {exc}")

    caption = cand.caption
    if caption is None:
        if cand.caption_ref is None:
            return _drop(out, "missing_caption", "no caption")
        try:
            caption = reader.read(cand.caption_ref).decode("utf-8-sig")
        except FileNotFoundError:
            return _drop(out, "missing_caption", f"caption file {cand.caption_ref} not found")
        except UnicodeDecodeError as exc:
            return _drop(out, "bad_caption", f"caption is not UTF-8: {exc}")
        except (OSError, EOFError) as exc:
            return _drop(out, "bad_caption", f"cannot read caption: {exc}")
    caption = caption.strip()
    if not caption:
        return _drop(out, "empty_caption", "caption is empty")

    try:
        data = reader.read(cand.image)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return _drop(out, "missing_file", f"image file {cand.image} not found")
    except EOFError as exc:
        return _drop(out, "corrupt_image", str(exc))
    except OSError as exc:
        return _drop(out, "unreadable_file", f"cannot read {cand.image}: {exc}")

    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message embeds a memory address; keep records reproducible.
        return _drop(out, "corrupt_image", "not a recognised image format")
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for bad headers; all mean "corrupt"
        return _drop(out, "corrupt_image", f"cannot open image: {type(exc).__name__}: {exc}")
    width, height = opened.size
    out.orig_size = (width, height)
    short, long = min(width, height), max(width, height)
    if short < 1:
        return _drop(out, "corrupt_image", f"image has size {width}x{height}")
    if short < opts.min_size:
        return _drop(out, "too_small", f"{width}x{height}: shorter side {short} < min_size {opts.min_size}")
    if opts.max_aspect and long / short > opts.max_aspect:
        return _drop(out, "bad_aspect", f"{width}x{height}: aspect {long / short:.2f} > max_aspect {opts.max_aspect}")
    new_w, new_h = resized_size(width, height, opts.resolution, opts.resize_mode)
    if opts.resize_mode == "keep_aspect" and new_w * new_h > Image.MAX_IMAGE_PIXELS:
        # A thin strip scaled up to `resolution` would need gigabytes; treat it as the aspect problem it is.
        return _drop(out, "bad_aspect", f"{width}x{height}: keep_aspect resize would make {new_w}x{new_h}")
    words = len(caption.split())
    if words < opts.min_caption_words:
        return _drop(out, "caption_too_short", f"{words} words < min_caption_words {opts.min_caption_words}")
    if opts.max_caption_words and words > opts.max_caption_words:
        return _drop(out, "caption_too_long", f"{words} words > max_caption_words {opts.max_caption_words}")

    try:
        opened.load()  # PIL decodes lazily; a truncated file only fails here
        source_format, source_mode = opened.format, opened.mode
        image, rotated = oriented(opened)
        image = to_rgb(image)
    except Exception as exc:  # noqa: BLE001 -- any decoder failure means the file is corrupt
        return _drop(out, "corrupt_image", f"cannot decode image: {type(exc).__name__}: {exc}")

    if opts.dedup:
        out.pixel_hash = pixel_hash(image)
    orig_w, orig_h = image.size
    resized = resize_image(image, opts.resolution, opts.resize_mode)
    unchanged = resized is image and not rotated and source_mode == "RGB"
    if opts.passthrough and unchanged and source_format == PIL_FORMAT[opts.image_format]:
        out.image = data
    else:
        out.image = encode(resized, opts.image_format, opts.jpeg_quality)

    meta: dict[str, Any] = {}
    if cand.meta_ref is not None:
        try:
            loaded = json.loads(reader.read(cand.meta_ref).decode("utf-8"))
            if isinstance(loaded, dict):
                meta.update(loaded)
        except (ValueError, OSError, EOFError):
            # Metadata from the input is a courtesy copy; a broken one loses nothing we promise.
            pass
    meta.update(cand.meta)
    meta.update(source=cand.source, width=resized.size[0], height=resized.size[1], orig_width=orig_w, orig_height=orig_h)
    out.caption, out.meta, out.label = caption, meta, label
    return out


def process_batch(opts: ProcessOptions, candidates: list[Candidate]) -> list[Processed]:
    """Process candidates in order (the unit of work sent to a worker process)."""
    reader = _Reader()
    try:
        return [process_candidate(opts, cand, reader) for cand in candidates]
    finally:
        reader.close()
