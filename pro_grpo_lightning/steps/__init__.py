"""Stateless stochastic sampler steps: one function per step family, batched over samples.

Each step maps the denoiser's output at the current latent to the next latent and returns what
GRPO needs: the next latent, its Gaussian log-prob (mean over latent dims), the step's mean and
std (for the KL to the reference) and the x0 preview (for pruning). Given ``next_latents``, the
same function re-scores a stored transition instead of sampling one. Both families end in
``gaussian_transition``: one place draws (or takes) the noise and computes the masked log-prob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepOutput:
    """One stochastic step for a batch of B samples. All tensors float32.

    next_latents: [B, *latent_shape]  the sampled (or given) x_{t-1}
    log_prob:     [B]                 log N(next_latents; mean, std^2), mean over latent dims
    mean:         [B, *latent_shape]  the Gaussian's mean mu_theta(x_t)
    std:          [B]                 the Gaussian's std s_t (per sample: timesteps may differ)
    x0:           [B, *latent_shape]  the one-step prediction of the clean latent
    model_output: [B, *latent_shape]  the guided denoiser output (eps or velocity), for the
                                      output-space KL; None where a step function is called bare
    """

    next_latents: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor
    x0: Tensor
    model_output: Tensor | None = None


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2 I), averaged (not summed) over all non-batch dims.

    x, mean: [B, ...]; std: [B] (broadcast). Returns [B]. The mean over dims is what DDPO,
    Flow-GRPO and DanceGRPO use: it keeps the ratio's scale independent of the resolution.
    """
    std_b = std.reshape(-1, *([1] * (x.ndim - 1)))  # [B, 1, ...]
    lp = -((x - mean) ** 2) / (2 * std_b**2) - std_b.log() - 0.5 * math.log(2 * math.pi)  # [B, ...]
    return lp.flatten(1).mean(1)  # [B]


def draw_noise(shape: torch.Size | tuple[int, ...], device: torch.device | str,
               generator: torch.Generator | None = None) -> Tensor:
    """Standard normal float32 noise on ``device``, drawn on the generator's own device.

    Drawing on the generator's device (then moving) keeps a CPU generator usable for CUDA latents
    and makes the numbers independent of where the latents live.
    """
    gen_device = generator.device if generator is not None else device
    z = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return z.to(device)


def gaussian_transition(mean: Tensor, std: Tensor, *, noise: Tensor | None = None,
                        next_latents: Tensor | None = None,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample (or re-score) x_next ~ N(mean, std^2 I): returns (next_latents, log_prob [B]).

    mean: [B, ...] float32; std: [B]. ``noise`` [B, ...] is the standard-normal z of
    ``next = mean + std * z``; ``next_latents`` re-scores a stored transition instead; with neither,
    z is drawn from ``generator``. The log-prob is taken at the detached sample, so its gradient is
    the score-function gradient through ``mean``. Zero-std rows (a deterministic step) are a
    point mass: their log-prob is reported as 0, evaluated at a dummy std of 1 first so neither the
    value nor its gradient turns NaN (``torch.where`` backpropagates through both branches).
    """
    if next_latents is not None and noise is not None:
        raise ValueError("give either noise (to sample) or next_latents (to re-score), not both")
    if next_latents is None:
        if noise is None:
            noise = draw_noise(mean.shape, mean.device, generator)  # [B, ...]
        std_b = std.reshape(-1, *([1] * (mean.ndim - 1)))  # [B, 1, ...]
        next_latents = mean + std_b * noise.to(mean.device).float()  # [B, ...]
    else:
        next_latents = next_latents.float()  # [B, ...]
    positive = std > 0  # [B]
    safe_std = torch.where(positive, std, torch.ones_like(std))  # [B]
    log_prob = gaussian_log_prob(next_latents.detach(), mean, safe_std)  # [B]
    return next_latents, torch.where(positive, log_prob, torch.zeros_like(log_prob))  # [B, ...], [B]


def select_steps(use_first: Tensor, first: StepOutput, second: StepOutput) -> StepOutput:
    """Row-wise choice between two ``StepOutput`` of the same batch: row b from ``first`` where
    ``use_first[b]`` ([B] bool), else from ``second`` (an SDE window: stochastic rows inside it,
    deterministic ODE rows outside). ``model_output`` is left to the caller (both share it)."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(use_first.reshape(-1, *([1] * (a.ndim - 1))), a, b)

    return StepOutput(next_latents=pick(first.next_latents, second.next_latents),
                      log_prob=pick(first.log_prob, second.log_prob), mean=pick(first.mean, second.mean),
                      std=pick(first.std, second.std), x0=pick(first.x0, second.x0))
