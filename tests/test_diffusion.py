"""DDPM parity with the official CausalFusion sampler, and the rectified-flow process."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmtrain.config import ConfigError, config_from_dict
from mmtrain.models.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    RectifiedFlow,
    build_diffusion,
    respaced_timesteps,
)

FLOW = DiffusionConfig(process="rectified_flow")

# --------------------------------------------------------------------------- respacing (ADM's space_timesteps)


def test_respacing_single_section_lists():
    # "250" of 1000: stride 999/249 ~ 4.012, so steps of 4 with a 5 where the drift adds up
    expected_250 = [*range(0, 165, 4), *range(169, 498, 4), *range(502, 831, 4), *range(835, 1000, 4)]
    assert respaced_timesteps(1000, 250) == expected_250
    assert respaced_timesteps(1000, "250") == expected_250
    # "25": stride 999/24 = 41.625, rounded half-to-even
    assert respaced_timesteps(1000, 25) == [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500,
                                            541, 583, 624, 666, 708, 749, 791, 832, 874, 916, 957, 999]
    assert respaced_timesteps(10, 4) == [0, 3, 6, 9]
    assert respaced_timesteps(1000, 1) == [0]
    assert respaced_timesteps(1000, 1000) == list(range(1000))


def test_respacing_accumulates_the_stride_like_the_official_code():
    # stride 999/20 = 49.95: ten float additions give 499.4999..., so step 499 (the exact
    # 499.5 would round to 500); the official rule accumulates, so must we
    steps = respaced_timesteps(1000, 21)
    assert steps[9:12] == [450, 499, 549]
    acc = 0.0
    for _ in range(10):
        acc += 999 / 20
    assert round(acc) == 499 and round(10 * 999 / 20) == 500


def test_respacing_sections_and_ddim():
    # two sections of 500, each strided 499/9 ~ 55.44
    assert respaced_timesteps(1000, "10,10") == [0, 55, 111, 166, 222, 277, 333, 388, 444, 499,
                                                 500, 555, 611, 666, 722, 777, 833, 888, 944, 999]
    # 7 = 4 + 3 (the first section takes the remainder): 0,3 | 4,6
    assert respaced_timesteps(7, "2,2") == [0, 3, 4, 6]
    # the docstring example of the official code: 300 steps cut into sections of 100
    steps = respaced_timesteps(300, "10,15,20")
    assert len(steps) == 45 and steps[:10] == list(range(0, 100, 11)) and steps[10:12] == [100, 107]
    assert steps[-1] == 299 and steps[25] == 200
    assert respaced_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert respaced_timesteps(1000, "ddim50") == list(range(0, 1000, 20))


@pytest.mark.parametrize("spec", [0, 1001, "ddim6", "5,abc", "3,600", "0,0", "x"])
def test_respacing_rejects_impossible_specs(spec):
    T = 10 if spec == "ddim6" else 1000  # no integer stride of 10 gives 6 steps
    with pytest.raises(ValueError, match="diffusion steps"):
        respaced_timesteps(T, spec)


def test_respaced_betas_keep_cumulative_alphas():
    diffusion = GaussianDiffusion(DiffusionConfig(), sample_steps="10,15")
    kept = diffusion.timestep_map.numpy()
    np.testing.assert_allclose(np.cumprod(1.0 - diffusion.betas), diffusion.train_acp.numpy()[kept], rtol=1e-12)
    assert diffusion.sample_steps == 25 and kept[0] == 0 and kept[-1] == 999


# --------------------------------------------------------------------------- DDPM sampler parity


def _toy_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A smooth, timestep-dependent stand-in for the network (numpy)."""
    return 0.7 * np.tanh(x) + 1e-3 * t.reshape(-1, 1, 1) * np.cos(x)


