"""The GRPO update on a rollout's survivors: inner epochs over (trajectory, step) minibatches.

A plain function, testable without a Trainer: the LightningModule passes Lightning's
``manual_backward`` and its optimizer; tests pass ``loss.backward`` and a torch optimizer.
Each minibatch re-scores stored transitions with grad (same step function as sampling, given the
stored next latent), so on-policy, before the first optimizer step, the ratio is exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends.base import DiffusionBackend, select_rows
from .errors import ConfigError
from .objectives import (RATIO_NORMS, flow_grpo_kl, gaussian_kl, guard_log_ratio, guard_step_weight,
                         output_kl, ppo_clip_loss, ratio_step_sums, ratio_step_summary)
from .rollout import RolloutResult

KL_TYPES = ("exact", "output", "flow_grpo")


@dataclass
class UpdateSettings:
    """How one rollout is trained on; YAML ``model.update``. Defaults follow Flow-GRPO / DanceGRPO
    where they agree.

    Args:
        inner_epochs: passes over the rollout's (trajectory, step) pairs.
        timestep_fraction: share of each trajectory's trainable steps used per epoch (random subset).
        train_batch_size: (trajectory, step) pairs per forward/backward.
        minibatches_per_step: minibatches accumulated per optimizer step; None = all of an epoch
            (one optimizer step per inner epoch).
        clip_range: PPO ratio clip epsilon (baseline 1e-4: log-probs are means over latent dims).
        kl_beta: weight of the KL to the reference (0 skips the reference forward).
        kl_type: "exact" (closed-form Gaussian KL with the step std), "output" (||eps - eps_ref||^2 /
            ||v - v_ref||^2 mean over dims) or "flow_grpo" (flow backends only: Flow-GRPO's form, which
            divides by the SDE coefficient without dt, so Flow-GRPO's published betas transfer).
        max_grad_norm: gradient-norm clip (None or 0 disables).
        ratio_norm: "none" (the plain ratio) or "grpo_guard" (flow backends only): GRPO-Guard's
            regulated clipping (Wang et al., arXiv 2510.22319): each step's log-ratio normalised
            (RatioNorm, ``objectives.guard_log_ratio``: its mean back to 0 and one scale for every
            step) and, with ``guard_reweight``, each step's loss weighted by 1 / (sigma - sigma_next).
            The rollout then records every step's mean (as much memory as the latents). The
            normalised log-ratio is about s (the step std) times the plain one, so ``clip_range`` needs
            retuning (docs/algorithm.md, section 1).
        guard_reweight: with "grpo_guard", apply its step reweighting (False: RatioNorm alone, as
            Flow-Factory's ``grpo-guard`` trainer does).
    """

    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    train_batch_size: int = 8
    minibatches_per_step: int | None = None
    clip_range: float = 1e-4
    kl_beta: float = 0.0
    kl_type: str = "exact"
    max_grad_norm: float | None = 1.0
    ratio_norm: str = "none"
    guard_reweight: bool = True

    def __post_init__(self) -> None:
        if self.inner_epochs < 1:
            raise ValueError(f"update.inner_epochs must be >= 1, got {self.inner_epochs}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"update.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.train_batch_size < 1:
            raise ValueError(f"update.train_batch_size must be >= 1, got {self.train_batch_size}")
        if self.minibatches_per_step is not None and self.minibatches_per_step < 1:
            raise ValueError(f"update.minibatches_per_step must be >= 1 or None, got {self.minibatches_per_step}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"update.kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if self.clip_range <= 0:
            raise ValueError(f"update.clip_range must be > 0, got {self.clip_range}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"update.max_grad_norm must be >= 0 or None, got {self.max_grad_norm}")
        if self.ratio_norm not in RATIO_NORMS:
            raise ValueError(f"update.ratio_norm must be one of {RATIO_NORMS}, got {self.ratio_norm!r}")

    def optimizer_steps(self, num_trajectories: int, num_trainable_steps: int) -> int:
        """Optimizer steps ``grpo_update`` takes on a rollout of ``num_trajectories`` trained
        trajectories with ``num_trainable_steps`` trainable steps each (none masked): per inner
        epoch, ceil(minibatches / minibatches_per_step) with ceil(pairs / train_batch_size)
        minibatches of the epoch's N x ceil(timestep_fraction x n) pairs (``training_pairs``)."""
        pairs = num_trajectories * max(1, math.ceil(self.timestep_fraction * num_trainable_steps))
        chunks = math.ceil(pairs / self.train_batch_size)
        return self.inner_epochs * math.ceil(chunks / (self.minibatches_per_step or chunks))


def check_optimizer(optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]) -> str:
    """Build the optimizer on a dummy parameter (no weights needed): its class name, and a
    refusal of a learning rate that trains nothing."""
    probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    lr = probe.param_groups[0].get("lr")
    if lr is not None and not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ConfigError(f"optimizer.init_args.lr={float(lr)}: must be a finite number > 0 "
                          f"(a learning rate of 0 trains nothing)")
    return f"{type(probe).__module__}.{type(probe).__qualname__}"


def check_trainable(backend: DiffusionBackend, settings: UpdateSettings) -> None:
    """Refuse, from the settings alone (no weights), an update with nothing to train or a KL the
    backend cannot compute. At least one step must be trainable: a flow backend never trains its
    last step (it ends on the data, std 0); a DDIM backend with eta 0 samples no step
    stochastically. ``kl_type='flow_grpo'`` needs a flow backend's SDE coefficient."""
    steps = backend.trainable_steps_from_settings()  # [T] bool
    if not bool(steps.any()):
        window = f", sde_window={list(backend.sde_window)}" if backend.sde_window is not None else ""
        raise ConfigError(f"model.backend: num_steps={backend.num_steps}{window} leaves no trainable step "
                          f"(the last step of a flow sampler and every step with eta=0 are deterministic)")
    if settings.kl_type == "flow_grpo" and not hasattr(backend, "kl_std"):
        raise ValueError(f"update.kl_type='flow_grpo' needs a flow-matching backend; {type(backend).__name__} "
                         f"has no SDE coefficient: use kl_type 'exact' or 'output'")
    if settings.ratio_norm == "grpo_guard" and not hasattr(backend, "sigma_decrement"):
        raise ConfigError(f"update.ratio_norm='grpo_guard' is defined for flow-matching backends (SD3, FLUX); "
                          f"{type(backend).__name__} has no flow step for it: use ratio_norm 'none'")


def training_pairs(num_traj: int, trainable: Tensor, fraction: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Shuffled (trajectory, step) pairs for one epoch.

    Each trajectory gets its own random subset of ``ceil(fraction * n)`` of the n trainable steps
    (Flow-GRPO's timestep_fraction), drawn for all trajectories at once.
    trainable: [T] bool. Returns traj [M], step [M], M = num_traj * ceil(fraction * n).
    """
    steps = trainable.nonzero().flatten()  # [n]
    n = steps.numel()
    if n == 0:
        raise ValueError("the backend reports no trainable steps for this schedule")
    m = max(1, math.ceil(fraction * n))
    dev = trainable.device
    order = torch.rand(num_traj, n, generator=generator, device=generator.device if generator else dev)
    pick = order.argsort(1)[:, :m].to(dev)  # [N, m] random subset per trajectory
    step = steps[pick].flatten()  # [N*m]
    traj = torch.arange(num_traj, device=dev).repeat_interleave(m)  # [N*m]
    perm = torch.randperm(traj.numel(), generator=generator, device=generator.device if generator else dev).to(dev)
    return traj[perm], step[perm]


def guard_terms(backend: DiffusionBackend, out, step: Tensor, old_mean: Tensor | None, next_latents: Tensor,
                reweight: bool) -> tuple[Tensor, Tensor | None]:
    """GRPO-Guard's (normalised log-ratio [b], loss weight [b] or None) of a minibatch's pairs at
    ``step`` [b], from the re-scored step ``out`` and the rollout's recorded means ``old_mean``."""
    if old_mean is None:
        raise ValueError("update.ratio_norm='grpo_guard' needs the rollout's step means: "
                         "sample with ExpandPruneRollout(..., record_means=True)")
    log_ratio = guard_log_ratio(out.mean, old_mean, next_latents, out.std)  # [b]
    weight = guard_step_weight(backend.sigma_decrement(step)) if reweight else None  # [b]
    return log_ratio, weight


def ratio_log_stats(sums: Tensor, raw_sums: Tensor, trainable: Tensor) -> dict[str, float]:
    """Logged log-ratio statistics from the summed ``ratio_step_sums`` [6, T] of the clipped
    (``sums``) and the raw (``raw_sums``) log-ratios: over all trained pairs (``log_ratio_std``,
    ``log_ratio_skew``) and per trainable step t (``<stat>/step_<t>``: the mean, skewness and clip
    fractions of the clipped log-ratio, the raw mean). The same keys on every rank (NaN for a step
    no pair drew), so DDP's metric reduction lines up."""
    summary, raw = ratio_step_summary(sums), ratio_step_summary(raw_sums)
    out = {"log_ratio_std": summary["log_ratio_std_all"], "log_ratio_skew": summary["log_ratio_skew_all"]}
    for t in trainable.nonzero().flatten().tolist():
        for name in ("log_ratio_mean", "log_ratio_skew", "clip_frac_low", "clip_frac_high"):
            out[f"{name}/step_{t:02d}"] = summary[name][t]
        out[f"raw_log_ratio_mean/step_{t:02d}"] = raw["log_ratio_mean"][t]
    return {k: float(v) for k, v in out.items()}


def minibatch_loss(backend: DiffusionBackend, x_t: Tensor, step: Tensor, cond: dict[str, Tensor],
                   x_next: Tensor, old_log_prob: Tensor, advantages: Tensor,
                   settings: UpdateSettings, old_mean: Tensor | None = None,
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None, tuple[Tensor, Tensor]]:
    """The loss of one minibatch of b (trajectory, step) pairs, forward only (the caller runs the
    backward): the policy re-scores the stored transitions x_t [b, *latent] -> x_next at ``step`` [b],
    the PPO-clip loss against ``old_log_prob`` [b] with ``advantages`` [b] (with
    ``ratio_norm='grpo_guard'``: on GRPO-Guard's normalised log-ratio against the recorded means
    ``old_mean`` [b, *latent], weighted per step), plus ``kl_beta`` times the KL to the reference (a
    no-grad forward with the adapter off). One function, so the update and the diagnostics that
    trace its calls (``benchmarks/gpu/kernel_calls.py``) run the same code.
    Returns (loss, policy_loss, stats, kl [b] or None, (raw, clipped) detached log-ratios [b])."""
    out = backend.step(x_t, step, cond, next_latents=x_next)
    log_ratio = weight = None
    if settings.ratio_norm == "grpo_guard":
        log_ratio, weight = guard_terms(backend, out, step, old_mean, x_next, settings.guard_reweight)
    policy_loss, stats = ppo_clip_loss(out.log_prob, old_log_prob, advantages, settings.clip_range,
                                       log_ratio=log_ratio, weight=weight)
    raw = (out.log_prob - old_log_prob).detach()  # [b]
    ratios = (raw, raw if log_ratio is None else log_ratio.detach())  # [b], [b]
    if settings.kl_beta <= 0:
        return policy_loss, policy_loss, stats, None, ratios
    with torch.no_grad(), backend.reference():
        ref = backend.step(x_t, step, cond, next_latents=x_next)
    if settings.kl_type == "exact":
        kl = gaussian_kl(out.mean, ref.mean, out.std)  # [b]
    elif settings.kl_type == "flow_grpo":
        kl = flow_grpo_kl(out.mean, ref.mean, backend.kl_std(step))  # [b]
    else:
        kl = output_kl(out.model_output, ref.model_output)  # [b]
    return policy_loss + settings.kl_beta * kl.mean(), policy_loss, stats, kl, ratios


def grpo_update(backend: DiffusionBackend, rollout: RolloutResult, advantages: Tensor,
                settings: UpdateSettings, optimizer: torch.optim.Optimizer, *,
                generator: torch.Generator | None = None,
                backward: Callable[[Tensor], None] | None = None,
                after_step: Callable[[], None] | None = None,
                clip_grad_norm: Callable[[list[Tensor], float], Tensor] | None = None,
                valid: Tensor | None = None) -> dict[str, float]:
    """Train the policy on one rollout. advantages: [N], one per surviving trajectory.

    valid: optional [N] bool, the trajectories to train on (``health.py``: the others had a
    non-finite reward); their (trajectory, step) pairs are the only ones drawn.
    An optimizer step whose (pre-clip) gradient norm is NaN/inf is skipped: the gradients are
    dropped, neither the optimizer nor ``after_step`` runs; ``skipped_steps`` counts them.

    clip_grad_norm(params, max_norm) clips in place and returns the pre-clip total norm; default
    ``torch.nn.utils.clip_grad_norm_``. A sharding strategy passes its own (under FSDP only the
    root module's ``clip_grad_norm_`` sees every shard).
    Returns means of the per-minibatch statistics (loss, policy_loss, kl, clip_frac and its low /
    high sides, approx_kl, ratio_mean, log_ratio_mean, raw_log_ratio_mean), the log-ratio's
    distribution over all pairs and per step (``ratio_log_stats``) and means of the pre-clip
    gradient norm over optimizer steps (finite ones), plus the
    counts ``steps`` and ``skipped_steps``.
    """
    backward = backward or (lambda loss: loss.backward())
    clip_grad_norm = clip_grad_norm or torch.nn.utils.clip_grad_norm_
    N = rollout.latents.shape[0]
    rows = None if valid is None else valid.nonzero().flatten()  # [N_valid] trajectories trained on
    trainable = backend.trainable_steps().to(rollout.latents.device)  # [T] bool
    params = backend.trainable_parameters()
    sums: dict[str, list[Tensor]] = {}
    T = trainable.numel()
    ratio_sums = torch.zeros(6, T, dtype=torch.float64, device=trainable.device)  # [6, T] clipped log-ratio
    raw_sums = torch.zeros_like(ratio_sums)  # [6, T] log_prob - old_log_prob
    steps = skipped = 0

    def add(name: str, value: Tensor) -> None:  # no .item() here: one device sync at the end
        sums.setdefault(name, []).append(value.detach().float().reshape(()))

    for _ in range(settings.inner_epochs):
        if rows is None:
            traj, step = training_pairs(N, trainable, settings.timestep_fraction, generator)  # [M], [M]
        else:  # pairs of the valid trajectories only, mapped back to rollout rows
            traj, step = training_pairs(rows.numel(), trainable, settings.timestep_fraction, generator)
            traj = rows.index_select(0, traj)  # [M]
        chunks = list(zip(traj.split(settings.train_batch_size), step.split(settings.train_batch_size)))
        per_step = settings.minibatches_per_step or len(chunks)
        optimizer.zero_grad(set_to_none=True)
        for i, (tr, st) in enumerate(chunks):
            x_t = rollout.latents[tr, st]  # [b, *latent]
            x_next = rollout.latents[tr, st + 1]  # [b, *latent]
            old_log_prob = rollout.log_probs[tr, st]  # [b]
            cond = select_rows(rollout.cond, rollout.prompt_index.index_select(0, tr))
            guarded = settings.ratio_norm == "grpo_guard" and rollout.means is not None
            old_mean = rollout.means[tr, st] if guarded else None  # [b, *latent] GRPO-Guard's mu_old
            loss, policy_loss, stats, kl, (raw, used) = minibatch_loss(
                backend, x_t, st, cond, x_next, old_log_prob, advantages[tr], settings, old_mean=old_mean)
            raw_sums += ratio_step_sums(raw, st, T, settings.clip_range)
            ratio_sums += ratio_step_sums(used, st, T, settings.clip_range)
            if kl is not None:
                add("kl", kl.mean().detach())
            # scale so an optimizer step sees the mean over its minibatches
            n_in_step = min(per_step, len(chunks) - (i // per_step) * per_step)
            backward(loss / n_in_step)
            add("loss", loss.detach())
            add("policy_loss", policy_loss.detach())
            for k, v in stats.items():
                add(k, v)
            if (i + 1) % per_step == 0 or i + 1 == len(chunks):
                if settings.max_grad_norm:
                    norm = clip_grad_norm(params, settings.max_grad_norm)
                else:
                    grads = [p.grad for p in params if p.grad is not None]
                    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
                        if grads else torch.zeros(())
                steps += 1
                if not bool(torch.isfinite(torch.as_tensor(norm))):  # one sync per optimizer step
                    skipped += 1  # a NaN/inf gradient never reaches the weights or Adam's moments
                    optimizer.zero_grad(set_to_none=True)
                    continue
                add("grad_norm", torch.as_tensor(norm))
                optimizer.step()
                # Autocast keeps the low-precision copy of each fp32 weight it cast for as long as its
                # region lasts (Lightning's mixed precision: the whole training step), so without this
                # the next minibatch would run on the weights of before this step (ratio stuck at 1).
                torch.clear_autocast_cache()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
    out = {k: float(torch.stack(v).mean()) for k, v in sums.items()}
    out.update(ratio_log_stats(ratio_sums, raw_sums, trainable))
    return {**out, "steps": float(steps), "skipped_steps": float(skipped)}
