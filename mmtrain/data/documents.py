"""Documents: samples of several images and text spans in reading order, and their two on-disk layouts.

A :class:`Document` is what web-document datasets (OBELICS, MMC4, multi-image webdataset)
and image-caption pairs (:func:`pair_document`) become: a key, its segments in reading order
(a ``str`` is a text span, a :class:`DocImage` an encoded image file) and its metadata. This
module holds both layouts, the reader and the writer of each side by side; the readers are
called by :mod:`mmtrain.data.sources` (``read_document``, ``iter_documents``), the one reader
of shards, and :func:`write_document_shards` writes through the one webdataset writer
(:class:`mmtrain.data.shards.ShardWriter`) or prep's MDS writer.

Webdataset layout (Megatron-Energon's interleaved layout, so multi-image webdataset in and
out are the same layout), one document per sample:

- ``KEY.json`` = ``{"texts": [...], "images": [...], "meta": {...}}``: ``texts`` and
  ``images`` are parallel lists of equal length, one entry per segment, and at each index
  exactly one is non-null: ``texts[i]`` a string, or ``images[i]`` the name of the image
  member without the key (``"0.jpg"``). Images are numbered in reading order from 0, the
  extension is the stored encoding (``jpg``/``png``/``webp``); a reader accepts any member
  name the JSON gives (other tools' output). ``meta`` is the document's metadata; when any
  image has metadata, ``meta["images"]`` is a list parallel to ``images`` (the image's
  metadata object at image positions, null at text positions).
- ``KEY.0.jpg``, ``KEY.1.png``, ...: the image files, as stored.

A source is read as documents when every sample has ``KEY.json`` and none has ``KEY.txt``,
decided from the sidecar index; where every sample also has one image member (a one-image document
may store it as ``KEY.jpg``, and so does a pair shard that lost its captions) the first sample's
JSON decides: a ``texts``/``images`` object (see ``WdsSource._holds_documents``). The index records each sample's
byte span, so a document is one read (:func:`mmtrain.data.tar.parse_sample_span`).

MDS layout, one row per document, no pickle: columns ``key: str``, ``doc: json`` (the object
above, plus ``"image_bytes"``: the byte length of each image in reading order) and ``images:
bytes`` (the image files concatenated in reading order; empty for a text-only document).
A source with a ``doc`` column is read as documents.

Splitting (:func:`split_document`) cuts a document over the sequence budget at segment
boundaries into ``KEY``, ``KEY_1``, ``KEY_2``, ... (valid webdataset keys: no dots). An
image that cannot be fetched (a converter puts a :class:`MissingImage` in its place) or
decoded (checked by the writer) is left out of its document and counted by reason in
``stats.json``; the rest of the document is kept.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmtrain.atomic import atomic_write_text
from mmtrain.data.errors import ShardDataError
from mmtrain.data.images import IMAGE_EXTENSIONS, resize_image, sniff_extension

logger = logging.getLogger("mmtrain.data")

MDS_COLUMNS: dict[str, str] = {"key": "str", "doc": "json", "images": "bytes"}
# Reasons an image is left out of its document (stats.json lists each, zeros included).
IMAGE_DROP_REASONS: tuple[str, ...] = ("image_unfetchable", "image_undecodable", "image_missing_file", "image_filtered")
# Reasons a whole document is not written.
DOCUMENT_DROP_REASONS: tuple[str, ...] = ("document_empty", "document_too_few_images")
STATS = "stats.json"
_KEY_OK = re.compile(r"[^./]+")


@dataclass(frozen=True)
class DocImage:
    """One image of a document: the encoded file as stored, its webdataset extension
    (``jpg``/``jpeg``/``png``/``webp``, :data:`~mmtrain.data.images.IMAGE_EXTENSIONS`) and its
    metadata (source URL, similarity, ...; JSON-serialisable)."""

    data: bytes
    ext: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MissingImage:
    """The place of an image a converter could not get (``reason``: one of
    :data:`IMAGE_DROP_REASONS`, e.g. ``image_unfetchable``; ``detail`` for the log). It may stand
    in a document's segments; :func:`write_document_shards` drops it and counts it."""

    reason: str
    detail: str = ""
    meta: dict = field(default_factory=dict)


