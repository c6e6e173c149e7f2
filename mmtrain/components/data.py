"""Training data: a global, seeded sample order read with random access, batched per rank.

The stream is a pure function of ``(data config, seed)``: position ``p`` of the stream
names one sample (see :mod:`mmtrain.data.order`). Global batch ``g`` of a run that
started at stream position ``start_sample`` covers positions
``start_sample + g*B*W .. start_sample + (g+1)*B*W - 1`` (B = micro batch size, W =
world size) and rank ``r`` takes the slice ``+ r*B .. + (r+1)*B - 1``. Hence:

- within an epoch no sample is duplicated or lost across ranks (an epoch boundary may
  fall inside a global batch: the stream just continues into the next epoch);
- resuming is exact: pass the number of samples the run has consumed (the checkpoint's
  ``samples_seen``) as ``start_sample``, even if the world size changed;
- dataloader worker ``w`` of ``n`` builds the rank's micro-batches ``j`` with
  ``j % n == w`` and the DataLoader returns them round-robin, so a rank's batches are
  identical for any ``num_workers``.

Samples are read by offset from tar shards (member index next to each shard, or cached
on disk) or MDS shards (:mod:`mmtrain.data.sources`), so there is no shuffle buffer:
shuffling is a permutation of the whole epoch, or, with ``data.shuffle_window``, of
windows of shards and of the samples within each window (:mod:`mmtrain.data.order`), so
that remote shards stream through a bounded local cache (:mod:`mmtrain.data.cache`) with
the next window fetched in the background (:class:`ShardPrefetcher`). Images leave the workers as uint8 (``Batch.pixels``);
``Batch.images`` / ``Batch.images_on(device)`` give ``B, 3, H, W`` floats in [-1, 1].
"""
from __future__ import annotations

import io
import logging
import math
import os
import socket
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtrain import distributed
from mmtrain.data import storage
from mmtrain.data.cache import CorruptShardError, ShardCache
from mmtrain.data.errors import ShardDataError
from mmtrain.data.images import RESIZE_MODES, decode_image
from mmtrain.data.node_local import AUTO, AUTO_CACHE_SHARE, auto_cache_limit, cache_dir_warning, resolve_cache_dir, share_on_node
from mmtrain.data.order import MODES, StreamOrder
from mmtrain.data.prefetch import ShardPrefetcher
from mmtrain.data.sources import FORMATS, RawSample, Source, open_source
from mmtrain.errors import ConfigError
from mmtrain.schema import build_dataclass
from mmtrain.units import parse_bytes

logger = logging.getLogger("mmtrain.data")

MAX_SUBSTITUTE_TRIES = 64  # stream positions tried after a bad sample before giving up


@dataclass
class SourceConfig:
    """One training data source.

    Args:
        path: a directory of ``*.tar`` webdataset shards, one ``.tar``, a brace pattern
            (``dir/shard-{000000..000099}.tar``), or an MDS directory (``index.json`` +
            uncompressed ``shard.*.mds``); local, or a URL (``s3://bucket/prefix``,
            ``gs://...``, ``https://host/path``; see :mod:`mmtrain.data.storage`). Required.
        format: ``auto`` (MDS when the directory has ``index.json``, else webdataset),
            ``wds`` or ``mds``. Default ``auto``.
        weight: >= 0. With ``data.mode: epoch`` each sample of this source appears
            ``weight`` times per epoch (a fractional part takes a fresh seeded subset each
            epoch); with ``data.mode: resampled`` the source's share of the stream is
            ``weight / sum(weights)``. Default 1.0.
    """

    path: str = ""
    format: str = "auto"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("path: required (a directory of .tar shards, a .tar, a brace pattern or an MDS directory)")
        if self.format not in FORMATS:
            raise ConfigError(f"format: expected one of {list(FORMATS)}, got {self.format!r} (source {self.path})")
        if not (isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool)) or not (
                math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"weight: expected a number >= 0, got {self.weight!r} (source {self.path})")


