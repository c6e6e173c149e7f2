"""Run a listed source through workers into resumable, deterministic shards.

Plan. Candidates are split into train/val by hashing their group
(:mod:`~mmtrain.data.prep.split`), then each split's list is cut into fixed
chunks of ``samples_per_shard`` candidates. Chunks are processed in a fixed
order -- all val chunks, then all train chunks -- and chunk ``i`` of a split
becomes the next shard(s) of that split, normally exactly one.

Determinism. Workers only map candidates to results (no shared state); the
parent consumes results in submission order, decides duplicates against the
hashes of everything kept before (first kept wins, so val beats train), and
writes. Output bytes therefore depend on the inputs and options only, never on
``workers``.

Resume. After a chunk's shards are renamed into place its record is saved
(:mod:`~mmtrain.data.prep.progress`). A re-run skips every chunk whose record
matches its chain fingerprint and whose shard files are intact, re-reading only
the record's kept hashes so later chunks deduplicate exactly as before; a
missing or damaged shard makes its chunk run again, producing the same bytes.
Memory: the duplicate set holds one entry per kept image (~150 bytes each).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmtrain.atomic import atomic_write_text
from mmtrain.data.prep.candidate import Candidate, Source
from mmtrain.data.prep.config import PrepConfig, fingerprint
from mmtrain.data.prep.mds_writer import MdsChunkWriter
from mmtrain.data.prep.pool import ordered_map
from mmtrain.data.prep.process import Processed, ProcessOptions, process_batch
from mmtrain.data.prep.progress import STATS, ProgressStore
from mmtrain.data.prep.sample import OutSample, mds_columns
from mmtrain.data.prep.split import split_of
from mmtrain.data.prep.stats import MAX_EXAMPLES, aggregate, resolution_bucket
from mmtrain.data.prep.wds_writer import WdsChunkWriter

logger = logging.getLogger("mmtrain.data.prep")

# Candidates per worker task: small enough to spread a single shard over all
# workers, large enough that pickling overhead stays negligible.
TASK_SIZE = 16
# Reasons that point at broken input (logged as warnings); the rest are filters.
ERROR_REASONS = frozenset({"bad_row", "bad_label", "missing_caption", "bad_caption", "empty_caption",
                           "missing_image", "missing_file", "unreadable_file", "corrupt_image", "corrupt_shard"})
MAX_WARNINGS_PER_REASON = 20
PROCESS_ORDER = ("val", "train")  # val first: a duplicate of a val image is dropped from train
PROGRESS_EVERY_S = 10.0  # progress.json refresh (and a log line) at most this often


@dataclass
class Chunk:
    split: str
    index: int
    candidates: list[Candidate]
    chain: str = ""

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


def plan_chunks(candidates: list[Candidate], cfg: PrepConfig, options_fingerprint: str) -> list[Chunk]:
    """Chunks in processing order, each with its chain fingerprint."""
    by_split: dict[str, list[Candidate]] = {split: [] for split in PROCESS_ORDER}
    for cand in candidates:
        by_split[split_of(cand.group, cfg.val_fraction, cfg.split_seed)].append(cand)
    chunks: list[Chunk] = []
    chain = options_fingerprint
    n = cfg.samples_per_shard
    for split in PROCESS_ORDER:
        items = by_split[split]
        for index in range(math.ceil(len(items) / n)):
            part = items[index * n : (index + 1) * n]
            chain = fingerprint([chain, split, index, [c.identity() for c in part]])
            chunks.append(Chunk(split, index, part, chain))
    return chunks


class _DropLog:
    """Logs drops by key/source: broken input as warnings (capped per reason), filters at debug."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        if reason not in ERROR_REASONS:
            logger.debug("dropped %s: %s: %s", where, reason, detail)
        elif self.counts[reason] <= MAX_WARNINGS_PER_REASON:
            logger.warning("skipped %s: %s: %s", where, reason, detail)
            if self.counts[reason] == MAX_WARNINGS_PER_REASON:
                logger.warning("further %r skips are not logged; stats.json counts them all", reason)


def _make_writer(split_dir: Path, cfg: PrepConfig, has_labels: bool) -> WdsChunkWriter | MdsChunkWriter:
    if cfg.output_format == "mds":
        return MdsChunkWriter(split_dir, mds_columns(has_labels), cfg.shard_size)
    return WdsChunkWriter(split_dir, cfg.prefix, cfg.shard_size)


