"""Conversion throughput of ``mmtrain.data.prep``: a folder of JPEGs -> shards, by worker count.

    python benchmarks/bench_prep.py                          # 600 JPEGs 640x480 -> 256 px, workers 1 2
    python benchmarks/bench_prep.py --num 2000 --workers 1 4 8 --format mds

Writes ``--num`` photo-like JPEGs (smooth colour gradients plus mild noise, quality 90,
sizes cycling around ``--size``) with captions into a temp folder, then for each
``--workers`` count converts the folder with resize to ``--resolution`` (center crop,
JPEG 95, dedup on) into a fresh output directory and reports candidates/s (the
``samples_per_s`` of stats.json, listing excluded) and wall time. Also checks that every
worker count produced byte-identical shards, and times a resume of the finished output
(no chunk redone: the cost of re-reading records and checking shard sizes).
Worker processes only pay off with real cores: check ``nproc`` and any cgroup CPU quota.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, num: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1:complex(0, size), 0:1:complex(0, size)]
    for i in range(num):
        w, h = (size, size * 3 // 4) if i % 2 else (size * 3 // 4, size)
        c = rng.uniform(0, 255, (3, 3))
        base = np.stack([c[k, 0] + (c[k, 1] - c[k, 0]) * xx + (c[k, 2] - c[k, 0]) * yy for k in range(3)], -1)
        pixels = np.clip(base[:h, :w] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        sub = root / f"part{i % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img{i:06d}.jpg", quality=90)
        (sub / f"img{i:06d}.txt").write_text(f"a smooth gradient picture number {i}")


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if not name.startswith("."):
            h.update(name.encode())
            h.update((directory / name).read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    # Imported here, not at the top: spawned workers re-import this script, and the
    # converter's imports (webdataset pulls in torch) would cost each of them seconds.
    from mmtrain.data.prep import PrepConfig, prep_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=600)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--format", choices=["wds", "mds"], default="wds")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        start = time.perf_counter()
        make_images(raw, args.num, args.size)
        print(f"wrote {args.num} JPEGs ({args.size}px) in {time.perf_counter() - start:.1f}s; cpu count {os.cpu_count()}")
        print(f"{'workers':>8} {'samples/s':>10} {'wall s':>8}  output digest")
        digests = set()
        for workers in args.workers:
            out = Path(tmp) / f"out{workers}"
            cfg = PrepConfig(output_format=args.format, resolution=args.resolution, workers=workers,
                             samples_per_shard=args.samples_per_shard, progress=False)
            start = time.perf_counter()
            stats = prep_folder(raw, out, cfg)
            wall = time.perf_counter() - start
            digests.add(digest(out / "train"))
            print(f"{workers:>8} {stats['run']['samples_per_s']:>10.1f} {wall:>8.2f}  {digest(out / 'train')}")
        start = time.perf_counter()
        stats = prep_folder(raw, out, cfg)
        print(f"resume of a finished output: {time.perf_counter() - start:.2f}s, "
              f"{stats['run']['chunks_written']} of {stats['run']['chunks_total']} chunks redone")
        print("identical output for every worker count:", len(digests) == 1)


if __name__ == "__main__":
    main()
