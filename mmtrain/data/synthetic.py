"""Procedural image-caption generator: the embedded default dataset.

Every sample is a dark-gray square image split into four quadrants; 1-4 of
the quadrants hold one flat-coloured shape (circle, square or triangle, small
or large). The caption describes every shape, e.g.::

    "a small red circle at the top left and a large blue square at the bottom right"

Because the scene is fully described by a handful of discrete attributes, a
model's output can be scored exactly: captions are parsed back with
:func:`parse_caption`, images are read back with
:func:`mmtrain.data.attributes.estimate_shapes`, and both are compared to the
ground truth with :func:`attribute_accuracy`.

Samples are a pure function of ``(cfg.seed, index)``: any worker can generate
any index in any order and get identical pixels, so no download and no shared
state are needed. :func:`write_synthetic_shards` writes them into webdataset shards
(through :func:`mmtrain.data.shards.write_shards`) with a ``stats.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mmtrain.atomic import atomic_write_text
from mmtrain.data.shards import write_shards
from mmtrain.errors import ConfigError

logger = logging.getLogger("mmtrain.data")

STATS_FILENAME = "stats.json"
HOLD_OUT_DIR = "holdout"  # under a synthetic dataset made with a hold-out: the held-out split

KINDS: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
# The image's four quadrants; also the canonical order of shapes in captions.
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

# Saturated palette: every pair of colours is >= 160 apart in RGB (Euclidean)
# and every colour is >= 190 from the background, so a nearest-colour
# classifier with a generous threshold survives noise and blur.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 40),
    "magenta": (220, 40, 220),
    "cyan": (40, 220, 220),
}
BACKGROUND_RGB: tuple[int, int, int] = (32, 32, 32)

# Shape bounding-box side as a fraction of the quadrant side. Small vs large
# areas differ by ~3x even for the smallest large shape (a triangle covers
# half its box), so size is separable from pixel area alone.
EXTENT_FRACTION: dict[str, float] = {"small": 0.32, "large": 0.76}
# Maximum centre jitter as a fraction of the quadrant side (also capped so the
# shape keeps a 1 px margin inside its quadrant).
JITTER_FRACTION = 0.1

FIELDS: tuple[str, ...] = ("kind", "color", "size", "position")
_VOCAB: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
}


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic dataset.

    Attributes:
        image_size: side of the square image in pixels (default 32). Must be a
            multiple of 8 and >= 16; shapes are only reliably recoverable from
            pixels (``estimate_shapes``) at >= 32.
        min_shapes: fewest shapes per image (default 1), >= 1.
        max_shapes: most shapes per image (default 2), <= 4 (one per quadrant).
        seed: dataset seed (default 0), >= 0. Sample ``i`` depends only on
            ``(seed, i)``.
    """

    image_size: int = 32
    min_shapes: int = 1
    max_shapes: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "min_shapes", "max_shapes", "seed"):
            value = getattr(self, name)
            # bool is an int subclass; reject it so `True` is not a size of 1.
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ConfigError(f"SyntheticConfig.{name}: expected an int, got {value!r}")
        if self.image_size < 16 or self.image_size % 8 != 0:
            raise ConfigError(
                f"SyntheticConfig.image_size: expected a multiple of 8 that is >= 16, "
                f"got {self.image_size}"
            )
        if not 1 <= self.min_shapes <= self.max_shapes <= len(POSITIONS):
            raise ConfigError(
                f"SyntheticConfig.min_shapes/max_shapes: expected "
                f"1 <= min_shapes <= max_shapes <= {len(POSITIONS)}, "
                f"got min_shapes={self.min_shapes}, max_shapes={self.max_shapes}"
            )
        if self.seed < 0:
            raise ConfigError(f"SyntheticConfig.seed: expected an int >= 0, got {self.seed}")


def shape_extent(size: str, image_size: int) -> int:
    """Bounding-box side in pixels of a ``size`` shape in an ``image_size`` image."""
    return max(2, round(EXTENT_FRACTION[size] * image_size / 2))


