"""Precompute image-tokenizer latents for prepared shards.

Reads any source the trainer reads (webdataset shards or an MDS directory, local or at a
URL: :func:`mmtrain.data.sources.open_source`, shard by shard with ``read_shard``), decodes
and resizes every image the way the training loader does
(:func:`mmtrain.data.images.decode_image` with ``image_size`` / ``resize_mode``), runs the
tokenizer's ``encode`` on it, and writes new shards carrying the same members plus
``KEY.latent.npy`` (webdataset) or a ``latent`` column (MDS): a C,h,w float16 (default) or
float32 array. Training can then skip the VAE entirely.

One output shard per input shard (webdataset keeps the input names; MDS shards are
numbered), each written under a temp name and renamed (:class:`mmtrain.data.shards.
ShardFile` and the prep chunk writers), with a record per input shard under
``out/.prep/latents`` -- a re-run skips shards already done. Images are batched by size (a
batch must share H and W), so mixed-size datasets kept as stored (``image_size`` 0) work,
just with smaller batches.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmtrain.atomic import atomic_write_text
from mmtrain.data import storage
from mmtrain.data.cache import ShardCache
from mmtrain.data.images import RESIZE_MODES, decode_image
from mmtrain.data.prep.config import fingerprint
from mmtrain.data.prep.mds_writer import MdsChunkWriter
from mmtrain.data.prep.progress import STATS, ProgressStore
from mmtrain.data.prep.sample import NO_LABEL, OutSample, mds_columns, npy_bytes
from mmtrain.data.prep.transform import encode
from mmtrain.data.prep.wds_writer import WdsChunkWriter
from mmtrain.data.shards import ShardFile, remove_stale_shards, remove_temp_shards, shard_name
from mmtrain.data.sources import Source, StoredSample, open_source

logger = logging.getLogger("mmtrain.data.prep")

LATENT_DTYPES: tuple[str, ...] = ("float16", "float32")
# Members a re-sharded sample is rebuilt from; the others travel along as OutSample.extras.
_KNOWN_MEMBERS = frozenset({"txt", "json", "cls", "latent.npy"})


def _tokenizer(image_tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Build/accept the tokenizer; return it and a description for the fingerprint."""
    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.image import ImageTokenizerConfig, image_tokenizer_config

    if isinstance(image_tokenizer, (str, os.PathLike, dict)):  # a kind or a tokenizer.yaml, as tokenizer.image takes
        image_tokenizer = image_tokenizer_config(image_tokenizer, where="image_tokenizer")
    if isinstance(image_tokenizer, ImageTokenizerConfig):
        described = {"kind": image_tokenizer.kind, "scale_factor": image_tokenizer.scale_factor,
                     "shift_factor": image_tokenizer.shift_factor}
        if image_tokenizer.path:  # only then: runs made without one keep their fingerprint (weights are not hashed)
            described["path"] = image_tokenizer.path
        return build_image_tokenizer(image_tokenizer), described
    if not callable(getattr(image_tokenizer, "encode", None)):
        raise ValueError(  # noqa: TRY004 -- bad user input: the CLI maps ValueError to exit 2
            f"precompute_latents: image_tokenizer must be a kind name, an ImageTokenizerConfig or an "
            f"object with .encode(images), got {type(image_tokenizer).__name__}")
    # Weights are not hashed: after changing them, pass overwrite=True.
    described = {"class": type(image_tokenizer).__name__}
    for attr in ("latent_channels", "downsample", "scale_factor", "shift_factor"):
        if hasattr(image_tokenizer, attr):
            described[attr] = getattr(image_tokenizer, attr)
    return image_tokenizer, described


class _Encoder:
    """Batches same-size images through ``tokenizer.encode`` on one device."""

    def __init__(self, tokenizer: Any, batch_size: int, dtype: str, device: str) -> None:
        import torch

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = tokenizer.to(self.device).eval() if hasattr(tokenizer, "to") else tokenizer
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)

    def __call__(self, images: list[Image.Image], keys: list[str], where: str) -> list[np.ndarray]:
        from mmtrain.tokenize.image import pil_to_tensor

        latents: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                x = pil_to_tensor([images[i] for i in batch]).to(self.device)
                try:
                    with self.torch.inference_mode():
                        z = self.tokenizer.encode(x)
                except ValueError as exc:
                    raise ValueError(f"{where}: cannot encode samples {keys[batch[0]]!r}..{keys[batch[-1]]!r}: {exc}") from exc
                z = z.detach().float().cpu().numpy().astype(self.dtype)
                for i, latent in zip(batch, z):
                    latents[i] = np.ascontiguousarray(latent)
        return latents  # type: ignore[return-value]