def _finish_chunk(chunk: Chunk, processed: list[Processed], seen: dict[str, tuple[str, str]],
                  writer: WdsChunkWriter | MdsChunkWriter, start: int, cfg: PrepConfig,
                  log: _DropLog) -> dict[str, Any]:
    """Deduplicate, write the chunk's shards, and return its record."""
    kept: list[OutSample] = []
    drops: Counter = Counter()
    examples: dict[str, list[str]] = {}
    resolution: Counter = Counter()
    caption_lengths: Counter = Counter()
    hashes: list[list[str]] = []
    ext = cfg.image_format
    for p in processed:
        if p.orig_size is not None:
            resolution[resolution_bucket(*p.orig_size)] += 1
        if p.reason is None and cfg.dedup:
            previous = seen.get(p.pixel_hash)
            if previous is not None and previous[0] != p.group_hash:
                p.reason, p.detail = "duplicate", f"same pixels as kept sample {previous[1]!r}"
            else:
                seen.setdefault(p.pixel_hash, (p.group_hash, p.key))
                hashes.append([p.pixel_hash, p.group_hash, p.key])
        if p.reason is not None:
            drops[p.reason] += 1
            where = f"{p.key} ({p.source})"
            log(p.reason, where, p.detail)
            lines = examples.setdefault(p.reason, [])
            if len(lines) < MAX_EXAMPLES:
                lines.append(f"{where}: {p.detail}")
            continue
        caption_lengths[len(p.caption.split())] += 1
        kept.append(OutSample(key=p.key, image=p.image, image_ext=ext, caption=p.caption, meta=p.meta, label=p.label))
    shards = writer.write_chunk(kept, start)
    return {
        "version": 1, "split": chunk.split, "index": chunk.index, "chain": chunk.chain,
        "candidates": len(chunk.candidates), "kept": len(kept), "drops": dict(drops), "examples": examples,
        "resolution_histogram": dict(resolution),
        "caption_length_histogram": {str(k): v for k, v in caption_lengths.items()},
        "shards": shards, "hashes": hashes,
    }


def _is_done(record: dict[str, Any] | None, chunk: Chunk, writer: WdsChunkWriter | MdsChunkWriter) -> bool:
    return (record is not None and record.get("chain") == chunk.chain
            and all(writer.is_intact(s) for s in record.get("shards", [])))


