"""What the rectified-flow backends (SD3/SD3.5 in ``sd3.py``, FLUX.1 in ``flux.py``) share.

A flow backend is: text encoders -> a velocity network with a LoRA adapter -> the stateless flow
step of ``steps/flow.py`` on a fixed sigma table -> a VAE decoder. The subclasses supply the
three model-specific pieces (``_load_components`` / ``_encode`` / ``_velocity``) and the latent
layout; everything else (sigma table, LoRA, freezing, offloading, chunked decode, the stochastic
step) lives here so the two families behave the same way.

Sigma table: ``sigmas`` [T + 1] float32, decreasing from 1 to 0, read once from diffusers'
``FlowMatchEulerDiscreteScheduler.set_timesteps`` (its shift / resolution-dependent shift
included). The scheduler's stateful ``step`` is never used: step i goes from ``sigmas[i]`` to
``sigmas[i + 1]`` for each sample independently.
"""

from __future__ import annotations

import abc
import contextlib
import fnmatch
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..steps import StepOutput, select_steps
from ..steps.flow import FLOW_STEP_KINDS, flow_grpo_kl_std, flow_sde_step, flow_step_std
from .base import (Conditioning, DiffusionBackend, LoraSettings, check_pretrained_source,
                   resolve_pretrained_source)


