"""TransDiff and MRAR (``model.family: transdiff``): official parity through the converter,
encoder masks, the flow objective, the samplers, and a real 2-rank ZeRO-3 run through the CLI."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, assert_same_training, tiny_overrides, train_side_by_side

from mmtrain import cli
from mmtrain.config import ConfigError, load_config
from mmtrain.inference import load_model_dir
from mmtrain.models.config import ModelConfig, TransDiffConfig
from mmtrain.convert import convert_transdiff_state, transdiff_model_config
from mmtrain.models.diffusion import DiffusionConfig, build_diffusion
from mmtrain.models.transdiff import (TransDiff, encoder_mask, mrar_chains, reference_tokens, sample_image_tokens,
                                      training_inputs)
from mmtrain.tokenize.image import patchify

FIXTURE = Path(__file__).parent / "fixtures" / "transdiff_official_tiny.safetensors"
FLOW = DiffusionConfig(process="rectified_flow")


def tiny_model(condition="class", refs=2, queries=16, patch_size=2, **td) -> TransDiff:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, depth=2, num_heads=4, patch_size=patch_size, condition=condition, num_classes=5,
                      max_text_len=8, family="transdiff",
                      transdiff=TransDiffConfig(decoder_depth=2, buffer_size=4, num_queries=queries, mrar_refs=refs, **td))
    special = {"pad": 0, "bos": 1, "eos": 2, "boi": 3, "eoi": 4}
    model = TransDiff(cfg, latent_channels=3, latent_size=8, vocab_size=20 if condition == "text" else 0,
                      special_ids=special if condition == "text" else None)
    # the final layer starts at zero (no signal through the decoder); give it weights for the tests
    torch.nn.init.normal_(model.decoder.final_layer.linear.weight, std=0.1)
    return model.eval()


# --------------------------------------------------------------------------- official parity


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture's weights as the released ``checkpoint-last.pth`` ({'model': ...}), converted by the CLI."""
    tensors = load_file(str(FIXTURE))
    tmp = tmp_path_factory.mktemp("transdiff")
    torch.save({"model": {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}, "epoch": 7},
               tmp / "checkpoint-last.pth")
    # the CLI's entry point in this process (an interpreter start and a torch import less than a subprocess)
    assert cli.main(["convert", "transdiff-official", str(tmp / "checkpoint-last.pth"), str(tmp / "out"), "--num-heads", "4"]) == 0
    return load_model_dir(tmp / "out"), tensors


def test_converter_reads_the_official_shapes(converted):
    run, _ = converted
    cfg = run.model.cfg
    assert (cfg.family, cfg.hidden_size, cfg.depth, cfg.num_classes) == ("transdiff", 32, 2, 10)  # 2 x encoder_depth blocks
    assert (cfg.transdiff.decoder_depth, cfg.transdiff.buffer_size, cfg.transdiff.num_queries, cfg.transdiff.mrar_refs) == (2, 64, 256, 0)
    assert run.model.token_dim == 16 and run.model.num_image_tokens == 256
    assert run.cfg.diffusion.process == "rectified_flow" and run.cfg.sample.flow_sampler == "euler_maruyama"
    assert sum(p.numel() for p in run.model.parameters()) == 105_264 - 32 * 16 - 32 + 255 * 32  # - dead z_proj + per-slot queries


def test_encoder_and_decoder_match_official(converted):
    run, g = converted
    model = run.model
    with torch.no_grad():
        cond, valid = model.condition(labels=g["in.labels"])
        torch.testing.assert_close(model.encode(cond, valid), g["out.encoder_features"], atol=1e-5, rtol=0)
        null = torch.full_like(g["in.labels"], model.cfg.num_classes)  # the null class: fake_latent
        cond, valid = model.condition(labels=null)
        torch.testing.assert_close(model.encode(cond, valid), g["out.encoder_features_null"], atol=1e-5, rtol=0)
        velocity = model.decoder(g["in.x_t"], g["out.encoder_features"], g["in.t"])
        torch.testing.assert_close(velocity, g["out.velocity"], atol=1e-5, rtol=0)


