"""``mmtrain eval caption``: captions for the eval images, scored with pycocoevalcap against
their reference captions, and by attribute accuracy on synthetic data."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

from mmtrain.atomic import atomic_write_text
from mmtrain.config import SampleConfig
from mmtrain.data.synthetic import attribute_accuracy, kind_accuracy_by_size, mean_accuracy, parse_caption
from mmtrain.eval.samples import seen_unseen_scores, training_hold_out
from mmtrain.eval.caption_metrics import METRICS, score_captions
from mmtrain.eval.config import EvalConfig
from mmtrain.eval.ranks import Ranks
from mmtrain.eval.report import HtmlReport, config_yaml, print_table
from mmtrain.inference import LoadedRun, caption_images

log = logging.getLogger("mmtrain.eval")


def _caption_on_rank(run: LoadedRun, eval_set, eval_cfg: EvalConfig, sample: SampleConfig, ranks: Ranks) -> list[dict]:
    out = []
    batches = ranks.batches(len(eval_set), eval_cfg.batch_size)
    for b, idx in tqdm(batches, desc="caption", unit="batch", disable=not ranks.is_main):
        samples = [eval_set.load(i) for i in idx]
        captions = caption_images(run, [Image.fromarray(s.image) for s in samples], sample, batch_size=eval_cfg.batch_size)
        for s, caption in zip(samples, captions):
            keep = s.index < eval_cfg.report_images
            out.append({"index": s.index, "key": s.key, "references": s.references, "attributes": s.attributes,
                        "caption": caption, "image": Image.fromarray(s.image) if keep else None})
    return out


def evaluate_captions(run: LoadedRun, open_set: Callable[[int], object], eval_cfg: EvalConfig, sample: SampleConfig,
                      out_dir: str | Path, ranks: Ranks, weights: str = "auto") -> dict | None:
    """Caption on every rank; rank 0 scores, writes ``metrics.json`` + ``report.html`` into
    ``out_dir`` and returns the report (None on the other ranks)."""
    if run.cfg.model.condition != "text":
        raise ValueError("eval caption needs a text model (model.condition=text); this model is class-conditional")
    out_dir = Path(out_dir)
    eval_set = open_set(eval_cfg.num_samples)
    t0 = time.perf_counter()
    gathered = ranks.gather(_caption_on_rank(run, eval_set, eval_cfg, sample, ranks))
    seconds = time.perf_counter() - t0
    if not ranks.is_main:
        return None
    items = sorted((it for part in gathered for it in part), key=lambda it: it["index"])
    log.info("captioned %d images in %.1f s (%.2f images/s on %d ranks)", len(items), seconds, len(items) / seconds,
             ranks.world_size)

    unavailable: dict[str, str] = {}
    scores: dict[str, float] = {}
    try:
        scores = score_captions({str(it["index"]): it["references"] for it in items},
                                {str(it["index"]): it["caption"] for it in items})
    except RuntimeError as exc:  # no Java here
        unavailable.update({m: str(exc) for m in METRICS})
    if all(it["attributes"] is not None for it in items):
        parsed = [parse_caption(it["caption"]) for it in items]
        truths = [it["attributes"]["shapes"] for it in items]
        for it, shapes, true in zip(items, parsed, truths):
            it["accuracy"] = attribute_accuracy(shapes, true)
        accuracies = [it["accuracy"] for it in items]
        scores.update({f"attr_{k}": v for k, v in mean_accuracy(accuracies).items()})
        scores.update({f"attr_kind_{size}": v for size, v in kind_accuracy_by_size(parsed, truths).items()})
        scores.update(seen_unseen_scores(accuracies, truths, training_hold_out(run.cfg)))
    else:
        unavailable["attributes"] = f"{eval_set.name} carries no synthetic ground truth (KEY.json with 'shapes')"

    row = {**scores, "images": len(items), "seconds": seconds, "images_per_s": len(items) / seconds}
    report = {"kind": "caption", "checkpoint": run.checkpoint, "step": run.step, "weights": weights,
              "eval_set": eval_set.name, "num_samples": len(items), "world_size": ranks.world_size, **run.placement(),
              "eval": dataclasses.asdict(eval_cfg), "sample": dataclasses.asdict(sample), "scores": row,
              "unavailable": unavailable,
              "examples": [{"key": it["key"], "caption": it["caption"], "references": it["references"]} for it in items[:eval_cfg.report_images]]}
    _write_outputs(report, run, items, out_dir)
    return report


def _write_outputs(report: dict, run: LoadedRun, items: list[dict], out_dir: Path) -> None:
    row = report["scores"]
    columns = [c for c in (*METRICS, "attr_exact", "attr_kind", "attr_color", "attr_size", "attr_count", "images_per_s") if c in row]
    print_table(f"eval caption: {report['checkpoint']} step {report['step']} ({report['num_samples']} images)", columns, [row])
    for name, why in report["unavailable"].items():
        print(f"  {name}: unavailable: {why}")
    report["files"] = {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.html")}

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    gallery = []
    for it in items:
        if it["image"] is None:
            continue
        src = f"images/{it['index']:06d}.png"
        it["image"].save(out_dir / src)
        lines = [(f"model: {it['caption']}", "")]
        if "accuracy" in it:
            lines[0] = (lines[0][0], "ok" if it["accuracy"]["exact"] == 1.0 else "bad")
        lines += [(f"reference: {r}", "") for r in it["references"][:3]]
        gallery.append((src, lines))

    html = HtmlReport(f"mmtrain eval caption - step {report['step']}")
    html.facts({"checkpoint": report["checkpoint"], "step": report["step"], "weights": report["weights"],
                "eval set": f"{report['eval_set']} (first {report['num_samples']} images)", "ranks": report["world_size"]})
    html.heading("Metrics")
    html.table(columns, [row])
    html.unavailable(report["unavailable"])
    html.heading("Examples (green: every attribute right, red: not)" if "attr_exact" in row else "Examples")
    html.gallery(gallery)
    html.preformatted("run config (config.yaml)", config_yaml(run.cfg))
    html.preformatted("eval and sample settings", json.dumps({"eval": report["eval"], "sample": report["sample"]}, indent=2))
    html.write(out_dir / "report.html")
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
