"""One image path: a stored non-square image becomes the same model pixels on every way in
(the training loader, eval sets, the commands that read a dataset once, inference, prep at the
training size, the latent precompute), through mmtrain.data.images, whatever the shard format."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain import cli
from mmtrain.components.data import DataConfig, build_train_loader
from mmtrain.data.images import RESIZE_MODES, decode_image
from mmtrain.data.sources import iter_samples, iter_shards
from mmtrain.eval.samples import ShardEvalSet


@pytest.fixture(scope="module")
def wide_image_shards(tmp_path_factory) -> dict:
    """One 80x48 image (a left third unlike the rest, so a crop and a squash differ), as
    webdataset and as MDS through `mmtrain prep folder`, bytes kept as written."""
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    pixels[:, :13] = [250, 10, 10]  # inside the 16 columns a center crop of 80 x 48 drops
    (root / "raw").mkdir()
    Image.fromarray(pixels).save(root / "raw" / "wide.png")
    (root / "raw" / "wide.txt").write_text("a wide picture")
    for fmt in ("wds", "mds"):
        assert cli.main(["prep", "folder", str(root / "raw"), "--out", str(root / fmt), "--format", fmt,
                         "--resize-mode", "none", "--image-format", "png", "--quiet"]) == 0
    return {"pixels": pixels, "raw": str(root / "raw"), "wds": str(root / "wds" / "train"),
            "mds": str(root / "mds" / "train")}


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
def test_a_non_square_image_gives_the_same_pixels_on_every_path(wide_image_shards, synthetic_data, tmp_path, resize_mode):
    from test_eval import untrained_model_dir

    from mmtrain.inference import images_to_tokens, load_run
    from mmtrain.tokenize.image import unpatchify

    size = 32
    expected = decode_image(Image.fromarray(wide_image_shards["pixels"]), size, resize_mode)
    assert expected.shape == (size, size, 3)
    # a center crop drops the red left strip's first columns, a squash keeps all of it
    assert (expected[:, 0] == [250, 10, 10]).all() == (resize_mode == "resize")
    for fmt in ("wds", "mds"):
        shards = wide_image_shards[fmt]
        cfg = DataConfig(train_shards=shards, image_size=size, resize_mode=resize_mode, num_workers=0, index_cache="")
        batch = next(iter(build_train_loader(cfg, 1, 0, world_size=1, seed=0, start_sample=0)))
        paths = {
            "training loader": batch.pixels[0].numpy(),
            "eval set": np.asarray(ShardEvalSet(shards, 1, size, resize_mode).load(0).image),
            "iter_samples (caption, tokenizer, VAE, scale)": np.asarray(next(iter_samples(shards, image_size=size,
                                                                                          resize_mode=resize_mode))["image"]),
        }
        for name, got in paths.items():
            assert np.array_equal(got, expected), (fmt, name)

    # inference: the pixel tokenizer's tokens of the full-size image, turned back into pixels
    model = untrained_model_dir(synthetic_data, tmp_path / "model", f"data.resize_mode={resize_mode}")
    run = load_run(model)
    tokens = images_to_tokens(run, [Image.fromarray(wide_image_shards["pixels"])])
    latent = unpatchify(tokens, run.cfg.model.patch_size, size, size)[0]  # 3, H, W in [-1, 1]
    restored = torch.round((latent + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(restored, expected)


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
def test_prep_and_latents_make_the_loaders_pixels_of_a_non_square_image(wide_image_shards, tmp_path, resize_mode):
    """`prep folder --resolution` stores, and `prep latents --image-size` encodes, exactly the pixels the
    loader makes of the full-size image with the same size and resize mode."""
    from mmtrain.data.prep import precompute_latents

    size = 32
    expected = decode_image(Image.fromarray(wide_image_shards["pixels"]), size, resize_mode)
    prepped = tmp_path / "prepped"
    assert cli.main(["prep", "folder", wide_image_shards["raw"], "--out", str(prepped), "--resolution", str(size),
                     "--resize-mode", resize_mode, "--image-format", "png", "--quiet"]) == 0
    ((_, (stored,)),) = list(iter_shards(prepped / "train"))
    with Image.open(io.BytesIO(stored.image)) as image:
        assert np.array_equal(np.asarray(image), expected), "prep"
    read = next(iter_samples(prepped / "train", image_size=size, resize_mode=resize_mode))["image"]
    assert np.array_equal(np.asarray(read), expected), "loader on the prepped shard"

    for fmt in ("wds", "mds"):  # the pixels tokenizer is x / 127.5 - 1: inverted, the latent is the pixels it saw
        out = tmp_path / f"latents-{fmt}"
        stats = precompute_latents(wide_image_shards[fmt], out, "pixels", dtype="float32", device="cpu",
                                   progress=False, image_size=size, resize_mode=resize_mode)
        assert stats["latent_shapes"] == {f"3x{size}x{size}": 1}
        ((_, (sample,)),) = list(iter_shards(out))
        restored = np.round((sample.latent + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        assert np.array_equal(restored, expected), ("latents", fmt)
