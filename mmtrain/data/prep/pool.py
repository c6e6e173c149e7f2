"""Ordered, bounded parallel map over worker processes.

Results come back in submission order, so the output never depends on which
worker finished first; at most ``window`` tasks are in flight, so a slow
consumer (the shard writer) cannot make finished results pile up in memory.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int | None = None) -> Iterator[Any]:
    """Yield ``fn(item)`` for each item, in order, computed by ``workers`` processes.

    Args:
        fn: A picklable callable (module-level function or ``functools.partial`` of one).
        items: Task arguments, consumed lazily.
        workers: Processes; 1 runs everything in this process (no pickling).
        window: Tasks in flight, default ``4 * workers``.

    Workers start with "spawn": the parent may hold torch's thread pools, which a
    forked child can inherit in a locked state. (A script calling this must guard
    its top level with ``if __name__ == "__main__":``, as spawn re-imports it.)
    ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies
    raises BrokenProcessPool here instead of leaving its task waiting forever.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    window = window or 4 * workers
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Also reached on error, Ctrl-C or when the consumer stops early (generator close).
        executor.shutdown(wait=True, cancel_futures=True)
