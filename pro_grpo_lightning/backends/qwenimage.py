"""Qwen-Image (an MMDiT on packed 2x2 latent patches, rectified flow) with the flow SDE steps.

Everything below is what diffusers' ``QwenImagePipeline`` (0.42.1) does, so that with the SDE off
our rollout is the pipeline's output (``tests/test_families.py``):
    text       the prompt inside Qwen's chat template (``PROMPT_TEMPLATE``), tokenized with padding to
               the batch's longest, through ``Qwen2_5_VLForConditionalGeneration``; the last hidden
               state without the template's first ``TEMPLATE_DROP`` (34) tokens, padded rows zeroed;
               ``prompt_embeds`` [B, L, 3584] and ``prompt_embeds_mask`` [B, L] (1 = a real token),
               cut to ``max_sequence_length``. L varies with the prompt batch.
    CFG        "true CFG": a second transformer pass on the negative prompt, combined as
               ``neg + s (pos - neg)`` and rescaled per token to the norm of the conditional output
               (``combine_guidance``); the pipeline calls it ``true_cfg_scale`` (our
               ``guidance_scale``) and runs it only with a negative prompt (ours: always, " " by
               default, the model card's). We run both branches in one call, the shorter text padded
               and masked (``VariableTextMixin``): the masked attention ignores the padding.
    timesteps  ``sigmas = linspace(1, 1/T, T)`` with the resolution-dependent ``mu`` of the scheduler
               config (``flow_base.shifted_sigma_table``); the transformer takes ``sigma``.
    latents    [B, 16, h, w] public (unpacked, one frame); packed to [B, hw/4, 64] for the transformer
               as the pipeline's ``_pack_latents`` (FLUX's layout); decoded by
               ``AutoencoderKLQwenImage`` (a video VAE: one frame) after ``z * std + mean`` with the
               VAE config's per-channel ``latents_std`` / ``latents_mean``.

``TinyQwenImageBackend`` is the same architecture at toy size, built in code
(``build_tiny_qwenimage_components``). Its byte-level tokenizer splits the template into more than
34 tokens, so its kept text still starts inside the template: the pipeline does the same on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Conditioning, LoraSettings
from .flow_base import FlowMatchingBackend, VariableTextMixin, shifted_sigma_table
from .flux import pack_latents, unpack_latents

TINY_QWENIMAGE_SOURCE = "<tiny-qwenimage>"

#: ``QwenImagePipeline.prompt_template_encode`` and ``prompt_template_encode_start_idx``.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_DROP = 34
#: ``QwenImagePipeline.tokenizer_max_length``: the longest text the pipeline encodes.
TOKENIZER_MAX_LENGTH = 1024

#: Joint-attention projections of both streams and both streams' MLPs: the target list of
#: Flow-GRPO's Qwen-Image LoRA training (r 64 / alpha 128 there).
QWENIMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                          "txt_mlp.net.2")


class QwenImageBackend(VariableTextMixin, FlowMatchingBackend):
    """Qwen-Image from a diffusers folder or hub id ("Qwen/Qwen-Image"); see the module docstring.
    Its arguments are ``SD3Backend``'s (without ``drop_t5``: it has no T5), except:

    Args:
        guidance_scale: the pipeline's ``true_cfg_scale`` (default 4.0, the model card's); <= 1: no CFG.
        negative_prompt: CFG's negative prompt (default " ", the model card's).
        max_sequence_length: text tokens kept per prompt after the template (pipeline: 512, at most 1024).
        preview_decoder: not supported (no ``AutoencoderTiny`` reads this video VAE's latents).
    """

    pipeline_class = "QwenImagePipeline"
    default_lora_targets = QWENIMAGE_LORA_TARGETS

    def __init__(self, pretrained: str, num_steps: int = 10, guidance_scale: float = 4.0,
                 resolution: int = 512, lora: LoraSettings | None = None, dtype: str = "float32",
                 negative_prompt: str = " ", noise_level: float = 0.7, sde_kind: str = "flow_grpo",
                 max_sequence_length: int = 512, gradient_checkpointing: bool = False,
                 offload_text_encoders: bool = False, decode_chunk: int | None = None,
                 revision: str | None = None, sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        if max_sequence_length > TOKENIZER_MAX_LENGTH:
            raise ValueError(f"max_sequence_length must be <= {TOKENIZER_MAX_LENGTH} (QwenImagePipeline's limit), "
                             f"got {max_sequence_length}")
        if preview_decoder is not None:
            raise ValueError(f"preview_decoder={preview_decoder!r}: no preview decoder reads Qwen-Image's VAE "
                             f"latents; leave it unset (the VAE decodes the previews)")
        super().__init__(
            pretrained=pretrained, revision=revision, num_steps=num_steps, guidance_scale=guidance_scale,
            resolution=resolution, lora=lora, dtype=dtype, negative_prompt=negative_prompt,
            noise_level=noise_level, sde_kind=sde_kind, max_sequence_length=max_sequence_length,
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
            decode_chunk=decode_chunk, sde_window=sde_window, finetune=finetune, compile=compile,
            compile_backend=compile_backend)

    # ---- the one place the networks come from -------------------------------------------------
    def load_components(self) -> dict[str, object]:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        comps = self.load_flow_components(QwenImageTransformer2DModel, AutoencoderKLQwenImage,
                                          {"text_encoder": Qwen2_5_VLForConditionalGeneration})
        vocab = comps["text_encoder"].config.get_text_config().vocab_size
        comps["tokenizer"] = self._load_tokenizer(Qwen2Tokenizer, "tokenizer", vocab)
        return comps

    def lora_targets(self, net: torch.nn.Module) -> list[str]:
        """The targets without the last block's text-stream outputs (``attn.to_add_out``, ``txt_mlp``):
        the image output never reads them, so their adapter would get no gradient (and DDP would
        stop on parameters that took no part in the loss)."""
        last = f"transformer_blocks.{len(net.transformer_blocks) - 1}."
        dead = (last + "attn.to_add_out", last + "txt_mlp.")
        names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
        expanded = [n for t in super().lora_targets(net) for n in names if n == t or n.endswith("." + t)]
        return [n for n in dict.fromkeys(expanded) if not n.startswith(dead)]

    def _setup(self, components: dict[str, Any]) -> None:
        if self.transformer.config.guidance_embeds:
            raise ValueError(f"{self.pretrained!r}: a guidance-distilled Qwen-Image transformer "
                             f"(guidance_embeds) is not supported; Qwen-Image uses true CFG")
        super()._setup(components)

    def _sigma_table(self, scheduler) -> Tensor:
        side = self.resolution // self.vae_scale_factor
        return shifted_sigma_table(scheduler, self.num_steps, (side // 2) ** 2)  # packed image tokens

    # ---- latents / images -----------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    def latent_shape(self) -> tuple[int, ...]:
        self._require_configured()
        side = self.resolution // self.vae_scale_factor
        return (int(self.vae.config.z_dim), side, side)

    def _decode_latents(self, latents: Tensor) -> Tensor:
        cfg, vae = self.vae.config, self.vae
        mean = torch.tensor(cfg.latents_mean, device=vae.device).view(1, -1, 1, 1)  # [1, C, 1, 1]
        std = torch.tensor(cfg.latents_std, device=vae.device).view(1, -1, 1, 1)  # [1, C, 1, 1]
        z = latents.float().to(vae.device) * std + mean  # [b, C, h, w]
        image = vae.decode(z.unsqueeze(2).to(vae.dtype), return_dict=False)[0][:, :, 0]  # [b, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)  # [b, 3, H, W]

    # ---- text ---------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        tok = self._tokenizers["tokenizer"]
        if tok.padding_side != "right":
            raise ValueError(f"the tokenizer of {self.pretrained!r} pads on the {tok.padding_side}: "
                             f"Qwen-Image's prompt encoding needs right padding")
        text = tok([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_DROP,
                   padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = self.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]  # [B, L0, D]
        mask = text.attention_mask[:, TEMPLATE_DROP:]  # [B, L]  right padding: the real tokens come first
        embeds = hidden[:, TEMPLATE_DROP:] * mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, D], padding zeroed
        keep = self.max_sequence_length
        return {"prompt_embeds": embeds[:, :keep].to(self.weight_dtype),  # [B, L, D]
                "prompt_embeds_mask": mask[:, :keep].long()}  # [B, L]

    def combine_guidance(self, uncond: Tensor, text: Tensor) -> Tensor:
        """True CFG with the pipeline's norm rescale, on packed tokens [B, L_img, 64]: each token's
        guided output keeps the norm of its conditional output."""
        combined = super().combine_guidance(uncond, text)  # [B, L_img, 64]
        return combined * (text.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    # ---- denoiser ----------------------------------------------------------------------------
    def _velocity(self, latents: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        device, dt = self.device, self.weight_dtype
        _, _, h, w = latents.shape

        def run(x: Tensor, s: Tensor, c: Conditioning) -> Tensor:  # rows: [negative; positive] with CFG
            return self.transformer(
                hidden_states=pack_latents(x.to(device, dt)),  # [b, hw/4, 64]
                timestep=s.to(device),  # [b] sigma (the pipeline: timestep / 1000)
                encoder_hidden_states=c["prompt_embeds"].to(device, dt),  # [b, L, D]
                encoder_hidden_states_mask=c["prompt_embeds_mask"].to(device),  # [b, L]
                img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
                return_dict=False)[0].float()  # [b, hw/4, 64]

        return unpack_latents(self._guided(run, latents, sigma, cond), h, w)  # [B, 16, h, w]


# ---- tiny offline model --------------------------------------------------------------------------
def build_tiny_qwenimage_components(resolution: int = 64, seed: int = 0) -> dict[str, object]:
    """Random-init Qwen-Image-architecture components, built in code, seeded.

    Transformer: 2 dual-stream blocks, 2 heads of 16 (rope axes 4 + 6 + 6), text width 32 = the text
    encoder's hidden size; VAE: ``AutoencoderKLQwenImage`` with 8x down-sampling and 16 latent
    channels (the real model's latent statistics); text encoder: ``Qwen2_5_VLForConditionalGeneration``
    (2 layers, hidden 32, multimodal rope sections 2 + 3 + 3, a one-block vision tower that text
    prompts never run); a byte-level Qwen2 tokenizer; Qwen-Image's dynamic-shift scheduler config.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..architectures import QWENIMAGE_SCHEDULER
    from ..offline_tokenizers import byte_level_qwen_tokenizer

    tok = byte_level_qwen_tokenizer()
    n = len(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
        torch.manual_seed(seed + 2)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=n + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                             bos_token_id=tok.pad_token_id, eos_token_id=tok.pad_token_id),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               fullatt_block_indexes=[0]),
            image_token_id=n, video_token_id=n + 1, vision_start_token_id=n + 2))
    for net in (transformer, vae, text_encoder):
        net.eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tok,
            "scheduler": FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER)}


