"""Write a chunk's samples into consecutive webdataset shards, atomically.

Each shard goes to a hidden temp name and is renamed into place when complete
(``mmtrain.data.shards._ShardFile``), so a killed run never leaves a truncated
shard under a final name. Shard bytes are computed exactly from the tar layout
(each member's header as tarfile builds it, data padded to 512 bytes, the archive
to 10 KiB records), so ``shard_size`` is a real upper bound, exceeded only by a
shard holding one oversized sample.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from mmtrain.data.prep.sample import OutSample, to_wds
from mmtrain.data.index import SIDECAR_SUFFIX
from mmtrain.data.shards import TAR_MTIME, _ShardFile

logger = logging.getLogger("mmtrain.data.prep")

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to whole records
_END = 2 * _BLOCK  # two zero blocks close an archive


def _member_bytes(encoded: dict[str, Any]) -> int:
    """Bytes the sample's members take in the tar: headers (built the way TarWriter builds them) + padded data."""
    total = 0
    key = encoded["__key__"]
    for name, value in encoded.items():
        if name.startswith("__"):
            continue
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(value), TAR_MTIME, 0o444, "bigdata", "bigdata"
        total += len(info.tobuf(tarfile.PAX_FORMAT)) + -(-len(value) // _BLOCK) * _BLOCK
    return total


def tar_size(member_bytes: int) -> int:
    """File size of a tar whose members take ``member_bytes`` (headers included)."""
    return -(-(member_bytes + _END) // _RECORD) * _RECORD


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
        self._final = re.compile(rf"{re.escape(prefix)}-\d{{6,}}\.tar")

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def clean_temps(self) -> None:
        """Delete temp shards (and temp shard indexes) a killed run left behind."""
        for name in os.listdir(self.dir):
            if name.startswith(f".{self.prefix}-") and name.endswith(".tmp"):
                os.remove(self.dir / name)

    def write_chunk(self, samples: list[OutSample], start: int, tag: str = "") -> list[dict[str, Any]]:
        """Write ``samples`` into shards numbered from ``start``; return ``[{name, samples, bytes}]``."""
        del tag  # temp names derive from the final names, which are unique already
        infos: list[dict[str, Any]] = []
        shard: _ShardFile | None = None
        members = 0
        try:
            for sample in samples:
                encoded = to_wds(sample)
                size = _member_bytes(encoded)
                if shard is not None and self.shard_size and tar_size(members + size) > self.shard_size:
                    infos.append(self._commit(shard, members))
                    shard = None
                if shard is None:
                    shard = _ShardFile(str(self.dir / self.shard_name(start + len(infos))))
                    members = 0
                shard.write(encoded)
                members += size
            if shard is not None:
                infos.append(self._commit(shard, members))
                shard = None
        except BaseException:
            # BaseException: Ctrl-C must not leave a temp file behind either.
            if shard is not None:
                shard.abort()
            raise
        return infos

    @staticmethod
    def _commit(shard: _ShardFile, members: int) -> dict[str, Any]:
        shard.commit()
        size = os.path.getsize(shard.final_path)
        if size != tar_size(members):
            # Only a changed TarWriter header layout gets here; shard_size would then be approximate.
            logger.warning("shard %s: %d bytes, the size model predicted %d", shard.final_path, size, tar_size(members))
        return {"name": os.path.basename(shard.final_path), "samples": len(shard.keys), "bytes": size}

    def finish(self, shards: list[dict[str, Any]]) -> None:
        """Remove shards of this naming scheme that are not in ``shards`` (a larger earlier run)."""
        keep = {s["name"] for s in shards}
        for name in sorted(os.listdir(self.dir)):
            if self._final.fullmatch(name) and name not in keep:
                logger.warning("removing stale shard %s from a previous run", self.dir / name)
                os.remove(self.dir / name)
                (self.dir / (name + SIDECAR_SUFFIX)).unlink(missing_ok=True)

    def is_intact(self, info: dict[str, Any]) -> bool:
        path = self.dir / info["name"]
        return path.is_file() and path.stat().st_size == info["bytes"]
