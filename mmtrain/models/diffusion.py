"""Noising processes for the diffusion head: DDPM (as CausalFusion) or rectified flow.

``ddpm`` follows the official CausalFusion code (``create_diffusion`` in its
``diffusion/`` package, itself cut down from OpenAI's ADM): linear betas over
``num_timesteps`` training steps, an epsilon-predicting network, and an ancestral
sampler over a respaced subset of the timesteps (ADM's ``space_timesteps`` rule) with
the fixed ``large`` variance (``beta_t``, its first entry replaced by the posterior
variance of the respaced chain's second step). The network sees the original,
un-respaced integer timestep, and the predicted clean sample is not clipped.

``rectified_flow`` interpolates linearly between data (t=0) and noise (t=1), trains the
network to predict the velocity ``noise - x0`` and samples with Euler steps from t=1 to
t=0. Its timestep embedder input is ``t * 1000`` so one sinusoidal embedder serves both.

Use :func:`build_diffusion`; both process objects offer the same methods:
``sample_train_t``, ``model_time``, ``q_sample``, ``target`` and ``sample``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mmtrain.distributed import to_device
from mmtrain.errors import ConfigError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SampleSteps = int | str | None

# the flow's t in [0, 1] reaches the timestep embedder as t * FLOW_TIME_SCALE, the
# range DDPM's integer timesteps span, so the same sinusoidal embedder fits both
FLOW_TIME_SCALE = 1000.0

_PROCESSES = ("ddpm", "rectified_flow")
_VARIANCES = ("fixed_large", "fixed_small")
_FLOW_T_SAMPLING = ("uniform", "logit_normal")
FLOW_SAMPLERS = ("euler", "euler_maruyama")
# the Euler-Maruyama chain stops its noisy steps here (the score ~ 1/t blows up at 0)
SDE_T_MIN = 0.04


@dataclass
class DiffusionConfig:
    """Noising process of the image tokens.

    Args:
        process: ``ddpm`` (discrete-time Gaussian diffusion, as CausalFusion / DiT / ADM)
            or ``rectified_flow`` (linear data-noise interpolation with a velocity-
            predicting network, as SD3). Default ``ddpm``.
        num_timesteps: ddpm: training timesteps T. Both processes: the number of
            sampling steps when ``build_diffusion`` gets none. Default 1000.
        beta_schedule: ddpm only: only ``linear`` for now (beta from 1e-4 to 0.02,
            rescaled by 1000 / T as in ADM). Default ``linear``.
        prediction: what the network outputs. ddpm: ``eps`` (the added noise, as
            CausalFusion and DiT) or ``x0`` (the clean tokens; learns coarse structure
            much sooner, which is what a few-minute CPU run needs). rectified_flow:
            ``eps`` means the velocity ``noise - x0`` (as SD3 and TransDiff), ``x0`` the
            clean tokens, turned into the velocity ``(x_t - x0) / t`` by the sampler
            (the same flow, with the loss weighted toward high noise). Default ``eps``.
        variance: ddpm only: the sampler's fixed variance: ``fixed_large`` (beta_t, the
            official CausalFusion default) or ``fixed_small`` (the posterior variance;
            the official ``sigma_small=True``). Default ``fixed_large``.
        flow_t_sampling: rectified_flow only: training distribution of t in (0, 1):
            ``uniform`` or ``logit_normal`` (sigmoid of a normal draw; SD3's choice).
            Default ``logit_normal``.
        flow_logit_mean: rectified_flow only: mean of the logit-normal's normal. Default 0.0.
        flow_logit_std: rectified_flow only: std of the logit-normal's normal (> 0). Default 1.0.
        flow_shift: rectified_flow only: sampling time shift
            ``t' = shift * t / (1 + (shift - 1) * t)`` applied to the evenly spaced Euler
            grid (> 1 spends more steps at high noise, as SD3 does for large images;
            training t is not shifted). Default 1.0 (no shift).
    """

    process: str = "ddpm"
    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "eps"
    variance: str = "fixed_large"
    flow_t_sampling: str = "logit_normal"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.process not in _PROCESSES:
            raise ConfigError(f"diffusion.process: expected one of {_PROCESSES}, got {self.process!r}")
        if self.beta_schedule != "linear":
            raise ConfigError(f"diffusion.beta_schedule: expected 'linear', got {self.beta_schedule!r}")
        if self.prediction not in ("eps", "x0"):
            raise ConfigError(f"diffusion.prediction: expected 'eps' or 'x0', got {self.prediction!r}")
        if self.num_timesteps < 2:
            raise ConfigError(f"diffusion.num_timesteps: expected >= 2, got {self.num_timesteps}")
        if self.variance not in _VARIANCES:
            raise ConfigError(f"diffusion.variance: expected one of {_VARIANCES}, got {self.variance!r}")
        if self.flow_t_sampling not in _FLOW_T_SAMPLING:
            raise ConfigError(f"diffusion.flow_t_sampling: expected one of {_FLOW_T_SAMPLING}, got {self.flow_t_sampling!r}")
        if not (math.isfinite(self.flow_logit_std) and self.flow_logit_std > 0):
            raise ConfigError(f"diffusion.flow_logit_std: expected > 0, got {self.flow_logit_std}")
        if not math.isfinite(self.flow_logit_mean):
            raise ConfigError(f"diffusion.flow_logit_mean: expected a finite number, got {self.flow_logit_mean}")
        if not (math.isfinite(self.flow_shift) and self.flow_shift > 0):
            raise ConfigError(f"diffusion.flow_shift: expected > 0, got {self.flow_shift}")


def build_diffusion(cfg: DiffusionConfig, sample_steps: SampleSteps = None) -> GaussianDiffusion | RectifiedFlow:
    """The process object ``cfg.process`` names; ``sample_steps`` sets its sampling chain.

    ddpm: an int, or an ADM respacing string (``"250"``, ``"10,15,20"``, ``"ddim25"``);
    rectified_flow: the number of Euler steps (int or digit string). ``None`` means
    ``cfg.num_timesteps`` steps for both.
    """
    if cfg.process == "rectified_flow":
        return RectifiedFlow(cfg, sample_steps)
    return GaussianDiffusion(cfg, sample_steps)


def _draw_normal(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal of ``like``'s dtype and device, drawn where the generator lives."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) float32 on ``like``'s device, to scale rows of ``like``."""
    return values.to(device=like.device, dtype=torch.float32).view((-1,) + (1,) * (like.dim() - 1))


# --------------------------------------------------------------------------- DDPM


def linear_betas(num_timesteps: int) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def respaced_timesteps(num_timesteps: int, num_steps: int | str) -> list[int]:
    """Sorted timesteps of ``[0, num_timesteps)`` a respaced chain keeps (ADM's ``space_timesteps``).

    ``num_steps`` is an int (one section), a string of comma-separated section counts
    (``"10,15,20"``: the timesteps are cut into that many near-equal sections, the first
    ``num_timesteps % n`` one longer, and each is strided to its count; ``"250"`` is one
    section), or ``"ddimN"``: the first integer stride ``k`` with
    ``len(range(0, num_timesteps, k)) == N`` (DDIM's striding).

    Within a section of ``size`` steps and count ``c`` the offsets are
    ``round(0), round(s), round(s + s), ...`` with ``s = (size - 1) / (c - 1)``
    accumulated in floating point and Python's round-half-to-even, as the official code
    does (``c <= 1`` keeps the section's first step only, ``c == 0`` none).
    """
    if isinstance(num_steps, str):
        spec = num_steps.strip()
        if spec.startswith("ddim"):
            try:
                want = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"diffusion steps: bad DDIM spec {num_steps!r} (expected 'ddimN')") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"diffusion steps: no integer stride gives exactly {want} of {num_timesteps} timesteps")
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f"diffusion steps: expected an int, 'a,b,c' section counts or 'ddimN', got {num_steps!r}") from None
    elif isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool):
        if not 1 <= num_steps <= num_timesteps:
            raise ValueError(f"diffusion steps must be in [1, {num_timesteps}], got {num_steps}")
        counts = [int(num_steps)]
    else:
        raise TypeError(f"diffusion steps: expected an int or a string, got {num_steps!r}")

    if any(c < 0 for c in counts):
        raise ValueError(f"diffusion steps: section counts must be >= 0, got {num_steps!r}")
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"diffusion steps: cannot take {count} steps from a section of {size} ({num_steps!r})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        offset = 0.0
        for _ in range(count):
            kept.append(start + round(offset))
            offset += stride
        start += size
    if not kept:
        raise ValueError(f"diffusion steps: {num_steps!r} keeps no timestep")
    return sorted(set(kept))


