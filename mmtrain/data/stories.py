"""Shape stories: a synthetic interleaved-document benchmark with exact ground truth.

A story is a short sequence of synthetic scenes (:mod:`mmtrain.data.synthetic`: a dark square
split into four quadrants, at most one flat-coloured shape per quadrant) in which one thing
changes at a time::

    "a small red circle at the top left and a large blue square at the bottom right" <image 1>
    "the circle moves to the top right" <image 2>
    "the blue square shrinks" <image 3>

An interleaved model is asked to continue such a document: draw the next scene from a change
text (scored by :func:`mmtrain.eval.stories.score_image`), or say what changed between two
scenes (scored by :func:`mmtrain.eval.stories.score_change_text`). Because every scene and
every change is a handful of discrete attributes, both directions are scored exactly, and a
change kind can be held out of training entirely (:func:`write_story_shards`) to test
compositional generalisation.

Change kinds (:data:`CHANGE_KINDS`) and their texts:

- ``move``: "the red circle moves to the bottom right" (to an empty quadrant);
- ``appear``: "a small blue square appears at the top left" (in an empty quadrant);
- ``recolor``: "the triangle turns green";
- ``resize``: "the red circle grows" / "the red circle shrinks";
- ``disappear``: "the large square disappears" (never the last shape: scenes are never empty).

A referring expression ("the circle", "the red circle", "the small red circle") is the
shortest of ``the {kind}``, ``the {color} {kind}``, ``the {size} {color} {kind}`` that picks
exactly one shape of the current scene; no scene ever holds two shapes equal in size, colour
and kind, so the longest form is always unique.

A story is a pure function of ``(cfg.seed, index)``, like a synthetic sample: any worker can
generate any story in any order. Data structures (all JSON-serialisable):

- a shape: ``{"kind", "color", "size", "position"}`` (the vocabulary of ``synthetic``);
- a scene: a list of shapes in ``POSITIONS`` order;
- a change: ``{"kind": one of CHANGE_KINDS, "text": str, "shape": the shape referred to
  (None for appear), "value": the new position (move) / the new shape (appear) / the new
  colour (recolor) / the new size (resize) / None (disappear)}``.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmtrain.data.documents import DocImage, Document, write_document_shards
from mmtrain.data.synthetic import (BACKGROUND_RGB, COLORS, HOLD_OUT_DIR, KINDS, POSITIONS, SIZES,
                                    caption_from_shapes, draw_shape_in_quadrant)
from mmtrain.errors import ConfigError

logger = logging.getLogger("mmtrain.data")

CHANGE_KINDS: tuple[str, ...] = ("move", "appear", "recolor", "resize", "disappear")
SHAPE_FIELDS: tuple[str, ...] = ("kind", "color", "size", "position")
# Tag mixed into every story's seed so story i and synthetic sample i draw from different streams.
_STORY_STREAM = 0x5701


@dataclass
class StoryConfig:
    """Knobs of the shape-story dataset.

    Attributes:
        image_size: side of each square scene image in pixels (default 64); a multiple of 8
            and >= 32 (``estimate_shapes`` reads shapes back exactly from 32 px up).
        seed: dataset seed (default 0), >= 0. Story ``i`` depends only on ``(seed, i)``.
        min_shapes / max_shapes: shapes in the first scene (default 1-3), 1 <= min <= max <= 4.
        min_changes / max_changes: changes per story (default 1-3, so 2-4 scenes), 1 <= min <= max.
    """

    image_size: int = 64
    seed: int = 0
    min_shapes: int = 1
    max_shapes: int = 3
    min_changes: int = 1
    max_changes: int = 3

    def __post_init__(self) -> None:
        for name in ("image_size", "seed", "min_shapes", "max_shapes", "min_changes", "max_changes"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ConfigError(f"StoryConfig.{name}: expected an int, got {value!r}")
        if self.image_size < 32 or self.image_size % 8:
            raise ConfigError(f"StoryConfig.image_size: expected a multiple of 8 that is >= 32, got {self.image_size}")
        if self.seed < 0:
            raise ConfigError(f"StoryConfig.seed: expected an int >= 0, got {self.seed}")
        if not 1 <= self.min_shapes <= self.max_shapes <= len(POSITIONS):
            raise ConfigError(f"StoryConfig.min_shapes/max_shapes: expected 1 <= min_shapes <= max_shapes <= "
                              f"{len(POSITIONS)}, got {self.min_shapes}, {self.max_shapes}")
        if not 1 <= self.min_changes <= self.max_changes:
            raise ConfigError(f"StoryConfig.min_changes/max_changes: expected 1 <= min_changes <= max_changes, "
                              f"got {self.min_changes}, {self.max_changes}")


@dataclass
class Story:
    """One story: ``scenes[k]`` is scene k (a list of shape dicts in ``POSITIONS`` order) and
    ``changes[k]`` turns scene k into scene k + 1, so ``len(scenes) == len(changes) + 1``."""

    seed: int
    index: int
    image_size: int
    scenes: list[list[dict[str, str]]]
    changes: list[dict[str, Any]]

    @property
    def change_kinds(self) -> list[str]:
        return [c["kind"] for c in self.changes]


# ---------------------------------------------------------------------------- scenes and references


def _shape(kind: str, color: str, size: str, position: str) -> dict[str, str]:
    return {"kind": kind, "color": color, "size": size, "position": position}


def _identity(shape: Mapping[str, Any]) -> tuple[str, str, str]:
    """What must be unique within a scene: (size, color, kind)."""
    return shape["size"], shape["color"], shape["kind"]


def _sorted_scene(scene: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return sorted(({f: s[f] for f in SHAPE_FIELDS} for s in scene), key=lambda s: POSITIONS.index(s["position"]))


def _matches(shape: Mapping[str, Any], words: Mapping[str, str | None]) -> bool:
    return all(shape[f] == v for f, v in words.items() if v is not None)


def referring_expression(shape: Mapping[str, Any], scene: Sequence[Mapping[str, Any]]) -> str:
    """The shortest of "the {kind}", "the {color} {kind}", "the {size} {color} {kind}" that picks
    exactly ``shape`` out of ``scene``; ValueError when even the longest does not (two shapes equal
    in size, colour and kind, or ``shape`` not in the scene)."""
    for fields in (("kind",), ("color", "kind"), ("size", "color", "kind")):
        words = {f: shape[f] for f in fields}
        if sum(_matches(s, words) for s in scene) == 1 and _matches(shape, words):
            return "the " + " ".join(shape[f] for f in fields)
    raise ValueError(f"referring_expression: shape {dict(shape)!r} is not exactly one shape of scene {list(scene)!r}")


def _empty_positions(scene: Sequence[Mapping[str, Any]]) -> list[str]:
    taken = {s["position"] for s in scene}
    return [p for p in POSITIONS if p not in taken]


# ---------------------------------------------------------------------------- changes: words <-> structure


def describe_change(kind: str, scene: Sequence[Mapping[str, Any]], shape: Mapping[str, Any] | None,
                    value: Any) -> str:
    """The text of a change of ``scene`` (see the module docstring): ``shape`` is the shape referred
    to (None for appear), ``value`` the new position / shape / colour / size (None for disappear)."""
    if kind == "appear":
        return f"a {value['size']} {value['color']} {value['kind']} appears at the {value['position']}"
    if kind not in CHANGE_KINDS:
        raise ValueError(f"describe_change: kind {kind!r}, expected one of {list(CHANGE_KINDS)}")
    ref = referring_expression(shape, scene)
    if kind == "move":
        return f"{ref} moves to the {value}"
    if kind == "recolor":
        return f"{ref} turns {value}"
    if kind == "resize":
        return f"{ref} {'grows' if value == 'large' else 'shrinks'}"
    return f"{ref} disappears"


def _alternation(words: Sequence[str]) -> str:
    return "|".join(r"\s+".join(map(re.escape, w.split())) for w in sorted(words, key=len, reverse=True))


_REF = (rf"the\s+(?:(?P<size>{_alternation(SIZES)})\s+)?(?:(?P<color>{_alternation(COLORS)})\s+)?"
        rf"(?P<kind>{_alternation(KINDS)})")
_CHANGE_RES: dict[str, re.Pattern] = {
    "appear": re.compile(rf"an?\s+(?P<new_size>{_alternation(SIZES)})\s+(?P<new_color>{_alternation(COLORS)})\s+"
                         rf"(?P<new_kind>{_alternation(KINDS)})\s+appears\s+(?:at|in)\s+the\s+"
                         rf"(?P<new_position>{_alternation(POSITIONS)})", re.IGNORECASE),
    "move": re.compile(rf"{_REF}\s+moves\s+to\s+the\s+(?P<new_position>{_alternation(POSITIONS)})", re.IGNORECASE),
    "recolor": re.compile(rf"{_REF}\s+turns\s+(?P<new_color>{_alternation(COLORS)})", re.IGNORECASE),
    "resize": re.compile(rf"{_REF}\s+(?P<verb>grows|shrinks)", re.IGNORECASE),
    "disappear": re.compile(rf"{_REF}\s+disappears", re.IGNORECASE),
}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def parse_change_words(text: str) -> dict[str, Any] | None:
    """The change a text states, before it is resolved against a scene: ``{"kind", "ref", "value"}``
    where ``ref`` is the referring expression's ``{"kind", "color", "size"}`` (None where not said;
    None for appear) and ``value`` as in a change. None when the text is no change sentence.
    Tolerant to case, extra whitespace and a final full stop."""
    stripped = text.strip().rstrip(".").strip()
    for kind, pattern in _CHANGE_RES.items():
        match = pattern.fullmatch(stripped)
        if not match:
            continue
        groups = {k: _norm(v) if v else None for k, v in match.groupdict().items()}
        ref = None if kind == "appear" else {f: groups[f] for f in ("kind", "color", "size")}
        if kind == "appear":
            value: Any = _shape(groups["new_kind"], groups["new_color"], groups["new_size"], groups["new_position"])
        elif kind == "move":
            value = groups["new_position"]
        elif kind == "recolor":
            value = groups["new_color"]
        elif kind == "resize":
            value = "large" if groups["verb"] == "grows" else "small"
        else:
            value = None
        return {"kind": kind, "ref": ref, "value": value}
    return None


def resolve_reference(ref: Mapping[str, str | None], scene: Sequence[Mapping[str, Any]]) -> dict[str, str] | None:
    """The one shape of ``scene`` that the referring expression ``ref`` (``{"kind", "color", "size"}``,
    None where not said) picks, or None when it picks none or several."""
    found = [s for s in scene if _matches(s, ref)]
    return {f: found[0][f] for f in SHAPE_FIELDS} if len(found) == 1 else None


def parse_change(text: str, scene: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``text`` back to a change of ``scene`` (``{"kind", "text", "shape", "value"}``; ``text``
    lower-cased, whitespace collapsed, no final full stop). The exact inverse of
    :func:`describe_change` on generated text. None when the text is no change sentence or its
    referring expression does not pick exactly one shape of ``scene``. Whether the change can be
    applied (an empty target quadrant, ...) is :func:`apply_change`'s to check."""
    words = parse_change_words(text)
    if words is None:
        return None
    shape = None
    if words["kind"] != "appear":
        shape = resolve_reference(words["ref"], scene)
        if shape is None:
            return None
    return {"kind": words["kind"], "text": _norm(text.strip().rstrip(".")), "shape": shape, "value": words["value"]}


