"""ImageReward (Xu et al., NeurIPS 2023): BLIP image-grounded text encoder + MLP head.

Scoring path, as ``ImageReward/ImageReward.py::ImageReward.score`` computes it:
1. image [1, 3, 224, 224] (bicubic short side 224, centre crop, OpenAI CLIP mean/std) -> BLIP
   ViT-L/16 -> ``image_embeds`` [B, 1+196, 1024] (all tokens, after the final LayerNorm);
2. prompt -> BERT tokenizer (``bert-base-uncased`` + ``[DEC]``, ``[ENC]``), padded/truncated to 35;
   the BERT text encoder cross-attends to ``image_embeds`` in every layer (bidirectional
   self-attention, padding masked);
3. hidden state of the first token ([CLS]) [B, 768] -> MLP 768-1024-128-64-16-1 (dropouts, no
   activations) -> ``(r - mean) / std`` with mean 0.16717362830052426, std 1.0333394966054072
   (the constants in ``ImageReward.__init__``), so scores are roughly standard normal (-2..2).

transformers has the same pieces: ``BlipVisionModel`` is BLIP's ViT and ``BlipTextModel`` is
BLIP's ``med.py`` BERT with cross-attention (its parameter names are med.py's). We load them from
a ``BlipForImageTextRetrieval`` folder (same two towers; its ITM head and projections are unused).

Folder layout (``ImageReward(pretrained=<folder>)``), written by ``convert_image_reward_checkpoint``::

    config.json          BlipConfig (vision: ViT-L/16 at 224 px; text: BERT-base, encoder_hidden_size 1024)
    model.safetensors    vision_model.*, text_encoder.* (vision_proj / text_proj / itm_head optional)
    mlp.safetensors      the head: layers.{0,2,4,6,7}.{weight,bias}
    tokenizer files      bert-base-uncased + [DEC] (BOS) + [ENC]: 30524 tokens

The original release is also accepted directly: a folder or hub repo (default ``THUDM/ImageReward``)
holding ``ImageReward.pt`` (a state dict of the ``ImageReward`` module) and optionally
``med_config.json``; it is converted in memory by ``image_reward_checkpoint_to_transformers``,
with the tokenizer taken from ``processor_pretrained`` (default ``bert-base-uncased``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..loading import (build_with_state_dict, check_pretrained_source, check_tokenizer_vocab, from_pretrained_checked,
                       load_state_dict_file, load_tokenizer, resolve_file, save_state_dict_file)
from ..networks import UnknownArchitecture
from .clip_common import (PretrainedReward, RewardMLP, add_blip_special_tokens, clip_preprocess, freeze, tokenize,
                          vision_image_size)

#: ``ImageReward.__init__``: reward statistics used to standardise the MLP output.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
#: ``ImageReward.score``: ``tokenizer(prompt, padding="max_length", truncation=True, max_length=35)``.
IMAGE_REWARD_MAX_LENGTH = 35

# ---- key mapping -------------------------------------------------------------------------------
# Original (BLIP's timm-style ViT in ``models/vit.py``, under ``blip.visual_encoder.``)
#   -> transformers ``BlipVisionModel`` (under ``vision_model.``):
_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",          # [1, 1, W] in both
    "pos_embed": "embeddings.position_embedding",       # [1, 1+N, W] in both
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",             # applied to all tokens in both
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = (                                          # blocks.{i}.X -> encoder.layers.{i}.Y
    ("norm1.", "layer_norm1."),
    ("attn.qkv.", "self_attn.qkv."),                   # fused [3W, W], same (3, heads, dim) layout
    ("attn.proj.", "self_attn.projection."),
    ("norm2.", "layer_norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
# ``blip.text_encoder.*`` (med.py BertModel, no pooler) -> ``text_encoder.*``: identical names,
# except the persistent ``embeddings.position_ids`` buffer of med.py (dropped).
# ``blip.vision_proj`` / ``blip.text_proj`` -> ``vision_proj`` / ``text_proj`` (unused by the score).
# ``mlp.layers.*`` -> the head's ``layers.*``.


def image_reward_checkpoint_to_transformers(
        state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an ``ImageReward.pt`` state dict into (BlipForImageTextRetrieval keys, head keys).

    Unknown keys are an error, so a changed checkpoint cannot load half its weights silently.
    """
    blip: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    unknown: list[str] = []
    block = re.compile(r"^blocks\.(\d+)\.(.+)$")
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("mlp."):
            head[key[len("mlp."):]] = value
        elif key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest in _VIT_TOP:
                blip["vision_model." + _VIT_TOP[rest]] = value
                continue
            match = block.match(rest)
            for old, new in _VIT_BLOCK if match else ():
                if match.group(2).startswith(old):
                    blip[f"vision_model.encoder.layers.{match.group(1)}.{new}{match.group(2)[len(old):]}"] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            rest = key[len("blip.text_encoder."):]
            if rest != "embeddings.position_ids":
                blip["text_encoder." + rest] = value
        elif key.startswith(("blip.vision_proj.", "blip.text_proj.")):
            blip[key[len("blip."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"image_reward_checkpoint_to_transformers: keys with no mapping: {unknown[:8]}")
    return blip, head


def transformers_to_image_reward_checkpoint(blip_state: dict[str, Tensor],
                                            head_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``image_reward_checkpoint_to_transformers`` (tests; exporting)."""
    top = {v: k for k, v in _VIT_TOP.items()}
    block = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    for key, value in blip_state.items():
        if key.startswith("vision_model."):
            rest = key[len("vision_model."):]
            if rest in top:
                out["blip.visual_encoder." + top[rest]] = value
                continue
            match = block.match(rest)
            for old, new in _VIT_BLOCK if match else ():
                if match.group(2).startswith(new):
                    out[f"blip.visual_encoder.blocks.{match.group(1)}.{old}{match.group(2)[len(new):]}"] = value
                    break
            else:
                raise KeyError(f"transformers_to_image_reward_checkpoint: no mapping for {key!r}")
        elif key.startswith(("text_encoder.", "vision_proj.", "text_proj.")):
            out["blip." + key] = value
        elif not key.startswith("itm_head."):
            raise KeyError(f"transformers_to_image_reward_checkpoint: no mapping for {key!r}")
    out.update({"mlp." + k: v for k, v in head_state.items()})
    return out


def blip_config_for_image_reward(blip_state: dict[str, Tensor], med_config: dict[str, Any] | None = None) -> Any:
    """BlipConfig for converted ImageReward weights.

    Sizes come from the tensors (so a BLIP-base variant works too). What tensors cannot tell:
    vision heads = width / 64 (BLIP's ``create_vit``: ViT-B 12 heads of 64, ViT-L 16 heads of 64),
    LayerNorm eps 1e-6 in the ViT (``models/vit.py``), exact GELU; text heads, eps and activation
    from ``med_config.json`` when given (BLIP's BERT-base: 12 heads, 1e-12, gelu).
    """
    from transformers import BlipConfig

    med = dict(med_config or {})
    width = blip_state["vision_model.embeddings.class_embedding"].shape[-1]
    patch = blip_state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = blip_state["vision_model.embeddings.position_embedding"].shape[1] - 1
    vision_layers = 1 + max(int(k.split(".")[3]) for k in blip_state if k.startswith("vision_model.encoder.layers."))
    text_layers = 1 + max(int(k.split(".")[3]) for k in blip_state if k.startswith("text_encoder.encoder.layer."))
    words, text_width = blip_state["text_encoder.embeddings.word_embeddings.weight"].shape
    vision = dict(hidden_size=width,
                  intermediate_size=blip_state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=vision_layers, num_attention_heads=max(1, width // 64),
                  image_size=int(round(positions ** 0.5)) * patch, patch_size=patch, hidden_act="gelu",
                  layer_norm_eps=1e-6)
    text = dict(vocab_size=words, hidden_size=text_width, encoder_hidden_size=width,
                intermediate_size=blip_state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                num_hidden_layers=text_layers, num_attention_heads=med.get("num_attention_heads", 12),
                max_position_embeddings=blip_state["text_encoder.embeddings.position_embeddings.weight"].shape[0],
                hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
                pad_token_id=med.get("pad_token_id", 0), bos_token_id=words - 2,  # [DEC], added first
                is_decoder=True)  # is_decoder=True builds the cross-attention layers; we call it as an encoder
    embed_dim = blip_state["vision_proj.weight"].shape[0] if "vision_proj.weight" in blip_state else 256
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=embed_dim)


def _read_json(path: str | None) -> dict[str, Any] | None:
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class BlipImageTextEncoder(nn.Module):
    """BLIP's image-grounded text encoder: [CLS] hidden state of the text cross-attending the image."""

    def __init__(self, vision_model: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.text_encoder = text_encoder

    @property
    def config(self) -> Any:
        return self.vision_model.config  # for vision_image_size

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state       # [B, 1+N, Wv]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return text.last_hidden_state[:, 0, :]                                              # [B, Wt]


class ImageReward(PretrainedReward):
    """ImageReward v1.0 score, standardised (roughly -2..2).

    Args:
        pretrained: a converted folder (layout in the module docstring), or a folder / hub repo
            holding the original ``checkpoint_file`` (default ``THUDM/ImageReward``).
        processor_pretrained: the BERT tokenizer. Default: the tokenizer saved in a converted
            folder, else ``bert-base-uncased`` (``[DEC]``/``[ENC]`` are added when missing).
        checkpoint_file: file name of the original checkpoint inside ``pretrained``.
        dtype: dtype of the frozen BLIP; the head runs in float32 as in the original.
        weight, name: see ``Reward``.
    """

    default_name = "image_reward"

    def __init__(self, pretrained: str = "THUDM/ImageReward", processor_pretrained: str | None = None,
                 checkpoint_file: str = "ImageReward.pt", dtype: str = "float32",
                 weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(pretrained, processor_pretrained, dtype=dtype, weight=weight, name=name)
        self.checkpoint_file = checkpoint_file
        self.head: nn.Module | None = None

    def architecture(self) -> nn.Module:
        """Not declared: BLIP's sizes are read from its checkpoint (``blip_config_for_image_reward``);
        ``architectures.py`` has no BLIP row."""
        raise UnknownArchitecture(f"{type(self).__name__}: no BLIP architecture table (architectures.py): "
                                  f"its weights and activations are not counted")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()  # calls _load, which also builds self.head
        self.head = freeze(self.head).to(self.device)

    def _load(self) -> tuple[nn.Module, Any]:
        path = os.path.expanduser(self.pretrained)
        if os.path.isfile(path):
            return self._load_original(path, os.path.join(os.path.dirname(path), "med_config.json"))
        converted = os.path.isdir(path) and os.path.isfile(os.path.join(path, "mlp.safetensors"))
        original = None if converted else resolve_file(self.pretrained, self.checkpoint_file)
        if original is None:
            return self._load_converted()
        return self._load_original(original, resolve_file(self.pretrained, "med_config.json"))

    def _load_converted(self) -> tuple[nn.Module, Any]:
        from transformers import BlipForImageTextRetrieval

        head_file = resolve_file(self.pretrained, "mlp.safetensors")
        if head_file is None:
            raise FileNotFoundError(
                f"ImageReward.pretrained={self.pretrained!r} holds neither {self.checkpoint_file!r} nor a converted "
                f"model (config.json + model.safetensors + mlp.safetensors); see convert_image_reward_checkpoint")
        full = from_pretrained_checked(BlipForImageTextRetrieval, self.pretrained, self.weight_dtype,
                                       what="ImageReward.pretrained",
                                       allowed_missing=("itm_head.", "vision_proj.", "text_proj."))
        self.head = self._build_head(load_state_dict_file(head_file))
        encoder = BlipImageTextEncoder(full.vision_model, full.text_encoder)
        vocab = full.config.text_config.vocab_size
        tokenizer = load_tokenizer(self.processor_pretrained or self.pretrained, vocab,
                                   what="ImageReward.processor_pretrained")
        return encoder, add_blip_special_tokens(tokenizer) if len(tokenizer) < vocab else tokenizer

    def _load_original(self, checkpoint: str, med_config: str | None) -> tuple[nn.Module, Any]:
        from transformers import BlipTextModel, BlipVisionModel

        blip_state, head_state = image_reward_checkpoint_to_transformers(load_state_dict_file(checkpoint))
        config = blip_config_for_image_reward(blip_state, _read_json(med_config))
        state = {k: v for k, v in blip_state.items() if k.startswith(("vision_model.", "text_encoder."))}
        encoder = build_with_state_dict(
            lambda: BlipImageTextEncoder(BlipVisionModel(config.vision_config),
                                         BlipTextModel(config.text_config, add_pooling_layer=False)),
            state, self.weight_dtype, what=f"ImageReward: {checkpoint!r} vs the BLIP config inferred from it")
        self.head = self._build_head(head_state)
        source = self.processor_pretrained or "bert-base-uncased"
        return encoder, self.original_tokenizer(source, config.text_config.vocab_size)

    @staticmethod
    def original_tokenizer(source: str, vocab_size: int) -> Any:
        """bert-base-uncased + BLIP's specials, checked against the text encoder's vocabulary."""
        check_pretrained_source(source, what="ImageReward.processor_pretrained")
        from transformers import AutoTokenizer

        try:
            tokenizer = add_blip_special_tokens(AutoTokenizer.from_pretrained(source))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"ImageReward.processor_pretrained={source!r}: no usable tokenizer ({err})") from err
        check_tokenizer_vocab(tokenizer, vocab_size, source, what="ImageReward.processor_pretrained")
        return tokenizer

    def _build_head(self, state: dict[str, Tensor]) -> nn.Module:
        head = RewardMLP(state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"ImageReward.pretrained={self.pretrained!r}: bad MLP head weights: {err}") from None
        return head

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        encoder = self._require_configured()
        pixels = clip_preprocess(images.to(self.device), vision_image_size(encoder))        # [B, 3, S, S]
        input_ids, attention_mask = tokenize(self.tokenizer, prompts, IMAGE_REWARD_MAX_LENGTH, self.device,
                                             padding="max_length")
        cls = encoder(pixels.to(self.weight_dtype), input_ids, attention_mask).float()      # [B, Wt]
        reward = self.head(cls).squeeze(-1)                                                  # [B]
        return (reward - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def convert_image_reward_checkpoint(checkpoint: str, out_dir: str, tokenizer_pretrained: str = "bert-base-uncased",
                                    med_config: str | None = None) -> None:
    """Write the original ``ImageReward.pt`` (+ ``med_config.json``) as the folder layout above."""
    from transformers import BlipForImageTextRetrieval

    blip_state, head_state = image_reward_checkpoint_to_transformers(load_state_dict_file(checkpoint))
    config = blip_config_for_image_reward(blip_state, _read_json(med_config))
    model = BlipForImageTextRetrieval(config)
    missing, unexpected = model.load_state_dict(blip_state, strict=False)
    missing = [k for k in missing if not k.startswith(("itm_head.", "vision_proj.", "text_proj."))]
    if missing or unexpected:
        raise ValueError(f"convert_image_reward_checkpoint: missing {missing[:8]}, unexpected {unexpected[:8]}")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    save_state_dict_file(head_state, os.path.join(out_dir, "mlp.safetensors"))
    ImageReward.original_tokenizer(tokenizer_pretrained, config.text_config.vocab_size).save_pretrained(out_dir)
