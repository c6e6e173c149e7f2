"""Random access to the samples of one data source: webdataset tar shards or a mosaicml-streaming MDS directory.

A source is indexed once when it is opened (in the main process, so bad paths and
malformed datasets fail before any worker starts) and then read sample by sample with
``os.pread`` on file descriptors each process opens lazily and keeps in a small LRU.
The index is plain numpy arrays, so forked dataloader workers share it copy-on-write.

Sample schema (the contract with the data_prep converters):

- webdataset tar shards: members ``KEY.jpg|jpeg|png|webp`` (encoded image), ``KEY.txt``
  (UTF-8 caption), optional ``KEY.json``, ``KEY.cls`` (decimal int), ``KEY.latent.npy``
  (npy float16/32 array ``C, h, w``); see :mod:`mmtrain.data.index`.
- MDS directories (``index.json`` + ``shard.*.mds``, uncompressed): columns ``key: str``,
  ``image: bytes`` (encoded image file; ``jpeg``/``png``/``pil`` encodings are accepted
  too), ``caption: str``, optional ``json: json``, ``cls: int`` (any integer encoding),
  ``latent: ndarray``.
"""
from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmtrain.data.index import FIELDS, TarIndex, load_tar_indexes
from mmtrain.data.shards import ShardDataError, list_shards

FORMATS: tuple[str, ...] = ("auto", "wds", "mds")
MAX_OPEN_FILES = 64  # per process and source: a global permutation touches every shard


@dataclass
class RawSample:
    """One sample as stored, with only the cheap fields decoded.

    ``image`` is the encoded image file (bytes), a PIL image (MDS image encodings that
    decode themselves) or None when not requested; ``latent`` a float32 array or None.
    ``where`` names the file and key for error messages.
    """

    key: str
    where: str
    caption: str
    label: int | None
    image: Any = None
    latent: np.ndarray | None = None


class _Files:
    """Read-only file descriptors opened on demand, at most ``MAX_OPEN_FILES``, reopened after fork."""

    def __init__(self) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def fd(self, path: str) -> int:
        if self._pid != os.getpid():  # inherited through fork: this process opens its own
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        while len(self._fds) >= MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        return fd

    def pread(self, path: str, size: int, offset: int) -> bytes:
        data = os.pread(self.fd(path), size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset} (truncated file?)")
        return data

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        return {}  # descriptors never travel to another process

    def __setstate__(self, state: dict) -> None:
        self.__init__()


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # header bytes -> dtype, shape, fortran


