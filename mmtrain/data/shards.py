"""WebDataset shard IO: write image-caption samples to tar shards and read them back.

A shard ``{prefix}-{i:06d}.tar`` holds, per sample, three members sharing the
sample key: ``KEY.png`` (or ``KEY.jpg``), ``KEY.txt`` (UTF-8 caption) and
``KEY.json`` (attributes). Shards are written under a hidden temporary name
and renamed into place only once complete, so a crashed or killed writer
never leaves a truncated file under a final shard name.

Converters from raw datasets (image folders, manifests, COCO, img2dataset tars) to
these shards or to MDS live in :mod:`mmtrain.data.prep`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm

from mmtrain.atomic import atomic_write_text
from mmtrain.data import storage
from mmtrain.data.errors import ShardDataError  # noqa: F401 -- re-exported: the name readers catch
from mmtrain.data.images import IMAGE_FORMATS
from mmtrain.data.index import SIDECAR_SUFFIX, write_sidecar
from mmtrain.data.storage import is_url, store_for
from mmtrain.data.synthetic import (
    COLORS,
    KINDS,
    POSITIONS,
    SIZES,
    SyntheticConfig,
    generate_sample,
    hold_out_name,
    is_held_out,
    synthetic_class,
)

logger = logging.getLogger("mmtrain.data")

# High enough that palette colours survive JPEG's chroma subsampling well
# enough for attribute estimation at >= 32 px.
JPEG_QUALITY = 95
# Fixed member mtime so identical samples always produce byte-identical shards.
# An int: tarfile writes a float mtime as an extra 1 KiB PAX header per member.
TAR_MTIME = 0
STATS_FILENAME = "stats.json"
HOLD_OUT_DIR = "holdout"  # under a synthetic dataset made with a hold-out: the held-out split


def _atomic_path(final_path: str) -> str:
    # Hidden and not ending in ".tar", so list_shards never picks it up.
    directory, name = os.path.split(final_path)
    return os.path.join(directory, f".{name}.tmp")


def _encode_image(image: Any, image_format: str, where: str) -> bytes:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{where}: field 'image' must be a PIL image, got {type(image).__name__}")  # noqa: TRY004 -- write_shards documents ValueError for every bad sample
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if image_format == "png":
        rgb.save(buffer, format="PNG")
    else:
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _encode_sample(sample: Mapping[str, Any], image_format: str, position: int) -> dict[str, Any]:
    """Turn a sample dict into the bytes-only dict that TarWriter stores."""
    where = f"sample #{position}"
    if not isinstance(sample, Mapping):
        raise ValueError(  # noqa: TRY004 -- write_shards documents ValueError for every bad sample
            f"{where}: expected a dict with keys key/image/caption/attributes, got {type(sample).__name__}"
        )
    missing = [k for k in ("key", "image", "caption", "attributes") if k not in sample]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (expected key, image, caption, attributes)")
    key = sample["key"]
    where = f"sample #{position} (key {key!r})"
    # WebDataset groups tar members into samples by the name up to the first
    # dot, so a dot or a slash in the key would split or misplace the sample.
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"{where}: field 'key' must be a non-empty string without '.' or '/'")
    if not isinstance(sample["caption"], str):
        raise ValueError(f"{where}: field 'caption' must be a str, got {type(sample['caption']).__name__}")  # noqa: TRY004 -- write_shards documents ValueError for every bad sample
    if not isinstance(sample["attributes"], Mapping):
        raise ValueError(f"{where}: field 'attributes' must be a dict, got {type(sample['attributes']).__name__}")  # noqa: TRY004 -- write_shards documents ValueError for every bad sample
    try:
        attributes = json.dumps(sample["attributes"], sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: field 'attributes' is not JSON-serialisable: {exc}") from exc
    encoded = {
        "__key__": key,
        image_format: _encode_image(sample["image"], image_format, where),
        "txt": sample["caption"].encode("utf-8"),
        "json": attributes.encode("utf-8"),
    }
    if sample.get("label") is not None:  # optional class label, webdataset's ``.cls`` convention
        if isinstance(sample["label"], bool) or not isinstance(sample["label"], int) or sample["label"] < 0:
            raise ValueError(f"{where}: field 'label' must be an int >= 0, got {sample['label']!r}")
        encoded["cls"] = str(sample["label"]).encode()
    return encoded


class _ShardFile:
    """One shard being written to its temporary name."""

    def __init__(self, final_path: str):
        self.final_path = final_path
        self.tmp_path = _atomic_path(final_path)
        self.keys: set[str] = set()
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 -- held open across write() calls, closed in commit()/abort()
        # encoder=False: samples are already bytes, so we control the encoding.
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME)

    def write(self, encoded: dict[str, Any]) -> None:
        key = encoded["__key__"]
        if key in self.keys:
            raise ValueError(f"shard {self.final_path}: duplicate sample key {key!r}")
        self.keys.add(key)
        self._writer.write(encoded)

    def commit(self) -> None:
        self._writer.close()
        self._file.flush()
        # Durable before visible: the rename must not expose unflushed data.
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.final_path)
        # the index readers of remote shards fetch instead of scanning the tar (sha256 checks the download)
        write_sidecar(self.final_path)

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: S110, BLE001 -- the tar may be unusable; it is deleted anyway
            pass
        self._file.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def _remove_stale_shards(out_dir: str, prefix: str, keep: set[str]) -> None:
    """Delete ``{prefix}-NNNNNN.tar`` files a previous, larger run left behind.

    Otherwise listing the directory would mix old samples into the new dataset.
    """
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    for name in sorted(os.listdir(out_dir)):
        if pattern.fullmatch(name) and name not in keep:
            logger.warning("removing stale shard %s from a previous run", os.path.join(out_dir, name))
            os.remove(os.path.join(out_dir, name))
            if os.path.exists(os.path.join(out_dir, name) + SIDECAR_SUFFIX):
                os.remove(os.path.join(out_dir, name) + SIDECAR_SUFFIX)


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    image_format: str = "png",
    progress: bool = True,
) -> list[str]:
    """Write ``samples`` into ``out_dir/{prefix}-{i:06d}.tar`` shards.

    Args:
        samples: dicts with "key" (str without '.' or '/'), "image" (PIL image,
            stored as RGB), "caption" (str) and "attributes" (JSON-serialisable
            dict).
        out_dir: output directory, created if missing.
        samples_per_shard: samples per shard (default 1000); the last shard may
            hold fewer.
        prefix: shard file name prefix (default "shard").
        image_format: "png" (default, lossless) or "jpg" (quality JPEG_QUALITY).
        progress: show a tqdm progress bar (default True).

    Returns:
        The final shard paths, in order. Each shard is written to
        ``.{name}.tmp`` and renamed into place only when complete; on error the
        partial shard is deleted, completed shards stay, and the error is
        re-raised. After a successful run that wrote at least one shard,
        ``{prefix}-NNNNNN.tar`` files beyond the ones written (left by an
        earlier, larger run) are deleted, so listing ``out_dir`` yields exactly
        this run's shards (shards with other prefixes are left alone).
    """
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"write_shards: samples_per_shard must be an int >= 1, got {samples_per_shard!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"write_shards: image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not prefix or os.sep in prefix or "/" in prefix:
        raise ValueError(f"write_shards: prefix must be a non-empty file name prefix, got {prefix!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    paths: list[str] = []
    shard: _ShardFile | None = None
    in_shard = 0
    try:
        for position, sample in enumerate(tqdm(samples, desc="writing shards", unit="sample", disable=not progress)):
            encoded = _encode_sample(sample, image_format, position)
            if shard is None:
                shard = _ShardFile(os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar"))
            shard.write(encoded)
            in_shard += 1
            if in_shard == samples_per_shard:
                shard.commit()
                paths.append(shard.final_path)
                shard, in_shard = None, 0
        if shard is not None:
            shard.commit()
            paths.append(shard.final_path)
            shard = None
    except BaseException:
        # BaseException: a KeyboardInterrupt must not leave a temp file either.
        if shard is not None:
            shard.abort()
        raise
    if paths:
        _remove_stale_shards(out_dir, prefix, {os.path.basename(p) for p in paths})
    else:
        # Never let an accidentally empty input wipe an existing dataset.
        logger.warning("write_shards: no samples given, nothing written to %s", out_dir)
    return paths


def list_shards(source: str | os.PathLike[str]) -> list[str]:
    """Resolve ``source`` to an ordered list of existing local shard paths.

    ``source`` is a directory (all its ``*.tar`` files, sorted; hidden files
    skipped), a single ``.tar`` file, or a brace pattern such as
    ``dir/shard-{000000..000003}.tar`` (expanded in order). Raises
    FileNotFoundError naming the path when the directory or a shard does not
    exist or the directory holds no ``.tar`` files.
    """
    source = os.fspath(source)
    if is_url(source):
        return [url for url, _ in list_remote_shards(source)]
    if "{" in source:
        paths = list(braceexpand(source))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            raise FileNotFoundError(f"shard pattern {source!r}: {len(missing)} shard(s) not found: {shown}")
        return paths
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.endswith(".tar") and not n.startswith("."))
        if not names:
            raise FileNotFoundError(f"shard directory {source!r} contains no .tar files")
        return [os.path.join(source, n) for n in names]
    if os.path.isfile(source):
        return [source]
    raise FileNotFoundError(
        f"shard source {source!r} does not exist (expected a directory of .tar shards, "
        f"a .tar file, or a brace pattern like dir/shard-{{000000..000009}}.tar)"
    )


def list_remote_shards(source: str, sizes: Callable[[str], dict[str, int] | None] | None = None) -> list[tuple[str, int]]:
    """``[(url, bytes)]`` of the tar shards at a URL: a prefix (every ``*.tar`` object right under it,
    sorted; needs a store that lists: s3, gs), one ``.tar`` or a brace pattern (checked one by one).

    ``sizes`` lists a prefix (default: the store's ``sizes``; a caller that listed it already
    passes its answer on). Raises FileNotFoundError naming the URL when a shard or the
    prefix's shards do not exist, PermissionError when the store refuses.
    """
    store = store_for(source)
    sizes = sizes or store.sizes
    if "{" in source or source.endswith(".tar"):
        urls = list(braceexpand(source))
        listed = sizes(storage.dirname(urls[0])) if len(urls) > 1 else None
        if listed is not None:
            missing = [u for u in urls if u not in listed]
            if missing:
                shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
                raise FileNotFoundError(f"shard source {source!r}: {len(missing)} shard(s) not found: {shown}")
            return [(u, listed[u]) for u in urls]
        return [(u, store.size(u)) for u in urls]  # FileNotFoundError names the URL
    listed = sizes(source)
    if listed is None:
        raise ValueError(f"shard source {source!r}: {source.split(':')[0]} cannot list a prefix; name the shards "
                         "with a brace pattern, e.g. https://host/data/shard-{000000..000099}.tar")
    prefix = source.rstrip("/") + "/"
    found = sorted((u, n) for u, n in listed.items()
                   if u.endswith(".tar") and "/" not in u[len(prefix):] and not storage.basename(u).startswith("."))
    if not found:
        raise FileNotFoundError(f"shard source {source!r} holds no .tar shards")
    return found


def _histogram(values: Iterable[int]) -> dict[str, int]:
    # JSON object keys are strings; sort numerically so the file reads naturally.
    counts = Counter(values)
    return {str(k): counts[k] for k in sorted(counts)}


def write_synthetic_shards(
    out_dir: str | os.PathLike[str],
    num: int,
    cfg: SyntheticConfig,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    progress: bool = True,
    hold_out: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """Generate synthetic samples ``0..num-1`` into shards plus ``stats.json``.

    Args:
        out_dir: output directory (created if missing).
        num: number of samples, >= 1.
        cfg: the synthetic dataset config (image size, shape counts, seed).
        samples_per_shard, image_format, progress: as in :func:`write_shards`.
        hold_out: attribute combinations (:func:`~mmtrain.data.synthetic.parse_hold_out`)
            kept out of these shards: a sample with a shape that matches one goes to the
            held-out split ``out_dir/holdout`` instead (its own shards and ``stats.json``),
            which then holds only such samples. Default: none.

    Returns:
        The stats dict, identical to what is written (atomically) to
        ``out_dir/stats.json``:

        - ``num_samples``, ``num_shards``, ``shard_files`` (basenames, in order),
          ``samples_per_shard``, ``image_format``;
        - the config: ``image_size``, ``seed``, ``min_shapes``, ``max_shapes``;
        - ``counts``: ``{"kind"|"color"|"size"|"position": {value: count}}``
          over all shapes, every vocabulary value listed (zeros included);
        - ``shape_count_histogram`` and ``caption_length_histogram`` (words):
          ``{str(n): samples}``, numerically sorted;
        - ``caption_length_min``, ``caption_length_max``, ``caption_length_mean``;
        - ``elapsed_s`` and ``samples_per_s``: generation + writing throughput.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"write_synthetic_shards: num must be an int >= 1, got {num!r}")
    out_dir = os.fspath(out_dir)
    counts = {field: Counter() for field in ("kind", "color", "size", "position")}
    shape_counts: list[int] = []
    caption_lengths: list[int] = []

    held: list[dict[str, Any]] = []

    def generate() -> Iterator[dict[str, Any]]:
        # Stats are gathered on the fly so samples are never held in memory (held-out ones are: a few %).
        for index in range(num):
            sample = generate_sample(index, cfg)
            shapes = sample["attributes"]["shapes"]
            if hold_out and is_held_out(shapes, hold_out):
                sample["label"] = synthetic_class(shapes[0])
                held.append(sample)
                continue
            sample["label"] = synthetic_class(shapes[0])
            for shape in shapes:
                for field, counter in counts.items():
                    counter[shape[field]] += 1
            shape_counts.append(len(shapes))
            caption_lengths.append(len(sample["caption"].split()))
            yield sample

    start = time.perf_counter()
    paths = write_shards(generate(), out_dir, samples_per_shard, image_format=image_format, progress=progress)
    elapsed = time.perf_counter() - start
    if not paths:
        raise ValueError(f"write_synthetic_shards: every one of the {num} samples matches the hold-out "
                         f"{[hold_out_name(c) for c in hold_out]}; nothing is left to train on")
    num_kept = num - len(held)

    vocab = {"kind": KINDS, "color": COLORS, "size": SIZES, "position": POSITIONS}
    stats: dict[str, Any] = {
        "num_samples": num_kept,
        "num_shards": len(paths),
        "shard_files": [os.path.basename(p) for p in paths],
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "min_shapes": cfg.min_shapes,
        "max_shapes": cfg.max_shapes,
        # Every vocabulary entry is listed, zeros included, so a missing class is visible.
        "counts": {field: {v: counts[field][v] for v in vocab[field]} for field in vocab},
        "shape_count_histogram": _histogram(shape_counts),
        "caption_length_histogram": _histogram(caption_lengths),
        "caption_length_min": min(caption_lengths),
        "caption_length_max": max(caption_lengths),
        "caption_length_mean": sum(caption_lengths) / len(caption_lengths),
        "elapsed_s": elapsed,
        # Guard the division: JSON has no infinity.
        "samples_per_s": num / max(elapsed, 1e-9),
    }
    if hold_out:
        held_dir = os.path.join(out_dir, HOLD_OUT_DIR)
        held_paths = write_shards(held, held_dir, samples_per_shard, image_format=image_format, progress=False)
        stats.update(hold_out=[hold_out_name(c) for c in hold_out], generated=num, held_out_samples=len(held))
        held_stats = {"num_samples": len(held), "num_shards": len(held_paths),
                      "shard_files": [os.path.basename(p) for p in held_paths], "hold_out": stats["hold_out"],
                      "split": "held out: only samples with a held-out combination", "seed": cfg.seed,
                      "image_size": cfg.image_size}
        if held:
            atomic_write_text(os.path.join(held_dir, STATS_FILENAME), json.dumps(held_stats, indent=2) + "\n")
    stats_path = os.path.join(out_dir, STATS_FILENAME)
    atomic_write_text(stats_path, json.dumps(stats, indent=2) + "\n")
    logger.info(
        "wrote %d synthetic samples in %d shard(s) to %s in %.2fs (%.1f samples/s)%s",
        num_kept, len(paths), out_dir, elapsed, stats["samples_per_s"],
        f"; {len(held)} held out ({', '.join(stats['hold_out'])}) to {os.path.join(out_dir, HOLD_OUT_DIR)}" if hold_out else "",
    )
    return stats
