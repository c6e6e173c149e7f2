"""Parity with the official CausalFusion code through ``mmtrain convert causalfusion-official``.

The fixture (copied from ../shared/golden) holds a tiny official CausalDiffusionModel's
weights under their official key names, inputs and the official outputs of (a) the
training forward and (b) cached-condition inference with CFG 4.0. See its metadata notes.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmtrain import cli
from mmtrain.inference import load_model_dir
from mmtrain.models.causalfusion import ARContext, condition_prefix, guided, sincos_2d, split_inputs
from mmtrain.convert import CheckpointFormatError, read_official_checkpoint
from mmtrain.tokenize.image import patchify

FIXTURE = Path(__file__).parent / "fixtures" / "causalfusion_official_tiny.safetensors"


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(str(FIXTURE))
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    return tensors, meta


@pytest.fixture(scope="module", params=["plain", "training_dict"])
def converted(request, golden, tmp_path_factory):
    """The fixture's weights saved as an official .pt, converted with the CLI."""
    tensors, _ = golden
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "plain":
        ckpt = state
    else:  # what the official train.py saves: ema weights next to the raw ones and the optimizer
        ckpt = {"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "opt": {}, "args": None}
    torch.save(ckpt, tmp / "official.pt")
    # the CLI's entry point in this process (an interpreter start and a torch import less than a subprocess)
    assert cli.main(["convert", "causalfusion-official", str(tmp / "official.pt"), str(tmp / "out")]) == 0
    return load_model_dir(tmp / "out")


def test_converter_reads_the_shapes(converted, golden):
    _, meta = golden
    official = json.loads(meta["config"])
    cfg = converted.cfg.model
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_cond_tokens, cfg.num_classes, cfg.condition) == (
        official["hidden_size"], official["depth"], official["num_heads"], official["num_cond_tokens"], official["num_classes"], "class")
    assert converted.model.latent_size == official["input_size"] and converted.model.latent_channels == official["latent_channels"]


def test_training_forward_matches_official(converted, golden):
    tensors, meta = golden
    model = converted.model
    split = json.loads(meta["split_sizes"])
    order = tensors["in.order"]
    L = order.shape[1]
    # same generalized causal mask (official: True = blocked)
    lay = model.layout(order, **split_inputs(split, 0), loss_weights=torch.ones(L))
    assert torch.equal(~lay.attention_mask()[0], tensors["in.attn_mask"].bool())
    noise = patchify(tensors["in.noise"], 1)
    with torch.no_grad():
        out = model(latents_tokens=patchify(tensors["in.x"], 1), noisy_tokens=patchify(tensors["in.xn"], 1), t=tensors["in.t"],
                    target=noise, order=order, **split_inputs(split, model.cfg.seq_buckets), loss_weights=torch.ones(L),
                    labels=tensors["in.y"], return_pred=True)
    torch.testing.assert_close(out["pred"], tensors["out.pred_shuffled"], atol=1e-5, rtol=0)
    noise_ar = torch.gather(noise, 1, order[..., None].expand_as(noise))
    # the loss is the square of (noise - pred), pred being checked to 1e-5 just above: the square then agrees
    # to (1 + 2|noise - pred|) * 1e-5 (a flat 1e-5 failed by 1.6e-5 on a 2-core machine whose float kernels differ)
    residual = noise_ar - out["pred"]
    gap = (residual ** 2 - tensors["out.loss_elementwise"]).abs()
    assert bool((gap <= 1e-5 * (1 + 2 * residual.abs())).all()), float(gap.max())
    # and the model's own loss, not one rebuilt here from pred: with unit loss weights, the
    # official elementwise loss's mean (a wrong target gather, weighting or reduction fails it)
    official_loss = tensors["out.loss_elementwise"].double().mean()
    torch.testing.assert_close(out["diffusion_loss"].double(), official_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"].double(), official_loss, rtol=1e-5, atol=0)  # class-conditional: no text loss


def test_cached_cfg_inference_matches_official(converted, golden):
    tensors, _ = golden
    model = converted.model
    y = tensors["infer.y"]
    h, role = condition_prefix(model, labels=torch.cat([y, torch.full_like(y, model.cfg.num_classes)]))
    ctx = ARContext(model, h, role, use_cache=True)
    x, t = tensors["infer.xn_tokens"], tensors["infer.t"]
    raster = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    with torch.no_grad():
        out = guided(ctx.predict(model.image_embed(torch.cat([x, x]), torch.cat([raster, raster]), torch.cat([t, t]))), 4.0)
    torch.testing.assert_close(out, tensors["out.infer_cfg4"], atol=1e-5, rtol=0)


def test_fresh_position_embedding_follows_the_official_layout():
    """First half encodes the column (the official meshgrid puts w first), second half the row."""
    import numpy as np

    dim, grid = 16, 4
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))

    def one_d(pos):
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    rows, cols = np.divmod(np.arange(grid * grid), grid)
    expected = np.concatenate([one_d(cols), one_d(rows)], 1)
    torch.testing.assert_close(sincos_2d(dim, grid), torch.tensor(expected, dtype=torch.float32))


def test_converter_rejects_other_checkpoints(tmp_path, capsys):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointFormatError, match="x_proj.weight"):
        read_official_checkpoint(tmp_path / "other.pt")
    capsys.readouterr()
    assert cli.main(["convert", "causalfusion-official", str(tmp_path / "other.pt"), str(tmp_path / "out")]) == 2
    assert "x_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sampling_a_converted_model_without_its_vae(golden, tmp_path, capsys):
    """Tokens sample fine; decoding to pixels stops with an error naming the missing image tokenizer."""
    from mmtrain.config import SampleConfig
    from mmtrain.inference import generate_tokens
    from mmtrain.convert import convert_causalfusion_official

    tensors, _ = golden
    torch.save({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}, tmp_path / "official.pt")
    out = convert_causalfusion_official(tmp_path / "official.pt", tmp_path / "cf")
    run = load_model_dir(out)
    tokens = generate_tokens(run, [1, 7], SampleConfig(ar_steps=4, diffusion_steps=3, cfg_scale=4.0, clip_x0=0.0))
    assert tokens.shape == (2, 64, 4) and torch.isfinite(tokens).all()
    capsys.readouterr()
    assert cli.main(["sample", str(out), "--class", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "tokenizer.image.kind='mar_kl16'" in capsys.readouterr().err
