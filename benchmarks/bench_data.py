"""Data loader throughput: plain webdataset iteration vs. mmtrain's loader, pixels and latents.

    python benchmarks/bench_data.py                       # 2,000 JPEGs 256x256, workers 0 and 2
    python benchmarks/bench_data.py --num 4000 --workers 0 2 8

Writes ``--num`` random-texture JPEG images (``--size`` px, quality 90) with captions into
webdataset shards, once without and once with a ``KEY.latent.npy`` member (a 4 x size/8 x
size/8 float16 array made by downsampling the pixels: the size of an SD-style VAE latent,
no VAE needed), trains a small sentencepiece tokenizer on the captions, then times
(each over all samples, page cache warm, after one untimed warm-up pass):

1. plain webdataset: ``wds.WebDataset(urls).decode("pil").to_tuple("jpg", "txt")``, resize to
   ``--size`` (bicubic), ``pil_to_tensor``; one process;
2. mmtrain ``build_train_loader``: random access in a global shuffled order, decode,
   center-crop/resize, collate, captions tokenized in the loader, then ``Batch.images``
   (``B, 3, H, W`` float in [-1, 1], converted from uint8 in the consuming process);
   with each ``--workers`` count (0 = in-process, the like-for-like comparison with 1);
3. the same with ``use_latents: true`` (no image decoding);
4. (``--remote``, on by default) the pixel loader (2) over the same JPEGs in 100-sample shards
   (with their sidecar indexes) from object storage: a real S3-compatible server (moto, a
   process of its own on 127.0.0.1, credentials checked; on the same 2 cores) and a plain
   HTTP server (a thread of this process), with
   ``shuffle_window: 2`` and a ``cache_limit`` of 5 shards (a quarter of the dataset), each
   pass starting from an empty cache (timed from the second batch on: the first one holds the
   start-up, as for the workers of (2)); against local disk with the same shuffle window.
   Reports samples/s, remote / local, bytes fetched per sample, the cache hit rate (shard
   opens served from the cache) and the peak cache size. Goal: remote >= 0.8x local with 2
   workers.

All in-process work uses one torch thread (``torch.set_num_threads(1)``), as dataloader
workers do. (2) is timed twice: the batches as the loader delivers them (uint8 pixels: what a GPU
trainer should move with ``Batch.images_on("cuda")``) and with the ``Batch.images`` float
conversion on the CPU in the consuming process (the like-for-like comparison with 1).
Prints a table of samples/s and the ratios: goal (2, 0 workers) costs <= 1.3x (1) per
sample, and (3) is >= 5x faster than (2) at the same worker count.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mmtrain.components.data import DataConfig, build_train_loader
from mmtrain.data.sources import open_source
from mmtrain.tokenize.image import pil_to_tensor
from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

WORDS = ["a", "red", "green", "blue", "small", "large", "circle", "square", "triangle", "on", "the", "top", "left",
         "right", "bottom", "of", "near", "photo", "picture", "dog", "cat", "tree", "house", "car", "street", "sky",
         "with", "under", "over", "next", "to"]


def make_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A photo-like texture: a smooth random field plus grain, so JPEG sizes are realistic (~15-30 KB)."""
    low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def make_latent(image: Image.Image) -> np.ndarray:
    """4 x size/8 x size/8 float16: RGB average-pooled by 8, plus their mean (stand-in for a VAE latent)."""
    x = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # H, W, 3
    h, w = x.shape[0] // 8, x.shape[1] // 8
    pooled = x[: h * 8, : w * 8].reshape(h, 8, w, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1)  # 3, h, w
    return np.concatenate([pooled, pooled.mean(0, keepdims=True)]).astype(np.float16)


