"""``mmtrain eval generate``: images for the eval prompts (or class labels) under every
setting of a CFG x AR-steps sweep, scored by FID / sFID / IS / KID / precision-recall against
cached reference statistics, CLIP score, and attribute accuracy on synthetic data."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mmtrain.atomic import atomic_write_text
from mmtrain.config import SampleConfig
from mmtrain.data.attributes import estimate_shapes
from mmtrain.data.synthetic import attribute_accuracy, kind_accuracy_by_size, mean_accuracy
from mmtrain.eval.samples import seen_unseen_scores, training_hold_out
from mmtrain.eval.clip_score import ClipScorer
from mmtrain.eval.config import EvalConfig
from mmtrain.eval.features import MetricUnavailable, build_feature_extractor, extract_features
from mmtrain.eval.fidelity import (ADM_REF_IMAGES, ReferenceStats, fidelity_metrics, read_reference_stats,
                                   reference_key, write_reference_stats)
from mmtrain.eval.ranks import Ranks
from mmtrain.eval.report import HtmlReport, config_yaml, plot_against_cfg, print_table
from mmtrain.inference import LoadedRun, generate_images

log = logging.getLogger("mmtrain.eval")

TABLE_COLUMNS = ["cfg_scale", "ar_steps", "fid", "sfid", "isc_mean", "kid_mean", "precision", "recall", "clip_score",
                 "attr_exact", "attr_kind", "attr_color", "attr_size", "attr_count", "images_per_s"]
PLOTTED = ["fid", "clip_score", "attr_exact"]


def sweep(eval_cfg: EvalConfig, sample: SampleConfig) -> list[SampleConfig]:
    """Every (AR steps, CFG scale) pair of the sweep; an empty list keeps the sample setting."""
    return [dataclasses.replace(sample, cfg_scale=c, ar_steps=s)
            for s in (eval_cfg.ar_steps or [sample.ar_steps]) for c in (eval_cfg.cfg_scales or [sample.cfg_scale])]


def reference_statistics(open_set: Callable[[int], object], eval_cfg: EvalConfig, extractor, image_size: int,
                         resize_mode: str) -> ReferenceStats:
    """``eval.ref_stats`` (or the cache entry of these shards) when it exists; else computed
    from the first ``eval.ref_images`` eval images and written there."""
    ref_set = open_set(eval_cfg.num_ref_images)
    path = Path(eval_cfg.ref_stats) if eval_cfg.ref_stats else eval_cfg.stats_cache_dir / (
        "ref_" + reference_key(ref_set.files, len(ref_set), image_size, resize_mode, extractor.id) + ".npz")
    if path.is_file():
        log.info("reference statistics: %s", path)
        return read_reference_stats(path, extractor.id, lambda images: extract_features(extractor, images)["pool"])
    feats: dict[str, list[torch.Tensor]] = {}
    kept: list[np.ndarray] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(ref_set), 64), desc="reference features", unit="batch"):
        images = [ref_set.load(i).image for i in range(start, min(len(ref_set), start + 64))]
        for k, v in extract_features(extractor, np.stack(images)).items():
            feats.setdefault(k, []).append(v)
        kept += images[:max(0, ADM_REF_IMAGES - len(kept))]
    log.info("reference features of %d images in %.1f s (%.1f images/s)", len(ref_set), time.perf_counter() - t0,
             len(ref_set) / (time.perf_counter() - t0))
    meta = {"extractor": extractor.id, "source": ref_set.name, "num_images": len(ref_set), "image_size": image_size,
            "resize_mode": resize_mode}
    stats = write_reference_stats(path, np.stack(kept), {k: torch.cat(v) for k, v in feats.items()}, meta)
    log.info("wrote reference statistics %s", path)
    return stats


def _tag(setting: SampleConfig) -> str:
    return f"cfg{setting.cfg_scale:g}_S{setting.ar_steps}"


def _generate_on_rank(run: LoadedRun, setting: SampleConfig, conditions: list, truths, eval_cfg: EvalConfig, ranks: Ranks,
                      extractor, clip: ClipScorer | None) -> list[dict]:
    prompts = [str(c) for c in conditions]
    out = []
    batches = ranks.batches(len(conditions), eval_cfg.batch_size)
    for b, idx in tqdm(batches, desc=f"generate {_tag(setting)}", unit="batch", disable=not ranks.is_main):
        images = generate_images(run, [conditions[i] for i in idx], setting, eval_cfg.batch_size, first_batch=b)
        item: dict = {"batch": b, "preview": [(i, im) for i, im in zip(idx, images) if i < eval_cfg.report_images]}
        if extractor is not None:
            item["features"] = extract_features(extractor, images)
        if clip is not None:
            item["clip"] = clip.scores(images, [prompts[i] for i in idx])
        if truths is not None:
            item["found"] = [estimate_shapes(im) for im in images]
            item["attributes"] = [attribute_accuracy(found, truths[i]) for i, found in zip(idx, item["found"])]
            item["truths"] = [truths[i] for i in idx]
        if eval_cfg.save_samples:
            item["pixels"] = np.stack([np.asarray(im) for im in images])
        out.append(item)
    return out


def evaluate_generation(run: LoadedRun, open_set: Callable[[int], object], eval_cfg: EvalConfig, sample: SampleConfig,
                        out_dir: str | Path, ranks: Ranks, weights: str = "auto") -> dict | None:
    """Run the sweep on every rank; rank 0 scores, writes ``metrics.json`` + ``report.html``
    into ``out_dir`` and returns the report (None on the other ranks)."""
    out_dir = Path(out_dir)
    eval_set = open_set(eval_cfg.num_samples)
    samples = [eval_set.load(i, with_image=False) for i in range(len(eval_set))]
    class_mode = run.cfg.model.condition == "class"
    if class_mode:
        missing = [s.key for s in samples if s.label is None]
        if missing:
            raise ValueError(f"{eval_set.name}: the model is class-conditional but sample {missing[0]} has no class label "
                             f"('cls'); {len(missing)} of {len(samples)} lack one")
    conditions = [s.label if class_mode else s.prompt for s in samples]

    unavailable: dict[str, str] = {}
    wanted = [m for m in eval_cfg.metrics if m != "clip"]
    extractor = None
    if wanted:
        try:
            extractor = build_feature_extractor(eval_cfg.feature_extractor, eval_cfg.inception_weights_path, run.device)
        except MetricUnavailable as exc:
            unavailable.update({m: str(exc) for m in wanted})
    clip = None
    if "clip" in eval_cfg.metrics:
        if class_mode:
            unavailable["clip"] = "class-conditional model: no prompt to compare the images with"
        else:
            try:
                clip = ClipScorer(eval_cfg.clip_model, eval_cfg.clip_weights_path, eval_cfg.clip_model_config, run.device)
            except MetricUnavailable as exc:
                unavailable["clip"] = str(exc)
    truths = None
    if class_mode:
        unavailable["attributes"] = "class-conditional model: a class label does not describe a whole synthetic scene"
    elif all(s.attributes is not None for s in samples):
        truths = [s.attributes["shapes"] for s in samples]
    else:
        unavailable["attributes"] = f"{eval_set.name} carries no synthetic ground truth (KEY.json with 'shapes')"

    rows, reference = [], None
    for setting in sweep(eval_cfg, sample):
        t0 = time.perf_counter()
        gathered = ranks.gather(_generate_on_rank(run, setting, conditions, truths, eval_cfg, ranks, extractor, clip))
        seconds = time.perf_counter() - t0
        if not ranks.is_main:
            continue
        items = sorted((it for part in gathered for it in part), key=lambda it: it["batch"])
        row = {"tag": _tag(setting), "cfg_scale": setting.cfg_scale, "ar_steps": setting.ar_steps, "images": len(samples),
               "seconds": seconds, "images_per_s": len(samples) / seconds}
        log.info("%s: %d images in %.1f s (%.2f images/s on %d ranks)", _tag(setting), len(samples), seconds,
                 row["images_per_s"], ranks.world_size)
        if extractor is not None:
            feats = {k: torch.cat([it["features"][k] for it in items]) for k in items[0]["features"]}
            if reference is None:
                reference = reference_statistics(open_set, eval_cfg, extractor, run.cfg.data.image_size, run.cfg.data.resize_mode)
            values, why = fidelity_metrics(feats, reference, wanted, kid_subset_size=eval_cfg.kid_subset_size,
                                           kid_subsets=eval_cfg.kid_subsets, isc_splits=eval_cfg.isc_splits,
                                           prc_neighborhood=eval_cfg.prc_neighborhood)
            row.update(values)
            unavailable.update(why)
        if clip is not None:
            row["clip_score"] = float(torch.cat([it["clip"] for it in items]).mean())
        if truths is not None:
            accuracies = [a for it in items for a in it["attributes"]]
            row.update({f"attr_{k}": v for k, v in mean_accuracy(accuracies).items()})
            row.update({f"attr_kind_{size}": v for size, v in kind_accuracy_by_size(
                [f for it in items for f in it["found"]], [t for it in items for t in it["truths"]]).items()})
            row.update(seen_unseen_scores(accuracies, [t for it in items for t in it["truths"]], training_hold_out(run.cfg)))
        folder = out_dir / "images" / row["tag"]
        folder.mkdir(parents=True, exist_ok=True)
        row["previews"] = []
        for i, im in (p for it in items for p in it["preview"]):
            im.save(folder / f"{i:06d}.png")
            row["previews"].append(i)
        if eval_cfg.save_samples:
            npz = out_dir / "samples" / f"{row['tag']}.npz"
            npz.parent.mkdir(parents=True, exist_ok=True)
            with open(npz.with_suffix(".tmp"), "wb") as fh:
                np.savez(fh, arr_0=np.concatenate([it["pixels"] for it in items]))
            npz.with_suffix(".tmp").replace(npz)
        rows.append(row)
    if not ranks.is_main:
        return None

    report = {
        "kind": "generate", "checkpoint": run.checkpoint, "step": run.step, "weights": weights, "eval_set": eval_set.name,
        "num_samples": len(samples), "world_size": ranks.world_size, **run.placement(), "eval": dataclasses.asdict(eval_cfg),
        "sample": dataclasses.asdict(sample), "feature_extractor": getattr(extractor, "id", None),
        "reference": None if reference is None else {"path": str(reference.path), **reference.meta},
        "settings": rows, "unavailable": unavailable,
    }
    if truths is not None:  # the pixel analyser on the real images: the ceiling of the image metric
        real = [eval_set.load(i).image for i in range(len(samples))]
        report["reference_image_accuracy"] = mean_accuracy([attribute_accuracy(estimate_shapes(im), t) for im, t in zip(real, truths)])
    _write_outputs(report, run, conditions, out_dir)
    return report


def _write_outputs(report: dict, run: LoadedRun, conditions: list, out_dir: Path) -> None:
    rows = report["settings"]
    columns = [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in rows)]
    print_table(f"eval generate: {report['checkpoint']} step {report['step']} ({report['num_samples']} samples)", columns, rows)
    for name, why in report["unavailable"].items():
        print(f"  {name}: unavailable: {why}")
    plot = plot_against_cfg(rows, PLOTTED, out_dir / "metrics_vs_cfg.png",
                            title=f"step {report['step']}, {report['num_samples']} samples, features: {report['feature_extractor']}")
    report["files"] = {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.html"),
                       "plot": str(plot) if plot else None}

    html = HtmlReport(f"mmtrain eval generate - step {report['step']}")
    html.facts({"checkpoint": report["checkpoint"], "step": report["step"], "weights": report["weights"],
                "eval set": f"{report['eval_set']} (first {report['num_samples']} samples)",
                "feature extractor": report["feature_extractor"] or "none",
                "reference statistics": (report["reference"] or {}).get("path", "none"), "ranks": report["world_size"]})
    html.heading("Metrics")
    html.table(columns, rows)
    if "reference_image_accuracy" in report:
        html.facts({f"pixel analyser on the real images ({k})": f"{v:.3f}" for k, v in report["reference_image_accuracy"].items()})
    html.unavailable(report["unavailable"])
    if plot:
        html.image(plot.name, "metrics against the CFG scale")
    for row in rows:
        html.heading(f"CFG {row['cfg_scale']:g}, {row['ar_steps']} AR steps")
        html.gallery([(f"images/{row['tag']}/{i:06d}.png", [(str(conditions[i]), "")]) for i in row["previews"]])
    html.preformatted("run config (config.yaml)", config_yaml(run.cfg))
    html.preformatted("eval and sample settings", json.dumps({"eval": report["eval"], "sample": report["sample"]}, indent=2))
    html.write(out_dir / "report.html")
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
