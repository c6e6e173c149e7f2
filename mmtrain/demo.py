"""``mmtrain demo``: every stage on the embedded dataset, in one go, on this machine.

data -> tokenizer -> 2-rank DeepSpeed training -> checkpoint -> sample + caption -> eval.
Stages whose outputs already exist are skipped, so re-running continues where it stopped
(training itself resumes from the run's latest checkpoint).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from mmtrain.atomic import atomic_write_text
from mmtrain.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
# the whole validation split: 64 samples leave +-6 points of noise on a 0.5 accuracy
EVAL_NUM = 256
PROMPTS = [
    "a large red circle at the top left",
    "a small blue square at the bottom right",
    "a large green triangle at the top right and a small yellow circle at the bottom left",
    "a large magenta square at the bottom left",
]


def learned_summary(eval_dir: Path) -> str:
    """The attribute-accuracy table of the demo's two evals (``eval_dir/{caption,generate}/metrics.json``)."""
    keys = ("exact", "kind", "color", "size", "count", "kind_small", "kind_large")
    head = "| | " + " | ".join(k.replace("_", " of ") for k in keys) + " |\n|---|" + "---:|" * len(keys)
    caption = json.loads((eval_dir / "caption" / "metrics.json").read_text())["scores"]
    rows = [("captions written for held-out images", caption)]
    for row in json.loads((eval_dir / "generate" / "metrics.json").read_text())["settings"]:
        rows.append((f"images drawn for held-out captions, S = {row['ar_steps']}, CFG {row['cfg_scale']:g}", row))
    cell = lambda r, k: f"{r[f'attr_{k}']:.2f}" if f"attr_{k}" in r else "-"  # noqa: E731  (no shape of that size)
    return head + "".join(f"\n| {name} | " + " | ".join(cell(r, k) for k in keys) + " |" for name, r in rows)


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def run_demo(out: str, overrides: list[str], mmtrain: Callable[[list[str]], int]) -> int:
    """Every stage, each one ``mmtrain`` command (``mmtrain``: the CLI's entry point, so the
    demo runs exactly what a user types)."""
    out_dir = Path(out).resolve()
    data, run_dir = out_dir / "data", out_dir / "run"
    config = str(DEMO_CONFIG) if DEMO_CONFIG.is_file() else "configs/demo.yaml"
    timings = {}

    t = _stage("1/5 data: synthetic shapes -> webdataset shards")
    for split, num, seed in (("train", 6000, 0), ("val", 256, 1)):
        if not (data / split / "stats.json").is_file():
            mmtrain(["prep", "synthetic", "--out", str(data / split), "--num", str(num), "--seed", str(seed), "--samples-per-shard", "1000"])
    timings["data"] = time.perf_counter() - t

    t = _stage("2/5 tokenizer: sentencepiece on the captions")
    tok = data / "tokenizer" / "text"
    if not tok.with_suffix(".model").is_file():
        mmtrain(["tokenizer", "train", "--shards", str(data / "train"), "--out", str(tok)])
    timings["tokenizer"] = time.perf_counter() - t

    run_overrides = [f"data.train_shards={data / 'train'}", f"data.val_shards={data / 'val'}",
                     f"tokenizer.text_model={tok.with_suffix('.model')}", f"train.run_dir={run_dir}", *overrides]
    train_cfg = load_config(config, run_overrides).train
    t = _stage(f"3/5 train: DeepSpeed ZeRO-{train_cfg.zero_stage} on {train_cfg.nproc_per_node} CPU ranks")
    rc = mmtrain(["train", config, *run_overrides])
    if rc != 0:
        print(f"training failed (exit {rc})")
        return rc
    timings["train"] = time.perf_counter() - t

    t = _stage("4/5 sample + caption")
    mmtrain(["sample", str(run_dir), *sum((["--prompt", p] for p in PROMPTS), []), "--num-per-prompt", "4",
              "--out", str(out_dir / "samples.png")])
    mmtrain(["caption", str(run_dir), "--shards", str(data / "val"), "--num", "8"])
    timings["sample_caption"] = time.perf_counter() - t

    t = _stage("5/5 eval: caption metrics and a CFG sweep, scored against the generator's ground truth")
    mmtrain(["eval", "caption", str(run_dir), "--num", str(EVAL_NUM), "--out", str(out_dir / "eval" / "caption")])
    # no Inception weights can be assumed here: FID uses the seeded random feature extractor
    mmtrain(["eval", "generate", str(run_dir), "--num", str(EVAL_NUM), "--cfg", "1,3", "--ar-steps", "1,4",
              "--out", str(out_dir / "eval" / "generate"),
              "--set", "eval.feature_extractor=tiny_random", "--set", f"eval.stats_cache={out_dir / 'eval' / 'ref_stats'}"])
    timings["eval"] = time.perf_counter() - t

    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    summary = learned_summary(out_dir / "eval")
    atomic_write_text(out_dir / "eval" / "summary.md", summary + "\n")
    print(f"\n=== what the model learned ({EVAL_NUM} held-out samples, scored against the generator's ground truth) ===")
    print(summary)
    print("\n=== outputs ===")
    print(f"shards:        {data / 'train'}  {data / 'val'}")
    print(f"tokenizer:     {tok.with_suffix('.model')}")
    print(f"run:           {run_dir}  (config.yaml, checkpoints/, metrics.jsonl, wandb/)")
    print(f"samples:       {out_dir / 'samples.png'}")
    print(f"eval reports:  {out_dir / 'eval' / 'caption' / 'report.html'}  {out_dir / 'eval' / 'generate' / 'report.html'}")
    print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0
