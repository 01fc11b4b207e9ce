"""Architecture numbers of the full-size models the shipped configs name, for planning without weights.

``python -m pro_grpo_lightning plan`` builds every component on the ``meta`` device from these
numbers (no hub, no files) when a config names a hub id; a local ``pretrained`` folder is read
from its own ``config.json`` files instead. Each entry is the ``config.json`` of one component of
the hub repository (only the fields that size the network; the rest keep the library defaults):

    SD1.4 / SD1.5   UNet 859.5 M, VAE 83.7 M, CLIP-L text 123.1 M
    SDXL base 1.0   UNet 2.57 B, VAE 83.7 M, CLIP-L text 123.1 M, OpenCLIP-bigG text 694.7 M
    SD3.5-Medium    MMDiT-X 2.24 B, VAE 83.8 M, CLIP-L 123.7 M, CLIP-G 694.7 M, T5-XXL encoder 4.76 B
    SD3.5-Large     MMDiT 8.06 B, the SD3.5-Medium VAE and text encoders
    Qwen-Image      MMDiT 20.4 B, video VAE 127 M, Qwen2.5-VL-7B 8.29 B (vision tower and LM head included)
    Z-Image-Turbo   single-stream DiT 6.15 B, FLUX.1's VAE, Qwen3-4B 4.02 B
    FLUX.1-dev      transformer 11.9 B, VAE 83.8 M, CLIP-L 123.1 M, T5-XXL encoder 4.76 B
    rewards         PickScore / HPSv2.1 (CLIP ViT-H/14, 986 M), CLIP ViT-L/14 (428 M)
    preview decoders TAESD / TAESD3 / TAEF1 (``AutoencoderTiny``, 2.45 M / 2.46 M / 2.46 M, half of
                    it the decoder; ``PREVIEW_DECODERS``)

The parameter counts above are checked against these tables in ``tests/test_plan.py``.
"""

from __future__ import annotations

from typing import Any

# ---- denoisers and VAEs (diffusers classes) ---------------------------------------------------------
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, cross_attention_dim=768,
    attention_head_dim=8, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD35M_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
SD35L_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm")
SD3_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))
FLUX_VAE: dict[str, Any] = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    norm_num_groups=32, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
QWENIMAGE_TRANSFORMER: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
#: AutoencoderKLQwenImage: a causal 3-D (video) VAE, 8x spatial down-sampling, 16 channels; the
#: per-channel latent statistics are the class defaults (the model's).
QWENIMAGE_VAE: dict[str, Any] = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                     temperal_downsample=[False, True, True])
ZIMAGE_TRANSFORMER: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
SDXL_VAE: dict[str, Any] = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# ---- schedulers -------------------------------------------------------------------------------------
#: SD1.x's noise schedule (its scheduler_config.json), with DDIM's class and clip_sample off.
SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
    timestep_spacing="leading",
)
SD3_SCHEDULER: dict[str, Any] = dict(shift=3.0)
#: SDXL base's DDPM schedule (its scheduler_config.json ships an EulerDiscreteScheduler with these
#: numbers), for ``DDIMScheduler``: the stochastic policy is DDIM with eta, as for SD1.x.
SDXL_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
    timestep_spacing="leading")
FLUX_SCHEDULER: dict[str, Any] = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                      base_image_seq_len=256, max_image_seq_len=4096)

#: Qwen/Qwen-Image's scheduler_config.json: resolution-dependent exponential shift, sigmas stretched
#: to end at 0.02 (``shift_terminal``).
QWENIMAGE_SCHEDULER: dict[str, Any] = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)

#: Tongyi-MAI/Z-Image-Turbo's scheduler_config.json: a static shift of 3.
ZIMAGE_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# ---- text encoders (transformers configs) -----------------------------------------------------------
CLIP_L_TEXT: dict[str, Any] = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                   num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                   hidden_act="quick_gelu", projection_dim=768)
CLIP_G_TEXT: dict[str, Any] = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                   num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                   hidden_act="gelu", projection_dim=1280)
T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                              num_heads=64, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                              dropout_rate=0.0, is_encoder_decoder=False)

#: Qwen2.5-VL-7B-Instruct (Qwen-Image's text encoder; the pipeline loads the whole
#: ``Qwen2_5_VLForConditionalGeneration``, vision tower and LM head included).
QWEN25_VL_7B: dict[str, Any] = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1e6,
                     rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)
#: Qwen3-4B (Z-Image's text encoder, ``Qwen3Model``: no LM head).
QWEN3_4B: dict[str, Any] = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                                tie_word_embeddings=True)

# ---- reward models (transformers CLIPConfig parts) --------------------------------------------------
CLIP_H_REWARD: dict[str, Any] = dict(
    text=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024)
CLIP_L_REWARD: dict[str, Any] = dict(
    text=dict(CLIP_L_TEXT),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, hidden_act="quick_gelu"),
    projection_dim=768)

#: Pipelines by hub id: component name -> (class name, config). The class names are diffusers'
#: (denoiser, VAE, scheduler) or transformers' (text encoders).
_SD1 = {"unet": ("UNet2DConditionModel", SD15_UNET), "vae": ("AutoencoderKL", SD15_VAE),
        "text_encoder": ("CLIPTextModel", CLIP_L_TEXT), "scheduler": ("DDIMScheduler", SD15_SCHEDULER)}