def check_tokenizer_vocab(tokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer far smaller than its encoder's embedding table.

    With ``HF_HUB_OFFLINE=1`` transformers' CLIP/T5 tokenizers may come back as a dummy of a few
    tokens instead of raising (OFFLINE.md); a real one has at least half of the encoder's
    ``vocab_size`` (T5 pads its table to a multiple of 128, CLIP matches exactly), and never more
    (its ids would index past the embedding table).
    """
    n = len(tokenizer)
    if not max(2, vocab_size // 2) <= n <= vocab_size:
        raise RuntimeError(
            f"the tokenizer loaded from {where!r} has {n} tokens but its text encoder has a vocabulary "
            f"of {vocab_size}: this is not the model's tokenizer (with HF_HUB_OFFLINE=1, transformers "
            f"can return a dummy tokenizer instead of failing). Check that folder's files.")


def expand_lora_targets(net: nn.Module, targets: Sequence[str]) -> list[str]:
    """LoRA target names for peft; entries with ``*`` are globs over full module names.

    A plain entry is matched by peft as a suffix of module names ("to_q" hits every attention).
    A glob such as ``"single_transformer_blocks.*.proj_out"`` is expanded here to the exact
    names, so a suffix shared with other layers (FLUX's final ``proj_out``) is not hit.
    Raises when an entry matches no linear layer (a typo or a renamed diffusers module).
    """
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    out: list[str] = []
    for t in targets:
        if "*" in t:
            hits = [n for n in names if fnmatch.fnmatchcase(n, t)]
        else:
            hits = [n for n in names if n == t or n.endswith("." + t)]
            hits = [t] if hits else []
        if not hits:
            raise ValueError(f"LoRA target {t!r} matches no linear layer of {type(net).__name__}")
        out += hits
    return out


def _peft_init(init: str) -> bool | str:
    return {"true": True, "default": True, "false": False}.get(init.lower(), init)


class FlowMatchingBackend(DiffusionBackend):
    """Shared machinery of the rectified-flow backends; see the module docstring.

    Args (beyond ``DiffusionBackend``'s):
        pretrained: a local diffusers folder or a hub id (checked by ``_check_source``, which the
            tiny in-code models override).
        revision: hub revision of ``pretrained``.
        noise_level: the SDE's noise level (a for "flow_grpo"/"cps", eta for "dance").
        sde_kind: one of ``steps.flow.FLOW_STEP_KINDS``.
        max_sequence_length: T5 tokens per prompt.
        gradient_checkpointing: recompute the denoiser's blocks in backward (saves memory).
        offload_text_encoders: keep the text encoders on the CPU, moving them to the denoiser's
            device only while encoding.
        vae_decode_chunk: decode at most this many latents per VAE call (None: all at once).
    """

    #: LoRA target names (peft suffixes, or globs; see ``expand_lora_targets``).
    default_lora_targets: tuple[str, ...] = ()

    def __init__(self, pretrained: str, revision: str | None, num_steps: int, guidance_scale: float,
                 resolution: int,
                 lora: LoraSettings | None, dtype: str, negative_prompt: str, noise_level: float,
                 sde_kind: str, max_sequence_length: int, gradient_checkpointing: bool,
                 offload_text_encoders: bool, vae_decode_chunk: int | None,
                 sde_window: Sequence[int] | None = None) -> None:
        super().__init__(num_steps=num_steps, guidance_scale=guidance_scale, resolution=resolution,
                         lora=lora, dtype=dtype, negative_prompt=negative_prompt, sde_window=sde_window)
        if sde_kind not in FLOW_STEP_KINDS:
            raise ValueError(f"sde_kind={sde_kind!r}: choose one of {FLOW_STEP_KINDS}")
        if noise_level < 0 or (sde_kind == "cps" and noise_level > 1):
            raise ValueError(f"noise_level={noise_level} is out of range for sde_kind={sde_kind!r} "
                             f"(>= 0; <= 1 for 'cps')")
        if resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 (8x VAE, 2x2 patches), got {resolution}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        if vae_decode_chunk is not None and vae_decode_chunk < 1:
            raise ValueError(f"vae_decode_chunk must be >= 1 or None, got {vae_decode_chunk}")
        self.pretrained = resolve_pretrained_source(pretrained)  # pkg://... -> a folder
        self.revision = revision
        self.noise_level = float(noise_level)
        self.sde_kind = sde_kind
        self.max_sequence_length = int(max_sequence_length)
        self.gradient_checkpointing = gradient_checkpointing
        self.offload_text_encoders = offload_text_encoders
        self.vae_decode_chunk = vae_decode_chunk
        self._check_source(pretrained)
        self._configured = False
        self.sigmas: Tensor | None = None  # [T + 1] float32 on the CPU, set in configure_model
        self._negative: Conditioning | None = None  # cached CFG negative, one row
        self._tokenizers: dict[str, object] = {}

    def _check_source(self, pretrained: str) -> None:
        check_pretrained_source(pretrained)

    # ---- what a family supplies ---------------------------------------------------------------
    @abc.abstractmethod
    def _load_components(self) -> dict[str, object]:
        """Pipeline components by diffusers' names (transformer, vae, scheduler, text encoders...)."""

    @abc.abstractmethod
    def _text_encoder_names(self) -> tuple[str, ...]:
        """Attribute names of the text encoders present (for freezing / offloading)."""

    @abc.abstractmethod
    def _encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        """Run the text encoders (already on ``device``, eval, no grad) on a list of prompts."""

    @abc.abstractmethod
    def _velocity(self, latents: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Guided velocity [B, *latent_shape] float32 at latents [B, ...] and sigma [B]."""

    @abc.abstractmethod
    def _sigma_table(self, scheduler) -> Tensor:
        """[T + 1] float32: the scheduler's sigmas for ``num_steps``, ending at 0."""

    def _uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    # ---- lifecycle ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self._configured:
            return
        comps = self._load_components()
        # The denoiser first: ``device`` and parameter order follow it.
        self.transformer = comps["transformer"]
        self.vae = comps["vae"]
        for name in self._text_encoder_names():
            setattr(self, name, comps[name])
        self._tokenizers = {k: v for k, v in comps.items() if k.startswith("tokenizer") and v is not None}
        self.scheduler = comps["scheduler"]

        for m in [self.transformer, *self._frozen_modules()]:
            m.requires_grad_(False)
            if next(m.parameters()).dtype != self.weight_dtype:  # loaded weights already match
                m.to(self.weight_dtype)
        for m in self._frozen_modules():
            m.eval()

        targets = expand_lora_targets(self.transformer, self.lora.target_modules or self.default_lora_targets)
        from peft import LoraConfig

        self.transformer.add_adapter(LoraConfig(
            r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
            target_modules=targets, init_lora_weights=_peft_init(self.lora.init)))
        for p in self.transformer.parameters():
            if p.requires_grad:  # the adapter: trained in float32 whatever the base dtype
                p.data = p.data.float()
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

        self.sigmas = self._sigma_table(self.scheduler).float().cpu()  # [T + 1]
        if self.sigmas.shape != (self.num_steps + 1,):
            raise RuntimeError(f"sigma table has shape {tuple(self.sigmas.shape)}, "
                               f"expected ({self.num_steps + 1},)")
        self._configured = True

    def _require_configured(self) -> None:
        if not self._configured:
            raise RuntimeError(f"{type(self).__name__}: call configure_model() first")

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.vae] + [getattr(self, n) for n in self._text_encoder_names()]

    def train(self, mode: bool = True):
        super().train(mode)
        if self._configured:  # frozen parts never train (T5's dropout would change the embeddings)
            for m in self._frozen_modules():
                m.eval()
        return self

    @property
    def device(self) -> torch.device:
        if self._configured:
            return next(self.transformer.parameters()).device
        return torch.device("cpu")

    def denoiser(self) -> nn.Module:
        self._require_configured()
        return self.transformer

    # ---- prompts -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _text_encoders_on(self, device: torch.device) -> Iterator[None]:
        encoders = [getattr(self, n) for n in self._text_encoder_names()]
        for enc in encoders:
            enc.to(device).eval()
        try:
            yield
        finally:
            if self.offload_text_encoders:
                for enc in encoders:
                    enc.to("cpu")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        self._require_configured()
        device = self.device
        with self._text_encoders_on(device):
            cond = self._encode(list(prompts), device)
            if self._uses_cfg() and self._negative is None:
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
    def step(self, latents: Tensor, step_index: Tensor, cond: Conditioning, *,
             generator: torch.Generator | None = None, next_latents: Tensor | None = None,
             ) -> StepOutput:
        self._require_configured()
        device = self.device
        idx = step_index.to(device=device, dtype=torch.long)  # [B]
        sigmas = self._sigmas_on(device)  # [T + 1]
        sigma, sigma_next = sigmas[idx], sigmas[idx + 1]  # [B], [B]
        latents = latents.to(device)
        v = self._velocity(latents, sigma, cond)  # [B, *latent_shape] float32
        given = None if next_latents is None else next_latents.to(device)
        out = flow_sde_step(v, latents, sigma, sigma_next, noise_level=self.noise_level,
                            kind=self.sde_kind, generator=generator, next_latents=given)
        inside = self._window_rows(idx)  # [B] bool, or None (no window)
        if inside is not None:  # outside the SDE window: the deterministic Euler step
            ode = flow_sde_step(v, latents, sigma, sigma_next, kind="ode", next_latents=given)
            out = select_steps(inside, out, ode)
        out.model_output = v
        return out

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

    def kl_std(self, step_index: Tensor) -> Tensor:
        """[B] float32: the std Flow-GRPO's KL divides by at each row's step (``objectives.flow_grpo_kl``).

        The SDE's diffusion coefficient g for "flow_grpo"/"dance" (the step std is g sqrt(-dt)),
        the step std for "cps"; on ``step_index``'s device.
        """
        self._require_configured()
        idx = step_index.to(dtype=torch.long)  # [B], left on its device (no device-to-host sync)
        sigmas = self._sigmas_on(idx.device)  # [T + 1], cached per device
        return flow_grpo_kl_std(sigmas[idx], sigmas[idx + 1], self.noise_level, self.sde_kind)  # [B]

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
        shape = (batch_size, *self.latent_shape())
        gen_device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gen_device,
                           dtype=torch.float32).to(self.device)  # [B, C, h, w]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        self._require_configured()
        self.vae.eval()
        chunks = latents.split(self.vae_decode_chunk) if self.vae_decode_chunk else (latents,)
        images = [self._decode_chunk(c) for c in chunks]  # a few VAE calls, never one per sample
        return torch.cat(images)  # [B, 3, H, W]

    def _decode_chunk(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        shift = cfg.shift_factor if cfg.shift_factor is not None else 0.0
        z = latents.float().to(self.vae.device) / cfg.scaling_factor + shift  # [b, C, h, w]
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # [b, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)  # [b, 3, H, W]

    # ---- loading helpers ----------------------------------------------------------------------
    def _subfolder_error(self, subfolder: str, err: Exception) -> Exception:
        where = os.path.join(str(self.pretrained), subfolder)
        return FileNotFoundError(f"{type(self).__name__}: could not load {where!r} "
                                 f"({type(err).__name__}: {err})")

    def _load(self, cls, subfolder: str, **kwargs):
        """``cls.from_pretrained(pretrained, subfolder=...)`` with an error that names the path."""
        try:
            return cls.from_pretrained(self.pretrained, subfolder=subfolder, revision=self.revision, **kwargs)
        except (OSError, ValueError) as err:
            raise self._subfolder_error(subfolder, err) from err

    def _load_tokenizer(self, cls, subfolder: str, encoder_vocab_size: int):
        tok = self._load(cls, subfolder)
        check_tokenizer_vocab(tok, encoder_vocab_size, os.path.join(str(self.pretrained), subfolder))
        return tok

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pretrained={self.pretrained!r}, sde_kind={self.sde_kind!r}, "
                f"noise_level={self.noise_level}")
