"""CLIP score (Hessel et al., "CLIPScore", EMNLP 2021) with torchmetrics' definition.

``max(100 * cos(E_image, E_text), 0)`` per image, on CLIP ViT-L/14 (torchmetrics'
``CLIPScore`` default model ``openai/clip-vit-large-patch14``; definition from its docstring,
``torchmetrics/functional/multimodal/clip_score.py``). torchmetrics clamps the batch mean; a reward
needs one score per image, so we clamp each. Computed here rather than through torchmetrics
because its feature extraction breaks on transformers 5 (``get_*_features`` return an output
object; the projected features are its ``pooler_output``, see ``clip_common._features``), and
because it truncates token ids after tokenising, which can cut off the EOS token whose hidden
state CLIP pools; the tokenizer's own truncation keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .clip_common import ClipRewardBase


class ClipScore(ClipRewardBase):
    """100 * cosine(image, prompt), clamped at 0 (range 0-100, ~20-35 for matching pairs).

    Args:
        pretrained: hub id or folder of a transformers ``CLIPModel``.
        processor_pretrained: where the tokenizer lives (default: ``pretrained``).
        dtype: dtype of the frozen model.
        weight, name: see ``Reward``.
    """

    default_name = "clip_score"

    def __init__(self, pretrained: str = "openai/clip-vit-large-patch14", processor_pretrained: str | None = None,
                 dtype: str = "float32", weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(pretrained, processor_pretrained, dtype=dtype, weight=weight, name=name)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return (100.0 * self.cosine(images, prompts)).clamp_min(0.0)  # [B]
