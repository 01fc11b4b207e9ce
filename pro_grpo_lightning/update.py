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
from .objectives import flow_grpo_kl, gaussian_kl, output_kl, ppo_clip_loss
from .rollout import RolloutResult

KL_TYPES = ("exact", "output", "flow_grpo")


@dataclass
class UpdateSettings:
    """How one rollout is trained on; YAML ``model.update``. Defaults follow Flow-GRPO / DanceGRPO
    where they agree.

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
    """

    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    train_batch_size: int = 8
    minibatches_per_step: int | None = None
    clip_range: float = 1e-4
    kl_beta: float = 0.0
    kl_type: str = "exact"
    max_grad_norm: float | None = 1.0

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


def check_optimizer(optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]) -> str:
    """Build the optimizer on a dummy parameter (no weights needed): its class name, and a
    refusal of a learning rate that trains nothing."""
    probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    lr = probe.param_groups[0].get("lr")
    if lr is not None and not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ConfigError(f"model.optimizer.init_args.lr={float(lr)}: must be a finite number > 0 "
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


@dataclass
class Minibatch:
    """One minibatch of stored (trajectory, step) transitions, b rows: what ``minibatch_loss`` trains on.

    latents, next_latents: [b, *latent] x_t and the stored x_{t+1}; step_index: [b] long;
    cond: the rows' conditioning; old_log_prob: [b], recorded at rollout time; advantages: [b].
    """

    latents: Tensor
    next_latents: Tensor
    step_index: Tensor
    cond: dict[str, Tensor]
    old_log_prob: Tensor
    advantages: Tensor

    @classmethod
    def of(cls, rollout: RolloutResult, advantages: Tensor, traj: Tensor, step: Tensor) -> Minibatch:
        """The pairs (``traj`` [b], ``step`` [b]) of a rollout; advantages [N], one per trajectory."""
        return cls(latents=rollout.latents[traj, step], next_latents=rollout.latents[traj, step + 1],
                   step_index=step, cond=select_rows(rollout.cond, rollout.prompt_index.index_select(0, traj)),
                   old_log_prob=rollout.log_probs[traj, step], advantages=advantages[traj])


def minibatch_loss(backend: DiffusionBackend, batch: Minibatch,
                   settings: UpdateSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one minibatch (to call ``backward`` on) and its statistics (``policy_loss``, the
    PPO-clip statistics, ``kl`` when ``kl_beta > 0``): the policy re-scores the stored transitions
    with grad; with ``kl_beta > 0`` the frozen reference runs the same rows without grad.
    ``grpo_update`` trains with it and the memory plan traces it, so both run this one function."""
    out = backend.step(batch.latents, batch.step_index, batch.cond, next_latents=batch.next_latents)
    policy_loss, stats = ppo_clip_loss(out.log_prob, batch.old_log_prob, batch.advantages, settings.clip_range)
    loss = policy_loss
    stats = {"policy_loss": policy_loss.detach(), **stats}
    if settings.kl_beta > 0:
        with torch.no_grad(), backend.reference():
            ref = backend.step(batch.latents, batch.step_index, batch.cond, next_latents=batch.next_latents)
        if settings.kl_type == "exact":
            kl = gaussian_kl(out.mean, ref.mean, out.std)  # [b]
        elif settings.kl_type == "flow_grpo":
            kl = flow_grpo_kl(out.mean, ref.mean, backend.kl_std(batch.step_index))  # [b]
        else:
            kl = output_kl(out.model_output, ref.model_output)  # [b]
        loss = loss + settings.kl_beta * kl.mean()
        stats["kl"] = kl.mean().detach()
    return loss, stats


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
    Returns means of the per-minibatch statistics (loss, policy_loss, kl, clip_frac, approx_kl,
    ratio_mean) and of the pre-clip gradient norm over optimizer steps (finite ones), plus the
    counts ``steps`` and ``skipped_steps``.
    """
    backward = backward or (lambda loss: loss.backward())
    clip_grad_norm = clip_grad_norm or torch.nn.utils.clip_grad_norm_
    N = rollout.latents.shape[0]
    rows = None if valid is None else valid.nonzero().flatten()  # [N_valid] trajectories trained on
    trainable = backend.trainable_steps().to(rollout.latents.device)  # [T] bool
    params = backend.trainable_parameters()
    sums: dict[str, list[Tensor]] = {}
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
            loss, stats = minibatch_loss(backend, Minibatch.of(rollout, advantages, tr, st), settings)
            # scale so an optimizer step sees the mean over its minibatches
            n_in_step = min(per_step, len(chunks) - (i // per_step) * per_step)
            backward(loss / n_in_step)
            add("loss", loss.detach())
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
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
    out = {k: float(torch.stack(v).mean()) for k, v in sums.items()}
    return {**out, "steps": float(steps), "skipped_steps": float(skipped)}
