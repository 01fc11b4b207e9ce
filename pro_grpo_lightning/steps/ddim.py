"""Stochastic DDIM step (eta > 0) for DDPM-trained denoisers (SD1.x / SD2.x), as a pure function.

Formulas: Song, Meng, Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021), eq. (12) for the
update and eq. (16) for its std; the prediction-type conversions are the usual ones (v-prediction:
Salimans & Ho, "Progressive Distillation", 2022, sec. 4). diffusers' ``DDIMScheduler.step`` computes
the same update for one scalar timestep; this function takes per-sample alpha products so a batch
may mix steps, and it is stateless so stored transitions can be re-scored.

Notation (code name -> paper symbol):
    alpha_prod_t     abar_t        cumulative alpha product at the current timestep t      [B]
    alpha_prod_prev  abar_prev     the same at the next (less noisy) timestep t_prev       [B]
    latents          x_t
    eps              eps_theta(x_t, t)   (derived from the model output's prediction type)
    x0               x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    std              s_t = eta * sqrt((1 - abar_prev)/(1 - abar_t)) * sqrt(1 - abar_t/abar_prev)
    mean             mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s_t^2) eps
    next_latents     x_prev = mu + s_t z,  z ~ N(0, I)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import StepOutput, draw_noise, gaussian_transition

__all__ = ["PREDICTION_TYPES", "ddim_std", "ddim_step", "ddim_tables", "draw_noise"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(x: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] so a per-sample scalar broadcasts over a latent of ``ndim`` dims."""
    return x.reshape(-1, *([1] * (ndim - 1)))


def ddim_std(alpha_prod_t: Tensor, alpha_prod_prev: Tensor, eta: float) -> Tensor:
    """s_t of DDIM eq. (16) times eta, in float32, for any shape of alpha products.

    sigma_t^2 = (1 - abar_prev)/(1 - abar_t) * (1 - abar_t/abar_prev) (diffusers' ``_get_variance``).
    """
    a_t = alpha_prod_t.float()
    a_prev = alpha_prod_prev.float()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    # A table with abar_prev = 1 (set_alpha_to_one) gives exactly 0; rounding can give -1e-9.
    return eta * variance.clamp(min=0).sqrt()


def ddim_tables(alphas_cumprod: Tensor, final_alpha_cumprod: float | Tensor, timesteps: Tensor,
                num_train_timesteps: int, eta: float) -> dict[str, Tensor]:
    """Per-step lookup tables for a T-step DDIM schedule, all [T], on the CPU.

    Step index i uses timestep ``timesteps[i]`` and the previous timestep
    ``timesteps[i] - num_train_timesteps // T``, with ``final_alpha_cumprod`` where that is < 0:
    the rule of diffusers' ``DDIMScheduler.step`` (whatever its ``timestep_spacing``).

    Returns ``timesteps`` (long), ``alpha_prod_t``, ``alpha_prod_prev`` and ``std`` (float32).
    """
    alphas_cumprod = alphas_cumprod.detach().float().cpu()  # [num_train_timesteps]
    final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float32).cpu()  # []
    timesteps = timesteps.detach().long().cpu()  # [T]
    prev = timesteps - num_train_timesteps // timesteps.numel()  # [T]
    alpha_t = alphas_cumprod[timesteps]  # [T]
    alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)  # [T]
    return dict(timesteps=timesteps, alpha_prod_t=alpha_t, alpha_prod_prev=alpha_prev,
                std=ddim_std(alpha_t, alpha_prev, eta))


def ddim_step(
    model_output: Tensor,
    latents: Tensor,
    alpha_prod_t: Tensor,
    alpha_prod_prev: Tensor,
    *,
    eta: float,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    next_latents: Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> StepOutput:
    """One DDIM step x_t -> x_prev for a batch whose samples may sit at different timesteps.

    Args:
        model_output: [B, *latent] the (guided) denoiser output, any float dtype.
        latents: [B, *latent] x_t.
        alpha_prod_t, alpha_prod_prev: [B] abar at the current and the next timestep (use the
            scheduler's ``final_alpha_cumprod`` as abar_prev on the last step).
        eta: 0 is the deterministic DDIM update, 1 has DDPM's posterior variance.
        generator: draws the noise z when neither ``noise`` nor ``next_latents`` is given.
        noise: [B, *latent] a given z (like diffusers' ``variance_noise``).
        next_latents: [B, *latent] re-score this stored transition instead of sampling one.
        prediction_type: "epsilon" (SD1.x), "v_prediction" (SD2.x 768) or "sample".
        clip_sample: clamp x0_hat to [-c, c] when set. Off by default, as in SD's scheduler config.

    Returns:
        StepOutput (float32; ``model_output`` left None). ``next_latents`` carries the
        reparameterized sample mean + std z; ``log_prob`` is computed on its detached value, so
        its gradient is the score-function gradient through ``mean`` (what GRPO needs).

    With std = 0 (eta = 0, or a step whose abar_prev = 1) the step is the deterministic update
    ``next_latents = mean``; a point mass has no density, so ``log_prob`` is set to 0 on such
    rows. It is a placeholder, not a log-probability: do not train on those steps.
    """
    if next_latents is not None and noise is not None:
        raise ValueError("give either noise (to sample) or next_latents (to re-score), not both")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    x_t = latents.float()  # [B, *latent]
    out = model_output.float()  # [B, *latent]
    ndim = x_t.ndim
    a_t = _per_sample(alpha_prod_t.float().to(x_t.device), ndim)  # [B, 1, ...]
    a_prev = _per_sample(alpha_prod_prev.float().to(x_t.device), ndim)  # [B, 1, ...]
    beta_t = 1 - a_t  # [B, 1, ...]

    # Recover (x0_hat, eps) from the network's parameterization (DDIM eq. 9;
    # v = sqrt(abar) eps - sqrt(1 - abar) x0).
    if prediction_type == "epsilon":
        eps = out  # [B, *latent]
        x0 = (x_t - beta_t.sqrt() * eps) / a_t.sqrt()  # [B, *latent]
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - beta_t.sqrt() * out  # [B, *latent]
        eps = a_t.sqrt() * out + beta_t.sqrt() * x_t  # [B, *latent]
    else:  # "sample"
        x0 = out  # [B, *latent]
        eps = (x_t - a_t.sqrt() * x0) / beta_t.sqrt()  # [B, *latent]
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)  # [B, *latent]
        # eps stays the network's (diffusers' default use_clipped_model_output=False)

    std = ddim_std(alpha_prod_t, alpha_prod_prev, eta).to(x_t.device)  # [B]
    std_b = _per_sample(std, ndim)  # [B, 1, ...]
    # DDIM eq. (12): the "direction pointing to x_t" keeps the variance left after s_t^2.
    # For eta <= 1 the radicand is >= 0 analytically; clamp rounding (and eta > 1) to 0.
    direction = (1 - a_prev - std_b**2).clamp(min=0).sqrt() * eps  # [B, *latent]
    mean = a_prev.sqrt() * x0 + direction  # [B, *latent]

    next_latents, log_prob = gaussian_transition(mean, std, noise=noise, next_latents=next_latents,
                                                 generator=generator)  # [B, *latent], [B]
    return StepOutput(next_latents=next_latents, log_prob=log_prob, mean=mean, std=std, x0=x0)