def apply_change(scene: Sequence[Mapping[str, Any]], change: Mapping[str, Any]) -> list[dict[str, str]]:
    """The scene after ``change`` (a new list in ``POSITIONS`` order; ``scene`` is not modified).
    ValueError naming the change when it cannot apply: its shape is not in the scene, the target
    quadrant is taken, the new value equals the old one, or the result would hold two shapes
    equal in size, colour and kind."""
    scene = _sorted_scene(scene)
    kind, value = change.get("kind"), change.get("value")
    where = f"apply_change: change {dict(change)!r}"
    if kind not in CHANGE_KINDS:
        raise ValueError(f"{where}: kind must be one of {list(CHANGE_KINDS)}")
    if kind == "appear":
        if not isinstance(value, Mapping) or any(value.get(f) is None for f in SHAPE_FIELDS):
            raise ValueError(f"{where}: value must be the new shape with fields {list(SHAPE_FIELDS)}")
        if value["position"] not in _empty_positions(scene):
            raise ValueError(f"{where}: the {value['position']} is not empty")
        result = scene + [{f: value[f] for f in SHAPE_FIELDS}]
    else:
        shape = change.get("shape")
        target = {f: shape[f] for f in SHAPE_FIELDS} if isinstance(shape, Mapping) else None
        if target not in scene:
            raise ValueError(f"{where}: its shape is not in the scene {scene!r}")
        rest = [s for s in scene if s != target]
        if kind == "move":
            if value not in _empty_positions(scene):
                raise ValueError(f"{where}: value must be an empty position of {POSITIONS}, got {value!r}")
            result = rest + [{**target, "position": value}]
        elif kind == "recolor":
            if value not in COLORS or value == target["color"]:
                raise ValueError(f"{where}: value must be a colour of {COLORS} other than {target['color']!r}")
            result = rest + [{**target, "color": value}]
        elif kind == "resize":
            if value not in SIZES or value == target["size"]:
                raise ValueError(f"{where}: value must be a size of {SIZES} other than {target['size']!r}")
            result = rest + [{**target, "size": value}]
        else:
            result = rest
    identities = [_identity(s) for s in result]
    if len(set(identities)) != len(identities):
        raise ValueError(f"{where}: the result would hold two shapes equal in size, colour and kind")
    return _sorted_scene(result)


