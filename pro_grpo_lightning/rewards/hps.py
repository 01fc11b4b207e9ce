"""HPSv2.1 (Wu et al., "Human Preference Score v2", 2023): open_clip ViT-H-14 fine-tuned on HPDv2.

Score, as ``hpsv2/img_score.py`` computes it: ``image_features @ text_features.T`` of the
normalised open_clip features, i.e. the cosine (~0.2-0.4; the Pro-GRPO paper reports 0.391 for its
SD-v1.4 policy). No logit scale. Preprocessing is what ``img_score.py`` builds:
``create_model_and_transforms(..., light_augmentation=True)`` gives ``image_transform(224,
is_train=False, resize_longest_max=True)``: ``ToTensor``, then ``ResizeMaxSize(224)`` (bicubic on
the float tensor, longest side to 224, zero padding to a square, no clipping), then OpenAI mean/std.
On square images that is a plain bicubic resize. Text: open_clip's tokenizer (the OpenAI CLIP BPE,
77 tokens), which is the tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K.

Weights. The released checkpoint ``HPS_v2.1_compressed.pt`` (hub repo ``xswu/HPSv2``) is an open_clip
state dict under ``"state_dict"``. open_clip itself needs torchvision, which cannot be installed
beside our torch, so we load that state dict into a transformers ``CLIPModel`` with
``open_clip_to_transformers_clip`` (below). The two implementations compute the same function:
pre-LN transformer blocks, a class token + ``ln_pre`` + ``ln_post`` ViT, a causal text transformer
pooled at the EOT token (open_clip: ``argmax`` of the token ids; EOT has the largest id), exact
GELU for the LAION ViT-H-14 config (no ``quick_gelu``), LayerNorm eps 1e-5.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..loading import build_with_state_dict, from_pretrained_checked, load_state_dict_file, resolve_file
from .clip_common import ClipRewardBase

# ---- key mapping -------------------------------------------------------------------------------
# open_clip name (``CLIP`` with a ``VisionTransformer`` and its own text tower, e.g. ViT-H-14)
#   -> transformers ``CLIPModel`` name. Per residual block ``resblocks.{i}`` -> ``layers.{i}``:
_BLOCK_RENAMES = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
# Whole-tensor renames (no reshaping needed):
_TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",   # [77, W]
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",           # [W]
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",  # [1+N, W]
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",       # no bias in either
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",                    # (sic) transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# Projections: open_clip stores [width, embed] matrices used as ``x @ proj``; transformers stores
# ``nn.Linear`` weights [embed, width]: a transpose.
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Buffers and extras that carry no weights of the CLIP function.
_IGNORED = ("attn_mask",)
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_to_transformers_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip ``CLIP`` state dict to transformers ``CLIPModel`` keys.

    - ``transformer.resblocks.{i}`` -> ``text_model.encoder.layers.{i}``, ``visual.transformer...``
      -> ``vision_model.encoder.layers.{i}``; ``ln_1/ln_2`` -> ``layer_norm1/2``,
      ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``, ``attn.out_proj`` -> ``self_attn.out_proj``.
    - ``attn.in_proj_weight`` [3W, W] / ``in_proj_bias`` [3W] (``nn.MultiheadAttention``, rows in
      q, k, v order) are split into ``self_attn.{q,k,v}_proj.{weight,bias}``.
    - ``visual.proj`` [W, D] and ``text_projection`` [W, D] are transposed into the Linear weights
      ``visual_projection.weight`` / ``text_projection.weight`` [D, W]. (A ``text_projection.weight``
      already in Linear layout is kept as it is.)
    - ``visual.class_embedding``, both positional embeddings, ``visual.conv1.weight``,
      ``visual.ln_pre``/``ln_post``, ``ln_final``, ``token_embedding``, ``logit_scale``: renamed.
    - A ``module.`` prefix (DDP checkpoints) is stripped; ``attn_mask`` buffers are dropped.
    Any other key is an error: silently ignoring weights would change the model.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.split(".")[-1] in _IGNORED:
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        if key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.t().contiguous()
            continue
        if key == "text_projection.weight":
            out[key] = value
            continue
        match = _BLOCK.match(key)
        if match is None:
            unknown.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        rest = match.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
            continue
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                out[prefix + new + rest[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"open_clip_to_transformers_clip: keys with no mapping (not a plain open_clip "
                       f"ViT CLIP?): {unknown[:8]}")
    return out


def transformers_clip_to_open_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``open_clip_to_transformers_clip`` (tests; exporting a CLIPModel to open_clip)."""
    top_inverse = {v: k for k, v in _TOP_RENAMES.items()}
    proj_inverse = {v: k for k, v in _PROJECTIONS.items()}
    block = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key in top_inverse:
            out[top_inverse[key]] = value
        elif key in proj_inverse:
            out[proj_inverse[key]] = value.t().contiguous()
        elif (match := block.match(key)) is not None:
            tower = "visual." if match.group(1) == "vision_model" else ""
            prefix = f"{tower}transformer.resblocks.{match.group(2)}."
            rest = match.group(3)
            qkv_match = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if qkv_match:
                qkv.setdefault((prefix, qkv_match.group(2)), {})[qkv_match.group(1)] = value
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(new):
                    out[prefix + old + rest[len(new):]] = value
                    break
            else:
                raise KeyError(f"transformers_clip_to_open_clip: no mapping for {key!r}")
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"transformers_clip_to_open_clip: no mapping for {key!r}")
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def vit_h_14_clip_config() -> Any:
    """transformers CLIPConfig of open_clip's ViT-H-14 (open_clip ``model_configs/ViT-H-14.json``:
    embed 1024; vision width 1280, 32 layers, head width 80 -> 16 heads, patch 14, 224 px;
    text width 1024, 24 layers, 16 heads, context 77, vocab 49408; exact GELU)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0, projection_dim=1024)
    vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def load_open_clip_checkpoint(path: str) -> dict[str, Tensor]:
    """The state dict of an open_clip training checkpoint (``{"state_dict": ...}``) or a bare one."""
    state = load_state_dict_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


class HPSv21(ClipRewardBase):
    """HPSv2.1 score: cosine(image, prompt) of the HPS-fine-tuned CLIP-H/14 (~0.2-0.4).

    Args:
        pretrained: one of
            - the hub repo or a local folder holding ``checkpoint_file`` (default: ``xswu/HPSv2``,
              file ``HPS_v2.1_compressed.pt``),
            - the path of such an open_clip checkpoint file,
            - a transformers-format CLIP folder or hub id (``config.json`` + weights), e.g. one
              written by ``convert_hps_checkpoint``.
        processor_pretrained: tokenizer (and, for open_clip checkpoints, the architecture's
            ``config.json``; without one the built-in ViT-H-14 config is used).
        checkpoint_file: file name of the open_clip checkpoint inside ``pretrained``.
        dtype: dtype of the frozen model.
        weight, name: see ``Reward``.
    """

    default_name = "hpsv21"
    clamp_pixels = False      # open_clip resizes the float tensor: no clipping
    resize_mode = "letterbox"  # ResizeMaxSize: longest side to 224, zero padding

    def __init__(self, pretrained: str = "xswu/HPSv2",
                 processor_pretrained: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 checkpoint_file: str = "HPS_v2.1_compressed.pt", dtype: str = "float32",
                 weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(pretrained, processor_pretrained, dtype=dtype, weight=weight, name=name)
        self.checkpoint_file = checkpoint_file

    def _open_clip_file(self) -> str | None:
        path = os.path.expanduser(self.pretrained)
        if os.path.isfile(path):
            return path
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            return None  # a transformers folder
        return resolve_file(self.pretrained, self.checkpoint_file)

    def _load(self) -> tuple[nn.Module, Any]:
        checkpoint = self._open_clip_file()
        if checkpoint is None:
            from transformers import CLIPModel

            try:
                model = from_pretrained_checked(CLIPModel, self.pretrained, self.weight_dtype, what="HPSv21.pretrained")
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"HPSv21.pretrained={self.pretrained!r}: found neither the open_clip checkpoint "
                    f"{self.checkpoint_file!r} nor a transformers CLIP model there ({err})") from None
        else:
            model = self.model_from_open_clip(checkpoint)
        return model, self._load_clip_tokenizer(model)

    def _architecture(self) -> Any:
        """CLIPConfig for an open_clip checkpoint: from ``processor_pretrained`` if it has one."""
        from transformers import CLIPConfig

        source = self.processor_pretrained
        if source is not None and resolve_file(source, "config.json") is not None:
            return CLIPConfig.from_pretrained(source)
        return vit_h_14_clip_config()

    def model_from_open_clip(self, checkpoint: str) -> nn.Module:
        from transformers import CLIPModel

        state = open_clip_to_transformers_clip(load_open_clip_checkpoint(checkpoint))
        config = self._architecture()
        return build_with_state_dict(lambda: CLIPModel(config), state, self.weight_dtype,
                                     what=f"HPSv21: open_clip checkpoint {checkpoint!r} vs the CLIP architecture "
                                          f"(config of processor_pretrained={self.processor_pretrained!r}, or "
                                          f"built-in ViT-H-14)")

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.cosine(images, prompts)  # [B]


def convert_hps_checkpoint(checkpoint: str, out_dir: str, config_pretrained: str | None = None) -> None:
    """Write an open_clip HPS checkpoint as a transformers CLIP folder (``config.json`` +
    ``model.safetensors``), loadable with ``HPSv21(pretrained=out_dir)``. The tokenizer is not
    copied: keep ``processor_pretrained`` pointing at the LAION CLIP-H tokenizer."""
    reward = HPSv21(pretrained=checkpoint, processor_pretrained=config_pretrained)
    model = reward.model_from_open_clip(checkpoint)
    model.save_pretrained(out_dir)
