"""FLUX.1 (dev / schnell; double- and single-stream MMDiT, rectified flow) with the Flow-GRPO SDE.

Components (diffusers' ``FluxPipeline`` layout): ``transformer`` (FluxTransformer2DModel),
``vae`` (AutoencoderKL, 16 channels, shift and scaling factors), ``text_encoder`` (CLIPTextModel,
pooled output only), ``text_encoder_2`` (T5EncoderModel), ``tokenizer`` / ``tokenizer_2`` and a
FlowMatchEulerDiscreteScheduler (read for its sigma table only).

Latent layout. The public latents (what the rollout stores, steps and decodes) are UNPACKED,
[B, 16, H/8, W/8], like SD's: the same noise values diffusers draws before packing, and the
same per-element step math (the step is elementwise, so packing commutes with it and the
log-prob mean over dims is unchanged). FLUX's 2x2 patch packing into tokens [B, (H/16)(W/16), 64]
and its position ids happen inside ``_velocity`` only.

Guidance. FLUX.1-dev is guidance-distilled: ``guidance_scale`` is fed to the guidance embedding
and there is no CFG (one transformer call per sample). FLUX.1-schnell has no guidance embedding
(``transformer.config.guidance_embeds`` is False) and ignores ``guidance_scale``. Detected from
the loaded config.

Sigma table: ``linspace(1, 1/T, T)`` shifted by the resolution-dependent ``mu`` (linear in the
number of image tokens, with the scheduler's base/max shift and sequence lengths), as
``FluxPipeline`` computes it, then a terminal 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Conditioning, LoraSettings
from .flow_base import FlowMatchingBackend, shifted_sigma_table

#: The ``pretrained`` value of the code-built tiny model (nothing to load).
TINY_FLUX_SOURCE = "<tiny-flux>"

#: Double-stream blocks: image and text attention projections (``attn.to_*``, ``attn.add_*``,
#: ``attn.to_add_out``). Single-stream blocks: their attention's to_q/k/v (same names), the MLP
#: input ``proj_mlp`` and the fused output ``proj_out`` (a glob, so the final ``proj_out`` of the
#: whole model is not adapted). Checked against diffusers 0.42.1 module names.
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                     "to_add_out", "proj_mlp", "single_transformer_blocks.*.proj_out")


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: each 2x2 patch becomes one token (channel-major)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, C, h/2, 2, w/2, 2]
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)  # [B, L, 4C]


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of ``pack_latents``: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, c4 = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2)  # [B, h/2, w/2, C, 2, 2]
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)  # [B, C, h, w]


def image_position_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[(h/2)(w/2), 3] rope ids of the packed image tokens: (0, row, column)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)  # [L]
    cols = torch.arange(w // 2, device=device).repeat(h // 2)  # [L]
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)  # [L, 3]


class FluxBackend(FlowMatchingBackend):
    """FLUX.1-dev / schnell from a diffusers folder or hub id; see the module docstring.

    Args:
        pretrained: local diffusers folder or hub id (e.g. "black-forest-labs/FLUX.1-dev").
        num_steps, resolution, lora, dtype: see ``DiffusionBackend`` (DanceGRPO's FLUX: 16 steps).
        guidance_scale: the dev model's guidance embedding (3.5 is FLUX-dev's default); no CFG.
        noise_level, sde_kind, max_sequence_length, gradient_checkpointing, offload_text_encoders,
            decode_chunk: see ``FlowMatchingBackend`` (T5 tokens: dev 512, schnell 256 max).
        revision: hub revision of ``pretrained``.
        preview_decoder: an ``AutoencoderTiny`` for the pruning previews (``madebyollin/taef1``);
            see ``PipelineBackend``.
    """

    pipeline_class = "FluxPipeline"
    default_lora_targets = FLUX_LORA_TARGETS

    def __init__(self, pretrained: str, num_steps: int = 16, guidance_scale: float = 3.5,
                 resolution: int = 512, lora: LoraSettings | None = None, dtype: str = "float32",
                 noise_level: float = 0.7, sde_kind: str = "flow_grpo", max_sequence_length: int = 512,
                 gradient_checkpointing: bool = False, offload_text_encoders: bool = False,
                 decode_chunk: int | None = None, revision: str | None = None,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(
            pretrained=pretrained, revision=revision, num_steps=num_steps, guidance_scale=guidance_scale,
            resolution=resolution, lora=lora, dtype=dtype, negative_prompt="", noise_level=noise_level,
            sde_kind=sde_kind, max_sequence_length=max_sequence_length,
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
            decode_chunk=decode_chunk, sde_window=sde_window, finetune=finetune,
            preview_decoder=preview_decoder, compile=compile,
            compile_backend=compile_backend)

    def uses_cfg(self) -> bool:
        return False  # dev: guidance embedding; schnell: no guidance

    @property
    def has_guidance_embedding(self) -> bool:
        self._require_configured()
        return bool(self.transformer.config.guidance_embeds)

    # ---- components ------------------------------------------------------------------------
    def text_encoder_names(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2")

    def load_components(self) -> dict[str, object]:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        comps = self.load_flow_components(FluxTransformer2DModel, AutoencoderKL,
                                          {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel})
        comps["tokenizer"] = self._load_tokenizer(CLIPTokenizer, "tokenizer",
                                                  comps["text_encoder"].config.vocab_size)
        comps["tokenizer_2"] = self._load_tokenizer(T5TokenizerFast, "tokenizer_2",
                                                    comps["text_encoder_2"].config.vocab_size)
        return comps

    def _sigma_table(self, scheduler) -> Tensor:
        side = self.resolution // self.vae_scale_factor
        return shifted_sigma_table(scheduler, self.num_steps, (side // 2) ** 2)  # packed image tokens

    # ---- text --------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        clip_tok, t5_tok = self._tokenizers["tokenizer"], self._tokenizers["tokenizer_2"]
        ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)  # [B, 77]
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output  # [B, H_clip]
        ids = t5_tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)  # [B, L]
        embeds = self.text_encoder_2(ids, output_hidden_states=False)[0]  # [B, L, D]
        dt = self.weight_dtype
        return {"prompt_embeds": embeds.to(dt), "pooled_prompt_embeds": pooled.to(dt)}

    # ---- denoiser ----------------------------------------------------------------------------
    def _velocity(self, latents: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        device, dt = self.device, self.weight_dtype
        batch, _, h, w = latents.shape
        tokens = pack_latents(latents.to(dt))  # [B, L_img, 4C]
        embeds = cond["prompt_embeds"].to(device, dt)  # [B, L_txt, D]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(self.guidance_scale), device=device)  # [B]
        out = self.transformer(
            hidden_states=tokens,
            timestep=sigma,  # [B]; FLUX takes sigma in [0, 1] and scales by 1000 itself
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(device, dt),  # [B, H_clip]
            encoder_hidden_states=embeds,
            txt_ids=embeds.new_zeros(embeds.shape[1], 3),  # [L_txt, 3]  text tokens sit at position 0
            img_ids=image_position_ids(h, w, device, dt),  # [L_img, 3]
            return_dict=False)[0]  # [B, L_img, 4C]
        return unpack_latents(out.float(), h, w)  # [B, C, h, w]


# ---- tiny offline model --------------------------------------------------------------------------
def build_tiny_flux_components(resolution: int = 64, seed: int = 0,
                               guidance_embeds: bool = True) -> dict[str, object]:
    """Random-init FLUX-architecture components (~0.08 M-param transformer), built in code, seeded.

    Size rules the architecture imposes: in_channels = 4 x 16 VAE channels = 64, rope axes (4, 6, 6)
    sum to the head dim 16, pooled_projection_dim = CLIP hidden size (32), joint_attention_dim = T5 d_model
    (64). One double- and one single-stream block. ``guidance_embeds``: dev-like (True) or
    schnell-like (False). The scheduler has FLUX's dynamic-shift config.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..offline_tokenizers import byte_level_clip_tokenizer, char_level_t5_tokenizer

    clip_tok = byte_level_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), sample_size=resolution, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, projection_dim=32,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id, hidden_act="gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                     eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler,
            "text_encoder": clip, "tokenizer": clip_tok,
            "text_encoder_2": t5, "tokenizer_2": char_level_t5_tokenizer()}