def _npy_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int] | None:
    """Parse an ``.npy`` header, cached by its bytes (the latents of a dataset share one); None if unusual."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10 or data[6] not in (1, 2):
        return None
    start = 10 if data[6] == 1 else 12
    length = int.from_bytes(data[8:start], "little")
    header = data[start:start + length]
    parsed = _npy_headers.get(header)
    if parsed is None:
        buf = io.BytesIO(data[:start + length])
        try:
            version = np.lib.format.read_magic(buf)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(buf)
        except (ValueError, OSError):
            return None
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_npy_headers) < 64:
            _npy_headers[header] = parsed
    return (*parsed, start + length)


def decode_latent(data: bytes, where: str) -> np.ndarray:
    """``.npy`` bytes -> float array ``C, h, w`` (dtype as stored); ShardDataError naming ``where`` otherwise."""
    if not data.startswith(_NPY_MAGIC):
        raise ShardDataError(f"{where}: field 'latent' is not .npy data (it does not start with the NUMPY magic)")
    parsed = _npy_header(data)
    if parsed is not None and not parsed[0].hasobject:
        dtype, shape, fortran, offset = parsed
        count = int(np.prod(shape))
        if len(data) - offset == count * dtype.itemsize:
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
            return _check_latent(array, where)
    try:  # anything unusual: numpy's full reader (and its error message)
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ShardDataError(f"{where}: cannot decode field 'latent' (expected .npy bytes): {exc}") from exc
    return _check_latent(array, where)


def _check_latent(array: Any, where: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.dtype.kind != "f":
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", type(array).__name__)
        raise ShardDataError(f"{where}: field 'latent' is {dtype} with shape {shape}, expected a float array C, h, w")
    return array


def _parse_label(value: Any, where: str) -> int:
    try:
        label = int(value.decode("ascii").strip() if isinstance(value, bytes) else value)
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ShardDataError(f"{where}: cannot decode field 'cls' (expected an integer class label): {exc}") from exc
    return label


class WdsSource:
    """Webdataset tar shards with a per-sample member index (see :mod:`mmtrain.data.index`)."""

    format = "wds"

    def __init__(self, spec: str, cache_dir: str = "") -> None:
        self.spec = spec
        self.shards = list_shards(spec)
        indexes: list[TarIndex] = load_tar_indexes(self.shards, cache_dir)
        counts = np.asarray([len(ix) for ix in indexes], dtype=np.int64)
        self.shard_of = np.repeat(np.arange(len(indexes), dtype=np.int32), counts)  # sample -> shard
        self.offsets = {f: np.concatenate([ix.offsets[f] for ix in indexes]) for f in FIELDS}
        self.sizes = {f: np.concatenate([ix.sizes[f] for ix in indexes]) for f in FIELDS}
        # Fixed-width bytes: no per-key Python objects, so forked workers share the pages.
        self.keys = np.asarray([k.encode("utf-8") for ix in indexes for k in ix.keys], dtype=np.bytes_)
        self._files = _Files()

    def __len__(self) -> int:
        return len(self.shard_of)

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8")

    def where(self, i: int) -> str:
        return f"shard {self.shards[self.shard_of[i]]}, sample {self.key(i)}"

    def has_field(self, field: str) -> np.ndarray:
        return self.offsets[field] >= 0

    def validate(self, need_image: bool, need_latent: bool) -> None:
        """Every sample must have a caption, and an image (or a latent with ``need_latent``)."""
        required = [("txt", "a caption member KEY.txt")]
        if need_image:
            required.append(("image", "an image member KEY.jpg|jpeg|png|webp"))
        if need_latent:
            required.append(("latent", "a latent member KEY.latent.npy (data.use_latents is on)"))
        for field, what in required:
            missing = np.flatnonzero(~self.has_field(field))
            if len(missing):
                raise ShardDataError(f"{self.where(int(missing[0]))}: has no {what}"
                                     f"{f' ({len(missing)} samples in {self.spec} lack it)' if len(missing) > 1 else ''}")

    def _member(self, i: int, field: str) -> bytes:
        return self._files.pread(self.shards[self.shard_of[i]], int(self.sizes[field][i]), int(self.offsets[field][i]))

    def read(self, i: int, want_image: bool = True, want_latent: bool = False) -> RawSample:
        where = self.where(i)
        try:
            try:
                caption = self._member(i, "txt").decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ShardDataError(f"{where}: cannot decode field 'txt' (expected UTF-8 text): {exc}") from exc
            label = _parse_label(self._member(i, "cls"), where) if self.offsets["cls"][i] >= 0 else None
            image = self._member(i, "image") if want_image and self.offsets["image"][i] >= 0 else None
            latent = decode_latent(self._member(i, "latent"), where) if want_latent and self.offsets["latent"][i] >= 0 else None
        except OSError as exc:
            raise ShardDataError(f"{where}: cannot read: {exc}") from exc
        return RawSample(key=self.key(i), where=where, caption=caption, label=label, image=image, latent=latent)

    def read_metadata(self, i: int) -> dict | None:
        """The sample's ``KEY.json`` object (e.g. the synthetic generator's ground truth), or None."""
        if self.offsets["json"][i] < 0:
            return None
        try:
            value = json.loads(self._member(i, "json"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardDataError(f"{self.where(i)}: cannot decode field 'json' (expected a JSON object): {exc}") from exc
        if not isinstance(value, dict):
            raise ShardDataError(f"{self.where(i)}: field 'json' holds a {type(value).__name__}, expected a JSON object")
        return value

    def close(self) -> None:
        self._files.close()


# Allowed MDS encodings per column; None = any integer encoding / any ndarray encoding.
_MDS_INT = {"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "str_int"}
_MDS_COLUMNS: dict[str, tuple[bool, set[str] | None, str]] = {
    # name: (required, allowed encodings, description)
    "key": (True, {"str"}, "str"),
    "image": (False, {"bytes", "jpeg", "png", "pil"}, "bytes (an encoded image file)"),
    "caption": (True, {"str"}, "str"),
    "json": (False, {"json"}, "json"),
    "cls": (False, _MDS_INT, "an integer encoding (int)"),
    "latent": (False, None, "ndarray"),
}


class MdsSource:
    """An MDS directory (``index.json`` + uncompressed ``shard.*.mds``), read with ``os.pread``.

    The sample layout is the one :class:`streaming.MDSWriter` writes (offset table, then
    per-column sizes and bytes); columns are decoded with streaming's own ``mds_decode``.
    """

    format = "mds"

    def __init__(self, spec: str) -> None:
        # heavy import: only for MDS sources
        from streaming.base.format.mds.encodings import is_mds_encoding

        self.spec = spec
        root = os.path.dirname(spec) if os.path.basename(spec) == "index.json" else spec
        self.index_file = os.path.join(root, "index.json")
        if not os.path.isfile(self.index_file):
            raise FileNotFoundError(f"MDS source {spec!r}: {self.index_file} does not exist")
        try:
            with open(self.index_file, encoding="utf-8") as fh:
                obj = json.load(fh)
            shards = obj["shards"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardDataError(f"{self.index_file}: not a valid MDS index ({exc!r})") from exc
        if not shards:
            raise ShardDataError(f"{self.index_file}: lists no shards")
        self.files: list[str] = []
        counts = []
        names = encodings = sizes = None
        for n, shard in enumerate(shards):
            where = f"{self.index_file} (shard #{n})"
            if shard.get("format") != "mds" or shard.get("version") != 2:
                raise ShardDataError(f"{where}: format {shard.get('format')!r} version {shard.get('version')!r}; "
                                     "only MDS version 2 shards (streaming.MDSWriter) are supported")
            shard_names, shard_enc = shard["column_names"], shard["column_encodings"]
            if names is None:
                names, encodings, sizes = shard_names, shard_enc, shard["column_sizes"]
                self._check_columns(names, encodings, is_mds_encoding)
            elif (shard_names, shard_enc) != (names, encodings):
                raise ShardDataError(f"{where}: columns {dict(zip(shard_names, shard_enc))} differ from the first "
                                     f"shard's {dict(zip(names, encodings))}")
            raw = shard.get("raw_data") or {}
            path = os.path.join(root, raw.get("basename", ""))
            if not raw or not os.path.isfile(path):
                zipped = (shard.get("zip_data") or {}).get("basename")
                if zipped:
                    raise ShardDataError(f"{where}: only the compressed shard {os.path.join(root, zipped)} "
                                         f"({shard.get('compression')}) exists; random access needs uncompressed "
                                         "shards: write with MDSWriter(compression=None)")
                raise FileNotFoundError(f"{where}: shard file {path} does not exist")
            self.files.append(path)
            counts.append(int(shard["samples"]))
        self.column_names: list[str] = names
        self.column_encodings: list[str] = encodings
        self.column_sizes: list[int | None] = sizes
        self.column_index = {c: k for k, c in enumerate(names)}
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard k holds [starts[k], starts[k+1])
        self._files = _Files()

    def _check_columns(self, names: list[str], encodings: list[str], is_mds_encoding) -> None:
        columns = dict(zip(names, encodings))
        for name, (required, allowed, what) in _MDS_COLUMNS.items():
            if name not in columns:
                if required:
                    raise ShardDataError(f"{self.index_file}: missing column {name!r} (expected {what}); "
                                         f"columns present: {columns}")
                continue
            enc = columns[name]
            ok = enc.startswith("ndarray") and is_mds_encoding(enc) if allowed is None else enc in allowed
            if not ok:
                raise ShardDataError(f"{self.index_file}: column {name!r} has encoding {enc!r}, expected {what}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def has_column(self, name: str) -> bool:
        return name in self.column_index

    def validate(self, need_image: bool, need_latent: bool) -> None:
        if need_image and not self.has_column("image"):
            raise ShardDataError(f"{self.index_file}: missing column 'image' (expected bytes, an encoded image file); "
                                 f"columns present: {dict(zip(self.column_names, self.column_encodings))}")
        if need_latent and not self.has_column("latent"):
            raise ShardDataError(f"{self.index_file}: missing column 'latent' (expected ndarray; data.use_latents is on); "
                                 f"columns present: {dict(zip(self.column_names, self.column_encodings))}")

    def _locate(self, i: int) -> tuple[str, int]:
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.files[shard], i - int(self.starts[shard])

    def where(self, i: int, key: str | None = None) -> str:
        path, j = self._locate(i)
        return f"shard {path}, sample #{j}" + (f" (key {key})" if key is not None else "")

    def _columns(self, i: int) -> dict[str, bytes]:
        path, j = self._locate(i)
        begin, end = np.frombuffer(self._files.pread(path, 8, (1 + j) * 4), np.uint32)
        data = self._files.pread(path, int(end) - int(begin), int(begin))
        out, pos, lengths = {}, 0, []
        for size in self.column_sizes:  # variable-size columns have a uint32 length up front
            if size:
                lengths.append(size)
            else:
                lengths.append(int(np.frombuffer(data, np.uint32, count=1, offset=pos)[0]))
                pos += 4
        for name, length in zip(self.column_names, lengths):
            out[name] = data[pos:pos + length]
            pos += length
        if pos != len(data):
            raise OSError(f"sample record is {len(data)} bytes but its columns add up to {pos}")
        return out

    def read(self, i: int, want_image: bool = True, want_latent: bool = False) -> RawSample:
        from streaming.base.format.mds.encodings import mds_decode

        where = self.where(i)
        try:
            raw = self._columns(i)
        except (OSError, ValueError) as exc:
            raise ShardDataError(f"{where}: cannot read: {exc}") from exc
        enc = dict(zip(self.column_names, self.column_encodings))

        def decode(name: str) -> Any:
            try:
                return mds_decode(enc[name], raw[name])
            except Exception as exc:  # streaming raises whatever its codec raises
                raise ShardDataError(f"{where}: cannot decode column {name!r} ({enc[name]}): {exc}") from exc

        key = decode("key")
        where = self.where(i, key)
        caption = decode("caption")
        label = _parse_label(decode("cls"), where) if "cls" in raw else None
        image = None
        if want_image and "image" in raw:
            image = raw["image"] if enc["image"] == "bytes" else decode("image")
        latent = _check_latent(decode("latent"), where) if want_latent and "latent" in raw else None
        return RawSample(key=key, where=where, caption=caption, label=label, image=image, latent=latent)

    def read_metadata(self, i: int) -> dict | None:
        """The sample's ``json`` column, or None when there is none."""
        if "json" not in self.column_index:
            return None
        from streaming.base.format.mds.encodings import mds_decode

        try:
            value = mds_decode("json", self._columns(i)["json"])
        except Exception as exc:  # OSError from the read, JSONDecodeError from the codec
            raise ShardDataError(f"{self.where(i)}: cannot decode column 'json': {exc}") from exc
        if not isinstance(value, dict):
            raise ShardDataError(f"{self.where(i)}: column 'json' holds a {type(value).__name__}, expected a JSON object")
        return value

    def close(self) -> None:
        self._files.close()