# ---------------------------------------------------------------------------- generation


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _random_shape(rng: np.random.Generator, position: str, taken: set[tuple[str, str, str]]) -> dict[str, str]:
    """A shape at ``position`` whose (size, color, kind) is none of ``taken`` (36 combinations, at most 3 taken)."""
    while True:
        shape = _shape(_pick(rng, KINDS), _pick(rng, COLORS), _pick(rng, SIZES), position)
        if _identity(shape) not in taken:
            return shape


def _possible_changes(scene: list[dict[str, str]]) -> dict[str, list[tuple[dict[str, str] | None, Any]]]:
    """Every (shape, value) each change kind can take in ``scene`` (appear: left to the generator)."""
    empty = _empty_positions(scene)
    taken = {_identity(s) for s in scene}
    options: dict[str, list[tuple[dict[str, str] | None, Any]]] = {k: [] for k in CHANGE_KINDS}
    for shape in scene:
        others = taken - {_identity(shape)}
        options["move"] += [(shape, p) for p in empty]
        options["recolor"] += [(shape, c) for c in COLORS
                               if c != shape["color"] and (shape["size"], c, shape["kind"]) not in others]
        new_size = "large" if shape["size"] == "small" else "small"
        if (new_size, shape["color"], shape["kind"]) not in others:
            options["resize"].append((shape, new_size))
        if len(scene) > 1:  # scenes are never empty
            options["disappear"].append((shape, None))
    if empty:
        options["appear"].append((None, None))
    return {k: v for k, v in options.items() if v}


