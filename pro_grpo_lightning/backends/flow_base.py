"""What the rectified-flow backends (SD3/SD3.5 in ``sd3.py``, FLUX.1 in ``flux.py``) share.

A flow backend is: text encoders -> a velocity network with a LoRA adapter -> the stateless flow
step of ``steps/flow.py`` on a fixed sigma table -> a VAE decoder. The subclasses supply the
model-specific pieces (``load_components`` / ``_encode`` / ``_velocity`` / ``_sigma_table``) and the
latent layout; the sigma table, offloading, chunked decode and the flow step live here, and
loading, freezing, LoRA, CFG and the SDE window in ``base.PipelineBackend``, so the families
behave the same way.

Sigma table: ``sigmas`` [T + 1] float32, decreasing from 1 to 0, read once from diffusers'
``FlowMatchEulerDiscreteScheduler.set_timesteps`` (its shift / resolution-dependent shift
included). The scheduler's stateful ``step`` is never used: step i goes from ``sigmas[i]`` to
``sigmas[i + 1]`` for each sample independently.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..steps import StepOutput, draw_noise
from ..steps.flow import FLOW_STEP_KINDS, flow_grpo_kl_std, flow_sde_step, flow_step_std
from .base import Conditioning, LoraSettings, PipelineBackend


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """mu, linear in the image token count (diffusers' ``calculate_shift``: SD3, FLUX, Qwen-Image, Z-Image)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def shifted_sigma_table(scheduler: Any, num_steps: int, image_seq_len: int, max_shift: float = 1.15,
                        sigmas: Any = None) -> Tensor:
    """[T + 1]: the sigma table the FLUX, Qwen-Image and Z-Image pipelines set: ``sigmas`` (default
    ``linspace(1, 1 / T, T)``, FluxPipeline's and QwenImagePipeline's) and ``mu`` from the image token
    count with the scheduler config's ``base_*`` / ``max_*`` values (``max_shift`` is the pipeline's
    default when the config has none); the scheduler applies ``mu`` iff ``use_dynamic_shifting``."""
    import numpy as np

    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift))
    if sigmas is None:
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
    return scheduler.sigmas.clone()  # [T + 1]


def pad_text_rows(cond: Conditioning, length: int) -> Conditioning:
    """Text rows ``prompt_embeds`` [B, L, D] and ``prompt_embeds_mask`` [B, L] padded to ``length``
    tokens (zero embeddings, mask 0): the layout of the families whose text length varies with the
    prompt batch (Qwen-Image, Z-Image)."""
    extra = length - cond["prompt_embeds"].shape[1]
    return {"prompt_embeds": F.pad(cond["prompt_embeds"], (0, 0, 0, extra)),  # [B, length, D]
            "prompt_embeds_mask": F.pad(cond["prompt_embeds_mask"], (0, extra))}  # [B, length]


class VariableTextMixin:
    """CFG's one batch for text rows of varying length: both sides padded to the longer (``pad_text_rows``)."""

    def stack_cfg_rows(self, negative: Conditioning, cond: Conditioning) -> Conditioning:
        length = max(negative["prompt_embeds"].shape[1], cond["prompt_embeds"].shape[1])
        return super().stack_cfg_rows(pad_text_rows(negative, length), pad_text_rows(cond, length))