class GaussianDiffusion:
    """DDPM: q(x_t | x_0) for training and an ancestral sampler over a respaced subset.

    Sampling reproduces the official CausalFusion ``p_sample_loop`` of
    ``create_diffusion(str(sample_steps))``: respaced betas that keep the cumulative
    alphas of the kept steps, x0 from the prediction, the posterior mean, and
    ``exp(0.5 * log var)`` times a fresh normal at every step but the last (one normal
    is still drawn there and discarded, as the official ``randn_like`` is).
    """

    process = "ddpm"

    def __init__(self, cfg: DiffusionConfig, sample_steps: SampleSteps = None):
        if cfg.process != "ddpm":
            raise ValueError(f"diffusion.process={cfg.process!r}: GaussianDiffusion is the 'ddpm' process; "
                             "use build_diffusion(cfg) to get the right one")
        self.num_timesteps = cfg.num_timesteps
        self.prediction = cfg.prediction
        self.variance = cfg.variance
        base_acp = np.cumprod(1.0 - linear_betas(cfg.num_timesteps))
        self.train_acp = torch.from_numpy(base_acp)

        # respacing keeps a subset of timesteps and recomputes betas so that the
        # cumulative alphas at kept steps are unchanged
        use = respaced_timesteps(cfg.num_timesteps, cfg.num_timesteps if sample_steps is None else sample_steps)
        self.timestep_map = torch.tensor(use, dtype=torch.long)
        acp = base_acp[use]
        prev = np.append(1.0, acp[:-1])
        betas = 1.0 - acp / prev
        self.betas = betas
        self.acp = acp
        posterior_var = betas * (1.0 - prev) / (1.0 - acp)  # 0 at the first kept step
        if len(betas) > 1:
            # both fixed variances borrow the second step's posterior variance for the
            # first step (where the posterior one is 0): large keeps beta elsewhere,
            # small the posterior; the first entry is never used (no noise at the end)
            head = posterior_var[1]
            var = np.append(head, betas[1:] if cfg.variance == "fixed_large" else posterior_var[1:])
        else:
            var = posterior_var  # single step: never used
        with np.errstate(divide="ignore"):
            self.sample_std = np.exp(0.5 * np.log(var))
        self.sample_var = var
        self.sqrt_recip_acp = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_acp = np.sqrt(1.0 / acp - 1.0)
        self.coef_x0 = betas * np.sqrt(prev) / (1.0 - acp)
        self.coef_xt = (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - acp)

    @property
    def sample_steps(self) -> int:
        return len(self.acp)

    def sample_train_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps (B,): long, uniform over ``[0, num_timesteps)``."""
        dev = generator.device if generator is not None else None
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=dev)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the timestep embedder gets for training ``t``: the integer timestep itself."""
        return t

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of the network for this parameterization (float32)."""
        return (noise if self.prediction == "eps" else x0).float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean tokens ``x0`` (B, ...) to integer timesteps ``t`` (B,), in float32 whatever
        the inputs' dtype (the coefficients from the float64 table): bf16 training casts the
        result once, where the model embeds it, instead of rounding every term."""
        if self.train_acp.device != x0.device:  # moved once (non-blocking), not per batch
            self.train_acp = to_device(self.train_acp, x0.device)
        acp = self.train_acp[t.to(x0.device)]
        return _per_row(acp.sqrt(), x0) * x0.float() + _per_row((1 - acp).sqrt(), x0) * noise.float()

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        clip_x0: float = 0.0,
    ) -> torch.Tensor:
        """Run the reverse chain from ``noise``; ``model_fn(x_t, t_model)`` predicts eps or x0.

        ``t_model`` (B,) long holds the original (un-respaced) timestep, as in training.
        ``clip_x0 > 0`` clamps the predicted clean sample to ``[-clip_x0, clip_x0]``
        (useful for bounded latents such as pixels); 0, the default, leaves it free, as
        the official sampler does. The chain runs in ``noise``'s dtype and device.
        """
        x = noise
        for i in reversed(range(len(self.acp))):
            t_model = torch.full((x.shape[0],), int(self.timestep_map[i]), device=x.device, dtype=torch.long)
            out = model_fn(x, t_model).to(x.dtype)
            if self.prediction == "eps":
                x0 = float(self.sqrt_recip_acp[i]) * x - float(self.sqrt_recipm1_acp[i]) * out
            else:
                x0 = out
            if clip_x0 > 0:
                x0 = x0.clamp(-clip_x0, clip_x0)
            mean = float(self.coef_x0[i]) * x0 + float(self.coef_xt[i]) * x
            z = _draw_normal(x.shape, x, generator)  # drawn at every step, as the official loop
            x = mean + float(self.sample_std[i]) * z if i > 0 else mean
        return x