def make_story(index: int, cfg: StoryConfig) -> Story:
    """Story ``index`` of the dataset ``cfg``: a first scene of ``cfg.min_shapes..max_shapes`` shapes
    in distinct quadrants, then ``cfg.min_changes..max_changes`` changes, each of a kind drawn
    uniformly among those possible in the current scene, its shape and value uniformly among
    theirs. A pure function of ``(cfg.seed, index)``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"make_story: index must be an int >= 0, got {index!r}")
    index = int(index)
    rng = np.random.default_rng([cfg.seed, index, _STORY_STREAM])
    num_shapes = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    positions = [POSITIONS[int(q)] for q in sorted(rng.choice(len(POSITIONS), size=num_shapes, replace=False))]
    scene: list[dict[str, str]] = []
    for position in positions:
        scene.append(_random_shape(rng, position, {_identity(s) for s in scene}))
    scenes, changes = [scene], []
    for _ in range(int(rng.integers(cfg.min_changes, cfg.max_changes + 1))):
        options = _possible_changes(scene)
        kind = _pick(rng, sorted(options, key=CHANGE_KINDS.index))
        shape, value = _pick(rng, options[kind])
        if kind == "appear":
            value = _random_shape(rng, _pick(rng, _empty_positions(scene)), {_identity(s) for s in scene})
        change = {"kind": kind, "text": describe_change(kind, scene, shape, value), "shape": shape, "value": value}
        scene = apply_change(scene, change)
        scenes.append(scene)
        changes.append(change)
    return Story(seed=int(cfg.seed), index=index, image_size=cfg.image_size, scenes=scenes, changes=changes)


# ---------------------------------------------------------------------------- rendering and documents


def render_scene(shapes: Sequence[Mapping[str, Any]], image_size: int, rng: np.random.Generator) -> Image.Image:
    """An ``image_size`` x ``image_size`` RGB image of ``shapes``, drawn exactly as synthetic samples are
    (:func:`mmtrain.data.synthetic.draw_shape_in_quadrant`; ``rng`` jitters each centre)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for shape in _sorted_scene(shapes):
        draw_shape_in_quadrant(draw, shape["kind"], shape["color"], shape["size"], shape["position"], image_size, rng)
    return image


