"""Callbacks users put in their YAML's ``trainer.callbacks``."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


class RewardTrend(pl.Callback):
    """Records the mean survivor reward of every rollout; at the end of fit prints (and writes to
    ``reward_trend.json`` in the log dir) the mean over the first and last ``fraction`` of rollouts,
    the quickest check that a run learned anything."""

    def __init__(self, fraction: float = 0.1, metric: str = "reward/mean") -> None:
        if not 0.0 < fraction <= 0.5:
            raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
        self.fraction, self.metric = fraction, metric
        self.history: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.history.append(float(value))

    def summary(self) -> dict[str, float]:
        n = max(1, round(len(self.history) * self.fraction))
        first, last = self.history[:n], self.history[-n:]
        return {"rollouts": len(self.history), "window": n, "first_mean": sum(first) / len(first),
                "last_mean": sum(last) / len(last)}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank reads it
        if not self.history or not trainer.is_global_zero:
            return
        s = self.summary()
        rank_zero_info(f"[RewardTrend] {self.metric}: first {s['window']} rollouts {s['first_mean']:.4f} -> "
                       f"last {s['window']} rollouts {s['last_mean']:.4f} ({s['rollouts']} rollouts)")
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "reward_trend.json"), "w") as f:
                json.dump({"metric": self.metric, **s, "history": self.history}, f, indent=1)