def save_tiny_flux_pipeline(path: str, resolution: int = 64, seed: int = 0,
                            guidance_embeds: bool = True) -> str:
    """Write the tiny components as a diffusers folder (``FluxPipeline.save_pretrained``)."""
    from diffusers import FluxPipeline

    FluxPipeline(**build_tiny_flux_components(resolution, seed, guidance_embeds)).save_pretrained(path)
    return path


class TinyFluxBackend(FluxBackend):
    """FLUX architecture at toy size, random weights built in code (no files, no hub); seeded.

    Defaults: 64 px, 4 steps, T5 truncated to 32 tokens.

    Args:
        seed: seed of the random weights built in code (the same seed builds the same model).
        guidance_embeds: True: a guidance embedding, like dev (``guidance_scale`` is its input);
            False: none, like schnell (``guidance_scale`` is ignored).
    """

    built_in_code = True

    def __init__(self, seed: int = 0, guidance_embeds: bool = True, num_steps: int = 4,
                 guidance_scale: float = 3.5, resolution: int = 64, lora: LoraSettings | None = None,
                 dtype: str = "float32", noise_level: float = 0.7, sde_kind: str = "flow_grpo",
                 max_sequence_length: int = 32, gradient_checkpointing: bool = False,
                 offload_text_encoders: bool = False, decode_chunk: int | None = None,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(
            TINY_FLUX_SOURCE, num_steps=num_steps, guidance_scale=guidance_scale, resolution=resolution,
            lora=lora, dtype=dtype, noise_level=noise_level, sde_kind=sde_kind,
            max_sequence_length=max_sequence_length, gradient_checkpointing=gradient_checkpointing,
            offload_text_encoders=offload_text_encoders, decode_chunk=decode_chunk, sde_window=sde_window,
            finetune=finetune, preview_decoder=preview_decoder, compile=compile,
            compile_backend=compile_backend)
        self.seed = seed
        self.guidance_embeds = guidance_embeds

    def load_components(self) -> dict[str, object]:
        return build_tiny_flux_components(self.resolution, self.seed, self.guidance_embeds)