class FlowMatchingBackend(PipelineBackend):
    """Shared machinery of the rectified-flow backends; see the module docstring. Its arguments are
    ``PipelineBackend``'s and these:

    Args:
        noise_level: the SDE's noise level (a for "flow_grpo"/"cps", eta for "dance").
        sde_kind: one of ``steps.flow.FLOW_STEP_KINDS``.
        max_sequence_length: T5 tokens per prompt.
        offload_text_encoders: keep the text encoders on the CPU, moving them to the denoiser's
            device only while encoding.
    """

    denoiser_component = "transformer"

    def __init__(self, pretrained: str, revision: str | None, num_steps: int, guidance_scale: float,
                 resolution: int,
                 lora: LoraSettings | None, dtype: str, negative_prompt: str, noise_level: float,
                 sde_kind: str, max_sequence_length: int, gradient_checkpointing: bool,
                 offload_text_encoders: bool, decode_chunk: int | None,
                 sde_window: Sequence[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        if sde_kind not in FLOW_STEP_KINDS:
            raise ValueError(f"sde_kind={sde_kind!r}: choose one of {FLOW_STEP_KINDS}")
        if noise_level < 0 or (sde_kind == "cps" and noise_level > 1):
            raise ValueError(f"noise_level={noise_level} is out of range for sde_kind={sde_kind!r} "
                             f"(>= 0; <= 1 for 'cps')")
        if resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 (8x VAE, 2x2 patches), got {resolution}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        super().__init__(pretrained, revision=revision, gradient_checkpointing=gradient_checkpointing,
                         decode_chunk=decode_chunk, num_steps=num_steps, guidance_scale=guidance_scale,
                         resolution=resolution, lora=lora, dtype=dtype, negative_prompt=negative_prompt,
                         sde_window=sde_window, finetune=finetune, preview_decoder=preview_decoder, compile=compile,
            compile_backend=compile_backend)
        self.noise_level = float(noise_level)
        self.sde_kind = sde_kind
        self.max_sequence_length = int(max_sequence_length)
        self.offload_text_encoders = offload_text_encoders
        self.sigmas: Tensor | None = None  # [T + 1] float32 on the CPU, set in configure_model
        self._negative: Conditioning | None = None  # cached CFG negative, one row
        self._tokenizers: dict[str, object] = {}

    # ---- what a family supplies ---------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        """Run the text encoders (already on ``device``, eval, no grad) on a list of prompts."""

    @abc.abstractmethod
    def _velocity(self, latents: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Guided velocity [B, *latent_shape] float32 at latents [B, ...] and sigma [B] (via ``_guided``)."""

    @abc.abstractmethod
    def _sigma_table(self, scheduler) -> Tensor:
        """[T + 1] float32: the scheduler's sigmas for ``num_steps``, ending at 0."""

    # ---- lifecycle ---------------------------------------------------------------------------
    def load_flow_components(self, transformer_cls: Any, vae_cls: Any, text_encoders: dict[str, Any]) -> dict[str, Any]:
        """The part of ``load_components`` every flow family shares: ``transformer`` and ``vae`` in
        ``weight_dtype``, the ``FlowMatchEulerDiscreteScheduler`` (read for its sigma table), and each
        named text encoder class from its subfolder; the family adds its tokenizers."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        dt = self.weight_dtype
        comps: dict[str, Any] = {
            "transformer": self._load(transformer_cls, "transformer", torch_dtype=dt),
            "vae": self._load(vae_cls, "vae", torch_dtype=dt),
            "scheduler": self._load(FlowMatchEulerDiscreteScheduler, "scheduler"),
        }
        comps.update({name: self._load(cls, name, dtype=dt) for name, cls in text_encoders.items()})
        return comps

    def _setup(self, components: dict[str, Any]) -> None:
        self._tokenizers = {k: v for k, v in components.items() if k.startswith("tokenizer") and v is not None}
        self.scheduler = components["scheduler"]
        self.sigmas = self._sigma_table(self.scheduler).float().cpu()  # [T + 1]
        if self.sigmas.shape != (self.num_steps + 1,):
            raise RuntimeError(f"sigma table has shape {tuple(self.sigmas.shape)}, "
                               f"expected ({self.num_steps + 1},)")

    # ---- prompts -------------------------------------------------------------------------------
    def memory_settings(self) -> dict[str, Any]:
        return {**super().memory_settings(), "offload_text_encoders": self.offload_text_encoders}

    def set_offload_text_encoders(self, offload: bool) -> None:
        """The ``offload_text_encoders`` switch: True keeps the text encoders on the CPU between
        encodes (moved to the denoiser's device only while encoding); False leaves them where the
        backend is (never moved: the memory plan counts offloading itself)."""
        self.offload_text_encoders = bool(offload)

    @contextlib.contextmanager
    def _text_encoders_on(self, device: torch.device) -> Iterator[None]:
        """With offloading, the text encoders on ``device`` for the block and back on the CPU after;
        without, nothing moves (they are wherever the backend was moved)."""
        if not self.offload_text_encoders:
            yield
            return
        encoders = [getattr(self, n) for n in self.text_encoder_names()]
        for enc in encoders:
            enc.to(device).eval()
        try:
            yield
        finally:
            for enc in encoders:
                enc.to("cpu")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        self._require_configured()
        device = self.device
        with self._text_encoders_on(device):
            cond = self._encode(list(prompts), device)
            if self.uses_cfg() and self._negative is None:
                self._negative = self._encode([self.negative_prompt], device)
        return cond

    def _negative_rows(self, batch: int, device: torch.device) -> Conditioning:
        """The cached negative-prompt conditioning, expanded to ``batch`` rows."""
        if self._negative is None:  # step() before any encode_prompts(): encode it now
            with torch.no_grad(), self._text_encoders_on(device):
                self._negative = self._encode([self.negative_prompt], device)
        if any(v.device != device for v in self._negative.values()):  # the module moved: move the cache once
            self._negative = {k: v.to(device) for k, v in self._negative.items()}
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative.items()}  # [B, ...] views

    # ---- sampling -----------------------------------------------------------------------------
    def guided_output(self, latents: Tensor, step_index: Tensor, cond: Conditioning) -> Tensor:
        sigma = self._sigmas_on(latents.device)[step_index]  # [B]
        return self._velocity(latents, sigma, cond)  # [B, *latent_shape] float32

    def _transition(self, output: Tensor, latents: Tensor, step_index: Tensor, *, stochastic: bool,
                    noise: Tensor | None, next_latents: Tensor | None) -> StepOutput:
        sigmas = self._sigmas_on(latents.device)  # [T + 1]
        sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]  # [B], [B]
        # outside the SDE window (stochastic=False): the deterministic Euler step
        return flow_sde_step(output, latents, sigma, sigma_next, noise_level=self.noise_level,
                             kind=self.sde_kind if stochastic else "ode", noise=noise, next_latents=next_latents)

    def _sigmas_on(self, device: torch.device) -> Tensor:
        """The sigma table on ``device``, copied once per device. A blocking host-to-device copy per
        step (``.to(device)``) makes the host wait for the stream: one device sync per step/minibatch."""
        cache = self.__dict__.setdefault("_sigma_cache", {})
        hit = cache.get(device)
        if hit is None or hit[0] is not self.sigmas:  # the table was rebuilt: copy again
            hit = cache[device] = (self.sigmas, self.sigmas.to(device))
        return hit[1]

    def trainable_steps(self) -> Tensor:
        """[T] bool: stochastic steps except the last (sigma_next = 0), as Flow-GRPO trains, and
        inside ``sde_window`` when there is one."""
        self._require_configured()
        std = flow_step_std(self.sigmas[:-1], self.sigmas[1:], self.noise_level, self.sde_kind)  # [T]
        not_last = torch.arange(self.num_steps) < self.num_steps - 1  # [T]
        return (std > 0) & not_last & self.window_steps()  # [T]

    def trainable_steps_from_settings(self) -> Tensor:
        """[T] bool: the window's steps but the last (it ends on the data: std 0), from the settings alone."""
        steps = self.window_steps()  # [T]
        steps[-1] = False
        return steps

    def kl_std(self, step_index: Tensor) -> Tensor:
        """[B] float32: the std Flow-GRPO's KL divides by at each row's step (``objectives.flow_grpo_kl``).

        The SDE's diffusion coefficient g for "flow_grpo"/"dance" (the step std is g sqrt(-dt)),
        the step std for "cps"; on ``step_index``'s device.
        """
        self._require_configured()
        idx = step_index.to(dtype=torch.long)  # [B], left on its device (no device-to-host sync)
        sigmas = self._sigmas_on(idx.device)  # [T + 1], cached per device
        return flow_grpo_kl_std(sigmas[idx], sigmas[idx + 1], self.noise_level, self.sde_kind)  # [B]

    def sigma_decrement(self, step_index: Tensor) -> Tensor:
        """[B] float32: sigma - sigma_next (= -dt > 0) at each row's step, on ``step_index``'s device:
        the step size GRPO-Guard's gradient reweighting divides by (``objectives.guard_step_weight``).
        Its presence marks a backend whose steps that reweighting is defined for."""
        self._require_configured()
        idx = step_index.to(dtype=torch.long)  # [B]
        sigmas = self._sigmas_on(idx.device)  # [T + 1]
        return sigmas[idx] - sigmas[idx + 1]  # [B]

    # ---- latents / images ---------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the public latents: [C, h, w] (unpacked for every family)."""
        self._require_configured()
        side = self.resolution // self.vae_scale_factor
        return (int(self.vae.config.latent_channels), side, side)

    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        return draw_noise((batch_size, *self.latent_shape()), self.device, generator)  # [B, C, h, w]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        self._require_configured()
        self.vae.eval()
        chunks = latents.split(self.decode_chunk) if self.decode_chunk else (latents,)
        images = [self._decode_latents(c) for c in chunks]  # a few VAE calls, never one per sample
        return torch.cat(images)  # [B, 3, H, W]

    def _decode_latents(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        shift = cfg.shift_factor if cfg.shift_factor is not None else 0.0
        z = latents.float().to(self.vae.device) / cfg.scaling_factor + shift  # [b, C, h, w]
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # [b, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)  # [b, 3, H, W]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sde_kind={self.sde_kind!r}, noise_level={self.noise_level}"
