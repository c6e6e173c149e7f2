"""DDPM with epsilon prediction, as used by CausalFusion (and DiT / ADM before it).

Training draws integer timesteps in ``[0, num_timesteps)`` and regresses the added
noise. Sampling runs on a respaced subset of the timesteps with the ``fixed large``
variance (``beta_t``, first entry replaced by the posterior variance), which is what
the official CausalFusion sampler uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class DiffusionConfig:
    """Noise schedule.

    Args:
        num_timesteps: training timesteps T. Default 1000.
        beta_schedule: only ``linear`` for now (beta from 1e-4 to 0.02, rescaled by
            1000 / T as in ADM). Default ``linear``.
        prediction: what the network outputs: ``eps`` (the added noise, as CausalFusion
            and DiT) or ``x0`` (the clean tokens; learns coarse structure much sooner,
            which is what a few-minute CPU run needs). Default ``eps``.
    """

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.beta_schedule != "linear":
            raise ValueError(f"diffusion.beta_schedule: expected 'linear', got {self.beta_schedule!r}")
        if self.prediction not in ("eps", "x0"):
            raise ValueError(f"diffusion.prediction: expected 'eps' or 'x0', got {self.prediction!r}")
        if self.num_timesteps < 2:
            raise ValueError(f"diffusion.num_timesteps: expected >= 2, got {self.num_timesteps}")


def linear_betas(num_timesteps: int) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def respaced_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` timesteps spread evenly over ``[0, num_timesteps)`` (ADM's rule)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"diffusion steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


class GaussianDiffusion:
    """q(x_t | x_0) for training and an ancestral sampler over a respaced subset."""

    def __init__(self, cfg: DiffusionConfig, sample_steps: int | None = None):
        self.num_timesteps = cfg.num_timesteps
        self.prediction = cfg.prediction
        base_betas = linear_betas(cfg.num_timesteps)
        base_acp = np.cumprod(1.0 - base_betas)
        self.train_acp = torch.from_numpy(base_acp)

        # respacing keeps a subset of timesteps and recomputes betas so that the
        # cumulative alphas at kept steps are unchanged
        use = respaced_timesteps(cfg.num_timesteps, sample_steps or cfg.num_timesteps)
        self.timestep_map = torch.tensor(use, dtype=torch.long)
        acp = base_acp[use]
        prev = np.append(1.0, acp[:-1])
        betas = 1.0 - acp / prev
        posterior_var = betas * (1.0 - prev) / (1.0 - acp)
        # "fixed large" variance, with the first entry taken from the posterior so
        # that the log stays finite
        self.sample_var = np.append(posterior_var[1], betas[1:]) if len(betas) > 1 else posterior_var
        self.acp = acp
        self.coef_x0 = betas * np.sqrt(prev) / (1.0 - acp)
        self.coef_xt = (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - acp)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of the network for this parameterization."""
        return noise if self.prediction == "eps" else x0

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean tokens ``x0`` (B, ...) to integer timesteps ``t`` (B,)."""
        acp = self.train_acp.to(x0.device)[t].to(x0.dtype)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return acp.sqrt().view(shape) * x0 + (1 - acp).sqrt().view(shape) * noise

    @torch.no_grad()
    def sample(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        clip_x0: float = 0.0,
    ) -> torch.Tensor:
        """Run the reverse chain from ``noise``; ``model_fn(x_t, t_model)`` predicts eps or x0.

        ``t_model`` holds the original (un-respaced) timestep, as in training.
        ``clip_x0 > 0`` clamps the predicted clean sample to ``[-clip_x0, clip_x0]``
        (useful for bounded latents such as pixels; 0 leaves it free, as for VAE latents).
        """
        x = noise
        for i in reversed(range(len(self.acp))):
            t_model = torch.full((x.shape[0],), int(self.timestep_map[i]), device=x.device, dtype=torch.long)
            out = model_fn(x, t_model)
            acp = float(self.acp[i])
            x0 = (x - (1 - acp) ** 0.5 * out) / acp**0.5 if self.prediction == "eps" else out
            if clip_x0 > 0:
                x0 = x0.clamp(-clip_x0, clip_x0)
            mean = float(self.coef_x0[i]) * x0 + float(self.coef_xt[i]) * x
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + float(self.sample_var[i]) ** 0.5 * z
            else:
                x = mean
        return x