def render_story(story: Story) -> list[Image.Image]:
    """The images of ``story``'s scenes in order; scene k's jitter is seeded from (seed, index, k)."""
    return [render_scene(scene, story.image_size, np.random.default_rng([story.seed, story.index, _STORY_STREAM, k]))
            for k, scene in enumerate(story.scenes)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: estimate_shapes reads the stored scene back exactly
    return buffer.getvalue()


def story_meta(story: Story) -> dict[str, Any]:
    """The ground truth of ``story`` as stored in its document's meta (JSON-serialisable)."""
    return {"task": "shape_stories", "seed": story.seed, "index": story.index, "image_size": story.image_size,
            "scenes": story.scenes, "changes": story.changes}


STORY_LAYOUTS: tuple[str, ...] = ("draw", "tell")


def story_layout(index: int) -> str:
    """The layout story ``index`` is written in: ``draw`` for even indices, ``tell`` for odd ones,
    so a dataset teaches both directions in equal parts."""
    return STORY_LAYOUTS[index % 2]


def story_document(story: Story, key: str | None = None, layout: str = "draw") -> Document:
    """``story`` as a document (PNG images, each with meta ``{"scene": k}``; key ``f"{index:08d}"``
    unless given; meta :func:`story_meta` (scenes and changes: the ground truth) and ``layout``):

    - ``draw``: ``[caption of scene 0, image 0, change 1 text, image 1, change 2 text, image 2, ...]``:
      each change is said before the image it makes (a model learns to draw the change);
    - ``tell``: ``[caption of scene 0, image 0, image 1, change 1 text, image 2, change 2 text, ...]``:
      each change is said after the two images it lies between (a model learns to tell it)."""
    if layout not in STORY_LAYOUTS:
        raise ValueError(f"story_document: layout must be one of {list(STORY_LAYOUTS)}, got {layout!r}")
    images = render_story(story)
    segments: list[Any] = [caption_from_shapes(story.scenes[0]), DocImage(_png(images[0]), "png", {"scene": 0})]
    for k, change in enumerate(story.changes, start=1):
        image = DocImage(_png(images[k]), "png", {"scene": k})
        segments += [change["text"], image] if layout == "draw" else [image, change["text"]]
    return Document(key=key if key is not None else f"{story.index:08d}", segments=segments,
                    meta={**story_meta(story), "layout": layout})


def parse_change_kinds(text: str | Sequence[str], what: str = "hold_out_changes") -> list[str]:
    """``"move,recolor"`` (or a list) -> ``["move", "recolor"]``; ValueError naming ``what`` (the
    field or flag) and the valid kinds for an unknown or repeated kind."""
    kinds = [k.strip().lower() for k in (text.split(",") if isinstance(text, str) else text) if k.strip()]
    for kind in kinds:
        if kind not in CHANGE_KINDS:
            raise ValueError(f"{what}: unknown change kind {kind!r} (expected a comma-separated list of "
                             f"{', '.join(CHANGE_KINDS)})")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{what}: a change kind is given twice in {kinds}")
    return kinds


def _story_stats(cfg: StoryConfig, held_kinds: list[str], **more: Any) -> dict[str, Any]:
    """The story counts of one split's stats.json, zeros included (filled in by :func:`_count`)."""
    return {"task": "shape_stories", "image_size": cfg.image_size, "seed": cfg.seed, "hold_out_changes": held_kinds,
            **more, "change_counts": {k: 0 for k in CHANGE_KINDS}, "story_length_histogram": {}}


def _count(stats: dict[str, Any], story: Story) -> None:
    """Add ``story`` to ``stats``: its changes by kind, its length (scenes) to the histogram."""
    for kind in story.change_kinds:
        stats["change_counts"][kind] += 1
    histogram = stats["story_length_histogram"]
    histogram[str(len(story.scenes))] = histogram.get(str(len(story.scenes)), 0) + 1
    stats["story_length_histogram"] = dict(sorted(histogram.items(), key=lambda kv: int(kv[0])))


def write_story_shards(out_dir: str | os.PathLike[str], num: int, cfg: StoryConfig,
                       hold_out_changes: Sequence[str] = (), val_fraction: float = 0.0, fmt: str = "wds",
                       samples_per_shard: int = 1000, progress: bool = False) -> dict[str, Any]:
    """Write stories ``0..num-1`` as document shards (:func:`~mmtrain.data.documents.write_document_shards`),
    each in the layout of :func:`story_layout` (half draw, half tell).

    Stories with a change of a kind in ``hold_out_changes`` go to ``out_dir/holdout`` (its own
    ``train`` shards and ``stats.json``) and are never in training; the others to
    ``out_dir/train`` and, with ``val_fraction``, ``out_dir/val`` (split by key). Returns the stats
    written to ``out_dir/stats.json``: the writer's, plus ``task``, ``generated``, ``image_size``,
    ``seed``, ``hold_out_changes``, ``held_out_stories``, ``change_counts`` (changes per kind, every
    kind listed) and ``story_length_histogram`` (``{str(scenes): stories}``) over the stories written
    there. ValueError naming the argument for a bad ``num`` or kind, or when every story is held out.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"write_story_shards: num must be an int >= 1, got {num!r}")
    held_kinds = parse_change_kinds(list(hold_out_changes), "write_story_shards: hold_out_changes")
    started = time.perf_counter()
    held: list[Story] = []
    # write_document_shards adds extra_stats to stats.json after it has consumed the documents,
    # so the counts filled in while generating are complete when written.
    extra = _story_stats(cfg, held_kinds, generated=num, held_out_stories=0)

    def documents() -> Iterator[Document]:
        for index in range(num):
            story = make_story(index, cfg)
            if set(story.change_kinds) & set(held_kinds):
                held.append(story)  # stories are tiny; rendered only when written
                extra["held_out_stories"] += 1
                continue
            _count(extra, story)
            yield story_document(story, layout=story_layout(index))

    stats = write_document_shards(documents(), out_dir, fmt=fmt, samples_per_shard=samples_per_shard,
                                  val_fraction=val_fraction, split_seed=cfg.seed, progress=progress,
                                  extra_stats=extra)
    if len(held) == num:
        raise ValueError(f"write_story_shards: every one of the {num} stories has a held-out change kind "
                         f"{held_kinds}; nothing is left to train on")
    if held_kinds:
        held_extra = _story_stats(cfg, held_kinds, split="held out: only stories with a held-out change kind")
        for story in held:
            _count(held_extra, story)
        write_document_shards((story_document(s, layout=story_layout(s.index)) for s in held), os.path.join(os.fspath(out_dir), HOLD_OUT_DIR),
                              fmt=fmt, samples_per_shard=samples_per_shard, extra_stats=held_extra)
    logger.info("wrote %d stories to %s in %.2fs%s", num - len(held), out_dir, time.perf_counter() - started,
                f"; {len(held)} with {', '.join(held_kinds)} held out to {os.path.join(os.fspath(out_dir), HOLD_OUT_DIR)}"
                if held_kinds else "")
    return stats
