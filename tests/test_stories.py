"""Shape stories: generation, words <-> changes, rendering, scoring against the ground truth, prep CLI."""
from __future__ import annotations

import io
import json
import re
from collections import Counter

import pytest
from PIL import Image

from mmtrain import cli
from mmtrain.data.attributes import estimate_shapes
from mmtrain.data.sources import iter_documents
from mmtrain.data.stories import (CHANGE_KINDS, StoryConfig, apply_change, describe_change, make_story, parse_change,
                                  parse_change_kinds, referring_expression, render_scene, render_story, story_document)
from mmtrain.data.synthetic import caption_from_shapes
from mmtrain.eval.stories import score_change_text, score_image, summarize

CFG = StoryConfig(image_size=32, seed=3)


def shape(kind, color, size, position):
    return {"kind": kind, "color": color, "size": size, "position": position}


def image_of(scene, size=32):
    import numpy as np

    return render_scene(scene, size, np.random.default_rng(0))


def test_stories_are_deterministic_per_seed_and_index_and_have_2_to_4_scenes():
    forward = [make_story(i, CFG) for i in range(40)]
    backward = [make_story(i, CFG) for i in reversed(range(40))][::-1]
    assert forward == backward
    assert make_story(7, StoryConfig(image_size=32, seed=4)) != make_story(7, CFG)
    assert {len(s.scenes) for s in forward} <= {2, 3, 4} and all(len(s.scenes) == len(s.changes) + 1 for s in forward)
    many = [make_story(i, CFG) for i in range(300)]
    assert {len(s.scenes) for s in many} == {2, 3, 4}
    assert {1, 2, 3} == {len(s.scenes[0]) for s in many}
    assert set(Counter(k for s in many for k in s.change_kinds)) == set(CHANGE_KINDS)
    with pytest.raises(ValueError, match="index must be an int >= 0"):
        make_story(-1, CFG)
    with pytest.raises(Exception, match="StoryConfig.image_size"):
        StoryConfig(image_size=20)


def test_every_change_text_parses_back_and_applies_to_the_next_scene():
    for index in range(300):
        story = make_story(index, CFG)
        for k, change in enumerate(story.changes):
            scene = story.scenes[k]
            assert change["text"] == describe_change(change["kind"], scene, change["shape"], change["value"])
            assert parse_change(change["text"], scene) == change
            assert parse_change(change["text"].upper() + ".", scene) == change  # tolerant to case and a full stop
            assert apply_change(scene, change) == story.scenes[k + 1]
        for scene in story.scenes:
            assert scene  # never empty
            assert len({(s["size"], s["color"], s["kind"]) for s in scene}) == len(scene)
            assert len({s["position"] for s in scene}) == len(scene)
        assert json.loads(json.dumps(story_document(story).meta))["changes"] == story.changes


def test_referring_expressions_are_the_shortest_unique_one():
    scene = [shape("circle", "red", "small", "top left"), shape("circle", "blue", "small", "top right"),
             shape("circle", "blue", "large", "bottom left"), shape("square", "red", "large", "bottom right")]
    assert referring_expression(scene[3], scene) == "the square"
    assert referring_expression(scene[0], scene) == "the red circle"
    assert referring_expression(scene[1], scene) == "the small blue circle"
    for index in range(300):
        story = make_story(index, CFG)
        for k, change in enumerate(story.changes):
            if change["kind"] == "appear":
                continue
            words = re.match(r"the (.+?) (moves|turns|grows|shrinks|disappears)", change["text"]).group(1).split()
            hits = [s for s in story.scenes[k] if all(w in (s["kind"], s["color"], s["size"]) for w in words)]
            assert hits == [change["shape"]], (change, story.scenes[k])
            shorter = {1: [], 2: [["kind"]], 3: [["kind"], ["color", "kind"]]}[len(words)]
            for fields in shorter:  # every shorter form picks several shapes
                assert sum(all(s[f] == change["shape"][f] for f in fields) for s in story.scenes[k]) > 1
    # a reference that picks several shapes (or none) is no change of the scene
    assert parse_change("the circle grows", scene) is None
    assert parse_change("the triangle grows", scene) is None
    with pytest.raises(ValueError, match="the top right is not empty"):
        apply_change(scene[:2], {"kind": "appear", "value": shape("square", "cyan", "small", "top right")})


