"""Random access to the samples of one data source: webdataset tar shards or a mosaicml-streaming MDS directory.

A source is indexed once when it is opened (in the main process, so bad paths, missing
shards and refused requests fail before any worker starts) and then read sample by sample
with ``os.pread`` on file descriptors each process opens lazily and keeps in a small LRU.
A source may be a URL (``s3://``, ``gs://``, ``http(s)://``, see :mod:`mmtrain.data.storage`):
it is indexed from the sidecar indexes of its tars (:mod:`mmtrain.data.index`) or its MDS
``index.json``, and every shard is checked to exist with the size its index names; its
shards are then read from local copies in a :class:`~mmtrain.data.cache.ShardCache`,
downloaded whole when first needed (or ahead, by the loader's prefetch).
The index is plain numpy arrays, so forked dataloader workers share it copy-on-write.

Every command reads samples through here: the training loader and eval by index
(``read``), the commands that go once through a dataset with :func:`iter_samples`
(decoded, resized pixels), and the ones that rewrite a dataset shard by shard with
``read_shard`` / :func:`iter_shards` (every field as stored, :class:`StoredSample`).
Format detection is :func:`detect_format`, nowhere else. A source of documents (several
images and text spans per sample, :mod:`mmtrain.data.documents`) is read with
``read_document`` / :func:`iter_documents`; each source class says whether it holds them
(``holds_documents``: webdataset from its index, MDS from its columns).

Sample schema (the contract with the data_prep converters):

- webdataset tar shards: members ``KEY.jpg|jpeg|png|webp`` (encoded image), ``KEY.txt``
  (UTF-8 caption), optional ``KEY.json``, ``KEY.cls`` (decimal int), ``KEY.latent.npy``
  (npy float16/32 array ``C, h, w``); see :mod:`mmtrain.data.index`.
- MDS directories (``index.json`` + ``shard.*.mds``, uncompressed): columns ``key: str``,
  ``image: bytes`` (encoded image file; ``jpeg``/``png``/``pil`` encodings are accepted
  too), ``caption: str``, optional ``json: json``, ``cls: int`` (any integer encoding),
  ``latent: ndarray``.
- documents: webdataset ``KEY.json`` (``texts``/``images`` lists) + ``KEY.0.jpg``, ...; MDS
  columns ``key: str``, ``doc: json``, ``images: bytes`` (see :mod:`mmtrain.data.documents`).
"""
from __future__ import annotations

import io
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from collections.abc import Callable, Iterator

import numpy as np

from mmtrain.data import storage
from mmtrain.data.documents import MDS_COLUMNS as DOCUMENT_COLUMNS
from mmtrain.data.documents import Document, from_mds_row, from_wds_members
from mmtrain.data.cache import CacheFullError, CorruptShardError, RemoteFile, ShardCache
from mmtrain.data.errors import ShardDataError
from mmtrain.data.images import IMAGE_EXTENSIONS, decode_image, sniff_extension
from mmtrain.data.index import INDEXED, SPAN, TarIndex, load_remote_tar_indexes, load_tar_indexes
from mmtrain.data.node_local import resolve_cache_dir
from mmtrain.data.shards import list_remote_shards, list_shards, subfolder_hint
from mmtrain.data.tar import parse_sample_span, read_tar_samples

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


@dataclass
class StoredSample:
    """One sample with every field as stored: what a command that rewrites a dataset (``prep
    latents``) reads, so that nothing is lost in the copy. Only the small fields are decoded.

    ``image``: the encoded image file (bytes; a PIL image for an MDS ``pil`` column), None when
    the sample has none; ``image_ext`` its webdataset extension (as stored, or from the bytes);
    ``caption`` None without one; ``meta`` the decoded JSON metadata (any JSON value) or None;
    ``latent`` a float array or None; ``members``: webdataset only, every member as stored
    (extension -> bytes, including the ones above and any others), None for MDS.
    """

    key: str
    where: str
    image: Any
    image_ext: str | None
    caption: str | None
    label: int | None
    meta: Any
    latent: np.ndarray | None
    members: dict[str, bytes] | None = None


