"""GRPO objectives as pure tensor functions: advantages, the PPO-clip policy loss and KL terms.

Notation (code name -> symbol; docs/algorithm.md, "Notation" and section 1):
    rewards        R          [P, G]  P prompts (groups), G trajectories per group
    advantages     A          group-relative, (R - mean_group(R)) / (std + eps), clipped
    log_prob       logp_theta per-step Gaussian log-density, mean over latent dims
    old_log_prob   logp_old   the same, recorded at rollout time
    clip_range     clip_eps   PPO clip (baseline 1e-4: log-probs are means over dims)
    mean, ref_mean mu_theta, mu_ref; std s_t

No loops over samples or groups: every function is batched over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STD_MODES = ("group", "global")


@dataclass
class AdvantageSettings:
    """How rewards become advantages (``group_advantages``); YAML ``model.advantages``.

    Args:
        clip: advantages clipped to [-clip, clip] (None: no clipping).
        std: "group" (per prompt) or "global" (whole batch, across ranks) std.
        eps: added to the std.
    """

    clip: float | None = 5.0
    std: str = "group"
    eps: float = 1e-4

    def __post_init__(self) -> None:
        if self.std not in STD_MODES:
            raise ValueError(f"advantages.std must be one of {STD_MODES}, got {self.std!r}")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"advantages.clip must be > 0 or None, got {self.clip}")
        if self.eps < 0:
            raise ValueError(f"advantages.eps must be >= 0, got {self.eps}")


def finite_std(values: Tensor) -> Tensor:
    """Population std over the finite entries of any tensor (0-dim); 0 when none are finite."""
    finite = torch.isfinite(values)
    n = finite.sum().clamp(min=1)
    x = torch.where(finite, values, torch.zeros_like(values)).float()
    mean = x.sum() / n
    centred = torch.where(finite, x - mean, torch.zeros_like(x))
    return (centred.pow(2).sum() / n).sqrt()


def group_advantages(rewards: Tensor, valid: Tensor | None = None, *, std_mode: str = "group",
                     eps: float = 1e-4, clip: float | None = 5.0, global_std: Tensor | None = None) -> Tensor:
    """Group-relative advantages ``A = (R - mean_group(R)) / (std + eps)``, clipped to ``[-clip, clip]``,
    over the ``valid`` entries only (the others get exactly 0; None: all are valid).

    rewards, valid: [P, G]. Returns [P, G], float32 (float64 if rewards are float64).

    std_mode:
        "group":  std of each group's valid rewards (DanceGRPO uses the unbiased std + 1e-8).
        "global": one std over every valid reward of the batch (Flow-GRPO's ``global_std``); the
                  mean is still the group's. Pass ``global_std`` (a scalar tensor) to use a std
                  computed elsewhere, e.g. over all DDP ranks; it is only accepted with "global".
    Both stds are population stds (``unbiased=False``, as ``np.std`` in Flow-GRPO's stat
    tracker): defined for G = 1 and the natural scale of the G rewards actually seen.

    A group whose valid rewards are all equal gets exactly 0 (never NaN, also for G = 1 and for a
    constant batch in global mode): its centred rewards are masked to 0, since the float mean of
    equal values need not reproduce them exactly and eps = 1e-4 would blow that rounding up.
    Invalid entries (``health.py``: non-finite rewards) enter no sum, so they never make a NaN.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"group_advantages: unknown std_mode {std_mode!r}; choose one of {STD_MODES}")
    if global_std is not None and std_mode != "global":
        raise ValueError("group_advantages: global_std is only used with std_mode='global', "
                         f"got std_mode={std_mode!r}")
    if rewards.ndim != 2:
        raise ValueError(f"group_advantages: rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if clip is not None and clip <= 0:
        raise ValueError(f"group_advantages: clip must be > 0 or None, got {clip}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    if valid is None:
        valid = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)  # [P, G]
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(valid, rewards.to(dtype), zero)  # [P, G] invalid -> 0 (never NaN in sums)
    n = valid.sum(1, keepdim=True).clamp(min=1)  # [P, 1]
    mean = r.sum(1, keepdim=True) / n  # [P, 1]
    centred = torch.where(valid, r - mean, zero)  # [P, G]
    hi = torch.where(valid, r, torch.full_like(r, float("-inf"))).amax(1, keepdim=True)  # [P, 1]
    lo = torch.where(valid, r, torch.full_like(r, float("inf"))).amin(1, keepdim=True)  # [P, 1]
    centred = centred.masked_fill(hi == lo, 0.0)  # [P, G] constant groups: exactly 0
    if std_mode == "group":
        std = (centred.pow(2).sum(1, keepdim=True) / n).sqrt()  # [P, 1]
    elif global_std is not None:
        std = torch.as_tensor(global_std, dtype=dtype, device=r.device).reshape(1, 1)  # [1, 1]
    else:
        std = finite_std(torch.where(valid, r, torch.full_like(r, float("nan")))).to(dtype).reshape(1, 1)
    adv = torch.where(valid, centred / (std + eps), zero)  # [P, G]
    if clip is not None:
        adv = adv.clamp(-clip, clip)  # [P, G]
    return adv


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                  clip_range: float, *, log_ratio: Tensor | None = None,
                  weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``loss = mean(w * max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)))`` with
    ``r = exp(log_prob - old_log_prob)`` and w = 1; the same form as DDPO's and Flow-GRPO's train
    loops. log_prob, old_log_prob, advantages: [N] (one entry per trained step of a trajectory; the
    shapes must match exactly, so nothing broadcasts by accident). old_log_prob and advantages
    carry no gradient.

    log_ratio: [N], the log-ratio to clip instead of ``log_prob - old_log_prob`` (GRPO-Guard's
        normalised one, ``guard_log_ratio``); weight: [N] per-entry loss weights (its step
        reweighting, ``guard_step_weight``), no gradient. ``raw_log_ratio_mean`` always reports
        the unnormalised ``log_prob - old_log_prob``.
    Returns the scalar loss and detached scalar stats:
        clip_frac: fraction of entries with |r - 1| > clip_range; clip_frac_low / clip_frac_high
            the two sides (r < 1 - clip_range / r > 1 + clip_range): a ratio biased below 1 clips
            mostly low, so positive-advantage steps escape the clip (GRPO-Guard, sec. 1)
        approx_kl: 0.5 * mean((log_prob - old_log_prob)^2), the estimator DDPO/Flow-GRPO log
        ratio_mean: mean(r); exactly 1 on-policy, before the first optimizer step (docs/algorithm.md, section 1)
        log_ratio_mean: mean(log r); raw_log_ratio_mean: mean(log_prob - old_log_prob)
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        shapes = [tuple(t.shape) for t in (log_prob, old_log_prob, advantages)]
        raise ValueError("ppo_clip_loss: log_prob, old_log_prob and advantages must have the same "
                         f"shape, got {shapes[0]}, {shapes[1]}, {shapes[2]}")
    for name, t in (("log_ratio", log_ratio), ("weight", weight)):
        if t is not None and t.shape != log_prob.shape:
            raise ValueError(f"ppo_clip_loss: {name} must have log_prob's shape {tuple(log_prob.shape)}, "
                             f"got {tuple(t.shape)}")
    if clip_range <= 0:
        raise ValueError(f"ppo_clip_loss: clip_range must be > 0, got {clip_range}")
    old_log_prob = old_log_prob.detach()
    advantages = advantages.detach()
    raw_log_ratio = log_prob - old_log_prob  # [N]
    log_ratio = raw_log_ratio if log_ratio is None else log_ratio  # [N]
    ratio = log_ratio.exp()  # [N]
    unclipped = -advantages * ratio  # [N]
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # [N]
    per_entry = torch.maximum(unclipped, clipped)  # [N]
    if weight is not None:
        per_entry = weight.detach() * per_entry  # [N]
    loss = per_entry.mean()  # []
    with torch.no_grad():
        low = (ratio < 1.0 - clip_range).float().mean()  # []
        high = (ratio > 1.0 + clip_range).float().mean()  # []
        stats = {
            "clip_frac": low + high,  # []
            "clip_frac_low": low,  # []
            "clip_frac_high": high,  # []
            "approx_kl": 0.5 * (raw_log_ratio**2).mean(),  # []
            "ratio_mean": ratio.mean(),  # []
            "log_ratio_mean": log_ratio.mean(),  # []
            "raw_log_ratio_mean": raw_log_ratio.mean(),  # []
        }
    return loss, stats