def test_rendered_scenes_read_back_exactly():
    for index in range(40):
        story = make_story(index, CFG)
        for scene, image in zip(story.scenes, render_story(story), strict=True):
            assert image.size == (32, 32) and estimate_shapes(image) == scene
    doc = story_document(make_story(0, StoryConfig(image_size=64)))
    images = [Image.open(io.BytesIO(img.data)) for img in doc.images]
    assert [estimate_shapes(img) for img in images] == doc.meta["scenes"]
    assert doc.segments[0] == caption_from_shapes(doc.meta["scenes"][0])
    assert doc.segments[2::2] == [c["text"] for c in doc.meta["changes"]]
    assert [img.meta["scene"] for img in doc.images] == list(range(len(doc.meta["scenes"])))


def test_score_image_on_the_true_the_previous_and_a_wrong_image():
    red = shape("circle", "red", "small", "top left")
    blue = shape("square", "blue", "large", "top right")
    green = shape("triangle", "green", "large", "bottom left")
    prev = [red, blue, green]
    move = {"kind": "move", "shape": red, "value": "bottom right"}
    after = apply_change(prev, move)
    full = {"attribute": 1.0, "consistency": 1.0, "consistency_color": 1.0, "exact": 1.0}
    assert score_image(image_of(after), prev, move, after) == full
    # the previous image: nothing changed, everything else kept
    assert score_image(image_of(prev), prev, move, after) == {**full, "attribute": 0.0, "exact": 0.0}
    # moved, but one of the two bystanders recoloured
    wrong = [shape("circle", "red", "small", "bottom right"), {**blue, "color": "yellow"}, green]
    assert score_image(image_of(wrong), prev, move, after) == {**full, "consistency": 0.5, "consistency_color": 0.5, "exact": 0.0}
    # a bystander drawn as another kind: kept by colour, size and place, not whole
    other_kind = [shape("circle", "red", "small", "bottom right"), {**blue, "kind": "circle"}, green]
    assert score_image(image_of(other_kind), prev, move, after) == {**full, "consistency": 0.5, "exact": 0.0}
    # copied instead of moved: the old quadrant must be empty
    assert score_image(image_of(prev + [after[-1]]), prev, move, after)["attribute"] == 0.0
    for change in ({"kind": "recolor", "shape": blue, "value": "cyan"},
                   {"kind": "resize", "shape": green, "value": "small"},
                   {"kind": "disappear", "shape": red, "value": None},
                   {"kind": "appear", "shape": None, "value": shape("square", "magenta", "small", "bottom right")}):
        after = apply_change(prev, change)
        untouched = 3 if change["kind"] == "appear" else 2
        assert score_image(image_of(after), prev, change, after) == full
        assert score_image(image_of(prev), prev, change, after) == {**full, "attribute": 0.0, "exact": 0.0}
        # an empty canvas: the change is right only for disappear, and no bystander is left
        empty = score_image(image_of([]), prev, change, after)
        assert empty == {"attribute": float(change["kind"] == "disappear"), "consistency": 0.0 / untouched,
                         "consistency_color": 0.0, "exact": 0.0}


def test_score_change_text_exact_paraphrase_and_wrong():
    prev = [shape("circle", "red", "small", "top left"), shape("circle", "blue", "large", "top right")]
    true = {"kind": "move", "text": "the red circle moves to the bottom left", "shape": prev[0], "value": "bottom left"}
    assert score_change_text(true["text"], prev, true) == {"kind": 1.0, "object": 1.0, "value": 1.0, "exact": 1.0}
    # a longer (still unique) reference, other case, a full stop: the same change
    said = "The Small Red Circle moves to the  bottom left."
    assert score_change_text(said, prev, true) == {"kind": 1.0, "object": 1.0, "value": 1.0, "exact": 1.0}
    assert score_change_text("the red circle moves to the bottom right", prev, true) == \
        {"kind": 1.0, "object": 1.0, "value": 0.0, "exact": 0.0}
    assert score_change_text("the blue circle moves to the bottom left", prev, true) == \
        {"kind": 1.0, "object": 0.0, "value": 1.0, "exact": 0.0}
    # ambiguous: "the circle" picks two shapes, so it refers to neither
    assert score_change_text("the circle moves to the bottom left", prev, true) == \
        {"kind": 1.0, "object": 0.0, "value": 1.0, "exact": 0.0}
    assert score_change_text("the red circle turns green", prev, true) == \
        {"kind": 0.0, "object": 1.0, "value": 0.0, "exact": 0.0}
    assert score_change_text("a red circle went somewhere", prev, true) == dict.fromkeys(("kind", "object", "value", "exact"), 0.0)
    gone = {"kind": "disappear", "text": "the blue circle disappears", "shape": prev[1], "value": None}
    assert score_change_text("the blue circle disappears", prev, gone)["exact"] == 1.0
    assert score_change_text("the blue circle shrinks", prev, gone) == {"kind": 0.0, "object": 1.0, "value": 0.0, "exact": 0.0}
    new = shape("triangle", "yellow", "large", "bottom right")
    appear = {"kind": "appear", "text": describe_change("appear", prev, None, new), "shape": None, "value": new}
    assert score_change_text(appear["text"], prev, appear) == {"kind": 1.0, "object": 1.0, "value": 1.0, "exact": 1.0}
    assert score_change_text("a small yellow triangle appears at the bottom right", prev, appear) == \
        {"kind": 1.0, "object": 1.0, "value": 0.0, "exact": 0.0}