Source = WdsSource | MdsSource


def detect_format(path: str) -> str:
    """``wds`` or ``mds`` for a source path; FileNotFoundError naming the path when it is neither."""
    if "{" in path or path.endswith(".tar"):
        return "wds"
    if os.path.isfile(path) and os.path.basename(path) == "index.json":
        return "mds"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "index.json")):
            return "mds"
        if any(n.endswith(".tar") and not n.startswith(".") for n in os.listdir(path)):
            return "wds"
        raise FileNotFoundError(f"data source {path!r} holds neither index.json (MDS) nor .tar shards (webdataset)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source {path!r} does not exist (expected a directory of .tar shards, "
                                "a .tar file, a brace pattern, or an MDS directory with index.json)")
    raise FileNotFoundError(f"data source {path!r} is neither a .tar shard nor an MDS index.json")


def open_source(path: str, fmt: str = "auto", cache_dir: str = "") -> Source:
    """Index the source at ``path`` (``fmt``: auto, wds or mds). ``cache_dir`` caches tar indexes ("" = off)."""
    if fmt not in FORMATS:
        raise ValueError(f"data source {path!r}: unknown format {fmt!r} (expected one of {list(FORMATS)})")
    path = os.path.expanduser(os.fspath(path))
    if fmt == "auto":
        fmt = detect_format(path)
    return WdsSource(path, cache_dir) if fmt == "wds" else MdsSource(path)
