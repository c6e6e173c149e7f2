"""VAE image tokenizers: LDM/MAR -> diffusers conversion parity and the VAETokenizer API."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmtrain.tokenize.convert_vae import (
    MAR_KL16,
    SD_VAE,
    VAEConversionError,
    convert_ldm_vae_state_dict,
    extract_vae_state,
    ldm_vae_config,
    load_ldm_vae,
    save_diffusers,
)
from mmtrain.tokenize.build import build_image_tokenizer
from mmtrain.tokenize.image import ImageTokenizerConfig
from mmtrain.tokenize.vae import VAETokenizer, estimate_scale_factor

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "fixtures" / "mar_kl16_vae_tiny.safetensors"


def _golden_config() -> dict:
    with safe_open(str(GOLDEN), "pt") as f:
        meta = json.loads(f.metadata()["config"])
    return {"ch": meta["ch"], "ch_mult": meta["ch_mult"], "embed_dim": meta["embed_dim"],
                "num_res_blocks": meta["num_res_blocks"], "encoder_attn_resolutions": meta["encoder_attn_resolutions"],
                "decoder_attn_resolutions": meta["decoder_attn_resolutions"], "resolution": meta["resolution_param"]}


@pytest.fixture(scope="module")
def golden() -> dict:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def golden_vae():
    return load_ldm_vae(GOLDEN, _golden_config())


@pytest.fixture(scope="module")
def golden_dir(golden_vae, tmp_path_factory) -> Path:
    return save_diffusers(golden_vae, tmp_path_factory.mktemp("vae") / "mar_tiny")


# ------------------------------------------------------------- parity
def test_encoder_parity_with_official_mar(golden, golden_vae):
    with torch.no_grad():
        dist = golden_vae.encode(golden["in.image"]).latent_dist
    # Both MAR and diffusers clamp logvar to [-30, 20]; the golden holds MAR's clamped value.
    torch.testing.assert_close(dist.mean, golden["out.posterior_mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(dist.logvar, golden["out.posterior_logvar"], atol=1e-4, rtol=0)


def test_decoder_parity_with_official_mar(golden, golden_vae):
    with torch.no_grad():
        out = golden_vae.decode(golden["in.latent"]).sample
    assert out.shape == golden["out.decoded"].shape
    torch.testing.assert_close(out, golden["out.decoded"], atol=1e-4, rtol=0)


def test_encoder_attention_lands_in_last_down_level(golden_vae):
    # MAR's attention at resolution 16 (of 256) is down level 4; the decoder has none outside the mid block.
    assert type(golden_vae.encoder.down_blocks[4]).__name__ == "AttnDownEncoderBlock2D"
    assert all(type(b).__name__ == "DownEncoderBlock2D" for b in golden_vae.encoder.down_blocks[:4])
    assert all(not getattr(b, "attentions", None) for b in golden_vae.decoder.up_blocks)


def test_known_configs():
    mar = ldm_vae_config(**MAR_KL16)
    assert mar["block_out_channels"] == [128, 128, 256, 256, 512]
    assert mar["latent_channels"] == 16
    assert mar["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    sd = ldm_vae_config(**SD_VAE)
    # The published diffusers config of the SD VAE (e.g. sd-vae-ft-mse/config.json).
    assert sd["block_out_channels"] == [128, 256, 512, 512]
    assert sd["down_block_types"] == ["DownEncoderBlock2D"] * 4
    assert sd["up_block_types"] == ["UpDecoderBlock2D"] * 4
    assert (sd["latent_channels"], sd["layers_per_block"], sd["norm_num_groups"]) == (4, 2, 32)


def test_checkpoint_wrappers_and_prefixes(golden, tmp_path):
    # MAR saves torch {"model": state_dict}; LDM/SD prefixes the VAE with first_stage_model.
    sd = {k[len("model."):]: v for k, v in golden.items() if k.startswith("model.")}
    torch.save({"model": sd}, tmp_path / "mar.ckpt")
    ldm = {f"first_stage_model.{k}": v for k, v in sd.items()}
    ldm["cond_stage_model.foo"] = torch.zeros(1)  # unrelated weights of the full LDM are dropped
    ldm["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only loss state is dropped
    torch.save({"state_dict": ldm}, tmp_path / "sd.ckpt")
    for name in ("mar.ckpt", "sd.ckpt"):
        vae = load_ldm_vae(tmp_path / name, _golden_config())
        with torch.no_grad():
            out = vae.decode(golden["in.latent"]).sample
        torch.testing.assert_close(out, golden["out.decoded"], atol=1e-4, rtol=0)


# ------------------------------------------------------------- errors
def test_unknown_key_layout_is_named(golden):
    sd = extract_vae_state(golden, "golden")
    sd["encoder.down.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(VAEConversionError, match=r"encoder\.down\.0\.mystery\.weight"):
        convert_ldm_vae_state_dict(sd, "golden")


def test_decoder_level_attention_is_refused():
    with pytest.raises(VAEConversionError, match="decoder up levels"):
        ldm_vae_config(**{**MAR_KL16, "decoder_attn_resolutions": [16]})


def test_attention_resolution_matching_no_level_is_refused():
    with pytest.raises(VAEConversionError, match="match no level"):
        ldm_vae_config(**{**MAR_KL16, "encoder_attn_resolutions": [15]})


def test_wrong_architecture_names_file_and_keys(tmp_path):
    # The tiny golden (ch=32) does not fit the full-size MAR KL-16 (ch=128).
    with pytest.raises(VAEConversionError, match=r"mar_kl16_vae_tiny\.safetensors.*shape mismatches: decoder\.conv_in\.bias: checkpoint \(128,\) vs model \(512,\)"):
        build_image_tokenizer(ImageTokenizerConfig(kind="mar_kl16", path=str(GOLDEN)))


def test_missing_keys_are_reported(golden, tmp_path):
    sd = {k: v for k, v in golden.items() if k.startswith("model.") and "post_quant_conv" not in k}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(VAEConversionError, match=r"partial\.safetensors.*missing: post_quant_conv\.bias"):
        load_ldm_vae(tmp_path / "partial.safetensors", _golden_config())


@pytest.mark.parametrize("kind", ["mar_kl16", "sd_vae", "vae"])
def test_missing_path_without_allow_random(kind):
    with pytest.raises(ValueError, match=r"needs image_tokenizer\.path.*never downloaded"):
        build_image_tokenizer(ImageTokenizerConfig(kind=kind))


def test_nonexistent_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        build_image_tokenizer(ImageTokenizerConfig(kind="mar_kl16", path=str(tmp_path / "nope.ckpt")))


# ------------------------------------------------------------- tokenizer API
def test_vae_tokenizer_round_trip_through_image_api(golden, golden_dir):
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="vae", path=str(golden_dir), scale_factor=0.2325,
                                                     shift_factor=0.1))
    assert isinstance(tok, VAETokenizer)
    assert (tok.latent_channels, tok.downsample) == (16, 16)
    assert tok.latent_shape(64, 32) == (16, 4, 2)
    with torch.no_grad():
        z = tok.encode(golden["in.image"])
        # Normalization is applied on top of the posterior mean...
        torch.testing.assert_close(z, (golden["out.posterior_mean"] - 0.1) * 0.2325, atol=1e-4, rtol=0)
        # ...and undone before the decoder.
        latents = golden["in.latent"] * 0.2325 - 0.1 * 0.2325  # normalized form of in.latent
        torch.testing.assert_close(tok.decode(latents), golden["out.decoded"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="divisible by the downsample factor 16"):
        tok.encode(torch.zeros(1, 3, 40, 40))


def test_sample_posterior_draws_around_mean(golden, golden_dir):
    mean_tok = build_image_tokenizer(ImageTokenizerConfig(kind="vae", path=str(golden_dir)))
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="vae", path=str(golden_dir), sample_posterior=True))
    with torch.no_grad():
        a, b = tok.encode(golden["in.image"]), tok.encode(golden["in.image"])
        m = mean_tok.encode(golden["in.image"])
    assert not torch.equal(a, b)
    std = torch.exp(0.5 * golden["out.posterior_logvar"])
    # A posterior draw differs from the mean by about one posterior std.
    ratio = ((a - m) / std).std().item()
    assert 0.8 < ratio < 1.2


def test_small_vae_yaml_and_estimate_scale_factor():
    cfg = ImageTokenizerConfig(**yaml.safe_load((REPO / "tokenizers" / "small_vae.yaml").read_text()))
    torch.manual_seed(0)
    tok = build_image_tokenizer(cfg)
    assert (tok.latent_channels, tok.downsample) == (4, 4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3)]
    est = estimate_scale_factor(tok, iter(batches), num_samples=20, with_shift=True)
    assert est["num_samples"] == 20
    tok.scale_factor, tok.shift_factor = est["scale_factor"], est["shift_factor"]
    with torch.no_grad():
        z = torch.cat([tok.encode(b) for b in batches])[:20]
    assert z.shape == (20, 4, 8, 8)
    assert abs(z.std().item() - 1.0) < 1e-3
    assert abs(z.mean().item()) < 1e-3
    # The random init is far from unit std, so the estimate did real work.
    assert abs(est["scale_factor"] - 1.0) > 0.05


def test_mar_kl16_yaml_matches_published_scale():
    cfg = ImageTokenizerConfig(**yaml.safe_load((REPO / "tokenizers" / "mar_kl16.yaml").read_text()))
    assert (cfg.kind, cfg.scale_factor, cfg.path, cfg.allow_random) == ("mar_kl16", 0.2325, "", False)
    with pytest.raises(ValueError, match="needs image_tokenizer.path"):
        build_image_tokenizer(cfg)
    sd = ImageTokenizerConfig(**yaml.safe_load((REPO / "tokenizers" / "sd_vae.yaml").read_text()))
    assert (sd.kind, sd.scale_factor) == ("sd_vae", 0.18215)


def test_mar_kind_rejects_diffusers_dir_of_other_arch(golden_dir):
    with pytest.raises(ValueError, match="block_out_channels"):
        build_image_tokenizer(ImageTokenizerConfig(kind="mar_kl16", path=str(golden_dir)))


def test_cli_estimate_scale_writes_a_normalised_tokenizer_config(synthetic_data, tmp_path, capsys):
    import yaml

    from mmtrain import cli
    from mmtrain.config import build_dataclass
    from mmtrain.data.sources import iter_samples
    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.image import ImageTokenizerConfig, pil_to_tensor

    src = Path(__file__).parent.parent / "tokenizers" / "small_vae.yaml"
    out = tmp_path / "small_vae_scaled.yaml"
    assert cli.main(["tokenizer", "estimate-scale", str(src), "--shards", synthetic_data["train"], "--num", "64",
                     "--image-size", "32", "--shift", "--write", str(out)]) == 0
    tree = yaml.safe_load(out.read_text())
    assert tree["scale_factor"] != 1.0 and tree["arch"] == yaml.safe_load(src.read_text())["arch"]
    tok = build_image_tokenizer(build_dataclass(ImageTokenizerConfig, tree, "tokenizer.image"))
    images = [s["image"] for _, s in zip(range(64), iter_samples(synthetic_data["train"]))]
    with torch.no_grad():
        z = tok.encode(pil_to_tensor(images))
    assert abs(float(z.std()) - 1.0) < 1e-2 and abs(float(z.mean())) < 1e-2


def test_cli_convert_vae_names_the_mismatch(tmp_path, capsys):
    """The tiny golden (base width 32) is not the released KL-16 shape: the CLI stops with exit 2 and says why."""
    from mmtrain import cli

    assert cli.main(["convert", "vae", str(GOLDEN), str(tmp_path / "out"), "--arch", "mar_kl16"]) == 2
    err = capsys.readouterr().err
    # the file, and the first mismatching tensor with both shapes (base width 32 vs the released 128)
    assert f"{GOLDEN}: checkpoint does not fit the configured AutoencoderKL" in err
    assert "decoder.conv_in.weight: checkpoint (128, 16, 3, 3) vs model (512, 16, 3, 3)" in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_train_vae_reconstructs_held_out_synthetic_images(synthetic_data, tmp_path, capsys):
    """`mmtrain tokenizer train-vae` for 60 steps: held-out MSE (images in [-1, 1]) below 0.08, far below the untrained VAE's.

    Measured here on the demo shards: 0.058 after 60 steps, 0.010 after 300 steps (25.9 dB PSNR).
    """
    from mmtrain import cli
    from mmtrain.config import build_dataclass
    from mmtrain.data.sources import iter_samples
    from mmtrain.tokenize.image import pil_to_tensor
    from mmtrain.tokenize.train_vae import VAETrainConfig

    out = tmp_path / "vae"
    assert cli.main(["tokenizer", "train-vae", "--shards", synthetic_data["train"], "--out", str(out), "--steps", "60", "--quiet"]) == 0
    tree = yaml.safe_load((out / "tokenizer.yaml").read_text())
    trained = build_image_tokenizer(build_dataclass(ImageTokenizerConfig, tree, "tokenizer.image"))
    untrained = build_image_tokenizer(ImageTokenizerConfig(kind="vae", allow_random=True, arch=VAETrainConfig().arch))
    x = pil_to_tensor([s["image"] for s in iter_samples(synthetic_data["val"])])
    with torch.no_grad():
        mse = float(((trained.decode(trained.encode(x)) - x) ** 2).mean())
        base = float(((untrained.decode(untrained.encode(x)) - x) ** 2).mean())
        z = trained.encode(x)
    assert mse < 0.08 and mse < 0.3 * base, (mse, base)
    assert trained.latent_shape(32, 32) == (4, 8, 8) and 0.5 < float(z.std()) < 2.0  # the measured scale normalises the latents


def test_train_vae_perceptual_term_from_local_vgg_weights(synthetic_data, tmp_path, capsys):
    """A local VGG-16 state_dict (random weights here; nothing is downloaded) adds the perceptual term; a bad file is named."""
    from torchvision.models import vgg16

    from mmtrain import cli
    from mmtrain.tokenize.train_vae import VGGFeatureDistance

    torch.manual_seed(0)
    torch.save(vgg16().state_dict(), tmp_path / "vgg16.pth")
    dist = VGGFeatureDistance(str(tmp_path / "vgg16.pth"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(dist(x, x)) == 0.0 and float(dist(x, x.flip(-1))) > 0
    # the same 2 steps (seed, data) with and without the term: it enters the loss and the gradient
    for name, extra in (("v", ["--perceptual-weights", str(tmp_path / "vgg16.pth")]), ("plain", [])):
        assert cli.main(["tokenizer", "train-vae", "--shards", synthetic_data["train"], "--out", str(tmp_path / name),
                         "--steps", "2", "--quiet", *extra]) == 0
    assert (tmp_path / "v" / "tokenizer.yaml").is_file()
    from safetensors.torch import load_file

    with_term, without = (load_file(tmp_path / n / "vae" / "diffusion_pytorch_model.safetensors") for n in ("v", "plain"))
    assert with_term.keys() == without.keys()
    assert any(not torch.equal(with_term[k], without[k]) for k in with_term)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "bad.pth")
    assert cli.main(["tokenizer", "train-vae", "--shards", synthetic_data["train"], "--out", str(tmp_path / "w"), "--steps", "2",
                     "--perceptual-weights", str(tmp_path / "bad.pth"), "--quiet"]) == 2
    err = capsys.readouterr().err
    # the file, what it is not, and the tensors: a vgg16 one it lacks, the one it has instead
    assert f"perceptual_weights={tmp_path / 'bad.pth'}: not a torchvision vgg16 state_dict" in err
    assert '"features.0.weight"' in err and 'Unexpected key(s) in state_dict: "weight"' in err
