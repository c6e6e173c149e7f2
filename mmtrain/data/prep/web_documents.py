"""Web documents (OBELICS / OmniCorpus, MMC4) from their listed form to :class:`Document` s, in input order.

A source (:mod:`mmtrain.data.prep.sources.obelics`, :mod:`mmtrain.data.prep.sources.mmc4`)
reads its files into :class:`RawDocument` s: text spans and :class:`ImageRef` s in reading
order, checked for shape; a malformed row is dropped there and counted
(:func:`drop_document`: a reason of :data:`DOCUMENT_DROP_REASONS`, an example naming the
file, the row and what was wrong). :func:`resolve_documents` gets every image through an
:class:`~mmtrain.data.prep.fetch.ImageFetcher` (threads; up to
:data:`DOCUMENTS_IN_FLIGHT_PER_WORKER` documents per thread in flight) and yields the
documents in the order the source gave them, an image that could not be got or decoded
standing as a :class:`~mmtrain.data.documents.MissingImage` place that
:func:`~mmtrain.data.documents.write_document_shards` leaves out and counts, keeping the rest
of the document (and dropping, as ``empty_document``, a document with nothing left).

Counts go into the writer's :class:`~mmtrain.data.documents.DocumentStats` (:func:`new_stats`),
so ``stats.json`` has every reason of both, zeros included: ``dropped_documents`` and
``dropped_images`` by reason, ``drop_examples`` (a few per reason).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mmtrain.data.documents import IMAGE_DROP_REASONS as WRITER_IMAGE_DROP_REASONS
from mmtrain.data.documents import DocImage, Document, DocumentStats, MissingImage
from mmtrain.data.prep.fetch import ImageFetcher, ImageRef

MAX_EXAMPLES = 5  # per reason, as the writer keeps
DOCUMENTS_IN_FLIGHT_PER_WORKER = 4  # documents whose images are being fetched, per fetch thread

# Every reason a source drops a whole row, in the order the checks run (the writer adds empty_document).
DOCUMENT_DROP_REASONS: tuple[str, ...] = (
    "document_bad_row",  # a row / line that does not parse, lacks a required column / key or has one of the wrong type
    "document_bad_metadata",  # OBELICS metadata / general_metadata that is not the JSON list / object expected
    "document_lengths_differ",  # OBELICS images, texts (and metadata) lists of unequal length
    "document_item_empty",  # OBELICS: an index where both images and texts are null
    "document_item_both",  # OBELICS: an index where both images and texts are set
)
# The reasons a source leaves one image out by choice (the fetch failures are the writer's reasons:
# image_unfetchable, image_missing_file, image_undecodable).
IMAGE_FILTER_REASONS: tuple[str, ...] = (
    "image_below_min_sim",  # MMC4: matched_sim below --min-sim
    "image_over_max_images",  # MMC4: beyond --max-images-per-doc; the lowest similarities go
)


@dataclass
class RawDocument:
    """A document as its source lists it, before any image is read.

    Attributes:
        key: The output key: unique in the run, only ``[A-Za-z0-9_-]`` (``candidate.KeyAllocator``).
        items: Text spans and images in reading order.
        meta: The document's metadata (its URL, ...) and ``source``: where it came from (file and row).
    """

    key: str
    items: list[str | ImageRef]
    meta: dict[str, Any] = field(default_factory=dict)


def new_stats() -> DocumentStats:
    """The writer's stats with this module's reasons listed too (zeros included)."""
    stats = DocumentStats()
    stats.document_drops.update({r: 0 for r in DOCUMENT_DROP_REASONS})
    stats.image_drops.update({r: 0 for r in (*WRITER_IMAGE_DROP_REASONS, *IMAGE_FILTER_REASONS)})
    return stats


def _example(stats: DocumentStats, reason: str, detail: str) -> None:
    lines = stats.examples.setdefault(reason, [])
    if len(lines) < MAX_EXAMPLES:
        lines.append(detail)


def drop_document(stats: DocumentStats, reason: str, detail: str) -> None:
    """Count a row a source could not make a document of; ``detail`` names the file, row and what was wrong."""
    if reason not in DOCUMENT_DROP_REASONS:
        raise ValueError(f"unknown document drop reason {reason!r}; expected one of {list(DOCUMENT_DROP_REASONS)}")
    stats.document_drops[reason] += 1
    _example(stats, reason, detail)


def drop_filtered_image(stats: DocumentStats, reason: str, detail: str) -> None:
    """Count an image a source's filter left out (not logged: filtering is expected)."""
    if reason not in IMAGE_FILTER_REASONS:
        raise ValueError(f"unknown image filter reason {reason!r}; expected one of {list(IMAGE_FILTER_REASONS)}")
    stats.image_drops[reason] += 1
    _example(stats, reason, detail)


def _assemble(raw: RawDocument, results: list[Future[DocImage | MissingImage] | None]) -> Document:
    segments: list[Any] = [item if future is None else future.result() for item, future in zip(raw.items, results,
                                                                                                  strict=True)]
    return Document(key=raw.key, segments=segments, meta=raw.meta)


def resolve_documents(raws: Iterable[RawDocument], fetcher: ImageFetcher) -> Iterator[Document]:
    """The documents of ``raws`` with their images got, in input order (module docstring)."""
    window = DOCUMENTS_IN_FLIGHT_PER_WORKER * fetcher.workers
    pending: deque[tuple[RawDocument, list[Future[DocImage | MissingImage] | None]]] = deque()
    for raw in raws:
        pending.append((raw, [fetcher.submit(item) if isinstance(item, ImageRef) else None for item in raw.items]))
        while len(pending) > window:
            yield _assemble(*pending.popleft())
    while pending:
        yield _assemble(*pending.popleft())
