"""Training engine: peak memory per rank and throughput, ZeRO-0 vs ZeRO-3 (and anything else).

    python benchmarks/bench_train.py                                   # small config, 2 CPU ranks, fp32
    python benchmarks/bench_train.py --config configs/causalfusion_l.yaml --precision bf16 \\
        --nproc 1 --variants zero0 zero3 --image-size 256 --batch 32   # on a GPU

Writes the embedded synthetic shapes dataset (``--image-size`` px, so the token count
matches the config's VAE geometry when pixels stand in for latents) and a sentencepiece
tokenizer into a temp dir, then runs ``mmtrain train`` (real DeepSpeed ranks) once per
variant for ``--steps`` steps and reads the run's last ``metrics.jsonl`` record, which
covers the steps after the first ``--warmup`` (compilation, allocator warm-up):

- ``peak_rss_mb``: peak resident memory of a rank process since its first step, max over
  ranks (CPU; includes the ~0.6 GB of the Python/torch/DeepSpeed runtime itself; with
  ``--fixed-mmap-threshold`` freed large buffers are returned to the OS at once);
- ``peak_cuda_mb``: peak CUDA allocation of a rank, max over ranks (GPU);
- ``samples_per_s`` / ``tokens_per_s``: summed over ranks; ``mfu`` on a known GPU.

Prints one table row per variant and the ratios against the first variant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "zero0": ["train.zero_stage=0"],
    "zero1": ["train.zero_stage=1"],
    "zero2": ["train.zero_stage=2"],
    "zero3": ["train.zero_stage=3"],
    "zero3_offload": ["train.zero_stage=3", "train.offload=optimizer"],
    "zero3_compile": ["train.zero_stage=3", "train.compile=true"],
}


def make_data(root: Path, image_size: int, num: int) -> dict:
    from mmtrain.data.synthetic import write_synthetic_shards
    from mmtrain.data.sources import iter_samples
    from mmtrain.data.synthetic import SyntheticConfig
    from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

    write_synthetic_shards(root / "train", num, SyntheticConfig(seed=0, image_size=image_size), samples_per_shard=500, progress=False)
    captions = [s["caption"] for s in iter_samples(root / "train", want_image=False)]
    tok = train_text_tokenizer(captions, root / "tok" / "text", TextTokenizerConfig(), progress=False)
    return {"train": str(root / "train"), "tokenizer": str(tok.model_path)}


def run_variant(args, data: dict, root: Path, name: str) -> dict:
    run_dir = root / f"run_{name}"
    overrides = [f"data.train_shards={data['train']}", f"tokenizer.text_model={data['tokenizer']}", f"train.run_dir={run_dir}",
                 f"data.image_size={args.image_size}", "tokenizer.image.kind=pixels", f"train.steps={args.steps}",
                 f"train.micro_batch_size={args.batch}", f"train.nproc_per_node={args.nproc}", f"train.precision={args.precision}",
                 f"logging.log_every={args.warmup}", "logging.progress=false", "logging.wandb=false",
                 f"checkpoint.every_steps={10**9}", "data.num_workers=1", *VARIANTS[name], *args.set]
    env = dict(os.environ)
    if args.fixed_mmap_threshold:
        # glibc raises its mmap threshold each time a big block is freed, after which freed
        # ZeRO-3 gather buffers stay in the heap and count as resident; a fixed threshold
        # returns them, so RSS tracks the tensors that are alive (CPU measurement only)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    proc = subprocess.run([sys.executable, "-m", "mmtrain.cli", "train", args.config, *overrides], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--variants", nargs="+", default=["zero0", "zero3"], choices=sorted(VARIANTS))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    ap.add_argument("--num", type=int, default=2000, help="synthetic samples")
    ap.add_argument("--set", action="append", default=[], help="extra config override, repeatable")
    ap.add_argument("--fixed-mmap-threshold", action="store_true",
                    help="run the ranks with MALLOC_MMAP_THRESHOLD_=1MiB (see run_variant)")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must be larger than --warmup")
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root, args.image_size, args.num)
        rows = {name: run_variant(args, data, root, name) for name in args.variants}
    from mmtrain.config import load_config

    cfg = load_config(args.config, args.set)
    print(f"\n{args.config}: hidden {cfg.model.hidden_size}, depth {cfg.model.depth}; {args.nproc} ranks, {args.precision}, "
          f"micro batch {args.batch}/rank, image {args.image_size}px (pixels, patch {cfg.model.patch_size}); "
          f"timed steps {args.warmup + 1}..{args.steps}" + (", MALLOC_MMAP_THRESHOLD_=1MiB" if args.fixed_mmap_threshold else ""))
    mem_key = "peak_cuda_mb" if "peak_cuda_mb" in next(iter(rows.values())) else "peak_rss_mb"
    header = f"| variant | {mem_key} per rank | samples/s | tokens/s |" + (" MFU |" if "mfu" in next(iter(rows.values())) else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, r in rows.items():
        line = f"| {name} | {r[mem_key]:,.0f} MB | {r['samples_per_s']:.1f} | {r['tokens_per_s']:,.0f} |"
        if "mfu" in r:
            line += f" {100 * r['mfu']:.1f}% |"
        print(line)
    base_name = args.variants[0]
    base = rows[base_name]
    for name, r in list(rows.items())[1:]:
        print(f"{name} / {base_name}: memory {r[mem_key] / base[mem_key]:.2f}x, samples/s {r['samples_per_s'] / base['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