def save_tiny_qwenimage_pipeline(path: str, resolution: int = 64, seed: int = 0) -> str:
    """Write the tiny components as a diffusers folder (``QwenImagePipeline.save_pretrained``)."""
    from diffusers import QwenImagePipeline

    QwenImagePipeline(**build_tiny_qwenimage_components(resolution, seed)).save_pretrained(path)
    return path


class TinyQwenImageBackend(QwenImageBackend):
    """Qwen-Image architecture at toy size, random weights built in code (no files); seeded.

    Args:
        seed: seed of the random weights built in code (the same seed builds the same model).
    """

    built_in_code = True

    def __init__(self, seed: int = 0, num_steps: int = 4, guidance_scale: float = 4.0, resolution: int = 64,
                 lora: LoraSettings | None = None, dtype: str = "float32", negative_prompt: str = " ",
                 noise_level: float = 0.7, sde_kind: str = "flow_grpo", max_sequence_length: int = 512,
                 gradient_checkpointing: bool = False, offload_text_encoders: bool = False,
                 decode_chunk: int | None = None, sde_window: list[int] | None = None,
                 finetune: str = "lora", compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(
            TINY_QWENIMAGE_SOURCE, num_steps=num_steps, guidance_scale=guidance_scale, resolution=resolution,
            lora=lora, dtype=dtype, negative_prompt=negative_prompt, noise_level=noise_level, sde_kind=sde_kind,
            max_sequence_length=max_sequence_length, gradient_checkpointing=gradient_checkpointing,
            offload_text_encoders=offload_text_encoders, decode_chunk=decode_chunk,
            sde_window=sde_window, finetune=finetune, compile=compile, compile_backend=compile_backend)
        self.seed = seed


    def load_components(self) -> dict[str, object]:
        return build_tiny_qwenimage_components(self.resolution, self.seed)
