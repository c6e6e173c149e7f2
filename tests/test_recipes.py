"""Recipes for captioned 256-pixel images on a VAE (configs/captions256_*.yaml), end to end on a
tiny random diffusers VAE: a folder of captioned non-square images -> `prep folder` -> `prep
latents` (given a tokenizer.yaml, or a kind and a path) -> a couple of training steps of the
small recipe shrunk by overrides, with `tokenizer.image=<tokenizer.yaml>`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, train_side_by_side

from mmtrain import cli
from mmtrain.config import load_config
from mmtrain.errors import ConfigError

CONFIGS = REPO / "configs"
# 4 levels: 8x downsampling and 4 latent channels, as SD's VAE, at a few thousand parameters
TINY_SD_ARCH = {"block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "latent_channels": 4,
                "norm_num_groups": 4, "sample_size": 32}
SCALE = 0.75
SIZE = 32  # training pixels of the shrunk run: 4x4 latents


def special_ids() -> dict:
    return {"pad": 0, "bos": 2, "eos": 3, "boi": 4, "eoi": 5}


@pytest.mark.parametrize("name,shape,millions", [("small", (768, 12, 12), 98), ("l", (1024, 24, 16), 320)])
def test_recipe_sizes(name, shape, millions):
    """Both recipes load, ask for SD-VAE latents of 256-pixel images and a real-caption text length, and
    have the sizes their comments state (with an 8,000-piece text vocabulary, counted on the meta device).
    They leave the data, text tokenizer and run directory to the command line."""
    from mmtrain.models.causalfusion import CausalFusion

    cfg = load_config(CONFIGS / f"captions256_{name}.yaml")
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == shape
    assert cfg.model.condition == "text" and cfg.model.max_text_len == 64
    assert cfg.data.image_size == 256 and cfg.data.resize_mode == "center_crop"
    assert (cfg.data.train_shards, cfg.tokenizer.text_model) == ("", "") and not cfg.data.sources
    assert (cfg.tokenizer.image.kind, cfg.tokenizer.image.scale_factor, cfg.tokenizer.image.path) == ("sd_vae", 0.18215, "")
    latent = 256 // 8
    assert latent % cfg.model.patch_size == 0 and (latent // cfg.model.patch_size) ** 2 == 256
    with torch.device("meta"):
        model = CausalFusion(cfg.model, latent_channels=4, latent_size=latent, vocab_size=8000, special_ids=special_ids())
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions
    # the VAE path is a placeholder: the preflight's check (before any rank starts) says what to set
    from mmtrain.tokenize.build import check_image_tokenizer

    with pytest.raises(ConfigError, match=r"tokenizer.image.path is not set: kind 'sd_vae' needs .* set tokenizer.image.path="):
        check_image_tokenizer(cfg.tokenizer.image)
    cfg.tokenizer.image.path = "/nonexistent/sd-vae"
    with pytest.raises(ConfigError, match="tokenizer.image.path=/nonexistent/sd-vae: no such file or folder"):
        check_image_tokenizer(cfg.tokenizer.image)


def test_tokenizer_image_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer.image=.*missing.yaml: no such tokenizer file"):
        load_config(CONFIGS / "tiny.yaml", [f"tokenizer.image={tmp_path / 'missing.yaml'}"])
    with pytest.raises(ConfigError, match="to choose a kind, set tokenizer.image.kind=sd_vae"):
        load_config(CONFIGS / "tiny.yaml", ["tokenizer.image=sd_vae"])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(CONFIGS / "tiny.yaml", [f"tokenizer.image={tmp_path / 'list.yaml'}"])
    (tmp_path / "typo.yaml").write_text("kind: vae\nscale: 0.5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'tokenizer.image.scale'"):
        load_config(CONFIGS / "tiny.yaml", [f"tokenizer.image={tmp_path / 'typo.yaml'}"])
    # in a config file too, with an override of one of its fields after it
    (tmp_path / "tok.yaml").write_text("kind: vae\npath: weights/vae\nscale_factor: 0.5\n")
    (tmp_path / "run.yaml").write_text(f"tokenizer:\n  image: {tmp_path / 'tok.yaml'}\n")
    cfg = load_config(tmp_path / "run.yaml", ["tokenizer.image.shift_factor=0.25"])
    assert (cfg.tokenizer.image.kind, cfg.tokenizer.image.scale_factor, cfg.tokenizer.image.shift_factor) == ("vae", 0.5, 0.25)
    assert cfg.tokenizer.image.path == str(tmp_path / "weights" / "vae")  # relative to the yaml's folder


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> dict:
    """A tiny random diffusers VAE saved with its own save_pretrained, a tokenizer.yaml naming it by a
    relative path, and a folder of captioned non-square images of several sizes."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from mmtrain.tokenize.train_vae import write_tokenizer_yaml

    root = tmp_path_factory.mktemp("captions256")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_SD_ARCH).eval().save_pretrained(root / "tok" / "vae")
    tok_yaml = write_tokenizer_yaml(root / "tok" / "tokenizer.yaml",
                                    {"kind": "vae", "path": "vae", "scale_factor": SCALE, "shift_factor": 0.0}, by="a test")
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (40, 64), (72, 56), (64, 48)]  # W, H: none square, all larger than SIZE
    words = ["a", "red", "cat", "on", "the", "blue", "mat", "sits", "near", "window", "at", "noon"]
    folder = root / "photos"
    for i in range(12):
        w, h = sizes[i % len(sizes)]
        sub = folder / ("sub" if i % 3 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"img{i:02d}.png")
        (sub / f"img{i:02d}.txt").write_text(" ".join(rng.choice(words, 6 + i % 5)))
    return {"root": root, "vae": root / "tok" / "vae", "tok_yaml": tok_yaml, "folder": folder}


