"""Recover the shapes of a synthetic scene from its pixels.

Used to score *generated* images (noisy, blurry) against the ground truth of
:mod:`mmtrain.data.synthetic`. Per quadrant:

1. every pixel is assigned to the nearest palette colour or the background,
   or to "unknown" when it is far from all of them (artefacts, odd colours);
2. the most frequent palette colour is a shape if it covers enough of the
   quadrant;
3. each pixel gets a soft coverage ``alpha`` in that colour: its projection on
   the background -> colour line (0 = background, 1 = colour). Blur only
   moves coverage around, so ``sum(alpha)`` measures the true area even when
   edges are smeared, where a hard pixel count would shrink the shape;
4. size comes from that area; kind from the fill ratio of the shape's bounding
   box (square ~1.0, circle ~pi/4) and, for triangles, from the vertical
   skewness of the coverage (see ``TRIANGLE_MAX_SKEW``).

On clean samples ``alpha`` is exactly 0 or 1, so this reduces to plain pixel
counting and recovers the ground truth exactly at 32 px and above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mmtrain.data.synthetic import BACKGROUND_RGB, COLOR_RGB, COLORS, EXTENT_FRACTION, POSITIONS

# A pixel farther than this (Euclidean RGB) from every palette colour and the
# background is "unknown". Pixels are otherwise assigned to the *nearest*
# class, so this only needs to reject far-off colours; 100 keeps half-blended
# edge pixels (~100 from both ends for the darkest colours) in play.
COLOR_THRESHOLD = 100.0
# A colour must cover more than this fraction of its quadrant to count as a
# shape. The smallest shape (small triangle) covers ~5%.
MIN_SHAPE_FRACTION = 0.03
# Area fraction of the quadrant separating small from large: the geometric
# mean of the largest small shape (small square, 0.32^2 = 0.10) and the
# smallest large shape (large triangle, 0.76^2 / 2 = 0.29).
SIZE_AREA_THRESHOLD = float(np.sqrt(EXTENT_FRACTION["small"] ** 2 * EXTENT_FRACTION["large"] ** 2 / 2))
# Square/circle boundary on the fill ratio, midway between 1.0 and pi/4.
# Pixelised circles of 5-24 px measure 0.75-0.84.
SQUARE_MIN_FILL = 0.89
# Triangles point up, so their coverage piles up at the bottom: the vertical
# profile (width grows linearly with depth) has skewness -2*sqrt(2)/5 = -0.57,
# while circles and squares are symmetric (0). A symmetric blur keeps the
# third cumulant and only inflates the variance, so the skewness shrinks
# towards 0 but never flips sign -- unlike the fill ratio, which blur pushes
# towards the circle's value when the thin apex fades. -0.2 leaves margin for
# both blur (triangles) and noise (symmetric shapes).
TRIANGLE_MAX_SKEW = -0.2
# Coverage is summed over the bounding box grown by this fraction of the
# quadrant (>= 1 px), to include the coverage that blur spreads outside it.
BOX_MARGIN_FRACTION = 0.1

_CLASS_RGB = np.array([BACKGROUND_RGB] + [COLOR_RGB[c] for c in COLORS], dtype=np.float32)
_BACKGROUND = 0  # class index; palette colour COLORS[i] has class i + 1
_UNKNOWN = -1


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"estimate_shapes: expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"estimate_shapes: expected an HxWx3 uint8 array, got shape {image.shape} dtype {image.dtype}"
        )
    h, w = image.shape[:2]
    if h != w or h < 16 or h % 8 != 0:
        raise ValueError(
            f"estimate_shapes: expected a square image whose side is a multiple of 8 and >= 16, got {w}x{h}"
        )
    return image


def _classify_pixels(image: np.ndarray) -> np.ndarray:
    """HxW class map: 0 background, i+1 for COLORS[i], -1 unknown."""
    diff = image.astype(np.float32)[:, :, None, :] - _CLASS_RGB[None, None, :, :]
    dist = np.sqrt((diff**2).sum(axis=-1))
    classes = dist.argmin(axis=-1)
    return np.where(dist.min(axis=-1) <= COLOR_THRESHOLD, classes, _UNKNOWN)


def _main_run(profile: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the contiguous non-zero run of ``profile`` with the most mass.

    Isolated stray pixels elsewhere in the quadrant would otherwise stretch the
    bounding box and distort the fill ratio.
    """
    best, best_mass, start = (0, 0), -1.0, None
    for i, value in enumerate([*profile, 0]):
        if value > 0 and start is None:
            start = i
        elif value <= 0 and start is not None:
            mass = float(profile[start:i].sum())
            if mass > best_mass:
                best, best_mass = (start, i), mass
            start = None
    return best


