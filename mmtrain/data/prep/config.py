"""The options shared by every converter: one dataclass, validated, fingerprinted.

The fingerprint covers exactly the options that change what is written, so a
re-run with only ``workers``/``progress`` changed resumes instead of refusing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mmtrain.data.images import IMAGE_FORMATS, PREP_RESIZE_MODES, RESAMPLE
from mmtrain.errors import ConfigError

OUTPUT_FORMATS: tuple[str, ...] = ("wds", "mds")

# Every reason a candidate can be dropped, in the order the checks run. stats.json
# lists all of them, zeros included, so a silent filter is visible.
DROP_REASONS: tuple[str, ...] = (
    "bad_row",  # manifest/annotation row without a required column, or unparsable
    "bad_label",  # label that is not a non-negative integer
    "missing_caption",  # no caption at all (folder: no .txt, coco: image without annotation, wds: no .txt)
    "bad_caption",  # caption bytes that are not UTF-8
    "empty_caption",  # caption that is empty after stripping whitespace
    "missing_image",  # webdataset sample without an image member
    "missing_file",  # image path that does not exist
    "unreadable_file",  # image path that exists but cannot be read (permissions, I/O error)
    "corrupt_image",  # bytes PIL cannot open or fully decode
    "too_small",  # shorter side < min_size
    "bad_aspect",  # long side / short side > max_aspect
    "caption_too_short",  # fewer than min_caption_words words
    "caption_too_long",  # more than max_caption_words words
    "duplicate",  # same decoded pixels as an earlier kept image from another file
    "corrupt_shard",  # input tar that could not be read to its end (counted once per tar)
)

# streaming stores sample offsets as uint32, so one MDS shard must stay below 4 GiB.
MDS_MAX_SHARD_BYTES = 2**32 - 1


def check_int(options: Any, name: str, low: int, high: int | None = None) -> None:
    """``options.name`` is an int in [low, high]; else ConfigError naming ``Class.name``."""
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{type(options).__name__}.{name}: expected an int {bound}, got {value!r}")


def check_choice(options: Any, name: str, choices: tuple[str, ...]) -> None:
    """``options.name`` is one of ``choices``; else ConfigError naming ``Class.name``."""
    if getattr(options, name) not in choices:
        raise ConfigError(f"{type(options).__name__}.{name}: expected one of {list(choices)}, got {getattr(options, name)!r}")


def check_image_options(options: Any) -> None:
    """The image fields every converter shares (``image_format``, ``resize_mode``, ``jpeg_quality``,
    ``resolution``): one check for pair prep (:class:`PrepConfig`) and documents
    (:class:`mmtrain.data.documents.ImageOptions`)."""
    check_choice(options, "image_format", IMAGE_FORMATS)
    check_choice(options, "resize_mode", PREP_RESIZE_MODES)
    check_int(options, "jpeg_quality", 1, 95)
    check_int(options, "resolution", 0)


@dataclass
class PrepConfig:
    """Options for converting a raw dataset into training shards.

    Attributes:
        output_format: ``"wds"`` (webdataset ``{prefix}-{i:06d}.tar`` shards, default)
            or ``"mds"`` (mosaicml-streaming ``index.json`` + ``shard.NNNNN.mds``).
        samples_per_shard: Input candidates per chunk, default 1000. Each chunk of
            candidates becomes (normally) one output shard, so a shard holds at most
            this many samples, fewer when filters drop some.
        shard_size: Byte limit per shard, default 0 (no limit; MDS shards are then
            capped at streaming's 4 GiB maximum). When a chunk's samples would exceed
            it, the chunk spills into further shards; a single sample bigger than the
            limit still gets a shard of its own.
        image_format: ``"jpg"`` (default) or ``"png"``: how images are stored.
        jpeg_quality: JPEG quality 1-95, default 95.
        resolution: Target size in pixels, default 0 (keep the original size). See
            ``resize_mode``. Smaller images are upscaled; use ``min_size`` to drop them.
        resize_mode: One of :data:`mmtrain.data.images.PREP_RESIZE_MODES`, resized by
            :func:`mmtrain.data.images.resize_image` like the training loader does:
            ``"center_crop"`` (default: the centred square, scaled to ``resolution`` x
            ``resolution``), ``"resize"`` (squashed to ``resolution`` x ``resolution``),
            ``"keep_aspect"`` (shorter side to ``resolution``, aspect kept) or ``"none"``
            (never resize; then ``resolution`` must be 0).
        min_size: Drop images whose original shorter side is < min_size, default 0 (off).
        max_aspect: Drop images whose original long/short side ratio is > max_aspect,
            default 0.0 (off). Must be 0 or >= 1.
        min_caption_words: Drop captions with fewer whitespace-separated words,
            default 0 (off; empty captions are always dropped as ``empty_caption``).
        max_caption_words: Drop captions with more words, default 0 (off).
        dedup: Drop exact duplicates, default True. Two images are duplicates when
            their decoded RGB pixels (after EXIF orientation, before resizing) hash
            equal (BLAKE2b-128) and they come from different files; the first one in
            processing order (all val chunks, then all train chunks, each in input
            order) is kept, so a val image never reappears in train.
        val_fraction: Fraction of samples routed to ``out/val``, default 0.0 (everything
            in ``out/train``). The split hashes the sample's source identity (image
            path, COCO file name or input key) with ``split_seed``, so it does not
            depend on worker count or run, and all captions of one image share a split.
        split_seed: Salt for the split hash, default 0.
        prefix: Webdataset shard name prefix, default ``"shard"``.
        passthrough: Store the source file's bytes unchanged when nothing would change
            them (no resize, no EXIF rotation, RGB, already in ``image_format``),
            default True; avoids a second round of JPEG loss when re-sharding.
        workers: Processes that read, decode, filter, resize and encode, default 1
            (in-process). Output is byte-identical for any value.
        progress: Show a tqdm progress bar, default True.
        overwrite: Delete a previous, differently configured prep output in ``out``
            before writing, default False (such a run raises ValueError instead).
    """

    output_format: str = "wds"
    samples_per_shard: int = 1000
    shard_size: int = 0
    image_format: str = "jpg"
    jpeg_quality: int = 95
    resolution: int = 0
    resize_mode: str = "center_crop"
    min_size: int = 0
    max_aspect: float = 0.0
    min_caption_words: int = 0
    max_caption_words: int = 0
    dedup: bool = True
    val_fraction: float = 0.0
    split_seed: int = 0
    prefix: str = "shard"
    passthrough: bool = True
    workers: int = 1
    progress: bool = True
    overwrite: bool = False

    def validate(self) -> PrepConfig:
        """Raise ConfigError (a ValueError) naming the field on any invalid option; return self."""
        check_choice(self, "output_format", OUTPUT_FORMATS)
        check_image_options(self)
        check_int(self, "samples_per_shard", 1)
        check_int(self, "shard_size", 0)
        check_int(self, "min_size", 0)
        check_int(self, "min_caption_words", 0)
        check_int(self, "max_caption_words", 0)
        check_int(self, "split_seed", 0)
        check_int(self, "workers", 1)
        if self.output_format == "mds" and self.shard_size > MDS_MAX_SHARD_BYTES:
            raise ConfigError(f"PrepConfig.shard_size: MDS shards must stay below 4 GiB, got {self.shard_size}")
        if self.resize_mode == "none" and self.resolution:
            raise ConfigError(
                f"PrepConfig.resolution={self.resolution} contradicts resize_mode='none'; "
                "set resolution to 0 or pick center_crop/resize/keep_aspect"
            )
        if not isinstance(self.max_aspect, (int, float)) or isinstance(self.max_aspect, bool) or not (
            self.max_aspect == 0 or self.max_aspect >= 1
        ):
            raise ConfigError(f"PrepConfig.max_aspect: expected 0 (off) or a ratio >= 1, got {self.max_aspect!r}")
        if self.max_caption_words and self.max_caption_words < self.min_caption_words:
            raise ConfigError(
                f"PrepConfig.max_caption_words={self.max_caption_words} is below "
                f"min_caption_words={self.min_caption_words}"
            )
        if not isinstance(self.val_fraction, (int, float)) or isinstance(self.val_fraction, bool) or not (
            0.0 <= self.val_fraction < 1.0
        ):
            raise ConfigError(f"PrepConfig.val_fraction: expected a number in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.prefix, str) or not self.prefix or any(c in self.prefix for c in "/\\.") \
                or self.prefix.startswith("-"):
            raise ConfigError(f"PrepConfig.prefix: expected a file name prefix without '/', '\\' or '.', got {self.prefix!r}")
        return self

    def output_options(self) -> dict[str, Any]:
        """The options that determine the output bytes (not workers/progress/overwrite)."""
        skip = {"workers", "progress", "overwrite"}
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        # the resampling filter changes the pixels: output resized with another filter (Lanczos
        # before images.py became the one resize path) is not resumed or mixed with this one
        options["resample"] = RESAMPLE.name.lower()
        return options


def fingerprint(obj: Any) -> str:
    """Stable hex digest of a JSON-serialisable object (key order independent)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
