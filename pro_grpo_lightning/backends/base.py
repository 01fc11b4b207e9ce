"""The interface every model family implements (SD1.x, SD3/SD3.5, FLUX.1).

A backend owns the frozen pipeline parts (text encoders, VAE), the denoiser with its LoRA adapter
(the policy) and the scheduler tables. It knows nothing about groups, pruning or GRPO: the rollout
and the update only call the methods below, on whole batches, with per-sample step indices.

Shapes (B = any batch of samples, T = ``num_steps``):
    cond:     Conditioning, a dict of tensors with batch-first rows, one row per sample
    latents:  [B, *latent_shape]   (SD: [B, C, h, w]; FLUX keeps its own packed layout inside)
    step_index: [B] long, 0-based index into the sampling schedule, step i goes from
              noise level i to noise level i + 1 (i = 0 is the noisiest)

Build cheaply, load late: ``__init__`` validates and stores settings only (so parsing a YAML or
``--print_config`` never loads weights); ``configure_model()`` builds or loads the components
(idempotent), adds the LoRA adapter and freezes everything else.

``PipelineBackend`` is the template of the diffusers families (``sd15.py``, ``flow_base.py``):
loading (``load_components`` with diffusers' component names), freezing, the LoRA adapter, CFG,
the SDE window and the step itself live there once; a family supplies its components, its
guided denoiser output and its transition (DDIM or a flow SDE step).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import fnmatch
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..compiling import DenoiserCompiler, check_compile_backend, compile_denoiser
from ..loading import (check_pretrained_source, check_tokenizer_vocab, load_preview_decoder, parse_dtype,
                       resolve_pretrained_source)
from ..networks import PRETRAINED, NetworkSource, architecture_components, preview_decoder_architecture
from ..steps import StepOutput, draw_noise, select_steps

Conditioning = dict[str, Tensor]


def select_rows(cond: Conditioning, index: Tensor) -> Conditioning:
    """Index-select every tensor of a conditioning dict along its batch dim."""
    return {k: v.index_select(0, index) for k, v in cond.items()}


@dataclass
class LoraSettings:
    """LoRA adapter on the denoiser (peft). ``target_modules=None`` uses the backend's default."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    #: peft's ``init_lora_weights``: "gaussian" keeps B = 0 so the policy starts equal to the reference.
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")


def _checked_window(sde_window: Sequence[int] | None, num_steps: int) -> tuple[int, int] | None:
    """``sde_window`` as a (start, end) tuple, refused unless 0 <= start < end <= num_steps."""
    if sde_window is None:
        return None
    window = [int(v) for v in sde_window]
    if len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:
        raise ValueError(f"sde_window must be [start, end) with 0 <= start < end <= num_steps "
                         f"({num_steps}), got {list(sde_window)}")
    return (window[0], window[1])


