"""Several rewards as one: a weighted sum of (optionally normalised) scores, raw scores for logging.

Why normalise: rewards live on very different scales (PickScore ~22, ImageReward ~0 +- 1, JPEG
-kB ~ -100), so raw weights mostly say which reward dominates. Z-scoring each component first makes
``weight`` the component's share of the total.

What it does and does not change. Advantages are computed per group
(``A_g = (R_g - mean_group) / std_group``), which cancels any affine map ``a * R + b`` with ``a > 0``
that is the same for the whole batch (up to the advantage's eps). So for a *single* reward, "batch" and
"running" normalisation leave the advantages as they are; for *several* rewards they change the mix
(each component's ``a`` differs), which is the point. Pruning ranks previews within a group, so the
same holds for which trajectories survive.

Modes:
    "none":    total = sum_i w_i s_i.
    "batch":   z-score each component over the batch being scored (population std + eps): an
               all-equal component contributes 0. Note that previews and final images are different
               batches with their own statistics.
    "running": z-score with an EMA of each component's mean and variance (``momentum``). The stats
               are updated only by calls with ``update_stats=True`` (the rollout's final images), so
               pruning previews (``update_stats=False``) never shift them. Each update folds the batch
               in first, then normalises it; until the first update, batch statistics are used. The
               stats are buffers: saved in the state dict, resumed from a checkpoint, and per process
               (not synchronised across ranks).

Non-finite scores (a reward model's NaN or inf) never enter any statistic: "batch" and "running"
statistics are over each component's finite scores, and a running statistic whose component had
no finite score in the batch is left as it was. The non-finite score itself stays non-finite in
the total, so the rollout can mask that trajectory (``health.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Reward

NORMALIZE_MODES = ("none", "batch", "running")


class RewardSet(nn.Module):
    """Weighted sum of rewards.

    Args:
        rewards: one or more rewards with unique ``name`` s.
        normalize: "none", "batch" or "running" (see the module docstring).
        momentum: EMA factor of the running statistics: ``stat = momentum * stat + (1 - momentum) * batch``.
        eps: added to the std in the z-score.
    """

    def __init__(self, rewards: Sequence[Reward], normalize: str = "none", momentum: float = 0.99,
                 eps: float = 1e-6) -> None:
        super().__init__()
        rewards = list(rewards)
        if not rewards:
            raise ValueError("RewardSet: needs at least one reward, got an empty list")
        names = [r.name for r in rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"RewardSet: reward names must be unique, {duplicates} appear more than once; "
                             f"give each a distinct `name` (names: {names})")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"RewardSet.normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"RewardSet.momentum must be in [0, 1), got {momentum}")
        for r in rewards:
            if not math.isfinite(r.weight):
                raise ValueError(f"reward {r.name!r}: weight={r.weight} must be a finite number")
        if all(r.weight == 0 for r in rewards):
            raise ValueError(f"rewards: every weight is 0 ({', '.join(f'{n}=0' for n in names)}): the total "
                             f"reward is constant, so nothing would train; give a reward a non-zero weight")
        self.rewards = nn.ModuleList(rewards)
        self.normalize = normalize
        self.momentum = float(momentum)
        self.eps = float(eps)
        n = len(rewards)
        # Registered in every mode so state dicts have the same keys whatever the mode.
        self.register_buffer("running_mean", torch.zeros(n))  # [n]
        self.register_buffer("running_var", torch.ones(n))  # [n]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.rewards]

    def configure_model(self) -> None:
        for reward in self.rewards:
            reward.configure_model()

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
                update_stats: bool = False, chunk: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """images [B, 3, H, W] in [0, 1] -> (total [B] float32, {name: raw score [B]}).

        ``metadata``: None or one dict per image, passed to the rewards that take it.
        ``update_stats`` folds this batch into the running statistics ("running" mode only).
        ``chunk``: at most this many images per reward-model call (None: all); the normalisation
        is over the whole batch either way.
        """
        B = images.shape[0]
        step = B if chunk is None else max(1, chunk)
        components = {r.name: torch.cat([r(images[i:i + step], list(prompts[i:i + step]),
                                           None if metadata is None else list(metadata[i:i + step]))
                                         for i in range(0, B, step)]) if step < B
                      else r(images, prompts, metadata) for r in self.rewards}  # each [B]
        device = next(iter(components.values())).device
        scores = torch.stack([s.to(device) for s in components.values()], 1)  # [B, n]
        normalized = self._normalize(scores, update_stats)  # [B, n]
        weights = torch.tensor(self.weights, dtype=torch.float32, device=device)  # [n]
        total = normalized @ weights  # [B]
        return total, components

    def _normalize(self, scores: Tensor, update_stats: bool) -> Tensor:
        if self.normalize == "none":
            return scores
        finite = torch.isfinite(scores)  # [B, n]
        seen = finite.any(0)  # [n] components with at least one finite score
        if bool(finite.all()):
            batch_mean = scores.mean(0)  # [n]
            batch_var = scores.var(0, unbiased=False)  # [n]
        else:  # statistics over each component's finite scores only
            count = finite.sum(0).clamp(min=1)  # [n]
            x = torch.where(finite, scores, torch.zeros_like(scores))  # [B, n]
            batch_mean = x.sum(0) / count  # [n]
            batch_var = torch.where(finite, x - batch_mean, torch.zeros_like(x)).pow(2).sum(0) / count  # [n]
        if self.normalize == "batch":
            return (scores - batch_mean) / (batch_var.sqrt() + self.eps)
        # "running"
        if update_stats and bool(seen.any()):
            self._update(batch_mean, batch_var, seen)
        if int(self.num_updates) == 0:  # nothing tracked yet (e.g. previews of the first rollout)
            mean, var = batch_mean, batch_var
        else:
            mean, var = self.running_mean.to(scores.device), self.running_var.to(scores.device)
        return (scores - mean) / (var.sqrt() + self.eps)

    def _update(self, batch_mean: Tensor, batch_var: Tensor, seen: Tensor | None = None) -> None:
        """Fold a batch's statistics in; components not ``seen`` ([n] bool) keep theirs."""
        batch_mean = batch_mean.to(self.running_mean)
        batch_var = batch_var.to(self.running_var)
        if int(self.num_updates) == 0:  # start from the first batch, not from the (0, 1) placeholder
            new_mean, new_var = batch_mean, batch_var
        else:
            m = self.momentum
            new_mean = m * self.running_mean + (1 - m) * batch_mean
            new_var = m * self.running_var + (1 - m) * batch_var
        if seen is not None:
            seen = seen.to(self.running_mean.device)
            new_mean = torch.where(seen, new_mean, self.running_mean)  # [n]
            new_var = torch.where(seen, new_var, self.running_var)  # [n]
        self.running_mean.copy_(new_mean)
        self.running_var.copy_(new_var)
        self.num_updates.add_(1)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize!r}, momentum={self.momentum}"
