"""Manifest source: a CSV / TSV / JSONL / JSON / parquet table of image paths and captions.

Each row names a local image (relative paths resolve against the manifest's
folder) and its caption, optionally a class label. Bad rows -- a missing column
or value, an empty caption, a non-numeric label -- are dropped and counted by
reason with their row number; only problems with the manifest as a whole (file
missing, unknown format, a configured column absent from every row) raise.

Sample keys: the image's path relative to the manifest's folder, its extension
dropped, sanitized (``imgs/p00.png`` -> ``imgs_p00``). An absolute path is made
relative first, so ``/data/imgs/p00.png`` in ``/data/manifest.csv`` gets the same
key as ``imgs/p00.png``; one outside the folder keeps its other directories
(``/other/p00.png`` -> ``other_p00``). Keys that collide get ``-1``, ``-2``, ... in
manifest order, which is also the order samples are written in.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmtrain.data.prep.candidate import Candidate, Drop, KeyAllocator, Source
from mmtrain.data.prep.process import parse_label

MANIFEST_FORMATS: dict[str, str] = {
    ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
}
# An empty label_column string turns labels off; None means "use 'label' if present".
DEFAULT_LABEL_COLUMN = "label"


_BAD = object()  # marks a row that could not be parsed at all


def _rows_csv(path: Path, delimiter: str) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    # surrogateescape: a stray non-UTF-8 byte spoils one row (caught below), not the whole file.
    handle = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")  # noqa: SIM115 -- closed by rows()
    reader = csv.DictReader(handle, delimiter=delimiter)
    try:
        header = list(reader.fieldnames or [])
    except csv.Error as exc:
        handle.close()
        raise ValueError(f"manifest {str(path)!r}: cannot read the header: {exc}") from exc

    def rows() -> Iterator[tuple[int, Any]]:
        with handle:
            last_error_line = -1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if reader.line_num == last_error_line:  # the reader is stuck; give up on the rest
                        raise ValueError(f"manifest {str(path)!r} line {reader.line_num}: {exc}") from exc
                    last_error_line = reader.line_num
                    yield reader.line_num, exc
                    continue
                try:
                    for value in row.values():
                        if isinstance(value, str):
                            value.encode("utf-8")
                except UnicodeEncodeError:
                    yield reader.line_num, ValueError("not valid UTF-8")
                    continue
                yield reader.line_num, row

    return header, rows()


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    # Binary lines, decoded one by one: a single bad byte loses one row, not the file.
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                if not line.strip():
                    continue
                yield line_number, json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield line_number, exc


def _rows_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {str(path)!r}: not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = data["rows"]
    if not isinstance(data, list):
        raise ValueError(f"manifest {str(path)!r}: expected a JSON array of row objects (or {{\"rows\": [...]}})")  # noqa: TRY004 -- CLI maps ValueError to exit 2
    yield from enumerate(data, 1)


def _rows_parquet(path: Path) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    import pyarrow.parquet as pq  # a dependency; imported here so CSV users do not pay its import time

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise ValueError(f"manifest {str(path)!r}: cannot read parquet: {exc}") from exc
    header = list(parquet.schema_arrow.names)

    def rows() -> Iterator[tuple[int, Any]]:
        number = 0
        for batch in parquet.iter_batches():
            for row in batch.to_pylist():
                number += 1
                yield number, row

    return header, rows()


def _clean(value: Any) -> Any:
    """JSON-safe copy of an extra column value (NaN is not valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def list_manifest(
    manifest: str | os.PathLike[str],
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    manifest_format: str = "auto",
) -> Source:
    """List the rows of a manifest.

    Args:
        manifest: Path to the table.
        image_column: Column with the image path, default ``"image"``. Relative
            paths resolve against the manifest's folder.
        caption_column: Column with the caption, default ``"caption"``.
        label_column: Column with an integer class label. Default None: use a
            ``"label"`` column when the manifest has one; ``""`` disables labels; a
            name given explicitly must exist.
        manifest_format: ``"auto"`` (default: by extension), ``"csv"``, ``"tsv"``,
            ``"jsonl"``, ``"json"`` (array of objects) or ``"parquet"`` (read with pyarrow).

    Other columns are copied into each sample's ``json`` metadata (with
    ``manifest_row``, the 1-based line/row number). Keys derive from the image
    path relative to the manifest folder.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: unknown format, or a configured column is in no row.
    """
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    fmt = MANIFEST_FORMATS.get(path.suffix.lower()) if manifest_format == "auto" else manifest_format
    if fmt not in set(MANIFEST_FORMATS.values()):
        raise ValueError(
            f"manifest {str(path)!r}: unknown format {manifest_format if manifest_format != 'auto' else path.suffix!r}; "
            f"expected one of {sorted(set(MANIFEST_FORMATS.values()))} (by extension {sorted(MANIFEST_FORMATS)})"
        )
    header: list[str] | None = None
    if fmt in ("csv", "tsv"):
        header, rows = _rows_csv(path, "," if fmt == "csv" else "\t")
    elif fmt == "parquet":
        header, rows = _rows_parquet(path)
    else:
        rows = _rows_jsonl(path) if fmt == "jsonl" else _rows_json(path)

    if header is not None:
        for name, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in header:
                raise ValueError(f"manifest {str(path)!r}: no column {column!r} ({name}); columns: {header}")
        if label_column and label_column not in header:
            raise ValueError(f"manifest {str(path)!r}: no column {label_column!r} (label_column); columns: {header}")

    root = path.resolve().parent
    keys = KeyAllocator()
    candidates: list[Candidate] = []
    drops: list[Drop] = []
    columns_seen: set[str] = set(header or [])
    pending: list[tuple[int, dict[str, Any]]] = []
    for number, row in rows:
        where = f"{path.name} row {number}"
        if isinstance(row, Exception):
            drops.append(Drop("bad_row", where, f"cannot parse: {row}"))
            continue
        if not isinstance(row, dict):
            drops.append(Drop("bad_row", where, f"expected an object with columns, got {type(row).__name__}"))
            continue
        columns_seen.update(k for k in row if isinstance(k, str))
        pending.append((number, row))

    for name, column in (("image_column", image_column), ("caption_column", caption_column)):
        if pending and column not in columns_seen:
            raise ValueError(f"manifest {str(path)!r}: no row has column {column!r} ({name}); columns seen: {sorted(columns_seen)}")
    if label_column is None:
        label_column = DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in columns_seen else ""
    elif label_column and pending and label_column not in columns_seen:
        raise ValueError(f"manifest {str(path)!r}: no row has column {label_column!r} (label_column); columns seen: {sorted(columns_seen)}")

    used = {image_column, caption_column, label_column, None}
    for number, row in pending:
        where = f"{path.name} row {number}"
        image, caption = row.get(image_column), row.get(caption_column)
        if None in row:  # csv.DictReader files surplus fields under the None key
            drops.append(Drop("bad_row", where, f"more fields than the {len(header or [])} header columns"))
            continue
        if fmt in ("csv", "tsv") and any(v is None for v in row.values()):  # DictReader's fill for short rows
            drops.append(Drop("bad_row", where, f"fewer fields than the {len(header or [])} header columns"))
            continue
        if _missing(image) or not isinstance(image, str):
            drops.append(Drop("bad_row", where, f"missing or non-text value in column {image_column!r}"))
            continue
        if caption is None or (isinstance(caption, float) and math.isnan(caption)):
            drops.append(Drop("bad_row", where, f"missing value in column {caption_column!r}"))
            continue
        if isinstance(caption, (list, dict)):
            drops.append(Drop("bad_row", where, f"column {caption_column!r} holds a {type(caption).__name__}, expected text"))
            continue
        caption = str(caption).strip()
        if not caption:
            drops.append(Drop("empty_caption", where, f"empty caption in column {caption_column!r}"))
            continue
        label = None
        if label_column:
            raw = row.get(label_column)
            try:
                if _missing(raw):
                    raise ValueError("missing value")
                label = parse_label(raw)
            except ValueError as exc:
                drops.append(Drop("bad_label", where, f"column {label_column!r}: {exc}"))
                continue
        image_path = Path(image.strip()).expanduser()
        if not image_path.is_absolute():
            image_path = root / image_path
        rel = os.path.relpath(os.path.normpath(image_path), root)
        meta = {str(k): _clean(v) for k, v in row.items() if k not in used}
        meta["manifest_row"] = number
        candidates.append(Candidate(
            key=keys.allocate(os.path.splitext(rel)[0]),
            source=image.strip(),
            group=rel,
            image=str(image_path),
            caption=caption,
            label=label,
            meta=meta,
        ))
    spec = {"image_column": image_column, "caption_column": caption_column, "label_column": label_column,
            "manifest_format": fmt}
    return Source(kind="manifest", spec=spec, candidates=candidates, drops=drops, has_labels=bool(label_column))