class DiffusionBackend(nn.Module, abc.ABC):
    """Policy + reference + sampler tables for one model family.

    Args:
        num_steps: T, denoising steps of one trajectory.
        guidance_scale: classifier-free guidance scale (>= 0; values up to 1 disable CFG; FLUX-dev uses it as its
            guidance embedding instead).
        resolution: image side in pixels.
        lora: the adapter trained as the policy.
        dtype: dtype of the frozen weights and the denoiser forward; step math is always float32.
        negative_prompt: the unconditional prompt for CFG.
        sde_window: ``[start, end)``, 0-based steps that sample stochastically and are trained;
            every other step is the deterministic ODE step of the same sampler (no exploration,
            no log-prob, never trained). None: all steps are stochastic. Flow-GRPO's "Fast"
            variant and MixGRPO (Li et al. 2025, arXiv:2507.21802) train such a window: fewer
            steps to train, and the within-group spread comes only from the window's noise, so
            the credit for it lands on fewer actions. Pro-GRPO's checkpoints may sit anywhere.
    """

    def __init__(self, num_steps: int = 20, guidance_scale: float = 5.0, resolution: int = 512,
                 lora: LoraSettings | None = None, dtype: str = "float32",
                 negative_prompt: str = "", sde_window: Sequence[int] | None = None) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.sde_window: tuple[int, int] | None = _checked_window(sde_window, num_steps)
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
        self.num_steps = num_steps
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale}: must be a finite number >= 0 "
                             f"(values up to 1 mean no classifier-free guidance, as in diffusers)")
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.lora = lora or LoraSettings()
        self.dtype_name = dtype
        self.weight_dtype = parse_dtype(dtype)
        self.negative_prompt = negative_prompt

    # ---- lifecycle -------------------------------------------------------------------------
    @abc.abstractmethod
    def configure_model(self) -> None:
        """Build or load components, add the LoRA adapter, freeze the rest. Idempotent."""

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def use_networks(self, source: NetworkSource) -> None:
        """Where ``configure_model`` builds the networks from (``networks.NetworkSource``). A backend
        that cannot build its architecture without weights refuses anything but pretrained."""
        if not source.pretrained:
            raise NotImplementedError(f"{type(self).__name__} builds its networks one way only; "
                                      f"NetworkSource(weights={source.weights!r}) is not supported")

    def set_keep_reference(self, keep: bool) -> None:
        """Whether ``configure_model`` keeps a frozen copy of the denoiser as the KL reference (full
        fine-tuning only; the module sets it from ``kl_beta > 0``). Nothing to keep here."""

    def uses_cfg(self) -> bool:
        """Whether a denoiser call runs classifier-free guidance (two network rows per sample)."""
        return False

    # ---- the five stages ---------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text embeddings, one row per prompt (no grad). CFG's negative is handled inside."""

    @abc.abstractmethod
    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Gaussian noise at the first noise level: [batch_size, *latent_shape], float32."""

    @abc.abstractmethod
    def step(self, latents: Tensor, step_index: Tensor, cond: Conditioning, *,
             noise: Tensor | None = None, next_latents: Tensor | None = None,
             generator: torch.Generator | None = None) -> StepOutput:
        """One stochastic step from noise level ``step_index`` to ``step_index + 1``.

        Runs the denoiser (with CFG) and the family's SDE step. ``noise`` [B, *latent] is the
        standard-normal draw of the step, given by the caller (the rollout draws the global
        batch's and passes this rank's rows); with ``next_latents`` given, it re-scores that
        stored transition (same mean/std/log-prob code path) instead of sampling; with neither,
        the noise is drawn from ``generator``. Gradients flow to the LoRA parameters unless the
        caller disables them.
        """

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (clean, or an x0 preview) -> images [B, 3, H, W] float32 in [0, 1], no grad."""

    def decode_preview(self, latents: Tensor) -> Tensor:
        """The pruning previews' decode (x0 previews -> images [B, 3, H, W] in [0, 1], no grad):
        ``decode`` unless the backend has a cheaper preview decoder. Final images always use ``decode``."""
        return self.decode(latents)

    # ---- schedule ----------------------------------------------------------------------------
    @abc.abstractmethod
    def trainable_steps(self) -> Tensor:
        """[T] bool: steps whose log-prob is well defined for training (e.g. not a zero-std step)."""

    def trainable_steps_from_settings(self) -> Tensor:
        """[T] bool on the CPU: the steps ``trainable_steps`` can report, known from the settings
        alone (before any weights load; ``update.check_trainable``). Here: those inside ``sde_window``."""
        return self.window_steps()

    def window_steps(self) -> Tensor:
        """[T] bool on the CPU: steps inside ``sde_window`` (all True without one)."""
        inside = torch.ones(self.num_steps, dtype=torch.bool)  # [T]
        if self.sde_window is not None:
            start, end = self.sde_window
            inside[:start] = False
            inside[end:] = False
        return inside

    def set_sde_window(self, window: Sequence[int] | None) -> None:
        """Change ``sde_window`` (checked as in ``__init__``) on a built backend: the benchmarks time
        schedules with and without a window on one model."""
        self.sde_window = _checked_window(window, self.num_steps)
        self.__dict__.pop("_window_cache", None)  # the per-device step mask follows the window

    def _window_rows(self, step_index: Tensor) -> Tensor | None:
        """[B] bool: rows whose step is inside the window (None without a window: all are)."""
        if self.sde_window is None:
            return None
        cache = self.__dict__.setdefault("_window_cache", {})
        dev = step_index.device
        if dev not in cache:  # one host-to-device copy per device, then pure indexing (no sync)
            cache[dev] = self.window_steps().to(dev)
        return cache[dev][step_index]  # [B]

    # ---- policy / reference ----------------------------------------------------------------
    @abc.abstractmethod
    def denoiser(self) -> nn.Module:
        """The network carrying the LoRA adapter."""

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this context the denoiser runs with the adapter off: the frozen reference."""
        net = self.denoiser()
        net.disable_adapters()
        try:
            yield
        finally:
            net.enable_adapters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser().parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The adapter's weights only (what a checkpoint stores), keyed by parameter name."""
        return {n: p.detach().clone() for n, p in self.denoiser().named_parameters() if p.requires_grad}

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.denoiser().named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise KeyError(f"checkpoint has adapter weights this model lacks: {missing[:5]}")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    #: counts and delegates the denoiser's compilations (``compiling.py``); None: eager
    compiler: DenoiserCompiler | None = None

    def compile_metrics(self) -> dict[str, float]:
        """``compile/*`` counts of a compiled denoiser; empty when it runs eagerly."""
        return self.compiler.metrics() if self.compiler is not None else {}

    def extra_repr(self) -> str:
        window = f", sde_window={list(self.sde_window)}" if self.sde_window is not None else ""
        return (f"num_steps={self.num_steps}, guidance_scale={self.guidance_scale}, "
                f"resolution={self.resolution}{window}")


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