def run_prep(source: Source, out_dir: str | os.PathLike[str], cfg: PrepConfig | None = None) -> dict[str, Any]:
    """Convert a listed source into ``out_dir/train`` (and ``out_dir/val``) shards.

    Args:
        source: From one of the ``list_*`` functions in ``mmtrain.data.prep.sources``.
        out_dir: Output directory; also holds ``stats.json``, ``progress.json`` and
            the hidden resume state ``.prep/``.
        cfg: Options, default ``PrepConfig()``.

    Returns:
        The stats dict written atomically to ``out_dir/stats.json``: ``candidates``
        (everything listed, rows rejected while listing included), ``kept``,
        ``dropped``, ``dropped_by_reason`` (every reason), ``drop_examples``,
        ``splits`` (``{split: {samples, shards, bytes, shard_files}}``),
        ``resolution_histogram`` (shorter side of the originals),
        ``caption_length_histogram`` (words, kept samples) with min/max/mean,
        ``output_format``, ``out_dir``, ``source``, ``options``, and ``run``
        (``chunks_total``, ``chunks_written``, ``chunks_skipped``,
        ``samples_processed``, ``workers``, ``elapsed_s``, ``samples_per_s``).

    Raises:
        ValueError: invalid options, or ``out_dir`` holds another run's output and
            ``cfg.overwrite`` is False, or another run holds the directory lock.
    """
    cfg = (cfg or PrepConfig()).validate()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = {"prep": cfg.output_options(), "source": {"kind": source.kind, **source.spec},
               "has_labels": source.has_labels}
    options_fp = fingerprint(options)
    chunks = plan_chunks(source.candidates, cfg, options_fp)
    splits = ["train"] + (["val"] if cfg.val_fraction > 0 else [])

    log = _DropLog()
    listing_drops: Counter = Counter()
    listing_examples: dict[str, list[str]] = {}
    for drop in source.drops:
        log(drop.reason, drop.where, drop.detail)
        listing_drops[drop.reason] += 1
        lines = listing_examples.setdefault(drop.reason, [])
        if len(lines) < MAX_EXAMPLES:
            lines.append(f"{drop.where}: {drop.detail}")
    if not source.candidates:
        logger.warning("%s source: nothing to convert (%d rows skipped while listing)", source.kind, len(source.drops))

    with ProgressStore(out, options, options_fp, cfg.overwrite) as store:
        writers = {split: _make_writer(out / split, cfg, source.has_labels) for split in splits}
        for writer in writers.values():
            writer.clean_temps()
        # Records are read here only for the verdict and again when their turn comes, so
        # their hash lists are never all in memory at once.
        todo = [c for c in chunks if not _is_done(store.load(c.name), c, writers[c.split])]
        todo_names = {c.name for c in todo}
        total_todo = sum(len(c.candidates) for c in todo)
        # Written before any shard, so a killed first run is recognised as ours and resumed.
        store.write_progress({"chunks_total": len(chunks), "chunks_done": 0, "complete": False})
        logger.info("%s -> %s: %d candidates in %d chunks; %d chunks to write, %d already done",
                    source.kind, out, len(source.candidates), len(chunks), len(todo), len(chunks) - len(todo))

        def tasks():
            for chunk in todo:
                for i in range(0, len(chunk.candidates), TASK_SIZE):
                    yield chunk.candidates[i : i + TASK_SIZE]

        opts = ProcessOptions.from_config(cfg)
        results = ordered_map(functools.partial(process_batch, opts), tasks(), cfg.workers)
        seen: dict[str, tuple[str, str]] = {}
        next_shard = {split: 0 for split in splits}
        all_shards: dict[str, list[dict[str, Any]]] = {split: [] for split in splits}
        records: list[dict[str, Any]] = []
        written = processed_count = kept = 0
        run_started = last_progress = time.perf_counter()
        bar = tqdm(total=total_todo, desc=f"prep {source.kind}", unit="img", disable=not cfg.progress)
        try:
            for chunk in chunks:
                writer = writers[chunk.split]
                start = next_shard[chunk.split]
                record = None if chunk.name in todo_names else store.load(chunk.name)
                if chunk.name not in todo_names and (not _is_done(record, chunk, writer) or any(
                        s["name"] != writer.shard_name(start + k) for k, s in enumerate(record["shards"]))):
                    # Only reachable if the state was changed under us or by hand: redo here, in-process.
                    logger.warning("chunk %s: its record no longer matches the shards; redoing it", chunk.name)
                    record = _finish_chunk(chunk, process_batch(opts, chunk.candidates), seen, writer, start, cfg, log)
                    store.save(chunk.name, record)
                    written += 1
                elif record is not None:
                    for pixel, group, key in record["hashes"]:
                        seen.setdefault(pixel, (group, key))
                else:
                    processed: list[Processed] = []
                    for _ in range(0, len(chunk.candidates), TASK_SIZE):
                        batch = next(results)
                        processed.extend(batch)
                        bar.update(len(batch))
                    record = _finish_chunk(chunk, processed, seen, writer, start, cfg, log)
                    store.save(chunk.name, record)
                    written += 1
                    processed_count += len(processed)
                kept += record["kept"]
                bar.set_postfix(kept=kept, refresh=False)
                next_shard[chunk.split] += len(record["shards"])
                all_shards[chunk.split].extend(record["shards"])
                record.pop("hashes")  # now in `seen`; the rest is small
                records.append(record)
                if time.perf_counter() - last_progress > PROGRESS_EVERY_S:
                    last_progress = time.perf_counter()
                    store.write_progress({"chunks_total": len(chunks), "chunks_done": len(records), "complete": False})
                    # For logs without a progress bar (--quiet, batch jobs).
                    logger.info("prep %s: %d/%d chunks, %d samples processed, %.1f samples/s", source.kind,
                                len(records), len(chunks), processed_count,
                                processed_count / max(last_progress - run_started, 1e-9))
        finally:
            bar.close()
            results.close()  # stops the worker pool when we leave early
        for split, writer in writers.items():
            writer.finish(all_shards[split])
        store.prune({c.name for c in chunks})

        elapsed = time.perf_counter() - started
        work_s = time.perf_counter() - run_started
        stats = aggregate(records, listing_drops, listing_examples)
        empty = {"samples": 0, "shards": 0, "bytes": 0, "shard_files": []}
        stats["splits"] = {split: stats["splits"].get(split, dict(empty)) for split in splits}
        run = {"chunks_total": len(chunks), "chunks_written": written, "chunks_skipped": len(chunks) - written,
               "samples_processed": processed_count, "workers": cfg.workers, "elapsed_s": elapsed,
               # Guard the division: JSON has no infinity.
               "samples_per_s": processed_count / max(work_s, 1e-9)}
        stats.update(output_format=cfg.output_format, out_dir=str(out), source=options["source"],
                     options=cfg.output_options(), run=run)
        atomic_write_text(out / STATS, _dumps(stats))
        store.runs.append({k: run[k] for k in ("chunks_written", "chunks_skipped", "samples_processed", "elapsed_s")})
        store.write_progress({"chunks_total": len(chunks), "chunks_done": len(chunks), "complete": True,
                              "kept": stats["kept"], "dropped": stats["dropped"]})
    logger.info("prep %s: kept %d of %d candidates (%s) in %.1fs, %.1f samples/s; stats: %s",
                source.kind, stats["kept"], stats["candidates"],
                ", ".join(f"{s} {v['samples']}" for s, v in stats["splits"].items()),
                elapsed, run["samples_per_s"], out / STATS)
    return stats


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