PIPELINES: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "CompVis/stable-diffusion-v1-4": _SD1,
    "runwayml/stable-diffusion-v1-5": _SD1,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD1,
    "stabilityai/stable-diffusion-3.5-medium": {
        "transformer": ("SD3Transformer2DModel", SD35M_TRANSFORMER), "vae": ("AutoencoderKL", SD3_VAE),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L_TEXT),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G_TEXT),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER)},
    "black-forest-labs/FLUX.1-dev": {
        "transformer": ("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER), "vae": ("AutoencoderKL", FLUX_VAE),
        "text_encoder": ("CLIPTextModel", CLIP_L_TEXT), "text_encoder_2": ("T5EncoderModel", T5_XXL),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER)},
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "unet": ("UNet2DConditionModel", SDXL_UNET), "vae": ("AutoencoderKL", SDXL_VAE),
        "text_encoder": ("CLIPTextModel", CLIP_L_TEXT),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G_TEXT),
        "scheduler": ("DDIMScheduler", SDXL_SCHEDULER)},
    "stabilityai/stable-diffusion-3.5-large": {
        "transformer": ("SD3Transformer2DModel", SD35L_TRANSFORMER), "vae": ("AutoencoderKL", SD3_VAE),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L_TEXT),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G_TEXT),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER)},
    "Qwen/Qwen-Image": {
        "transformer": ("QwenImageTransformer2DModel", QWENIMAGE_TRANSFORMER),
        "vae": ("AutoencoderKLQwenImage", QWENIMAGE_VAE),
        "text_encoder": ("Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", QWENIMAGE_SCHEDULER)},
    "Tongyi-MAI/Z-Image-Turbo": {
        "transformer": ("ZImageTransformer2DModel", ZIMAGE_TRANSFORMER), "vae": ("AutoencoderKL", FLUX_VAE),
        "text_encoder": ("Qwen3Model", QWEN3_4B),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", ZIMAGE_SCHEDULER)},
    "black-forest-labs/FLUX.1-schnell": {
        "transformer": ("FluxTransformer2DModel", dict(FLUX_DEV_TRANSFORMER, guidance_embeds=False)),
        "vae": ("AutoencoderKL", FLUX_VAE),
        "text_encoder": ("CLIPTextModel", CLIP_L_TEXT), "text_encoder_2": ("T5EncoderModel", T5_XXL),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", dict(FLUX_SCHEDULER, use_dynamic_shifting=False))},
}

# ---- preview decoders (diffusers AutoencoderTiny) -----------------------------------------------------
#: The public TAESD family (madebyollin/taesd, its diffusers exports): only the fields that decide the
#: architecture. All three are the same network (64-wide blocks, 3-3-3-1 decoder blocks, 8x up-sampling:
#: 3 nearest 2x up-samplings) and differ in latent channels only (4 for SD1.x's VAE, 16 for SD3's and
#: FLUX's). They read the diffusion-space latents (``scaling_factor`` 1, ``shift_factor`` 0; see
#: ``PipelineBackend.decode_preview``).
TAESD: dict[str, Any] = dict(
    in_channels=3, out_channels=3, encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64), act_fn="relu", upsample_fn="nearest", latent_channels=4,
    upsampling_scaling_factor=2, num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
    latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0, shift_factor=0.0)
TAESD3: dict[str, Any] = dict(TAESD, latent_channels=16)
TAEF1: dict[str, Any] = dict(TAESD, latent_channels=16)

#: Preview decoders by hub id (``preview_decoder`` of a backend): AutoencoderTiny configs.
PREVIEW_DECODERS: dict[str, dict[str, Any]] = {
    "madebyollin/taesd": TAESD,
    "madebyollin/taesdxl": TAESD,  # TAESD's network trained on SDXL's VAE (same config)
    "madebyollin/taesd3": TAESD3,
    "madebyollin/taef1": TAEF1,
}
#: The preview decoder that matches each pipeline's VAE (what the paper configs name).
PREVIEW_DECODER_OF: dict[str, str] = {
    "CompVis/stable-diffusion-v1-4": "madebyollin/taesd",
    "runwayml/stable-diffusion-v1-5": "madebyollin/taesd",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "madebyollin/taesd",
    "stabilityai/stable-diffusion-xl-base-1.0": "madebyollin/taesdxl",
    "stabilityai/stable-diffusion-3.5-medium": "madebyollin/taesd3",
    "stabilityai/stable-diffusion-3.5-large": "madebyollin/taesd3",
    "Tongyi-MAI/Z-Image-Turbo": "madebyollin/taef1",  # FLUX.1's VAE
    "black-forest-labs/FLUX.1-dev": "madebyollin/taef1",
    "black-forest-labs/FLUX.1-schnell": "madebyollin/taef1",
}

#: Reward models by hub id (``pretrained`` of the reward): CLIPConfig parts.
REWARD_MODELS: dict[str, dict[str, Any]] = {
    "yuvalkirstain/PickScore_v1": CLIP_H_REWARD,
    "xswu/HPSv2": CLIP_H_REWARD,  # HPSv2.1: open_clip ViT-H-14 (the same numbers)
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": CLIP_H_REWARD,
    "openai/clip-vit-large-patch14": CLIP_L_REWARD,
}
