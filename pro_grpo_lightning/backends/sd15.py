"""Stable Diffusion 1.x / 2.x backend: UNet + DDIM with eta > 0 as the stochastic policy.

The sampler is the DDIM step of ``steps.ddim`` on the tables of diffusers' ``DDIMScheduler``
(``alphas_cumprod``, ``final_alpha_cumprod``, ``set_timesteps``' timesteps). The scheduler's own
stateful ``step`` is never called: step index i of a batch row reads timestep ``timesteps[i]`` and
the previous timestep ``timesteps[i] - num_train_timesteps // T`` (``final_alpha_cumprod`` below 0),
exactly the rule of ``DDIMScheduler.step``, so rows at different steps share one UNet call.

``TinySD15Backend`` is the same class on a ~1 M-parameter model built in code (random weights, no
files), for tests, the quickstart and CPU benchmarks; ``save_tiny_sd15_pipeline`` writes it as a
diffusers folder so the real loading path can be exercised offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..architectures import SD15_SCHEDULER
from ..steps import StepOutput, draw_noise
from ..steps.ddim import ddim_step, ddim_tables
from .base import Conditioning, LoraSettings, PipelineBackend

#: UNet attention projections that carry the adapter (self- and cross-attention).
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

#: SD1.x's noise schedule (``architectures.SD15_SCHEDULER``).
SD15_SCHEDULER_CONFIG: dict[str, Any] = SD15_SCHEDULER

TINY_SD15_SOURCE = "<tiny-sd15>"


class SD15Backend(PipelineBackend):
    """SD1.x (and SD2.x, v-prediction) from a diffusers folder or hub id.

    Args:
        pretrained: diffusers pipeline folder or hub id (subfolders unet/vae/text_encoder/
            tokenizer/scheduler). Checked in ``__init__``; weights load in ``configure_model``.
        num_steps: T, DDIM steps of a trajectory (DanceGRPO on SD1.4: 50).
        guidance_scale: CFG scale; <= 1 runs the conditional branch only.
        resolution: image side in pixels (a multiple of the VAE factor, 8).
        eta: DDIM eta; 1 has DDPM's posterior std (DanceGRPO), 0 is the deterministic ODE.
        lora: the policy adapter on the UNet's attention projections.
        dtype: dtype of the frozen weights and the UNet forward; the step math runs in float32.
        negative_prompt: CFG's unconditional prompt, encoded once in ``configure_model``.
        revision: hub revision of ``pretrained``.
        decode_chunk: decode at most this many latents per call of the VAE (final images) and of the
            preview decoder (pruning previews); memory only; None: all at once.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        sde_window: ``[start, end)`` steps sampled with ``eta``; the others are DDIM with eta 0
            (see ``DiffusionBackend``).
        preview_decoder: an ``AutoencoderTiny`` for the pruning previews (``madebyollin/taesd``);
            see ``PipelineBackend``.

    The scheduler config's ``clip_sample``/``thresholding`` are ignored: x0 is never clipped
    (SD's own configs have clipping off).
    """

    pipeline_class = "StableDiffusionPipeline"
    denoiser_component = "unet"
    pipeline_defaults = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    default_lora_targets = DEFAULT_LORA_TARGETS

    def __init__(self, pretrained: str, num_steps: int = 50, guidance_scale: float = 5.0,
                 resolution: int = 512, eta: float = 1.0, lora: LoraSettings | None = None,
                 dtype: str = "float32", negative_prompt: str = "", revision: str | None = None,
                 decode_chunk: int | None = None, gradient_checkpointing: bool = False,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the SD VAE factor), got {resolution}")
        super().__init__(pretrained, revision=revision, gradient_checkpointing=gradient_checkpointing,
                         decode_chunk=decode_chunk, num_steps=num_steps, guidance_scale=guidance_scale,
                         resolution=resolution, lora=lora, dtype=dtype, negative_prompt=negative_prompt,
                         sde_window=sde_window, finetune=finetune, preview_decoder=preview_decoder, compile=compile,
            compile_backend=compile_backend)
        self.eta = float(eta)
        # Filled by configure_model().
        self.unet: nn.Module | None = None
        self.vae: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        self.tokenizer: Any = None
        self.prediction_type = "epsilon"
        self.init_noise_sigma = 1.0
        self.vae_scale_factor = 8
        self.latent_channels = 4
        self._tables: dict[str, Tensor] = {}  # float32 / long CPU tables, [T] each
        self._tables_on: dict[torch.device, dict[str, Tensor]] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def load_components(self) -> dict[str, Any]:
        """unet, vae, text_encoder, tokenizer, scheduler from ``pretrained`` (tokenizer checked first)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        dt = self.weight_dtype
        text_encoder = self._load(CLIPTextModel, "text_encoder", dtype=dt)
        tokenizer = self._load_tokenizer(CLIPTokenizer, "tokenizer", text_encoder.config.vocab_size)
        return dict(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=self._load(UNet2DConditionModel, "unet", torch_dtype=dt),
            vae=self._load(AutoencoderKL, "vae", torch_dtype=dt),
            scheduler=self._load(DDIMScheduler, "scheduler"),
        )

    def _setup(self, components: dict[str, Any]) -> None:
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.unet.config.in_channels)
        multiple = self.resolution_multiple()
        if self.resolution % multiple:
            raise ValueError(f"resolution {self.resolution} is not a multiple of {multiple} (the VAE factor"
                             f"{'' if multiple == self.vae_scale_factor else ' x the UNet down-sampling'}) "
                             f"of {self.pretrained!r}")
        self.tokenizer = components["tokenizer"]
        self._set_schedule(components["scheduler"])
        self._setup_negative(components)

    def resolution_multiple(self) -> int:
        """What the image side must be a multiple of: the VAE factor (SD1.x's UNet pads odd sizes)."""
        return self.vae_scale_factor

    def _setup_negative(self, components: dict[str, Any]) -> None:
        """CFG's unconditional embedding: computed once, moves with the module, never trained."""
        neg = self._encode([self.negative_prompt])  # [1, L, D]
        self.register_buffer("negative_embeds", neg, persistent=False)

    def _set_schedule(self, scheduler: Any) -> None:
        """Per-step tables from a DDIMScheduler: timesteps and abar at t and at t_prev, [T] each."""
        scheduler.set_timesteps(self.num_steps)
        self._tables = ddim_tables(scheduler.alphas_cumprod, scheduler.final_alpha_cumprod,
                                   scheduler.timesteps, scheduler.config.num_train_timesteps, self.eta)
        self._tables_on = {}
        self.prediction_type = scheduler.config.prediction_type
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

    def _table(self, name: str, device: torch.device) -> Tensor:
        """A schedule table on ``device`` (kept out of the buffers so no module cast touches it)."""
        if not self._tables:
            raise RuntimeError("call configure_model() before sampling")
        if device not in self._tables_on:
            self._tables_on[device] = {k: v.to(device) for k, v in self._tables.items()}
        return self._tables_on[device][name]

    # ---- the five stages ---------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.text_encoder.device)  # [B, L]
        return self.text_encoder(ids).last_hidden_state  # [B, L, D]

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        self._require_configured()
        return {"prompt_embeds": self._encode(prompts)}  # [B, L, D]

    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        side = self.resolution // self.vae_scale_factor
        shape = (batch_size, self.latent_channels, side, side)
        return draw_noise(shape, self.device, generator) * self.init_noise_sigma  # [B, C, h, w]

    def _negative_rows(self, batch: int, device: torch.device) -> Conditioning:
        return {"prompt_embeds": self.negative_embeds.to(device).expand(batch, -1, -1)}  # [B, L, D]

    def guided_output(self, latents: Tensor, step_index: Tensor, cond: Conditioning) -> Tensor:
        """The CFG-combined UNet output for rows at per-sample steps: [B, C, h, w] float32."""
        self._require_configured()
        device, dt = latents.device, self.weight_dtype
        timesteps = self._table("timesteps", device)[step_index.to(device)]  # [B]

        def run(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
            embeds = c["prompt_embeds"].to(device=device, dtype=dt)  # [b, L, D]
            return self.unet(x.to(dt), t, encoder_hidden_states=embeds).sample.float()  # [b, C, h, w]

        return self._guided(run, latents, timesteps, cond)  # [B, C, h, w]

    def _transition(self, output: Tensor, latents: Tensor, step_index: Tensor, *, stochastic: bool,
                    noise: Tensor | None, next_latents: Tensor | None) -> StepOutput:
        device = latents.device
        alpha_t = self._table("alpha_prod_t", device)[step_index]  # [B]
        alpha_prev = self._table("alpha_prod_prev", device)[step_index]  # [B]
        # outside the SDE window (stochastic=False): deterministic DDIM, eta 0
        return ddim_step(output, latents, alpha_t, alpha_prev, eta=self.eta if stochastic else 0.0,
                         noise=noise, next_latents=next_latents, prediction_type=self.prediction_type)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        self._require_configured()
        vae = self.vae
        z = latents.to(device=vae.device, dtype=self.weight_dtype) / vae.config.scaling_factor  # [B, C, h, w]
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        chunk = self.decode_chunk or max(1, z.shape[0])
        images = torch.cat([vae.decode(part).sample for part in z.split(chunk)])  # [B, 3, H, W]
        return (images.float() / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]

    # ---- schedule / policy -------------------------------------------------------------------
    def trainable_steps(self) -> Tensor:
        std = self._table("std", torch.device("cpu"))  # [T]
        return (std > 0) & std.log().isfinite() & self.window_steps()  # [T] bool

    def trainable_steps_from_settings(self) -> Tensor:
        """[T] bool: none with eta 0 (every step deterministic), else the window's, from the settings alone."""
        return self.window_steps() & (self.eta > 0)  # [T]

    def timesteps(self) -> Tensor:
        """The UNet timestep of each step index: [T] long."""
        return self._table("timesteps", torch.device("cpu")).clone()

    def extra_repr(self) -> str:
        return f"eta={self.eta}, " + super().extra_repr()


# ---- the tiny model ---------------------------------------------------------------------------
def build_tiny_sd15_components(resolution: int = 64, seed: int = 0) -> dict[str, Any]:
    """A random-init SD1.5-architecture pipeline of about 1.2 M parameters, built offline.

    UNet 1.06 M (2 cross-attention down/up blocks, channels 32/64), VAE 81 k (4 blocks: factor 8,
    so 64 px -> 4x8x8 latents), CLIP text encoder 36 k (hidden 32, 2 layers, byte-level vocab 514),
    and SD1.5's DDIM schedule. Each component is seeded on its own; the global RNG is untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..offline_tokenizers import byte_level_clip_tokenizer

    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    tokenizer = byte_level_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=resolution,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    for net in (unet, vae, text_encoder):
        net.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG))


def save_tiny_sd15_pipeline(path: str, resolution: int = 64, seed: int = 0) -> str:
    """Write the tiny model as a diffusers StableDiffusionPipeline folder; returns ``path``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_tiny_sd15_components(resolution, seed), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


class TinySD15Backend(SD15Backend):
    """``SD15Backend`` on the code-built tiny model (``build_tiny_sd15_components``): no files.

    Args:
        seed: seed of the random weights built in code (the same seed builds the same model).
    """

    built_in_code = True

    def __init__(self, num_steps: int = 4, guidance_scale: float = 3.0, resolution: int = 64,
                 eta: float = 1.0, lora: LoraSettings | None = None, dtype: str = "float32",
                 negative_prompt: str = "", seed: int = 0, decode_chunk: int | None = None,
                 gradient_checkpointing: bool = False, sde_window: list[int] | None = None,
                 finetune: str = "lora", preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(TINY_SD15_SOURCE, num_steps=num_steps, guidance_scale=guidance_scale,
                         resolution=resolution, eta=eta, lora=lora, dtype=dtype,
                         negative_prompt=negative_prompt, decode_chunk=decode_chunk,
                         gradient_checkpointing=gradient_checkpointing, sde_window=sde_window, finetune=finetune,
                         preview_decoder=preview_decoder, compile=compile,
            compile_backend=compile_backend)
        self.seed = seed

    def load_components(self) -> dict[str, Any]:
        return build_tiny_sd15_components(self.resolution, self.seed)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, " + super().extra_repr()
