"""Per-sample index of a webdataset tar shard: where each member's bytes are, for random access.

Every shard mmtrain writes gets a sidecar index next to it, ``NAME.tar.index.json``
(``{version, shard, size, sha256, keys, offsets, sizes}``), so a reader of a shard in
object storage fetches a few KB to know every sample, and can check the downloaded shard
against its size and sha256. Shards without a sidecar (other tools' output) are indexed
by reading their member headers (:mod:`mmtrain.data.tar`): locally on the spot, with
the result cached as JSON under ``cache_dir`` keyed by absolute path, size and mtime; a
remote shard must get its sidecar first (``mmtrain prep index URL``).

Recognised members of sample ``KEY`` (extensions are matched case-insensitively):

- ``KEY.jpg`` | ``KEY.jpeg`` | ``KEY.png`` | ``KEY.webp``: the encoded image;
- ``KEY.txt``: the UTF-8 caption (required);
- ``KEY.json``: metadata (optional, not read by the training loader);
- ``KEY.cls``: decimal class label (optional);
- ``KEY.latent.npy``: precomputed latent, an ``.npy`` float16/float32 array ``C, h, w`` (optional).

Other members are not indexed one by one; the index records every sample's byte span
(:data:`SPAN`, first header to last padded data, see :class:`mmtrain.data.tar.TarSample`), so
a document (``KEY.json`` + image members ``KEY.0.jpg``, ``KEY.1.png``, ... named by the JSON,
:mod:`mmtrain.data.documents`) is read with one read of its span. Sidecars written before
spans were indexed load with the span unknown (-1): reading a document from them asks for
``mmtrain prep index``; pair samples read as before.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mmtrain.atomic import atomic_write_text
from mmtrain.data.errors import ShardDataError
from mmtrain.data.images import IMAGE_EXTENSIONS
from mmtrain.data.tar import iter_tar_samples

logger = logging.getLogger("mmtrain.data")

INDEX_VERSION = 1
SIDECAR_SUFFIX = ".index.json"
# Field name in the index -> member extensions that fill it (first one present wins).
FIELDS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_EXTENSIONS,
    "txt": ("txt",),
    "json": ("json",),
    "cls": ("cls",),
    "latent": ("latent.npy",),
}
SPAN = "sample"  # the field holding each sample's byte span (offset of its first header, bytes through its last data)
INDEXED: tuple[str, ...] = (*FIELDS, SPAN)  # every field of offsets/sizes


@dataclass
class TarIndex:
    """Where the members of every sample of one tar shard are.

    ``keys`` are the sample keys in file order; for each field of :data:`INDEXED`,
    ``offsets[field][i]`` / ``sizes[field][i]`` locate sample i's member data (its whole
    span for :data:`SPAN`) in the file (offset -1 when the sample has no such member, or
    the span is unknown). ``size`` and ``sha256`` describe
    the whole shard file when known (sidecar indexes record both), else -1 / "".
    """

    path: str
    keys: list[str]
    offsets: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]
    size: int = -1
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.keys)


def scan_tar(path: str, where: str = "") -> TarIndex:
    """Index ``path`` from its member headers; ShardDataError naming the shard (``where``) when it cannot."""
    keys: list[str] = []
    columns: dict[str, tuple[list[int], list[int]]] = {f: ([], []) for f in INDEXED}
    for sample in iter_tar_samples(path, where):
        keys.append(sample.key)
        for name, exts in FIELDS.items():
            found = next((sample.members[e] for e in exts if e in sample.members), (-1, 0))
            columns[name][0].append(found[0])
            columns[name][1].append(found[1])
        columns[SPAN][0].append(sample.start)
        columns[SPAN][1].append(sample.end - sample.start)
    return TarIndex(
        path=path,
        keys=keys,
        offsets={f: np.asarray(o, dtype=np.int64) for f, (o, _) in columns.items()},
        sizes={f: np.asarray(s, dtype=np.int64) for f, (_, s) in columns.items()},
    )


def file_digest(path: str, algo: str = "sha256") -> str:
    """Hex digest of a file, read in 4 MiB chunks (the shard digests of sidecar and MDS indexes)."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(shard: str) -> str:
    """``NAME.tar`` -> ``NAME.tar.index.json`` (a local path or a URL)."""
    return shard + SIDECAR_SUFFIX


def sidecar_json(index: TarIndex, size: int, sha256: str) -> str:
    return json.dumps({
        "version": INDEX_VERSION,
        "shard": os.path.basename(index.path),
        "size": size,
        "sha256": sha256,
        "keys": index.keys,
        "offsets": {f: a.tolist() for f, a in index.offsets.items()},
        "sizes": {f: a.tolist() for f, a in index.sizes.items()},
    }, separators=(",", ":"))


def write_sidecar(shard: str, where: str = "") -> str:
    """Index the local tar ``shard`` and write its sidecar next to it (atomically); returns the sidecar's path."""
    index = scan_tar(shard, where)
    path = sidecar_path(shard)
    atomic_write_text(path, sidecar_json(index, os.path.getsize(shard), file_digest(shard)))
    return path


