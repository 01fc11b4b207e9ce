"""Stateless stochastic sampler steps: one function per step family, batched over samples.

Each step maps the denoiser's output at the current latent to the next latent and returns what
GRPO needs: the next latent, its Gaussian log-prob (mean over latent dims), the step's mean and
std (for the KL to the reference) and the x0 preview (for pruning). Given ``next_latents``, the
same function re-scores a stored transition instead of sampling one.
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


def select_steps(use_first: Tensor, first: StepOutput, second: StepOutput) -> StepOutput:
    """Row-wise choice between two ``StepOutput`` of the same batch: row b from ``first`` where
    ``use_first[b]`` ([B] bool), else from ``second`` (an SDE window: stochastic rows inside it,
    deterministic ODE rows outside). ``model_output`` is left to the caller (both share it)."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(use_first.reshape(-1, *([1] * (a.ndim - 1))), a, b)

    return StepOutput(next_latents=pick(first.next_latents, second.next_latents),
                      log_prob=pick(first.log_prob, second.log_prob), mean=pick(first.mean, second.mean),
                      std=pick(first.std, second.std), x0=pick(first.x0, second.x0))
