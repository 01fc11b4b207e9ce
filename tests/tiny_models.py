"""Tiny random-init CLIP / BLIP / BERT models for the reward tests (built in code, no files).

Their text side matches the byte-level tokenizers the tiny diffusion models use
(``pro_grpo_lightning.offline_tokenizers``), so the real loading and scoring paths run offline.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from torch import nn

from pro_grpo_lightning.rewards.clip_common import add_blip_special_tokens


def tiny_clip_config(projection_dim: int = 16, image_size: int = 32, patch_size: int = 8,
                     hidden_act: str = "gelu") -> Any:
    """A CLIPConfig with hidden 32, 2 layers, 2 heads, whose text side matches
    ``byte_level_clip_tokenizer()`` (vocab 514, BOS 512, EOS = pad 513)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
                bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=projection_dim)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, hidden_act=hidden_act,
                  projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def tiny_clip_model(seed: int = 0, **config_kwargs: Any) -> nn.Module:
    """A random-init transformers CLIPModel of ``tiny_clip_config`` (eval mode)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**config_kwargs)).eval()


def tiny_bert_tokenizer(with_blip_tokens: bool = True) -> Any:
    """A BertTokenizer (lower case) over single characters and ``##`` continuations, no files.

    With ``with_blip_tokens`` it gets BLIP's two extra specials as ImageReward's
    ``init_tokenizer`` adds them: ``[DEC]`` as BOS, then ``[ENC]``.
    """
    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars + string.punctuation)
    tokens += ["##" + c for c in chars]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    if with_blip_tokens:
        add_blip_special_tokens(tokenizer)
    return tokenizer


def tiny_blip_config(vocab_size: int | None = None, image_size: int = 32, patch_size: int = 8) -> Any:
    """A BlipConfig for ``BlipForImageTextRetrieval``: ViT hidden 64 (one 64-wide head, as BLIP's
    ViTs use 64-wide heads), 2 layers; BERT text hidden 32, 2 layers, 2 heads, cross-attending to
    the ViT. ``vocab_size`` defaults to ``len(tiny_bert_tokenizer())``."""
    from transformers import BlipConfig

    if vocab_size is None:
        vocab_size = len(tiny_bert_tokenizer())
    text = dict(vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=64, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                bos_token_id=vocab_size - 2, sep_token_id=3, pad_token_id=0, eos_token_id=3)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                  image_size=image_size, patch_size=patch_size, layer_norm_eps=1e-6)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def unet_out(unet, seed=0):
    """A tiny SD1.5 UNet's output on fixed random inputs (two timesteps): compares weights by behaviour."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 500]), encoder_hidden_states=emb).sample
