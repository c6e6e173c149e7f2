"""A bounded local cache of remote shard files, shared by every process of a node.

A remote shard is downloaded whole into ``cache_dir`` the first time a process needs it
(a background prefetch usually got there first) and read from there with ``pread``.
A per-shard ``flock`` makes the processes of a node download each shard once; the file
appears under its final name only when complete (temp name, then rename).

Eviction: after each download, while the files in the cache add up to more than
``limit`` bytes, the least recently used shard (file mtime, refreshed on every use)
that this process does not hold pinned (the shuffle windows it is reading and
prefetching) is deleted. A process that still has the file open keeps reading it (POSIX
unlink semantics); one that needs it again downloads it again (counted as a miss).

Integrity: a download is checked against the size (and the sha256 or sha1, when the
shard index records one) before it is used. A mismatch is fetched once more; a second
mismatch raises :class:`CorruptShardError`, which the loader turns into skipped samples
(counted), never into silently repeated or lost ones.

Counters of this process are in :data:`mmtrain.data.storage.IO_STATS`: ``cache_hits`` and
``cache_misses`` (reads that found their shard in the cache / had to wait for it),
``shard_downloads``, ``cache_evictions``, ``corrupt_refetches``, ``corrupt_shards``; the most
bytes the cache held, as this process saw it, is :attr:`ShardCache.peak_bytes`.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass

from mmtrain.data.errors import ShardDataError
from mmtrain.data.index import file_digest
from mmtrain.data.storage import basename, count, store_for

logger = logging.getLogger("mmtrain.data")


class CorruptShardError(ShardDataError):
    """A shard whose bytes did not match its index twice in a row."""


class CacheFullError(OSError):
    """The cache cannot hold what the loader needs (limit too small or the disk is full)."""


@dataclass(frozen=True)
class RemoteFile:
    """A shard to fetch: its URL, size and (optional) digest from the shard index."""

    url: str
    size: int
    digest: str = ""  # "sha256:HEX" or "sha1:HEX"; "" = size check only


def _digest_matches(path: str, digest: str) -> bool:
    if not digest:
        return True
    algo, _, expected = digest.partition(":")
    return file_digest(path, algo) == expected


class ShardCache:
    """Local copies of remote shards under ``cache_dir``, at most ``limit`` bytes in all (0 = no limit).

    Args:
        cache_dir: directory for the copies (created); share it between the ranks of a node.
        limit: byte budget for the shard files in ``cache_dir`` (0 = unbounded).
    """

    def __init__(self, cache_dir: str, limit: int = 0) -> None:
        self.dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.limit = limit
        self.pinned: set[str] = set()  # local names this process needs now
        self.peak_bytes = 0  # the most the files in the cache added up to after an eviction, seen by this process
        self._room_lock = threading.Lock()  # this process's threads evict one at a time
        self._reserved: dict[str, int] = {}  # local name -> bytes of a download under way in this process
        os.makedirs(os.path.join(self.dir, ".locks"), exist_ok=True)

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "limit": self.limit, "pinned": set(), "peak_bytes": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _room_lock=threading.Lock(), _reserved={})

    def local_name(self, url: str) -> str:
        return f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{basename(url)}"

    def local_path(self, url: str) -> str:
        return os.path.join(self.dir, self.local_name(url))

    def pin(self, urls) -> None:
        """Replace the set of shards this process must not evict."""
        self.pinned = {self.local_name(u) for u in urls}

    def get(self, remote: RemoteFile, prefetch: bool = False) -> str:
        """The local path of ``remote``, downloaded (and verified) if it is not cached.

        Counters: every download counts in ``shard_downloads``; a read (not a ``prefetch``)
        counts a ``cache_hits`` when the copy was there, else a ``cache_misses`` (the read
        waited for a download, its own or a prefetch's still under way).
        """
        path = self.local_path(remote.url)
        if self._touch(path):
            if not prefetch:
                count("cache_hits")
            return path
        if not prefetch:
            count("cache_misses")
        lock = os.path.join(self.dir, ".locks", self.local_name(remote.url) + ".lock")
        with open(lock, "a") as lock_fh:
            fcntl.flock(lock_fh, fcntl.LOCK_EX)  # one download per node; the others wait, then find the file
            try:
                if self._touch(path):
                    return path
                name = self.local_name(remote.url)
                self._make_room(remote.size, keep=name, reserve=name)
                count("shard_downloads")
                try:
                    self._fetch_verified(remote, path)
                finally:
                    with self._room_lock:
                        self._reserved.pop(name, None)
            finally:
                fcntl.flock(lock_fh, fcntl.LOCK_UN)
        self._make_room(0, strict=False)  # downloads that ran at the same time may have overshot the limit
        return path

    _clock = 0

    @classmethod
    def _touch(cls, path: str) -> bool:
        # the LRU clock: the file's mtime, set explicitly in ns (a plain utime() takes the kernel's coarse
        # clock, which gives files used a few ms apart the same time), strictly increasing in this process
        cls._clock = max(cls._clock + 1, time.time_ns())
        try:
            os.utime(path, ns=(cls._clock, cls._clock))
            return True
        except FileNotFoundError:
            return False

    def _fetch_verified(self, remote: RemoteFile, path: str) -> None:
        store = store_for(remote.url)
        for attempt in (1, 2):
            try:
                store.download(remote.url, path, remote.size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheFullError(f"data.cache_dir {self.dir}: the disk is full while downloading "
                                         f"{remote.url} ({remote.size} bytes): free space or lower "
                                         "data.cache_limit") from exc
                raise
            if _digest_matches(path, remote.digest):
                return
            os.remove(path)
            if attempt == 1:
                count("corrupt_refetches")
                logger.warning("%s: downloaded bytes do not match the shard index's %s; fetching it once more",
                               remote.url, remote.digest.split(":")[0])
        count("corrupt_shards")
        raise CorruptShardError(f"shard {remote.url}: downloaded twice and both copies differ from the "
                                f"{remote.digest.split(':')[0]} its index records; its samples are skipped")

    def _stats(self) -> dict[str, os.stat_result]:
        """The shard copies in the cache (not temp files, not the lock directory)."""
        out = {}
        for e in os.scandir(self.dir):
            if e.name.startswith(".") or e.name.endswith(".part"):
                continue
            try:
                out[e.name] = e.stat()
            except FileNotFoundError:  # evicted by another thread or process since the listing
                continue
        return out

    def used_bytes(self) -> int:
        return sum(st.st_size for st in self._stats().values())

    def _make_room(self, incoming: int, keep: str = "", strict: bool = True, reserve: str = "") -> None:
        """Evict until ``incoming`` more bytes fit; ``reserve`` books them for a download of this process."""
        with self._room_lock:
            self._make_room_locked(incoming, keep, strict)
            if reserve:
                self._reserved[reserve] = incoming

    def _make_room_locked(self, incoming: int, keep: str, strict: bool) -> None:
        stats = self._stats()
        # downloads under way in this process count with their full size
        used = sum(st.st_size for st in stats.values()) + sum(n for k, n in self._reserved.items() if k not in stats)
        if self.limit and used + incoming > self.limit:
            for name in sorted(stats, key=lambda n: stats[n].st_mtime_ns):
                if used + incoming <= self.limit:
                    break
                if name in self.pinned or name == keep:
                    continue
                try:
                    os.remove(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass  # another process evicted it first
                used -= stats[name].st_size
                count("cache_evictions")
        self.peak_bytes = max(self.peak_bytes, used + incoming)
        if strict and self.limit and used + incoming > self.limit:
            raise CacheFullError(f"data.cache_limit={self.limit} bytes cannot hold the shards this process needs "
                                 f"now ({used + incoming} bytes pinned in {self.dir}): raise data.cache_limit "
                                 "or lower data.shuffle_window")