Segment = str | DocImage


@dataclass
class Document:
    """A key (a valid webdataset key: no ``.`` or ``/``), the segments in reading order (a
    ``str`` is a text span, a :class:`DocImage` an image; converters may also put
    :class:`MissingImage` placeholders, which the writer removes) and the document's metadata."""

    key: str
    segments: list[Segment]
    meta: dict = field(default_factory=dict)

    @property
    def images(self) -> list[DocImage]:
        return [s for s in self.segments if isinstance(s, DocImage)]

    @property
    def texts(self) -> list[str]:
        return [s for s in self.segments if isinstance(s, str)]


def pair_document(key: str, image: DocImage, caption: str, caption_first: bool, meta: dict | None = None) -> Document:
    """An image-caption pair as a document: ``[caption, image]`` (to draw) with ``caption_first``,
    else ``[image, caption]`` (to caption), so pair datasets mix with document datasets."""
    segments: list[Segment] = [caption, image] if caption_first else [image, caption]
    return Document(key=key, segments=segments, meta=dict(meta or {}))


# ---------------------------------------------------------------------------- the document JSON


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY_OK.fullmatch(key):
        raise ValueError(f"{where}: document key {key!r} must be a non-empty string without '.' or '/'")
    return key


def _doc_json(doc: Document, where: str) -> tuple[dict[str, Any], list[DocImage]]:
    """The ``{"texts", "images", "meta"}`` object of ``doc`` and its images in reading order."""
    texts: list[str | None] = []
    names: list[str | None] = []
    image_meta: list[dict | None] = []
    images: list[DocImage] = []
    for n, seg in enumerate(doc.segments):
        if isinstance(seg, str):
            texts.append(seg)
            names.append(None)
            image_meta.append(None)
        elif isinstance(seg, DocImage):
            if seg.ext not in IMAGE_EXTENSIONS:
                raise ValueError(f"{where}: segment {n}: image extension {seg.ext!r}, expected one of {list(IMAGE_EXTENSIONS)}")
            texts.append(None)
            names.append(f"{len(images)}.{seg.ext}")
            image_meta.append(dict(seg.meta))
            images.append(seg)
        else:
            raise ValueError(f"{where}: segment {n} is a {type(seg).__name__}, expected str or DocImage "
                             "(MissingImage places are removed by write_document_shards)")
    meta = dict(doc.meta)
    if "images" in meta:
        raise ValueError(f"{where}: document meta has a key 'images'; it is reserved for the per-image metadata")
    if any(image_meta[i] for i in range(len(image_meta)) if names[i] is not None):
        meta["images"] = image_meta
    return {"texts": texts, "images": names, "meta": meta}, images


