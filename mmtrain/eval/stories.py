"""Scoring of shape stories (:mod:`mmtrain.data.stories`) against their ground truth; no model here.

Two directions of one step of a story (scene k, the change, scene k + 1):

- drawing: a predicted image of scene k + 1, read back with
  :func:`mmtrain.data.attributes.estimate_shapes`, scored by :func:`score_image` on whether the
  change happened (``attribute``), whether everything else stayed put (``consistency``) and
  whether the whole scene is right (``exact``);
- telling: a predicted change text, parsed back with :func:`mmtrain.data.stories.parse_change`,
  scored by :func:`score_change_text` on the change kind, the shape it refers to, the new value
  and the whole change.

Scores are floats in [0, 1] so that :func:`summarize` can average rows of either kind, overall,
per scene index ``k`` and per change kind: where a model fails (later scenes, one kind of change,
the held-out kind) is the point of the benchmark.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmtrain.data.attributes import estimate_shapes
from mmtrain.data.stories import SHAPE_FIELDS, parse_change, parse_change_words, resolve_reference

IMAGE_METRICS: tuple[str, ...] = ("attribute", "consistency", "consistency_color", "exact")
TEXT_METRICS: tuple[str, ...] = ("kind", "object", "value", "exact")


def _fields(shape: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(shape[f] for f in SHAPE_FIELDS)


def score_image(pred_image: Any, prev_scene: Sequence[Mapping[str, Any]], change: Mapping[str, Any],
                true_scene: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Score a predicted image of the scene after ``change`` (``prev_scene`` -> ``true_scene``).

    ``pred_image``: a PIL image or HxWx3 uint8 array (as :func:`estimate_shapes` takes). Returns:

    - ``attribute``: 1.0 when the change happened: move: the shape (same kind, colour, size) is at
      the new position and its old quadrant is empty; appear: the new shape is at its position;
      recolor / resize: the shape is at its place with the new colour / size (other fields kept);
      disappear: its quadrant is empty.
    - ``consistency``: the fraction of the shapes the change leaves alone that are still there with
      the same kind, colour, size and position (1.0 when there are none).
    - ``consistency_color``: the same with colour, size and position only (the kind of a small
      shape is what a small model draws last: this shows whether it keeps the rest meanwhile).
    - ``exact``: 1.0 when the estimated scene equals ``true_scene``.
    """
    pred = estimate_shapes(pred_image)
    at = {s["position"]: _fields(s) for s in pred}
    kind, shape, value = change["kind"], change.get("shape"), change.get("value")
    if kind == "appear":
        attribute = at.get(value["position"]) == _fields(value)
    elif kind == "move":
        attribute = at.get(value) == _fields({**shape, "position": value}) and shape["position"] not in at
    elif kind == "recolor":
        attribute = at.get(shape["position"]) == _fields({**shape, "color": value})
    elif kind == "resize":
        attribute = at.get(shape["position"]) == _fields({**shape, "size": value})
    elif kind == "disappear":
        attribute = shape["position"] not in at
    else:
        raise ValueError(f"score_image: change kind {kind!r} is none of the known change kinds")
    changed = None if shape is None else _fields(shape)
    untouched = [_fields(s) for s in prev_scene if _fields(s) != changed]
    where = SHAPE_FIELDS.index("position")
    kept = sum(at.get(s[where]) == s for s in untouched)
    no_kind = [i for i, f in enumerate(SHAPE_FIELDS) if f != "kind"]
    kept_color = sum(s[where] in at and [at[s[where]][i] for i in no_kind] == [s[i] for i in no_kind] for s in untouched)
    exact = sorted(_fields(s) for s in pred) == sorted(_fields(s) for s in true_scene)
    return {"attribute": float(attribute), "consistency": kept / len(untouched) if untouched else 1.0,
            "consistency_color": kept_color / len(untouched) if untouched else 1.0, "exact": float(exact)}


def score_change_text(pred_text: str, prev_scene: Sequence[Mapping[str, Any]],
                      true_change: Mapping[str, Any]) -> dict[str, float]:
    """Score a predicted change text against ``true_change`` of ``prev_scene``. Returns:

    - ``kind``: the change kind is right;
    - ``object``: the text's referring expression picks the true shape out of ``prev_scene``
      (for a true appear, which refers to no shape: the text states an appear too);
    - ``value``: the new position / colour / size / new shape is right (disappear has no value:
      this equals ``kind``);
    - ``exact``: the text parses (:func:`parse_change`) to the true change: kind, shape and value.

    A text that is no change sentence scores 0 on all four.
    """
    words = parse_change_words(pred_text)
    if words is None:
        return dict.fromkeys(TEXT_METRICS, 0.0)
    true_kind = true_change["kind"]
    kind = words["kind"] == true_kind
    if true_kind == "appear":
        obj = words["kind"] == "appear"
    else:
        obj = words["ref"] is not None and resolve_reference(words["ref"], prev_scene) == true_change["shape"]
    value = kind if true_kind == "disappear" else words["value"] == true_change["value"]
    parsed = parse_change(pred_text, prev_scene)
    exact = parsed is not None and all(parsed[k] == true_change.get(k) for k in ("kind", "shape", "value"))
    return {"kind": float(kind), "object": float(obj), "value": float(value), "exact": float(exact)}


def _means(rows: Sequence[Mapping[str, Any]], skip: set[str]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of every metric over ``rows``: overall, per scene index and per change kind.

    Each row is one scored step: ``{"k": index of the predicted scene (or of the change) in its
    story, "change": the change kind, metric: float, ...}`` (the dicts of :func:`score_image` or
    :func:`score_change_text` with those two keys added; a metric missing from a row is left out
    of that row's means). Returns ``{"count", "overall": {metric: mean}, "by_k": {str(k): {...}},
    "by_change": {kind: {...}}}``. ValueError naming the row when ``k`` or ``change`` is missing.
    """
    if not rows:
        raise ValueError("summarize: expected at least one scored row, got none")
    for n, row in enumerate(rows):
        if "k" not in row or "change" not in row:
            raise ValueError(f"summarize: row {n} {dict(row)!r} lacks 'k' (scene index) or 'change' (change kind)")
    skip = {"k", "change"}
    by_k = {str(k): _means([r for r in rows if r["k"] == k], skip) for k in sorted({r["k"] for r in rows})}
    by_change = {c: _means([r for r in rows if r["change"] == c], skip) for c in sorted({r["change"] for r in rows})}
    return {"count": len(rows), "overall": _means(rows, skip), "by_k": by_k, "by_change": by_change}
