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
    - a rollout that changed nothing (no finite group, or every optimizer step skipped) is *bad*;
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


@dataclass
class FiniteAdvantages:
    """One rollout's group-relative advantages over its finite rewards (``finite_advantages``).

    advantages: [P, K], exactly 0 for a masked trajectory; valid: [P, K] bool, the trajectories
    kept; n_valid: how many are kept on all ranks together (0: nothing to train on anywhere).
    """

    advantages: Tensor
    valid: Tensor
    n_valid: float

    def update_mask(self, world_size: int) -> Tensor | None:
        """The update's ``valid`` [N] (None: every pair trains). Alone, masked trajectories' pairs
        are left out; under DDP every rank must run the same number of backward passes, so they
        stay in with advantage 0 (no policy gradient)."""
        return None if bool(self.valid.all()) or world_size > 1 else self.valid.flatten()  # [N]

    def report(self, result: RolloutResult, steps: float, skipped: float) -> tuple[bool, dict[str, float]]:
        """(bad, ``health/*`` counts) after the update of ``steps`` optimizer steps, ``skipped`` of
        them for a non-finite gradient. Bad: nothing finite to train on anywhere, or every step skipped."""
        nothing = self.n_valid == 0
        previews = sum(int((~c.scores.isfinite()).sum()) for c in result.checkpoints
                       if c.scores is not None and c.step < result.num_steps)  # the final step is no preview
        return nothing or skipped == steps, {
            "health/nonfinite_rewards": float((~result.rewards.isfinite()).sum()),
            "health/nonfinite_previews": float(previews),
            "health/masked_trajectories": float((~self.valid).sum()),
            "health/skipped_updates": skipped + (1.0 if nothing else 0.0)}


def finite_advantages(rewards: Tensor, settings: AdvantageSettings, strategy: Any = None) -> FiniteAdvantages:
    """``group_advantages`` of ``rewards`` [P, K], masking what is not finite (module docstring).

    strategy: the run's Lightning strategy (None: one process). Under DDP the ``global`` std is
    over every rank's rewards (an all-gather) and ``n_valid`` is summed over ranks (a reduce):
    collectives, so every rank calls this once per rollout.
    """
    valid = finite_groups(rewards)  # [P, K]
    distributed = strategy is not None and strategy.world_size > 1
    global_std = None
    if settings.std == "global" and distributed:
        masked = torch.where(valid, rewards.float(), torch.full_like(rewards.float(), float("nan")))  # [P, K]
        global_std = finite_std(strategy.all_gather(masked))  # [W, P, K] -> std of the valid ones, as on one process
    advantages = group_advantages(rewards, valid, std_mode=settings.std, eps=settings.eps, clip=settings.clip,
                                  global_std=global_std)  # [P, K]
    n_valid = valid.sum().float()
    if strategy is not None:
        n_valid = strategy.reduce(n_valid, reduce_op="sum")  # over all ranks
    return FiniteAdvantages(advantages, valid, float(n_valid))


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

    max_bad_rollouts: stop the run (one-line error naming the reward) after this many consecutive
        rollouts that trained nothing because their rewards or gradients were NaN/inf; single bad
        trajectories are masked and training goes on.
    allow_schedule_change: resume a checkpoint whose group schedule differs from this run's (on
        purpose, e.g. a curriculum); otherwise that is refused before any weights load.
    """

    max_bad_rollouts: int = 3
    allow_schedule_change: bool = False

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

    def update(self, bad: bool, nonfinite: Mapping[str, int], total: int, skipped_steps: int = 0) -> None:
        """One rollout: ``bad`` if nothing was trained; ``nonfinite`` {reward: count} of its
        final scores out of ``total``; ``skipped_steps`` optimizer steps skipped (non-finite grad)."""
        if not bad:
            self.consecutive, self.culprits, self.skipped_steps = 0, {}, 0
            return
        self.consecutive += 1
        self.skipped_steps += skipped_steps
        for name, n in nonfinite.items():
            self.culprits[name] = self.culprits.get(name, 0) + n
        if self.consecutive >= self.patience:
            if self.culprits:
                who = ", ".join(f"reward {n!r} returned NaN/inf for {c} of {total * self.consecutive} images"
                                for n, c in sorted(self.culprits.items()))
            else:
                who = (f"the rewards were finite but the gradient norm was NaN/inf "
                       f"({self.skipped_steps} optimizer steps skipped)")
            raise NonFiniteError(f"model.guards.max_bad_rollouts={self.patience}: {self.consecutive} consecutive rollouts "
                                 f"trained nothing: {who}; stopped, the last checkpoint holds the last good weights")
