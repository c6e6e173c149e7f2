"""Write a chunk's samples as mosaicml-streaming MDS shards, atomically.

``MDSWriter`` writes a whole dataset directory and its ``index.json`` and gives no
way to append, so each chunk is written by its own MDSWriter into a hidden temp
directory ``.tmp-NNNNNN`` (the chunk's first shard number); its shard files are
fsynced and renamed to their final names ``shard.NNNNN.mds`` (numbered across
chunks), and their index entries are kept. :meth:`MdsChunkWriter.finish` writes the
combined ``index.json`` atomically once every chunk is done, removing the stale
shards of a larger earlier run with :func:`mmtrain.data.shards.remove_stale_shards`
(as the webdataset writers do). A killed run therefore leaves only complete shards
under final names (plus a temp dir that the next run deletes), and the directory's
``index.json`` is either the previous run's or the new complete one, never partial.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmtrain.atomic import atomic_write_text
from mmtrain.data.prep.config import MDS_MAX_SHARD_BYTES
from mmtrain.data.prep.sample import to_mds
from mmtrain.data.shards import remove_stale_shards

INDEX = "index.json"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class MdsChunkWriter:
    """Writes ``shard.NNNNN.mds`` files plus ``index.json`` into one split directory.

    Args:
        split_dir: Output directory (created).
        columns: MDS column spec (see ``sample.mds_columns``).
        shard_size: Byte limit per shard, 0 = streaming's 4 GiB maximum.
        encode: A sample -> its MDSWriter row (default: an :class:`OutSample` by ``sample.to_mds``;
            documents pass ``mmtrain.data.documents.to_mds_row``).
    """

    def __init__(self, split_dir: str | os.PathLike[str], columns: dict[str, str], shard_size: int = 0,
                 encode: Callable[[Any], dict[str, Any]] | None = None) -> None:
        self.dir = Path(split_dir)
        self.encode = encode or (lambda sample: to_mds(sample, self.columns))
        self.columns = dict(columns)
        self.shard_size = shard_size or MDS_MAX_SHARD_BYTES
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard.{index:05d}.mds"

    def clean_temps(self) -> None:
        """Delete temp directories a killed run left behind."""
        for name in os.listdir(self.dir):
            if name.startswith(".tmp-") and (self.dir / name).is_dir():
                shutil.rmtree(self.dir / name)

    def write_chunk(self, samples: list[Any], start: int) -> list[dict[str, Any]]:
        """Write ``samples`` into shards numbered from ``start``.

        Returns ``[{name, samples, bytes, mds}]``, where ``mds`` is the shard's
        ``index.json`` entry (basename rewritten to the final name).
        """
        from streaming import (
            MDSWriter,  # importing streaming takes seconds; only MDS runs pay
        )

        tmp = self.dir / f".tmp-{start:06d}"  # one chunk at a time per directory: its start is unique
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            # sha1 per shard in index.json: readers of a remote copy check each download against it
            writer = MDSWriter(out=str(tmp), columns=self.columns, size_limit=self.shard_size, hashes=["sha1"])
            try:
                for sample in samples:
                    writer.write(self.encode(sample))
            except BaseException:
                # Stop the writer's upload thread pool; the temp dir is deleted below.
                writer.cancel_future_jobs()
                raise
            writer.finish()
            index = json.loads((tmp / INDEX).read_text())
            infos = []
            for k, entry in enumerate(index["shards"]):
                entry = copy.deepcopy(entry)
                written = tmp / entry["raw_data"]["basename"]
                final = self.shard_name(start + k)
                _fsync(written)  # durable before visible
                os.replace(written, self.dir / final)
                entry["raw_data"]["basename"] = final
                infos.append({"name": final, "samples": entry["samples"], "bytes": entry["raw_data"]["bytes"], "mds": entry})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return infos

    def finish(self, shards: list[dict[str, Any]]) -> None:
        """Write ``index.json`` listing ``shards`` in order; remove shard files not listed."""
        remove_stale_shards(self.dir, r"shard\.\d{5,}\.mds", {s["name"] for s in shards}, what="MDS shard")
        index = {"version": 2, "shards": [s["mds"] for s in shards]}
        atomic_write_text(self.dir / INDEX, json.dumps(index, sort_keys=True))

    def is_intact(self, info: dict[str, Any]) -> bool:
        path = self.dir / info["name"]
        return path.is_file() and path.stat().st_size == info["bytes"]
