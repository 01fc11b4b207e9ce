"""Stable Diffusion XL: the SD1.x backend's DDIM-with-eta policy on SDXL's UNet and conditioning.

What SDXL adds to ``sd15.py`` (each as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` /
``__call__`` build it, diffusers 0.42.1):
    two text encoders  ``text_encoder`` (CLIP-L, ``CLIPTextModel``) and ``text_encoder_2``
                       (OpenCLIP bigG, ``CLIPTextModelWithProjection``); ``prompt_embeds`` is both
                       penultimate hidden states concatenated along features [B, 77, 768 + 1280]
    pooled embeddings  ``pooled_prompt_embeds``: ``text_encoder_2``'s projected pooled output [B, 1280]
    micro-conditioning ``add_time_ids`` = (original H, W, crop top, crop left, target H, W), here
                       (res, res, 0, 0, res, res): the pipeline's defaults for a square image
    the negative       with ``negative_prompt=None`` the unconditional rows are zeros (SDXL's
                       ``force_zeros_for_empty_prompt``, True in the base model's ``model_index.json``);
                       a string is encoded like a prompt (pipeline: ``negative_prompt="..."``)

The sampler is ``sd15.py``'s: DDIM with eta on the tables of ``DDIMScheduler.from_config`` of the
folder's scheduler config (SDXL ships an ``EulerDiscreteScheduler`` config with the same betas; DDIM
with eta is the stochastic policy, as DanceGRPO trains SD). With ``eta=0`` the rollout is the stock
pipeline run with ``DDIMScheduler.from_config(pipe.scheduler.config)``; tests check it.

``TinySDXLBackend`` builds the same architecture at toy size in code (``build_tiny_sdxl_components``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..architectures import SDXL_SCHEDULER
from .base import Conditioning, LoraSettings
from .sd15 import DEFAULT_LORA_TARGETS, SD15Backend

TINY_SDXL_SOURCE = "<tiny-sdxl>"


class SDXLBackend(SD15Backend):
    """SDXL (base 1.0 and fine-tunes of it) from a diffusers folder or hub id; see the module docstring.
    Its arguments are ``SD15Backend``'s, except:

    Args:
        negative_prompt: CFG's unconditional prompt; None (the default): zero embeddings, as the
            stock pipeline does when it is given no negative prompt.
        resolution: image side in pixels, a multiple of the VAE factor times the UNet's
            down-sampling (1024 for SDXL base; 32 divides every SDXL size).
        num_steps: DDIM steps (default 50, the pipeline's default).
    """

    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_defaults = {"force_zeros_for_empty_prompt": True}
    default_lora_targets = DEFAULT_LORA_TARGETS  # diffusers' train_dreambooth_lora_sdxl.py: the same four

    def __init__(self, pretrained: str, num_steps: int = 50, guidance_scale: float = 5.0,
                 resolution: int = 1024, eta: float = 1.0, lora: LoraSettings | None = None,
                 dtype: str = "float32", negative_prompt: str | None = None, revision: str | None = None,
                 decode_chunk: int | None = None, gradient_checkpointing: bool = False,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(pretrained, num_steps=num_steps, guidance_scale=guidance_scale, resolution=resolution,
                         eta=eta, lora=lora, dtype=dtype, negative_prompt=negative_prompt or "",
                         revision=revision, decode_chunk=decode_chunk,
                         gradient_checkpointing=gradient_checkpointing, sde_window=sde_window,
                         finetune=finetune, preview_decoder=preview_decoder,
                         compile=compile, compile_backend=compile_backend)
        #: None: zero unconditional embeddings (``force_zeros_for_empty_prompt``)
        self.negative_prompt = negative_prompt
        self.text_encoder_2: Any = None
        self.tokenizer_2: Any = None

    def text_encoder_names(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2")

    # ---- the one place the networks come from -------------------------------------------------
    def load_components(self) -> dict[str, Any]:
        """unet, vae, both text encoders and tokenizers, and a DDIMScheduler from ``pretrained``."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        dt = self.weight_dtype
        text_encoder = self._load(CLIPTextModel, "text_encoder", dtype=dt)
        text_encoder_2 = self._load(CLIPTextModelWithProjection, "text_encoder_2", dtype=dt)
        return dict(
            tokenizer=self._load_tokenizer(CLIPTokenizer, "tokenizer", text_encoder.config.vocab_size),
            tokenizer_2=self._load_tokenizer(CLIPTokenizer, "tokenizer_2", text_encoder_2.config.vocab_size),
            text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            unet=self._load(UNet2DConditionModel, "unet", torch_dtype=dt),
            vae=self._load(AutoencoderKL, "vae", torch_dtype=dt),
            scheduler=self._load(DDIMScheduler, "scheduler"),
        )

    def resolution_multiple(self) -> int:
        """The VAE factor times the UNet's down-sampling (SDXL's UNet does not pad odd sizes)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _setup_negative(self, components: dict[str, Any]) -> None:
        """The second tokenizer, the micro-conditioning and CFG's unconditional rows, once."""
        self.tokenizer_2 = components["tokenizer_2"]
        side = float(self.resolution)
        time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]])  # [1, 6] (original, crop, target)
        expected = self.unet.add_embedding.linear_1.in_features
        passed = self.unet.config.addition_time_embed_dim * 6 + self.text_encoder_2.config.projection_dim
        if expected != passed:  # the pipeline's own check (``_get_add_time_ids``)
            raise ValueError(f"{self.pretrained!r}: the UNet expects an added embedding of {expected}, "
                             f"the text encoder and time ids give {passed}")
        self.register_buffer("add_time_ids", time_ids, persistent=False)
        neg = self._encode_both([self.negative_prompt or ""])
        if self.negative_prompt is None:  # force_zeros_for_empty_prompt
            neg = {k: torch.zeros_like(v) for k, v in neg.items()}
        self.register_buffer("negative_embeds", neg["prompt_embeds"], persistent=False)  # [1, 77, D]
        self.register_buffer("negative_pooled", neg["pooled_prompt_embeds"], persistent=False)  # [1, P]

    # ---- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_both(self, prompts: Sequence[str]) -> Conditioning:
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)  # [B, 77]
            out = enc(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # the pipeline keeps the pooled output of the projecting encoder
                pooled = out[0]  # [B, P]
            hidden.append(out.hidden_states[-2])  # [B, 77, H_i]  penultimate layer
        embeds = torch.cat(hidden, dim=-1)  # [B, 77, H_1 + H_2]
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        self._require_configured()
        return self._encode_both(prompts)

    def _negative_rows(self, batch: int, device: torch.device) -> Conditioning:
        return {"prompt_embeds": self.negative_embeds.to(device).expand(batch, -1, -1),  # [B, 77, D]
                "pooled_prompt_embeds": self.negative_pooled.to(device).expand(batch, -1)}  # [B, P]

    # ---- denoiser -----------------------------------------------------------------------------
    def guided_output(self, latents: Tensor, step_index: Tensor, cond: Conditioning) -> Tensor:
        """The CFG-combined UNet output (eps) at per-row steps: [B, 4, h, w] float32."""
        self._require_configured()
        device, dt = latents.device, self.weight_dtype
        timesteps = self._table("timesteps", device)[step_index.to(device)]  # [B]

        def run(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
            added = {"text_embeds": c["pooled_prompt_embeds"].to(device, dt),  # [b, P]
                     "time_ids": self.add_time_ids.to(device, dt).expand(x.shape[0], -1)}  # [b, 6]
            return self.unet(x.to(dt), t, encoder_hidden_states=c["prompt_embeds"].to(device, dt),
                             added_cond_kwargs=added).sample.float()  # [b, 4, h, w]

        return self._guided(run, latents, timesteps, cond)  # [B, 4, h, w]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", negative_prompt={self.negative_prompt!r}"


# ---- the tiny model ---------------------------------------------------------------------------
def build_tiny_sdxl_components(resolution: int = 64, seed: int = 0) -> dict[str, Any]:
    """A random-init SDXL-architecture pipeline (~0.4 M parameters), built in code, seeded.

    SDXL's layout scaled down: UNet with a plain first down block and a cross-attention second one
    (``DownBlock2D``, ``CrossAttnDownBlock2D``), linear projections, ``text_time`` added embedding
    (time ids 6 x 8 + pooled 32 = 80 inputs), cross-attention width 64 = 32 + 32 (the two CLIPs'
    hidden sizes); VAE of factor 8 with SDXL's scaling factor; SDXL's DDPM schedule for DDIM.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..offline_tokenizers import byte_level_clip_tokenizer

    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
    tok = byte_level_clip_tokenizer()
    clip = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), sample_size=resolution, scaling_factor=0.13025,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    for net in (unet, vae, text_encoder, text_encoder_2):
        net.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                tokenizer_2=byte_level_clip_tokenizer(), scheduler=DDIMScheduler(**SDXL_SCHEDULER))


def save_tiny_sdxl_pipeline(path: str, resolution: int = 64, seed: int = 0) -> str:
    """Write the tiny model as a diffusers ``StableDiffusionXLPipeline`` folder; returns ``path``."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**build_tiny_sdxl_components(resolution, seed)).save_pretrained(path)
    return path


class TinySDXLBackend(SDXLBackend):
    """``SDXLBackend`` on the code-built tiny model (``build_tiny_sdxl_components``): no files.

    Args:
        seed: seed of the random weights built in code (the same seed builds the same model).
    """

    built_in_code = True

    def __init__(self, num_steps: int = 4, guidance_scale: float = 3.0, resolution: int = 64,
                 eta: float = 1.0, lora: LoraSettings | None = None, dtype: str = "float32",
                 negative_prompt: str | None = None, seed: int = 0, decode_chunk: int | None = None,
                 gradient_checkpointing: bool = False, sde_window: list[int] | None = None,
                 finetune: str = "lora", preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(TINY_SDXL_SOURCE, num_steps=num_steps, guidance_scale=guidance_scale,
                         resolution=resolution, eta=eta, lora=lora, dtype=dtype, negative_prompt=negative_prompt,
                         decode_chunk=decode_chunk, gradient_checkpointing=gradient_checkpointing,
                         sde_window=sde_window, finetune=finetune, preview_decoder=preview_decoder,
                         compile=compile, compile_backend=compile_backend)
        self.seed = seed


    def load_components(self) -> dict[str, Any]:
        return build_tiny_sdxl_components(self.resolution, self.seed)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, " + super().extra_repr()