# ---- GRPO-Guard: regulated clipping for Gaussian (flow SDE) steps ------------------------------
# J. Wang, J. Liang, et al., "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via
# Regulated Clipping", arXiv 2510.22319 (CVPR 2026). Per step, with d = mu_theta - mu_old and the
# sampled x_next = mu_old + s z (z standard normal), the step's log-ratio is
#     log r = mean_dims(z d) / s - mean_dims(d^2) / (2 s^2):
# its mean is -mean(d^2) / (2 s^2) < 0 (the left shift the paper measures: the clip then acts mostly
# on the low side) and its spread ~ |d| / s differs from step to step. RatioNorm removes the bias
# term and rescales by s, so every step's log-ratio is mean_dims(z d): mean 0 given x_t, one scale
# for all steps. Written from the paper's method and read against two public implementations
# (Flow-Factory's ``GRPOGuardTrainer`` in ``src/flow_factory/trainers/grpo.py``:
# ``(log_prob - old_log_prob) * s + mse / (2 s)``; VeRL-Omni's ``GRPOGuardLoss``: the same, plus the
# 1 / (-dt) loss weight of the paper's gradient reweighting); ``tests/test_grpo_guard.py`` checks
# this function against that form on the same tensors.
RATIO_NORMS = ("none", "grpo_guard")


