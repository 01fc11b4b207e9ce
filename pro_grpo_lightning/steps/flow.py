"""Stochastic steps for rectified-flow models (SD3 / SD3.5 / FLUX.1), batched, stateless.

Rectified flow: ``x_sigma = (1 - sigma) x0 + sigma * noise``, the network predicts the velocity
``v = noise - x0``, and the deterministic sampler is Euler: ``x_next = x + v * dt`` with
``dt = sigma_next - sigma < 0`` (diffusers' ``FlowMatchEulerDiscreteScheduler.step``).

Notation, code name -> symbol:
    velocity   v        the (guided) network output at (x, sigma)
    latents    x        the current latent x_sigma
    sigma      sigma    current noise level, per sample [B]; sigma_next the next one (< sigma)
    dt         dt       sigma_next - sigma (< 0)
    g          g(sigma) diffusion coefficient of the reverse SDE (``std_dev_t`` in Flow-GRPO)
    std        s        std of the Gaussian transition, s = g * sqrt(-dt) (what ``StepOutput.std`` is)
    x0         x0_hat   x - sigma * v, the one-step prediction of the clean latent

Step kinds (``kind``):
    "flow_grpo"  Flow-GRPO's SDE (Liu et al. 2025, eq. 9-10; public ``sd3_sde_with_logprob.py``):
                 g = a * sqrt(sigma / (1 - sigma)). The reverse SDE with diffusion g and the
                 rectified-flow score  score(x) = -(x + (1 - sigma) v) / sigma  gives the
                 Euler-Maruyama step
                   mean = x * (1 + g^2/(2 sigma) dt) + v * (1 + g^2 (1 - sigma)/(2 sigma)) dt
                   next = mean + g * sqrt(-dt) * noise.
    "dance"      DanceGRPO's flow step (public ``flux_step`` with ``sde_solver=True``): the same
                 drift correction, -0.5 * eta^2 * score * dt, with a constant diffusion g = eta.
                 Substituting its score  -(x - (1 - sigma) x0_hat) / sigma^2  with
                 x0_hat = x - sigma v gives exactly the "flow_grpo" mean with g^2 -> eta^2, and
                 std = eta * sqrt(sigma - sigma_next).
    "cps"        Coefficient-preserving sampling (Wang & Yu 2025, arXiv 2509.05952; Flow-GRPO's
                 ``sde_type='cps'``): with x1_hat = x + (1 - sigma) v (the predicted noise),
                   std  = sigma_next * sin(a pi / 2)
                   mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat
                        = (1 - sigma_next) x0_hat + sigma_next cos(a pi / 2) x1_hat,
                 so next = (1 - sigma_next) x0_hat + sigma_next * (cos * x1_hat + sin * noise)
                 keeps the noise coefficient exactly sigma_next (a unit-variance mix of x1_hat
                 and fresh noise). With a = 0 it reduces to Euler. log_prob is the true Gaussian
                 log-density; Flow-GRPO's CPS uses -mean((x - mu)^2), whose log-ratio is ours
                 times 2 s^2, so its clip range does not carry over.
    "ode"        Deterministic Euler, std 0 (for ODE windows and evaluation).

With noise_level a = 0 every kind is the deterministic Euler step of the scheduler.

Edge cases, guarded without branching on values (no host sync):
    sigma = 1 (first step): 1 - sigma = 0 in g's denominator. Like Flow-GRPO (which uses the
        schedule's second sigma there) we use sigma_next in the denominator when sigma >= 1:
        g = a * sqrt(1 / (1 - sigma_next)). The drift needs no guard: its (1 - sigma) factor
        multiplies v, and 1/(2 sigma) = 1/2.
    sigma_next = 0 (last step): nothing divides by sigma_next. "flow_grpo" and "dance" keep a
        positive std (g * sqrt(sigma)) and stay stochastic, as in both baselines; "cps" has
        std = 0 there and returns mean = x0_hat exactly. Backends do not train this step.
    std = 0 ("ode", a = 0, "cps" last step): the transition is a point mass; next = mean and the
        log-prob is reported as 0 (not -inf/NaN). Such steps carry no policy gradient; backends
        mark them untrainable.
    A denominator is never allowed below float32 eps, so a degenerate table (sigma = 0, or
    sigma = sigma_next = 1) gives finite values too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import StepOutput, gaussian_transition

FLOW_STEP_KINDS = ("flow_grpo", "dance", "cps", "ode")

_EPS = torch.finfo(torch.float32).eps


def _per_sample(value: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] noise level -> [B] float32 on ``device``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)  # [B] or [1]
    if t.numel() == 1:
        t = t.expand(batch)
    elif t.numel() != batch:
        raise ValueError(f"expected one noise level per sample ({batch}), got {t.numel()}")
    return t


def _check_kind(kind: str, noise_level: float) -> None:
    if kind not in FLOW_STEP_KINDS:
        raise ValueError(f"unknown flow step kind {kind!r}; choose one of {FLOW_STEP_KINDS}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if kind == "cps" and noise_level > 1:
        raise ValueError(f"kind='cps' needs 0 <= noise_level <= 1 (an angle a*pi/2), got {noise_level}")


def flow_diffusion_coefficient(sigma: Tensor, sigma_next: Tensor, noise_level: float,
                               kind: str = "flow_grpo") -> Tensor:
    """g(sigma) [B]: the SDE's diffusion coefficient, std = g * sqrt(-dt) for "flow_grpo"/"dance".

    This is Flow-GRPO's ``std_dev_t``, which its KL term divides by (no dt). For "cps" (whose
    std does not factor as g * sqrt(-dt)) it returns std / sqrt(-dt); for "ode" zeros.
    """
    _check_kind(kind, noise_level)
    if kind == "flow_grpo":
        # Flow-GRPO's first-step guard: sigma = 1 -> use sigma_next inside 1 - sigma.
        sigma_den = torch.where(sigma >= 1, sigma_next, sigma)  # [B]
        return noise_level * torch.sqrt(sigma / (1 - sigma_den).clamp_min(_EPS))  # [B]
    if kind == "dance":
        return torch.full_like(sigma, noise_level)  # [B]
    std = flow_step_std(sigma, sigma_next, noise_level, kind)  # [B]
    return std / torch.sqrt((sigma - sigma_next).clamp_min(_EPS))  # [B]


def flow_step_std(sigma: Tensor, sigma_next: Tensor, noise_level: float,
                  kind: str = "flow_grpo") -> Tensor:
    """The transition std s [B] of one step (what ``StepOutput.std`` holds)."""
    _check_kind(kind, noise_level)
    if kind == "ode":
        return torch.zeros_like(sigma)  # [B]
    if kind == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)  # [B]
    g = flow_diffusion_coefficient(sigma, sigma_next, noise_level, kind)  # [B]
    return g * torch.sqrt((sigma - sigma_next).clamp_min(0))  # [B]


def flow_grpo_kl_std(sigma: Tensor, sigma_next: Tensor, noise_level: float,
                     kind: str = "flow_grpo") -> Tensor:
    """[B] the std Flow-GRPO's KL term divides by (``std_dev_t`` of its public step function).

    For "flow_grpo" and "dance" that is the diffusion coefficient g, not the transition std
    s = g * sqrt(-dt): Flow-GRPO's KL ``mean((mu - mu_ref)^2) / (2 g^2)`` is the exact Gaussian
    KL times (sigma - sigma_next). For "cps" its ``std_dev_t`` is the transition std itself, so
    there the two KLs agree. "ode": zeros (no density; such steps are never trained).
    """
    _check_kind(kind, noise_level)
    if kind in ("cps", "ode"):
        return flow_step_std(sigma, sigma_next, noise_level, kind)  # [B]
    return flow_diffusion_coefficient(sigma, sigma_next, noise_level, kind)  # [B]


def flow_sde_step(velocity: Tensor, latents: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
                  *, noise_level: float = 0.7, kind: str = "flow_grpo",
                  generator: torch.Generator | None = None, noise: Tensor | None = None,
                  next_latents: Tensor | None = None) -> StepOutput:
    """One step from ``sigma`` to ``sigma_next`` for a batch; see the module docstring.

    Args:
        velocity: [B, ...] the guided velocity v at ``latents`` (any float dtype; upcast).
        latents: [B, ...] the current x_sigma.
        sigma, sigma_next: [B] (or scalars) noise levels, sigma_next < sigma.
        noise_level: a for "flow_grpo"/"cps", eta for "dance"; ignored by "ode".
        generator: for the step noise (may live on another device than the latents).
        noise: [B, ...] standard normal noise to use instead of drawing it.
        next_latents: [B, ...] a stored transition to re-score: the same mean/std/log-prob code
            path runs and this tensor is returned as ``next_latents``.

    Returns:
        StepOutput with float32 tensors (``model_output`` is left None: callers set it).
    """
    _check_kind(kind, noise_level)
    x = latents.float()  # [B, ...]
    v = velocity.float()  # [B, ...]
    batch = x.shape[0]
    sigma = _per_sample(sigma, batch, x.device)  # [B]
    sigma_next = _per_sample(sigma_next, batch, x.device)  # [B]

    def col(t: Tensor) -> Tensor:  # [B] -> [B, 1, ...] to broadcast over latent dims
        return t.reshape(batch, *([1] * (x.ndim - 1)))

    dt = sigma_next - sigma  # [B], < 0
    x0 = x - col(sigma) * v  # [B, ...]
    std = flow_step_std(sigma, sigma_next, noise_level, kind)  # [B]

    if kind in ("flow_grpo", "dance"):
        g = flow_diffusion_coefficient(sigma, sigma_next, noise_level, kind)  # [B]
        c = g**2 / (2 * sigma.clamp_min(_EPS))  # [B]  g^2 / (2 sigma)
        mean = x * col(1 + c * dt) + v * col((1 + c * (1 - sigma)) * dt)  # [B, ...]
    elif kind == "cps":
        x1 = x + col(1 - sigma) * v  # [B, ...]  predicted noise
        cos = math.cos(noise_level * math.pi / 2)
        mean = col(1 - sigma_next) * x0 + col(sigma_next * cos) * x1  # [B, ...]
    else:  # "ode"
        mean = x + col(dt) * v  # [B, ...]

    next_x, log_prob = gaussian_transition(mean, std, noise=noise, next_latents=next_latents,
                                           generator=generator)  # [B, ...], [B]
    return StepOutput(next_latents=next_x, log_prob=log_prob, mean=mean, std=std, x0=x0)