def _reference_sample(steps, variance: str, noise: np.ndarray, gen: torch.Generator, prediction: str = "eps") -> tuple[np.ndarray, list]:
    """The official p_sample_loop in float64 numpy: respaced betas, posterior mean, fixed variance;
    the network's output read as the noise (eps) or as the data (x0)."""
    T = 1000
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    acp_full = np.cumprod(1.0 - betas)
    use = respaced_timesteps(T, steps)
    # SpacedDiffusion: new betas that keep the cumulative alphas at the kept steps
    new_betas, last = [], 1.0
    for i, a in enumerate(acp_full):
        if i in use:
            new_betas.append(1.0 - a / last)
            last = a
    b = np.array(new_betas)
    acp = np.cumprod(1.0 - b)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = b * (1.0 - acp_prev) / (1.0 - acp)
    coef1 = b * np.sqrt(acp_prev) / (1.0 - acp)
    coef2 = (1.0 - acp_prev) * np.sqrt(1.0 - b) / (1.0 - acp)
    if variance == "fixed_large":
        log_var = np.log(np.append(post_var[1], b[1:]))
    else:
        log_var = np.log(np.append(post_var[1], post_var[1:]))
    x, seen = noise, []
    for i in reversed(range(len(b))):
        t_orig = np.full(x.shape[0], use[i])
        seen.append(use[i])
        out = _toy_eps(x, t_orig)
        x0 = out if prediction == "x0" else np.sqrt(1.0 / acp[i]) * x - np.sqrt(1.0 / acp[i] - 1.0) * out
        mean = coef1[i] * x0 + coef2[i] * x
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64).numpy()
        x = mean + float(i != 0) * np.exp(0.5 * log_var[i]) * z
    return x, seen


@pytest.mark.parametrize(("steps", "variance", "prediction"), [(25, "fixed_large", "eps"), ("4,3,5", "fixed_large", "eps"),
                                                                ("ddim10", "fixed_small", "eps"), (25, "fixed_large", "x0")])
def test_ddpm_sampler_matches_official_chain(steps, variance, prediction):
    noise = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, ref_seen = _reference_sample(steps, variance, noise.numpy(), g_ref := torch.Generator().manual_seed(11), prediction)

    diffusion = build_diffusion(DiffusionConfig(variance=variance, prediction=prediction), sample_steps=steps)
    assert isinstance(diffusion, GaussianDiffusion)
    seen = []

    def model_fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen.append(int(t[0]))
        return torch.from_numpy(_toy_eps(x.numpy(), t.numpy()))

    out = diffusion.sample(model_fn, noise, generator=(g := torch.Generator().manual_seed(11)))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-9, rtol=0)  # measured: 1e-13 apart
    assert seen == ref_seen  # the network sees the original timesteps, 999 first
    # one normal drawn per step, the last (unused) one included, as the official loop
    torch.testing.assert_close(torch.randn(4, generator=g), torch.randn(4, generator=g_ref))


def test_ddpm_train_t_and_model_time():
    diffusion = build_diffusion(DiffusionConfig(num_timesteps=100))
    t = diffusion.sample_train_t(4096, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4096,) and int(t.min()) == 0 and int(t.max()) == 99
    torch.testing.assert_close(t, diffusion.sample_train_t(4096, torch.Generator().manual_seed(0)))
    assert diffusion.model_time(t) is t
    x0, noise = torch.randn(4096, 2), torch.randn(4096, 2)
    acp = diffusion.train_acp[t].float()[:, None]
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), acp.sqrt() * x0 + (1 - acp).sqrt() * noise)