def test_mrar_conversion_reorders_reference_columns():
    """An official MRAR encoder reads references as patchify(hw=8, p=2) with values (c, row, col)."""
    # official layout: patch_size 1, references of 2x2 latent pixels, queries as long as a reference
    model = tiny_model(refs=3, queries=16, patch_size=1, ref_patch=2, condition_sees_query=False)
    official = {}
    for key, value in model.state_dict().items():
        if key == "z_proj.weight":  # (row, col, c) -> the official (c, row, col)
            value = value.view(32, 2, 2, 3).permute(0, 3, 1, 2).reshape(32, 12)
        official[key.replace("decoder.", "diffdecoder.net.", 1)] = value
    cfg, channels, size = transdiff_model_config(official, num_heads=4, buffer_size=4)
    assert (cfg.transdiff.mrar_refs, cfg.transdiff.num_queries, cfg.transdiff.ref_patch, cfg.transdiff.condition_sees_query) == (3, 16, 2, False)
    back = TransDiff(cfg, latent_channels=channels, latent_size=size)
    back.load_state_dict(convert_transdiff_state(official, cfg, channels), strict=True)
    latent = torch.randn(2, 3, 8, 8)
    tokens = patchify(latent, 1)  # B, 64, 3
    # the official reference tokens of the same image (patchify hw=4, p=2, values (c, p, q)) and its z_proj on them
    ref_official = patchify(latent, 2).view(2, 16, 2, 2, 3).permute(0, 1, 4, 2, 3).reshape(2, 16, 12)
    ref_ours = reference_tokens(tokens, grid=8, ref_patch=2)
    torch.testing.assert_close(torch.nn.functional.linear(ref_official, official["z_proj.weight"]),
                               torch.nn.functional.linear(ref_ours, back.z_proj.weight), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- masks


def test_encoder_mask_is_block_causal():
    valid = torch.tensor([[True, True, True, False]])  # 3 text tokens + 1 pad
    m = encoder_mask(valid, num_queries=2, num_refs=2, ref_len=3, text_causal=True, condition_sees_query=True)[0]
    C, Q, R = 4, 2, 3
    q0, r0, r1 = C, C + Q, C + Q + R
    assert m[1, 0] and not m[0, 1]  # text is causal
    assert m[:, 3].nonzero().flatten().tolist() == [3]  # the pad is seen only by itself
    assert m[q0:r0, :3].all() and not m[:C, q0:].any()  # queries see the prompt; text sees no image block
    assert m[q0:r0, q0:r0].all() and not m[q0:r0, r0:].any()  # queries see each other, no reference
    assert m[r0:r1, :r1][:, [0, 1, 2, *range(q0, r1)]].all() and not m[r0:r1, r1:].any()  # ref 1 never sees ref 2
    assert m[r1:, :3].all() and m[r1:, q0:].all()
    cls = encoder_mask(torch.ones(1, 4, dtype=torch.bool), 2, 1, 3, text_causal=False, condition_sees_query=True)[0]
    assert cls[:4, :6].all() and not cls[:4, 6:].any()  # class buffer <-> queries (official 1-step), not references
    cls = encoder_mask(torch.ones(1, 4, dtype=torch.bool), 2, 1, 3, text_causal=False, condition_sees_query=False)[0]
    assert cls[:4, :4].all() and not cls[:4, 4:].any()  # the official MRAR encoder


@pytest.mark.parametrize("condition", ["class", "text"])
def test_features_of_a_block_do_not_depend_on_later_references(condition):
    model = tiny_model(condition, refs=2, queries=4)
    if condition == "class":
        cond, valid = model.condition(labels=torch.tensor([1, 3]))
    else:
        cond, valid = model.condition(text=torch.tensor([[1, 7, 9, 2], [1, 5, 2, 0]]), text_len=torch.tensor([4, 3]))
    refs = torch.randn(2, 2, 16, 12)
    changed = refs.clone()
    changed[:, 1] += 1.0
    with torch.no_grad():
        a, b = model.encode(cond, valid, refs), model.encode(cond, valid, changed)
        first = model.encode(cond, valid, refs[:, :1])
    head = model.context_len(1) + model.ref_len - model.ref_len  # queries + reference 1
    torch.testing.assert_close(a[:, :head], b[:, :head], atol=0, rtol=0)
    assert not torch.allclose(a[:, head:], b[:, head:])
    torch.testing.assert_close(a[:, :head], first, atol=1e-6, rtol=0)  # encoding with fewer references = a prefix


# --------------------------------------------------------------------------- objective


def test_mrar_chains_group_rows_of_one_condition():
    keys = [0, 1, 0, 2, 0, 1]
    index, length = mrar_chains(keys, 3, random.Random(0))
    assert length.tolist() == [3, 2, 3, 1, 3, 2]
    for b in range(6):
        chain = index[b, :length[b]].tolist()
        assert chain[0] == b and len(set(chain)) == len(chain) and {keys[c] for c in chain} == {keys[b]}
    index, length = mrar_chains(keys, 1, random.Random(0))
    assert length.tolist() == [1] * 6 and index[:, 0].tolist() == list(range(6))


def test_flow_objective_is_the_velocity_mse():
    model = tiny_model(refs=1, queries=4, diffusion_batch_mul=2)
    diffusion = build_diffusion(FLOW)
    x0 = torch.randn(6, 16, 12)
    labels = torch.tensor([0, 1, 0, 2, 4, 1])
    batch = training_inputs(model, x0, diffusion, torch.Generator().manual_seed(3), random.Random(0), labels=labels)
    n, m = model.max_images, 2
    assert batch["images"].shape == (6, n, 16, 12) and batch["t"].shape == (6, n, m)
    assert batch["num_images"].tolist() == [2, 2, 2, 1, 1, 2]
    t = batch["t"] / 1000.0
    noise = (batch["noisy"] - (1 - t[..., None, None]) * batch["images"][:, :, None]) / t[..., None, None]
    torch.testing.assert_close(batch["target"], noise - batch["images"][:, :, None], atol=1e-4, rtol=1e-4)  # v = noise - x0
    assert 0 < float(t.min()) and float(t.max()) < 1

    with torch.no_grad():
        out = model(**batch)
        # by hand: image i of every chain long enough, decoded from the first Q + i R features
        cond, valid = model.condition(labels=batch["labels"])
        feats = model.encode(cond, valid, batch["images"][:, :1])
        errs = []
        for b in range(6):
            for i in range(int(batch["num_images"][b])):
                ctx = feats[b:b + 1, :model.context_len(i)].expand(m, -1, -1)
                v = model.decoder(batch["noisy"][b, i], ctx, batch["t"][b, i])
                errs += ((v - batch["target"][b, i]) ** 2).mean((1, 2)).tolist()
    assert float(out["loss"]) == pytest.approx(float(np.mean(errs)), rel=1e-5)
    assert int(out["image_tokens"]) == len(errs) * 16


def test_training_reduces_the_loss():
    """A few AdamW steps on a fixed batch: the objective is learnable end to end (both parts get
    gradients). Measured on fixed held-out draws of t, noise and chains before and after, so the
    comparison does not depend on which noise levels the last training steps happened to draw."""
    model = tiny_model(refs=1, queries=4).train()
    diffusion = build_diffusion(FLOW)
    x0 = torch.rand(8, 16, 12) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(model(**training_inputs(model, x0, diffusion, torch.Generator().manual_seed(100 + s),
                                                                random.Random(100 + s), labels=labels))["loss"]) for s in range(8)]))

    before = held_out_loss()
    for step in range(45):
        batch = training_inputs(model, x0, diffusion, torch.Generator().manual_seed(step % 3), random.Random(step % 3), labels=labels)
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert model.encoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
            assert model.z_proj.weight.grad.abs().sum() > 0  # references reach the loss
        opt.step()
    after = held_out_loss()
    assert after < 0.7 * before, (before, after)


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
def test_flow_samplers_reach_a_point_mass(sampler):
    """For data = one point c the exact velocity is (x_t - c) / t. Euler lands on c. Euler-Maruyama
    keeps x_t's marginal (c at scale 1 - t, N(0, t^2) noise) down to t = 0.04; its last,
    noise-free step with the SDE drift (as official) leaves -0.04 x that noise."""
    c = torch.tensor([0.5, -0.25, 0.75])
    flow = build_diffusion(FLOW, 200)
    x = flow.sample(lambda x, t: (x - c) / (t[:, None] / 1000.0), torch.randn(4096, 3, generator=torch.Generator().manual_seed(0)),
                    generator=torch.Generator().manual_seed(1), sampler=sampler)
    if sampler == "euler":
        torch.testing.assert_close(x, c.expand_as(x), atol=1e-4, rtol=0)
    else:
        residual = x - c
        assert residual.mean(0).abs().max() < 0.005
        assert residual.std(0).tolist() == pytest.approx([0.04] * 3, rel=0.1)
    with pytest.raises(ValueError, match="flow_sampler"):
        flow.sample(lambda x, t: x, torch.zeros(1, 3), sampler="heun")
    # the same flow with an x0-predicting network: the exact prediction is c itself
    x0_flow = build_diffusion(DiffusionConfig(process="rectified_flow", prediction="x0"), 200)
    y = x0_flow.sample(lambda x, t: c.expand_as(x), torch.randn(4096, 3, generator=torch.Generator().manual_seed(0)),
                       generator=torch.Generator().manual_seed(1), sampler=sampler)
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)
    assert torch.equal(x0_flow.target(c, torch.zeros(3)), c) and torch.equal(flow.target(c, torch.zeros(3)), -c)


