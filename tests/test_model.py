"""The joint model: training forward, KV-cache sampling, captioning decode."""
import random

import pytest
import torch

from mmtrain.models.causalfusion import (CausalFusion, ModelConfig, even_ar_split, generate_caption_ids,
                                         sample_image_tokens, training_inputs)
from mmtrain.models.diffusion import DiffusionConfig, GaussianDiffusion, respaced_timesteps

SPECIAL = dict(pad=0, bos=2, eos=3, boi=4, eoi=5)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=64, depth=2, num_heads=4, patch_size=4, max_text_len=10, **kw)
    model = CausalFusion(cfg, vocab_size=40, latent_channels=3, latent_size=16, special_ids=SPECIAL)
    # the eps head starts at zero (as in DiT); give it weights so sampling paths differ
    torch.nn.init.normal_(model.eps_head.weight, std=0.05)
    return model.eval()


def batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(6, 40, (B, 10), generator=g)
    text[:, 0] = 2
    text_len = torch.randint(3, 11, (B,), generator=g)
    text[torch.arange(B), text_len - 1] = 3
    return torch.randn(B, 16, 48, generator=g), text, text_len


def test_training_forward_is_finite_and_reaches_every_parameter():
    model = tiny_model().train()
    tokens, text, text_len = batch()
    inputs = training_inputs(model, tokens, text, text_len, GaussianDiffusion(DiffusionConfig()), torch.Generator().manual_seed(0), random.Random(0))
    out = model(**inputs)
    assert torch.isfinite(out["loss"]) and out["text_tokens"] > 0
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_loss_decreases_when_overfitting_one_batch():
    model = tiny_model().train()
    tokens, text, text_len = batch()
    diffusion = GaussianDiffusion(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        inputs = training_inputs(model, tokens, text, text_len, diffusion, torch.Generator().manual_seed(step), random.Random(step))
        out = model(**inputs)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


@pytest.mark.parametrize("ar_steps", [1, 3, 16])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_sampler_equals_uncached(ar_steps, cfg_scale):
    model = tiny_model()
    _, text, text_len = batch(B=2)
    diffusion = GaussianDiffusion(DiffusionConfig(), sample_steps=4)
    cached = sample_image_tokens(model, text, text_len, diffusion, ar_steps, cfg_scale, torch.Generator().manual_seed(7), use_cache=True)
    plain = sample_image_tokens(model, text, text_len, diffusion, ar_steps, cfg_scale, torch.Generator().manual_seed(7), use_cache=False)
    assert cached.shape == (2, 16, 48)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)


def test_sampling_depends_on_prompt_and_seed():
    model = tiny_model()
    _, text, text_len = batch(B=2)
    diffusion = GaussianDiffusion(DiffusionConfig(), sample_steps=4)
    a = sample_image_tokens(model, text, text_len, diffusion, 2, 1.0, torch.Generator().manual_seed(1))
    b = sample_image_tokens(model, text, text_len, diffusion, 2, 1.0, torch.Generator().manual_seed(1))
    c = sample_image_tokens(model, text, text_len, diffusion, 2, 1.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_greedy_caption_decode_matches_full_recompute():
    """KV-cached greedy decoding picks the argmax of a full causal forward at every step."""
    model = tiny_model()
    tokens, _, _ = batch(B=2)
    ids = generate_caption_ids(model, tokens, max_len=6, generator=torch.Generator())
    for b in range(2):
        seq = [2]
        for tok in ids[b]:
            text = torch.tensor([seq + [0] * (10 - len(seq))])
            lay = model.layout(text, torch.tensor([len(seq)]), torch.tensor([True]), torch.arange(16)[None], [16], torch.ones(16))
            h = model.run_blocks(model.embed(lay, tokens[b:b + 1], None, None), lay.mask)
            logits = model.lm_head(h[0, 16 + 2 + len(seq) - 1])
            assert int(logits.argmax()) == tok
            seq.append(tok)


def test_respacing_and_split_helpers():
    assert respaced_timesteps(1000, 1) == [0]
    steps = respaced_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 0 and steps[-1] == 999
    assert even_ar_split(16, 4) == [4, 4, 4, 4] and sum(even_ar_split(16, 5)) == 16
    with pytest.raises(ValueError):
        even_ar_split(16, 17)


def test_model_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=65, num_heads=4)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_sampler_recovers_data_from_an_oracle(prediction):
    """With a network that predicts exactly, the respaced reverse chain lands on x0."""
    diffusion = GaussianDiffusion(DiffusionConfig(prediction=prediction), sample_steps=25)
    x0 = torch.rand(3, 8, 12) * 2 - 1

    def oracle(x, t):
        acp = diffusion.train_acp[t].float().view(-1, 1, 1)
        eps = (x - acp.sqrt() * x0) / (1 - acp).sqrt()
        return eps if prediction == "eps" else x0

    out = diffusion.sample(oracle, torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)
    noise = torch.randn_like(x0)
    assert diffusion.target(x0, noise) is (noise if prediction == "eps" else x0)


def test_unknown_prediction_is_rejected():
    with pytest.raises(ValueError, match="diffusion.prediction"):
        DiffusionConfig(prediction="v")