def test_ddpm_chain_runs_in_the_noise_dtype():
    diffusion = GaussianDiffusion(DiffusionConfig(), sample_steps=5)
    out = diffusion.sample(lambda x, t: torch.zeros_like(x, dtype=torch.float32),
                           torch.randn(2, 3, dtype=torch.bfloat16), generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16


# --------------------------------------------------------------------------- rectified flow


def test_flow_q_sample_and_target():
    flow = build_diffusion(FLOW)
    assert isinstance(flow, RectifiedFlow)
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.q_sample(x0, t, noise)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    v = flow.target(x0, noise)
    torch.testing.assert_close(v, noise - x0)
    # x_t = x0 + t v: the implied clean sample the sampler clips
    torch.testing.assert_close(xt, x0 + t.view(-1, 1, 1) * v)
    torch.testing.assert_close(flow.model_time(t), t * 1000)


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_flow_train_t(sampling):
    flow = build_diffusion(DiffusionConfig(process="rectified_flow", flow_t_sampling=sampling))
    t = flow.sample_train_t(20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert 0 < float(t.min()) and float(t.max()) < 1
    torch.testing.assert_close(t, flow.sample_train_t(20000, torch.Generator().manual_seed(0)))
    if sampling == "logit_normal":
        logit = torch.log(t / (1 - t))
        assert abs(float(logit.mean())) < 0.05 and abs(float(logit.std()) - 1) < 0.05
    else:
        assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.std()) - 1 / math.sqrt(12)) < 0.01


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (10, 1.0), ("7", 3.0)])
def test_flow_sampler_recovers_data_from_an_oracle(steps, shift):
    """With the exact velocity toward a fixed x0, Euler lands on x0 (the path is straight)."""
    flow = build_diffusion(DiffusionConfig(process="rectified_flow", flow_shift=shift), sample_steps=steps)
    x0 = torch.rand(3, 8, 12, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = []
    n = int(steps)
    grid = [shift * s / (1 + (shift - 1) * s) for s in (1 - i / n for i in range(n))]  # the shifted time grid

    def oracle(x, t_model):
        assert t_model.dtype == torch.float32 and t_model.shape == (3,)
        times.append(float(t_model[0]) / 1000)
        # every Euler iterate lies on the straight line from the noise to x0, at its own time of the
        # grid (float64; the network sees it rounded to float32): a wrong step size on any step, not
        # only the last, leaves the line
        t = grid[len(times) - 1]
        torch.testing.assert_close(x, (1 - t) * x0 + t * noise, atol=1e-9, rtol=0)
        return (x - x0) / t

    out = flow.sample(oracle, noise)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)
    assert times == pytest.approx(grid, abs=1e-6)


def test_flow_clip_clamps_the_implied_data():
    flow = build_diffusion(FLOW, sample_steps=4)
    x0 = torch.tensor([[-3.0, -0.5, 0.2, 2.5]])
    noise = torch.randn(1, 4, generator=torch.Generator().manual_seed(1))
    out = flow.sample(lambda x, t: noise - x0, noise, clip_x0=1.0)
    torch.testing.assert_close(out, x0.clamp(-1, 1))
    free = flow.sample(lambda x, t: noise - x0, noise)
    torch.testing.assert_close(free, x0)


def test_flow_chain_runs_in_the_noise_dtype():
    flow = build_diffusion(FLOW, sample_steps=3)
    out = flow.sample(lambda x, t: torch.ones_like(x, dtype=torch.float32), torch.zeros(2, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), -torch.ones(2, 3))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"process": "ddim"}, "diffusion.process"),
    ({"process": "rectified_flow", "prediction": "v"}, "diffusion.prediction"),
    ({"variance": "learned"}, "diffusion.variance"),
    ({"flow_t_sampling": "beta"}, "diffusion.flow_t_sampling"),
    ({"flow_logit_std": 0.0}, "diffusion.flow_logit_std"),
    ({"flow_shift": -1.0}, "diffusion.flow_shift"),
])
def test_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DiffusionConfig(**kwargs)


def test_config_loader_names_the_process_key():
    with pytest.raises(ConfigError, match="diffusion.process"):
        config_from_dict({"diffusion": {"process": "flow"}})
    cfg = config_from_dict({"diffusion": {"process": "rectified_flow", "flow_shift": 3}})
    assert cfg.diffusion.process == "rectified_flow" and cfg.diffusion.flow_shift == 3.0


def test_processes_refuse_the_other_config_and_bad_steps():
    with pytest.raises(ValueError, match="build_diffusion"):
        GaussianDiffusion(FLOW)
    with pytest.raises(ValueError, match="build_diffusion"):
        RectifiedFlow(DiffusionConfig())
    with pytest.raises(ValueError, match="ddpm respacings"):
        build_diffusion(FLOW, sample_steps="ddim25")
    assert build_diffusion(FLOW).sample_steps == 1000
    assert build_diffusion(DiffusionConfig()).sample_steps == 1000