def test_summarize_by_k_and_change_kind():
    rows = [{"k": 1, "change": "move", "attribute": 1.0, "exact": 1.0},
            {"k": 1, "change": "recolor", "attribute": 0.0, "exact": 0.0},
            {"k": 2, "change": "move", "attribute": 0.5, "exact": 0.0}]
    summary = summarize(rows)
    assert summary["count"] == 3
    assert summary["overall"] == {"attribute": 0.5, "exact": 1 / 3}
    assert summary["by_k"] == {"1": {"attribute": 0.5, "exact": 0.5}, "2": {"attribute": 0.5, "exact": 0.0}}
    assert summary["by_change"]["move"] == {"attribute": 0.75, "exact": 0.5}
    with pytest.raises(ValueError, match="row 0"):
        summarize([{"attribute": 1.0}])


def test_prep_synthetic_documents_cli_with_held_out_change_kind(tmp_path):
    out = tmp_path / "stories"
    assert cli.main(["prep", "synthetic", "--documents", "--out", str(out), "--num", "60", "--image-size", "32",
                     "--seed", "1", "--samples-per-shard", "16", "--hold-out-changes", "recolor", "--quiet"]) == 0
    train, held = list(iter_documents(out / "train")), list(iter_documents(out / "holdout" / "train"))
    assert held and train and len(train) + len(held) == 60
    assert sorted(d.key for d in train + held) == [f"{i:08d}" for i in range(60)]
    assert all("recolor" not in [c["kind"] for c in d.meta["changes"]] for d in train)
    assert all("recolor" in [c["kind"] for c in d.meta["changes"]] for d in held)
    cfg = StoryConfig(image_size=32, seed=1)
    for doc in train[:5] + held[:5]:
        story = make_story(int(doc.key), cfg)
        assert doc.meta["scenes"] == story.scenes and doc.meta["changes"] == story.changes
        assert [s for s in doc.segments if isinstance(s, str)] == \
            [caption_from_shapes(story.scenes[0])] + [c["text"] for c in story.changes]
        assert [estimate_shapes(Image.open(io.BytesIO(img.data))) for img in doc.images] == story.scenes
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == len(train) and stats["held_out_stories"] == len(held) and stats["generated"] == 60
    assert stats["change_counts"]["recolor"] == 0 and set(stats["change_counts"]) == set(CHANGE_KINDS)
    assert sum(stats["change_counts"].values()) == sum(len(d.meta["changes"]) for d in train)
    assert sum(stats["story_length_histogram"].values()) == len(train)
    held_stats = json.loads((out / "holdout" / "stats.json").read_text())
    assert held_stats["documents"] == len(held) and held_stats["change_counts"]["recolor"] >= len(held)


def test_bad_hold_out_changes_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["prep", "synthetic", "--documents", "--out", str(tmp_path / "x"), "--num", "5",
                     "--hold-out-changes", "move,teleport", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--hold-out-changes" in err and "'teleport'" in err and "move, appear, recolor, resize, disappear" in err
    assert cli.main(["prep", "synthetic", "--out", str(tmp_path / "y"), "--num", "5", "--hold-out-changes", "move"]) == 2
    assert "add --documents" in capsys.readouterr().err
    with pytest.raises(ValueError, match="given twice"):
        parse_change_kinds("move,move")
