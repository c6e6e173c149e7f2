"""Aggregate per-chunk records into ``stats.json``.

Stats are rebuilt from the records of every chunk (finished in this run or an
earlier one) plus the listing drops, so a resumed run reports the same totals as
a clean run; only the ``run`` section describes this invocation.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from typing import Any

from mmtrain.data.prep.config import DROP_REASONS

MAX_EXAMPLES = 5  # per reason and chunk: enough to find the pattern, small enough to keep records small

# Shorter-side buckets of the resolution histogram, lower bounds in pixels.
_RES_BOUNDS = (0, 64, 128, 256, 512, 1024, 2048)


def resolution_bucket(width: int, height: int) -> str:
    """Label of the shorter-side bucket, e.g. ``"256-511"`` or ``"2048+"``."""
    short = min(width, height)
    for low, high in itertools.pairwise(_RES_BOUNDS):
        if short < high:
            return f"{low}-{high - 1}"
    return f"{_RES_BOUNDS[-1]}+"


def _sorted_numeric(counter: Counter) -> dict[str, int]:
    return {str(k): counter[k] for k in sorted(counter, key=int)}


def _sorted_buckets(counter: Counter) -> dict[str, int]:
    return {k: counter[k] for k in sorted(counter, key=lambda s: int(s.rstrip("+").split("-")[0]))}


def aggregate(records: Iterable[dict[str, Any]], listing_drops: Counter, listing_examples: dict[str, list[str]]) -> dict[str, Any]:
    """Totals over chunk records (see ``pipeline._finish_chunk`` for their fields)."""
    drops = Counter(listing_drops)
    examples: dict[str, list[str]] = {r: list(v) for r, v in listing_examples.items()}
    resolution: Counter = Counter()
    caption_lengths: Counter = Counter()
    splits: dict[str, dict[str, Any]] = {}
    candidates = sum(listing_drops.values())
    for rec in records:
        candidates += rec["candidates"]
        drops.update(rec["drops"])
        for reason, lines in rec["examples"].items():
            room = MAX_EXAMPLES * 4 - len(examples.setdefault(reason, []))
            examples[reason].extend(lines[: max(room, 0)])
        resolution.update(rec["resolution_histogram"])
        caption_lengths.update({int(k): v for k, v in rec["caption_length_histogram"].items()})
        split = splits.setdefault(rec["split"], {"samples": 0, "shards": 0, "bytes": 0, "shard_files": []})
        split["samples"] += rec["kept"]
        split["shards"] += len(rec["shards"])
        split["bytes"] += sum(s["bytes"] for s in rec["shards"])
        split["shard_files"].extend(s["name"] for s in rec["shards"])
    kept = sum(s["samples"] for s in splits.values())
    n_captions = sum(caption_lengths.values())
    return {
        "candidates": candidates,
        "kept": kept,
        "dropped": sum(drops.values()),
        # Every reason listed, zeros included, so a filter that never fired is visible.
        "dropped_by_reason": {r: drops.get(r, 0) for r in DROP_REASONS},
        "drop_examples": {r: examples[r] for r in DROP_REASONS if examples.get(r)},
        "splits": splits,
        "resolution_histogram": _sorted_buckets(resolution),
        "caption_length_histogram": _sorted_numeric(caption_lengths),
        "caption_length_min": min(caption_lengths, default=0),
        "caption_length_max": max(caption_lengths, default=0),
        "caption_length_mean": sum(n * c for n, c in caption_lengths.items()) / n_captions if n_captions else 0.0,
    }