def _check_field(shape: Mapping[str, Any], field: str) -> str:
    value = shape.get(field)
    if value not in _VOCAB[field]:
        raise ValueError(
            f"shape {dict(shape)!r}: field {field!r} must be one of {_VOCAB[field]}, got {value!r}"
        )
    return value


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    # PIL boxes are inclusive; draw.* calls do not antialias, so every shape
    # pixel is exactly the palette colour.
    x0, y0, x1, y1 = box
    if kind == "square":
        draw.rectangle(box, fill=rgb)
    elif kind == "circle":
        draw.ellipse(box, fill=rgb)
    else:  # upward-pointing isosceles triangle filling half its box
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=rgb)


def draw_shape_in_quadrant(draw: ImageDraw.ImageDraw, kind: str, color: str, size: str, position: str,
                           image_size: int, rng: np.random.Generator) -> dict[str, Any]:
    """Draw one ``size`` ``color`` ``kind`` in the quadrant ``position`` of an ``image_size`` image, its
    centre jittered by two draws from ``rng``; return its shape dict (kind, color, size, position,
    ``center`` [x, y] in continuous pixel coordinates, ``extent_px``: bounding-box side in pixels).

    The one drawing routine of synthetic scenes: :func:`generate_sample` and the stories of
    :mod:`mmtrain.data.stories` both draw through it, so both read back alike with ``estimate_shapes``.
    """
    half = image_size // 2
    quadrant = POSITIONS.index(position)
    extent = shape_extent(size, image_size)
    max_jitter = max(0, min(round(JITTER_FRACTION * half), (half - extent) // 2 - 1))
    jx, jy = (int(j) for j in rng.integers(-max_jitter, max_jitter + 1, size=2))
    qx, qy = (quadrant % 2) * half, (quadrant // 2) * half
    x0 = qx + (half - extent) // 2 + jx
    y0 = qy + (half - extent) // 2 + jy
    _draw_shape(draw, kind, (x0, y0, x0 + extent - 1, y0 + extent - 1), COLOR_RGB[color])
    return {
        "kind": kind,
        "color": color,
        "size": size,
        "position": position,
        "center": [x0 + extent / 2, y0 + extent / 2],
        "extent_px": extent,
    }


def synthetic_class(shape: dict) -> int:
    """Class label of a sample for class-conditional training: kind x colour of its first shape
    (``len(KINDS) * len(COLORS)`` = 18 classes)."""
    return KINDS.index(shape["kind"]) * len(COLORS) + COLORS.index(shape["color"])


def generate_sample(index: int, cfg: SyntheticConfig) -> dict[str, Any]:
    """Generate sample ``index`` of the dataset described by ``cfg``.

    Returns ``{"key": f"{index:08d}", "image": PIL RGB image, "caption": str,
    "attributes": dict}`` where ``attributes`` is JSON-serialisable::

        {"seed", "index", "image_size", "background": [r, g, b],
         "shapes": [{"kind", "color", "size", "position",
                     "center": [x, y], "extent_px": int}, ...]}

    ``shapes`` are in ``POSITIONS`` order. ``center`` is in continuous pixel
    coordinates (pixel ``i`` spans ``[i, i + 1)``); ``extent_px`` is the side of
    the shape's bounding box in pixels.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"generate_sample: index must be an int >= 0, got {index!r}")
    index = int(index)
    # Seeding from (seed, index) makes every sample independent of the others,
    # so generation order and worker sharding never change the data.
    rng = np.random.default_rng([cfg.seed, index])
    size = cfg.image_size

    num = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    quadrants = sorted(int(q) for q in rng.choice(len(POSITIONS), size=num, replace=False))

    image = Image.new("RGB", (size, size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    shapes = []
    for quadrant in quadrants:
        kind = KINDS[int(rng.integers(len(KINDS)))]
        color = COLORS[int(rng.integers(len(COLORS)))]
        size_name = SIZES[int(rng.integers(len(SIZES)))]
        shapes.append(draw_shape_in_quadrant(draw, kind, color, size_name, POSITIONS[quadrant], size, rng))

    attributes = {
        "seed": int(cfg.seed),
        "index": index,
        "image_size": size,
        "background": list(BACKGROUND_RGB),
        "shapes": shapes,
    }
    return {
        "key": f"{index:08d}",
        "image": image,
        "caption": caption_from_shapes(shapes),
        "attributes": attributes,
    }


def caption_from_shapes(shapes: Iterable[Mapping[str, Any]]) -> str:
    """Caption for ``shapes`` (dicts with kind/color/size/position; extra keys ignored).

    Shapes are described in ``POSITIONS`` order and joined with " and ", e.g.
    "a small red circle at the top left and a large blue square at the bottom right".
    Raises ValueError naming the field if a value is outside the vocabulary.
    """
    phrases = []
    for shape in shapes:
        kind, color, size, position = (_check_field(shape, f) for f in FIELDS)
        phrases.append((POSITIONS.index(position), f"a {size} {color} {kind} at the {position}"))
    # Stable sort: duplicates at one position (never generated) keep input order.
    return " and ".join(text for _, text in sorted(phrases, key=lambda p: p[0]))


def _alternation(words: Sequence[str]) -> str:
    # Multi-word entries ("top left") accept any run of whitespace between words.
    return "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)


_PHRASE_RE = re.compile(
    rf"\b(?P<size>{_alternation(SIZES)})\s+(?P<color>{_alternation(COLORS)})\s+"
    rf"(?P<kind>{_alternation(KINDS)})\s+at\s+the\s+(?P<position>{_alternation(POSITIONS)})\b",
    re.IGNORECASE,
)


def parse_caption(text: str) -> list[dict[str, str]]:
    """Recover ``[{"kind", "color", "size", "position"}, ...]`` from a caption.

    The inverse of :func:`caption_from_shapes`, tolerant to case and extra
    whitespace. Anything that is not a complete "<size> <color> <kind> at the
    <position>" phrase is skipped, so model-generated garbage yields ``[]``
    rather than an error. Shapes are returned in the order they appear.
    """
    shapes = []
    for match in _PHRASE_RE.finditer(text):
        shape = {}
        for field in FIELDS:
            shape[field] = " ".join(match.group(field).lower().split())
        shapes.append(shape)
    return shapes


ACCURACY_KEYS: tuple[str, ...] = ("kind", "color", "size", "exact", "count")


def _shape_tuple(shape: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(shape.get(f) for f in FIELDS)


def _first_by_position(shapes: Sequence[Mapping[str, Any]]) -> dict[Any, Mapping[str, Any]]:
    """position -> the first shape there: a prediction is scored by its first shape per quadrant."""
    by_position: dict[Any, Mapping[str, Any]] = {}
    for shape in shapes:
        by_position.setdefault(shape.get("position"), shape)
    return by_position


def attribute_accuracy(
    pred_shapes: Sequence[Mapping[str, Any]], true_shapes: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Score one sample's predicted shapes against the ground truth.

    Returns floats in [0, 1] under ``ACCURACY_KEYS``:

    - ``kind``/``color``/``size``: fraction of true shapes whose field matches
      the (first) predicted shape at the same position; no prediction there
      counts as wrong. With no true shapes these are 1.0 (vacuous; extras are
      penalised by ``exact`` and ``count``).
    - ``exact``: 1.0 iff the predicted shapes equal the true ones on all four
      fields as a multiset (nothing missing, nothing extra).
    - ``count``: 1.0 iff the number of shapes matches.
    """
    by_position = _first_by_position(pred_shapes)
    result: dict[str, float] = {}
    for field in ("kind", "color", "size"):
        if not true_shapes:
            result[field] = 1.0
            continue
        hits = 0
        for true in true_shapes:
            pred = by_position.get(true.get("position"))
            hits += pred is not None and pred.get(field) == true.get(field)
        result[field] = hits / len(true_shapes)
    exact = sorted(map(_shape_tuple, pred_shapes), key=repr) == sorted(map(_shape_tuple, true_shapes), key=repr)
    result["exact"] = float(exact)
    result["count"] = float(len(pred_shapes) == len(true_shapes))
    return result


def kind_accuracy_by_size(
    pred_shapes: Sequence[Sequence[Mapping[str, Any]]], true_shapes: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, float]:
    """``{size: accuracy}``: over every true shape of that size in all samples (pooled, not per
    sample), the fraction whose kind the (first) predicted shape at its position has. Sizes
    with no true shape are left out. Separates what the budget limits: a small shape's kind
    is a handful of pixels."""
    hits = {size: 0 for size in SIZES}
    total = {size: 0 for size in SIZES}
    for preds, truths in zip(pred_shapes, true_shapes, strict=True):
        by_position = _first_by_position(preds)
        for true in truths:
            pred = by_position.get(true.get("position"))
            total[true["size"]] += 1
            hits[true["size"]] += pred is not None and pred.get("kind") == true.get("kind")
    return {size: hits[size] / total[size] for size in SIZES if total[size]}


def mean_accuracy(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average per-sample :func:`attribute_accuracy` dicts key by key.

    Raises ValueError on an empty list (the mean of nothing is undefined) or
    when the dicts do not all have the same keys.
    """
    if not results:
        raise ValueError("mean_accuracy: expected at least one accuracy dict, got an empty list")
    keys = set(results[0])
    for i, r in enumerate(results):
        if set(r) != keys:
            raise ValueError(f"mean_accuracy: entry {i} has keys {sorted(r)}, expected {sorted(keys)}")
    return {k: float(sum(r[k] for r in results) / len(results)) for k in results[0]}


# --------------------------------------------------------------------------- compositional hold-out


def parse_hold_out(text: str | Sequence[str]) -> list[dict[str, str]]:
    """``"red triangle,large blue circle"`` -> ``[{"color": "red", "kind": "triangle"}, {...}]``.

    Each comma-separated entry names attribute values (kind, colour, size; a position as
    ``top left`` etc. too), at most one per attribute and at least one. A shape matches an
    entry when it has every value the entry names. ValueError naming the entry otherwise.
    """
    entries = [e.strip() for e in (text.split(",") if isinstance(text, str) else text) if e.strip()]
    combos = []
    for entry in entries:
        combo: dict[str, str] = {}
        rest = " ".join(entry.lower().split())
        for field in ("position", "size", "color", "kind"):  # positions first: they are two words
            for value in sorted(_VOCAB[field], key=len, reverse=True):
                if re.search(rf"(^|\s){re.escape(value)}(\s|$)", rest):
                    if field in combo:
                        raise ValueError(f"hold-out entry {entry!r}: names two values of {field}")
                    combo[field] = value
                    rest = re.sub(rf"(^|\s){re.escape(value)}(\s|$)", " ", rest, count=1).strip()
        if rest or not combo:
            raise ValueError(f"hold-out entry {entry!r}: {'unknown words ' + repr(rest) if rest else 'names no attribute'}"
                             f" (expected values of kind {list(KINDS)}, color {list(COLORS)}, size {list(SIZES)}, "
                             f"position {list(POSITIONS)}, e.g. 'red triangle' or 'large blue circle')")
        if combo in combos:
            raise ValueError(f"hold-out entry {entry!r}: given twice")
        combos.append(combo)
    return combos


def hold_out_name(combo: Mapping[str, str]) -> str:
    """The entry as text, attributes in caption order (``large blue circle``)."""
    return " ".join(combo[f] for f in ("size", "color", "kind", "position") if f in combo)


def is_held_out(shapes: Iterable[Mapping[str, Any]], hold_out: Sequence[Mapping[str, str]]) -> bool:
    """True when some shape of the scene has every value of some hold-out entry."""
    return any(all(shape.get(f) == v for f, v in combo.items()) for shape in shapes for combo in hold_out)


def _histogram(values: Iterable[int]) -> dict[str, int]:
    # JSON object keys are strings; sort numerically so the file reads naturally.
    counts = Counter(values)
    return {str(k): counts[k] for k in sorted(counts)}


def write_synthetic_shards(
    out_dir: str | os.PathLike[str],
    num: int,
    cfg: SyntheticConfig,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    progress: bool = True,
    hold_out: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """Generate synthetic samples ``0..num-1`` into shards plus ``stats.json``.

    Args:
        out_dir: output directory (created if missing).
        num: number of samples, >= 1.
        cfg: the synthetic dataset config (image size, shape counts, seed).
        samples_per_shard, image_format, progress: as in :func:`write_shards`.
        hold_out: attribute combinations (:func:`~mmtrain.data.synthetic.parse_hold_out`)
            kept out of these shards: a sample with a shape that matches one goes to the
            held-out split ``out_dir/holdout`` instead (its own shards and ``stats.json``),
            which then holds only such samples. Default: none.

    Returns:
        The stats dict, identical to what is written (atomically) to
        ``out_dir/stats.json``:

        - ``num_samples``, ``num_shards``, ``shard_files`` (basenames, in order),
          ``samples_per_shard``, ``image_format``;
        - the config: ``image_size``, ``seed``, ``min_shapes``, ``max_shapes``;
        - ``counts``: ``{"kind"|"color"|"size"|"position": {value: count}}``
          over all shapes, every vocabulary value listed (zeros included);
        - ``shape_count_histogram`` and ``caption_length_histogram`` (words):
          ``{str(n): samples}``, numerically sorted;
        - ``caption_length_min``, ``caption_length_max``, ``caption_length_mean``;
        - ``elapsed_s`` and ``samples_per_s``: generation + writing throughput.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"write_synthetic_shards: num must be an int >= 1, got {num!r}")
    out_dir = os.fspath(out_dir)
    counts = {field: Counter() for field in ("kind", "color", "size", "position")}
    shape_counts: list[int] = []
    caption_lengths: list[int] = []

    held: list[dict[str, Any]] = []

    def generate() -> Iterator[dict[str, Any]]:
        # Stats are gathered on the fly so samples are never held in memory (held-out ones are: a few %).
        for index in range(num):
            sample = generate_sample(index, cfg)
            shapes = sample["attributes"]["shapes"]
            if hold_out and is_held_out(shapes, hold_out):
                sample["label"] = synthetic_class(shapes[0])
                held.append(sample)
                continue
            sample["label"] = synthetic_class(shapes[0])
            for shape in shapes:
                for field, counter in counts.items():
                    counter[shape[field]] += 1
            shape_counts.append(len(shapes))
            caption_lengths.append(len(sample["caption"].split()))
            yield sample

    start = time.perf_counter()
    paths = write_shards(generate(), out_dir, samples_per_shard, image_format=image_format, progress=progress)
    elapsed = time.perf_counter() - start
    if not paths:
        raise ValueError(f"write_synthetic_shards: every one of the {num} samples matches the hold-out "
                         f"{[hold_out_name(c) for c in hold_out]}; nothing is left to train on")
    num_kept = num - len(held)

    vocab = {"kind": KINDS, "color": COLORS, "size": SIZES, "position": POSITIONS}
    stats: dict[str, Any] = {
        "num_samples": num_kept,
        "num_shards": len(paths),
        "shard_files": [os.path.basename(p) for p in paths],
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "min_shapes": cfg.min_shapes,
        "max_shapes": cfg.max_shapes,
        # Every vocabulary entry is listed, zeros included, so a missing class is visible.
        "counts": {field: {v: counts[field][v] for v in vocab[field]} for field in vocab},
        "shape_count_histogram": _histogram(shape_counts),
        "caption_length_histogram": _histogram(caption_lengths),
        "caption_length_min": min(caption_lengths),
        "caption_length_max": max(caption_lengths),
        "caption_length_mean": sum(caption_lengths) / len(caption_lengths),
        "elapsed_s": elapsed,
        # Guard the division: JSON has no infinity.
        "samples_per_s": num / max(elapsed, 1e-9),
    }
    if hold_out:
        held_dir = os.path.join(out_dir, HOLD_OUT_DIR)
        held_paths = write_shards(held, held_dir, samples_per_shard, image_format=image_format, progress=False)
        stats.update(hold_out=[hold_out_name(c) for c in hold_out], generated=num, held_out_samples=len(held))
        held_stats = {"num_samples": len(held), "num_shards": len(held_paths),
                      "shard_files": [os.path.basename(p) for p in held_paths], "hold_out": stats["hold_out"],
                      "split": "held out: only samples with a held-out combination", "seed": cfg.seed,
                      "image_size": cfg.image_size}
        if held:
            atomic_write_text(os.path.join(held_dir, STATS_FILENAME), json.dumps(held_stats, indent=2) + "\n")
    stats_path = os.path.join(out_dir, STATS_FILENAME)
    atomic_write_text(stats_path, json.dumps(stats, indent=2) + "\n")
    logger.info(
        "wrote %d synthetic samples in %d shard(s) to %s in %.2fs (%.1f samples/s)%s",
        num_kept, len(paths), out_dir, elapsed, stats["samples_per_s"],
        f"; {len(held)} held out ({', '.join(stats['hold_out'])}) to {os.path.join(out_dir, HOLD_OUT_DIR)}" if hold_out else "",
    )
    return stats
