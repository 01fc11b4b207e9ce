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
                  clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``loss = mean(max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)))`` with
    ``r = exp(log_prob - old_log_prob)``; the same form as DDPO's and Flow-GRPO's train loops.
    log_prob, old_log_prob, advantages: [N] (one entry per trained step of a trajectory; the
    shapes must match exactly, so nothing broadcasts by accident). old_log_prob and advantages
    carry no gradient. Returns the scalar loss and detached scalar stats:
        clip_frac: fraction of entries with |r - 1| > clip_range
        approx_kl: 0.5 * mean((log_prob - old_log_prob)^2), the estimator DDPO/Flow-GRPO log
        ratio_mean: mean(r); exactly 1 on-policy, before the first optimizer step (docs/algorithm.md, section 1)
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        shapes = [tuple(t.shape) for t in (log_prob, old_log_prob, advantages)]
        raise ValueError("ppo_clip_loss: log_prob, old_log_prob and advantages must have the same "
                         f"shape, got {shapes[0]}, {shapes[1]}, {shapes[2]}")
    if clip_range <= 0:
        raise ValueError(f"ppo_clip_loss: clip_range must be > 0, got {clip_range}")
    old_log_prob = old_log_prob.detach()
    advantages = advantages.detach()
    log_ratio = log_prob - old_log_prob  # [N]
    ratio = log_ratio.exp()  # [N]
    unclipped = -advantages * ratio  # [N]
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # [N]
    loss = torch.maximum(unclipped, clipped).mean()  # []
    with torch.no_grad():
        stats = {
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),  # []
            "approx_kl": 0.5 * (log_ratio**2).mean(),  # []
            "ratio_mean": ratio.mean(),  # []
        }
    return loss, stats


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
