"""Write a chunk's samples into consecutive webdataset shards, atomically.

The shards are written by :class:`mmtrain.data.shards.ShardWriter`, the one webdataset
writer: each under a hidden temp name, renamed into place when complete, with its sidecar
index, so a killed run never leaves a truncated shard under a final name. Its size model
is exact, so ``shard_size`` is a real upper bound, exceeded only by a shard holding one
oversized sample. This class adds what prep's pipeline needs around it: the OutSample
encoding, numbering across chunks, resume checks and the final stale-shard clean-up,
with the same interface as :class:`~mmtrain.data.prep.mds_writer.MdsChunkWriter`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mmtrain.data.prep.sample import OutSample, to_wds
from mmtrain.data.shards import ShardWriter, remove_stale_shards, remove_temp_shards, shard_name


class WdsChunkWriter:
    """Writes ``{prefix}-{i:06d}.tar`` shards into one split directory.

    Args:
        split_dir: Output directory (created).
        prefix: Shard name prefix.
        shard_size: Byte limit per shard, 0 = none.
    """

    def __init__(self, split_dir: str | os.PathLike[str], prefix: str = "shard", shard_size: int = 0) -> None:
        self.dir = Path(split_dir)
        self.prefix = prefix
        self.shard_size = shard_size
        self.dir.mkdir(parents=True, exist_ok=True)

    def shard_name(self, index: int) -> str:
        return shard_name(self.prefix, index)

    def clean_temps(self) -> None:
        """Delete temp shards (and temp shard indexes) a killed run left behind."""
        remove_temp_shards(self.dir, f"{self.prefix}-")

    def write_chunk(self, samples: list[OutSample], start: int) -> list[dict[str, Any]]:
        """Write ``samples`` into shards numbered from ``start``; return ``[{name, samples, bytes}]``."""
        with ShardWriter(self.dir, self.prefix, start=start, shard_size=self.shard_size) as writer:
            for sample in samples:
                writer.write(to_wds(sample))
        return writer.shards

    def finish(self, shards: list[dict[str, Any]]) -> None:
        """Remove shards of this naming scheme that are not in ``shards`` (a larger earlier run)."""
        remove_stale_shards(self.dir, rf"{re.escape(self.prefix)}-\d{{6,}}\.tar", {s["name"] for s in shards})

    def is_intact(self, info: dict[str, Any]) -> bool:
        path = self.dir / info["name"]
        return path.is_file() and path.stat().st_size == info["bytes"]
