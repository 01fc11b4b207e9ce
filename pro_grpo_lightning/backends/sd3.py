"""Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) with the Flow-GRPO SDE.

Components (diffusers' ``StableDiffusion3Pipeline`` layout): ``transformer``
(SD3Transformer2DModel), ``vae`` (AutoencoderKL, 16 latent channels, shift_factor and
scaling_factor), ``text_encoder`` / ``text_encoder_2`` (CLIPTextModelWithProjection, CLIP-L and
CLIP-G), ``text_encoder_3`` (T5EncoderModel), their three tokenizers and a
FlowMatchEulerDiscreteScheduler (read for its sigma table only).

Conditioning rows: ``prompt_embeds`` [B, 77 + max_sequence_length, joint_attention_dim] (the two
CLIPs' penultimate hidden states concatenated along features and zero-padded to T5's width, then
T5's tokens appended along the sequence) and ``pooled_prompt_embeds`` [B, sum of CLIP
projection dims], as diffusers' pipeline builds them. Latents: [B, 16, H/8, W/8].

CFG runs one transformer call on [negative; positive] rows with per-sample timesteps; the
negative prompt is encoded once and cached.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Conditioning, LoraSettings
from .flow_base import FlowMatchingBackend, calculate_shift

#: The ``pretrained`` value of the code-built tiny model (nothing to load).
TINY_SD3_SOURCE = "<tiny-sd3>"

#: Joint-attention projections of SD3's MMDiT blocks (image and text streams; SD3.5's ``attn2``
#: shares the image-stream names). Checked against diffusers 0.42.1 module names.
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0",
                    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Backend(FlowMatchingBackend):
    """SD3 / SD3.5 from a diffusers folder or hub id; see the module docstring.

    Args:
        pretrained: local diffusers folder or hub id (e.g. "stabilityai/stable-diffusion-3.5-medium").
        num_steps, guidance_scale, resolution, lora, dtype, negative_prompt: see ``DiffusionBackend``
            (defaults: Flow-GRPO's SD3.5-M setting, 10 steps at CFG 4.5).
        noise_level, sde_kind, max_sequence_length, gradient_checkpointing, offload_text_encoders,
            decode_chunk: see ``FlowMatchingBackend``.
        revision: hub revision of ``pretrained``.
        drop_t5: never load T5 (saves ~9 GB in bf16); its tokens become zeros, as diffusers does
            when ``text_encoder_3`` is None.
        preview_decoder: an ``AutoencoderTiny`` for the pruning previews (``madebyollin/taesd3``);
            see ``PipelineBackend``.
    """

    pipeline_class = "StableDiffusion3Pipeline"
    pipeline_defaults = {"text_encoder_3": None, "tokenizer_3": None}  # drop_t5: loaded without T5
    default_lora_targets = SD3_LORA_TARGETS

    def __init__(self, pretrained: str, num_steps: int = 10, guidance_scale: float = 4.5,
                 resolution: int = 512, lora: LoraSettings | None = None, dtype: str = "float32",
                 negative_prompt: str = "", noise_level: float = 0.7, sde_kind: str = "flow_grpo",
                 max_sequence_length: int = 256, drop_t5: bool = False,
                 gradient_checkpointing: bool = False, offload_text_encoders: bool = False,
                 decode_chunk: int | None = None, revision: str | None = None,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(
            pretrained=pretrained, revision=revision, num_steps=num_steps, guidance_scale=guidance_scale,
            resolution=resolution, lora=lora, dtype=dtype, negative_prompt=negative_prompt,
            noise_level=noise_level, sde_kind=sde_kind, max_sequence_length=max_sequence_length,
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
            decode_chunk=decode_chunk, sde_window=sde_window, finetune=finetune,
            preview_decoder=preview_decoder, compile=compile,
            compile_backend=compile_backend)
        self.drop_t5 = drop_t5

    def memory_settings(self) -> dict[str, object]:
        return {**super().memory_settings(), "drop_t5": self.drop_t5}

    # ---- components ------------------------------------------------------------------------
    def text_encoder_names(self) -> tuple[str, ...]:
        clips = ("text_encoder", "text_encoder_2")
        return clips if self.drop_t5 else (*clips, "text_encoder_3")

    def load_components(self) -> dict[str, object]:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        dt = self.weight_dtype
        comps = self.load_flow_components(SD3Transformer2DModel, AutoencoderKL,
                                          {"text_encoder": CLIPTextModelWithProjection,
                                           "text_encoder_2": CLIPTextModelWithProjection})
        comps["tokenizer"] = self._load_tokenizer(CLIPTokenizer, "tokenizer",
                                                  comps["text_encoder"].config.vocab_size)
        comps["tokenizer_2"] = self._load_tokenizer(CLIPTokenizer, "tokenizer_2",
                                                    comps["text_encoder_2"].config.vocab_size)
        if not self.drop_t5:
            comps["text_encoder_3"] = self._load(T5EncoderModel, "text_encoder_3", dtype=dt)
            comps["tokenizer_3"] = self._load_tokenizer(T5TokenizerFast, "tokenizer_3",
                                                        comps["text_encoder_3"].config.vocab_size)
        return comps

    def _sigma_table(self, scheduler) -> Tensor:
        # Honour the scheduler's static ``shift`` (SD3: 3.0) or, when configured, its
        # resolution-dependent shift, exactly as StableDiffusion3Pipeline does.
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            tokens = (self.resolution // self.vae_scale_factor // self.transformer.config.patch_size) ** 2
            kwargs["mu"] = calculate_shift(tokens, scheduler.config.get("base_image_seq_len", 256),
                                            scheduler.config.get("max_image_seq_len", 4096),
                                            scheduler.config.get("base_shift", 0.5),
                                            scheduler.config.get("max_shift", 1.16))
        scheduler.set_timesteps(self.num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.clone()  # [T + 1]

    # ---- text --------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        clip_hidden, clip_pooled = [], []
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tok, enc = self._tokenizers[tok_name], getattr(self, enc_name)
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)  # [B, 77]
            out = enc(ids, output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])  # [B, 77, H_i]  penultimate layer, as SD3
            clip_pooled.append(out.text_embeds)  # [B, P_i]
        clip = torch.cat(clip_hidden, dim=-1)  # [B, 77, H_1 + H_2]
        batch, width = len(prompts), self.transformer.config.joint_attention_dim
        if self.drop_t5:
            t5 = clip.new_zeros(batch, self.max_sequence_length, width)  # [B, L, D]
        else:
            tok = self._tokenizers["tokenizer_3"]
            ids = tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                      add_special_tokens=True, return_tensors="pt").input_ids.to(device)  # [B, L]
            t5 = self.text_encoder_3(ids)[0]  # [B, L, D]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [B, 77, D]
        dt = self.weight_dtype
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(dt),  # [B, 77 + L, D]
                "pooled_prompt_embeds": torch.cat(clip_pooled, dim=-1).to(dt)}  # [B, P_1 + P_2]

    # ---- denoiser ----------------------------------------------------------------------------
    def _velocity(self, latents: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        device, dt = self.device, self.weight_dtype

        def run(x: Tensor, s: Tensor, c: Conditioning) -> Tensor:  # rows: [negative; positive] with CFG
            return self.transformer(
                hidden_states=x.to(device, dt),  # [b, C, h, w]
                timestep=s * self.scheduler.config.num_train_timesteps,  # [b]  timestep = sigma * 1000
                encoder_hidden_states=c["prompt_embeds"].to(device, dt),  # [b, S, D]
                pooled_projections=c["pooled_prompt_embeds"].to(device, dt),  # [b, P]
                return_dict=False)[0].float()  # [b, C, h, w]

        return self._guided(run, latents, sigma, cond)  # [B, C, h, w]


# ---- tiny offline model --------------------------------------------------------------------------
def build_tiny_sd3_components(resolution: int = 64, seed: int = 0, qk_norm: str | None = None) -> dict[str, object]:
    """Random-init SD3-architecture components (~0.3 M-param MMDiT), built in code, seeded.

    ``qk_norm="rms_norm"``: the attention of SD3.5's blocks (RMS-normed queries and keys).

    Size rules the architecture imposes: T5 d_model = joint_attention_dim (64) >= sum of the CLIP
    hidden sizes (16 + 32, zero-padded), pooled_projection_dim = sum of the CLIP projections (16 + 32).
    Two CLIPs of different widths exercise the padding. VAE: 8x down-sampling, 16 channels,
    SD3's shift and scaling factors, no quant convs (as SD3's VAE).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..offline_tokenizers import byte_level_clip_tokenizer, char_level_t5_tokenizer

    latent_side = resolution // 8
    clip_tok = byte_level_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=latent_side, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
            pooled_projection_dim=48, pos_embed_max_size=latent_side, qk_norm=qk_norm)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), sample_size=resolution, scaling_factor=1.5305,
            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        encoders = []
        for hidden in (16, 32):
            cfg = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                 projection_dim=hidden, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
                                 eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
                                 hidden_act="gelu")
            encoders.append(CLIPTextModelWithProjection(cfg))
        t5_tok = char_level_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                     eos_token_id=1, decoder_start_token_id=0))
    return {"transformer": transformer, "vae": vae,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
            "text_encoder": encoders[0], "tokenizer": clip_tok,
            "text_encoder_2": encoders[1], "tokenizer_2": byte_level_clip_tokenizer(),
            "text_encoder_3": t5, "tokenizer_3": t5_tok}


