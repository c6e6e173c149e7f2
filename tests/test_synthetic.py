"""Tests for the synthetic dataset generator, caption parsing, scoring and pixel-based estimation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmtrain.data.attributes import estimate_shapes
from mmtrain.data.synthetic import (
    BACKGROUND_RGB,
    COLOR_RGB,
    COLORS,
    FIELDS,
    KINDS,
    POSITIONS,
    SIZES,
    SyntheticConfig,
    attribute_accuracy,
    caption_from_shapes,
    generate_sample,
    kind_accuracy_by_size,
    mean_accuracy,
    parse_caption,
)


def _truth(sample: dict) -> list[dict]:
    return [{f: s[f] for f in FIELDS} for s in sample["attributes"]["shapes"]]


def _bytes(sample: dict) -> bytes:
    return sample["image"].tobytes()


# --- config ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"image_size": 20}, "image_size"),
        ({"image_size": 8}, "image_size"),
        ({"min_shapes": 0}, "min_shapes"),
        ({"min_shapes": 3, "max_shapes": 2}, "min_shapes"),
        ({"max_shapes": 5}, "max_shapes"),
        ({"seed": -1}, "seed"),
        ({"image_size": 32.0}, "image_size"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kwargs)


def test_vocabulary_and_palette():
    assert KINDS == ("circle", "square", "triangle")
    assert COLORS == ("red", "green", "blue", "yellow", "magenta", "cyan")
    assert SIZES == ("small", "large")
    assert POSITIONS == ("top left", "top right", "bottom left", "bottom right")
    rgbs = [np.array(COLOR_RGB[c], float) for c in COLORS] + [np.array(BACKGROUND_RGB, float)]
    # Well separated: every pair of palette/background colours far apart.
    for i in range(len(rgbs)):
        for j in range(i + 1, len(rgbs)):
            assert np.linalg.norm(rgbs[i] - rgbs[j]) >= 150


# --- generation ------------------------------------------------------------


def test_same_seed_is_deterministic_and_order_independent():
    cfg = SyntheticConfig(seed=7, max_shapes=4)
    forward = [generate_sample(i, cfg) for i in range(20)]
    backward = [generate_sample(i, SyntheticConfig(seed=7, max_shapes=4)) for i in reversed(range(20))][::-1]
    for a, b in zip(forward, backward):
        assert _bytes(a) == _bytes(b)
        assert a["caption"] == b["caption"]
        assert a["attributes"] == b["attributes"]
        assert a["key"] == b["key"]


def test_different_seed_gives_different_data():
    a = [generate_sample(i, SyntheticConfig(seed=0)) for i in range(20)]
    b = [generate_sample(i, SyntheticConfig(seed=1)) for i in range(20)]
    differing = sum(_bytes(x) != _bytes(y) for x, y in zip(a, b))
    assert differing >= 15
    # Different indices under one seed differ too.
    assert len({_bytes(x) for x in a}) >= 15


def test_sample_structure():
    sample = generate_sample(12, SyntheticConfig(seed=3, image_size=64, min_shapes=2, max_shapes=3))
    assert sample["key"] == "00000012"
    assert sample["image"].mode == "RGB" and sample["image"].size == (64, 64)
    attrs = sample["attributes"]
    json.dumps(attrs)  # must be JSON-serialisable
    assert attrs["seed"] == 3 and attrs["index"] == 12 and attrs["image_size"] == 64
    assert attrs["background"] == list(BACKGROUND_RGB)
    assert 2 <= len(attrs["shapes"]) <= 3
    positions = [s["position"] for s in attrs["shapes"]]
    assert positions == sorted(positions, key=POSITIONS.index)
    assert len(set(positions)) == len(positions)
    for s in attrs["shapes"]:
        assert set(s) == {"kind", "color", "size", "position", "center", "extent_px"}
    assert sample["caption"] == caption_from_shapes(attrs["shapes"])


def test_shape_count_respects_config_and_covers_range():
    cfg = SyntheticConfig(min_shapes=2, max_shapes=4)
    counts = {len(generate_sample(i, cfg)["attributes"]["shapes"]) for i in range(60)}
    assert counts == {2, 3, 4}


def test_index_must_be_non_negative_int():
    with pytest.raises(ValueError, match="index"):
        generate_sample(-1, SyntheticConfig())


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_pixels_match_attributes(image_size):
    """Exact palette colours only; each shape's pixels sit in its quadrant with the stated box."""
    cfg = SyntheticConfig(image_size=image_size, min_shapes=1, max_shapes=4, seed=5)
    half = image_size // 2
    for i in range(40):
        sample = generate_sample(i, cfg)
        pixels = np.asarray(sample["image"])
        colors_used = {tuple(c) for c in pixels.reshape(-1, 3)}
        shapes = sample["attributes"]["shapes"]
        assert colors_used == {BACKGROUND_RGB} | {COLOR_RGB[s["color"]] for s in shapes}
        for s in shapes:
            q = POSITIONS.index(s["position"])
            block = pixels[(q // 2) * half : (q // 2 + 1) * half, (q % 2) * half : (q % 2 + 1) * half]
            mask = np.all(block == COLOR_RGB[s["color"]], axis=-1)
            ys, xs = np.nonzero(mask)
            # One pixel of margin: the shape never touches its quadrant's border.
            assert ys.min() >= 1 and xs.min() >= 1 and ys.max() <= half - 2 and xs.max() <= half - 2
            assert xs.max() - xs.min() + 1 == s["extent_px"]
            assert ys.max() - ys.min() + 1 == s["extent_px"]
            cx, cy = s["center"]
            assert cx == pytest.approx((q % 2) * half + xs.min() + s["extent_px"] / 2)
            assert cy == pytest.approx((q // 2) * half + ys.min() + s["extent_px"] / 2)


def test_small_and_large_are_separable_by_area():
    cfg = SyntheticConfig(image_size=32, max_shapes=4, seed=2)
    areas = {"small": [], "large": []}
    for i in range(60):
        sample = generate_sample(i, cfg)
        pixels = np.asarray(sample["image"])
        for s in sample["attributes"]["shapes"]:
            q = POSITIONS.index(s["position"])
            block = pixels[(q // 2) * 16 : (q // 2 + 1) * 16, (q % 2) * 16 : (q % 2 + 1) * 16]
            areas[s["size"]].append(int(np.all(block == COLOR_RGB[s["color"]], axis=-1).sum()))
    assert max(areas["small"]) * 2 < min(areas["large"])


# --- captions --------------------------------------------------------------


def test_caption_format():
    shapes = [
        {"kind": "square", "color": "blue", "size": "large", "position": "bottom right"},
        {"kind": "circle", "color": "red", "size": "small", "position": "top left"},
    ]
    assert (
        caption_from_shapes(shapes)
        == "a small red circle at the top left and a large blue square at the bottom right"
    )


def test_caption_rejects_unknown_vocabulary():
    with pytest.raises(ValueError, match="color"):
        caption_from_shapes([{"kind": "circle", "color": "purple", "size": "small", "position": "top left"}])


def test_caption_parse_round_trip():
    cfg = SyntheticConfig(max_shapes=4, seed=11)
    for i in range(100):
        sample = generate_sample(i, cfg)
        assert parse_caption(sample["caption"]) == _truth(sample)


def test_parse_caption_is_tolerant():
    text = "  A  SMALL Red circle at   the top\tleft and\n a large BLUE square AT THE bottom right. "
    assert parse_caption(text) == [
        {"kind": "circle", "color": "red", "size": "small", "position": "top left"},
        {"kind": "square", "color": "blue", "size": "large", "position": "bottom right"},
    ]


def test_parse_caption_skips_garbage():
    assert parse_caption("") == []
    assert parse_caption("xq zz the the a large at the") == []
    assert parse_caption("a purple circle at the top left and a small green triangle at the top right zz") == [
        {"kind": "triangle", "color": "green", "size": "small", "position": "top right"}
    ]


# --- scoring ---------------------------------------------------------------

RED_CIRCLE = {"kind": "circle", "color": "red", "size": "small", "position": "top left"}
BLUE_SQUARE = {"kind": "square", "color": "blue", "size": "large", "position": "bottom right"}


def test_attribute_accuracy_perfect():
    assert attribute_accuracy([BLUE_SQUARE, RED_CIRCLE], [RED_CIRCLE, BLUE_SQUARE]) == {
        "kind": 1.0, "color": 1.0, "size": 1.0, "exact": 1.0, "count": 1.0,
    }


def test_attribute_accuracy_wrong_field_and_missing_shape():
    wrong_color = dict(BLUE_SQUARE, color="cyan")
    acc = attribute_accuracy([RED_CIRCLE, wrong_color], [RED_CIRCLE, BLUE_SQUARE])
    assert acc == {"kind": 1.0, "color": 0.5, "size": 1.0, "exact": 0.0, "count": 1.0}
    acc = attribute_accuracy([RED_CIRCLE], [RED_CIRCLE, BLUE_SQUARE])
    assert acc == {"kind": 0.5, "color": 0.5, "size": 0.5, "exact": 0.0, "count": 0.0}
    # Right attributes at the wrong position do not count.
    moved = dict(RED_CIRCLE, position="top right")
    assert attribute_accuracy([moved], [RED_CIRCLE])["kind"] == 0.0


def test_attribute_accuracy_extra_shape_breaks_exact_only():
    acc = attribute_accuracy([RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE])
    assert acc == {"kind": 1.0, "color": 1.0, "size": 1.0, "exact": 0.0, "count": 0.0}


def test_mean_accuracy():
    mean = mean_accuracy(
        [
            attribute_accuracy([RED_CIRCLE], [RED_CIRCLE]),
            attribute_accuracy([], [RED_CIRCLE]),
        ]
    )
    assert mean == {"kind": 0.5, "color": 0.5, "size": 0.5, "exact": 0.5, "count": 0.5}
    with pytest.raises(ValueError):
        mean_accuracy([])


def test_kind_accuracy_by_size_pools_shapes_of_each_true_size():
    small_square = dict(RED_CIRCLE, kind="square")  # wrong kind, right place
    big_circle_elsewhere = dict(BLUE_SQUARE, kind="circle", position="top right")
    truths = [[RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE], [dict(BLUE_SQUARE, position="top right")]]
    preds = [[RED_CIRCLE, BLUE_SQUARE], [small_square], [big_circle_elsewhere]]
    # small: right in sample 0, wrong kind in sample 1; large: right in 0, wrong kind in 2
    assert kind_accuracy_by_size(preds, truths) == {"small": 0.5, "large": 0.5}
    # a size no true shape has is left out; a missing prediction counts as wrong
    assert kind_accuracy_by_size([[]], [[RED_CIRCLE]]) == {"small": 0.0}
    with pytest.raises(ValueError):
        kind_accuracy_by_size([[RED_CIRCLE]], [])


# --- estimation from pixels ------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 64])
def test_estimate_shapes_exact_on_clean_samples(image_size):
    cfg = SyntheticConfig(image_size=image_size, min_shapes=1, max_shapes=4, seed=21)
    for i in range(150):
        sample = generate_sample(i, cfg)
        assert estimate_shapes(sample["image"]) == _truth(sample), f"sample {i}"
    # Arrays work as well as PIL images.
    assert estimate_shapes(np.asarray(sample["image"])) == _truth(sample)


@pytest.mark.parametrize("image_size", [32, 64])
def test_estimate_shapes_robust_to_noise(image_size):
    cfg = SyntheticConfig(image_size=image_size, min_shapes=1, max_shapes=4, seed=4)
    rng = np.random.default_rng(0)
    scores = []
    for i in range(100):
        sample = generate_sample(i, cfg)
        noisy = np.asarray(sample["image"]).astype(float) + rng.normal(0.0, 10.0, (image_size, image_size, 3))
        noisy = np.clip(noisy, 0, 255).round().astype(np.uint8)
        scores.append(attribute_accuracy(estimate_shapes(noisy), _truth(sample)))
    mean = mean_accuracy(scores)
    assert min(mean.values()) >= 0.9, mean


def test_estimate_shapes_degrades_gracefully_on_blur():
    cfg = SyntheticConfig(image_size=64, min_shapes=1, max_shapes=4, seed=8)
    scores = []
    for i in range(60):
        sample = generate_sample(i, cfg)
        blurred = sample["image"].filter(ImageFilter.GaussianBlur(1.0))
        scores.append(attribute_accuracy(estimate_shapes(blurred), _truth(sample)))
    assert mean_accuracy(scores)["exact"] >= 0.9


def test_estimate_shapes_empty_and_bad_input():
    assert estimate_shapes(Image.new("RGB", (32, 32), BACKGROUND_RGB)) == []
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        estimate_shapes(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="square"):
        estimate_shapes(np.zeros((32, 40, 3), dtype=np.uint8))
    with pytest.raises(TypeError):
        estimate_shapes([[0, 0, 0]])


def test_hold_out_keeps_combinations_out_of_training_and_writes_only_them_to_the_held_out_split(tmp_path):
    from mmtrain import cli
    from mmtrain.data.sources import iter_samples
    from mmtrain.data.synthetic import is_held_out, parse_hold_out
    from mmtrain.eval.samples import seen_unseen_scores

    combos = parse_hold_out("red triangle, large blue circle,top left yellow")
    assert combos == [{"color": "red", "kind": "triangle"}, {"size": "large", "color": "blue", "kind": "circle"},
                      {"position": "top left", "color": "yellow"}]
    for bad, why in (("red tringle", "unknown words 'tringle'"), ("red blue", "names two values of color"), ("the", "unknown")):
        with pytest.raises(ValueError, match=why):
            parse_hold_out(bad)
    out = tmp_path / "syn"
    assert cli.main(["prep", "synthetic", "--out", str(out), "--num", "400", "--samples-per-shard", "100", "--quiet",
                     "--hold-out", "red triangle,large blue circle,top left yellow"]) == 0
    train_samples, held_samples = list(iter_samples(out)), list(iter_samples(out / "holdout"))
    train = [s["attributes"]["shapes"] for s in train_samples]
    held = [s["attributes"]["shapes"] for s in held_samples]
    assert held and not any(is_held_out(s, combos) for s in train) and all(is_held_out(s, combos) for s in held)

    # the same rules written out here, not through is_held_out: one shape carrying all of a combination
    def literal(shape: dict) -> bool:
        return ((shape["color"] == "red" and shape["kind"] == "triangle")
                or (shape["size"] == "large" and shape["color"] == "blue" and shape["kind"] == "circle")
                or (shape["position"] == "top left" and shape["color"] == "yellow"))

    assert not any(literal(shape) for scene in train for shape in scene)
    assert all(any(literal(shape) for shape in scene) for scene in held)
    # a combination split across two shapes of one scene is no hold-out: such scenes stay in training
    assert any(any(s["color"] == "red" for s in scene) and any(s["kind"] == "triangle" for s in scene) for scene in train)
    # every generated sample is in exactly one split
    assert sorted(s["key"] for s in train_samples + held_samples) == [f"{i:08d}" for i in range(400)]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["hold_out"] == ["red triangle", "large blue circle", "yellow top left"]
    assert (stats["num_samples"], stats["held_out_samples"], stats["generated"]) == (len(train), len(held), 400)
    # eval finds the hold-out next to the run's training shards, and splits its attribute scores by it
    from mmtrain.config import load_config
    from mmtrain.eval.samples import training_hold_out

    assert training_hold_out(load_config(None, [f"data.train_shards={out}"])) == combos
    assert training_hold_out(load_config(None, [f"data.train_shards={out / 'holdout'}"])) == combos
    assert training_hold_out(load_config(None, [f"data.train_shards={tmp_path / 'elsewhere'}"])) == []
    scores = seen_unseen_scores([{"exact": 1.0}, {"exact": 0.0}, {"exact": 0.5}], [train[0], held[0], held[1]], combos)
    assert scores == {"images_seen": 1, "attr_exact_seen": 1.0, "images_unseen": 2, "attr_exact_unseen": 0.25}