class _Files:
    """Read-only file descriptors of shards, opened on demand, at most ``MAX_OPEN_FILES``, reopened after fork.

    Keyed by shard number; ``path_of(shard)`` gives the file to open (for a remote shard: its
    copy in the shard cache, downloaded first when it is not there). An open descriptor keeps
    reading a cached copy that another process evicted meanwhile (POSIX unlink semantics).
    """

    def __init__(self) -> None:
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def fd(self, shard: int, path_of: Callable[[int], str]) -> int:
        if self._pid != os.getpid():  # inherited through fork: this process opens its own
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        while len(self._fds) >= MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        try:
            fd = os.open(path_of(shard), os.O_RDONLY)
        except FileNotFoundError:  # a cached copy evicted between download and open: fetch it again
            fd = os.open(path_of(shard), os.O_RDONLY)
        self._fds[shard] = fd
        return fd

    def pread(self, shard: int, path_of: Callable[[int], str], size: int, offset: int) -> bytes:
        data = os.pread(self.fd(shard, path_of), size, offset)
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


class _ShardFiles:
    """The shard files of one source, local or remote (fetched through a :class:`ShardCache`).

    Attributes:
        names: the shard paths or URLs, in order.
        remote: per shard, what to fetch (URL, size, digest); None for a local source.
    """

    def __init__(self, names: list[str], remote: list[RemoteFile] | None, cache: ShardCache | None) -> None:
        self.names, self.remote, self.cache = names, remote, cache
        self.files = _Files()
        self.corrupt: dict[int, str] = {}  # shard -> the error, in this process: never fetched a third time
        self._locks: dict[int, threading.Lock] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_locks": {}}

    def _lock(self, shard: int) -> threading.Lock:
        if self._pid != os.getpid():  # a lock held by a thread of the parent would never be released here
            self._locks, self._pid = {}, os.getpid()
        return self._locks.setdefault(shard, threading.Lock())

    def path_of(self, shard: int, prefetch: bool = False) -> str:
        if self.remote is None:
            return self.names[shard]
        with self._lock(shard):  # the prefetch thread and a read of the same shard: one download, one verdict
            if shard in self.corrupt:
                raise CorruptShardError(self.corrupt[shard])
            try:
                return self.cache.get(self.remote[shard], prefetch)
            except CorruptShardError as exc:
                self.corrupt[shard] = str(exc)
                raise

    def pread(self, shard: int, size: int, offset: int) -> bytes:
        return self.files.pread(shard, self.path_of, size, offset)

    def close(self) -> None:
        self.files.close()


def default_shard_cache() -> ShardCache:
    """The cache for remote shards read outside training (eval, tokenizer training, prep): ``MMTRAIN_CACHE_DIR``,
    by default the node-local one training uses (:func:`~mmtrain.data.node_local.resolve_cache_dir`), no size limit."""
    return ShardCache(resolve_cache_dir(os.environ.get("MMTRAIN_CACHE_DIR", "auto"), "MMTRAIN_CACHE_DIR"), 0)


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


