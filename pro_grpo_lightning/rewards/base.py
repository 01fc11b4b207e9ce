"""Reward interface: images in [0, 1] plus prompts -> one score per image.

Rewards are frozen, run without grad and batched; heavy models load lazily in
``configure_model()`` (called by the LightningModule, after the device is known), never in
``__init__``, so parsing a config stays cheap. The same reward object scores the pruning
previews and the final images.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Reward(nn.Module, abc.ABC):
    """One reward. Subclasses implement ``score``.

    Args:
        weight: its weight in the total reward (``RewardSet``).
        name: the name it is logged under (default: the class's ``default_name``).
    """

    default_name: str = "reward"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        self.weight = float(weight)
        self.name = name or self.default_name

    def configure_model(self) -> None:
        """Load weights (idempotent). Rewards without weights need nothing."""

    @abc.abstractmethod
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] float in [0, 1], len(prompts) == B -> scores [B] float32."""

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        was_training = self.training
        self.eval()
        try:
            return self.score(images, prompts).float()
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"