def _dumps(obj: Any) -> bytes:
    # sort_keys: identical documents give identical bytes, so shards are reproducible
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _parse_doc_json(obj: Any, where: str) -> tuple[list[str | None], list[str | None], dict, list[dict]]:
    """Validate a document object: ``(texts, images, meta without "images", per-image meta by position)``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("texts"), list) or not isinstance(obj.get("images"), list):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ShardDataError(f"{where}: document JSON must be an object with lists 'texts' and 'images' "
                             f"(parallel, one entry per segment); got {got}")
    texts, names = obj["texts"], obj["images"]
    if len(texts) != len(names):
        raise ShardDataError(f"{where}: 'texts' has {len(texts)} entries and 'images' {len(names)}; expected parallel "
                             "lists of equal length")
    for i, (text, name) in enumerate(zip(texts, names)):
        if (text is None) == (name is None):
            what = "both null" if text is None else "both set"
            raise ShardDataError(f"{where}: segment {i}: texts[{i}] and images[{i}] are {what}; expected exactly one "
                                 "non-null per index")
        if text is not None and not isinstance(text, str):
            raise ShardDataError(f"{where}: texts[{i}] is a {type(text).__name__}, expected a string or null")
        if name is not None and (not isinstance(name, str) or not name):
            raise ShardDataError(f"{where}: images[{i}] is {name!r}, expected an image member name (e.g. '0.jpg') or null")
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ShardDataError(f"{where}: 'meta' is a {type(meta).__name__}, expected a JSON object")
    meta = dict(meta)
    per_image = meta.pop("images", None)
    if per_image is None:
        per_image = [None] * len(names)
    if not isinstance(per_image, list) or len(per_image) != len(names) or \
            not all(m is None or isinstance(m, dict) for m in per_image):
        raise ShardDataError(f"{where}: meta['images'] must be a list of {len(names)} objects or nulls, parallel to 'images'")
    return texts, names, meta, [m or {} for m in per_image]


def _image_ext(name: str, data: bytes) -> str:
    ext = name.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_EXTENSIONS:
        return ext
    return sniff_extension(data)  # other tools' names (e.g. "img0"): from the bytes


# ---------------------------------------------------------------------------- webdataset layout


def read_document_file(path: str | os.PathLike) -> Document:
    """A document as a file pair, what ``mmtrain generate --doc`` reads: ``NAME.json`` holds the
    object of the webdataset layout (``texts``/``images`` parallel lists, ``meta``) with each
    image given as a path relative to the JSON's directory (or absolute). ValueError naming the
    file, the index and what was expected when it is malformed or an image is missing."""
    path = Path(path)
    where = str(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such document file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not a JSON document ({exc})") from None
    try:
        texts, names, meta, image_meta = _parse_doc_json(obj, where)
    except ShardDataError as exc:
        raise ValueError(str(exc)) from None
    segments: list[Segment] = []
    for i, (text, name) in enumerate(zip(texts, names)):
        if text is not None:
            segments.append(text)
            continue
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ValueError(f"{where}: images[{i}] = {name!r}: cannot read {file} ({exc.strerror or exc})") from None
        segments.append(DocImage(data, _image_ext(name, data), image_meta[i]))
    return Document(key=path.stem.replace(".", "_") or "doc", segments=segments, meta=meta)


def write_document_file(doc: Document, path: str | os.PathLike) -> list[Path]:
    """Write ``doc`` as ``path`` (the JSON of :func:`read_document_file`) and its images beside it
    as ``STEM.0.png``, ``STEM.1.jpg``, ... (each written under a temp name, then renamed; the
    JSON last). Returns the files written."""
    from mmtrain.atomic import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj, images = _doc_json(doc, str(path))
    files = []
    names = iter(range(len(images)))
    for i, name in enumerate(obj["images"]):
        if name is not None:
            k = next(names)
            file = path.parent / f"{path.stem}.{name}"
            atomic_write_bytes(file, images[k].data)
            obj["images"][i] = file.name
            files.append(file)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return files + [path]


def to_wds_members(doc: Document) -> dict[str, bytes]:
    """The members of ``doc`` (``{"json": ..., "0.jpg": ..., "1.png": ...}``, extension -> bytes);
    add ``"__key__": doc.key`` for ``TarWriter``/:class:`~mmtrain.data.shards.ShardWriter`.
    ValueError naming the key on a bad key, segment or extension."""
    where = f"document {doc.key!r}"
    _check_key(doc.key, where)
    obj, images = _doc_json(doc, where)
    members = {"json": _dumps(obj)}
    for name, image in zip((n for n in obj["images"] if n is not None), images):
        members[name] = image.data
    return members


def from_wds_members(key: str, members: dict[str, bytes], where: str) -> Document:
    """The document of webdataset sample ``key`` from its members (extension -> bytes, as
    :mod:`mmtrain.data.tar` groups them); ShardDataError naming ``where`` (shard and key) when
    the JSON is missing or malformed or names a member the sample does not have."""
    if "json" not in members:
        raise ShardDataError(f"{where}: no KEY.json member (expected a document: texts/images lists); "
                             f"members: {sorted(members)}")
    try:
        obj = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardDataError(f"{where}: cannot decode KEY.json (expected a JSON object): {exc}") from exc
    texts, names, meta, per_image = _parse_doc_json(obj, where)
    segments: list[Segment] = []
    for i, (text, name) in enumerate(zip(texts, names)):
        if text is not None:
            segments.append(text)
            continue
        data = members.get(name.lower())
        if data is None:
            raise ShardDataError(f"{where}: images[{i}] names member {name!r}, which the sample does not have; "
                                 f"members: {sorted(members)}")
        segments.append(DocImage(data=data, ext=_image_ext(name, data), meta=per_image[i]))
    return Document(key=key, segments=segments, meta=meta)


# ---------------------------------------------------------------------------- MDS layout


def to_mds_row(doc: Document) -> dict[str, Any]:
    """The MDSWriter row of ``doc`` for :data:`MDS_COLUMNS` (see the module docstring)."""
    where = f"document {doc.key!r}"
    _check_key(doc.key, where)
    obj, images = _doc_json(doc, where)
    obj["image_bytes"] = [len(im.data) for im in images]
    return {"key": doc.key, "doc": obj, "images": b"".join(im.data for im in images)}


def from_mds_row(key: str, doc: Any, images: bytes, where: str) -> Document:
    """The document of one MDS row (columns decoded: ``doc`` a JSON value, ``images`` raw bytes);
    ShardDataError naming ``where`` when the lengths do not add up or the object is malformed."""
    sizes = doc.get("image_bytes") if isinstance(doc, dict) else None
    texts, names, meta, per_image = _parse_doc_json(doc, where)
    n_images = sum(name is not None for name in names)
    if not isinstance(sizes, list) or len(sizes) != n_images or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise ShardDataError(f"{where}: doc['image_bytes'] must list the byte length of each of its {n_images} images; "
                             f"got {sizes!r}")
    if sum(sizes) != len(images):
        raise ShardDataError(f"{where}: column 'images' holds {len(images)} bytes but doc['image_bytes'] adds up to "
                             f"{sum(sizes)}")
    segments: list[Segment] = []
    pos = k = 0
    for i, (text, name) in enumerate(zip(texts, names)):
        if text is not None:
            segments.append(text)
            continue
        data = images[pos:pos + sizes[k]]
        pos, k = pos + sizes[k], k + 1
        segments.append(DocImage(data=data, ext=_image_ext(name, data), meta=per_image[i]))
    return Document(key=key, segments=segments, meta=meta)


# ---------------------------------------------------------------------------- splitting


def count_words(text: str) -> int:
    """Estimated tokens of a text span: its whitespace-separated words (an estimate; a
    sentencepiece model gives more tokens per word; pass the run's tokenizer when it matters)."""
    return len(text.split())


def split_document(doc: Document, max_images: int, max_text_tokens: int,
                   count_tokens: Callable[[str], int] = count_words) -> list[Document]:
    """``doc`` cut at segment boundaries into parts of at most ``max_images`` images and
    ``max_text_tokens`` text tokens each (0 = no limit), keys ``KEY``, ``KEY_1``, ``KEY_2``, ...

    Greedy in reading order: a part is closed before the segment that would take it over a
    limit. A single text span over ``max_text_tokens`` is not cut inside (boundaries are
    segments) and becomes a part of its own. Parts keep the document's metadata, plus
    ``"part"``/``"parts"`` when there are several. A document within the budget comes back as is.
    """
    if max_images < 0 or max_text_tokens < 0:
        raise ValueError(f"split_document: max_images and max_text_tokens must be >= 0, got {max_images}, {max_text_tokens}")
    parts: list[list[Segment]] = [[]]
    images = tokens = 0
    for seg in doc.segments:
        is_image = not isinstance(seg, str)
        cost = 0 if is_image else count_tokens(seg)
        # an image adds no text tokens, so a part already over the text budget (one long span) is closed too
        over = (is_image and max_images and images + 1 > max_images) or \
               (max_text_tokens and tokens + cost > max_text_tokens)
        if over and parts[-1]:
            parts.append([])
            images = tokens = 0
        parts[-1].append(seg)
        images += is_image
        tokens += cost
    if len(parts) == 1:
        return [doc]
    return [Document(key=doc.key if k == 0 else f"{doc.key}_{k}", segments=segs,
                     meta={**doc.meta, "part": k, "parts": len(parts)}) for k, segs in enumerate(parts)]


# ---------------------------------------------------------------------------- writing


@dataclass
class ImageOptions:
    """What the writer does to each image: check it decodes (``check``; off for a caller that
    decoded every image already), and with ``resolution``
    resize it (:func:`mmtrain.data.images.resize_image`, ``resize_mode``) and re-encode it as
    ``image_format`` (``jpg`` at ``jpeg_quality`` or ``png``; the image's meta gains ``width`` and
    ``height``); without, the stored bytes are kept."""

    resolution: int = 0
    check: bool = True
    resize_mode: str = "keep_aspect"  # documents keep their images' shapes
    image_format: str = "jpg"
    jpeg_quality: int = 95

    def validate(self) -> ImageOptions:
        """ConfigError (a ValueError) naming the field; the same check as the pair converters' options."""
        from mmtrain.data.prep.config import check_image_options

        check_image_options(self)
        return self


def process_image(image: DocImage, options: ImageOptions) -> DocImage:
    """``image`` checked to decode fully, resized and re-encoded when ``options.resolution`` is set;
    ShardDataError when it cannot be decoded (the writer drops it as ``image_undecodable``)."""
    from PIL import Image

    from mmtrain.data.prep.transform import encode, oriented, to_rgb

    if not options.check and not options.resolution:
        return image
    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            opened.load()
            # the extension a shard member gets is the format the bytes are in; a format shards do not
            # store (GIF, BMP, TIFF, ...) is re-encoded as options.image_format
            stored = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(opened.format or "")
            resize = bool(options.resolution) and options.resize_mode != "none"
            if stored and not resize:
                return image if image.ext == stored else DocImage(data=image.data, ext=stored, meta=image.meta)
            pixels = to_rgb(oriented(opened)[0])
            if resize:
                pixels = resize_image(pixels, options.resolution, options.resize_mode)
            data = encode(pixels, options.image_format, options.jpeg_quality)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ShardDataError(f"cannot decode image: {exc}") from exc
    return DocImage(data=data, ext=options.image_format, meta={**image.meta, "width": pixels.size[0],
                                                                "height": pixels.size[1]})


class DocumentStats:
    """Counts over a run: documents in/out, images, text segments, images and documents dropped by reason."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.image_drops: Counter = Counter({r: 0 for r in IMAGE_DROP_REASONS})
        self.document_drops: Counter = Counter({r: 0 for r in DOCUMENT_DROP_REASONS})
        self.examples: dict[str, list[str]] = {}

    def drop_image(self, reason: str, where: str, detail: str) -> None:
        self.image_drops[reason] += 1
        lines = self.examples.setdefault(reason, [])
        if len(lines) < 5:
            lines.append(f"{where}: {detail}")
        if self.image_drops[reason] <= 20:
            logger.warning("%s: image left out (%s): %s", where, reason, detail)

    def as_dict(self) -> dict[str, Any]:
        return {"documents_in": self.counts["documents_in"], "documents": self.counts["documents"],
                "documents_split": self.counts["documents_split"], "images": self.counts["images"],
                "text_segments": self.counts["text_segments"], "documents_renamed": self.counts["documents_renamed"],
                "dropped_images": self.counts_of(self.image_drops),
                "dropped_documents": self.counts_of(self.document_drops), "drop_examples": self.examples}

    @staticmethod
    def counts_of(counter: Counter) -> dict[str, int]:
        return dict(sorted(counter.items()))


def clean_document(doc: Document, options: ImageOptions, stats: DocumentStats) -> Document:
    """``doc`` without its :class:`MissingImage` places and undecodable images (each counted by reason),
    its images processed by :func:`process_image`; the text is kept."""
    segments: list[Segment] = []
    for n, seg in enumerate(doc.segments):
        where = f"document {doc.key!r} segment {n}"
        if isinstance(seg, MissingImage):
            stats.drop_image(seg.reason, where, seg.detail)
        elif isinstance(seg, DocImage):
            try:
                segments.append(process_image(seg, options))
            except ShardDataError as exc:
                stats.drop_image("image_undecodable", where, str(exc))
        elif isinstance(seg, str):
            segments.append(seg)
        else:
            raise ValueError(f"{where} is a {type(seg).__name__}, expected str, DocImage or MissingImage")
    return replace(doc, segments=segments)


class _SplitWriter:
    """One split directory's shards: webdataset through :class:`~mmtrain.data.shards.ShardWriter`
    or MDS through :class:`~mmtrain.data.prep.mds_writer.MdsChunkWriter` (chunks of
    ``samples_per_shard`` rows), each shard written under a temp name and renamed when complete."""

    def __init__(self, split_dir: Path, fmt: str, prefix: str, samples_per_shard: int, shard_size: int) -> None:
        from mmtrain.data.prep.mds_writer import MdsChunkWriter
        from mmtrain.data.shards import ShardWriter, remove_temp_shards

        self.dir, self.fmt, self.prefix, self.samples_per_shard = split_dir, fmt, prefix, samples_per_shard
        self.documents = 0
        split_dir.mkdir(parents=True, exist_ok=True)
        if fmt == "mds":
            self.mds = MdsChunkWriter(split_dir, MDS_COLUMNS, shard_size, encode=to_mds_row)
            self.mds.clean_temps()
            self.pending: list[Document] = []
            self.shards: list[dict[str, Any]] = []
        else:
            remove_temp_shards(split_dir, f"{prefix}-")
            self.wds = ShardWriter(split_dir, prefix, samples_per_shard=samples_per_shard, shard_size=shard_size)

    def write(self, doc: Document) -> None:
        self.documents += 1
        if self.fmt == "mds":
            self.pending.append(doc)
            if len(self.pending) >= self.samples_per_shard:
                self._flush()
        else:
            self.wds.write({"__key__": doc.key, **to_wds_members(doc)})

    def _flush(self) -> None:
        if self.pending:
            self.shards.extend(self.mds.write_chunk(self.pending, len(self.shards)))
            self.pending = []

    def abort(self) -> None:
        if self.fmt == "wds":
            self.wds.abort()  # deletes the open shard; committed ones stay

    def finish(self) -> list[dict[str, Any]]:
        """Commit the last shard, remove a larger earlier run's shards, return ``[{name, samples, bytes}]``."""
        from mmtrain.data.shards import remove_stale_shards

        if self.fmt == "mds":
            self._flush()
            self.mds.finish(self.shards)
            return [{k: s[k] for k in ("name", "samples", "bytes")} for s in self.shards]
        self.wds.close()
        remove_stale_shards(self.dir, rf"{re.escape(self.prefix)}-\d{{6,}}\.tar", {s["name"] for s in self.wds.shards})
        return self.wds.shards


def _renamed(doc: Document, keys: set[str], stats: DocumentStats) -> Document:
    """``doc`` under the first free key ``KEY_dupN``, counted (``documents_renamed``) and logged."""
    n = 1
    while f"{doc.key}_dup{n}" in keys:
        n += 1
    new = f"{doc.key}_dup{n}"
    stats.counts["documents_renamed"] += 1
    if stats.counts["documents_renamed"] <= 20:
        logger.warning("document key %r is taken (a split part of another document, or a repeated key); written as %r",
                       doc.key, new)
    return replace(doc, key=new, meta={**doc.meta, "original_key": doc.key})


def write_document_shards(documents: Iterable[Document], out_dir: str | os.PathLike, *, fmt: str = "wds",
                          samples_per_shard: int = 1000, shard_size: int = 0, prefix: str = "shard",
                          val_fraction: float = 0.0, split_seed: int = 0, max_images: int = 0,
                          max_text_tokens: int = 0, count_tokens: Callable[[str], int] = count_words,
                          min_images: int = 0, images: ImageOptions | None = None,
                          source: dict[str, Any] | None = None, stats: DocumentStats | None = None,
                          extra_stats: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Write ``documents`` as ``out_dir/train`` (and ``out_dir/val``) shards plus ``out_dir/stats.json``.

    Each document is cleaned (:func:`clean_document`: :class:`MissingImage` places and
    undecodable images left out and counted, the rest kept; images resized with
    ``images.resolution``), dropped as ``document_empty`` when no segment is left or as
    ``document_too_few_images`` with fewer than ``min_images`` images, assigned to
    train or val by its key (:func:`mmtrain.data.prep.split.split_of`, ``val_fraction`` and
    ``split_seed``: deterministic, the parts of a document stay together), split to the budget
    (:func:`split_document`: ``max_images``, ``max_text_tokens`` by ``count_tokens``) and
    written in the layout of ``fmt`` (``wds`` or ``mds``, see the module docstring) in shards of
    at most ``samples_per_shard`` documents and ``shard_size`` bytes (0 = no limit). Shards are
    written under temp names and renamed when complete, with sidecar indexes (wds) or an
    ``index.json`` written last (MDS); a larger earlier run's shards are removed at the end.
    A converter passes its own ``stats`` (e.g. with ``image_unfetchable`` counted), ``source``
    (recorded in stats.json) and ``extra_stats`` (its own counts, added to stats.json's top
    level; a key the writer writes itself is a ValueError).

    Keys are unique across the output: a document whose key was already written (the part
    ``KEY_1`` of a split ``KEY`` meeting a document named ``KEY_1``, or a key given twice) is
    written as ``KEY_dup1`` (``_dup2``, ...) with ``meta["original_key"]``, counted.

    Returns the stats written to ``stats.json``: ``documents_in``, ``documents`` (written,
    after splitting), ``documents_split``, ``documents_renamed``, ``images``, ``text_segments``, ``dropped_images``
    and ``dropped_documents`` (by reason, zeros included), ``drop_examples``, ``splits``
    (``{split: {documents, shards, bytes, shard_files}}``), ``output_format``, ``options``,
    ``source``, ``elapsed_s``. Not resumable: a re-run rewrites every shard.
    """
    from tqdm import tqdm

    from mmtrain.data.prep.split import split_of

    if fmt not in ("wds", "mds"):
        raise ValueError(f"write_document_shards: fmt must be 'wds' or 'mds', got {fmt!r}")
    if samples_per_shard < 1:
        raise ValueError(f"write_document_shards: samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"write_document_shards: val_fraction must be in [0, 1), got {val_fraction}")
    options = (images or ImageOptions()).validate()
    stats = stats or DocumentStats()
    started = time.perf_counter()
    out = Path(out_dir)
    splits = ["train"] + (["val"] if val_fraction > 0 else [])
    writers = {s: _SplitWriter(out / s, fmt, prefix, samples_per_shard, shard_size) for s in splits}
    keys: set[str] = set()  # every key written, all splits: keys stay unique across shards
    try:
        for doc in tqdm(documents, desc="documents", unit="doc", disable=not progress):
            stats.counts["documents_in"] += 1
            _check_key(doc.key, f"document #{stats.counts['documents_in'] - 1}")
            doc = clean_document(doc, options, stats)
            if not doc.segments:
                stats.document_drops["document_empty"] += 1
                continue
            if len(doc.images) < min_images:
                stats.document_drops["document_too_few_images"] += 1
                continue
            parts = split_document(doc, max_images, max_text_tokens, count_tokens)
            stats.counts["documents_split"] += len(parts) > 1
            writer = writers[split_of(doc.key, val_fraction, split_seed)]
            for part in parts:
                if part.key in keys:  # a part KEY_1 of KEY met a document of that key (or a key came twice)
                    part = _renamed(part, keys, stats)
                keys.add(part.key)
                writer.write(part)
                stats.counts["documents"] += 1
                stats.counts["images"] += len(part.images)
                stats.counts["text_segments"] += len(part.segments) - len(part.images)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    result = stats.as_dict()
    result["splits"] = {}
    for name, writer in writers.items():
        shards = writer.finish()
        result["splits"][name] = {"documents": writer.documents, "shards": len(shards),
                                  "bytes": sum(s["bytes"] for s in shards), "shard_files": [s["name"] for s in shards]}
    result.update(output_format=fmt, out_dir=str(out), source=source or {}, elapsed_s=time.perf_counter() - started,
                  options={"samples_per_shard": samples_per_shard, "shard_size": shard_size, "prefix": prefix,
                           "val_fraction": val_fraction, "split_seed": split_seed, "max_images": max_images,
                           "max_text_tokens": max_text_tokens, "resolution": options.resolution,
                           "min_images": min_images, "resize_mode": options.resize_mode,
                           "image_format": options.image_format})
    clash = sorted(set(extra_stats or {}) & set(result))
    if clash:
        raise ValueError(f"write_document_shards: extra_stats keys {clash} are the writer's own")
    result.update(extra_stats or {})
    atomic_write_text(out / STATS, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result

