"""Evaluation on the embedded synthetic data, scored against the generator's ground truth.

* caption accuracy: captions the model writes for held-out images are parsed back into
  shapes and compared field by field (kind, colour, size per position) with the truth;
* image accuracy: images the model draws for held-out captions are read back by a pixel
  analyser (:mod:`mmtrain.data.attributes`) and compared with what the caption asked for.

The pixel analyser's own accuracy on the real held-out images is reported next to them
(``reference_image_accuracy``), so a reader can see the ceiling of the image metric.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

from mmtrain.atomic import atomic_write_text
from mmtrain.config import SampleConfig
from mmtrain.data.attributes import estimate_shapes
from mmtrain.data.shards import iter_shard_samples
from mmtrain.data.synthetic import attribute_accuracy, mean_accuracy
from mmtrain.data.synthetic import parse_caption
from mmtrain.inference import LoadedRun, caption_images, generate_images, image_grid

log = logging.getLogger("mmtrain.eval")


def evaluate_synthetic(run: LoadedRun, val_shards: str, num_samples: int, sample: SampleConfig, out_dir: str | Path) -> dict:
    """Score ``num_samples`` held-out samples; write ``metrics.json`` and two grids into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = list(itertools.islice(iter_shard_samples(val_shards), num_samples))
    if not samples:
        raise ValueError(f"{val_shards}: no samples to evaluate")
    truths = [s["attributes"]["shapes"] for s in samples]

    t0 = time.perf_counter()
    captions = caption_images(run, [s["image"] for s in samples], sample)
    t_caption = time.perf_counter() - t0
    caption_scores = [attribute_accuracy(parse_caption(c), t) for c, t in zip(captions, truths)]

    t0 = time.perf_counter()
    prompts = [s["caption"] for s in samples]
    generated = generate_images(run, prompts, sample)
    t_generate = time.perf_counter() - t0
    image_scores = [attribute_accuracy(estimate_shapes(im), t) for im, t in zip(generated, truths)]
    reference_scores = [attribute_accuracy(estimate_shapes(s["image"]), t) for s, t in zip(samples, truths)]

    n_show = min(16, len(samples))
    image_grid(generated[:n_show], prompts[:n_show], cols=4, scale=3).save(out_dir / "generated.png")
    image_grid([s["image"] for s in samples[:n_show]], captions[:n_show], cols=4, scale=3).save(out_dir / "captions.png")
    report = {
        "checkpoint": run.checkpoint,
        "step": run.step,
        "val_shards": str(val_shards),
        "num_samples": len(samples),
        "sample_config": vars(sample),
        "caption_accuracy": mean_accuracy(caption_scores),
        "image_accuracy": mean_accuracy(image_scores),
        "reference_image_accuracy": mean_accuracy(reference_scores),
        "seconds": {"caption": t_caption, "generate": t_generate},
        "examples": [{"truth": s["caption"], "caption": c} for s, c in zip(samples[:8], captions[:8])],
        "files": {"generated_grid": str(out_dir / "generated.png"), "caption_grid": str(out_dir / "captions.png")},
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
    log.info("caption exact %.3f, image exact %.3f (reference %.3f)", report["caption_accuracy"]["exact"],
             report["image_accuracy"]["exact"], report["reference_image_accuracy"]["exact"])
    return report
