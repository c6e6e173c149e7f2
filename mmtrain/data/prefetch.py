"""Background download of the shards a loader process is about to read (remote sources only)."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mmtrain.data.cache import ShardCache
from mmtrain.data.order import StreamOrder
from mmtrain.data.sources import Source

logger = logging.getLogger("mmtrain.data")


class ShardPrefetcher:
    """Keeps the shards of the current and the next shuffle window of remote sources local.

    On every new window it pins those shards in the :class:`ShardCache` (so this process
    never evicts them) and hands the ones not yet asked for to ``threads`` background
    download threads, current window first. A failed prefetch is left to the read that
    needs the shard, which meets (and reports) the same error. Local sources: nothing to do.
    """

    def __init__(self, sources: list[Source], order: StreamOrder, cache: ShardCache | None, threads: int) -> None:
        self.sources, self.order, self.cache, self.threads = sources, order, cache, threads
        self.enabled = (cache is not None and order.mode == "epoch" and order.shard_of_sample is not None
                        and any(s.shard_files.remote is not None for s in sources))
        self._pool: ThreadPoolExecutor | None = None
        self._pid = -1
        self._last: tuple[bytes, bytes] | None = None
        self._asked: set[tuple[int, int]] = set()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_pid": -1}

    def wait(self) -> None:
        """Block until every download asked for so far has finished (benchmarks and tests)."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True)
            self._pool, self._pid, self._last, self._asked = None, -1, None, set()

    def _fetch(self, s: int, k: int) -> None:
        try:
            self.sources[s].shard_files.path_of(k, prefetch=True)
        except Exception as exc:  # noqa: BLE001 -- the foreground read reports it
            logger.debug("prefetch of %s failed: %s", self.sources[s].shards[k], exc)

    def advance(self, position: int) -> None:
        """Called with the first stream position of each batch this process builds."""
        if not self.enabled:
            return
        current, following = self.order.window_shards(position)
        key = (current.tobytes(), following.tobytes())
        if key == self._last:
            return
        self._last = key
        wanted = [(s, k) for s, k in self.order.shard_numbers(np.concatenate([current, following]))
                  if self.sources[s].shard_files.remote is not None]
        self.cache.pin([self.sources[s].shard_files.remote[k].url for s, k in wanted])
        if self.threads:
            if self._pid != os.getpid():  # threads do not survive a fork: each worker starts its own
                self._pool, self._pid = ThreadPoolExecutor(self.threads, thread_name_prefix="mmtrain-prefetch"), os.getpid()
            for pair in wanted:
                if pair not in self._asked:
                    self._pool.submit(self._fetch, *pair)
        self._asked = set(wanted)
