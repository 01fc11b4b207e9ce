"""Rewards and a callback that the prompt-data and remote-reward tests load by import path (the
reward server runs them in its own process; the CLI builds them from YAML)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from pro_grpo_lightning.rewards.base import Reward


class Scripted(Reward):
    """Score = the metadata's ``value`` (NaN without one), so a test sees which metadata reached
    ``score``; metadata ``{"misbehave": "extra_score"}`` returns one score too many, ``"refuse"``
    raises a ValueError (the server answers 400). One served reward for every wire test."""

    default_name = "scripted"

    def score(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        B = images.shape[0]
        if metadata is None:
            return torch.full((B,), float("nan"))
        misbehave = {m.get("misbehave") for m in metadata}
        if "refuse" in misbehave:
            raise ValueError("this scorer refuses the batch")
        scores = torch.tensor([float(m.get("value", float("nan"))) for m in metadata])  # [B]
        return torch.cat([scores, scores[:1]]) if "extra_score" in misbehave else scores


class ExpectsMetadata(Reward):
    """Mean brightness, after asserting that every image comes with its prompt's metadata exactly
    as the ``.jsonl`` file ``expected`` has it (the line's fields but ``prompt``)."""

    default_name = "expects_metadata"
    calls = 0  # class-level: the test reads them after the CLI run (same process)
    seen: set[str] = set()

    def __init__(self, expected: str, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        with open(expected, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        self.expected = {d["prompt"]: {k: v for k, v in d.items() if k != "prompt"} for d in lines}

    def score(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        assert metadata is not None and len(metadata) == len(prompts), "no metadata reached the reward"
        for p, m in zip(prompts, metadata):
            assert m == self.expected[p], f"{p!r}: got {m}, expected {self.expected[p]}"
        type(self).calls += 1
        type(self).seen.update(prompts)
        return images.mean((1, 2, 3))  # [B]


class KillAtStep(pl.Callback):
    """SIGKILLs process ``pid`` (the reward server) once ``step`` optimizer steps are done."""

    def __init__(self, pid: int, step: int) -> None:
        self.pid, self.step = pid, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(self.pid, signal.SIGKILL)