def _vertical_skewness(weights: np.ndarray) -> float:
    """Skewness of the row profile of non-negative ``weights`` (0 when degenerate)."""
    profile = weights.sum(axis=1)
    total = profile.sum()
    if total <= 0:
        return 0.0
    rows = np.arange(len(profile), dtype=np.float64)
    mean = (profile * rows).sum() / total
    var = (profile * (rows - mean) ** 2).sum() / total
    if var <= 1e-9:
        return 0.0
    return float((profile * (rows - mean) ** 3).sum() / total / var**1.5)


def _measure_quadrant(pixels: np.ndarray, classes: np.ndarray) -> dict[str, Any] | None:
    """Colour, area (pixels), fill ratio and skewness of the shape in one quadrant, or None."""
    half = classes.shape[0]
    counts = np.bincount(classes[classes > _BACKGROUND], minlength=len(_CLASS_RGB))
    best = int(counts.argmax())
    if counts[best] <= MIN_SHAPE_FRACTION * half * half:
        return None

    background = _CLASS_RGB[_BACKGROUND]
    axis = _CLASS_RGB[best] - background
    alpha = ((pixels.astype(np.float32) - background) @ axis) / float(axis @ axis)
    # Pixels that clearly belong to another palette colour are not this shape.
    alpha[(classes > _BACKGROUND) & (classes != best)] = 0.0
    # The shape's extent is where it is at least half-covered (the half-max
    # contour stays on a straight edge under blur); unknown pixels may count
    # because blur turns edges into off-palette blends.
    inside = (alpha > 0.5) & ((classes == best) | (classes == _UNKNOWN))
    r0, r1 = _main_run(inside.sum(axis=1))
    c0, c1 = _main_run(inside.sum(axis=0))
    if r1 <= r0 or c1 <= c0:
        return None
    margin = max(1, round(BOX_MARGIN_FRACTION * half))
    window = alpha[max(0, r0 - margin) : r1 + margin, max(0, c0 - margin) : c1 + margin]
    # Unclipped, background noise averages out of the area; for the moments
    # clipping keeps a few wild pixels far from the centre from dominating.
    area = float(window.sum())
    return {
        "color": COLORS[best - 1],
        "area": area,
        "fill": area / ((r1 - r0) * (c1 - c0)),
        "skew": _vertical_skewness(np.clip(window, 0.0, 1.0)),
    }


def estimate_shapes(image: Any) -> list[dict[str, str]]:
    """Estimate ``[{"kind", "color", "size", "position"}, ...]`` from pixels.

    ``image`` is a PIL image or an HxWx3 uint8 array, square with a side that
    is a multiple of 8 (>= 32 for reliable results; at 16 px small circles and
    triangles are indistinguishable). Shapes are returned in ``POSITIONS``
    order, at most one per quadrant. Thresholds are the module constants
    ``COLOR_THRESHOLD``, ``MIN_SHAPE_FRACTION``, ``SIZE_AREA_THRESHOLD``,
    ``SQUARE_MIN_FILL``, ``TRIANGLE_MAX_SKEW`` and ``BOX_MARGIN_FRACTION``.
    """
    pixels = _as_array(image)
    classes = _classify_pixels(pixels)
    half = pixels.shape[0] // 2
    shapes = []
    for quadrant, position in enumerate(POSITIONS):
        rows = slice((quadrant // 2) * half, (quadrant // 2 + 1) * half)
        cols = slice((quadrant % 2) * half, (quadrant % 2 + 1) * half)
        found = _measure_quadrant(pixels[rows, cols], classes[rows, cols])
        if found is None:
            continue
        if found["skew"] < TRIANGLE_MAX_SKEW:
            kind = "triangle"
        elif found["fill"] >= SQUARE_MIN_FILL:
            kind = "square"
        else:
            kind = "circle"
        shapes.append(
            {
                "kind": kind,
                "color": found["color"],
                "size": "large" if found["area"] > SIZE_AREA_THRESHOLD * half * half else "small",
                "position": position,
            }
        )
    return shapes
