"""Precompute image-tokenizer latents for prepared shards.

Reads webdataset shards or an MDS directory, runs the tokenizer's ``encode`` on
every image, and writes new shards carrying the same members plus
``KEY.latent.npy`` (webdataset) or a ``latent`` column (MDS): a C,h,w float16
(default) or float32 array. Training can then skip the VAE entirely.

One output shard per input shard (webdataset keeps the input names; MDS shards
are numbered), each written under a temp name and renamed, with a record per
input shard under ``out/.prep/latents`` -- a re-run skips shards already done.
Images are batched by size (a batch must share H and W), so mixed-size datasets
work, just with smaller batches.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmtrain.atomic import atomic_write_text
from mmtrain.data.images import IMAGE_EXTENSIONS
from mmtrain.data.prep.config import fingerprint
from mmtrain.data.prep.mds_writer import MdsChunkWriter
from mmtrain.data.prep.progress import STATS, ProgressStore
from mmtrain.data.prep.readers import (
    dataset_format,
    iter_mds_shard,
    mds_shards,
    mds_to_sample,
    wds_to_sample,
)
from mmtrain.data.prep.sample import OutSample, mds_columns, npy_bytes
from mmtrain.data.prep.wds_writer import WdsChunkWriter
from mmtrain.data.shards import _ShardFile, list_shards
from mmtrain.data.tar import read_tar_samples

logger = logging.getLogger("mmtrain.data.prep")

LATENT_DTYPES: tuple[str, ...] = ("float16", "float32")


def _tokenizer(image_tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Build/accept the tokenizer; return it and a description for the fingerprint."""
    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.image import ImageTokenizerConfig

    if isinstance(image_tokenizer, str):
        image_tokenizer = ImageTokenizerConfig(kind=image_tokenizer)
    if isinstance(image_tokenizer, ImageTokenizerConfig):
        described = {"kind": image_tokenizer.kind, "scale_factor": image_tokenizer.scale_factor,
                     "shift_factor": image_tokenizer.shift_factor}
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


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return opened.convert("RGB")


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
) -> dict[str, Any]:
    """Write copies of ``in_shards`` with a latent per sample into ``out_dir``.

    Args:
        in_shards: An MDS directory (holds ``index.json``), or webdataset shards as
            ``list_shards`` accepts them (directory, ``.tar``, brace pattern).
        out_dir: Output directory (must differ from the input).
        image_tokenizer: A registered kind name (default ``"pixels"``), an
            ``ImageTokenizerConfig``, or an object with ``encode(images)`` mapping
            B,3,H,W floats in [-1, 1] to B,C,h,w latents.
        batch_size: Images per ``encode`` call, default 32.
        dtype: Stored latent dtype, ``"float16"`` (default) or ``"float32"``.
        device: Torch device, default ``"auto"`` (CUDA when available, else CPU).
        output_format: ``"wds"``, ``"mds"`` or None (default: same as the input).
        progress: Show a tqdm progress bar, default True.
        overwrite: Replace an earlier run in ``out_dir`` made with other settings,
            default False (such a run raises ValueError).

    Samples whose image is missing or cannot be decoded are skipped and counted.
    Returns the stats dict written atomically to ``out_dir/stats.json``
    (``samples``, ``dropped_by_reason``, ``latent_shapes``, ``shards_written``,
    ``shards_skipped``, ``elapsed_s``, ``samples_per_s``, ...).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"precompute_latents: batch_size must be an int >= 1, got {batch_size!r}")
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"precompute_latents: dtype must be one of {list(LATENT_DTYPES)}, got {dtype!r}")
    fmt_in = dataset_format(in_shards)
    fmt_out = output_format or fmt_in
    if fmt_out not in ("wds", "mds"):
        raise ValueError(f"precompute_latents: output_format must be 'wds', 'mds' or None, got {output_format!r}")
    out = Path(out_dir)
    source_dir = Path(in_shards) if Path(in_shards).is_dir() else Path(in_shards).parent
    if out.resolve() == source_dir.resolve():
        raise ValueError(f"precompute_latents: out_dir {str(out)!r} is the input directory; choose another one")

    if fmt_in == "mds":
        entries = mds_shards(in_shards)
        inputs = [(e["raw_data"]["basename"], os.path.join(in_shards, e["raw_data"]["basename"]), e) for e in entries]
        has_labels = bool(entries) and "cls" in entries[0].get("column_names", [])
    else:
        paths = list_shards(in_shards)
        inputs = [(os.path.basename(p), p, None) for p in paths]
        names = [name for name, _, _ in inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"precompute_latents: input shards {in_shards!r} repeat file names; outputs keep "
                             "the input names, so they must be unique")
        has_labels = fmt_out == "mds" and any(_tar_has_member(p, "cls") for p in paths)
    tokenizer, described = _tokenizer(image_tokenizer)
    options = {"latents": {"tokenizer": described, "dtype": dtype, "output_format": fmt_out, "input_format": fmt_in,
                           "has_labels": has_labels}}
    options_fp = fingerprint(options)
    started = time.perf_counter()
    encoder = _Encoder(tokenizer, batch_size, dtype, device)
    out.mkdir(parents=True, exist_ok=True)

    with ProgressStore(out, options, options_fp, overwrite, data_dirs=[out], records="latents") as store:
        store.write_progress({"shards_total": len(inputs), "complete": False})
        mds_writer = MdsChunkWriter(out, mds_columns(has_labels, has_latents=True)) if fmt_out == "mds" else None
        wds_writer = WdsChunkWriter(out, "shard") if fmt_out == "wds" and fmt_in == "mds" else None
        for writer in (mds_writer, wds_writer):
            if writer is not None:
                writer.clean_temps()
        _clean_raw_temps(out)
        all_shards: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        written = processed = total = 0
        bar = tqdm(total=len(inputs), desc="latents", unit="shard", disable=not progress)
        for i, (name, path, entry) in enumerate(inputs):
            stat = os.stat(path)
            chain = fingerprint([options_fp, name, stat.st_size, stat.st_mtime_ns, entry])
            record = store.load(f"{i:06d}")
            expected = [_out_name(fmt_in, fmt_out, name, len(all_shards) + k) for k in range(len(record["shards"]))] \
                if record else []
            intact = record is not None and record.get("chain") == chain and all(
                (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"] for s in record["shards"]
            ) and [s["name"] for s in record["shards"]] == expected
            if not intact:
                record = _do_shard(fmt_in, fmt_out, name, path, entry, in_shards, encoder, out, len(all_shards),
                                   mds_writer, wds_writer, chain)
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
            keep = {s["name"] for s in all_shards}
            for stale in sorted(n for n in os.listdir(out) if n.endswith(".tar") and n not in keep):
                logger.warning("removing stale shard %s from a previous run", out / stale)
                os.remove(out / stale)
        store.prune({f"{i:06d}" for i in range(len(inputs))})

        elapsed = time.perf_counter() - started
        drops: Counter = Counter()
        shapes: Counter = Counter()
        for record in records:
            drops.update(record["drops"])
            shapes.update(record["latent_shapes"])
        stats = {
            "input": str(in_shards), "input_format": fmt_in, "output_format": fmt_out, "out_dir": str(out),
            "tokenizer": described, "dtype": dtype, "device": str(encoder.device),
            "samples": sum(r["samples"] for r in records),
            "dropped_by_reason": {"missing_image": drops.get("missing_image", 0),
                                  "corrupt_image": drops.get("corrupt_image", 0)},
            "latent_shapes": dict(sorted(shapes.items())),
            "shards": len(all_shards), "shard_files": [s["name"] for s in all_shards],
            "shards_written": written, "shards_skipped": len(inputs) - written,
            "samples_processed": processed, "elapsed_s": elapsed,
            "samples_per_s": processed / max(elapsed, 1e-9),
        }
        atomic_write_text(out / STATS, _json(stats))
        store.runs.append({"shards_written": written, "shards_skipped": len(inputs) - written,
                           "samples_processed": processed, "elapsed_s": elapsed})
        store.write_progress({"shards_total": len(inputs), "complete": True})
    logger.info("latents: %d samples in %d shard(s) to %s (%d written, %d skipped) in %.1fs, %.1f samples/s",
                stats["samples"], len(all_shards), out, written, len(inputs) - written, elapsed, stats["samples_per_s"])
    return stats


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _tar_has_member(path: str, ext: str) -> bool:
    """Whether any sample of the tar has member ``ext`` (headers only)."""
    try:
        with tarfile.open(path, "r:*") as archive:
            return any(os.path.basename(m.name).split(".", 1)[-1] == ext for m in archive)
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"shard {path}: cannot read tar archive: {exc}") from exc


def _out_name(fmt_in: str, fmt_out: str, in_name: str, index: int) -> str:
    if fmt_out == "mds":
        return MdsChunkWriter.shard_name(index)
    return in_name if fmt_in == "wds" else f"shard-{index:06d}.tar"


def _clean_raw_temps(out: Path) -> None:
    for name in os.listdir(out):
        if name.startswith(".") and ".tar" in name and name.endswith(".tmp"):  # shards and their indexes
            os.remove(out / name)


def _do_shard(fmt_in: str, fmt_out: str, name: str, path: str, entry: dict[str, Any] | None, in_shards: Any,
              encoder: _Encoder, out: Path, start: int, mds_writer: MdsChunkWriter | None,
              wds_writer: WdsChunkWriter | None, chain: str) -> dict[str, Any]:
    """Encode one input shard and write its output shard(s); return its record."""
    where = f"shard {path}"
    raw: list[tuple[str, dict[str, bytes]]] = []
    samples: list[OutSample] = []
    if fmt_in == "wds":
        for key, members in read_tar_samples(path):
            raw.append((key, members))
    else:
        samples = [mds_to_sample(row) for row in iter_mds_shard(in_shards, entry)]
    keys = [k for k, _ in raw] if fmt_in == "wds" else [s.key for s in samples]
    drops: Counter = Counter()
    images: list[Image.Image] = []
    kept: list[int] = []
    for i, key in enumerate(keys):
        if fmt_in == "wds":
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw[i][1]), None)
            data = raw[i][1][ext] if ext else None
        else:
            data = samples[i].image
        if data is None:
            drops["missing_image"] += 1
            logger.warning("skipped %s, sample %s: missing_image: no image member", where, key)
            continue
        try:
            images.append(_decode(data))
        except Exception as exc:  # noqa: BLE001 -- any decoder failure means the image is corrupt
            drops["corrupt_image"] += 1
            logger.warning("skipped %s, sample %s: corrupt_image: %s: %s", where, key, type(exc).__name__, exc)
            continue
        kept.append(i)
    latents = encoder(images, [keys[i] for i in kept], where)
    shapes = Counter("x".join(map(str, z.shape)) for z in latents)

    if fmt_in == "wds" and fmt_out == "wds":
        shard = _ShardFile(str(out / name))
        try:
            for i, latent in zip(kept, latents):
                key, members = raw[i]
                shard.write({**members, "__key__": key, "latent.npy": npy_bytes(latent)})
            shard.commit()
        except BaseException:
            shard.abort()
            raise
        infos = [{"name": name, "samples": len(kept), "bytes": os.path.getsize(out / name)}]
    else:
        if fmt_in == "wds":
            outs = [wds_to_sample(raw[i][0], raw[i][1], where) for i in kept]
        else:
            outs = [samples[i] for i in kept]
        for sample, latent in zip(outs, latents):
            sample.latent = latent
        writer = mds_writer if fmt_out == "mds" else wds_writer
        infos = writer.write_chunk(outs, start, tag=f"latents-{start:06d}")
    return {"version": 1, "chain": chain, "input": name, "samples": len(kept), "drops": dict(drops),
            "latent_shapes": dict(shapes), "shards": infos}
