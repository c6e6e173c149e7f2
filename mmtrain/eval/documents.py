"""``mmtrain eval documents``: the shape-stories benchmark on a trained model.

For every story of the eval shards (:mod:`mmtrain.data.stories`: scenes and changes stored as
ground truth in each document's meta) and every step k = 1 .. K-1 of it, two prompts built from
the story's true images and texts, continued by interleaved generation
(:func:`mmtrain.inference.continue_documents`):

- **draw** scene k: ``[caption 0, image 0, change 1, image 1, ..., change k]`` -> one image,
  scored by :func:`mmtrain.eval.stories.score_image` (the change happened: ``attribute``;
  everything it should leave alone is still there: ``consistency``; the whole scene: ``exact``);
- **tell** change k: ``[caption 0, image 0, image 1, change 1, ..., image k-1, image k]`` -> text,
  scored by :func:`mmtrain.eval.stories.score_change_text` (``exact`` and per attribute: ``kind``,
  ``object``, ``value``).

Both are reported per k (does more context help?) and per change kind, for the eval shards and,
with ``--held-out``, for stories whose change kinds training never saw (``prep synthetic
--documents --hold-out-changes``).
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from PIL import Image

from mmtrain.atomic import atomic_write_text
from mmtrain.data.documents import Document
from mmtrain.data.sources import iter_documents
from mmtrain.eval.stories import IMAGE_METRICS, TEXT_METRICS, score_change_text, score_image, summarize

log = logging.getLogger("mmtrain.eval")


def story_steps(doc: Document, where: str) -> list[dict[str, Any]]:
    """The prompts of one story document: per step k a ``draw`` and a ``tell`` prompt (segments: str
    or PIL images) with the ground truth to score them against."""
    meta = doc.meta
    if meta.get("task") != "shape_stories" or "scenes" not in meta or "changes" not in meta:
        raise ValueError(f"{where}: not a shape story (its meta has no task 'shape_stories' with scenes and changes); "
                         "make the eval shards with `mmtrain prep synthetic --documents`")
    scenes, changes = meta["scenes"], meta["changes"]
    images: dict[int, Image.Image] = {}
    for image in doc.images:
        images[int(image.meta.get("scene", len(images)))] = Image.open(io.BytesIO(image.data)).convert("RGB")
    if sorted(images) != list(range(len(scenes))):
        raise ValueError(f"{where}: holds images of scenes {sorted(images)}, expected 0..{len(scenes) - 1}")
    caption = doc.segments[0] if isinstance(doc.segments[0], str) else ""
    steps = []
    for k in range(1, len(scenes)):
        draw: list = [caption, images[0]]
        tell: list = [caption, images[0]]
        for j in range(1, k + 1):
            draw += [changes[j - 1]["text"]] + ([images[j]] if j < k else [])
            tell += [images[j]] + ([changes[j - 1]["text"]] if j < k else [])
        steps.append({"k": k, "change": changes[k - 1]["kind"], "draw": draw, "tell": tell, "prev": scenes[k - 1],
                      "next": scenes[k], "true_change": changes[k - 1]})
    return steps


def evaluate_stories(run, shards: str, sample, out: str | Path, num: int = 0, held_out: str = "", batch_size: int = 16,
                     max_text_tokens: int = 24) -> dict[str, Any]:
    """Score ``run`` on the stories of ``shards`` (the first ``num``; 0 = all) and of ``held_out``;
    writes ``out/metrics.json`` (summaries and every scored row) and returns it."""
    from mmtrain.inference import continue_documents
    from mmtrain.models.document_sampling import GenerationLimits

    started = time.perf_counter()
    result: dict[str, Any] = {"step": run.step, "checkpoint": run.checkpoint, **run.placement(),
                              "sample": {"ar_steps": sample.ar_steps, "diffusion_steps": sample.diffusion_steps,
                                         "cfg_scale": sample.cfg_scale, "seed": sample.seed}, "splits": {}}
    draw_limits = GenerationLimits(plan=("image",))
    tell_limits = GenerationLimits(max_text_tokens=max_text_tokens, plan=("text",))
    for split, path in (("eval", shards), ("held_out", held_out)):
        if not path:
            continue
        steps = []
        for n, doc in enumerate(iter_documents(path)):
            if num and n >= num:
                break
            steps += story_steps(doc, f"{path} key {doc.key}")
        if not steps:
            raise ValueError(f"{path}: no story with two scenes or more to evaluate")
        drawn = continue_documents(run, [s["draw"] for s in steps], sample, draw_limits, batch_size=batch_size)
        told = continue_documents(run, [s["tell"] for s in steps], sample, tell_limits, batch_size=batch_size)
        rows = []
        for s, image, text in zip(steps, drawn, told):
            picture = next((seg for seg in image if not isinstance(seg, str)), None)
            said = " ".join(seg for seg in text if isinstance(seg, str))
            draw = score_image(picture, s["prev"], s["true_change"], s["next"]) if picture is not None else \
                {m: 0.0 for m in IMAGE_METRICS}
            rows.append({"k": s["k"], "change": s["change"], **{f"draw_{m}": v for m, v in draw.items()},
                         **{f"tell_{m}": v for m, v in score_change_text(said, s["prev"], s["true_change"]).items()},
                         "told": said, "true_text": s["true_change"]["text"]})
        result["splits"][split] = {"shards": str(path), "stories_steps": len(rows), **summarize(rows), "rows": rows}
        log.info("eval documents: %s: %d story steps scored", split, len(rows))
    result["elapsed_s"] = time.perf_counter() - started
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    result["files"] = {"metrics": str(out / "metrics.json")}
    return result


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per split and k (and the split's overall): the draw and tell metrics."""
    rows = []
    metrics = [f"draw_{m}" for m in IMAGE_METRICS] + [f"tell_{m}" for m in TEXT_METRICS]
    for split, summary in result["splits"].items():
        for k, means in [*summary["by_k"].items(), ("all", summary["overall"])]:
            rows.append({"split": split, "k": k, **{m: means.get(m, float("nan")) for m in metrics}})
    return rows