def write_data(root: Path, num: int, size: int, per_shard: int) -> tuple[list[str], list[str], list[str]]:
    rng = np.random.default_rng(0)
    (root / "pixels").mkdir(parents=True)
    (root / "latents").mkdir(parents=True)
    pixel_shards, latent_shards, captions = [], [], []
    writers = None
    for i in range(num):
        if i % per_shard == 0:
            if writers:
                for w in writers:
                    w.close()
            pixel_shards.append(str(root / "pixels" / f"shard-{i // per_shard:06d}.tar"))
            latent_shards.append(str(root / "latents" / f"shard-{i // per_shard:06d}.tar"))
            writers = [wds.TarWriter(pixel_shards[-1], encoder=False), wds.TarWriter(latent_shards[-1], encoder=False)]
        image = make_image(rng, size)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 20))))
        captions.append(caption)
        sample = {"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption.encode(), "cls": str(i % 1000).encode()}
        writers[0].write(sample)
        npy = io.BytesIO()
        np.save(npy, make_latent(image))
        writers[1].write({**sample, "latent.npy": npy.getvalue()})
    for w in writers:
        w.close()
    return pixel_shards, latent_shards, captions


def warm_page_cache(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def bench_webdataset(urls: list[str], size: int) -> tuple[float, int]:
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "txt")
    n = 0
    start = time.perf_counter()
    for image, _caption in dataset:
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        pil_to_tensor([image])
        n += 1
    return time.perf_counter() - start, n


def bench_mmtrain(cfg: DataConfig, num: int, batch: int, tok, max_text_len: int, to_float: bool) -> tuple[float, int]:
    loader = build_train_loader(cfg, batch, 0, world_size=1, seed=0, start_sample=0,
                                text_tokenizer=tok, max_text_len=max_text_len)
    steps = num // batch
    it = iter(loader)
    if cfg.num_workers:
        next(it)  # worker start-up is a one-off per run: not part of the throughput
        steps -= 1
    n = 0
    start = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        if to_float and b.pixels is not None:
            b.images  # noqa: B018 -- uint8 -> float [-1, 1] on the CPU, in this process
        n += len(b)
    elapsed = time.perf_counter() - start
    del it
    return elapsed, n


def bench_remote(root: Path, args, tok, best) -> list[tuple]:
    """Rows (4): the same JPEGs in 100-sample shards from local disk, S3 (moto) and HTTP, shuffle window 2."""
    import shutil
    import sys

    from mmtrain.data import storage
    from mmtrain.data.index import write_sidecar

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from storage_servers import BUCKET, set_env, start_http, start_s3  # the servers the tests start

    small, _, _ = write_data(root / "remote_data", args.num, args.size, per_shard=100)
    for shard in small:
        write_sidecar(shard)  # what `mmtrain prep index` writes for shards made by other tools
    shard_sizes = sorted((os.path.getsize(p) for p in small), reverse=True)
    limit = sum(shard_sizes[:5])
    s3 = start_s3(own_process=True)  # not sharing the GIL of the process being timed
    set_env({**s3.env(), "MMTRAIN_IO_BACKOFF_S": "0.05"})
    storage.upload_tree(str(root / "remote_data" / "pixels"), f"s3://{BUCKET}/pixels")
    base, http_server = start_http(str(root / "remote_data"))
    n = len(small)
    sources = {"local disk": str(root / "remote_data" / "pixels"), "S3 (moto)": f"s3://{BUCKET}/pixels",
               "HTTP": f"{base}/pixels/shard-{{000000..{n - 1:06d}}}.tar"}
    rows = []
    for w in args.workers:
        rates = {}
        for name, path in sources.items():
            seen: dict = {}

            def run(path=path, seen=seen):
                cache = root / "shard_cache"
                shutil.rmtree(cache, ignore_errors=True)  # every pass starts cold: each shard is fetched in it
                cfg = DataConfig(train_shards=path, image_size=args.size, num_workers=w, index_cache="",
                                 shuffle_window=2, cache_dir=str(cache), cache_limit=str(limit))
                loader = build_train_loader(cfg, args.batch, 0, world_size=1, seed=0, start_sample=0,
                                            text_tokenizer=tok, max_text_len=args.max_text_len)
                it, io_sum = iter(loader), {}
                first = next(it)  # start-up, a one-off per run: workers, S3 clients, the first window's download
                io_sum.update(first.io)
                steps, count = args.num // args.batch - 1, 0
                start = time.perf_counter()
                for _ in range(steps):
                    b = next(it)
                    b.images  # noqa: B018 -- as in (2)
                    count += len(b)
                    for k, v in b.io.items():
                        io_sum[k] = io_sum.get(k, 0) + v if k != "cache_bytes_peak" else max(io_sum.get(k, 0), v)
                elapsed = time.perf_counter() - start
                del it
                seen.clear()
                seen.update(io_sum, samples=count)
                return elapsed, count

            rates[name] = best(run)
            hits, misses = seen.get("cache_hits", 0), seen.get("cache_misses", 0)
            rows.append((name, w, rates[name], rates[name] / rates["local disk"], seen.get("bytes_fetched", 0) / seen["samples"],
                         hits / max(hits + misses, 1) if name != "local disk" else None,
                         seen.get("cache_bytes_peak", 0), seen.get("retries", 0)))
            print(f"  (4) [{w} workers] {name}: {rates[name]:.0f} samples/s", flush=True)
    http_server.shutdown()
    s3.stop()
    print(f"\n(4) {args.num} samples in {n} shards of 100 ({sum(shard_sizes) / 1e6:.1f} MB), shuffle_window 2, "
          f"cache_limit {limit / 1e6:.1f} MB (5 shards), cold cache each pass, timed after the first batch, "
          "best of 2 after a warm-up\n")
    print("| source | workers | samples/s | vs local | bytes fetched / sample | cache hit rate | peak cache | retries |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, w, rate, rel, per, hit, peak, retries in rows:
        print(f"| {name} | {w} | {rate:,.0f} | {rel:.2f}x | {per:,.0f} | {'-' if hit is None else f'{hit:.2f}'} | "
              f"{peak / 1e6:.2f} MB | {retries} |")
    for name, w, rate, rel, *_ in rows:
        if w == 2 and name != "local disk":
            print(f"(4) {name} vs local disk, 2 workers: {rel:.2f}x (goal >= 0.8x) -> {'OK' if rel >= 0.8 else 'MISSED'}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=2000, help="samples (default 2000)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--batch", type=int, default=32, help="micro batch size (default 32)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts for (2) and (3) (default 0 2)")
    ap.add_argument("--max-text-len", type=int, default=32)
    ap.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    ap.add_argument("--no-remote", dest="remote", action="store_false", help="skip (4), the S3 / HTTP rows")
    args = ap.parse_args()
    # One intra-op thread, as in DataLoader workers: the in-process runs (1) and (2, 0 workers)
    # then compare pipelines, not torch's thread pool (whose wake-ups cost ms per small op on some VMs).
    torch.set_num_threads(1)

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_"))
    t = time.perf_counter()
    pixel_shards, latent_shards, captions = write_data(root / "data", args.num, args.size, per_shard=500)
    print(f"wrote {args.num} samples ({sum(os.path.getsize(p) for p in pixel_shards) / args.num / 1024:.1f} KB/sample JPEG) "
          f"to {root / 'data'} in {time.perf_counter() - t:.1f}s on {os.cpu_count()} CPUs")
    tok = train_text_tokenizer(captions, root / "tok" / "text", TextTokenizerConfig(vocab_size=256), progress=False)
    warm_page_cache(pixel_shards + latent_shards)

    cache = str(root / "index_cache")
    t = time.perf_counter()
    open_source(str(root / "data" / "pixels"), "wds", cache)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    open_source(str(root / "data" / "pixels"), "wds", cache)
    print(f"tar index of {len(pixel_shards)} shards: {cold * 1000:.0f} ms to scan, {(time.perf_counter() - t) * 1000:.0f} ms from cache")

    def cfg(data: str, workers: int, latents: bool) -> DataConfig:
        return DataConfig(train_shards=str(root / "data" / data), image_size=args.size, num_workers=workers,
                          use_latents=latents, index_cache=cache)

    def best(run, repeats: int = 2) -> float:
        run()  # warm-up pass: imports, first-touch allocations
        return max(n / elapsed for elapsed, n in (run() for _ in range(repeats)))

    def mm(data: str, w: int, latents: bool, to_float: bool):
        return lambda: bench_mmtrain(cfg(data, w, latents), args.num, args.batch, tok, args.max_text_len, to_float)

    wds_rate = best(lambda: bench_webdataset(pixel_shards, args.size))
    rows = [("(1) webdataset: decode, resize, to tensor (per sample)", 0, None, wds_rate)]
    print(f"  (1): {wds_rate:.0f} samples/s", flush=True)
    pixel_rates, latent_rates = {}, {}
    for w in args.workers:
        uint8 = best(mm("pixels", w, False, False))
        pixel_rates[w] = best(mm("pixels", w, False, True))
        latent_rates[w] = best(mm("latents", w, True, False))
        rows.append(("(2) mmtrain pixels: read, decode, crop/resize, tokenize, collate", w, uint8, pixel_rates[w]))
        rows.append(("(3) mmtrain use_latents: read .npy, tokenize, collate", w, latent_rates[w], latent_rates[w]))
        print(f"  [{w} workers] (2): {uint8:.0f} / {pixel_rates[w]:.0f} samples/s, (3): {latent_rates[w]:.0f}", flush=True)

    print(f"\n{args.num} samples, {args.size}x{args.size} JPEG, micro batch {args.batch}, {os.cpu_count()} CPUs, "
          "best of 2 passes after a warm-up\n")
    print("| pipeline | workers | batches as delivered (uint8 pixels) | + `Batch.images` float on CPU | ms/sample (float) |")
    print("|---|---:|---:|---:|---:|")
    for name, w, raw, rate in rows:
        print(f"| {name} | {w} | {'-' if raw is None else f'{raw:,.0f}/s'} | {rate:,.0f}/s | {1000 / rate:.3f} |")
    print()
    if 0 in pixel_rates:
        ratio = wds_rate / pixel_rates[0]
        print(f"(2) with 0 workers, float images, vs (1), time per sample: {ratio:.2f}x (goal <= 1.3x) -> "
              f"{'OK' if ratio <= 1.3 else 'MISSED'}")
    for w in args.workers:
        speedup = latent_rates[w] / pixel_rates[w]
        print(f"(3) vs (2) float images, {w} workers: {speedup:.1f}x faster (goal >= 5x) -> {'OK' if speedup >= 5 else 'MISSED'}")
    if args.remote:
        bench_remote(root, args, tok, best)

if __name__ == "__main__":
    main()
