"""What the CLIP- and BLIP-based rewards share: batched preprocessing, model outputs, base classes.

Preprocessing. Every model here was trained on images prepared by the same torchvision/PIL chain
(OpenAI CLIP ``clip/clip.py::_transform``, open_clip ``transform.py::image_transform`` for eval,
ImageReward ``ImageReward.py::_transform``, transformers' ``CLIPImageProcessor``):
``Resize(size, BICUBIC)`` of the shortest side, ``CenterCrop(size)``, then ``Normalize(mean, std)``
with OpenAI's CLIP constants. ``clip_preprocess`` does the same on a whole [B, 3, H, W] float batch
in torch (no per-image PIL loop), so it runs on the reward's device. Differences from the PIL path,
by design: bicubic is torch's antialiased kernel on floats (PIL resamples 8-bit images), and we do
not quantise to 8 bits; both change scores by far less than a reward's spread.

Loading. ``PretrainedReward`` is the common base: ``__init__`` stores settings and checks that the
weights can be found (cheap, no import of transformers); ``configure_model()`` loads (idempotent),
freezes and moves the model to wherever the reward module has been moved (a zero-size buffer
tracks that device, so ``reward.to("cuda")`` before ``configure_model()`` works too). Where the
network comes from is the reward's ``NetworkSource`` (``use_networks``, ``networks.py``): the
pretrained weights, or the architecture the reward declares (``architecture()``) with random values
or empty, with an offline stand-in tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loading import check_pretrained_source, check_source, from_pretrained_checked, load_tokenizer, parse_dtype
from ..networks import PRETRAINED, NetworkSource, clip_architecture
from .base import Reward

#: OpenAI CLIP's pixel statistics (openai/CLIP ``clip/clip.py::_transform``; the same numbers are
#: open_clip's ``OPENAI_DATASET_MEAN/STD``, ImageReward's ``_transform`` and the preprocessor
#: configs of openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- preprocessing -----------------------------------------------------------------------------
def resize_shortest_side(images: Tensor, size: int) -> Tensor:
    """[B, C, H, W] -> [B, C, h, w] with min(h, w) == size, aspect kept, bicubic with antialias.

    The long side is ``int(size * long / short)`` (truncated), as torchvision's ``Resize(int)``
    computes it. Images already at that size are returned unchanged.
    """
    height, width = images.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_h, new_w) == (height, width):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Central size x size window, offsets rounded as torchvision's ``CenterCrop`` does."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"center_crop: image {height}x{width} is smaller than the crop {size}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def letterbox(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Resize the longest side to ``size`` (bicubic, antialias) and pad the short side with ``fill``.

    HPSv2's eval transform (``light_augmentation=True`` in ``hpsv2/img_score.py`` selects open_clip's
    ``ResizeMaxSize``): new size ``round(dim * size / max(H, W))``, padding split
    ``pad // 2`` before and the rest after, fill 0 before normalisation. Square images: a plain resize.
    """
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return images


def clip_preprocess(images: Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                    std: Sequence[float] = OPENAI_CLIP_STD, clamp: bool = True, mode: str = "crop") -> Tensor:
    """Images [B, 3, H, W] in [0, 1], any H and W -> normalised pixels [B, 3, size, size] float32.

    ``mode="crop"``: short side to ``size`` + centre crop (CLIP, PickScore, ImageReward, aesthetic).
    ``mode="letterbox"``: long side to ``size`` + zero padding (HPSv2); same result on square images.
    ``clamp`` clips the bicubic overshoot back to [0, 1], as resizing an 8-bit PIL image does
    (CLIP, ImageReward, transformers' processors); open_clip's eval transform (HPSv2) resizes the
    float tensor and does not clip.
    """
    x = images.float()                                                   # [B, 3, H, W]
    if mode == "crop":
        x = center_crop(resize_shortest_side(x, size), size)             # [B, 3, size, size]
    elif mode == "letterbox":
        x = letterbox(x, size)                                           # [B, 3, size, size]
    else:
        raise ValueError(f"clip_preprocess: mode must be 'crop' or 'letterbox', got {mode!r}")
    if clamp:
        x = x.clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


# ---- model outputs -----------------------------------------------------------------------------
def _features(out: Any) -> Tensor:
    """The projected embedding from whatever a CLIP feature call returned.

    transformers < 5: ``get_image_features`` / ``get_text_features`` return the tensor itself.
    transformers 5: they return a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the
    projected feature (what torchmetrics' CLIPScore trips over). ``CLIP*ModelWithProjection``
    return ``image_embeds`` / ``text_embeds``; ``return_dict=False`` gives a tuple whose second
    item is the pooled output.
    """
    if isinstance(out, Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], Tensor):
        return out[1]
    raise TypeError(f"cannot find projected features in a {type(out).__name__}")


def l2_normalize(x: Tensor) -> Tensor:
    """Unit vectors along the last dim (float32)."""
    return F.normalize(x.float(), dim=-1)


