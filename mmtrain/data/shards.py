"""WebDataset shard IO: the one shard writer, and listing the shards of a source.

Every webdataset shard mmtrain writes goes through :class:`ShardFile` (one shard: written
under a hidden temporary name, renamed into place only once complete, so a crashed or
killed writer never leaves a truncated file under a final shard name; then its sidecar
index) and, for numbered shards ``{prefix}-{i:06d}.tar``, :class:`ShardWriter`: the image-
caption writer :func:`write_shards` (and the synthetic writer on it,
:func:`mmtrain.data.synthetic.write_synthetic_shards`), prep's chunk writer and the latent
precompute. :func:`remove_stale_shards` is the one clean-up of a larger earlier run's
shards, for the MDS writer too. Reading goes through :mod:`mmtrain.data.sources`.

:func:`write_shards` stores, per sample, members sharing the sample key: ``KEY.png`` (or
``KEY.jpg``), ``KEY.txt`` (UTF-8 caption), ``KEY.json`` (attributes) and optionally
``KEY.cls``. Converters from raw datasets (image folders, manifests, COCO, img2dataset
tars) to these shards or to MDS live in :mod:`mmtrain.data.prep`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm

from mmtrain.data import storage
from mmtrain.data.errors import ShardDataError  # noqa: F401 -- re-exported: the name readers catch
from mmtrain.data.images import IMAGE_FORMATS
from mmtrain.data.index import SIDECAR_SUFFIX, write_sidecar
from mmtrain.data.storage import is_url, store_for

logger = logging.getLogger("mmtrain.data")

# High enough that palette colours survive JPEG's chroma subsampling well
# enough for attribute estimation at >= 32 px.
JPEG_QUALITY = 95
# Fixed member mtime so identical samples always produce byte-identical shards.
# An int: tarfile writes a float mtime as an extra 1 KiB PAX header per member.
TAR_MTIME = 0


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


class ShardFile:
    """One webdataset shard being written: under a hidden temporary name, renamed into place by
    :meth:`commit` (then its sidecar index is written, :func:`mmtrain.data.index.write_sidecar`),
    deleted by :meth:`abort`. As a context manager it commits when the block ends normally and
    aborts on any exception (a KeyboardInterrupt too), so a killed writer never leaves a
    truncated file under a final shard name.

    ``write`` takes a ``TarWriter(encoder=False)`` dict: ``__key__`` plus member extension ->
    bytes; a key written twice into one shard is a ValueError naming the shard and key.
    """

    def __init__(self, final_path: str | os.PathLike[str]) -> None:
        self.final_path = os.fspath(final_path)
        self.tmp_path = _atomic_path(self.final_path)
        self.keys: set[str] = set()
        self.member_bytes = 0  # the members' share of the tar, headers included (see :func:`member_bytes`)
        self.info: dict[str, Any] | None = None  # {name, samples, bytes} once committed
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 -- held open across write() calls, closed in commit()/abort()
        # encoder=False: samples are already bytes, so we control the encoding.
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, encoded: dict[str, Any]) -> None:
        key = encoded["__key__"]
        if key in self.keys:
            raise ValueError(f"shard {self.final_path}: duplicate sample key {key!r}")
        self.keys.add(key)
        self._writer.write(encoded)
        self.member_bytes += member_bytes(encoded)

    def commit(self) -> dict[str, Any]:
        """Rename the complete shard into place and index it; ``{name, samples, bytes}`` of it."""
        self._writer.close()
        self._file.flush()
        # Durable before visible: the rename must not expose unflushed data.
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.final_path)
        # the index readers of remote shards fetch instead of scanning the tar (sha256 checks the download)
        write_sidecar(self.final_path)
        size = os.path.getsize(self.final_path)
        if size != tar_size(self.member_bytes):
            # Only a changed TarWriter header layout gets here; shard_size limits would then be approximate.
            logger.warning("shard %s: %d bytes, the size model predicted %d", self.final_path, size,
                           tar_size(self.member_bytes))
        self.info = {"name": os.path.basename(self.final_path), "samples": len(self.keys), "bytes": size}
        return self.info

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: S110, BLE001 -- the tar may be unusable; it is deleted anyway
            pass
        self._file.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to whole records
_END = 2 * _BLOCK  # two zero blocks close an archive


def member_bytes(encoded: dict[str, Any]) -> int:
    """Bytes a sample's members take in a shard: headers (built the way TarWriter builds them) + padded data.

    Exact, so a byte limit per shard (prep's ``shard_size``) is a real upper bound."""
    total = 0
    key = encoded["__key__"]
    for name, value in encoded.items():
        if name.startswith("__"):
            continue
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(value), TAR_MTIME, 0o444, "bigdata", "bigdata"
        total += len(info.tobuf(tarfile.PAX_FORMAT)) + -(-len(value) // _BLOCK) * _BLOCK
    return total


def tar_size(members: int) -> int:
    """File size of a tar whose members take ``members`` bytes (headers included)."""
    return -(-(members + _END) // _RECORD) * _RECORD


class ShardWriter:
    """Writes samples into consecutive shards ``{prefix}-{i:06d}.tar`` (numbered from ``start``), each
    a :class:`ShardFile`: the one way mmtrain writes webdataset shards (``write_shards``, the
    synthetic writer, prep, latents).

    A shard is closed after ``samples_per_shard`` samples (0: no limit) and before a sample
    that would take it past ``shard_size`` bytes (0: no limit; one oversized sample still
    gets a shard of its own). As a context manager the last shard is committed when the
    block ends normally, the open one deleted on any exception (completed shards stay).
    ``shards`` lists ``{name, samples, bytes}`` of the committed ones, in order.
    """

    def __init__(self, directory: str | os.PathLike[str], prefix: str = "shard", start: int = 0,
                 samples_per_shard: int = 0, shard_size: int = 0) -> None:
        self.dir = os.fspath(directory)
        self.prefix, self.next, self.samples_per_shard, self.shard_size = prefix, start, samples_per_shard, shard_size
        self.shards: list[dict[str, Any]] = []
        self._shard: ShardFile | None = None
        os.makedirs(self.dir, exist_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Delete the open shard, if any (the committed ones stay)."""
        if self._shard is not None:
            self._shard.abort()
            self._shard = None

    def write(self, encoded: dict[str, Any]) -> None:
        shard = self._shard
        if shard is not None and self.shard_size and \
                tar_size(shard.member_bytes + member_bytes(encoded)) > self.shard_size:
            self.close()
        if self._shard is None:
            self._shard = ShardFile(os.path.join(self.dir, shard_name(self.prefix, self.next)))
            self.next += 1
        self._shard.write(encoded)
        if self.samples_per_shard and len(self._shard.keys) == self.samples_per_shard:
            self.close()

    def close(self) -> None:
        """Commit the open shard, if any."""
        if self._shard is not None:
            shard, self._shard = self._shard, None
            self.shards.append(shard.commit())


def shard_name(prefix: str, index: int) -> str:
    """``{prefix}-{index:06d}.tar``: the name of every numbered shard mmtrain writes."""
    return f"{prefix}-{index:06d}.tar"


def remove_temp_shards(directory: str | os.PathLike[str], prefix: str = "") -> None:
    """Delete the temporary files of shards (and of their sidecar indexes) named ``{prefix}...``
    that a killed writer left in ``directory``."""
    for name in os.listdir(directory):
        if name.startswith(f".{prefix}") and ".tar" in name and name.endswith(".tmp"):
            os.remove(os.path.join(directory, name))


def remove_stale_shards(directory: str | os.PathLike[str], pattern: str, keep: set[str], what: str = "shard") -> None:
    """Delete the files of ``directory`` whose names fully match ``pattern`` (a regex) but are not in
    ``keep``, with their sidecar indexes: what a previous, larger run left behind, which would
    otherwise mix old samples into the new dataset (webdataset and MDS writers alike)."""
    compiled = re.compile(pattern)
    for name in sorted(os.listdir(directory)):
        if compiled.fullmatch(name) and name not in keep:
            path = os.path.join(directory, name)
            logger.warning("removing stale %s %s from a previous run", what, path)
            os.remove(path)
            if os.path.exists(path + SIDECAR_SUFFIX):
                os.remove(path + SIDECAR_SUFFIX)


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
    with ShardWriter(out_dir, prefix, samples_per_shard=samples_per_shard) as writer:
        for position, sample in enumerate(tqdm(samples, desc="writing shards", unit="sample", disable=not progress)):
            writer.write(_encode_sample(sample, image_format, position))
    paths = [os.path.join(out_dir, s["name"]) for s in writer.shards]
    if paths:
        remove_stale_shards(out_dir, rf"{re.escape(prefix)}-\d{{6}}\.tar", {s["name"] for s in writer.shards})
    else:
        # Never let an accidentally empty input wipe an existing dataset.
        logger.warning("write_shards: no samples given, nothing written to %s", out_dir)
    return paths


def subfolder_hint(path: str, listed: Mapping[str, int] | None = None) -> str:
    """For a directory (or URL prefix, with its ``listed`` objects) that holds no shards itself: "" or a hint
    naming its subfolders that do. ``mmtrain prep folder|manifest|coco|wds --out X`` writes ``X/train`` (and
    ``X/val``), ``prep synthetic --out X`` its shards into X, so a parent of either is a likely slip."""
    found: list[str] = []
    if listed is not None:
        prefix = path.rstrip("/") + "/"
        for url in listed:
            rest = url[len(prefix):] if url.startswith(prefix) else ""
            sub, _, name = rest.partition("/")
            if sub and "/" not in name and (name.endswith(".tar") or name == "index.json") and sub not in found:
                found.append(sub)
    elif os.path.isdir(path):
        for sub in os.listdir(path):
            d = os.path.join(path, sub)
            if not sub.startswith(".") and os.path.isdir(d) and (os.path.isfile(os.path.join(d, "index.json")) or any(
                    n.endswith(".tar") and not n.startswith(".") for n in os.listdir(d))):
                found.append(sub)
    if not found:
        return ""
    join = storage.join if listed is not None else os.path.join
    if "train" in found:
        val = f" and {join(path, 'val')} for data.val_shards" if "val" in found else ""
        return (f"; its train/ subfolder holds the shards (`mmtrain prep ... --out {path}` writes {path}/train"
                f"{' and /val' if val else ''}): use {join(path, 'train')} for data.train_shards{val}")
    shown = ", ".join(join(path, sub) for sub in sorted(found)[:5])
    return f"; its subfolders hold shards: point at one of them ({shown})"


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
            raise FileNotFoundError(f"shard directory {source!r} contains no .tar files{subfolder_hint(source)}")
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
        raise FileNotFoundError(f"shard source {source!r} holds no .tar shards{subfolder_hint(source, listed)}")
    return found