def precompute_latents(
    in_shards: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    image_tokenizer: Any = "pixels",
    batch_size: int = 32,
    dtype: str = "float16",
    device: str = "auto",
    output_format: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    image_size: int = 0,
    resize_mode: str = "center_crop",
    shard_cache: ShardCache | None = None,
) -> dict[str, Any]:
    """Write copies of ``in_shards`` with a latent per sample into ``out_dir``.

    Args:
        in_shards: Any data source the trainer reads (:func:`mmtrain.data.sources.open_source`):
            webdataset shards (directory, ``.tar``, brace pattern) or an MDS directory, local
            or at a URL (``s3://``, ``gs://``, ``http(s)://``; remote shards are read through
            ``shard_cache``, default :func:`~mmtrain.data.sources.default_shard_cache`).
        out_dir: Output directory (must differ from the input).
        image_tokenizer: A registered kind name (default ``"pixels"``), the path of a
            ``tokenizer.yaml`` (what ``tokenizer.image`` takes), an ``ImageTokenizerConfig``
            or its mapping, or an object with ``encode(images)`` mapping
            B,3,H,W floats in [-1, 1] to B,C,h,w latents.
        batch_size: Images per ``encode`` call, default 32.
        dtype: Stored latent dtype, ``"float16"`` (default) or ``"float32"``.
        device: Torch device, default ``"auto"`` (CUDA when available, else CPU).
        output_format: ``"wds"``, ``"mds"`` or None (default: same as the input).
        progress: Show a tqdm progress bar, default True.
        overwrite: Replace an earlier run in ``out_dir`` made with other settings,
            default False (such a run raises ValueError).
        image_size: Encode each image resized to ``image_size`` x ``image_size`` by
            ``resize_mode``, as the training loader would (set both to the run's
            ``data.image_size`` / ``data.resize_mode``); default 0: as stored, which is
            the same pixels for a dataset prepped at the training size.
        resize_mode: One of :data:`mmtrain.data.images.RESIZE_MODES`, default ``"center_crop"``
            (the loader's default); used only with ``image_size``.
        shard_cache: Where remote input shards are downloaded to.

    Samples whose image is missing or cannot be decoded are skipped and counted.
    Returns the stats dict written atomically to ``out_dir/stats.json``
    (``samples``, ``dropped_by_reason``, ``latent_shapes``, ``shards_written``,
    ``shards_skipped``, ``elapsed_s``, ``samples_per_s``, ...).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"precompute_latents: batch_size must be an int >= 1, got {batch_size!r}")
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"precompute_latents: dtype must be one of {list(LATENT_DTYPES)}, got {dtype!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 0:
        raise ValueError(f"precompute_latents: image_size must be an int >= 0, got {image_size!r}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"precompute_latents: resize_mode must be one of {list(RESIZE_MODES)}, got {resize_mode!r}")
    if output_format not in (None, "wds", "mds"):
        raise ValueError(f"precompute_latents: output_format must be 'wds', 'mds' or None, got {output_format!r}")
    in_path = os.fspath(in_shards)
    out = Path(out_dir)
    if not storage.is_url(in_path):
        source_dir = Path(in_path) if Path(in_path).is_dir() else Path(in_path).parent
        if out.resolve() == source_dir.resolve():
            raise ValueError(f"precompute_latents: out_dir {str(out)!r} is the input directory; choose another one")
    source = open_source(in_path, shard_cache=shard_cache)
    try:
        return _precompute(source, in_path, out, image_tokenizer, batch_size, dtype, device,
                           output_format or source.format, progress, overwrite, image_size, resize_mode)
    finally:
        source.close()


def _precompute(source: Source, in_path: str, out: Path, image_tokenizer: Any, batch_size: int, dtype: str,
                device: str, fmt_out: str, progress: bool, overwrite: bool, image_size: int,
                resize_mode: str) -> dict[str, Any]:
    """:func:`precompute_latents` on an opened source, shard by shard."""
    fmt_in = source.format
    names = [storage.basename(s) for s in source.shards]
    if fmt_in == "wds" and len(set(names)) != len(names):
        raise ValueError(f"precompute_latents: input shards {in_path!r} repeat file names; outputs keep "
                         "the input names, so they must be unique")
    if fmt_in == "mds":
        has_labels = source.has_column("cls")
    else:
        has_labels = fmt_out == "mds" and bool(source.has_field("cls").any())
    tokenizer, described = _tokenizer(image_tokenizer)
    options = {"latents": {"tokenizer": described, "dtype": dtype, "output_format": fmt_out, "input_format": fmt_in,
                           "has_labels": has_labels}}
    if image_size:  # only then: runs made before the option existed keep their fingerprint
        options["latents"].update(image_size=image_size, resize_mode=resize_mode)
    options_fp = fingerprint(options)
    started = time.perf_counter()
    encoder = _Encoder(tokenizer, batch_size, dtype, device)
    decode = _ImageDecoder(image_size, resize_mode)
    out.mkdir(parents=True, exist_ok=True)

    with ProgressStore(out, options, options_fp, overwrite, data_dirs=[out], records="latents") as store:
        store.write_progress({"shards_total": len(names), "complete": False})
        mds_writer = MdsChunkWriter(out, mds_columns(has_labels, has_latents=True)) if fmt_out == "mds" else None
        wds_writer = WdsChunkWriter(out, "shard") if fmt_out == "wds" and fmt_in == "mds" else None
        for writer in (mds_writer, wds_writer):
            if writer is not None:
                writer.clean_temps()
        remove_temp_shards(out)
        all_shards: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        written = processed = total = 0
        bar = tqdm(total=len(names), desc="latents", unit="shard", disable=not progress)
        for i, name in enumerate(names):
            chain = fingerprint([options_fp, name, *_shard_identity(source, i),
                                 source.entries[i] if fmt_in == "mds" else None])
            record = store.load(f"{i:06d}")
            expected = [_out_name(fmt_in, fmt_out, name, len(all_shards) + k) for k in range(len(record["shards"]))] \
                if record else []
            intact = record is not None and record.get("chain") == chain and all(
                (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"] for s in record["shards"]
            ) and [s["name"] for s in record["shards"]] == expected
            if not intact:
                record = _do_shard(source, i, decode, encoder, out, len(all_shards),
                                   mds_writer or wds_writer, chain)
                store.save(f"{i:06d}", record)
                written += 1
                processed += record["samples"] + sum(record["drops"].values())
            all_shards.extend(record["shards"])
            records.append(record)
            bar.update(1)
            total += record["samples"]
            bar.set_postfix(samples=total, refresh=False)
        bar.close()
        if mds_writer is not None:
            mds_writer.finish(all_shards)
        else:
            remove_stale_shards(out, r".+\.tar", {s["name"] for s in all_shards})
        store.prune({f"{i:06d}" for i in range(len(names))})

        elapsed = time.perf_counter() - started
        drops: Counter = Counter()
        shapes: Counter = Counter()
        for record in records:
            drops.update(record["drops"])
            shapes.update(record["latent_shapes"])
        stats = {
            "input": in_path, "input_format": fmt_in, "output_format": fmt_out, "out_dir": str(out),
            "tokenizer": described, "dtype": dtype, "device": str(encoder.device),
            "samples": sum(r["samples"] for r in records),
            "dropped_by_reason": {"missing_image": drops.get("missing_image", 0),
                                  "corrupt_image": drops.get("corrupt_image", 0)},
            "latent_shapes": dict(sorted(shapes.items())),
            "shards": len(all_shards), "shard_files": [s["name"] for s in all_shards],
            "shards_written": written, "shards_skipped": len(names) - written,
            "samples_processed": processed, "elapsed_s": elapsed,
            "samples_per_s": processed / max(elapsed, 1e-9),
        }
        atomic_write_text(out / STATS, _json(stats))
        store.runs.append({"shards_written": written, "shards_skipped": len(names) - written,
                           "samples_processed": processed, "elapsed_s": elapsed})
        store.write_progress({"shards_total": len(names), "complete": True})
    logger.info("latents: %d samples in %d shard(s) to %s (%d written, %d skipped) in %.1fs, %.1f samples/s",
                stats["samples"], len(all_shards), out, written, len(names) - written, elapsed, stats["samples_per_s"])
    return stats


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _shard_identity(source: Source, shard: int) -> tuple[int, int | str]:
    """What changes when an input shard is rewritten: a local file's size and mtime, a remote
    one's size and digest (from its index; "" without one)."""
    remote = source.shard_files.remote
    if remote is None:
        stat = os.stat(source.shards[shard])
        return stat.st_size, stat.st_mtime_ns
    return remote[shard].size, remote[shard].digest