def _latents_by_key(shards: Path) -> dict[str, np.ndarray]:
    import io
    import tarfile

    out = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".latent.npy"):
                    out[m.name[: -len(".latent.npy")]] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return out


def test_captions_on_a_vae_from_folder_to_training(captioned, synthetic_data, tmp_path, caplog):
    from diffusers import AutoencoderKL

    from mmtrain.components.data import open_sources, warn_if_downscaled
    from mmtrain.data.images import decode_image
    from mmtrain.data.sources import iter_samples

    data = tmp_path / "data"
    assert cli.main(["prep", "folder", str(captioned["folder"]), "--out", str(data), "--quiet"]) == 0
    # `prep latents` given the tokenizer.yaml, and given the kind and the VAE folder (+ its scale): same latents
    common = ["--image-size", str(SIZE), "--resize-mode", "center_crop", "--dtype", "float32", "--quiet"]
    assert cli.main(["prep", "latents", str(data / "train"), "--out", str(tmp_path / "lat_yaml"),
                     "--tokenizer", str(captioned["tok_yaml"]), *common]) == 0
    assert cli.main(["prep", "latents", str(data / "train"), "--out", str(tmp_path / "lat_kind"),
                     "--tokenizer", "vae", "--tokenizer-path", str(captioned["vae"]), "--scale-factor", str(SCALE), *common]) == 0
    by_yaml, by_kind = _latents_by_key(tmp_path / "lat_yaml"), _latents_by_key(tmp_path / "lat_kind")
    assert len(by_yaml) == 12 and by_yaml.keys() == by_kind.keys()
    stats = json.loads((tmp_path / "lat_yaml" / "stats.json").read_text())
    assert stats["latent_shapes"] == {"4x4x4": 12} and stats["tokenizer"]["path"] == str(captioned["vae"].resolve())
    # each latent is the VAE's own encode (posterior mean, then the scale) of the pixels the trainer makes
    vae = AutoencoderKL.from_pretrained(str(captioned["vae"]), local_files_only=True).eval()
    stored_sizes = set()
    for sample in iter_samples(data / "train", want_image=True, image_size=0):
        stored_sizes.add(sample["image"].size)
        pixels = decode_image(sample["image"], SIZE, "center_crop")  # SIZE, SIZE, 3 uint8
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            want = (vae.encode(x).latent_dist.mode() * SCALE)[0].numpy()
        np.testing.assert_allclose(by_yaml[sample["key"]], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(by_kind[sample["key"]], by_yaml[sample["key"]])
    assert len(stored_sizes) == 4 and all(w != h for w, h in stored_sizes)  # stored as made: non-square, several sizes

    # training on the stored (larger) images says that the loader downscales them, and which key to change
    cfg = load_config(CONFIGS / "captions256_small.yaml", [f"data.train_shards={data / 'train'}",
                                                           f"data.image_size={SIZE}", f"data.index_cache={tmp_path / 'ix'}"])
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        warn_if_downscaled(cfg.data, open_sources(cfg.data), cfg.data.train_sources())
    assert f"larger than data.image_size={SIZE}" in caplog.text and "set data.image_size=" in caplog.text

    # a couple of steps of the small recipe, shrunk, with tokenizer.image=<tokenizer.yaml>: on the precomputed
    # latents, and (the recipe's default) encoding the stored images with the VAE on the fly
    common = [f"tokenizer.text_model={synthetic_data['tokenizer']}", f"data.index_cache={tmp_path / 'ix'}",
              f"tokenizer.image={captioned['tok_yaml']}", f"data.image_size={SIZE}", "data.num_workers=0",
              "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.max_text_len=24", "train.steps=2",
              "train.micro_batch_size=4", "train.nproc_per_node=1", "train.precision=fp32", "optim.warmup_steps=1",
              "logging.log_every=1", "logging.progress=false", "logging.wandb=false", "checkpoint.every_steps=1000"]
    runs = {"latents": [f"data.train_shards={tmp_path / 'lat_yaml'}", "data.use_latents=true"],
            "pixels": [f"data.train_shards={data / 'train'}"]}
    # the two runs are independent: trained side by side
    assert train_side_by_side(*(["train", str(CONFIGS / "captions256_small.yaml"), f"train.run_dir={tmp_path / f'run_{name}'}",
                                 *data_keys, *common] for name, data_keys in runs.items())) == [0, 0]
    for name in runs:
        run_dir = tmp_path / f"run_{name}"
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert len(losses) == 2 and all(np.isfinite(losses)), (name, losses)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())["tokenizer"]["image"]
        assert saved == {"kind": "vae", "scale_factor": SCALE, "shift_factor": 0.0, "path": str(captioned["vae"].resolve()),
                         "allow_random": False, "sample_posterior": False, "arch": {}}
        assert load_config(run_dir / "config.yaml").tokenizer.image.path == str(captioned["vae"].resolve())  # self-contained


def test_prep_latents_names_a_missing_vae(synthetic_data, tmp_path, capsys):
    for tokenizer in ("sd_vae", str(REPO / "tokenizers" / "sd_vae.yaml")):
        assert cli.main(["prep", "latents", synthetic_data["train"], "--out", str(tmp_path / "lat"), "--tokenizer", tokenizer]) == 2
        assert "a 'sd_vae' VAE needs its weights: give --tokenizer-path" in capsys.readouterr().err
    assert cli.main(["prep", "latents", synthetic_data["train"], "--out", str(tmp_path / "lat"),
                     "--tokenizer", str(tmp_path / "nope.yaml")]) == 2
    assert f"--tokenizer={tmp_path / 'nope.yaml'}: no such tokenizer file" in capsys.readouterr().err
