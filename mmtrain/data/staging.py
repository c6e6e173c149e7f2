"""Local staging for the commands that write (or transform) whole datasets at a URL.

``mmtrain prep ... --out s3://...`` writes its shards into a local staging directory and
uploads the finished tree (shards and their sidecar indexes first, ``index.json`` /
``stats.json`` last, so a reader never sees an index naming a missing shard). The staging
directory is derived from the URL and kept until the upload succeeded, so an interrupted
prep resumes from its chunk ledger like a local one. ``MMTRAIN_STAGING_DIR`` (default
``~/.cache/mmtrain/staging``) holds them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from mmtrain.data import storage

logger = logging.getLogger("mmtrain.data")


def staging_dir(url: str, kind: str) -> str:
    root = os.path.expanduser(os.environ.get("MMTRAIN_STAGING_DIR") or "~/.cache/mmtrain/staging")
    return os.path.join(root, f"{kind}-{hashlib.sha1(url.encode()).hexdigest()[:16]}-{storage.basename(url)}")


@contextmanager
def staged_output(out: str) -> Iterator[str]:
    """A local directory to write ``out`` into: ``out`` itself when it is local; for a URL a staging
    directory, uploaded to ``out`` (then removed) when the block ends without an error."""
    if not storage.is_url(out):
        yield out
        return
    storage.store_for(out).check_writable(out)  # before anything is staged: a missing bucket is found now
    local = staging_dir(out, "out")
    os.makedirs(local, exist_ok=True)
    yield local
    uploaded = storage.upload_tree(local, out)
    logger.info("uploaded %d files to %s", len(uploaded), out)
    shutil.rmtree(local, ignore_errors=True)


def stage_input(source: str) -> str:
    """A local copy of the dataset at URL ``source`` (tar shards with their indexes, or an MDS directory),
    downloaded into a staging directory (files already there with the right size are kept); a local
    ``source`` is returned as it is."""
    if not storage.is_url(source):
        return source
    from mmtrain.data.index import SIDECAR_SUFFIX
    from mmtrain.data.shards import list_remote_shards
    from mmtrain.data.sources import detect_format

    local = staging_dir(source, "in")
    os.makedirs(local, exist_ok=True)
    if detect_format(source) == "mds":
        import json

        root = storage.dirname(source) if storage.basename(source) == "index.json" else source.rstrip("/")
        index = storage.read_bytes(storage.join(root, "index.json"))
        files = [(storage.join(root, s["raw_data"]["basename"]), int(s["raw_data"]["bytes"]))
                 for s in json.loads(index)["shards"]]
        for url, size in files:
            _fetch(url, os.path.join(local, storage.basename(url)), size)
        storage.atomic_write_bytes(os.path.join(local, "index.json"), index)
        return local
    for url, size in list_remote_shards(source):
        _fetch(url, os.path.join(local, storage.basename(url)), size)
        try:
            _fetch(url + SIDECAR_SUFFIX, os.path.join(local, storage.basename(url) + SIDECAR_SUFFIX), None)
        except FileNotFoundError:
            pass  # indexed locally instead
    return local


def _fetch(url: str, dest: str, size: int | None) -> None:
    if size is not None and os.path.isfile(dest) and os.path.getsize(dest) == size:
        return
    storage.store_for(url).download(url, dest, size)