@pytest.mark.parametrize("condition", ["class", "text"])
@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
def test_sampler_shapes_and_determinism(condition, sampler):
    model = tiny_model(condition, refs=2, queries=4)
    flow = build_diffusion(FLOW, 4)
    cond = ({"labels": torch.tensor([0, 3, 4])} if condition == "class" else
            {"text": torch.tensor([[1, 7, 2, 0], [1, 5, 6, 2], [1, 9, 2, 0]]), "text_len": torch.tensor([3, 4, 3])})

    def draw(seed, **kw):
        kw = {"ar_steps": 3, "cfg_scale": 2.0, **kw}
        return sample_image_tokens(model, flow, generator=torch.Generator().manual_seed(seed), **cond,
                                   flow_options={"sampler": sampler}, **kw)

    a = draw(0)
    assert a.shape == (3, 16, 12) and torch.isfinite(a).all()
    torch.testing.assert_close(draw(0), a, atol=0, rtol=0)
    assert not torch.allclose(draw(1), a)
    assert not torch.allclose(draw(0, ar_steps=1), a)  # the references change the final image
    torch.testing.assert_close(draw(0, ar_steps=99), a, atol=0, rtol=0)  # capped at K + 1 = 3 images
    # CFG 1 is the conditional branch alone; it differs from guided sampling
    assert not torch.allclose(draw(0, cfg_scale=1.0), a)
    with pytest.raises(ValueError, match="causalfusion"):
        draw(0, known_tokens=a, known_mask=torch.ones(16, dtype=torch.bool))


