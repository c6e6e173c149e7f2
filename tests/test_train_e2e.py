"""A real 2-rank DeepSpeed ZeRO-3 run on CPU: train, checkpoint, resume, then sample, caption and eval."""
import json
from pathlib import Path

from conftest import REPO, tiny_overrides

from mmtrain import cli
from mmtrain.components.checkpoint import latest_tag, load_model_state


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_sample_caption_eval(synthetic_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = str(REPO / "configs" / "tiny.yaml")
    common = tiny_overrides(synthetic_data, run_dir, "logging.log_every=4", "checkpoint.every_steps=6")

    # first launch: 12 steps on 2 ranks
    assert cli.main(["train", config, *common, "train.steps=12"]) == 0
    first = read_metrics(run_dir)
    assert [r["step"] for r in first] == [4, 8, 12]
    losses = [r["loss"] for r in first]
    assert all(l == l and l < 1e4 for l in losses)  # finite
    assert losses[-1] < losses[0], losses
    assert latest_tag(run_dir) == "step00000012"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000006", "step00000012"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "text.model").is_file()
    assert (run_dir / "wandb").is_dir()
    wandb_id = (run_dir / "wandb_id").read_text()

    # second launch with the same run dir: resumes at step 12 and continues to 20
    assert cli.main(["train", config, *common, "train.steps=20"]) == 0
    resumed = read_metrics(run_dir)[len(first):]
    assert [r["step"] for r in resumed] == [16, 20]
    assert resumed[0]["samples_seen"] == 16 * 8 * 2
    assert latest_tag(run_dir) == "step00000020"
    assert (run_dir / "wandb_id").read_text() == wandb_id
    state, meta = load_model_state(run_dir)
    assert meta["step"] == 20 and meta["samples_seen"] == 20 * 16
    assert all(v.dtype.is_floating_point for v in state.values())

    # inference on one process from the ZeRO-3 shards
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", str(run_dir), "--prompt", "a large red circle at the top left", "--num-per-prompt", "2",
                     "--out", str(grid)]) == 0
    assert grid.is_file() and grid.stat().st_size > 0
    assert cli.main(["caption", str(run_dir), "--shards", synthetic_data["val"], "--num", "3"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "\t" in l]
    assert [l.split("\t")[0] for l in lines] == ["00000000", "00000001", "00000002"]

    out = tmp_path / "eval"
    assert cli.main(["eval", str(run_dir), "--num", "8", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["step"] == 20 and report["num_samples"] == 8
    for key in ("caption_accuracy", "image_accuracy"):
        assert set(report[key]) == {"kind", "color", "size", "exact", "count"}
        assert all(0.0 <= v <= 1.0 for v in report[key].values())
    assert report["reference_image_accuracy"]["exact"] == 1.0
    assert (out / "generated.png").is_file() and (out / "captions.png").is_file()
