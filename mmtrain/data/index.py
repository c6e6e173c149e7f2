"""Per-sample index of a webdataset tar shard: where each member's bytes are, for random access.

A shard is scanned once with :mod:`tarfile` (headers only: ``tarfile`` seeks past member
data), members are grouped into samples by key the way webdataset groups them (the
member name up to the first dot of its basename; consecutive members), and the result
is cached as JSON under ``cache_dir``, keyed by the shard's absolute path, size and
mtime: a rewritten shard is re-scanned, an unchanged one is read from the cache.

Recognised members of sample ``KEY`` (extensions are matched case-insensitively):

- ``KEY.jpg`` | ``KEY.jpeg`` | ``KEY.png`` | ``KEY.webp``: the encoded image;
- ``KEY.txt``: the UTF-8 caption (required);
- ``KEY.json``: metadata (optional, not read by the training loader);
- ``KEY.cls``: decimal class label (optional);
- ``KEY.latent.npy``: precomputed latent, an ``.npy`` float16/float32 array ``C, h, w`` (optional).

Other members are ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mmtrain.atomic import atomic_write_text
from mmtrain.data.shards import ShardDataError

logger = logging.getLogger("mmtrain.data")

INDEX_VERSION = 1
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
# Field name in the index -> member extensions that fill it (first one present wins).
FIELDS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_EXTENSIONS,
    "txt": ("txt",),
    "json": ("json",),
    "cls": ("cls",),
    "latent": ("latent.npy",),
}
_EXT_TO_FIELD = {ext: name for name, exts in FIELDS.items() for ext in exts}
# webdataset's ``base_plus_ext``: key = directory + basename up to the first dot.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class TarIndex:
    """Where the members of every sample of one tar shard are.

    ``keys`` are the sample keys in file order; for each field of :data:`FIELDS`,
    ``offsets[field][i]`` / ``sizes[field][i]`` locate sample i's member data in the
    file (offset -1 when the sample has no such member).
    """

    path: str
    keys: list[str]
    offsets: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.keys)


def scan_tar(path: str) -> TarIndex:
    """Read the member headers of ``path`` and group them into samples.

    Raises ShardDataError naming the shard (and the key) when the file is not an
    uncompressed tar, or a key appears in two separate runs of members (webdataset
    would split it into two broken samples).
    """
    keys: list[str] = []
    columns: dict[str, tuple[list[int], list[int]]] = {f: ([], []) for f in FIELDS}
    seen: set[str] = set()
    current: str | None = None
    try:
        # "r:" = uncompressed only: compressed tars have no random access.
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.removeprefix("./")
                match = _KEY_EXT.match(name)
                if match is None or os.path.basename(name).startswith((".", "__")):
                    continue  # no extension, hidden or webdataset meta member
                key, ext = match.group(1), match.group(2).lower()
                if key != current:
                    if key in seen:
                        raise ShardDataError(
                            f"shard {path}: sample key {key!r} appears in two separate runs of members "
                            f"(members of a sample must be consecutive in the tar)"
                        )
                    seen.add(key)
                    keys.append(key)
                    for offs, sizes in columns.values():
                        offs.append(-1)
                        sizes.append(0)
                    current = key
                field = _EXT_TO_FIELD.get(ext)
                if field is None:
                    continue
                offs, sizes = columns[field]
                if offs[-1] == -1:  # the first image member wins when a sample has several
                    offs[-1] = member.offset_data
                    sizes[-1] = member.size
    except tarfile.ReadError as exc:
        raise ShardDataError(f"shard {path}: not a readable uncompressed tar archive ({exc}); "
                             "random access needs plain .tar shards, not .tar.gz") from exc
    except OSError as exc:
        raise ShardDataError(f"shard {path}: cannot read: {exc}") from exc
    return TarIndex(
        path=path,
        keys=keys,
        offsets={f: np.asarray(o, dtype=np.int64) for f, (o, _) in columns.items()},
        sizes={f: np.asarray(s, dtype=np.int64) for f, (_, s) in columns.items()},
    )


def _cache_file(cache_dir: str, path: str, stat: os.stat_result) -> str:
    ident = f"{INDEX_VERSION}\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return os.path.join(cache_dir, hashlib.sha256(ident.encode()).hexdigest()[:40] + ".json")


def _to_json(index: TarIndex, stat: os.stat_result) -> str:
    return json.dumps({
        "version": INDEX_VERSION,
        "path": os.path.abspath(index.path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "keys": index.keys,
        "offsets": {f: a.tolist() for f, a in index.offsets.items()},
        "sizes": {f: a.tolist() for f, a in index.sizes.items()},
    }, separators=(",", ":"))


def _from_json(text: str, path: str, stat: os.stat_result) -> TarIndex | None:
    try:
        obj = json.loads(text)
        if (obj["version"], obj["path"], obj["size"], obj["mtime_ns"]) != (
                INDEX_VERSION, os.path.abspath(path), stat.st_size, stat.st_mtime_ns):
            return None
        n = len(obj["keys"])
        offsets = {f: np.asarray(obj["offsets"][f], dtype=np.int64) for f in FIELDS}
        sizes = {f: np.asarray(obj["sizes"][f], dtype=np.int64) for f in FIELDS}
        if any(len(a) != n for a in (*offsets.values(), *sizes.values())):
            return None
        return TarIndex(path=path, keys=list(obj["keys"]), offsets=offsets, sizes=sizes)
    except (ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is rebuilt, never trusted


def load_tar_index(path: str, cache_dir: str = "") -> TarIndex:
    """The index of one shard, from ``cache_dir`` when it holds a current entry, else scanned (and cached).

    ``cache_dir`` "" disables caching. Cache entries are written atomically, so ranks
    indexing the same shards at once never read a half-written entry.
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise FileNotFoundError(f"shard {path}: cannot stat: {exc}") from exc
    cache_file = _cache_file(cache_dir, path, stat) if cache_dir else ""
    if cache_file and os.path.isfile(cache_file):
        with open(cache_file, encoding="utf-8") as fh:
            index = _from_json(fh.read(), path, stat)
        if index is not None:
            return index
        logger.warning("index cache entry %s for %s is stale or damaged; rescanning", cache_file, path)
    index = scan_tar(path)
    if cache_file:
        try:
            atomic_write_text(cache_file, _to_json(index, stat))
        except OSError as exc:  # a read-only cache costs time, not correctness
            logger.warning("cannot write index cache %s: %s", cache_file, exc)
    return index


def load_tar_indexes(paths: list[str], cache_dir: str = "", threads: int = 8) -> list[TarIndex]:
    """:func:`load_tar_index` for many shards, scanned in parallel threads (I/O bound), in order."""
    if cache_dir:
        cache_dir = os.path.expanduser(cache_dir)
    if len(paths) <= 1 or threads <= 1:
        return [load_tar_index(p, cache_dir) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        return list(pool.map(lambda p: load_tar_index(p, cache_dir), paths))