def _parse_caption(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardDataError(f"{where}: cannot decode field 'txt' (expected UTF-8 text): {exc}") from exc


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardDataError(f"{where}: cannot decode field 'json' (expected a JSON object): {exc}") from exc


def _stored_member_sample(key: str, members: dict[str, bytes], where: str) -> StoredSample:
    """A :class:`StoredSample` from a webdataset sample's members (the first image extension of
    :data:`~mmtrain.data.images.IMAGE_EXTENSIONS` is its image)."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    return StoredSample(
        key=key, where=where, image=members.get(image_ext) if image_ext else None, image_ext=image_ext,
        caption=_parse_caption(members["txt"], where) if "txt" in members else None,
        label=_parse_label(members["cls"], where) if "cls" in members else None,
        meta=_parse_json(members["json"], where) if "json" in members else None,
        latent=decode_latent(members["latent.npy"], where) if "latent.npy" in members else None, members=members)


class WdsSource:
    """Webdataset tar shards with a per-sample member index (see :mod:`mmtrain.data.index`)."""

    format = "wds"

    def __init__(self, spec: str, cache_dir: str = "", shard_cache: ShardCache | None = None,
                 sizes: Callable[[str], dict[str, int] | None] | None = None) -> None:
        self.spec = spec
        if storage.is_url(spec):
            listed = list_remote_shards(spec, sizes)
            self.shards = [u for u, _ in listed]
            indexes: list[TarIndex] = load_remote_tar_indexes(self.shards, [n for _, n in listed])
            remote = [RemoteFile(ix.path, ix.size, f"sha256:{ix.sha256}" if ix.sha256 else "") for ix in indexes]
            self.shard_bytes = np.asarray([n for _, n in listed], dtype=np.int64)
        else:
            self.shards = list_shards(spec)
            indexes = load_tar_indexes(self.shards, cache_dir)
            remote = None
            self.shard_bytes = np.asarray([ix.size for ix in indexes], dtype=np.int64)
        self.shard_files = _ShardFiles(self.shards, remote, shard_cache or (default_shard_cache() if remote else None))
        counts = np.asarray([len(ix) for ix in indexes], dtype=np.int64)
        self.shard_of = np.repeat(np.arange(len(indexes), dtype=np.int32), counts)  # sample -> shard
        self.offsets = {f: np.concatenate([ix.offsets[f] for ix in indexes]) for f in INDEXED}
        self.sizes = {f: np.concatenate([ix.sizes[f] for ix in indexes]) for f in INDEXED}
        # Fixed-width bytes: no per-key Python objects, so forked workers share the pages.
        self.keys = np.asarray([k.encode("utf-8") for ix in indexes for k in ix.keys], dtype=np.bytes_)
        self.holds_documents = self._holds_documents()

    def _holds_documents(self) -> bool:
        """Documents (the layout of mmtrain.data.documents): every sample has KEY.json and none a
        caption KEY.txt. Decided from the index, except where every sample also has one image member
        (a one-image document may store it as KEY.jpg; a pair shard that lost its captions looks the
        same): then the first sample's JSON decides (a texts/images object), one read."""
        if not len(self.offsets["json"]) or not np.all((self.offsets["json"] >= 0) & (self.offsets["txt"] < 0)):
            return False
        if not np.any(self.offsets["image"] >= 0):
            return True
        try:
            obj = json.loads(self._member(0, "json"))
        except (OSError, ValueError):
            return False  # read as pairs: the first read names what is wrong with the sample
        return isinstance(obj, dict) and isinstance(obj.get("texts"), list) and isinstance(obj.get("images"), list)

    def sample_shards(self) -> np.ndarray:
        """The shard number of every sample."""
        return self.shard_of

    def __len__(self) -> int:
        return len(self.shard_of)

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8")

    def where(self, i: int) -> str:
        return f"shard {self.shards[self.shard_of[i]]}, sample {self.key(i)}"

    def has_field(self, field: str) -> np.ndarray:
        return self.offsets[field] >= 0

    def validate(self, need_image: bool, need_latent: bool, documents_ok: bool = False) -> None:
        """Every sample must have a caption, and an image (or a latent with ``need_latent``).
        ``documents_ok``: the reader takes documents too (the training loader); a document is
        then checked when it is read (a bad one is substituted like any bad sample)."""
        if self.holds_documents:
            _check_documents_ok(self.spec, documents_ok, need_latent)
            return
        required = [("txt", "caption member KEY.txt")]
        if need_image:
            required.append(("image", "image member KEY.jpg|jpeg|png|webp"))
        if need_latent:
            required.append(("latent", "latent member KEY.latent.npy (data.use_latents is on)"))
        for field, what in required:
            missing = np.flatnonzero(~self.has_field(field))
            if len(missing):
                raise ShardDataError(f"{self.where(int(missing[0]))}: has no {what}"
                                     f"{f' ({len(missing)} samples in {self.spec} lack it)' if len(missing) > 1 else ''}")

    def _member(self, i: int, field: str) -> bytes:
        return self.shard_files.pread(int(self.shard_of[i]), int(self.sizes[field][i]), int(self.offsets[field][i]))

    def read(self, i: int, want_image: bool = True, want_latent: bool = False) -> RawSample:
        where = self.where(i)
        try:
            caption = _parse_caption(self._member(i, "txt"), where)
            label = _parse_label(self._member(i, "cls"), where) if self.offsets["cls"][i] >= 0 else None
            image = self._member(i, "image") if want_image and self.offsets["image"][i] >= 0 else None
            latent = decode_latent(self._member(i, "latent"), where) if want_latent and self.offsets["latent"][i] >= 0 else None
        except OSError as exc:  # a cache full is the user's to fix, not a bad sample
            if isinstance(exc, CacheFullError):
                raise
            raise ShardDataError(f"{where}: cannot read: {exc}") from exc
        return RawSample(key=self.key(i), where=where, caption=caption, label=label, image=image, latent=latent)

    def read_document(self, i: int) -> Document:
        """Sample ``i`` as a :class:`~mmtrain.data.documents.Document`: its byte span read at once (one
        pread, from the shard cache for a remote source) and its members parsed; ShardDataError naming
        the shard and key when the sample is not a well-formed document."""
        where = self.where(i)
        offset, size = int(self.offsets[SPAN][i]), int(self.sizes[SPAN][i])
        if offset < 0:
            raise ShardDataError(f"{where}: the shard's index has no sample spans (written before documents were "
                                 f"indexed); rewrite it with `mmtrain prep index {self.shards[self.shard_of[i]]}`")
        try:
            span = self.shard_files.pread(int(self.shard_of[i]), size, offset)
        except OSError as exc:
            if isinstance(exc, CacheFullError):
                raise
            raise ShardDataError(f"{where}: cannot read: {exc}") from exc
        key = self.key(i)
        return from_wds_members(key, parse_sample_span(span, key, where), where)

    def read_metadata(self, i: int) -> dict | None:
        """The sample's ``KEY.json`` object (e.g. the synthetic generator's ground truth), or None."""
        if self.offsets["json"][i] < 0:
            return None
        try:
            data = self._member(i, "json")
        except OSError as exc:
            raise ShardDataError(f"{self.where(i)}: cannot read: {exc}") from exc
        value = _parse_json(data, self.where(i))
        if not isinstance(value, dict):
            raise ShardDataError(f"{self.where(i)}: field 'json' holds a {type(value).__name__}, expected a JSON object")
        return value

    def read_shard(self, shard: int) -> Iterator[StoredSample]:
        """The samples of shard number ``shard`` in file order, every member as stored (a remote
        shard is read from its copy in the shard cache)."""
        name = self.shards[shard]
        try:
            path = self.shard_files.path_of(shard)
        except OSError as exc:
            if isinstance(exc, CacheFullError):
                raise
            raise ShardDataError(f"shard {name}: cannot read: {exc}") from exc
        for key, members in read_tar_samples(path, where=name):
            yield _stored_member_sample(key, members, f"shard {name}, sample {key}")

    def close(self) -> None:
        self.shard_files.close()


# Allowed MDS encodings per column; None = any integer encoding / any ndarray encoding.
_MDS_INT = {"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "str_int"}
_MDS_IMAGE_FILES = {"bytes", "jpeg", "png"}  # image encodings whose column bytes are an image file
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

    def __init__(self, spec: str, shard_cache: ShardCache | None = None,
                 sizes: Callable[[str], dict[str, int] | None] | None = None) -> None:
        # heavy import: only for MDS sources
        from streaming.base.format.mds.encodings import is_mds_encoding

        self.spec = spec
        remote = storage.is_url(spec)
        root = storage.dirname(spec) if storage.basename(spec) == "index.json" else spec.rstrip("/") if remote else spec
        self.index_file = storage.join(root, "index.json")
        try:
            text = storage.read_bytes(self.index_file)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"MDS source {spec!r}: {self.index_file} does not exist") from exc
        try:
            obj = json.loads(text)
            shards = obj["shards"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardDataError(f"{self.index_file}: not a valid MDS index ({exc!r})") from exc
        if not shards:
            raise ShardDataError(f"{self.index_file}: lists no shards")
        listed = (sizes or storage.store_for(root).sizes)(root) if remote else None
        self.files: list[str] = []
        fetch: list[RemoteFile] = []
        counts, shard_bytes = [], []
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
            path = storage.join(root, raw.get("basename", ""))
            exists = bool(raw) and (os.path.isfile(path) if not remote else
                                    path in listed if listed is not None else _remote_exists(path))
            if not exists:
                zipped = (shard.get("zip_data") or {}).get("basename")
                if zipped:
                    raise ShardDataError(f"{where}: only the compressed shard {storage.join(root, zipped)} "
                                         f"({shard.get('compression')}) exists; random access needs uncompressed "
                                         "shards: write with MDSWriter(compression=None)")
                raise FileNotFoundError(f"{where}: shard file {path} does not exist")
            expected = int(raw.get("bytes", -1))
            if remote:
                got = listed[path] if listed is not None else storage.store_for(path).size(path)
                if expected >= 0 and got != expected:
                    raise ShardDataError(f"{where}: shard file {path} has {got} bytes, the index says {expected}")
                hashes = raw.get("hashes") or {}
                algo = next((a for a in ("sha256", "sha1") if a in hashes), "")
                fetch.append(RemoteFile(path, expected if expected >= 0 else got, f"{algo}:{hashes[algo]}" if algo else ""))
            self.files.append(path)
            counts.append(int(shard["samples"]))
            shard_bytes.append(expected)
        self.entries: list[dict[str, Any]] = shards  # index.json's entry of each shard
        self.column_names: list[str] = names
        self.column_encodings: list[str] = encodings
        self.column_sizes: list[int | None] = sizes
        self.column_index = {c: k for k, c in enumerate(names)}
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard k holds [starts[k], starts[k+1])
        self.shard_bytes = np.asarray(shard_bytes, dtype=np.int64)
        self.shard_files = _ShardFiles(self.files, fetch if remote else None,
                                        shard_cache or (default_shard_cache() if remote else None))

    @property
    def shards(self) -> list[str]:
        return self.files

    def sample_shards(self) -> np.ndarray:
        """The shard number of every sample."""
        return np.repeat(np.arange(len(self.files), dtype=np.int32), np.diff(self.starts))

    def _check_columns(self, names: list[str], encodings: list[str], is_mds_encoding) -> None:
        columns = dict(zip(names, encodings))
        self.holds_documents = "doc" in columns  # the document layout (mmtrain.data.documents)
        if self.holds_documents:
            if columns != DOCUMENT_COLUMNS:
                raise ShardDataError(f"{self.index_file}: a document source (it has a 'doc' column) must have exactly "
                                     f"the columns {DOCUMENT_COLUMNS}; columns present: {columns}")
            return
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

    def validate(self, need_image: bool, need_latent: bool, documents_ok: bool = False) -> None:
        if self.holds_documents:
            _check_documents_ok(self.spec, documents_ok, need_latent)
            return
        if need_image and not self.has_column("image"):
            raise ShardDataError(f"{self.index_file}: missing column 'image' (expected bytes, an encoded image file); "
                                 f"columns present: {dict(zip(self.column_names, self.column_encodings))}")
        if need_latent and not self.has_column("latent"):
            raise ShardDataError(f"{self.index_file}: missing column 'latent' (expected ndarray; data.use_latents is on); "
                                 f"columns present: {dict(zip(self.column_names, self.column_encodings))}")

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return shard, i - int(self.starts[shard])

    def where(self, i: int, key: str | None = None) -> str:
        shard, j = self._locate(i)
        return f"shard {self.files[shard]}, sample #{j}" + (f" (key {key})" if key is not None else "")

    def _columns(self, i: int) -> dict[str, bytes]:
        shard, j = self._locate(i)
        begin, end = np.frombuffer(self.shard_files.pread(shard, 8, (1 + j) * 4), np.uint32)
        data = self.shard_files.pread(shard, int(end) - int(begin), int(begin))
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

    def _record(self, i: int) -> tuple[str, str, dict[str, bytes], Callable[[str], Any]]:
        """Sample ``i``'s key, where, raw columns and a decoder of one column (ShardDataError naming the sample)."""
        from streaming.base.format.mds.encodings import mds_decode

        where = self.where(i)
        try:
            raw = self._columns(i)
        except (CacheFullError, CorruptShardError):
            raise
        except (OSError, ValueError) as exc:  # ShardDataError (a corrupt shard) is a ValueError
            raise ShardDataError(f"{where}: cannot read: {exc}") from exc
        enc = dict(zip(self.column_names, self.column_encodings))

        def decode(name: str) -> Any:
            try:
                return mds_decode(enc[name], raw[name])
            except Exception as exc:  # streaming raises whatever its codec raises
                raise ShardDataError(f"{where}: cannot decode column {name!r} ({enc[name]}): {exc}") from exc

        key = decode("key")
        where = self.where(i, key)
        return key, where, raw, decode

    def read(self, i: int, want_image: bool = True, want_latent: bool = False) -> RawSample:
        key, where, raw, decode = self._record(i)
        caption = decode("caption")
        label = _parse_label(decode("cls"), where) if "cls" in raw else None
        image = None
        if want_image and "image" in raw:
            image = raw["image"] if self._image_encoding == "bytes" else decode("image")
        latent = _check_latent(decode("latent"), where) if want_latent and "latent" in raw else None
        return RawSample(key=key, where=where, caption=caption, label=label, image=image, latent=latent)

    def read_document(self, i: int) -> Document:
        """Row ``i`` as a :class:`~mmtrain.data.documents.Document`; ShardDataError naming the shard and key
        when the row is not a well-formed document (a pair source: use ``read``)."""
        if not self.holds_documents:
            raise ShardDataError(f"{self.index_file}: holds image-caption pairs (no 'doc' column), not documents")
        key, where, raw, decode = self._record(i)
        return from_mds_row(key, decode("doc"), raw["images"], where)

    @property
    def _image_encoding(self) -> str | None:
        k = self.column_index.get("image")
        return None if k is None else self.column_encodings[k]

    def read_shard(self, shard: int) -> Iterator[StoredSample]:
        """The samples of shard number ``shard`` in order, every column as stored (``image`` the
        encoded file for the ``bytes``, ``jpeg`` and ``png`` encodings, which store one)."""
        for i in range(int(self.starts[shard]), int(self.starts[shard + 1])):
            key, where, raw, decode = self._record(i)
            image = raw.get("image")
            if image is not None and self._image_encoding not in _MDS_IMAGE_FILES:
                image = decode("image")
            yield StoredSample(
                key=key, where=where, image=image,
                image_ext=sniff_extension(image) if isinstance(image, bytes) else None,
                caption=decode("caption"), label=_parse_label(decode("cls"), where) if "cls" in raw else None,
                meta=decode("json") if "json" in raw else None,
                latent=_check_latent(decode("latent"), where) if "latent" in raw else None)

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
        self.shard_files.close()


Source = WdsSource | MdsSource


def _check_documents_ok(spec: str, documents_ok: bool, need_latent: bool) -> None:
    if not documents_ok:
        raise ShardDataError(_documents_not_pairs(spec))
    if need_latent:
        raise ShardDataError(f"data source {spec}: holds documents, which store images, not latents; "
                             "set data.use_latents=false to train on them (the VAE encodes their images)")


def _documents_not_pairs(spec: str) -> str:
    return (f"data source {spec}: holds documents (KEY.json with texts/images lists, or an MDS 'doc' column), "
            "not image-caption pairs; read it with read_document / iter_documents")


def _remote_exists(url: str) -> bool:
    try:
        storage.store_for(url).size(url)
        return True
    except FileNotFoundError:
        return False


def detect_format(path: str, sizes: Callable[[str], dict[str, int] | None] | None = None) -> str:
    """``wds`` or ``mds`` for a source path or URL; FileNotFoundError naming the path when it is neither.

    ``sizes`` lists a URL prefix (default: its store's ``sizes``)."""
    if "{" in path or path.endswith(".tar"):
        return "wds"
    if storage.basename(path) == "index.json":
        return "mds"
    if storage.is_url(path):
        listed = (sizes or storage.store_for(path).sizes)(path)
        if listed is None:  # http: no listing
            return "mds" if _remote_exists(storage.join(path, "index.json")) else "wds"
        if storage.join(path, "index.json") in listed:
            return "mds"
        prefix = path.rstrip("/") + "/"
        if any(u.endswith(".tar") and "/" not in u[len(prefix):] for u in listed):
            return "wds"
        raise FileNotFoundError(f"data source {path!r} holds neither index.json (MDS) nor .tar shards (webdataset)"
                                f"{subfolder_hint(path, listed) if listed else ': nothing is stored under that prefix'}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "index.json")):
            return "mds"
        if any(n.endswith(".tar") and not n.startswith(".") for n in os.listdir(path)):
            return "wds"
        raise FileNotFoundError(f"data source {path!r} holds neither index.json (MDS) nor .tar shards (webdataset)"
                                f"{subfolder_hint(path)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source {path!r} does not exist (expected a directory of .tar shards, "
                                "a .tar file, a brace pattern, or an MDS directory with index.json)")
    raise FileNotFoundError(f"data source {path!r} is neither a .tar shard nor an MDS index.json")


def open_source(path: str, fmt: str = "auto", cache_dir: str = "", shard_cache: ShardCache | None = None) -> Source:
    """Index the source at ``path`` (a local path or an s3://, gs://, http(s):// URL; ``fmt``: auto, wds or mds).

    ``cache_dir`` caches the member indexes of local tars without a sidecar index ("" = off);
    ``shard_cache`` holds the copies of remote shards (default: :func:`default_shard_cache`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"data source {path!r}: unknown format {fmt!r} (expected one of {list(FORMATS)})")
    path = os.fspath(path)
    if not storage.is_url(path):
        path = os.path.expanduser(path)
    sizes = _listing_once()  # detecting the format and indexing list the same prefix: ask the store once
    if fmt == "auto":
        fmt = detect_format(path, sizes)
    return WdsSource(path, cache_dir, shard_cache, sizes) if fmt == "wds" else MdsSource(path, shard_cache, sizes)


def iter_samples(path: str | os.PathLike, fmt: str = "auto", image_size: int = 0, resize_mode: str = "center_crop",
                 want_image: bool = True, shard_cache: ShardCache | None = None) -> Iterator[dict[str, Any]]:
    """Every sample of the source at ``path`` (local or URL, webdataset or MDS: :func:`open_source`),
    in order, as ``{"key", "where", "image", "caption", "label", "attributes"}``.

    ``image``: a PIL RGB image through :func:`mmtrain.data.images.decode_image` (``image_size``
    square by ``resize_mode``, or as stored with 0), None without ``want_image``;
    ``attributes``: the sample's JSON metadata or None. One process reads everything (no rank or
    worker split, no shuffle): the reader of the commands that go through a dataset once
    (captioning, tokenizer training, VAE training, scale estimation).
    """
    from PIL import Image

    source = open_source(os.fspath(path), fmt, shard_cache=shard_cache)
    try:
        source.validate(need_image=want_image, need_latent=False)  # a missing member fails before any work
        for i in range(len(source)):
            raw = source.read(i, want_image=want_image)
            image = None
            if want_image:
                if raw.image is None:
                    raise ShardDataError(f"{raw.where}: has no image (expected a member KEY.jpg|jpeg|png|webp or an "
                                         "MDS image column)")
                image = Image.fromarray(decode_image(raw.image, image_size, resize_mode, where=raw.where))
            yield {"key": raw.key, "where": raw.where, "image": image, "caption": raw.caption, "label": raw.label,
                   "attributes": source.read_metadata(i)}
    finally:
        source.close()


def iter_shards(path: str | os.PathLike, fmt: str = "auto",
                shard_cache: ShardCache | None = None) -> Iterator[tuple[str, list[StoredSample]]]:
    """Every shard of the source at ``path`` (local or URL, webdataset or MDS: :func:`open_source`),
    in order, as ``(shard file name, its samples as stored)`` (:class:`StoredSample`).

    The reader of what goes through a dataset shard by shard and must not lose a field:
    re-sharding with latents added (``prep latents`` reads the shards of :func:`open_source`
    the same way, with :meth:`WdsSource.read_shard` / :meth:`MdsSource.read_shard`), and the
    tests that check what prep wrote.
    """
    source = open_source(os.fspath(path), fmt, shard_cache=shard_cache)
    try:
        for shard, name in enumerate(source.shards):
            yield storage.basename(name), list(source.read_shard(shard))
    finally:
        source.close()


def iter_documents(path: str | os.PathLike, fmt: str = "auto",
                   shard_cache: ShardCache | None = None) -> Iterator[Document]:
    """Every document of the source at ``path`` (local or URL, webdataset or MDS: :func:`open_source`),
    in order, as stored (:class:`~mmtrain.data.documents.Document`, images as encoded files).

    The reader of what goes through a document dataset once (``prep documents-wds``, tests).
    ShardDataError naming the source when it holds image-caption pairs, naming the shard and
    key when a document is malformed.
    """
    source = open_source(os.fspath(path), fmt, shard_cache=shard_cache)
    try:
        if not source.holds_documents:
            raise ShardDataError(f"data source {source.spec}: holds image-caption pairs, not documents (expected "
                                 "KEY.json with texts/images lists and no KEY.txt, or MDS columns "
                                 f"{DOCUMENT_COLUMNS}; see mmtrain.data.documents)")
        for i in range(len(source)):
            yield source.read_document(i)
    finally:
        source.close()


def iter_texts(path: str | os.PathLike, fmt: str = "auto", shard_cache: ShardCache | None = None) -> Iterator[str]:
    """The text of every sample of the source at ``path``, in order, opened once: each caption of a
    pair source, each text span of a document source (no image is read or decoded). What
    ``mmtrain tokenizer train`` trains on."""
    source = open_source(os.fspath(path), fmt, shard_cache=shard_cache)
    try:
        if source.holds_documents:
            for i in range(len(source)):
                yield from source.read_document(i).texts
            return
        source.validate(need_image=False, need_latent=False)  # a missing caption fails before any work
        for i in range(len(source)):
            yield source.read(i, want_image=False).caption
    finally:
        source.close()


def _listing_once() -> Callable[[str], dict[str, int] | None]:
    """A store's ``sizes(prefix)`` that asks the store once per prefix (for one :func:`open_source`)."""
    listed: dict[str, dict[str, int] | None] = {}

    def sizes(prefix: str) -> dict[str, int] | None:
        if prefix not in listed:
            listed[prefix] = storage.store_for(prefix).sizes(prefix)
        return listed[prefix]

    return sizes
