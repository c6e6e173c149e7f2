"""The images of web documents: got from where the dataset points and checked to decode, in a thread pool.

Where an image is (:class:`ImageRef.source`):

- ``bytes``: the encoded image itself (OBELICS / OmniCorpus rows that carry their images);
- an ``http://`` / ``https://`` URL: fetched with one GET through :mod:`mmtrain.data.storage`'s
  HTTP store, so its faults are handled as a shard read's are: a timeout, a dropped connection,
  a 5xx / 408 / 429 answer or a short body is retried up to ``MMTRAIN_IO_RETRIES`` times (default
  5) with exponential backoff from ``MMTRAIN_IO_BACKOFF_S`` (default 0.5 s, jittered, at most
  30 s); ``MMTRAIN_IO_TIMEOUT_S`` (default 60) bounds connecting and each read; a 404, a 403 or
  any other 4xx is final at once. ``MMTRAIN_HTTP_BEARER_TOKEN`` is never sent to these hosts.
  For a crawl of many dead hosts, lower the retries (``MMTRAIN_IO_RETRIES=1``) and the timeout;
- an ``s3://`` / ``gs://`` URL: read through the store of that scheme (its credentials);
- anything else: a local file path.

:func:`fetch_image` never raises for a bad image: it returns a
:class:`~mmtrain.data.documents.MissingImage` place, which
:func:`~mmtrain.data.documents.write_document_shards` leaves out and counts, with a detail
naming where the image was (file, row, index), its URL or path and what went wrong:

- ``image_unfetchable``: a dead URL (404, any other 4xx, refused or timed out after the retries);
- ``image_missing_file``: a local path (or a file under ``prep mmc4 --images``) that does not exist;
- ``image_undecodable``: bytes that do not decode fully as an image. The check is the writer's
  own (:func:`mmtrain.data.documents.process_image`), done here in the fetch threads so the
  detail can name the row and URL; the writer then resizes (``--resolution``, ``--resize-mode``
  through :func:`mmtrain.data.images.resize_image`) and stores the image.

Parallelism: :class:`ImageFetcher` runs one task per image on ``workers`` threads (default 16:
the work is mostly waiting on the network; PIL releases the GIL while it decodes).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mmtrain.data.documents import DocImage, ImageOptions, MissingImage, process_image
from mmtrain.data.errors import ShardDataError
from mmtrain.data.images import sniff_extension
from mmtrain.data.storage import HttpStore, is_url, store_for

DEFAULT_FETCH_WORKERS = 16
_WEB = HttpStore(send_token=False, pool_size=64)  # one session for every fetch thread, 64 connections per host


@dataclass(frozen=True)
class ImageRef:
    """One image of a document before it is read.

    Attributes:
        source: Encoded bytes, a URL or a local path (module docstring).
        where: Where the reference is, for details and errors (``file.parquet row 3 index 2``).
        meta: The dataset's own metadata of this image, stored with it (its keys lose to ours).
    """

    source: bytes | str
    where: str
    meta: dict[str, Any] = field(default_factory=dict)


def read_source(source: str) -> bytes:
    """The bytes at a URL or local path; OSError (FileNotFoundError, PermissionError, ...) naming it when they cannot be got."""
    if source.startswith(("http://", "https://")):
        return _WEB.read(source)
    if is_url(source):
        return store_for(source).read(source)
    with open(source, "rb") as fh:
        return fh.read()


def fetch_image(ref: ImageRef) -> DocImage | MissingImage:
    """Get one image and check that it decodes; never raises for a bad image (module docstring)."""
    source = ref.source
    meta = dict(ref.meta)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, what = bytes(source), "the image bytes"
    else:
        what = meta["source"] = source
        try:
            data = read_source(source)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            reason = "image_unfetchable" if is_url(source) else "image_missing_file"
            return MissingImage(reason, f"{ref.where}: cannot get {source}: {exc}", meta)
        except Exception as exc:  # noqa: BLE001 -- requests' errors are OSErrors, a malformed URL or host name a
            # ValueError, and web data finds the rest: one odd URL must not stop a run over millions
            text = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            return MissingImage("image_unfetchable", f"{ref.where}: cannot get {source}: {text}", meta)
    image = DocImage(data=data, ext=sniff_extension(data), meta=meta)
    try:
        process_image(image, ImageOptions())  # resolution 0: only the decode check
    except ShardDataError as exc:
        detail = str(exc)
        if "cannot identify image file" in detail:  # PIL's message names a memory address; keep details reproducible
            detail = "cannot decode image: not a recognised image format"
        return MissingImage("image_undecodable", f"{ref.where}: {what}: {detail} (expected a JPEG/PNG/WebP image file)",
                            meta)
    return image


class ImageFetcher:
    """A pool of ``workers`` threads running :func:`fetch_image`; use as a context manager."""

    def __init__(self, workers: int = DEFAULT_FETCH_WORKERS) -> None:
        if workers < 1:
            raise ValueError(f"--workers: expected an int >= 1, got {workers}")
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmtrain-fetch")

    def submit(self, ref: ImageRef) -> Future[DocImage | MissingImage]:
        return self._pool.submit(fetch_image, ref)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_path(path: str, base_dir: str) -> str:
    """A local image path of a dataset: relative ones resolve against ``base_dir`` (the dataset file's folder)."""
    if is_url(path) or os.path.isabs(path):
        return path
    return os.path.join(base_dir, path)