@dataclass
class DataConfig:
    """Where the training data is and how it is ordered, decoded and batched.

    Args:
        train_shards: single-source shortcut, used when ``sources`` is empty: a directory of
            ``*.tar`` shards, one ``.tar``, a brace pattern, or an MDS directory. No default:
            training needs it or ``sources`` (:func:`mmtrain.config.require_run_paths`).
        val_shards: the same for evaluation (read in order, once); checked by the preflight when
            set. Default ``""`` (none; ``mmtrain eval`` then needs ``--shards`` or ``eval.shards``).
        sources: training sources, each ``{path, format: auto|wds|mds, weight}`` (see
            :class:`SourceConfig`); when non-empty, ``train_shards`` is ignored. Default [].
        mode: ``epoch`` (each epoch holds every sample ``weight`` times, then the next
            epoch starts) or ``resampled`` (endless mixture; each source takes its weight's
            share of the stream and cycles through its own samples). Default ``epoch``.
        shuffle: the order is a seeded permutation of the whole epoch (``resampled``: of
            each source's pass and of each 65536-position chunk); false = file order,
            sources interleaved evenly. Default true.
        shuffle_window: shards per shuffle window (``epoch`` mode): the epoch's shards are
            permuted and read window by window, samples permuted within a window, so a rank
            needs only the current window's shards and the next one's (fetched ahead). Use it
            for remote sources: 0 = one permutation of the whole epoch, which touches every
            shard at once (best mixing; for local data, or a cache that holds the dataset).
            Default 0.
        cache_dir: where remote shards are copied (downloaded whole, then read by offset),
            shared by the ranks and workers of a node: it belongs on node-local disk (a
            warning names this key when it is on a network filesystem or in memory).
            ``auto`` (or "") = ``$SLURM_TMPDIR``, else ``$TMPDIR``, else ``/tmp``, then
            ``mmtrain-USER/shards``, resolved on each node when the loader starts
            (:func:`mmtrain.data.node_local.resolve_cache_dir`). Default ``auto``.
        cache_limit: the most bytes of shard copies in ``cache_dir`` (``500MB`` = 500 x 10^6,
            ``20GiB`` = 20 x 2^30: :mod:`mmtrain.units`; 0 = no limit); least recently used shards not in the current or
            the next window are deleted. It must hold two windows of the largest shards
            (checked when the loader starts), and with ``shuffle_window: 0`` the whole
            remote dataset. ``auto`` (or "") = half of what ``cache_dir``'s disk has free
            plus what the cache already holds, measured once per node when the loader
            starts (:func:`mmtrain.data.node_local.auto_cache_limit`). Default ``auto``.
        prefetch_threads: background download threads per loader process; the next window's
            shards are fetched while the current one is read. 0 = fetch on first read only.
            Default 4.
        image_size: images are resized (bicubic) to this square size. Default 32.
        resize_mode: ``center_crop`` (crop non-square images to their central square, then
            resize) or ``resize`` (squash to square). Identical for square images. Default
            ``center_crop``.
        use_latents: read each sample's precomputed latent (``KEY.latent.npy`` / MDS column
            ``latent``) into ``Batch.latents`` instead of decoding the image; a source
            without latents is an error naming the file and key. Default false.
        fast_jpeg_decode: let libjpeg decode big JPEGs at 1/2, 1/4 or 1/8 scale when the
            result still covers ``image_size`` (much faster; pixels differ slightly from a
            full-size decode + resize). Default true.
        num_workers: dataloader worker processes per rank (0 = in-process). Batches do not
            depend on it. Default 1.
        index_cache: directory caching the member index of local tar shards that have no
            sidecar ``NAME.tar.index.json`` (shards mmtrain writes have one), keyed by absolute
            path, size and mtime; "" = no cache (every start rescans their tar headers).
            Default ``~/.cache/mmtrain/index``.
        max_bad_samples: a sample that cannot be read or decoded is logged (shard and key)
            and replaced by the next good sample of the stream; a worker that meets more
            than this many stops training with an error. 0 = every bad sample is an error.
            Samples of a corrupt shard (see ``max_bad_shards``) are replaced the same way but
            counted apart. Default 100.
        max_bad_shards: a remote shard whose download does not match its index twice is
            skipped (its samples replaced by the next good ones, counted in
            ``data/substituted`` and ``data/corrupt_shards``); more than this many in one
            process stops training with an error. Default 10.
    """

    train_shards: str = ""
    val_shards: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    mode: str = "epoch"
    shuffle: bool = True
    image_size: int = 32
    resize_mode: str = "center_crop"
    use_latents: bool = False
    fast_jpeg_decode: bool = True
    num_workers: int = 1
    index_cache: str = "~/.cache/mmtrain/index"
    max_bad_samples: int = 100
    shuffle_window: int = 0
    cache_dir: str = "auto"
    cache_limit: str = "auto"
    prefetch_threads: int = 4
    max_bad_shards: int = 10

    def __post_init__(self) -> None:
        # a loaded config holds SourceConfig already; code may pass mappings, checked as the loader checks them
        self.sources = [src if isinstance(src, SourceConfig) else build_dataclass(SourceConfig, src, f"sources[{i}]")
                        for i, src in enumerate(self.sources)]
        if self.mode not in MODES:
            raise ConfigError(f"mode: expected one of {list(MODES)}, got {self.mode!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode: expected one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")
        for name in ("image_size",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "max_bad_samples", "shuffle_window", "prefetch_threads",
                     "max_bad_shards"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        # None = auto: measured on the node (shard_cache_for), not where the config is loaded
        try:
            self.cache_limit_bytes = None if str(self.cache_limit).strip() in AUTO else parse_bytes(self.cache_limit, "data.cache_limit")
        except ValueError:
            raise ConfigError(f"cache_limit: expected auto (a share of the cache disk's free space), a byte count "
                              f"such as 20GiB or 500MB, or 0 (no limit), got {self.cache_limit!r}") from None
        if self.shuffle_window and self.mode != "epoch":
            raise ConfigError("shuffle_window: shard windows need mode: epoch (resampled mode reads every source "
                              "at once); set shuffle_window: 0")
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            raise ConfigError(f"sources: the weights are all 0 ({[s.path for s in self.sources]})")

    def train_sources(self) -> list[SourceConfig]:
        """``sources``, or ``train_shards`` as one source of weight 1."""
        if not self.sources and not str(self.train_shards).strip():
            raise ConfigError("data.train_shards: not set (and no data.sources): where the training data is, "
                              "e.g. data.train_shards=data/photos/train")
        return list(self.sources) or [SourceConfig(path=self.train_shards)]


@dataclass
class Batch:
    """One micro-batch.

    Images travel from the workers as uint8 (4x less to copy between processes, to pin
    and to send to the GPU than float32); :attr:`images` / :meth:`images_on` convert.

    Attributes:
        pixels: ``B, H, W, 3`` uint8 RGB; None with ``use_latents``.
        latents: ``B, C, h, w`` float32 precomputed latents; None without ``use_latents``.
        captions: B captions.
        labels: ``B`` long, the ``cls`` class label or -1 where a sample has none.
        keys: B ids ``"{source index}:{sample key}"``.
        epochs: ``B`` long, the epoch each sample came from (``resampled``: the pass over
            its source).
        positions: ``B`` long, the stream positions of the samples.
        substituted: how many samples of this batch replace a bad sample (or one of a corrupt shard).
        io: what this loader process's storage did since its previous batch (requests,
            retries, bytes_fetched, shard_downloads, cache_hits, cache_misses, cache_evictions,
            corrupt_shards, ...; :data:`mmtrain.data.storage.IO_STATS`); summed over batches
            and ranks it is the run's total. ``cache_bytes_peak`` is the most this process
            saw in the shard cache, a maximum.
        text, text_len: ``B, L`` token ids and ``B`` lengths when the loader was given a
            text tokenizer, else None.
        documents: when a source holds documents (every sample is then a document; a pair
            is ``[caption, image]``): per sample its segments in reading order, a text span as
            its token ids (int64 array, no ``<s>``/``</s>``) or an image as its row in
            ``pixels`` (M images, padded with black rows to a multiple of B: static shapes);
            ``captions`` then holds each document's text. None otherwise.
        pairs: with ``documents``, True where the sample is an image-caption pair (the layout
            draws its direction, as for pairs).
    """

    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    captions: list[str]
    labels: torch.Tensor
    keys: list[str]
    epochs: torch.Tensor
    positions: torch.Tensor
    substituted: int = 0
    io: dict[str, int] = field(default_factory=dict)
    text: torch.Tensor | None = None
    text_len: torch.Tensor | None = None
    documents: list[list] | None = None
    pairs: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def images(self) -> torch.Tensor | None:
        """``B, 3, H, W`` float32 in [-1, 1] on the CPU (converted on each access); None with latents."""
        return self.images_on("cpu")

    def images_on(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """``B, 3, H, W`` in [-1, 1] on ``device``: the uint8 pixels are moved first, then converted there."""
        if self.pixels is None:
            return None
        return pixels_to_images(self.pixels.to(device, non_blocking=True), dtype)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def pixels_to_images(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``B, H, W, 3`` uint8 -> contiguous ``B, 3, H, W`` in [-1, 1] (the same numbers as ``pil_to_tensor``)."""
    b, h, w, _ = pixels.shape
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=pixels.device)
    out.copy_(pixels.permute(0, 3, 1, 2))
    return out.div_(127.5).sub_(1.0).to(dtype)


# --------------------------------------------------------------------------- decoding




# --------------------------------------------------------------------------- the stream


class SampleStream(IterableDataset):
    """Whole micro-batches of one rank, from stream position ``start_sample`` on (use with ``batch_size=None``).

    Micro-batch ``j`` (0, 1, ...) of rank ``r`` holds stream positions
    ``start_sample + j*B*W + r*B + [0, B)``; the stream is endless (epochs repeat).
    """

    def __init__(self, sources: list[Source], order: StreamOrder, cfg: DataConfig, micro_batch_size: int,
                 rank: int, world_size: int, start_sample: int, text_tokenizer: Any = None, max_text_len: int = 0,
                 latent_shape: tuple[int, int, int] | None = None, prefetcher: ShardPrefetcher | None = None,
                 max_images: int = 1):
        super().__init__()
        # documents: when any source holds them, every sample is read as one (pairs as [caption, image])
        self.documents = any(getattr(src, "holds_documents", False) for src in sources)
        self.max_images = max_images
        self.sources, self.order, self.cfg = sources, order, cfg
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.start_sample = start_sample
        self.max_bad_samples = cfg.max_bad_samples
        self.text_tokenizer, self.max_text_len = text_tokenizer, max_text_len
        self._captions_read = self._captions_cut = 0  # of this process, until the one warning about cut captions
        self._cut_reported = False
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self._bad: set[tuple[int, int]] = set()
        self.bad_samples = 0  # in this process
        self.corrupt_shard_samples = 0  # in this process: samples of shards skipped as corrupt
        self.prefetcher = prefetcher
        self._io_last: Counter = Counter()

    def micro_batch_positions(self, j: int) -> np.ndarray:
        b = self.micro_batch_size
        first = self.start_sample + j * b * self.world_size + self.rank * b
        return np.arange(first, first + b, dtype=np.int64)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._io_last = storage.io_snapshot()  # a forked worker starts from its parent's counters
        j = worker
        while True:
            yield self.make_batch(self.micro_batch_positions(j))
            j += workers

    # -------------------------------------------------------------- samples
    def _load(self, s: int, i: int) -> tuple[Any, RawSample]:
        if self.documents:
            return self._load_document(s, i)
        raw = self.sources[s].read(i, want_image=not self.cfg.use_latents, want_latent=self.cfg.use_latents)
        if self.cfg.use_latents:
            if raw.latent is None:
                raise ShardDataError(f"{raw.where}: has no latent (data.use_latents is on)")
            return raw.latent, raw
        if raw.image is None:
            raise ShardDataError(f"{raw.where}: has no image")
        return decode_image(raw.image, self.cfg.image_size, self.cfg.resize_mode, self.cfg.fast_jpeg_decode, raw.where), raw

    def _load_document(self, s: int, i: int) -> tuple[tuple[list, bool], RawSample]:
        """A document's segments (text spans as str, images decoded to ``H, W, 3`` uint8) cut at the
        image over ``model.max_images``, and whether it is a pair; a pair source's sample is ``[caption, image]``."""
        src = self.sources[s]
        if src.holds_documents:
            doc = src.read_document(i)
            where, stored, pair = src.where(i), [seg if isinstance(seg, str) else seg.data for seg in doc.segments], False
        else:
            raw = src.read(i, want_image=True)
            if raw.image is None:
                raise ShardDataError(f"{raw.where}: has no image")
            where, stored, pair = raw.where, [raw.caption, raw.image], True
        segments: list = []
        n_images = 0
        for seg in stored:
            if isinstance(seg, str):
                segments.append(seg)
                continue
            if n_images == self.max_images:  # the sequence budget: the rest of the document is cut
                break
            segments.append(decode_image(seg, self.cfg.image_size, self.cfg.resize_mode, self.cfg.fast_jpeg_decode,
                                         f"{where} (image {n_images})"))
            n_images += 1
        text = " ".join(seg for seg in segments if isinstance(seg, str))
        return (segments, pair), RawSample(key=src.key(i), where=where, caption=text, label=None)

    def _sample(self, position: int, s: int, i: int, epoch: int) -> tuple[Any, RawSample, int, bool]:
        """The pixels/latent and fields at ``position``; a bad sample is replaced by the next good one."""
        try:
            return (*self._load(s, i), epoch, False)
        except ShardDataError as exc:
            first_error = exc
        self._note_bad(s, i, first_error)
        for p in range(position + 1, position + 1 + MAX_SUBSTITUTE_TRIES):
            (ps,), (pi,), (pe,) = self.order.lookup([p])
            if (int(ps), int(pi)) in self._bad:
                continue
            try:
                value, raw = self._load(int(ps), int(pi))
            except ShardDataError as exc:
                self._note_bad(int(ps), int(pi), exc)
                continue
            logger.warning("stream position %d: using %s (position %d) instead", position, raw.where, p)
            return value, raw, int(pe), True
        raise ShardDataError(f"{first_error} -- and no good sample within the next {MAX_SUBSTITUTE_TRIES} "
                             "stream positions to use instead") from first_error

    def _note_bad(self, s: int, i: int, exc: Exception) -> None:
        if self.max_bad_samples == 0:  # a user who wants every bad read to stop the run
            raise exc
        if isinstance(exc, CorruptShardError):
            self._bad.add((s, i))
            self.corrupt_shard_samples += 1
            corrupt = sum(len(src.shard_files.corrupt) for src in self.sources)
            if corrupt > self.cfg.max_bad_shards:
                raise ShardDataError(f"{corrupt} corrupt shards in one data worker, more than "
                                     f"data.max_bad_shards={self.cfg.max_bad_shards}; the last: {exc}") from exc
            return
        if (s, i) not in self._bad:
            self._bad.add((s, i))
            self.bad_samples += 1
            logger.warning("bad sample (%d so far in this process): %s", self.bad_samples, exc)
        if self.bad_samples > self.max_bad_samples:
            raise ShardDataError(f"{self.bad_samples} bad samples in one data worker, more than "
                                 f"data.max_bad_samples={self.max_bad_samples}; the last: {exc}") from exc

    def _io_delta(self) -> dict[str, int]:
        now = storage.io_snapshot()
        out = {k: v - self._io_last.get(k, 0) for k, v in now.items() if v != self._io_last.get(k, 0)}
        self._io_last = now
        if self.prefetcher is not None and self.prefetcher.cache is not None:
            out["cache_bytes_peak"] = self.prefetcher.cache.peak_bytes  # a maximum, not a count
        return out

    def make_batch(self, positions: np.ndarray) -> Batch:
        if self.prefetcher is not None:
            self.prefetcher.advance(int(positions[0]))
        src, local, epochs = self.order.lookup(positions)
        values, captions, labels, keys, got_epochs, substituted = [], [], [], [], [], 0
        for p, s, i, e in zip(positions.tolist(), src.tolist(), local.tolist(), epochs.tolist()):
            value, raw, epoch, sub = self._sample(p, s, i, e)
            if self.cfg.use_latents and self.latent_shape is not None and value.shape != self.latent_shape:
                raise ShardDataError(f"{raw.where}: latent has shape {value.shape}, but the image tokenizer expects "
                                     f"{self.latent_shape} (data.image_size / tokenizer.image do not match the "
                                     "tokenizer the latents were made with)")
            values.append(value)
            captions.append(raw.caption)
            labels.append(-1 if raw.label is None else raw.label)
            keys.append(f"{s}:{raw.key}")
            got_epochs.append(epoch)
            substituted += sub
        if self.documents:
            return self._document_batch(values, captions, keys, got_epochs, positions, substituted)
        pixels = latents = None
        if self.cfg.use_latents:
            shapes = {v.shape for v in values}
            if len(shapes) > 1:
                first = values[0].shape
                odd = next(k for k, v in zip(keys, values) if v.shape != first)
                raise ShardDataError(f"latents of one batch differ in shape: {keys[0]} has {first}, {odd} has "
                                     f"{next(v.shape for v in values if v.shape != first)}")
            latents = torch.from_numpy(np.stack(values).astype(np.float32, copy=False))
        else:
            pixels = torch.from_numpy(np.stack(values))  # B, H, W, 3 uint8
        batch = Batch(pixels=pixels, latents=latents, captions=captions, labels=torch.tensor(labels, dtype=torch.long),
                      keys=keys, epochs=torch.tensor(got_epochs, dtype=torch.long),
                      positions=torch.from_numpy(positions.copy()), substituted=substituted, io=self._io_delta())
        if self.text_tokenizer is not None:
            cut: list[tuple[int, int]] = []
            batch.text, batch.text_len = self.text_tokenizer.encode_batch(captions, self.max_text_len, cut=cut)
            if not self._cut_reported:
                self._report_cut(keys, cut)
        return batch

    def _document_batch(self, values: list, captions: list[str], keys: list[str], epochs: list[int], positions: np.ndarray,
                        substituted: int) -> Batch:
        """Documents -> one Batch: every image a row of ``pixels`` (padded to a multiple of B rows), every
        text span its token ids (the layout adds ``<s>``, ``<boi>``, ``<eoi>``, ``</s>``)."""
        if self.text_tokenizer is None:
            raise ShardDataError(f"{keys[0]}: documents need a text tokenizer (model.condition=text)")
        images: list[np.ndarray] = []
        documents: list[list] = []
        cut: list[tuple[int, int]] = []
        for row, (segments, _) in enumerate(values):
            doc: list = []
            for seg in segments:
                if isinstance(seg, str):
                    doc.append(np.asarray(self.text_tokenizer.encode(seg, bos=False, eos=False), dtype=np.int64))
                else:
                    doc.append(len(images))
                    images.append(seg)
            documents.append(doc)
            tokens = 1 + sum(len(s) for s in doc if not isinstance(s, int))  # <s> and the spans
            if tokens > self.max_text_len:  # the layout keeps the first max_text_len text slots
                cut.append((row, tokens))
        if not self._cut_reported:
            self._report_cut(keys, cut, "text of document")
        B = len(values)
        rows = max(-(-len(images) // B) * B, B)  # a multiple of B: at most max_images shapes in a run
        pixels = np.zeros((rows, self.cfg.image_size, self.cfg.image_size, 3), dtype=np.uint8)
        if images:
            pixels[:len(images)] = np.stack(images)
        return Batch(pixels=torch.from_numpy(pixels), latents=None, captions=captions,
                     labels=torch.full((B,), -1, dtype=torch.long), keys=keys, epochs=torch.tensor(epochs, dtype=torch.long),
                     positions=torch.from_numpy(positions.copy()), substituted=substituted, io=self._io_delta(),
                     documents=documents, pairs=[pair for _, pair in values])

    def _report_cut(self, keys: list[str], cut: list[tuple[int, int]], what: str = "caption of sample") -> None:
        """Warn once (rank 0, its first loader process) when captions are longer than ``model.max_text_len``:
        counted here on the host, where the tokenizer cut them, not on the device."""
        self._captions_read += len(keys)
        self._captions_cut += len(cut)
        worker = get_worker_info()
        if not cut or self.rank != 0 or (worker is not None and worker.id != 0):
            return
        self._cut_reported = True
        row, tokens = max(cut, key=lambda c: c[1])
        logger.warning("%s %s is %d tokens; model.max_text_len=%d keeps the first %d (%d of the first %d "
                       "%s read were cut; reported once: raise model.max_text_len to keep them whole)",
                       what, keys[row], tokens, self.max_text_len, self.max_text_len, self._captions_cut, self._captions_read,
                       "documents" if what.endswith("document") else "captions")


# --------------------------------------------------------------------------- builders


_warned_cache_dirs: set[str] = set()


def shard_cache_for(cfg: DataConfig, on_this_node: bool = True) -> ShardCache:
    """The node's cache of remote shards: ``data.cache_dir`` bounded by ``data.cache_limit``,
    their ``auto`` values resolved here, on the node that reads the shards.

    ``on_this_node`` False (a submitting host, whose disk the ranks will not use): an
    ``auto`` limit is left unmeasured (0) and no filesystem warning is given."""
    cache = ShardCache(resolve_cache_dir(cfg.cache_dir), cfg.cache_limit_bytes or 0)
    if on_this_node:
        if cfg.cache_limit_bytes is None:
            cache.limit = auto_cache_limit(cache.dir, cache.used_bytes())
        warning = cache_dir_warning(cache.dir)
        if warning and cache.dir not in _warned_cache_dirs:
            _warned_cache_dirs.add(cache.dir)
            logger.warning("%s", warning)
    return cache


def check_cache_limit(cfg: DataConfig, sources: list[Source]) -> None:
    """The shard cache's limit (``data.cache_limit``, as resolved on this node) must hold what the
    loader pins: two windows of the largest remote shards (with ``shuffle_window: 0``, every
    remote shard). ValueError naming the knobs otherwise."""
    remote_sources = [s for s in sources if s.shard_files.remote is not None]
    remote = np.concatenate([s.shard_bytes for s in remote_sources] or [np.zeros(0, np.int64)])
    limit = remote_sources[0].shard_files.cache.limit if remote_sources else 0
    if not len(remote) or not limit:
        return
    largest = np.sort(remote)[::-1]
    need = int(largest[:2 * cfg.shuffle_window].sum()) if cfg.shuffle_window else int(remote.sum())
    if limit < need:
        what = (f"two windows of data.shuffle_window={cfg.shuffle_window} shards need up to {need} bytes"
                if cfg.shuffle_window else
                f"data.shuffle_window=0 reads every shard at once: the remote dataset is {need} bytes")
        if cfg.cache_limit_bytes is None:
            cache_dir = remote_sources[0].shard_files.cache.dir
            raise ValueError(f"data.cache_limit=auto ({limit} bytes: {AUTO_CACHE_SHARE:.0%} of the free space of "
                             f"data.cache_dir {cache_dir}, plus what it holds) is too small: {what}; free space there, "
                             "set data.cache_dir to a larger disk" + (" or lower data.shuffle_window" if cfg.shuffle_window
                                                                      else " or set data.shuffle_window (shards per window)"))
        raise ValueError(f"data.cache_limit={cfg.cache_limit!r} ({limit} bytes) is too small: {what}; raise "
                         "data.cache_limit" + (" or lower data.shuffle_window" if cfg.shuffle_window else
                                               " or set data.shuffle_window (shards per window)"))


def open_sources(cfg: DataConfig, source_cfgs: list[SourceConfig] | None = None, on_this_node: bool = True,
                 documents_ok: bool = False) -> list[Source]:
    """Index every source (train sources by default) and check it has what the config needs.

    Raises FileNotFoundError / ShardDataError / ValueError naming the path, file, key or
    column. Cheap to call again for local tars: their indexes are cached in ``cfg.index_cache``.
    A remote source lists its store and reads every shard index again (see
    :func:`open_sources_once_per_node`). ``on_this_node``: see :func:`shard_cache_for`.
    ``documents_ok``: document sources are welcome (the training loader), else an error.
    """
    cache = os.path.expanduser(cfg.index_cache) if cfg.index_cache else ""
    source_cfgs = source_cfgs if source_cfgs is not None else cfg.train_sources()
    shard_cache = shard_cache_for(cfg, on_this_node) if any(storage.is_url(sc.path) for sc in source_cfgs) else None
    sources = []
    for sc in source_cfgs:
        source = open_source(sc.path, sc.format, cache, shard_cache)
        if len(source) == 0:
            raise ShardDataError(f"data source {sc.path!r} holds no samples")
        source.validate(need_image=not cfg.use_latents, need_latent=cfg.use_latents, documents_ok=documents_ok)
        sources.append(source)
    return sources


def open_sources_once_per_node(cfg: DataConfig, source_cfgs: list[SourceConfig]) -> list[Source]:
    """:func:`open_sources` for every rank of a job, with remote sources opened once per node.

    With a remote source and more than one rank, local rank 0 of each node lists the
    store, reads the shard indexes and resolves the shard cache (its ``auto`` limit
    included); the node's other ranks get those sources (index arrays and cache) from it
    through node-local disk (:func:`mmtrain.data.node_local.share_on_node`) instead of
    asking the store themselves. Local sources, and one process alone, open as before."""
    if not any(storage.is_url(sc.path) for sc in source_cfgs) or distributed.world_size() == 1:
        return open_sources(cfg, source_cfgs, documents_ok=True)
    # names the value (sources, what they must hold, the cache) and this start (the job's rendezvous
    # address; two jobs on one node have two) on this host (a shared cache_dir may serve several)
    key = repr((socket.gethostname(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"),
                os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID"), os.environ.get("TORCHELASTIC_RUN_ID"),
                [(sc.path, sc.format) for sc in source_cfgs], cfg.use_latents, cfg.cache_dir, cfg.cache_limit))
    return share_on_node(key, lambda: open_sources(cfg, source_cfgs, documents_ok=True), producer=distributed.local_rank() == 0,
                         barrier=distributed.barrier)


def _check_args(caller: str, micro_batch_size: int, rank: int, world_size: int, seed: int, start_sample: int) -> None:
    for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("world_size", world_size, 1),
                             ("rank", rank, 0), ("seed", seed, 0), ("start_sample", start_sample, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{caller}: {name} must be an int >= {low}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"{caller}: rank {rank} is not < world_size {world_size}")


def _loader(stream: SampleStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None)


def warn_if_downscaled(cfg: DataConfig, sources: list[Source], source_cfgs: list[SourceConfig]) -> None:
    """Log once when the first image of a local source is larger than ``data.image_size``: data prepped at
    a higher resolution (``prep ... --resolution 256``) that the loader downscales for training, which
    otherwise happens without a word. Reads one image header per source; remote sources are not read."""
    if cfg.use_latents or not cfg.image_size:
        return
    from PIL import Image

    for sc, source in zip(source_cfgs, sources):
        if source.shard_files.remote is not None or len(source) == 0:
            continue
        try:
            image = source.read(0, want_image=True).image
            size = image.size if hasattr(image, "size") and not isinstance(image, (bytes, bytearray)) \
                else Image.open(io.BytesIO(image)).size
        except Exception:  # noqa: BLE001 -- a bad first sample is the loader's to report, not this note's
            continue
        if min(size) > cfg.image_size:
            logger.warning("data: %s stores images of %dx%d (its first sample), larger than data.image_size=%d: "
                           "the loader downscales them (%s) to %dx%d for training; to train at the stored size set "
                           "data.image_size=%d (a recipe at that size: configs/captions256_*.yaml), or prep at "
                           "--resolution %d to store no more than is used",
                           sc.path, size[0], size[1], cfg.image_size, cfg.resize_mode, cfg.image_size, cfg.image_size,
                           min(size), cfg.image_size)


def build_train_loader(cfg: DataConfig, micro_batch_size: int, rank: int, *, world_size: int, seed: int,
                       start_sample: int, text_tokenizer: Any = None, max_text_len: int = 0,
                       latent_shape: tuple[int, int, int] | None = None, max_images: int = 1) -> DataLoader:
    """An endless loader of :class:`Batch` for ``rank`` of ``world_size``, from stream position ``start_sample``.

    Args:
        cfg: the data config.
        micro_batch_size: samples per batch (B).
        rank, world_size: this process among the data-parallel ranks (W).
        seed: the data order seed (>= 0); the same on every rank.
        start_sample: global samples already consumed (the checkpoint's ``samples_seen``;
            0 for a fresh run). Must count whole global batches of the previous run.
        text_tokenizer: optional :class:`~mmtrain.tokenize.text.TextTokenizer` (or
            :class:`~mmtrain.tokenize.hf_text.HFTextTokenizer`); the workers then fill ``Batch.text`` / ``Batch.text_len`` (``encode_batch(captions, max_text_len)``).
        max_text_len: token budget for ``text_tokenizer``.
        latent_shape: with ``use_latents``, the ``C, h, w`` every latent must have (e.g.
            ``image_tok.latent_shape(size, size)``); a sample that differs is an error naming
            its file and key. None = only latents within a batch must agree.
        max_images: documents: images per sample (``model.max_images``); a longer document is
            cut before the image over it. When any source holds documents every sample is read
            as one (see :class:`Batch`).

    The sources are indexed here, in the calling process, so a missing path or a
    malformed dataset raises before any worker starts; remote sources once per node
    (:func:`open_sources_once_per_node`), so with a process group every rank must call this.
    """
    _check_args("build_train_loader", micro_batch_size, rank, world_size, seed, start_sample)
    if text_tokenizer is not None and max_text_len < 1:
        raise ValueError(f"build_train_loader: max_text_len must be >= 1 with a text tokenizer, got {max_text_len}")
    source_cfgs = cfg.train_sources()
    sources = open_sources_once_per_node(cfg, source_cfgs)
    order = StreamOrder([len(s) for s in sources], [sc.weight for sc in source_cfgs], cfg.mode, cfg.shuffle, seed,
                        shards=[s.sample_shards() for s in sources], window=cfg.shuffle_window)
    check_cache_limit(cfg, sources)
    if rank == 0:
        warn_if_downscaled(cfg, sources, source_cfgs)
    remote = [s for s in sources if s.shard_files.remote is not None]
    prefetcher = ShardPrefetcher(sources, order, remote[0].shard_files.cache, cfg.prefetch_threads) if remote else None
    logger.info("data: %d source(s) %s, %s mode, %s; stream position %d",
                len(sources), ", ".join(f"{sc.path} ({len(s)} samples, weight {sc.weight:g})" for sc, s in zip(source_cfgs, sources)),
                cfg.mode, f"epoch length {order.epoch_length}" if cfg.mode == "epoch" else "endless", start_sample)
    stream = SampleStream(sources, order, cfg, micro_batch_size, rank, world_size, start_sample,
                          text_tokenizer=text_tokenizer, max_text_len=max_text_len, latent_shape=latent_shape,
                          prefetcher=prefetcher, max_images=max_images)
    loader = _loader(stream, cfg.num_workers)
    # what defines the stream; with the position (samples seen) it is the loader state a checkpoint keeps
    loader.stream_identity = {"seed": seed, "mode": cfg.mode, "shuffle": cfg.shuffle,
                              **({"shuffle_window": cfg.shuffle_window} if cfg.shuffle_window else {}),
                              "sources": [{"path": sc.path, "weight": sc.weight, "samples": len(s)} for sc, s in zip(source_cfgs, sources)]}
    return loader