def save_tiny_sd3_pipeline(path: str, resolution: int = 64, seed: int = 0, qk_norm: str | None = None) -> str:
    """Write the tiny components as a diffusers folder (``StableDiffusion3Pipeline.save_pretrained``)."""
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline(**build_tiny_sd3_components(resolution, seed, qk_norm)).save_pretrained(path)
    return path


def build_tiny_sd35l_components(resolution: int = 64, seed: int = 0) -> dict[str, object]:
    """The tiny SD3 components with SD3.5-Large's block type: RMS-normed q/k, no dual-attention blocks."""
    return build_tiny_sd3_components(resolution, seed, qk_norm="rms_norm")


def save_tiny_sd35l_pipeline(path: str, resolution: int = 64, seed: int = 0) -> str:
    """Write ``build_tiny_sd35l_components`` as a diffusers folder."""
    return save_tiny_sd3_pipeline(path, resolution, seed, qk_norm="rms_norm")


class TinySD3Backend(SD3Backend):
    """SD3 architecture at toy size, random weights built in code (no files, no hub); seeded.

    Same code path as ``SD3Backend`` after the components exist. For tests, the quickstart and
    CPU benchmarks. Defaults: 64 px, 4 steps, T5 truncated to 32 tokens.

    Args:
        seed: seed of the random weights built in code (the same seed builds the same model).
    """

    built_in_code = True
    #: the blocks' q/k normalisation (None: SD3's; "rms_norm": SD3.5's, ``TinySD35LBackend``)
    qk_norm: ClassVar[str | None] = None

    def __init__(self, seed: int = 0, num_steps: int = 4, guidance_scale: float = 4.5, resolution: int = 64,
                 lora: LoraSettings | None = None, dtype: str = "float32", negative_prompt: str = "",
                 noise_level: float = 0.7, sde_kind: str = "flow_grpo", max_sequence_length: int = 32,
                 drop_t5: bool = False, gradient_checkpointing: bool = False,
                 offload_text_encoders: bool = False, decode_chunk: int | None = None,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(
            TINY_SD3_SOURCE, num_steps=num_steps, guidance_scale=guidance_scale, resolution=resolution,
            lora=lora, dtype=dtype, negative_prompt=negative_prompt, noise_level=noise_level,
            sde_kind=sde_kind, max_sequence_length=max_sequence_length, drop_t5=drop_t5,
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
            decode_chunk=decode_chunk, sde_window=sde_window, finetune=finetune,
            preview_decoder=preview_decoder, compile=compile,
            compile_backend=compile_backend)
        self.seed = seed

    def load_components(self) -> dict[str, object]:
        comps = build_tiny_sd3_components(self.resolution, self.seed, self.qk_norm)
        if self.drop_t5:
            comps.pop("text_encoder_3"), comps.pop("tokenizer_3")
        return comps


class TinySD35LBackend(TinySD3Backend):
    """``TinySD3Backend`` with SD3.5-Large's block type (RMS-normed q/k, no dual attention): the tiny
    twin of ``configs/sd35l_pickscore_base.yaml``, whose model is this backend's class at 38 blocks."""

    qk_norm = "rms_norm"
