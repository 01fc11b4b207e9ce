"""PickScore (Kirstain et al., "Pick-a-Pic", NeurIPS 2023): a CLIP-H/14 fine-tuned on human picks.

Score, as its authors compute it (yuvalkirstain/PickScore README, "inference" example):
``logit_scale.exp() * cos(text_embedding, image_embedding)``, with the model's learnt
``logit_scale`` (exp ~ 100), so scores sit around 18-24 for typical SD images (the Pro-GRPO paper
reports 24.0 for its SD3.5-M policy). The processor is LAION's CLIP-ViT-H-14 one: resize the short
side to 224 (bicubic), centre-crop 224, OpenAI CLIP mean/std; text padded/truncated to 77 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .clip_common import ClipRewardBase


class PickScore(ClipRewardBase):
    """PickScore_v1 on a transformers ``CLIPModel``.

    Args:
        pretrained: hub id or folder of the CLIP model (transformers format).
        processor_pretrained: hub id or folder holding the tokenizer (the PickScore repo has none).
        dtype: dtype of the frozen model.
        weight, name: see ``Reward``.
    """

    default_name = "pickscore"

    def __init__(self, pretrained: str = "yuvalkirstain/PickScore_v1",
                 processor_pretrained: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 dtype: str = "float32", weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(pretrained, processor_pretrained, dtype=dtype, weight=weight, name=name)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        model = self._require_configured()
        return model.logit_scale.exp().float() * self.cosine(images, prompts)  # [B]
