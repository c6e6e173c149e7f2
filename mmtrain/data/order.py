"""The global sample order: stream position -> (source, sample, epoch), a pure function of the seed.

The training stream is an endless sequence of sample references. Every rank and every
dataloader worker computes the entries it needs from ``(seed, position)`` alone, so no
process ever has to talk to another, resuming at any position is exact, and the order
does not depend on the number of ranks or workers.

Two modes:

``epoch``
    Epoch ``e`` is a list of ``L`` references: every sample of source ``s`` appears
    ``floor(w_s)`` times, plus a subset of ``round(frac(w_s) * N_s)`` of its samples
    (a fresh seeded subset per epoch; the first ones with ``shuffle`` off). With
    ``shuffle`` the list is permuted with ``numpy.random.default_rng([seed, 0, e])``,
    a uniform permutation of the whole epoch, so no shuffle buffer is needed. The
    stream is epoch 0, epoch 1, ... back to back; ``L`` is the same for every epoch.

``epoch`` with a shuffle window of ``k`` shards (``shuffle_window: k``)
    A shard-block shuffle, for data that streams from object storage: the shards holding
    epoch ``e``'s references are permuted with ``default_rng([seed, 4, e])`` and cut into
    windows of ``k`` consecutive shards; the epoch visits window 0, then window 1, ...,
    and within a window its references are permuted (``default_rng([seed, 0, e])``). So at
    any stream position every rank and worker reads from one window (two at a boundary)
    and the loader only needs those shards, plus the next window fetched ahead
    (:meth:`StreamOrder.window_shards`). Samples of one window are mixed over ``k``
    shards instead of the whole epoch: pick ``k`` so that a window holds many batches.

``resampled``
    The stream is cut into chunks of :data:`CHUNK` positions. Source ``s`` gets a fixed
    quota ``q_s`` of every chunk, ``q_s / CHUNK`` = ``w_s / sum(w)`` up to rounding
    (largest remainder), and the chunk's positions are dealt to sources by a seeded
    permutation (stratified sampling: exact proportions per chunk instead of i.i.d.
    draws, which also makes position -> sample O(1) to compute). Within a source the
    picks consume that source's own stream: pass ``k`` over it is a seeded permutation
    of its ``N_s`` samples, so every sample of a source is used once before any is
    used again. The "epoch" of such a sample is the pass ``k``.

Memory: each process holds the current epoch's reference list (``8 L`` bytes), or
for ``resampled`` one chunk plus the current pass permutation of each source
(``8 N_s`` bytes each).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

MODES: tuple[str, ...] = ("epoch", "resampled")
CHUNK = 1 << 16  # resampled mode: positions per stratified chunk
_EPOCH_PERM, _EPOCH_SUBSET, _CHUNK_DEAL, _SOURCE_PASS, _SHARD_PERM = 0, 1, 2, 3, 4  # RNG stream tags


def apportion(total: int, weights: list[float]) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder; ties to the lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    parts = np.floor(exact).astype(np.int64)
    short = total - int(parts.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - parts)))  # biggest remainder first, then index
    parts[order[:short]] += 1
    return parts


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class StreamOrder:
    """Maps stream positions to ``(source index, sample index in source, epoch)``.

    Args:
        sizes: samples per source (each >= 1).
        weights: per source, >= 0, not all 0. ``epoch``: how many times each sample
            appears per epoch (fractions = a seeded subset). ``resampled``: relative
            share of the stream.
        mode: ``epoch`` or ``resampled``.
        shuffle: permute (True) or keep file order (False; ``resampled`` then
            interleaves the sources evenly).
        seed: >= 0.
        shards: per source, the shard number of each of its samples; needed for a shuffle window.
        window: shards per shuffle window (``epoch`` mode only); 0 = the whole epoch is one
            permutation.
    """

    def __init__(self, sizes: list[int], weights: list[float], mode: str = "epoch", shuffle: bool = True, seed: int = 0,
                 shards: list[np.ndarray] | None = None, window: int = 0):
        if mode not in MODES:
            raise ValueError(f"data.mode: expected one of {list(MODES)}, got {mode!r}")
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per source, got {len(sizes)} sources and {len(weights)} weights")
        if any(n < 1 for n in sizes):
            raise ValueError(f"every data source needs at least one sample, got sizes {list(sizes)}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data source weights must be >= 0 and not all 0, got {list(weights)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"data order seed must be an int >= 0, got {seed!r}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.weights = [float(w) for w in weights]
        self.mode, self.shuffle, self.seed = mode, shuffle, int(seed)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # global sample id = starts[s] + i
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
            raise ValueError(f"data.shuffle_window: expected an int >= 0 (shards per window), got {window!r}")
        self.window = int(window)
        self.shard_of_sample = None  # global sample id -> global shard number
        self.num_shards = 0
        if shards is not None:
            if [len(a) for a in shards] != [int(n) for n in self.sizes]:
                raise ValueError("StreamOrder: need one shard number per sample of every source")
            counts = [int(a.max()) + 1 if len(a) else 0 for a in shards]
            first = np.concatenate([[0], np.cumsum(counts)])
            self.shard_of_sample = np.concatenate([np.asarray(a, dtype=np.int64) + first[s] for s, a in enumerate(shards)])
            self.num_shards = int(first[-1])
            self.shard_firsts = first[:-1]
        if self.window:
            if mode != "epoch":
                raise ValueError("data.shuffle_window: shard windows need data.mode: epoch (resampled mode reads "
                                 "every source at once); set data.shuffle_window: 0")
            if self.shard_of_sample is None:
                raise ValueError("StreamOrder: a shuffle window needs the shard of every sample")
        self._cache = _LRU(4)  # two epochs' references (a batch may straddle them) and their shard lists
        if mode == "epoch":
            whole = [int(np.floor(w)) for w in self.weights]
            self._parts = [(k, int(np.floor((w - k) * n + 0.5))) for w, k, n in zip(self.weights, whole, self.sizes)]
            self.epoch_length = int(sum(k * n + m for (k, m), n in zip(self._parts, self.sizes)))
            if self.epoch_length == 0:
                raise ValueError(f"data: weights {self.weights} select no sample of sources sized {list(sizes)}")
        else:
            self.quota = apportion(CHUNK, self.weights)
            starved = [s for s, (w, q) in enumerate(zip(self.weights, self.quota)) if w > 0 and q == 0]
            if starved:
                raise ValueError(f"data.sources{starved}: weight too small to get any of {CHUNK} positions "
                                 f"(weights {self.weights})")
            self.epoch_length = 0
            self._passes = _LRU(2 * len(sizes) + 2)

    # ------------------------------------------------------------------ epoch mode
    def _epoch_ids(self, epoch: int) -> np.ndarray:
        parts = []
        for s, ((k, m), n) in enumerate(zip(self._parts, self.sizes)):
            ids = np.arange(self.starts[s], self.starts[s] + n, dtype=np.int64)
            if k:
                parts.append(np.tile(ids, k))
            if m:
                pick = (np.random.default_rng([self.seed, _EPOCH_SUBSET, epoch, s]).permutation(n)[:m]
                        if self.shuffle else np.arange(m))
                parts.append(ids[pick])
        ids = np.concatenate(parts)
        if self.window:
            return self._windowed(ids, epoch)
        if self.shuffle:
            ids = np.random.default_rng([self.seed, _EPOCH_PERM, epoch]).permutation(ids)
        return ids, np.zeros(1, dtype=np.int64), None  # one window: its shards are found when asked for

    def _windowed(self, ids: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's references grouped by shard window: (ids, window start offsets, shard order)."""
        shard = self.shard_of_sample[ids]
        present = np.unique(shard)  # shards of a weight-0 source, or with no sample picked, make no window
        if self.shuffle:
            present = present[np.random.default_rng([self.seed, _SHARD_PERM, epoch]).permutation(len(present))]
        rank = np.empty(self.num_shards, dtype=np.int64)
        rank[present] = np.arange(len(present))
        win = rank[shard] // self.window
        if self.shuffle:
            u = np.random.default_rng([self.seed, _EPOCH_PERM, epoch]).random(len(ids))
            order = np.lexsort((u, win))
        else:
            order = np.argsort(win, kind="stable")
        ids, win = ids[order], win[order]
        starts = np.searchsorted(win, np.arange((len(present) + self.window - 1) // self.window))
        return ids, starts, present

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self._cache.get_or(("epoch", epoch), lambda: self._epoch_ids(epoch))

    def window_shards(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Global shard numbers of the window holding ``position`` and of the window after it (epoch mode).

        Without a shuffle window the whole epoch is one window: every shard it reads, and no next one.
        """
        if self.mode != "epoch" or self.shard_of_sample is None:
            raise ValueError("window_shards: needs epoch mode and the shard of every sample")
        epoch, offset = divmod(int(position), self.epoch_length)
        ids, starts, shards = self._epoch(epoch)
        if not self.window:  # every shard the epoch reads, worked out once per epoch
            every = self._cache.get_or(("shards", epoch), lambda: np.unique(self.shard_of_sample[ids]))
            return every, np.zeros(0, dtype=np.int64)
        w = int(np.searchsorted(starts, offset, side="right")) - 1
        k = self.window
        current = shards[w * k:(w + 1) * k]
        if w + 1 < len(starts):
            return current, shards[(w + 1) * k:(w + 2) * k]
        return current, self._epoch(epoch + 1)[2][:k]

    def shard_numbers(self, global_shards: np.ndarray) -> list[tuple[int, int]]:
        """Global shard numbers -> ``(source, shard within the source)``."""
        src = np.searchsorted(self.shard_firsts, global_shards, side="right") - 1
        return [(int(s), int(g - self.shard_firsts[s])) for s, g in zip(src, global_shards)]

    def _lookup_epoch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epochs, offsets = np.divmod(positions, self.epoch_length)
        ids = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            ids[sel] = self._epoch(int(e))[0][offsets[sel]]
        src = np.searchsorted(self.starts, ids, side="right") - 1
        return src, ids - self.starts[src], epochs

    # ------------------------------------------------------------------ resampled mode
    def _deal(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each position of ``chunk`` and its ordinal among that source's picks in the chunk."""
        src = np.repeat(np.arange(len(self.sizes)), self.quota)
        if self.shuffle:
            src = src[np.random.default_rng([self.seed, _CHUNK_DEAL, chunk]).permutation(CHUNK)]
        else:  # spread each source evenly: its j-th pick sits near (j + 0.5) / q_s of the chunk
            ordinal = np.concatenate([np.arange(q) for q in self.quota])
            src = src[np.argsort((ordinal + 0.5) / self.quota[src], kind="stable")]
        ordinal = np.empty(CHUNK, dtype=np.int64)
        for s, q in enumerate(self.quota):
            ordinal[src == s] = np.arange(q)
        return src, ordinal

    def _pass(self, s: int, k: int) -> np.ndarray:
        n = int(self.sizes[s])
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, _SOURCE_PASS, s, k]).permutation(n)

    def _lookup_resampled(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chunks, offsets = np.divmod(positions, CHUNK)
        src = np.empty(len(positions), dtype=np.int64)
        nth = np.empty(len(positions), dtype=np.int64)  # how many earlier picks of the same source
        for c in np.unique(chunks):
            sel = chunks == c
            deal_src, deal_ord = self._cache.get_or(("chunk", int(c)), lambda c=int(c): self._deal(c))
            src[sel] = deal_src[offsets[sel]]
            nth[sel] = int(c) * self.quota[src[sel]] + deal_ord[offsets[sel]]
        passes, within = np.divmod(nth, self.sizes[src])
        local = np.empty(len(positions), dtype=np.int64)
        for i, (s, k, r) in enumerate(zip(src.tolist(), passes.tolist(), within.tolist())):
            local[i] = self._passes.get_or((s, k), lambda s=s, k=k: self._pass(s, k))[r]
        return src, local, passes

    # ------------------------------------------------------------------ public
    def lookup(self, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For stream positions (>= 0): source indexes, sample indexes within the source, epochs."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and positions.min() < 0:
            raise ValueError(f"stream positions must be >= 0, got {int(positions.min())}")
        if self.mode == "epoch":
            return self._lookup_epoch(positions)
        return self._lookup_resampled(positions)
