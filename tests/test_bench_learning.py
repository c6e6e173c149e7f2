"""benchmarks/bench_learning.py on the tiny config: two evaluation points with the real train and eval commands."""
import json
import sys

import pytest
from conftest import REPO, tiny_overrides

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_learning  # noqa: E402

from mmtrain.components.optimizer import lr_multiplier  # noqa: E402
from mmtrain.config import load_config  # noqa: E402


def test_learning_curve_table_and_plot_on_a_tiny_run_and_resume(synthetic_data, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_data, run) if not o.startswith("train.run_dir=")]
    argv = [str(REPO / "configs" / "tiny.yaml"), *overrides, "logging.log_every=2", "optim.schedule=cosine", "optim.warmup_steps=1", "--run-dir", str(run),
            "--eval-every", "3", "--steps", "6", "--eval-num", "4", "--ar-steps", "1,2"]
    assert bench_learning.main(argv) == 0
    out = capsys.readouterr().out
    curve = json.loads((run / "learning" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [3, 6]
    for p in curve["points"]:
        assert set(p["generate"]) == {"1", "2"} and p["loss"] is not None and p["loss"] == p["loss"]
        assert all(0.0 <= p[task].get("attr_exact", -1) <= 1.0 for task in ("caption",))
        assert all(0.0 <= p["generate"][s]["attr_exact"] <= 1.0 for s in ("1", "2"))
    assert curve["points"][1]["train_wall_s"] > curve["points"][0]["train_wall_s"] > 0
    # stopped at every point (train.stop_at), the cosine schedule is still that of one 6-step run
    cfg = load_config(run / "config.yaml")
    logged = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(logged) == [2, 3, 4, 6]
    for step, lr in logged.items():
        assert lr == pytest.approx(cfg.optim.lr * lr_multiplier(cfg.optim, step, 6), rel=1e-6), step
    table = (run / "learning" / "curve.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [r.split(" | ")[0] for r in rows] == ["| 3", "| 6"]
    assert "image S=2 exact" in table and "caption count" in table and rows[1] in out
    large = curve["points"][1]["generate"]["2"]["attr_kind_large"]
    assert "image S=2 kind small / large" in table and 0 <= large <= 1 and f"{large:.2f}" in rows[1]
    assert (run / "learning" / "curve.png").stat().st_size > 10_000
    commands = (run / "learning" / "log.txt").read_text().splitlines()
    assert [c.split()[2:4] for c in commands] == [["train", str(REPO / "configs" / "tiny.yaml")], ["eval", "caption"],
                                                   ["eval", "generate"]] * 2
    # resumable: nothing is trained or evaluated again, the table is the same
    assert bench_learning.main(argv) == 0
    assert (run / "learning" / "log.txt").read_text().splitlines() == commands
    assert (run / "learning" / "curve.md").read_text() == table
    # the table `make demo` prints, from the same real eval outputs
    from mmtrain.demo import learned_summary

    point, keys = curve["points"][1], ("exact", "kind", "color", "size", "count", "kind_small", "kind_large")
    row = lambda scores: " | ".join(f"{scores[f'attr_{k}']:.2f}" for k in keys) + " |"  # noqa: E731
    summary = learned_summary(run / "learning" / "step00000006").splitlines()
    assert summary[0] == "| | exact | kind | color | size | count | kind of small | kind of large |" and len(summary) == 2 + 1 + 2
    assert summary[2] == "| captions written for held-out images | " + row(point["caption"])
    assert summary[4].startswith("| images drawn for held-out captions, S = 2, CFG ")
    assert summary[4].endswith("| " + row(point["generate"]["2"]))


def test_learning_curve_table_of_a_model_without_captions_shows_its_seen_and_unseen_images():
    # a TransDiff run: no caption evaluation, a hold-out split in the image scores
    image = {"attr_exact": 0.5, "attr_kind": 0.6, "attr_color": 0.7, "attr_size": 0.8, "attr_count": 0.9,
             "attr_exact_seen": 0.55, "attr_exact_unseen": 0.25}
    points = [{"step": 10, "train_wall_s": 12.3, "loss": 0.5, "caption": {}, "generate": {"1": image}}]
    head, _, row = bench_learning.table(points, ["1"]).splitlines()
    assert head.endswith("| caption exact seen / unseen | image S=1 exact seen / unseen |")
    assert row == "| 10 | 12 | 0.5000 | - | - | - | - | - | 0.50 | 0.60 | 0.70 | 0.80 | 0.90 | - / - | 0.55 / 0.25 |"
    # the kind of small and large shapes apart, where the eval reports it
    image.update(attr_kind_small=0.33, attr_kind_large=0.61)
    head, _, row = bench_learning.table(points, ["1"]).splitlines()
    assert head.endswith("| image S=1 exact seen / unseen | caption kind small / large | image S=1 kind small / large |")
    assert row.endswith("| - / - | 0.55 / 0.25 | - / - | 0.33 / 0.61 |")


def test_learning_curve_table_of_the_stories_benchmark_per_split_and_k():
    # --task documents: the eval documents summaries of each point, per split, with the consistency per k
    point = lambda step, a: {"step": step, "train_wall_s": 10.0 * step, "loss": 1.0 / step, "documents": {  # noqa: E731
        "eval": {"overall": {"draw_attribute": a, "draw_consistency": 0.5, "draw_consistency_color": 0.6, "draw_exact": 0.25,
                             "tell_kind": 0.9, "tell_exact": 0.75},
                 "by_k": {"1": {"draw_consistency": 0.6}, "2": {"draw_consistency": 0.4}}},
        "held_out": {"overall": {"draw_attribute": a / 2, "draw_consistency": 0.3, "draw_exact": 0.0, "tell_exact": 0.1},
                     "by_k": {"1": {"draw_consistency": 0.3}}}}}
    lines = bench_learning.table_documents([point(1, 0.2), point(2, 0.4)]).splitlines()
    metrics = ["draw_attribute", "draw_consistency", "draw_consistency_color", "draw_exact", "tell_kind", "tell_exact"]
    assert lines[0] == "| " + " | ".join(["step", "train wall s", "loss"] + [f"{split} {m}" for split in ("eval", "held_out") for m in
                                          metrics + ["draw consistency k=1", "draw consistency k=2"]]) + " |"
    # a metric a split did not report is "-"
    assert lines[3] == "| 2 | 20 | 0.5000 | 0.40 | 0.50 | 0.60 | 0.25 | 0.90 | 0.75 | 0.60 | 0.40 | 0.20 | 0.30 | - | 0.00 | - | 0.10 | 0.30 | - |"