# --------------------------------------------------------------------------- rectified flow


def _flow_steps(sample_steps: SampleSteps, default: int) -> int:
    if sample_steps is None:
        return default
    if isinstance(sample_steps, str) and sample_steps.strip().isdigit():
        sample_steps = int(sample_steps)
    if isinstance(sample_steps, (int, np.integer)) and not isinstance(sample_steps, bool) and sample_steps >= 1:
        return int(sample_steps)
    raise ValueError(f"rectified_flow sample steps: expected a positive int, got {sample_steps!r} "
                     "(section counts and 'ddimN' are ddpm respacings)")


class RectifiedFlow:
    """Rectified flow: ``x_t = (1 - t) x0 + t noise``, velocity ``v = noise - x0``, Euler sampling."""

    process = "rectified_flow"

    def __init__(self, cfg: DiffusionConfig, sample_steps: SampleSteps = None):
        if cfg.process != "rectified_flow":
            raise ValueError(f"diffusion.process={cfg.process!r}: RectifiedFlow is the 'rectified_flow' process; "
                             "use build_diffusion(cfg) to get the right one")
        self.predicts_x0 = cfg.prediction == "x0"
        self.t_sampling = cfg.flow_t_sampling
        self.logit_mean = cfg.flow_logit_mean
        self.logit_std = cfg.flow_logit_std
        self.shift = cfg.flow_shift
        self.sample_steps = _flow_steps(sample_steps, cfg.num_timesteps)
        grid = np.linspace(1.0, 0.0, self.sample_steps + 1, dtype=np.float64)
        # times visited by the sampler, from 1 (noise) down to 0 (data)
        self.sample_times = self.shift * grid / (1.0 + (self.shift - 1.0) * grid)

    def sample_train_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times (B,) float32 in (0, 1): logit-normal or uniform per the config."""
        dev = generator.device if generator is not None else None
        if self.t_sampling == "logit_normal":
            z = torch.randn(batch, generator=generator, device=dev)
            return torch.sigmoid(z * self.logit_std + self.logit_mean)
        u = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
        eps = 1e-6  # keep off the closed ends; float32 of 1 - 1e-6 is still < 1
        return (eps + (1.0 - 2.0 * eps) * u).float()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the timestep embedder gets for training ``t``: ``t * 1000`` (float32)."""
        return t.float() * FLOW_TIME_SCALE

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses (float32): the velocity ``noise - x0``, or ``x0`` itself."""
        return x0.float() if self.predicts_x0 else noise.float() - x0.float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Interpolate clean tokens ``x0`` (B, ...) toward ``noise`` at times ``t`` (B,) in [0, 1],
        in float32 whatever the inputs' dtype (the model casts the result once)."""
        t = _per_row(t, x0)
        return (1 - t) * x0.float() + t * noise.float()

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        clip_x0: float = 0.0,
        sampler: str = "euler",
        drift_scale: float = 1.0,
        noise_scale: float = 1.0,
    ) -> torch.Tensor:
        """Integrate from ``noise`` (t=1) to t=0; ``model_fn(x_t, t * 1000)`` predicts the velocity
        (or the clean sample with ``diffusion.prediction=x0``).

        ``t_model`` is a (B,) float32 tensor. ``clip_x0 > 0`` clamps the implied clean
        sample ``x_t - t v`` to ``[-clip_x0, clip_x0]`` and recomputes ``v`` from it.
        The chain runs in ``noise``'s dtype and device.

        ``sampler``: ``euler`` (the ODE; deterministic, ``generator`` unused) or
        ``euler_maruyama`` (the reverse SDE with diffusion g^2 = 2t, as the official
        TransDiff sampler): the drift is ``v - t * score = (2 - t) v + x_t`` (the score of
        the linear path is ``((t - 1) v - x_t) / t``), each of the first ``steps - 1``
        steps adds ``noise_scale * sqrt(2 t |dt|)`` Gaussian noise drawn from
        ``generator``, the drift is multiplied by ``drift_scale``, and the grid stops at
        t = 0.04 before one last noise-free Euler step to 0 (unscaled drift, as official).
        """
        if sampler == "euler_maruyama":
            return self._sample_sde(model_fn, noise, generator, clip_x0, drift_scale, noise_scale)
        if sampler != "euler":
            raise ValueError(f"sample.flow_sampler: expected 'euler' or 'euler_maruyama', got {sampler!r}")
        x = noise
        times = self.sample_times
        for i in range(self.sample_steps):
            t, t_next = float(times[i]), float(times[i + 1])
            x = x + (t_next - t) * self._velocity(model_fn, x, t, clip_x0)
        return x

    def _velocity(self, model_fn: ModelFn, x: torch.Tensor, t: float, clip_x0: float) -> torch.Tensor:
        t_model = torch.full((x.shape[0],), t * FLOW_TIME_SCALE, device=x.device, dtype=torch.float32)
        v = model_fn(x, t_model).to(x.dtype)
        if self.predicts_x0:  # the output is x0; t > 0 at every point the samplers evaluate
            x0 = v.clamp(-clip_x0, clip_x0) if clip_x0 > 0 else v
            return (x - x0) / t
        if clip_x0 > 0:
            x0 = (x - t * v).clamp(-clip_x0, clip_x0)
            v = (x - x0) / t
        return v

    def _sample_sde(self, model_fn: ModelFn, noise: torch.Tensor, generator: torch.Generator | None, clip_x0: float,
                    drift_scale: float, noise_scale: float) -> torch.Tensor:
        grid = np.concatenate([np.linspace(1.0, SDE_T_MIN, self.sample_steps), [0.0]])
        times = self.shift * grid / (1.0 + (self.shift - 1.0) * grid)
        x = noise
        for i in range(self.sample_steps):
            t, t_next = float(times[i]), float(times[i + 1])
            drift = (2.0 - t) * self._velocity(model_fn, x, t, clip_x0) + x
            if i == self.sample_steps - 1:
                return x + (t_next - t) * drift
            eps = _draw_normal(x.shape, x, generator)
            x = x + drift_scale * (t_next - t) * drift + noise_scale * math.sqrt(2.0 * t * (t - t_next)) * eps
        return x
