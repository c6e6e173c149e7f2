"""Text corpora: plain text as text-only documents (``mmtrain prep text``).

A text-only document is a :class:`~mmtrain.data.documents.Document` whose segments are text
spans only, written by the one document writer
(:func:`~mmtrain.data.documents.write_document_shards`) in the document layout; mixed into a
multimodal run by ``data.sources`` weight, it trains the text path (next-token loss) and keeps
the language ability of the backbone.

Inputs, by extension:

- ``.txt``: one document per non-empty line (the line without its line break and the
  whitespace around it); blank lines are skipped.
- ``.jsonl``: one JSON object per line, the document in the string field ``text_field``
  (default ``text``); blank lines are skipped.
- ``.parquet``: the string column ``text_field``, one document per row (read with pyarrow).

Bad input raises ValueError naming the file, the line (1-based) or row (0-based) and the
field: a line that is not UTF-8 or not a JSON object, a missing field or column, a value that
is not a string. A document whose text is empty (or only whitespace) is written as no segment,
so the writer drops it as ``document_empty`` (counted in ``stats.json``).

With ``max_text_tokens`` a document's text is cut at whitespace into spans of at most that
many tokens (by ``count_tokens``, summed word by word; one word over the budget is a span of
its own), so the writer's budget split (:func:`~mmtrain.data.documents.split_document`) makes
parts ``KEY``, ``KEY_1``, ... of at most ``max_text_tokens`` each; without it a document is
one span.

Keys: ``STEM-LINE`` (``.txt``, ``.jsonl``: the 1-based line) or ``STEM-ROW`` (``.parquet``:
the 0-based row), 8 digits, sanitized; a repeated stem gets ``-1``, ``-2``, ...
(:class:`~mmtrain.data.prep.candidate.KeyAllocator`). Each document's meta is
``{"source": "FILE line N"}`` (or ``row N``).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mmtrain.data.documents import Document, count_words
from mmtrain.data.prep.candidate import KeyAllocator

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")
BATCH_ROWS = 1024  # parquet rows read at a time
_PIECE = re.compile(r"\S+\s*")  # a word and the whitespace after it


def text_spans(text: str, max_tokens: int = 0, count_tokens: Callable[[str], int] = count_words) -> list[str]:
    """``text`` (stripped) as text spans: one span, or with ``max_tokens`` spans cut at whitespace of
    at most ``max_tokens`` tokens each (``count_tokens`` summed word by word). ``[]`` for no text."""
    text = text.strip()
    if not text:
        return []
    if not max_tokens or count_tokens(text) <= max_tokens:
        return [text]
    spans: list[str] = []
    pieces: list[str] = []
    tokens = 0
    for match in _PIECE.finditer(text):
        piece = match.group()
        cost = count_tokens(piece)
        if pieces and tokens + cost > max_tokens:
            spans.append("".join(pieces).rstrip())
            pieces, tokens = [], 0
        pieces.append(piece)
        tokens += cost
    if pieces:
        spans.append("".join(pieces).rstrip())
    return spans


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {'null' if value is None else 'a ' + type(value).__name__}, "
                         "expected a string (the document's text)")
    return value


def _txt(path: str) -> Iterator[tuple[int, str, str]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} line {n}: not UTF-8 text ({exc})") from None
            if line.strip():
                yield n, line, f"{path} line {n}"


def _jsonl(path: str, field: str) -> Iterator[tuple[int, str, str]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{where}: not a JSON object ({exc}); expected one object per line with the "
                                 f"document in field {field!r} (--text-field)") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: a JSON {type(obj).__name__}, expected an object with the document in "
                                 f"field {field!r} (--text-field)")
            if field not in obj:
                raise ValueError(f"{where}: no field {field!r} (--text-field); the object's fields: {sorted(obj)[:20]}")
            yield n, _string(obj[field], where, field), where


def _parquet_file(path: str, field: str) -> Any:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    names = file.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (--text-field); columns: {names}")
    return file


def _parquet(path: str, field: str) -> Iterator[tuple[int, str, str]]:
    row = 0
    for batch in _parquet_file(path, field).iter_batches(batch_size=BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            where = f"{path} row {row}"
            yield row, _string(value, where, field), where
            row += 1


def iter_text_documents(paths: Sequence[str | os.PathLike[str]], text_field: str = "text", max_text_tokens: int = 0,
                        count_tokens: Callable[[str], int] = count_words,
                        keys: KeyAllocator | None = None) -> Iterator[Document]:
    """The text-only documents of ``paths`` (``.txt``, ``.jsonl``, ``.parquet``; module docstring), in order.
    The files (existence, extension; a parquet's column) are checked before the first document is read."""
    if not text_field:
        raise ValueError("--text-field: expected a field / column name")
    if max_text_tokens < 0:
        raise ValueError(f"--max-text-tokens: expected an int >= 0 (0 = no limit), got {max_text_tokens}")
    files = [os.fspath(p) for p in paths]
    for path in files:
        if not path.endswith(TEXT_SUFFIXES):
            raise ValueError(f"{path}: not a text corpus file; expected one of {list(TEXT_SUFFIXES)} (.txt: a document "
                             f"per line, .jsonl: an object per line, .parquet: a column, both with --text-field)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        if path.endswith(".parquet"):
            _parquet_file(path, text_field)
    return _documents(files, text_field, max_text_tokens, count_tokens, keys or KeyAllocator())


def _documents(files: list[str], field: str, max_text_tokens: int, count_tokens: Callable[[str], int],
               keys: KeyAllocator) -> Iterator[Document]:
    for path in files:
        name = os.path.basename(path)
        stem = name[:name.rindex(".")] if "." in name else name
        records = _txt(path) if path.endswith(".txt") else _jsonl(path, field) if path.endswith(".jsonl") \
            else _parquet(path, field)
        for n, text, where in records:
            spans: list = text_spans(text, max_text_tokens, count_tokens)
            yield Document(key=keys.allocate(f"{stem}-{n:08d}"), segments=spans, meta={"source": where})