def guard_log_ratio(mean: Tensor, old_mean: Tensor, next_latents: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's normalised log-ratio (RatioNorm) of one Gaussian step per row: [N].

    ``mean_dims((x_next - mu_old) * (mu_theta - mu_old)) / s`` = mean_dims(z d), which equals
    ``s * (log_prob - old_log_prob) + mean_dims(d^2) / (2 s)`` (the implementations' form) for the
    library's log-prob (a Gaussian log-density averaged over dims), without its cancellation. It is
    exactly 0 on-policy (mu_theta == mu_old), and its gradient in mu_theta is s times the plain
    log-ratio's there (z / (s D) -> z / D).
    mean: [N, ...] mu_theta (with grad); old_mean: [N, ...] mu_old recorded at sampling;
    next_latents: [N, ...] the sampled x_next; std: [N] the step std s (> 0 on trained steps;
    a zero-std row gives 0, never NaN). Returns [N], at least float32.
    """
    if not (mean.shape == old_mean.shape == next_latents.shape):
        shapes = [tuple(t.shape) for t in (mean, old_mean, next_latents)]
        raise ValueError(f"guard_log_ratio: mean, old_mean and next_latents differ: {shapes}")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    old = old_mean.detach().to(dtype)  # [N, ...]
    noise = (next_latents.detach().to(dtype) - old).reshape(mean.shape[0], -1)  # [N, D]  s z
    drift = (mean.to(dtype) - old).reshape(mean.shape[0], -1)  # [N, D]  d
    s = std.detach().to(dtype).reshape(-1)  # [N]
    safe = torch.where(s > 0, s, torch.ones_like(s))  # [N]
    return torch.where(s > 0, (noise * drift).mean(1) / safe, torch.zeros_like(safe))  # [N]


def guard_step_weight(sigma_decrement: Tensor) -> Tensor:
    """GRPO-Guard's gradient reweighting: the loss weight 1 / (sigma - sigma_next) = 1 / (-dt) [N].

    A flow step's mean moves with the velocity by a factor proportional to dt (``steps/flow.py``:
    d mu / d v = (1 + g^2 (1 - sigma) / (2 sigma)) dt), so after RatioNorm a step's policy gradient
    scales with its dt; the weight cancels it (for ``flow_grpo``, g^2 (1 - sigma) / (2 sigma) = a^2/2
    at every step but the first, so the weighted gradients of all steps are on one scale).
    sigma_decrement: [N] > 0. Returns [N] float32.
    """
    d = sigma_decrement.detach().float()  # [N]
    return 1.0 / d.clamp_min(torch.finfo(torch.float32).eps)  # [N]


def ratio_step_sums(log_ratio: Tensor, step: Tensor, num_steps: int, clip_range: float) -> Tensor:
    """Per-denoising-step sums of one minibatch's log-ratios, to be added over minibatches: [6, T].

    Rows: count, sum(l), sum(l^2), sum(l^3), count(r < 1 - eps), count(r > 1 + eps), where
    l = log r. One ``index_add_`` per row set (no loop over samples); ``ratio_step_summary`` turns
    the accumulated sums into means, stds, skews and clip fractions per step.
    log_ratio: [N] (detached here); step: [N] long step indices in [0, T).
    """
    lr = log_ratio.detach().double().reshape(-1)  # [N]
    low = (lr.exp() < 1.0 - clip_range).double()  # [N]
    high = (lr.exp() > 1.0 + clip_range).double()  # [N]
    vals = torch.stack([torch.ones_like(lr), lr, lr**2, lr**3, low, high], 1)  # [N, 6]
    sums = torch.zeros(num_steps, 6, dtype=torch.float64, device=lr.device)  # [T, 6]
    sums.index_add_(0, step.reshape(-1).to(lr.device), vals)
    return sums.T  # [6, T]


RATIO_STAT_NAMES = ("count", "log_ratio_mean", "log_ratio_std", "log_ratio_skew", "clip_frac_low",
                    "clip_frac_high")


def ratio_step_summary(sums: Tensor) -> dict[str, Tensor]:
    """From ``ratio_step_sums`` (summed): {name: [T]} per-step count, mean, population std, skewness
    (E[(l - m)^3] / std^3; 0 where std = 0) and the clip fractions on each side; NaN for a step
    that was never trained. Also the same over all steps pooled, as scalars under ``<name>_all``."""
    def summary(n: Tensor, s1: Tensor, s2: Tensor, s3: Tensor, lo: Tensor, hi: Tensor) -> list[Tensor]:
        nn_ = torch.where(n > 0, n, torch.full_like(n, float("nan")))
        m = s1 / nn_
        var = (s2 / nn_ - m**2).clamp_min(0)
        third = s3 / nn_ - 3 * m * s2 / nn_ + 2 * m**3  # E[(l - m)^3]
        std = var.sqrt()
        skew = torch.where(std > 0, third / std.clamp_min(1e-300) ** 3, torch.zeros_like(std))
        return [n, m, std, skew, lo / nn_, hi / nn_]

    per_step = summary(*sums)  # each [T]
    pooled = summary(*sums.sum(1))  # each []
    out = dict(zip(RATIO_STAT_NAMES, per_step))
    out.update({f"{k}_all": v for k, v in zip(RATIO_STAT_NAMES, pooled)})
    return out


def _per_sample_std(std: Tensor, like: Tensor) -> Tensor:
    """std [N] (or a scalar) -> [N, 1, ...] broadcastable against ``like`` [N, ...]."""
    if std.ndim == 0:
        return std.reshape([1] * like.ndim)
    if std.ndim != 1 or std.shape[0] != like.shape[0]:
        raise ValueError(f"std must be [N] with N = {like.shape[0]} (or a scalar), got {tuple(std.shape)}")
    return std.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)), averaged (not summed) over latent dims.

    Closed form for equal covariances: per dim ``(mean - ref_mean)^2 / (2 std^2)``. Averaged over
    dims to match the log-prob's mean over dims (steps.gaussian_log_prob), as Flow-GRPO's
    ``kl = ((mu - mu_ref)^2).mean(dims) / (2 std_dev_t^2)``. Which std to pass is the caller's
    choice: the step's actual std gives the exact KL, Flow-GRPO passes its std_dev_t (no sqrt(-dt)).
    mean, ref_mean: [N, ...]; std: [N] or a scalar. Returns [N], at least float32.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"gaussian_kl: mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    diff = mean.to(dtype) - ref_mean.to(dtype)  # [N, ...]
    std_b = _per_sample_std(std.to(dtype), diff)  # [N, 1, ...]
    return (diff**2 / (2 * std_b**2)).reshape(diff.shape[0], -1).mean(1)  # [N]


def output_kl(output: Tensor, ref_output: Tensor) -> Tensor:
    """Output-space KL proxy ``mean over dims of (output - ref_output)^2`` (velocity or eps space).

    output, ref_output: [N, ...] denoiser outputs of the policy and the reference. Returns [N],
    at least float32. Not a true KL: it drops the step's mean map and 1/(2 std^2) scale, the form
    some codebases use for a resolution- and schedule-independent penalty.
    """
    if output.shape != ref_output.shape:
        raise ValueError(f"output_kl: output {tuple(output.shape)} and ref_output "
                         f"{tuple(ref_output.shape)} differ")
    dtype = torch.promote_types(output.dtype, torch.float32)
    diff = output.to(dtype) - ref_output.to(dtype)  # [N, ...]
    return (diff**2).reshape(diff.shape[0], -1).mean(1)  # [N]


def flow_grpo_kl(mean: Tensor, ref_mean: Tensor, kl_std: Tensor) -> Tensor:
    """Flow-GRPO's KL term for flow SDE steps: ``mean over dims of (mean - ref_mean)^2 / (2 kl_std^2)``.

    ``kl_std`` [N] is what Flow-GRPO divides by: the SDE's diffusion coefficient g (its
    ``std_dev_t``), from a flow backend's ``kl_std(step_index)``, not the step's std
    s = g sqrt(sigma - sigma_next). So this equals ``gaussian_kl(mean, ref_mean, s)`` times
    (sigma - sigma_next): the exact KL scaled by each step's sigma decrement, which is what a
    Flow-GRPO ``beta`` was tuned against (SD3.5-M at T = 10: the exact KL is 4x to 25x larger).
    mean, ref_mean: [N, ...]; kl_std: [N] or a scalar, > 0. Returns [N], at least float32.
    """
    return gaussian_kl(mean, ref_mean, kl_std)