def test_config_requires_rectified_flow(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  family: transdiff\n")
    with pytest.raises(ConfigError, match="diffusion.process=rectified_flow"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="model.family"):
        load_config(None, ["model.family=mar"])
    with pytest.raises(ConfigError, match="model.transdiff.decoder_depth"):
        load_config(None, ["model.family=transdiff", "diffusion.process=rectified_flow", "model.transdiff.decoder_depth=0"])
    with pytest.raises(ConfigError, match="flow_sampler"):
        load_config(None, ["sample.flow_sampler=euler_maruyama"])  # ddpm


# --------------------------------------------------------------------------- 2 ranks, ZeRO-3, the CLI


TRANSDIFF = ["model.family=transdiff", "diffusion.process=rectified_flow", "model.transdiff.decoder_depth=2",
             "model.transdiff.num_queries=8", "model.transdiff.mrar_refs=2", "model.patch_size=4", "sample.diffusion_steps=4"]


def test_transdiff_trains_on_two_zero3_ranks_resumes_exactly_and_samples_through_the_cli(synthetic_data, val_images, tmp_path,
                                                                                          capfd):
    from test_eval import fid_directly, saved_samples

    from mmtrain.config import SampleConfig
    from mmtrain.inference import generate_tokens, load_run, tokens_to_images

    config = str(REPO / "configs" / "tiny.yaml")

    def argv(run_dir: Path, *extra: str) -> list[str]:
        return ["train", config, *tiny_overrides(synthetic_data, run_dir, "train.steps=8", "logging.log_every=1",
                                                 "checkpoint.every_steps=4", *TRANSDIFF, *extra)]

    def metrics(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def train(run_dir: Path, *extra: str) -> list[dict]:
        assert cli.main(argv(run_dir, *extra)) == 0
        return metrics(run_dir)

    # the straight run and the launch that stops at step 4 are independent: trained side by side
    run_dir = tmp_path / "run"
    assert train_side_by_side(argv(tmp_path / "straight"), argv(run_dir, "train.stop_at=4")) == [0, 0]
    straight = metrics(tmp_path / "straight")
    assert [r["step"] for r in straight] == list(range(1, 9))
    losses = [r["loss"] for r in straight]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert all(r["text_loss"] == 0 for r in straight)
    # a launch that ends at step 4 with its checkpoint, and one that resumes from it, like any run:
    # steps 5-8 see the same data and give the same losses, weights and EMA as the straight run
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    capfd.readouterr()
    assert [r["step"] for r in train(run_dir)] == list(range(1, 9))
    assert "resumed from step00000004: step 4" in capfd.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000004", "step00000008"]
    assert_same_training(run_dir, tmp_path / "straight")

    grid = tmp_path / "grid.png"
    assert cli.main(["sample", str(run_dir), "--prompt", "a large red circle at the top left", "--num-per-prompt", "2",
                     "--out", str(grid), "--set", "sample.flow_sampler=euler_maruyama"]) == 0
    assert np.asarray(Image.open(grid)).std() > 0
    run = load_run(run_dir)
    tokens = generate_tokens(run, ["a red circle", "two blue squares"], SampleConfig(ar_steps=3, diffusion_steps=4))
    assert tokens.shape[0] == 2 and bool(torch.isfinite(tokens).all())
    assert not torch.allclose(tokens[0], tokens[1])  # two prompts, two noises: two images
    pixels = np.stack([np.asarray(im) for im in tokens_to_images(run, tokens)])
    assert pixels.shape == (2, 32, 32, 3) and pixels.std() > 0
    out = tmp_path / "eval"
    assert cli.main(["eval", "generate", str(run_dir), "--num", "4", "--ar-steps", "1,3", "--out", str(out),
                     "--set", "eval.feature_extractor=tiny_random", "--set", f"eval.stats_cache={tmp_path / 'stats'}",
                     "--set", "eval.save_samples=true"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert [row["ar_steps"] for row in report["settings"]] == [1, 3]
    for row in report["settings"]:
        assert row["images"] == 4
        assert row["fid"] == pytest.approx(fid_directly(saved_samples(out, row["tag"]), val_images[:4]), rel=1e-6)
    assert report["settings"][0]["fid"] != report["settings"][1]["fid"]  # MRAR steps change the images
    # captioning is CausalFusion's: a clear refusal, not a crash
    assert cli.main(["caption", str(run_dir), "--shards", synthetic_data["val"], "--num", "2"]) == 2
    assert "model.family=causalfusion" in capfd.readouterr().err