def _out_name(fmt_in: str, fmt_out: str, in_name: str, index: int) -> str:
    if fmt_out == "mds":
        return MdsChunkWriter.shard_name(index)
    return in_name if fmt_in == "wds" else shard_name("shard", index)


class _ImageDecoder:
    """A stored image -> the RGB pixels the training loader would make of it (a PIL image)."""

    def __init__(self, image_size: int, resize_mode: str) -> None:
        self.image_size, self.resize_mode = image_size, resize_mode

    def __call__(self, sample: StoredSample) -> Image.Image:
        return Image.fromarray(decode_image(sample.image, self.image_size, self.resize_mode, where=sample.where))


def _out_sample(sample: StoredSample, latent: np.ndarray) -> OutSample:
    """The sample to write through a prep chunk writer: as read, plus its latent."""
    image = sample.image
    if not isinstance(image, bytes):  # an MDS 'pil' column: no file to copy, store it losslessly
        image, ext = encode(image.convert("RGB"), "png", 0), "png"
    else:
        ext = sample.image_ext or "jpg"
    meta = sample.meta
    members = sample.members or {}
    return OutSample(key=sample.key, image=image, image_ext=ext, caption=sample.caption or "",
                     meta={} if meta is None else meta if isinstance(meta, dict) else {"json": meta},
                     label=None if sample.label is None or sample.label == NO_LABEL else sample.label, latent=latent,
                     extras={k: v for k, v in members.items() if k not in _KNOWN_MEMBERS and k != sample.image_ext})