def parse_sidecar(text: str | bytes, shard: str, where: str) -> TarIndex:
    """A sidecar's content as a TarIndex for ``shard``; ShardDataError naming ``where`` when it is malformed."""
    try:
        obj = json.loads(text)
        if obj["version"] != INDEX_VERSION:
            raise ValueError(f"version {obj['version']!r}, expected {INDEX_VERSION}")
        n = len(obj["keys"])
        offsets = {f: np.asarray(obj["offsets"][f], dtype=np.int64) for f in FIELDS}
        sizes = {f: np.asarray(obj["sizes"][f], dtype=np.int64) for f in FIELDS}
        # spans: absent from sidecars written before documents; unknown then (-1), pair reads need none
        offsets[SPAN] = np.asarray(obj["offsets"].get(SPAN, [-1] * n), dtype=np.int64)
        sizes[SPAN] = np.asarray(obj["sizes"].get(SPAN, [0] * n), dtype=np.int64)
        if any(len(a) != n for a in (*offsets.values(), *sizes.values())):
            raise ValueError("the offset and size lists do not match the key list in length")
        return TarIndex(path=shard, keys=[str(k) for k in obj["keys"]], offsets=offsets, sizes=sizes,
                        size=int(obj["size"]), sha256=str(obj.get("sha256", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardDataError(f"shard index {where}: malformed ({exc}); rewrite it with `mmtrain prep index`") from exc


def _cache_file(cache_dir: str, path: str, stat: os.stat_result) -> str:
    ident = f"{INDEX_VERSION}{SPAN}\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return os.path.join(cache_dir, hashlib.sha256(ident.encode()).hexdigest()[:40] + ".json")


def load_tar_index(path: str, cache_dir: str = "") -> TarIndex:
    """The index of one local shard: its sidecar when that matches the file's size, else the
    ``cache_dir`` entry, else a header scan (then cached; ``cache_dir`` "" = no cache).

    Cache entries are written atomically, so ranks indexing the same shards at once never
    read a half-written entry; a damaged or stale entry is rebuilt, never trusted.
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise FileNotFoundError(f"shard {path}: cannot stat: {exc}") from exc
    side = sidecar_path(path)
    if os.path.isfile(side):
        try:
            with open(side, encoding="utf-8") as fh:
                index = parse_sidecar(fh.read(), path, side)
            if index.size == stat.st_size:
                return index
            logger.warning("shard index %s describes %d bytes but %s has %d; rescanning", side, index.size, path, stat.st_size)
        except (OSError, ShardDataError) as exc:
            logger.warning("%s; rescanning %s", exc, path)
    cache_file = _cache_file(cache_dir, path, stat) if cache_dir else ""
    if cache_file and os.path.isfile(cache_file):
        try:
            with open(cache_file, encoding="utf-8") as fh:
                index = parse_sidecar(fh.read(), path, cache_file)
            if index.size == stat.st_size:
                return index
        except (OSError, ShardDataError):
            pass
        logger.warning("index cache entry %s for %s is stale or damaged; rescanning", cache_file, path)
    index = scan_tar(path)
    index.size = stat.st_size
    if cache_file:
        try:
            atomic_write_text(cache_file, sidecar_json(index, stat.st_size, ""))
        except OSError as exc:  # a read-only cache costs time, not correctness
            logger.warning("cannot write index cache %s: %s", cache_file, exc)
    return index


def load_tar_indexes(paths: list[str], cache_dir: str = "", threads: int = 8) -> list[TarIndex]:
    """:func:`load_tar_index` for many shards, in parallel threads (I/O bound), in order."""
    if cache_dir:
        cache_dir = os.path.expanduser(cache_dir)
    if len(paths) <= 1 or threads <= 1:
        return [load_tar_index(p, cache_dir) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        return list(pool.map(lambda p: load_tar_index(p, cache_dir), paths))


def load_remote_tar_indexes(urls: list[str], sizes: list[int], threads: int = 16) -> list[TarIndex]:
    """The sidecar indexes of remote shards (fetched in parallel); each must describe its shard's listed size.

    Raises FileNotFoundError naming the shard when its sidecar is missing, ShardDataError
    when it is malformed or describes another size (the shard was rewritten after it).
    """
    from mmtrain.data.storage import read_bytes

    def one(url_size: tuple[str, int]) -> TarIndex:
        url, size = url_size
        side = sidecar_path(url)
        try:
            text = read_bytes(side)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"shard {url} has no index {side}: remote tar shards need one; write it "
                                    f"with `mmtrain prep index {os.path.dirname(url)}` ({exc})") from exc
        index = parse_sidecar(text, url, side)
        if index.size != size:
            raise ShardDataError(f"shard index {side} describes {index.size} bytes but {url} has {size}: the shard "
                                 "was rewritten after its index; rewrite it with `mmtrain prep index`")
        return index

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        return list(pool.map(one, zip(urls, sizes)))