#: Run a denoiser on latents [B, ...], per-row times [B] and conditioning rows -> output [B, ...].
DenoiserCall = Callable[[Tensor, Tensor, Conditioning], Tensor]


class PipelineBackend(DiffusionBackend):
    """The template of a diffusers model family; see the module docstring.

    A family sets the class attributes and implements ``load_components``, ``_setup`` (what it
    keeps from the components: tokenizers, schedule tables), ``guided_output`` (via ``_guided``),
    ``_transition`` (its step function), ``_negative_rows`` (CFG's negative prompt), plus the
    text encoding, initial latents and decoding of ``DiffusionBackend``. Its arguments are
    ``DiffusionBackend``'s and these:

    Args:
        pretrained: a local diffusers folder, a ``pkg://`` folder or a hub id; checked here
            (``_check_source``, which the code-built tiny models override), loaded in
            ``configure_model``.
        revision: hub revision of ``pretrained``.
        gradient_checkpointing: recompute the denoiser's activations in the backward pass.
        decode_chunk: decode at most this many latents per decoder call, in both decodes: the VAE's
            (final images) and the preview decoder's (pruning previews); memory only, the images are
            the same; None: all at once. (Called ``vae_decode_chunk`` before it named both: a
            config or checkpoint with the old key is read as this one, ``checkpointing.RENAMED``.)
        preview_decoder: a diffusers ``AutoencoderTiny`` (local folder, ``pkg://`` folder or hub id)
            that decodes the pruning previews instead of the VAE; the final images (true reward,
            training, evaluation) always use the VAE. The TAESD family matches the families:
            ``madebyollin/taesd`` (SD1.x), ``madebyollin/taesd3`` (SD3/SD3.5), ``madebyollin/taef1``
            (FLUX.1); ``pkg://pro_grpo_lightning/assets/tiny_shapes_sd3_preview_decoder`` is the
            quickstart model's. None: the VAE decodes the previews. Checked here like ``pretrained``,
            loaded in ``configure_model`` in ``dtype``; its latent channels and up-sampling factor
            must match the VAE's. It belongs to the backend, not to ``model.rollout``: it is a frozen
            pipeline part tied to the family's latent space, loaded, cast and moved with the VAE
            (``rollout.preview_scale`` still resizes whatever decodes the previews).
        finetune: "lora" trains the ``lora`` adapter (the default); "full" trains the denoiser's
            own weights (``lora`` is then unused). The denoiser stays in ``dtype``: for float32
            master weights with bf16 compute use ``dtype: float32`` and the Trainer's
            ``precision: bf16-mixed``. The KL reference is then a frozen copy of the base
            denoiser, made in ``configure_model`` only when ``keep_reference`` is True (the
            module sets it from ``kl_beta > 0``): with ``kl_beta: 0`` no copy is held.
        compile: run the denoiser through ``torch.compile`` (``compiling.py``): static shapes, one
            graph per batch size the schedule produces, compiled during the first rollout and
            update and only looked up afterwards (``compile/graphs`` is logged; it stays flat after
            the warm-up). The step arithmetic around the denoiser stays eager. Off by default: the
            compile time (minutes for a real model) pays back only over many rollouts, and the
            measured speed-up is in ``docs/benchmarks.md`` ("A compiled denoiser").
        compile_backend: the ``torch.compile`` backend: "inductor" (generated kernels, the fast one),
            "aot_eager" (the same tracing without code generation: a quick check that a model
            compiles), or any ``torch.compiler.list_backends()`` name.
    """

    #: Name of diffusers' stock pipeline class of the family (what ``export.py`` builds and whose
    #: ``save_lora_weights`` format the LoRA export writes).
    pipeline_class: ClassVar[str] = ""
    #: The pipeline component that carries the adapter ("unet", "transformer").
    denoiser_component: ClassVar[str] = ""
    #: Components the stock pipeline takes that ``load_components`` does not give (export).
    pipeline_defaults: ClassVar[dict[str, Any]] = {}
    #: LoRA target names when ``lora.target_modules`` is None (peft suffixes, or globs: see
    #: ``expand_lora_targets``).
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    #: True for models whose architecture is code (the tiny twins): ``load_components`` builds them,
    #: whatever the ``NetworkSource``; ``pretrained`` names nothing to load.
    built_in_code: ClassVar[bool] = False

    def __init__(self, pretrained: str, *, revision: str | None = None, gradient_checkpointing: bool = False,
                 decode_chunk: int | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: counts and delegates the denoiser's compilations; None: the denoiser runs eagerly
        check_compile_backend(compile_backend)  # a typo fails at parse time, compiled or not
        self.compiler = DenoiserCompiler(compile_backend) if compile else None
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        self.finetune = finetune
        #: full fine-tuning only: keep a frozen copy of the base denoiser as the KL reference.
        self.keep_reference = True
        self.reference_denoiser: nn.Module | None = None
        if decode_chunk is not None and decode_chunk < 1:
            raise ValueError(f"decode_chunk must be >= 1 or None, got {decode_chunk}")
        self.pretrained = resolve_pretrained_source(pretrained)  # pkg://... -> a folder
        self.revision = revision
        self.gradient_checkpointing = gradient_checkpointing
        self.decode_chunk = decode_chunk
        self._check_source(pretrained)
        #: ``preview_decoder`` as configured (the module that decodes is ``self.preview_decoder``)
        self.preview_source = preview_decoder
        if preview_decoder is not None:
            check_pretrained_source(preview_decoder, what="preview_decoder")  # before any model loads
        self.preview_decoder: nn.Module | None = None
        #: where the networks come from (``use_networks``): pretrained weights unless chosen otherwise
        self.networks: NetworkSource = PRETRAINED
        self._configured = False

    def _check_source(self, pretrained: str) -> None:
        if not self.built_in_code:
            check_pretrained_source(pretrained)

    # ---- the public seam: where networks come from, memory switches ------------------------------
    def use_networks(self, source: NetworkSource) -> None:
        """Build the networks from ``source`` in ``configure_model`` (see ``networks.py``): the
        pretrained weights, or the architecture alone with random values on a device, or empty on
        the meta device. The LoRA adapter is created on the same device. Before ``configure_model``."""
        if self._configured:
            raise RuntimeError(f"{type(self).__name__}.use_networks: the networks are already built")
        self.networks = source

    def set_decode_chunk(self, n: int | None) -> None:
        """At most ``n`` latents per VAE / preview-decoder call (None: all at once); the
        ``decode_chunk`` setting, changed on a built backend (the memory plan's lever)."""
        if n is not None and n < 1:
            raise ValueError(f"decode batch size must be >= 1 or None, got {n}")
        self.decode_chunk = n

    def set_keep_reference(self, keep: bool) -> None:
        """Full fine-tuning: whether ``configure_model`` keeps a frozen copy of the base denoiser as
        the KL reference (the module sets it from ``kl_beta > 0``). Before ``configure_model``."""
        self.keep_reference = bool(keep)

    def uses_cfg(self) -> bool:
        """Whether a denoiser call runs classifier-free guidance (two network rows per sample)."""
        return self.guidance_scale > 1.0

    def memory_settings(self) -> dict[str, Any]:
        """The settings that decide this backend's memory, by their config names, as the memory
        plan reads them and its levers change them; a family adds its own (offloading, T5)."""
        return {"gradient_checkpointing": self.gradient_checkpointing, "decode_chunk": self.decode_chunk}

    def build_components(self) -> dict[str, Any]:
        """The pipeline components from ``self.networks``: ``load_components()`` for pretrained
        weights (and for models built in code, on the source's device); else the architecture of
        ``pretrained`` (``networks.architecture_components``) on the source's device."""
        source = self.networks
        if source.pretrained:
            return self.load_components()
        with source.building(self.weight_dtype):
            if self.built_in_code:
                comps = self.load_components()
            else:
                comps = architecture_components(self.pretrained, self.text_encoder_names(),
                                                getattr(self, "max_sequence_length", 77))
        sched = comps["scheduler"]
        with torch.device("cpu"):  # schedulers hold real tables: rebuilt from their config on the CPU
            comps["scheduler"] = type(sched).from_config(sched.config)
        return comps

    # ---- what a family supplies ---------------------------------------------------------------
    @abc.abstractmethod
    def load_components(self) -> dict[str, Any]:
        """Fresh pipeline components by diffusers' names (denoiser, vae, scheduler, text encoders,
        tokenizers), in ``weight_dtype``, without an adapter. ``export.py`` builds the stock
        pipeline from them too."""

    def text_encoder_names(self) -> tuple[str, ...]:
        """Names of the text encoder components present (frozen, kept in eval mode)."""
        return ("text_encoder",)

    def _setup(self, components: dict[str, Any]) -> None:
        """Keep what the family needs from the loaded components (tokenizers, schedule tables)."""

    @abc.abstractmethod
    def guided_output(self, latents: Tensor, step_index: Tensor, cond: Conditioning) -> Tensor:
        """The CFG-combined denoiser output (eps or velocity) [B, *latent] float32 at per-row steps."""

    @abc.abstractmethod
    def _transition(self, output: Tensor, latents: Tensor, step_index: Tensor, *, stochastic: bool,
                    noise: Tensor | None, next_latents: Tensor | None) -> StepOutput:
        """The family's step from the guided output; ``stochastic=False``: its deterministic ODE step."""

    def _negative_rows(self, batch: int, device: torch.device) -> Conditioning:
        """CFG's negative-prompt conditioning, ``batch`` rows on ``device``."""
        raise NotImplementedError(f"{type(self).__name__} does not run classifier-free guidance")

    # ---- lifecycle ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self._configured:
            return
        comps = self.build_components()
        net = comps[self.denoiser_component]
        frozen = [comps["vae"], *(comps[n] for n in self.text_encoder_names())]
        for m in (net, *frozen):
            m.requires_grad_(False)
            if any(p.dtype != self.weight_dtype for p in m.parameters()):  # loaded weights already match
                m.to(dtype=self.weight_dtype)
        for m in frozen:
            m.eval()
        reference = None
        if self.finetune == "full" and self.keep_reference:  # before training: memory is known up front
            reference = copy.deepcopy(net).eval()
        # The denoiser first: ``device`` and the parameter order follow it.
        setattr(self, self.denoiser_component, net)
        self.vae = comps["vae"]
        for name in self.text_encoder_names():
            setattr(self, name, comps[name])
        if self.finetune == "full":
            net.requires_grad_(True)
            if self.gradient_checkpointing:
                net.enable_gradient_checkpointing()
            self.reference_denoiser = reference  # a registered submodule: moves with the backend
        else:  # on the networks' device, seeded like them (peft builds the adapter where the context says)
            with self.networks.adapter().building(self.weight_dtype):
                self.attach_lora(net)
        self._setup(comps)
        if self.compiler is not None:  # after the adapter and checkpointing: the compiled forward sees both
            compile_denoiser(net, self.compiler)
        if self.preview_source is not None:
            self.preview_decoder = self._checked_preview_decoder(self._build_preview_decoder())
        self._configured = True

    def _build_preview_decoder(self) -> nn.Module:
        """The ``AutoencoderTiny`` named by ``preview_decoder``, from ``self.networks``: its weights,
        or its architecture (a folder's config, ``architectures.PREVIEW_DECODERS``) on the source's device."""
        if self.networks.pretrained:
            return load_preview_decoder(self.preview_source, self.weight_dtype)
        with self.networks.building(self.weight_dtype):
            return preview_decoder_architecture(str(self.preview_source))

    def _checked_preview_decoder(self, decoder: nn.Module) -> nn.Module:
        """Refuse a preview decoder that cannot read this VAE's latents or would decode another size."""
        cfg, vae_cfg = decoder.config, self.vae.config
        where = f"preview_decoder={self.preview_source!r}"
        if int(cfg.latent_channels) != int(vae_cfg.latent_channels):
            raise ValueError(f"{where}: it reads {cfg.latent_channels} latent channels, the VAE of "
                             f"{self.pretrained!r} writes {vae_cfg.latent_channels} (TAESD is for SD1.x, "
                             f"TAESD3 for SD3/SD3.5, TAEF1 for FLUX.1)")
        factor = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
        vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        if factor != vae_factor:
            raise ValueError(f"{where}: it up-samples latents {factor}x, the VAE of {self.pretrained!r} "
                             f"{vae_factor}x: its previews would not have the final images' size")
        decoder.requires_grad_(False)
        if any(p.dtype != self.weight_dtype for p in decoder.parameters()):
            decoder.to(dtype=self.weight_dtype)
        return decoder.eval()

    def lora_targets(self, net: nn.Module) -> list[str]:
        """The names peft adapts: ``lora.target_modules`` (or the family's default) expanded against
        ``net`` (``expand_lora_targets``)."""
        return expand_lora_targets(net, self.lora.target_modules or self.default_lora_targets)

    def attach_lora(self, net: nn.Module) -> None:
        """Add the policy adapter (``self.lora``) to ``net``, trained in float32 whatever the base dtype."""
        from peft import LoraConfig

        settings = self.lora
        init = {"true": True, "default": True, "false": False}.get(str(settings.init).lower(), settings.init)
        targets = self.lora_targets(net)
        net.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                   init_lora_weights=init, target_modules=targets))
        for name, module in net.named_modules():  # peft creates the adapter in the base dtype
            if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                module.float()
        if self.gradient_checkpointing:
            net.enable_gradient_checkpointing()

    def _require_configured(self) -> None:
        if not self._configured:
            raise RuntimeError(f"{type(self).__name__}: call configure_model() first")

    def _frozen_modules(self) -> list[nn.Module]:
        frozen = [self.vae] + [getattr(self, n) for n in self.text_encoder_names()]
        frozen += [self.preview_decoder] if self.preview_decoder is not None else []
        return frozen + ([self.reference_denoiser] if self.reference_denoiser is not None else [])

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen reference: the adapter off (LoRA), or the frozen base copy swapped in (full)."""
        if self.finetune == "lora":
            with super().reference():
                yield
            return
        if self.reference_denoiser is None:
            raise RuntimeError(f"{type(self).__name__}(finetune='full') holds no reference copy "
                               f"(keep_reference=False: kl_beta is 0)")
        policy = self.denoiser()
        # Plain attribute swap, not setattr's module registration order change: restored in finally.
        self._modules[self.denoiser_component] = self.reference_denoiser
        try:
            yield
        finally:
            self._modules[self.denoiser_component] = policy

    def train(self, mode: bool = True):
        super().train(mode)
        if self._configured:  # frozen parts never train (T5's dropout would change the embeddings)
            for m in self._frozen_modules():
                m.eval()
        return self

    @property
    def device(self) -> torch.device:
        if self._configured:
            return next(self.denoiser().parameters()).device
        return torch.device("cpu")

    def denoiser(self) -> nn.Module:
        self._require_configured()
        return getattr(self, self.denoiser_component)

    # ---- sampling -----------------------------------------------------------------------------
    def _guided(self, run: DenoiserCall, latents: Tensor, times: Tensor, cond: Conditioning) -> Tensor:
        """Classifier-free guidance around one denoiser call: [negative; positive] rows in one batch,
        combined as uncond + scale * (cond - uncond). Without CFG: ``run`` on the rows as given."""
        if not self.uses_cfg():
            return run(latents, times, cond)
        B, device = latents.shape[0], latents.device
        neg = self._negative_rows(B, device)
        both = self.stack_cfg_rows({k: v.to(device) for k, v in neg.items()},
                                   {k: v.to(device) for k, v in cond.items()})  # [2B, ...] each
        out = run(torch.cat([latents, latents]), torch.cat([times, times]), both)  # [2B, *latent]
        uncond, text = out.chunk(2)  # [B, *latent] each
        return self.combine_guidance(uncond, text)  # [B, *latent]

    def stack_cfg_rows(self, negative: Conditioning, cond: Conditioning) -> Conditioning:
        """CFG's one batch: the negative rows, then the prompts' rows (a family whose text length
        varies per prompt batch pads both to one length here)."""
        return {k: torch.cat([negative[k], v]) for k, v in cond.items()}  # [2B, ...] each

    def combine_guidance(self, uncond: Tensor, text: Tensor) -> Tensor:
        """The guided output from the two branches [B, ...]: uncond + scale * (text - uncond), the
        rule of the SD, SD3 and SDXL pipelines (a family whose pipeline does more overrides it)."""
        return uncond + self.guidance_scale * (text - uncond)  # [B, ...]

    def step(self, latents: Tensor, step_index: Tensor, cond: Conditioning, *,
             noise: Tensor | None = None, next_latents: Tensor | None = None,
             generator: torch.Generator | None = None) -> StepOutput:
        self._require_configured()
        device = self.device
        latents = latents.to(device)
        idx = step_index.to(device=device, dtype=torch.long)  # [B]
        if noise is None and next_latents is None:
            noise = draw_noise(latents.shape, device, generator)  # [B, *latent]
        if next_latents is not None:
            next_latents = next_latents.to(device)
        output = self.guided_output(latents, idx, cond)  # [B, *latent] float32
        out = self._transition(output, latents, idx, stochastic=True, noise=noise, next_latents=next_latents)
        inside = self._window_rows(idx)  # [B] bool, or None (no window)
        if inside is not None:  # outside the SDE window: the sampler's deterministic step
            ode = self._transition(output, latents, idx, stochastic=False, noise=noise, next_latents=next_latents)
            out = select_steps(inside, out, ode)
        out.model_output = output
        return out

    @torch.no_grad()
    def decode_preview(self, latents: Tensor) -> Tensor:
        """x0 previews [B, *latent] -> images [B, 3, H, W] in [0, 1]: the preview decoder when one is
        configured (``decode_chunk`` latents per call), else the VAE (``decode``).

        Latent convention: diffusers' pipelines decode with whatever ``pipe.vae`` is, as
        ``latents / vae.config.scaling_factor + vae.config.shift_factor`` (``StableDiffusion3Pipeline``
        and ``FluxPipeline.__call__``; ``StableDiffusionPipeline`` divides only, and an
        ``AutoencoderTiny``'s ``shift_factor`` defaults to 0), and the TAESD docs swap the tiny decoder
        in as ``pipe.vae``. So the tiny decoder's *own* config is applied to the diffusion-space
        latents, as here. The TAESD family reads the diffusion-space latents unchanged (the TAESD
        README: its latent scale factor is 1, not the VAE's); its diffusers configs say so with
        ``scaling_factor`` 1 and ``shift_factor`` 0 (TAEF1's config holds both; the TAESD3 model card
        sets ``pipe.vae.config.shift_factor = 0.0`` after loading, which is also ``AutoencoderTiny``'s
        default when a config has no such field).
        ``AutoencoderTiny.decode`` returns [-1, 1] (``DecoderTiny`` maps its [0, 1] output), mapped
        back to [0, 1] as the VAE's images are.
        """
        self._require_configured()
        decoder = self.preview_decoder
        if decoder is None:
            return self.decode(latents)
        cfg = decoder.config
        shift = cfg.shift_factor if getattr(cfg, "shift_factor", None) is not None else 0.0
        chunks = latents.split(self.decode_chunk) if self.decode_chunk else (latents,)
        images = []
        for part in chunks:  # a few calls, never one per sample
            z = part.float().to(decoder.device) / cfg.scaling_factor + shift  # [b, C, h, w]
            images.append(decoder.decode(z.to(decoder.dtype), return_dict=False)[0])  # [b, 3, H, W] in [-1, 1]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]

    # ---- loading helpers ----------------------------------------------------------------------
    def _load(self, cls: Any, subfolder: str, **kwargs: Any) -> Any:
        """``cls.from_pretrained(pretrained, subfolder=...)`` with an error that names the path."""
        try:
            return cls.from_pretrained(self.pretrained, subfolder=subfolder, revision=self.revision, **kwargs)
        except (OSError, ValueError) as err:
            where = os.path.join(str(self.pretrained), subfolder)
            raise FileNotFoundError(f"{type(self).__name__}: could not load {where!r} "
                                    f"({type(err).__name__}: {err})") from err

    def _load_tokenizer(self, cls: Any, subfolder: str, encoder_vocab_size: int) -> Any:
        """A tokenizer from ``subfolder``, refused when it cannot fit its encoder (``check_tokenizer_vocab``)."""
        tok = self._load(cls, subfolder)
        check_tokenizer_vocab(tok, encoder_vocab_size, os.path.join(str(self.pretrained), subfolder))
        return tok

    def extra_repr(self) -> str:
        return f"pretrained={self.pretrained!r}, " + super().extra_repr()