def _do_shard(source: Source, shard: int, decode: _ImageDecoder, encoder: _Encoder, out: Path,
              start: int, writer: MdsChunkWriter | WdsChunkWriter | None, chain: str) -> dict[str, Any]:
    """Encode one input shard and write its output shard(s); return its record."""
    where = f"shard {source.shards[shard]}"
    name = storage.basename(source.shards[shard])
    drops: Counter = Counter()
    images: list[Image.Image] = []
    kept: list[StoredSample] = []
    for sample in source.read_shard(shard):
        if sample.image is None:
            drops["missing_image"] += 1
            logger.warning("skipped %s, sample %s: missing_image: no image member", where, sample.key)
            continue
        try:
            images.append(decode(sample))
        except Exception as exc:  # noqa: BLE001 -- any decoder failure means the image is corrupt
            drops["corrupt_image"] += 1
            logger.warning("skipped %s, sample %s: corrupt_image: %s: %s", where, sample.key, type(exc).__name__, exc)
            continue
        kept.append(sample)
    latents = encoder(images, [s.key for s in kept], where)
    shapes = Counter("x".join(map(str, z.shape)) for z in latents)

    if writer is None:  # webdataset in and out: every member as it was, plus the latent
        with ShardFile(out / name) as tar:
            for sample, latent in zip(kept, latents):
                tar.write({**sample.members, "__key__": sample.key, "latent.npy": npy_bytes(latent)})
        infos = [tar.info]
    else:
        infos = writer.write_chunk([_out_sample(s, z) for s, z in zip(kept, latents)], start)
    return {"version": 1, "chain": chain, "input": name, "samples": len(kept), "drops": dict(drops),
            "latent_shapes": dict(shapes), "shards": infos}
