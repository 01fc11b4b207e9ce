"""Non-finite guards: a NaN or inf from a reward model never reaches ``optimizer.step()``.

Policy (what the module does with these functions, once per rollout):
    - a trajectory whose final reward is non-finite is *masked*: advantage 0, left out of its
      group's mean and std, its (trajectory, step) pairs left out of the update; a group left with
      fewer than 2 finite rewards is masked whole (no spread, no advantage). The rollout's tensors
      stay rectangular ([P, K]), so the update's batching is unchanged.
    - pruning previews with non-finite proxy scores are never selected over finite ones
      (``selection.py``) and are counted.
    - an optimizer step whose gradient norm is non-finite is skipped (``update.py``).
    - running reward statistics ignore non-finite scores (``rewards/combine.py``).
    - a group whose finite rewards have no float32 mean or variance (rewards near float32's
      maximum) is masked like a non-finite one (``unrepresentable_groups``), and counted;
    - groups whose rewards are all equal (zero spread: every advantage 0) are counted;
    - a rollout that changed nothing (no finite group, every optimizer step skipped, or no group
      with a reward spread on any rank) is *bad*;
      ``FiniteAdvantages.report`` says so and counts the faults (``health/*`` metrics);
      ``BadRolloutGuard`` stops the run after N consecutive bad rollouts with one line that names
      the reward(s) at fault. Weights are never updated by a bad rollout, so the last checkpoint
      stays good; checkpoints with non-finite tensors are refused at save, export and resume
      (``check_finite_tensors``).
All functions are batched tensor ops: no Python loop over samples or groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .objectives import AdvantageSettings, finite_std, group_advantages

if TYPE_CHECKING:
    from .rollout import RolloutResult


class NonFiniteError(RuntimeError):
    """The run produced non-finite values it cannot train around (one line, names the source)."""


def finite_groups(rewards: Tensor, min_valid: int = 2) -> Tensor:
    """rewards [P, K] -> [P, K] bool: finite rewards of groups with at least ``min_valid`` of them."""
    finite = torch.isfinite(rewards)  # [P, K]
    enough = finite.sum(1, keepdim=True) >= min_valid  # [P, 1]
    return finite & enough  # [P, K]


def group_spread(rewards: Tensor, valid: Tensor) -> Tensor:
    """rewards, valid [P, K] -> [P] bool: the group has at least two different valid rewards."""
    hi = torch.where(valid, rewards, torch.full_like(rewards, float("-inf"))).amax(1)  # [P]
    lo = torch.where(valid, rewards, torch.full_like(rewards, float("inf"))).amin(1)  # [P]
    return valid.any(1) & (hi > lo)  # [P]


def unrepresentable_groups(rewards: Tensor, valid: Tensor) -> Tensor:
    """rewards, valid [P, K] -> [P] bool: groups whose finite rewards have no finite float32 mean
    or variance (|reward| near float32's maximum: a sum or a square overflows), so their advantages
    would be inf / NaN, or clipped garbage. If the batch's statistics over the other groups (the
    logged mean, a global std) still overflow, every group with valid rewards is flagged."""
    zero = torch.zeros((), dtype=torch.float32, device=rewards.device)
    r = torch.where(valid, rewards.float(), zero)  # [P, K]
    n = valid.sum(1).clamp(min=1)  # [P]
    mean = r.sum(1) / n  # [P]
    var = torch.where(valid, r - mean[:, None], zero).pow(2).sum(1) / n  # [P]
    bad = ~(torch.isfinite(mean) & torch.isfinite(var))  # [P]
    rest = torch.where(bad[:, None], zero, r)  # [P, K] the other groups: the batch's statistics over them
    if not (bool(torch.isfinite(rest.sum())) and bool(torch.isfinite(rest.pow(2).sum()))):
        bad = torch.ones_like(bad)
    return valid.any(1) & bad  # [P]


@dataclass
class FiniteAdvantages:
    """One rollout's group-relative advantages over its finite rewards (``finite_advantages``).

    advantages: [P, K], exactly 0 for a masked trajectory; valid: [P, K] bool, the trajectories
    kept; n_valid: how many are kept on all ranks together (0: nothing to train on anywhere);
    n_spread: groups with a reward spread on all ranks together (0: every advantage is 0, nothing
    is learned from the reward); flat_groups / unrepresentable: this rank's groups without a spread,
    and masked because their statistics overflow float32.
    """

    advantages: Tensor
    valid: Tensor
    n_valid: float
    n_spread: float = 1.0
    flat_groups: int = 0
    unrepresentable: int = 0

    def update_mask(self, world_size: int) -> Tensor | None:
        """The update's ``valid`` [N] (None: every pair trains). Alone, masked trajectories' pairs
        are left out; under DDP every rank must run the same number of backward passes, so they
        stay in with advantage 0 (no policy gradient)."""
        return None if bool(self.valid.all()) or world_size > 1 else self.valid.flatten()  # [N]

    def report(self, result: RolloutResult, steps: float, skipped: float) -> tuple[bool, dict[str, float]]:
        """(bad, ``health/*`` counts) after the update of ``steps`` optimizer steps, ``skipped`` of
        them for a non-finite gradient. Bad: nothing finite to train on anywhere, every step
        skipped, or no group with a reward spread anywhere (every advantage 0: nothing learned)."""
        nothing = self.n_valid == 0
        previews = sum(int((~c.scores.isfinite()).sum()) for c in result.checkpoints
                       if c.scores is not None and c.step < result.num_steps)  # the final step is no preview
        return nothing or skipped == steps or self.n_spread == 0, {
            "health/nonfinite_rewards": float((~result.rewards.isfinite()).sum()),
            "health/nonfinite_previews": float(previews),
            "health/masked_trajectories": float((~self.valid).sum()),
            "health/skipped_updates": skipped + (1.0 if nothing else 0.0),
            "health/flat_groups": float(self.flat_groups),
            "health/unrepresentable_groups": float(self.unrepresentable)}


def finite_advantages(rewards: Tensor, settings: AdvantageSettings, strategy: Any = None) -> FiniteAdvantages:
    """``group_advantages`` of ``rewards`` [P, K], masking what is not finite (module docstring).

    strategy: the run's Lightning strategy (None: one process). Under DDP the ``global`` std is
    over every rank's rewards (an all-gather) and ``n_valid`` is summed over ranks (a reduce):
    collectives, so every rank calls this once per rollout.
    """
    valid = finite_groups(rewards)  # [P, K]
    overflow = unrepresentable_groups(rewards, valid)  # [P]
    valid = valid & ~overflow[:, None]  # their advantages would be inf / NaN: masked like NaN rewards
    distributed = strategy is not None and strategy.world_size > 1
    global_std = None
    if settings.std == "global" and distributed:
        masked = torch.where(valid, rewards.float(), torch.full_like(rewards.float(), float("nan")))  # [P, K]
        global_std = finite_std(strategy.all_gather(masked))  # [W, P, K] -> std of the valid ones, as on one process
    advantages = group_advantages(rewards, valid, std_mode=settings.std, eps=settings.eps, clip=settings.clip,
                                  global_std=global_std)  # [P, K]
    spread = group_spread(rewards, valid)  # [P]
    counts = torch.stack([valid.sum().float(), spread.sum().float()])  # [2]
    if strategy is not None:
        counts = strategy.reduce(counts, reduce_op="sum")  # over all ranks
    flat = int((valid.any(1) & ~spread).sum())
    return FiniteAdvantages(advantages, valid, float(counts[0]), float(counts[1]), flat, int(overflow.sum()))


def nonfinite_counts(components: Mapping[str, Tensor]) -> dict[str, int]:
    """{reward name: number of non-finite raw scores} for the rewards that had any."""
    counts = {name: int((~torch.isfinite(v)).sum()) for name, v in components.items()}
    return {k: v for k, v in counts.items() if v}


def check_finite_tensors(tensors: Mapping[str, Any], where: str) -> None:
    """Raise ``NonFiniteError`` naming the first floating tensor of ``tensors`` with a NaN/inf."""
    for name, value in tensors.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteError(f"{where}: tensor {name!r} has {bad} non-finite values of {value.numel()}; "
                                 f"refusing non-finite weights")


#: The largest weight magnitude accepted at save, export and load: float16's largest finite value.
#: Why this bound: diffusers pipelines usually run in float16, where a weight past it *is* inf, so
#: such a weight is exactly as unusable as a non-finite one; no trained weight comes near it (LoRA
#: factors and diffusion weights are O(1): peft initialises lora_A at ~1/sqrt(in_features), lora_B
#: at 0, and an AdamW step moves a weight by about lr), while one flipped exponent bit of an
#: O(1e-2) float32 weight gives ~1e36. The digest (checkpointing.py) catches the smaller flips.
MAX_WEIGHT_MAGNITUDE = float(torch.finfo(torch.float16).max)  # 65504


def check_weight_magnitudes(tensors: Mapping[str, Any], where: str, bound: float = MAX_WEIGHT_MAGNITUDE) -> None:
    """Raise ``NonFiniteError`` naming the first floating tensor of ``tensors`` with a finite value
    beyond ``bound`` (``MAX_WEIGHT_MAGNITUDE``: why that bound)."""
    for name, value in tensors.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
            peak = float(value.detach().abs().float().nan_to_num(0.0, 0.0, 0.0).max())
            if peak > bound:
                n = int((value.detach().abs() > bound).sum())
                raise NonFiniteError(f"{where}: tensor {name!r} has {n} values of magnitude > {bound:g} (largest "
                                     f"{peak:.3g}); refusing implausible weights (they would be inf in float16)")


def optimizer_tensors(optimizer_states: Iterable[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Flatten Lightning's ``optimizer_states`` into {"optimizer.<i>.<param>.<key>": tensor}."""
    out: dict[str, Tensor] = {}
    for i, opt in enumerate(optimizer_states):
        for param, state in (opt.get("state") or {}).items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    out[f"optimizer.{i}.{param}.{key}"] = value
    return out


@dataclass
class GuardSettings:
    """This run's refusals; YAML ``model.guards``. Not saved in checkpoints: how a run treats
    faults is that run's choice (LightningCLI reads a resumed checkpoint's hyperparameters back).

    Args:
        max_bad_rollouts: stop the run (one-line error naming the reward) after this many consecutive
            rollouts that trained nothing: their rewards or gradients were NaN/inf, their reward
            statistics overflowed float32, or no group had a reward spread (a constant reward);
            single bad trajectories and groups are masked and training goes on.
        allow_schedule_change: resume a checkpoint whose group schedule differs from this run's (on
            purpose, e.g. a curriculum); otherwise that is refused before any weights load.
        allow_foreign_checkpoint: use a ``ckpt_path`` that lacks this package's record (the run's
            identity, rollout counter and config: not written by this package, or edited); otherwise
            it is refused, since nothing about it can be checked and its rollout counter would restart at 0.
    """

    max_bad_rollouts: int = 3
    allow_schedule_change: bool = False
    allow_foreign_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.max_bad_rollouts < 1:
            raise ValueError(f"guards.max_bad_rollouts must be >= 1, got {self.max_bad_rollouts}")


class BadRolloutGuard:
    """Counts consecutive bad rollouts (ones that changed no weight); after ``patience`` of them
    raises ``NonFiniteError`` with one line naming the rewards that returned non-finite values."""

    def __init__(self, patience: int = 3) -> None:
        self.patience = patience
        self.consecutive = 0
        self.culprits: dict[str, int] = {}  # reward -> non-finite scores over the current streak
        self.skipped_steps = 0
        self.unrepresentable = 0  # groups whose statistics overflowed, over the current streak
        self.flat: dict[str, int] = {}  # reward -> rollouts of the streak in which it gave no spread

    def update(self, bad: bool, nonfinite: Mapping[str, int], total: int, skipped_steps: int = 0,
               health: Mapping[str, float] | None = None, components: Mapping[str, Tensor] | None = None) -> None:
        """One rollout: ``bad`` if nothing was trained; ``nonfinite`` {reward: count} of its
        final scores out of ``total``; ``skipped_steps`` optimizer steps skipped (non-finite grad);
        ``health``: its ``health/*`` counts; ``components``: each reward's raw scores [P, K] (to
        name a reward that gave no spread)."""
        if not bad:
            self.consecutive, self.culprits, self.skipped_steps = 0, {}, 0
            self.unrepresentable, self.flat = 0, {}
            return
        self.consecutive += 1
        self.skipped_steps += skipped_steps
        for name, n in nonfinite.items():
            self.culprits[name] = self.culprits.get(name, 0) + n
        health = health or {}
        self.unrepresentable += int(health.get("health/unrepresentable_groups", 0))
        for name, scores in (components or {}).items():
            finite = torch.isfinite(scores)
            if bool(finite.any()) and not bool(group_spread(scores, finite).any()):
                self.flat[name] = self.flat.get(name, 0) + 1
        if self.consecutive >= self.patience:
            flat = sorted(n for n, c in self.flat.items() if c == self.consecutive)
            if self.culprits:
                who = ", ".join(f"reward {n!r} returned NaN/inf for {c} of {total * self.consecutive} images"
                                for n, c in sorted(self.culprits.items()))
            elif self.unrepresentable:
                who = (f"the rewards were finite but their mean or variance overflows float32 in "
                       f"{self.unrepresentable} groups (rewards near float32's maximum): rescale the reward")
            elif flat or health.get("health/flat_groups"):
                named = ", ".join(repr(n) for n in flat) or "the total"
                who = (f"every group's rewards were equal (zero spread, so every advantage is 0); reward {named} "
                       f"gave all images of a prompt the same score: a constant or saturated reward, or too "
                       f"little sampling noise")
            else:
                who = (f"the rewards were finite but the gradient norm was NaN/inf "
                       f"({self.skipped_steps} optimizer steps skipped)")
            raise NonFiniteError(f"model.guards.max_bad_rollouts={self.patience}: {self.consecutive} consecutive rollouts "
                                 f"trained nothing: {who}; stopped, the last checkpoint holds the last good weights")
