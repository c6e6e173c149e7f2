"""A real 2-rank DeepSpeed ZeRO-3 run on CPU: train, checkpoint, resume, then sample, caption and eval."""
import json

import numpy as np
import pytest
from pathlib import Path
from PIL import Image

from conftest import REPO, tiny_overrides, train_side_by_side

from mmtrain import cli
from mmtrain.components.checkpoint import latest_tag, load_model_state


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_sample_caption_eval(synthetic_data, val_images, tmp_path, capsys):
    from test_caption_metrics import pycocoevalcap_directly
    from test_eval import fid_directly, saved_samples

    run_dir = tmp_path / "run"
    config = str(REPO / "configs" / "tiny.yaml")
    common = tiny_overrides(synthetic_data, run_dir, "logging.log_every=4", "checkpoint.every_steps=6", "logging.wandb=true")

    # first launch: 12 steps on 2 ranks; beside it (independent of it), the uninterrupted 20-step run
    # that the resumed run is compared with below
    straight_dir = tmp_path / "straight"
    straight = tiny_overrides(synthetic_data, straight_dir, "logging.log_every=4", "checkpoint.every_steps=100")
    assert train_side_by_side(["train", config, *common, "train.steps=12"], ["train", config, *straight, "train.steps=20"]) == [0, 0]
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

    # the uninterrupted 20-step run saw the same samples and the same losses at every log step
    a, b = read_metrics(run_dir), read_metrics(straight_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8, 12, 16, 20]
    assert [r["data_hash"] for r in a] == [r["data_hash"] for r in b]
    assert len({r["data_hash"] for r in a}) == 5
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    assert all(v.dtype.is_floating_point for v in state.values())
    # ... and ends with the same weights and the same EMA (sharded per rank, saved and resumed)
    from mmtrain.components.ema import consolidate

    straight_state, _ = load_model_state(straight_dir)
    ema_resumed = consolidate(run_dir / "checkpoints" / "step00000020")
    ema_straight = consolidate(straight_dir / "checkpoints" / "step00000020")
    for k in state:
        np.testing.assert_allclose(state[k].numpy(), straight_state[k].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ema_resumed[k].numpy(), ema_straight[k].numpy(), rtol=1e-4, atol=1e-6)
    moved = [k for k in state if not np.allclose(ema_resumed[k].numpy(), state[k].numpy())]
    assert moved  # the EMA is not just a copy of the weights

    # inference on one process from the ZeRO-3 shards
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", str(run_dir), "--prompt", "a large red circle at the top left", "--num-per-prompt", "2",
                     "--out", str(grid)]) == 0
    with Image.open(grid) as im:  # 2 images of 32 pixels, not one flat colour
        assert min(im.size) >= 32 and max(im.size) >= 64 and np.asarray(im).std() > 0
    assert cli.main(["caption", str(run_dir), "--shards", synthetic_data["val"], "--num", "3"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "\t" in l]
    assert [l.split("\t")[0] for l in lines] == ["00000000", "00000001", "00000002"]
    assert all(l.split("\t", 1)[1].strip() for l in lines)  # a caption for each

    out = tmp_path / "eval"
    assert cli.main(["eval", "caption", str(run_dir), "--num", "8", "--out", str(out / "caption")]) == 0
    report = json.loads((out / "caption" / "metrics.json").read_text())
    assert report["step"] == 20 and report["num_samples"] == 8
    # a trained model's captions share words with the references: scores above 0, equal to
    # pycocoevalcap's own on the captions and references the report shows
    expected = pycocoevalcap_directly({str(i): ex["references"] for i, ex in enumerate(report["examples"])},
                                      {str(i): ex["caption"] for i, ex in enumerate(report["examples"])})
    assert {k: report["scores"][k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert expected["BLEU-1"] > 0.1 and expected["ROUGE-L"] > 0.1, expected
    assert cli.main(["eval", "generate", str(run_dir), "--num", "8", "--out", str(out / "generate"), "--set", "eval.save_samples=true",
                     "--set", "eval.feature_extractor=tiny_random", "--set", f"eval.stats_cache={tmp_path / 'stats'}"]) == 0
    report = json.loads((out / "generate" / "metrics.json").read_text())
    (row,) = report["settings"]
    assert report["step"] == 20 and row["images"] == 8
    assert row["fid"] == pytest.approx(fid_directly(saved_samples(out / "generate", row["tag"]), val_images[:8]), rel=1e-6)
    assert all(0.0 <= row[f"attr_{k}"] <= 1.0 for k in ("kind", "color", "size", "exact", "count"))
    assert report["reference_image_accuracy"]["exact"] == 1.0
    assert (out / "generate" / "report.html").is_file() and (out / "caption" / "report.html").is_file()

    # zero-shot editing: the right half is regenerated, the left half is kept as context
    from mmtrain.data.sources import iter_samples
    from mmtrain.inference import edit_image, load_run, region_token_mask

    source = next(iter_samples(synthetic_data["val"]))["image"]
    source.save(tmp_path / "source.png")
    assert cli.main(["edit", str(run_dir), str(tmp_path / "source.png"), "--region", "0.5,0,1,1", "--prompt", "a small blue square",
                     "--num", "2", "--out", str(tmp_path / "edit.png")]) == 0
    assert (tmp_path / "edit.png").is_file()
    run = load_run(run_dir)
    region = region_token_mask(run, (0.5, 0.0, 1.0, 1.0))
    assert int(region.sum()) == region.numel() // 2
    edits = edit_image(run, source, region, "a small blue square", run.cfg.sample, num=2)
    src = np.asarray(source)
    for im in edits:
        arr = np.asarray(im)
        assert np.array_equal(arr[:, :16], src[:, :16])  # kept half: the input's pixels
        assert not np.array_equal(arr[:, 16:], src[:, 16:])
    assert cli.main(["edit", str(run_dir), str(tmp_path / "source.png"), "--region", "0.9,0.9,0.95,0.95", "--prompt", "x"]) == 2


def test_class_conditional_finetune_from_converted_official_checkpoint(synthetic_data, val_images, tmp_path):
    """official .pt (weights and key names of the official code: tests/fixtures) -> mmtrain convert ->
    train.init_from on 2 ZeRO-3 ranks, with a VAE and class-labelled data of the model's shapes -> sample by class."""
    import torch
    import yaml
    from safetensors.torch import load_file

    official = {k.removeprefix("model."): v for k, v in load_file(str(REPO / "tests" / "fixtures" /
                                                                       "causalfusion_official_tiny.safetensors")).items()
                if k.startswith("model.")}
    torch.save({"model": official, "ema": official, "args": None}, tmp_path / "official.pt")
    model_dir = tmp_path / "converted"
    # the fixture's model: 8x8x4 latents, patch 1, 10 classes; a downsample-4 VAE makes 8x8x4 of 32-pixel images
    assert cli.main(["convert", "causalfusion-official", str(tmp_path / "official.pt"), str(model_dir), "--patch-size", "1",
                     "--image-downsample", "4", "--image-tokenizer", "vae", "--scale-factor", "1"]) == 0
    converted = load_file(str(model_dir / "model.safetensors"))
    assert len(converted) == len(official)  # every official tensor has its place, none is new
    finetune = yaml.safe_load((model_dir / "config.yaml").read_text())
    finetune["tokenizer"]["image"] = yaml.safe_load((REPO / "tokenizers" / "small_vae.yaml").read_text())
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(finetune))

    # class-labelled data of the model's 10 classes, through `mmtrain prep manifest`
    images = tmp_path / "labelled"
    images.mkdir()
    rows = ["image,caption,label"]
    for i, pixels in enumerate(val_images[:20]):
        Image.fromarray(pixels).save(images / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,image {i},{i % 10}")
    (images / "manifest.csv").write_text("\n".join(rows) + "\n")
    assert cli.main(["prep", "manifest", str(images / "manifest.csv"), "--out", str(tmp_path / "shards"), "--resolution", "32",
                     "--val-fraction", "0", "--quiet"]) == 0

    run_dir = tmp_path / "run"
    overrides = [f"data.train_shards={tmp_path / 'shards' / 'train'}", f"train.run_dir={run_dir}", f"train.init_from={model_dir}",
                 f"data.index_cache={tmp_path / 'index'}", "data.image_size=32",
                 "train.steps=3", "train.micro_batch_size=4", "optim.lr=0", "data.num_workers=0",
                 "logging.progress=false", "logging.log_every=1", "checkpoint.every_steps=3", "sample.diffusion_steps=3",
                 "sample.ar_steps=2", "sample.clip_x0=1"]
    assert cli.main(["train", str(tmp_path / "finetune.yaml"), *overrides]) == 0
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 3 and all(0 < l < 1e3 for l in losses)
    state, _ = load_model_state(run_dir)
    assert state.keys() == converted.keys()
    for key in converted:  # lr 0: the run holds exactly the converted official weights
        torch.testing.assert_close(state[key], converted[key], rtol=0, atol=0)

    grid = tmp_path / "classes.png"
    assert cli.main(["sample", str(run_dir), "--class", "3", "--class", "9", "--num-per-prompt", "2", "--out", str(grid)]) == 0
    assert np.asarray(Image.open(grid)).std() > 0
    assert cli.main(["sample", str(run_dir), "--class", "10", "--out", str(grid)]) == 2  # outside num_classes


def test_training_on_precomputed_latents_matches_training_on_images(synthetic_data, tmp_path):
    """`mmtrain prep latents` (float32, pixel tokenizer) + data.use_latents: the same losses as decoding the images."""
    latent_dir = tmp_path / "latents"
    assert cli.main(["prep", "latents", synthetic_data["train"], "--out", str(latent_dir), "--dtype", "float32", "--quiet"]) == 0
    config = str(REPO / "configs" / "tiny.yaml")
    runs = {}
    for name, extra in (("images", []), ("latents", [f"data.train_shards={latent_dir}", "data.use_latents=true"])):
        run_dir = tmp_path / name
        overrides = tiny_overrides(synthetic_data, run_dir, "train.steps=4", "logging.log_every=2", "checkpoint.every_steps=100", *extra)
        assert cli.main(["train", config, *overrides]) == 0
        runs[name] = read_metrics(run_dir)
    assert [r["data_hash"] for r in runs["images"]] == [r["data_hash"] for r in runs["latents"]]
    np.testing.assert_allclose([r["loss"] for r in runs["images"]], [r["loss"] for r in runs["latents"]], rtol=1e-5)


@pytest.mark.parametrize("tokenizer,patch,latent", [("small_vae", 2, (4, 8)), ("sd_vae", 1, (4, 4))])
def test_image_tokenizer_is_chosen_by_config(synthetic_data, tmp_path, tokenizer, patch, latent):
    """The same training run on a VAE's latents, selected only by the tokenizer.image section (random weights here)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    image = yaml.safe_load((REPO / "tokenizers" / f"{tokenizer}.yaml").read_text())
    image["allow_random"] = True  # no weights can be downloaded here; real runs set tokenizer.image.path
    cfg["tokenizer"] = {"image": image}
    cfg["model"]["patch_size"] = patch
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(synthetic_data, run_dir, "train.steps=2", "logging.log_every=1", "checkpoint.every_steps=2")
    assert cli.main(["train", str(tmp_path / "cfg.yaml"), *overrides]) == 0
    assert all(0 < r["loss"] < 1e3 for r in read_metrics(run_dir))
    from mmtrain.inference import generate_images, load_run

    run = load_run(run_dir)
    channels, size = latent
    assert (run.model.latent_channels, run.model.latent_size) == (channels, size)
    images = generate_images(run, ["a small red circle at the top left"], run.cfg.sample)
    assert images[0].size == (32, 32)
