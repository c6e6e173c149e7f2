"""OBELICS / OmniCorpus source: parquet files, one web document per row.

Columns (read with pyarrow, in row order, file after file):

- ``images`` and ``texts``: lists of equal length; at each index exactly one is non-null, so
  ``<img1> text <img2>`` is ``images=[u1, None, u2]``, ``texts=[None, "text", None]``. An image
  is a URL (``http(s)://`` fetched, ``s3://`` / ``gs://`` read), encoded bytes, a local path
  (relative ones resolve against the parquet file's folder), or a Hugging Face ``Image``
  struct ``{"bytes", "path"}``. A text that is empty after stripping is skipped.
- ``metadata`` (optional): a JSON string (or a list) parallel to the items; each image's
  entry (an object, e.g. its original size and URL) is stored with the image.
- ``general_metadata`` (optional): a JSON string (or an object): the document's URL and the
  like, stored as the document's ``meta``.

A row that breaks this shape is dropped, counted by reason (``document_lengths_differ``,
``document_item_empty``, ``document_item_both``, ``document_bad_metadata``,
``document_bad_row``), with an example naming the file, the row (0-based) and the index.
Only a problem with a whole file raises: it does not exist, is not parquet, or lacks the
``images`` or ``texts`` column.

Keys: ``STEM-ROW`` (the file's name without ``.parquet``, the 0-based row, 8 digits), sanitized.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from mmtrain.data.documents import DocumentStats
from mmtrain.data.prep.candidate import KeyAllocator
from mmtrain.data.prep.fetch import ImageRef, resolve_path
from mmtrain.data.prep.web_documents import RawDocument, drop_document

REQUIRED_COLUMNS: tuple[str, ...] = ("images", "texts")
OPTIONAL_COLUMNS: tuple[str, ...] = ("metadata", "general_metadata")
BATCH_ROWS = 256  # rows read from parquet at a time


class _BadRow(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _json(value: Any, expected: type, column: str) -> Any:
    """A JSON string (or the value itself when parquet already holds it structured) of type ``expected``; None stays None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _BadRow("document_bad_metadata", f"{column} is not JSON: {exc}") from None
    if value is not None and not isinstance(value, expected):
        raise _BadRow("document_bad_metadata", f"{column}: expected a JSON {'list' if expected is list else 'object'}, "
                                               f"got {type(value).__name__}")
    return value


def _image_source(value: Any, base_dir: str, at: str) -> bytes | str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a Hugging Face Image struct
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value.strip():
        return resolve_path(value.strip(), base_dir)
    raise _BadRow("document_bad_row", f"{at}: images entry is a {type(value).__name__} (expected a URL, a path or bytes)")


def parse_row(row: dict[str, Any], where: str, base_dir: str) -> tuple[list[str | ImageRef], dict[str, Any]]:
    """``(items, document metadata)`` of one row; raises _BadRow with the reason and what was wrong."""
    images, texts = row.get("images"), row.get("texts")
    if not isinstance(images, list) or not isinstance(texts, list):
        raise _BadRow("document_bad_row", f"images and texts must be lists, got {type(images).__name__} and "
                                          f"{type(texts).__name__}")
    if len(images) != len(texts):
        raise _BadRow("document_lengths_differ", f"images has {len(images)} entries, texts {len(texts)} (expected "
                                                 "lists of equal length)")
    item_meta = _json(row.get("metadata"), list, "metadata")
    if item_meta is not None and len(item_meta) != len(images):
        raise _BadRow("document_lengths_differ", f"metadata has {len(item_meta)} entries, images and texts "
                                                 f"{len(images)} (expected a list parallel to them)")
    general = _json(row.get("general_metadata"), dict, "general_metadata") or {}
    items: list[str | ImageRef] = []
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        at = f"index {i}"
        if image is None and text is None:
            raise _BadRow("document_item_empty", f"{at}: both images and texts are null (expected exactly one set)")
        if image is not None and text is not None:
            raise _BadRow("document_item_both", f"{at}: both images and texts are set (expected exactly one)")
        if text is not None:
            if not isinstance(text, str):
                raise _BadRow("document_bad_row", f"{at}: texts entry is a {type(text).__name__} (expected a string)")
            if text.strip():
                items.append(text)
            continue
        meta = item_meta[i] if item_meta is not None else None
        if meta is not None and not isinstance(meta, dict):
            raise _BadRow("document_bad_metadata", f"{at}: metadata entry of an image is a {type(meta).__name__} "
                                                   "(expected an object or null)")
        items.append(ImageRef(_image_source(image, base_dir, at), f"{where} {at}", dict(meta or {})))
    return items, {**general, "source": where}


def _open(path: str) -> tuple[Any, list[str]]:
    """The parquet file at ``path`` and the columns to read; raises naming the file when it is not an OBELICS parquet."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such parquet file")
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    names = set(table.schema_arrow.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (an OBELICS / OmniCorpus parquet has the "
                         f"columns {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}; found {', '.join(sorted(names))})")
    return table, [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in names]


def iter_obelics(paths: Sequence[str | os.PathLike[str]], stats: DocumentStats,
                 keys: KeyAllocator | None = None) -> Iterator[RawDocument]:
    """The documents of the parquet files ``paths``, in order; malformed rows are counted in ``stats`` (module
    docstring). Every file is checked before the first document is read, so a bad path fails before any output."""
    files = [(path, *_open(path)) for path in map(os.fspath, paths)]
    return _documents(files, stats, keys or KeyAllocator())


def _documents(files: list[tuple[str, Any, list[str]]], stats: DocumentStats, keys: KeyAllocator) -> Iterator[RawDocument]:
    for path, table, columns in files:
        base_dir = os.path.dirname(os.path.abspath(path))
        stem = os.path.basename(path).removesuffix(".parquet")
        row_number = 0
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                where = f"{path} row {row_number}"
                key = keys.allocate(f"{stem}-{row_number:08d}")
                row_number += 1
                try:
                    items, meta = parse_row(row, where, base_dir)
                except _BadRow as exc:
                    drop_document(stats, exc.reason, f"{where} (key {key!r}): {exc}")
                    continue
                yield RawDocument(key, items, meta)
