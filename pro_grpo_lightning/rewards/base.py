"""Reward interface: images in [0, 1] plus prompts (and each prompt's metadata) -> one score per image.

Rewards are frozen, run without grad and batched; heavy models load lazily in
``configure_model()`` (called by the LightningModule, after the device is known), never in
``__init__``, so parsing a config stays cheap. The same reward object scores the pruning
previews and the final images.

Metadata: a prompt set may give each prompt a dict (a GenEval item's objects and counts, the text
an OCR prompt asks for, ...); ``score`` receives them as ``metadata``, one dict per image (``{}``
for a prompt without any), or None when the prompt set has none. A ``score`` without a
``metadata`` parameter keeps working: it is simply not passed.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def takes_metadata(score: Any) -> bool:
    """Whether a ``score`` method accepts ``metadata`` (by name or through ``**kwargs``)."""
    params = inspect.signature(score).parameters.values()
    return any(p.name == "metadata" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class Reward(nn.Module, abc.ABC):
    """One reward. Subclasses implement ``score``; they may also implement ``validate_prompts``.

    Args:
        weight: its weight in the total reward (``RewardSet``).
        name: the name it is logged under (default: the class's ``default_name``).
    """

    default_name: str = "reward"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        self.weight = float(weight)
        self.name = name or self.default_name
        self._score_takes_metadata = takes_metadata(self.score)  # checked once, not per call

    def configure_model(self) -> None:
        """Load weights (idempotent). Rewards without weights need nothing."""

    def use_networks(self, source: Any) -> None:
        """Where ``configure_model`` builds the reward's network from (a ``networks.NetworkSource``;
        ``PretrainedReward``). A reward without a network has nothing to build: nothing changes."""

    @abc.abstractmethod
    def score(self, images: Tensor, prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> Tensor:
        """images [B, 3, H, W] float in [0, 1], len(prompts) == B, metadata None or B dicts
        -> scores [B] float32."""

    def validate_prompts(self, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None) -> None:
        """Raise ValueError (one line, naming the prompt) for a prompt this reward cannot score.

        Called on every prompt set when the run starts, before any weights load. Default: all fine.
        """

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str],
                metadata: Sequence[dict[str, Any]] | None = None) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        if metadata is not None and len(metadata) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(metadata)} metadata entries")
        was_training = self.training
        self.eval()
        try:
            if self._score_takes_metadata:
                return self.score(images, prompts, metadata=metadata).float()
            return self.score(images, prompts).float()
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"
