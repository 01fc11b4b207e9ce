"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", C. Schuhmann, 2022).

A linear MLP (``clip_common.RewardMLP``: 768-1024-128-64-16-1, dropouts, no activations) on the
L2-normalised CLIP ViT-L/14 image embedding, trained to regress AVA/LAION ratings, so scores sit
on a 1-10 scale (typically 4-7). Reference: ``simple_inference.py`` in
christophschuhmann/improved-aesthetic-predictor (``normalized(model2.encode_image(image))`` then
``model(...)``), also ImageReward's ``AestheticScore``. Preprocessing is OpenAI CLIP's (``clip.load``):
bicubic short side to 224, centre crop 224, CLIP mean/std. The prompt is ignored.

Head weights: the public ``sac+logos+ava1-l14-linearMSE.pth`` (a torch state dict with keys
``layers.{0,2,4,6,7}.{weight,bias}``), or the same keys in a ``.safetensors`` file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..loading import from_pretrained_checked, load_state_dict_file
from ..networks import clip_architecture
from .clip_common import PretrainedReward, RewardMLP, _features, clip_preprocess, freeze, l2_normalize, vision_image_size


def resolve_head_file(head_pretrained: str) -> str:
    """A local ``.pth``/``.safetensors`` path, or ``<hub repo id>:<file name>`` (downloaded/cached)."""
    path = os.path.expanduser(head_pretrained)
    if os.path.isfile(path):
        return path
    if ":" in head_pretrained and not os.path.exists(path):
        repo_id, filename = head_pretrained.split(":", 1)
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(repo_id, filename)
        except Exception as err:  # noqa: BLE001
            raise FileNotFoundError(f"head_pretrained={head_pretrained!r}: cannot get {filename!r} from the hub "
                                    f"repo {repo_id!r} ({type(err).__name__})") from None
    raise FileNotFoundError(
        f"head_pretrained={head_pretrained!r}: no such file. Give the path of the aesthetic head "
        f"(e.g. sac+logos+ava1-l14-linearMSE.pth) or '<hub repo id>:<file name>'.")


class LaionAesthetic(PretrainedReward):
    """Aesthetic score, ~1-10, of the image alone.

    Args:
        head_pretrained: the MLP head: a ``.pth``/``.safetensors`` file, or ``<hub repo id>:<file>``.
        pretrained: hub id or folder of the CLIP model (its vision tower and projection are used).
        dtype: dtype of the frozen CLIP; the small head always runs in float32, as in the original.
        weight, name: see ``Reward``.
    """

    default_name = "aesthetic"

    def __init__(self, head_pretrained: str, pretrained: str = "openai/clip-vit-large-patch14",
                 dtype: str = "float32", weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(pretrained, None, dtype=dtype, weight=weight, name=name)
        if ":" not in head_pretrained or os.path.exists(os.path.expanduser(head_pretrained)):
            resolve_head_file(head_pretrained)  # a local path must exist now; hub files resolve later
        self.head_pretrained = head_pretrained
        self.head: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if not self.networks.pretrained:  # the architecture: CLIP's vision tower and a head of its width
            super().configure_model()
            with self.networks.building(self.weight_dtype):
                head = RewardMLP(self.model.config.projection_dim)
            self.head = freeze(head.float()).to(self.device)
            return
        state = load_state_dict_file(resolve_head_file(self.head_pretrained))
        in_features = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768
        head = RewardMLP(in_features)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"head_pretrained={self.head_pretrained!r} is not an aesthetic-predictor head "
                             f"(expected keys layers.{{0,2,4,6,7}}.{{weight,bias}}): {err}") from None
        self.head = freeze(head).to(self.device)
        super().configure_model()
        projection_dim = self.model.config.projection_dim
        if projection_dim != in_features:
            raise ValueError(f"head_pretrained={self.head_pretrained!r} takes {in_features}-dim embeddings but "
                             f"pretrained={self.pretrained!r} projects to {projection_dim}")

    def architecture(self) -> nn.Module:
        """CLIP's vision tower with its projection, of ``pretrained``'s architecture."""
        from transformers import CLIPVisionModelWithProjection

        cfg = clip_architecture(str(self.pretrained), "LaionAesthetic.pretrained")
        return CLIPVisionModelWithProjection(cfg.vision_config)

    def _load(self) -> tuple[nn.Module, Any]:
        from transformers import CLIPVisionModelWithProjection

        model = from_pretrained_checked(CLIPVisionModelWithProjection, self.pretrained, self.weight_dtype,
                                        what="LaionAesthetic.pretrained")
        return model, None

    def encode_images(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> unit CLIP image embeddings [B, D] float32."""
        model = self._require_configured()
        pixels = clip_preprocess(images.to(self.device), vision_image_size(model))  # [B, 3, S, S]
        return l2_normalize(_features(model(pixel_values=pixels.to(self.weight_dtype))))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.head(self.encode_images(images)).squeeze(-1)  # [B]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_pretrained={self.head_pretrained!r}"
