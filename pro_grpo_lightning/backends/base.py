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
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..steps import StepOutput

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


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


#: ``pretrained`` values starting with this name a folder inside an installed Python package.
PACKAGE_SCHEME = "pkg://"


def resolve_pretrained_source(pretrained: str) -> str:
    """``pkg://<package>/<folder>`` -> that folder's path inside the installed package; else unchanged.

    So a config can point at weights shipped with a package (``pkg://pro_grpo_lightning/assets/
    tiny_shapes_sd3``) wherever the package is installed and whatever the working directory.
    """
    if not pretrained.startswith(PACKAGE_SCHEME):
        return pretrained
    package, _, folder = pretrained[len(PACKAGE_SCHEME):].partition("/")
    from importlib.resources import files

    try:
        root = files(package)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"pretrained={pretrained!r}: no installed package {package!r}") from None
    return str(root.joinpath(folder)) if folder else str(root)


def check_pretrained_source(pretrained: str, what: str = "pretrained") -> None:
    """Fail early, before any model loads, when weights cannot be found.

    A local folder must exist (``pkg://`` sources are resolved first, see
    ``resolve_pretrained_source``). Anything that is not an existing folder is taken as a hub id;
    with ``HF_HUB_OFFLINE=1`` it must already be in the local hub cache.
    """
    if pretrained.startswith(PACKAGE_SCHEME):
        path = resolve_pretrained_source(pretrained)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{what}={pretrained!r}: no such folder ({path})")
        return
    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        return
    looks_local = pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1 or os.sep == "\\" and "\\" in pretrained
    if looks_local:
        raise FileNotFoundError(
            f"{what}={pretrained!r}: no such folder. Point it at a local diffusers folder or a hub id.")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(pretrained, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means "not available offline"
            raise FileNotFoundError(
                f"{what}={pretrained!r} is not a local folder and is not in the hub cache, and "
                f"HF_HUB_OFFLINE=1 (this machine may be offline): download it first or give a "
                f"local folder. ({type(err).__name__})") from None


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
        if sde_window is not None:
            window = [int(v) for v in sde_window]
            if len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:
                raise ValueError(f"sde_window must be [start, end) with 0 <= start < end <= num_steps "
                                 f"({num_steps}), got {list(sde_window)}")
            sde_window = tuple(window)
        self.sde_window: tuple[int, int] | None = sde_window
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

    # ---- the five stages ---------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text embeddings, one row per prompt (no grad). CFG's negative is handled inside."""

    @abc.abstractmethod
    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Gaussian noise at the first noise level: [batch_size, *latent_shape], float32."""

    @abc.abstractmethod
    def step(self, latents: Tensor, step_index: Tensor, cond: Conditioning, *,
             generator: torch.Generator | None = None, next_latents: Tensor | None = None,
             ) -> StepOutput:
        """One stochastic step from noise level ``step_index`` to ``step_index + 1``.

        Runs the denoiser (with CFG) and the family's SDE step. With ``next_latents`` given, it
        re-scores that stored transition (same mean/std/log-prob code path) instead of sampling.
        Gradients flow to the LoRA parameters unless the caller disables them.
        """

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (clean, or an x0 preview) -> images [B, 3, H, W] float32 in [0, 1], no grad."""

    # ---- schedule ----------------------------------------------------------------------------
    @abc.abstractmethod
    def trainable_steps(self) -> Tensor:
        """[T] bool: steps whose log-prob is well defined for training (e.g. not a zero-std step)."""

    def window_steps(self) -> Tensor:
        """[T] bool on the CPU: steps inside ``sde_window`` (all True without one)."""
        inside = torch.ones(self.num_steps, dtype=torch.bool)  # [T]
        if self.sde_window is not None:
            start, end = self.sde_window
            inside[:start] = False
            inside[end:] = False
        return inside

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

    def latent_numel(self) -> int:
        """Elements per latent sample (for FLOP/memory estimates)."""
        return int(self.initial_latents(1).numel())

    def extra_repr(self) -> str:
        window = f", sde_window={list(self.sde_window)}" if self.sde_window is not None else ""
        return (f"num_steps={self.num_steps}, guidance_scale={self.guidance_scale}, "
                f"resolution={self.resolution}{window}")