class RewardMLP(nn.Module):
    """The linear head of the LAION improved-aesthetic-predictor, reused by ImageReward.

    in -> 1024 -> 128 -> 64 -> 16 -> 1, with Dropout(0.2, 0.2, 0.1) between the first layers and
    no activations (christophschuhmann/improved-aesthetic-predictor ``simple_inference.py::MLP``,
    THUDM/ImageReward ``ImageReward.py::MLP``). Parameter names (``layers.0``, ``layers.2``,
    ``layers.4``, ``layers.6``, ``layers.7``) match both public checkpoints. Dropout is identity in
    eval mode, which is how rewards always run.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int, device: torch.device,
             padding: str | bool = True) -> tuple[Tensor, Tensor]:
    """input_ids, attention_mask [B, L] (long) on ``device``, truncated to ``max_length``."""
    enc = tokenizer(list(prompts), padding=padding, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def vision_image_size(model: nn.Module) -> int:
    """The square input size of a CLIP/BLIP vision tower (from a full or a vision-only config)."""
    config = getattr(model.config, "vision_config", model.config)
    size = config.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


# ---- base classes ------------------------------------------------------------------------------
class PretrainedReward(Reward):
    """A reward backed by a frozen pretrained network, loaded in ``configure_model()``.

    Args:
        pretrained: hub id or local folder (subclasses also accept weight files).
        processor_pretrained: where the tokenizer lives, if not in ``pretrained``.
        dtype: dtype of the frozen network ("float32", "bfloat16", "float16"); preprocessing and
            the returned scores are float32.
        weight, name: see ``Reward``.
    """

    def __init__(self, pretrained: str, processor_pretrained: str | None = None, dtype: str = "float32",
                 weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.pretrained = pretrained
        self.processor_pretrained = processor_pretrained
        self.dtype_name = dtype
        self.weight_dtype = parse_dtype(dtype)
        check_source(pretrained, what=f"{type(self).__name__}.pretrained")
        if processor_pretrained is not None:
            check_pretrained_source(processor_pretrained, what=f"{type(self).__name__}.processor_pretrained")
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        #: where the network comes from (``use_networks``): the pretrained weights unless chosen otherwise
        self.networks: NetworkSource = PRETRAINED
        # Zero-size buffer: follows .to(device) so a model loaded later lands on the same device.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def use_networks(self, source: NetworkSource) -> None:
        """Build the network from ``source`` in ``configure_model``: the pretrained weights, or
        ``architecture()`` with random values on ``source.device`` or empty (meta); the reward
        moves to that device. Before ``configure_model``."""
        if self.model is not None:
            raise RuntimeError(f"{self.name}.use_networks: the network is already built")
        self.networks = source
        if not source.pretrained:
            self.to(source.device)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.networks.pretrained:
            model, tokenizer = self._load()
        else:
            from ..offline_tokenizers import byte_level_clip_tokenizer

            with self.networks.building(self.weight_dtype):
                model = self.architecture()
            model = model if model.dtype == self.weight_dtype else model.to(self.weight_dtype)
            tokenizer = byte_level_clip_tokenizer()  # offline stand-in: ids mean nothing without weights
        self.tokenizer = tokenizer
        self.model = freeze(model).to(self.device)

    def architecture(self) -> nn.Module:
        """The reward's network without weights, on the current device (``NetworkSource.building``):
        what ``configure_model`` builds for a random or empty source. Raises ``UnknownArchitecture``
        when the reward cannot say."""
        raise NotImplementedError

    def _load(self) -> tuple[nn.Module, Any]:
        """Build the frozen network and its tokenizer (None where no text is read)."""
        raise NotImplementedError

    def _require_configured(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"{self.name}: call configure_model() before scoring")
        return self.model

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pretrained={self.pretrained!r}, dtype={self.dtype_name}"


class ClipRewardBase(PretrainedReward):
    """Rewards on a transformers ``CLIPModel``: cosine of projected image and text features."""

    #: clip the bicubic overshoot (PIL-style preprocessing); HPSv2's float pipeline does not.
    clamp_pixels: bool = True
    #: "crop" (short side + centre crop) or "letterbox" (HPSv2), see ``clip_preprocess``.
    resize_mode: str = "crop"

    def _load(self) -> tuple[nn.Module, Any]:
        from transformers import CLIPModel

        model = from_pretrained_checked(CLIPModel, self.pretrained, self.weight_dtype,
                                        what=f"{type(self).__name__}.pretrained")
        return model, self._load_clip_tokenizer(model)

    def architecture(self) -> nn.Module:
        """A ``CLIPModel`` of ``pretrained``'s architecture (a folder's config.json or ``architectures.REWARD_MODELS``)."""
        from transformers import CLIPModel

        return CLIPModel(clip_architecture(str(self.pretrained), f"{type(self).__name__}.pretrained"))

    def _load_clip_tokenizer(self, model: nn.Module) -> Any:
        source = self.processor_pretrained or self.pretrained
        return load_tokenizer(source, model.config.text_config.vocab_size,
                              what=f"{type(self).__name__}.processor_pretrained")

    def image_size(self) -> int:
        return vision_image_size(self._require_configured())

    def encode_images(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> unit image embeddings [B, D] float32."""
        model = self._require_configured()
        pixels = clip_preprocess(images.to(self.device), self.image_size(), clamp=self.clamp_pixels,
                                 mode=self.resize_mode)
        return l2_normalize(_features(model.get_image_features(pixel_values=pixels.to(self.weight_dtype))))

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> unit text embeddings [B, D] float32 (truncated to the model's context).

        A rollout scores G images per prompt: each distinct prompt is encoded once and the
        embeddings are index-selected back to one row per image.
        """
        model = self._require_configured()
        max_length = model.config.text_config.max_position_embeddings
        first: dict[str, int] = {}
        inverse = torch.tensor([first.setdefault(p, len(first)) for p in prompts], device=self.device)  # [B]
        input_ids, attention_mask = tokenize(self.tokenizer, list(first), max_length, self.device)
        feats = l2_normalize(_features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)))
        return feats.index_select(0, inverse)  # [B, D]

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(image_b, prompt_b) for each b: [B] float32."""
        return (self.encode_images(images) * self.encode_text(prompts)).sum(dim=-1)


def add_blip_special_tokens(tokenizer: Any) -> Any:
    """BLIP's ``init_tokenizer``: BERT's vocabulary + ``[DEC]`` (BOS) + ``[ENC]`` (30522 -> 30524)."""
    vocab = tokenizer.get_vocab()
    if "[DEC]" not in vocab:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer
