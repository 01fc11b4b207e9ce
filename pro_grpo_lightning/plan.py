"""A memory plan: will this config fit on this GPU, and if not, what to change first.

``python -m pro_grpo_lightning plan --config configs/X.yaml [--gpu-memory 24GB] [--json]``

No GPU and no weights are needed. The run is built from its YAML as ``fit`` builds it; every
network (denoiser, VAE, text encoders, reward models) is built on the ``meta`` device, from the
code that builds it (tiny models), from a local folder's ``config.json`` files, or from the
architecture numbers of ``architectures.py`` (hub ids), then turned into fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``): shapes, dtypes and devices without storage.
The library's own code then runs on them (``backend.step``, ``backend.decode``, the rewards, one
update minibatch with its backward), and ``LiveBytes``, a ``TorchDispatchMode``, adds up the bytes
of every storage an op creates and subtracts them when Python frees the storage: the peak of that
sum is the extra memory the call needs on top of what existed before (weights, stored rollout).

Checked against measurement (``tests/test_plan.py``): on the CPU the same calls on real weights,
measured by the allocator's own events (``torch.profiler`` memory events), peak within 2% of the
plan (+ 16 KiB) for the tiny models and the ``mini`` architectures. On a GPU the plan is an
estimate of
``torch.cuda.max_memory_allocated``: allocations are rounded to the CUDA caching allocator's 512 B
blocks, and ``RUNTIME_OVERHEAD`` (CUDA context, cuBLAS workspace, allocator fragmentation) is
added before comparing with ``--gpu-memory``. What is not modelled: Lightning's ``bf16-mixed``
autocast copies (the frozen weights are already bf16; only the small LoRA weights are cast), the
attention kernel's own workspace on GPU (the plan traces PyTorch's CPU flash-attention path,
which like the GPU flash / memory-efficient kernels never materialises the attention matrix).

Phases (each: resident weights + what lives through the phase + the call's transient peak):
    encode prompts         text encoders on the device (offloaded ones too, while they encode)
    rollout denoiser call  the stored trajectory so far + one denoiser call on ``sample_batch_size``
                           rows (CFG doubles the network batch inside the call)
    rollout previews       x0 previews decoded and scored (``sample_batch_size`` rows per decode and
                           per reward call, ``vae_decode_chunk`` per VAE call inside a decode)
    rollout final          final images decoded and scored (the same), survivors' trajectories gathered
    audit rollout          the same with the whole group alive (``audit_every_n_rollouts``)
    update minibatch       the stored rollout + LoRA gradients + forward and backward of
                           ``train_batch_size`` (trajectory, step) pairs (+ the reference forward
                           when ``kl_beta > 0``), with and without gradient checkpointing

The plan's cost is its traces (``Planner.traces`` counts them; each runs one library call op by op,
~0.1 ms per op), so every figure is made of a few small ones:

- rows: denoiser calls, update minibatches, decodes in one VAE call and reward calls are traced at
  1 and 2 rows and extrapolated linearly (``Planner._linear``: every activation is [batch, ...]),
  so every row count of the schedule and every chunk size a lever tries is free; a decode in
  ``vae_decode_chunk`` chunks is extrapolated in the number of chunks (``Planner.decode``), and a
  decode + reward split by ``sample_batch_size`` is assembled from those (``Planner.score``);
- depth: the denoiser's calls are traced on shallow copies of it, one block of every run of
  identical blocks (``block_stacks``: SD3.5-M's 13 + 10 + 1, FLUX's 19 double and 38 single
  blocks), then one more block of each run in turn, and extended to full depth
  (``Planner._deep``); a UNet has no such run and is traced whole;
- prompt encoding is traced once when the planner is built, and a reward's traceability is
  checked only when a trace fails.

Rows per denoiser, decode and reward call come from ``--sample-batch-size``, else the run's
``model.rollout.sample_batch_size`` (None: all live rows). A reward whose scoring branches on pixel values
cannot run on fake tensors: its activations are left out, with a note in the output.
Levers (``Planner.levers`` / ``advice``): each lever alone, then the ones to pull in order until
the peak fits, those that leave the results unchanged first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .networks import EMPTY, UnknownArchitecture, fake_tensors

GiB = 1024 ** 3
MiB = 1024 ** 2
#: CUDA caching allocator granularity (c10/cuda/CUDACachingAllocator.cpp ``kMinBlockSize``).
CUDA_BLOCK = 512
#: Added to the allocator peak before comparing with the GPU's memory: CUDA context (~0.3-0.6 GiB),
#: cuBLAS / attention workspaces, caching-allocator fragmentation. An assumption, not a measurement.
RUNTIME_OVERHEAD = int(1.5 * GiB)


# ---- the tracker -----------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive; ``peak`` is their maximum.

    Storages that existed before (weights, inputs) are not counted, nor are views and in-place
    results of them (an output sharing an input's storage allocates nothing). ``block`` rounds each
    allocation up (512 for the CUDA caching allocator, 1 for the CPU allocator). ``mark()`` starts a
    new segment: ``peaks[i]`` is the peak within segment i, ``starts[i]`` the live bytes when it began.

    It runs once per op of every trace, so it does as little as it can: outputs the op's schema
    marks as aliases of an input (views, in-place and ``out=`` ops) are skipped without looking at
    them, and a storage is known by its ``id`` while a weak reference to it is alive.
    """

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        self.current = 0
        self.peak = 0
        self.peaks: list[int] = [0]
        self.starts: list[int] = [0]
        self._live: dict[int, weakref.ref] = {}  # id(storage) -> its weak reference (callback: freed)

    def mark(self) -> None:
        """Start a new segment (its peak is counted from the bytes alive now)."""
        self.peaks.append(self.current)
        self.starts.append(self.current)

    def _freed(self, key: int, nbytes: int) -> None:
        self._live.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        fresh = _FRESH.get(func)
        if fresh is None:  # per return value: may it be a new storage (no alias annotation)?
            fresh = _FRESH[func] = tuple(r.alias_info is None for r in func._schema.returns)
        if not any(fresh):
            return out
        outs = (out,) if len(fresh) == 1 else out
        for o, new in zip(outs, fresh):
            if new:
                for t in (o if isinstance(o, (list, tuple)) else (o,)):
                    if isinstance(t, Tensor):
                        self._count(t, args)
        if self.current > self.peaks[-1]:
            self.peaks[-1] = self.current
            self.peak = max(self.peak, self.current)
        return out

    def _count(self, t: Tensor, args: tuple) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        # an op without an alias annotation may still return an input's storage (``_unsafe_view``)
        if any(isinstance(a, Tensor) and id(a.untyped_storage()) == key for a in args):
            return
        n = st.nbytes()
        n = -(-n // self.block) * self.block if n else 0
        self._live[key] = weakref.ref(st, lambda _r, key=key, n=n: self._freed(key, n))
        self.current += n


#: Per op (``OpOverload``): for each return value, whether it may be a fresh storage.
_FRESH: dict[Any, tuple[bool, ...]] = {}

#: The weights-table row of what the optimizer trains: the LoRA adapter, or the whole denoiser
#: with ``finetune: full`` (then its frozen copy, the KL reference, is the ``reference_denoiser`` row).
TRAINED = "LoRA adapter (fp32)"
TRAINED_FULL = "denoiser, fully fine-tuned"


def measured_peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """The allocator's peak during ``fn()`` above what was allocated before it, on real tensors.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the CPU allocator's events recorded by
    ``torch.profiler`` (``profile_memory=True``), summed in time order.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, n in events:
        current += n
        peak = max(peak, current)
    return peak


# ---- building without weights ------------------------------------------------------------------------
def build_run(config: str | Sequence[str], overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """(module, datamodule) of ``fit --config config`` (several: a base and its overlays, in order),
    nothing loaded (backends load lazily)."""
    from .cli import main
    from .loading import source_checks_skipped

    configs = [config] if isinstance(config, str) else list(config)
    with source_checks_skipped(), warnings.catch_warnings():
        # LightningCLI reads only ``args`` here, and warns when the process's own argv has more
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = main([a for c in configs for a in ("--config", c)] + list(overrides), run=False, save_config=False)
    return cli.model, cli.datamodule


def fake_backend(backend: Any, fake_mode: Any) -> None:
    """``configure_model()`` with every network empty on the meta device (``NetworkSource("empty")``:
    the adapter too), then all tensors fake (CPU)."""
    backend.use_networks(EMPTY)
    backend.configure_model()
    fake_tensors(backend, fake_mode)


def fake_reward(reward: Any, fake_mode: Any) -> None:
    """A reward configured with its declared architecture, empty (pretrained ones), or with its own
    networks (the rest), then faked."""
    reward.use_networks(EMPTY)
    reward.configure_model()
    fake_tensors(reward, fake_mode)


# ---- depth: stacks of identical blocks ---------------------------------------------------------------
def _signature(block: nn.Module) -> tuple:
    """What makes two blocks compute the same thing: class, parameter names, shapes and dtypes."""
    return (type(block).__name__,
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in block.named_parameters()))


def block_stacks(net: nn.Module) -> list[tuple[nn.Module, str, list[tuple[int, int]]]]:
    """The network's stacks of blocks: (owner, attribute, runs), one per ``nn.ModuleList`` child of
    ``net`` (a transformer's ``transformer_blocks``, FLUX's ``single_transformer_blocks``), where a
    run is a stretch of consecutive blocks of one signature, as (start, length). SD3.5-M's 24
    blocks are three runs (13 with dual attention, 10 without, the last one without a context
    output); a UNet's down and up blocks differ level by level (runs of one: nothing to extrapolate)."""
    out = []
    for attr, child in net.named_children():
        if not isinstance(child, nn.ModuleList) or len(child) < 2:
            continue
        runs: list[tuple[int, int]] = []
        last = None
        for i, block in enumerate(child):
            sig = _signature(block)
            if sig == last:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
            last = sig
        if any(n > 1 for _, n in runs):
            out.append((net, attr, runs))
    return out


# ---- the plan ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    """The levers: what the plan is computed for."""

    prompts_per_step: int
    sample_batch_size: int | None  # rows per denoiser, decode and reward call (None: all live rows at once)
    train_batch_size: int
    gradient_checkpointing: bool
    offload_text_encoders: bool
    vae_decode_chunk: int | None
    drop_t5: bool
    weight_bytes_scale: float = 1.0  # 0.5: frozen weights fp32 -> bf16 (the "dtype" lever)


@dataclasses.dataclass
class Phase:
    name: str
    resident: int
    persistent: int
    transient: int

    @property
    def peak(self) -> int:
        return self.resident + self.persistent + self.transient


@dataclasses.dataclass
class Lever:
    name: str
    change: str
    peak: int
    saving: int
    changes_results: bool


class Planner:
    """Measures the phases of one run on fake tensors; ``plan(settings)`` assembles them.

    Args:
        module: a ``ProGRPOModule`` built from a config (nothing loaded yet; it is configured here
            on fake tensors and is of no further use for training).
        prompts_per_step: P, prompts per rollout on one device.
        sample_batch_size: rows per denoiser, decode and reward call in the rollout (None: all live rows).
        prompt: a prompt of the run's task (task rewards may parse it).
        target: "cuda" (round allocations to CUDA blocks) or "cpu" (exact bytes).
    """

    def __init__(self, module: Any, prompts_per_step: int, target: str = "cuda",
                 sample_batch_size: int | None = None, prompt: str = "a photo of a cat") -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.module = module
        self.prompt = prompt  # every row's prompt (text is padded to fixed lengths: any prompt of the task)
        self.backend = module.backend
        self.block = CUDA_BLOCK if target == "cuda" else 1
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.notes: list[str] = []
        fake_backend(self.backend, self.fake_mode)
        self.rewards: list[Any] = []
        self.reward_bytes: dict[str, int] = {}
        for r in [*module.rewards.rewards, *module.eval_rewards]:
            try:
                fake_reward(r, self.fake_mode)
            except UnknownArchitecture as err:
                self.notes.append(str(err))
                continue
            self.reward_bytes[f"reward {r.name}"] = _module_bytes(r)
            if r in list(module.rewards.rewards):
                self.rewards.append(r)  # until a trace finds that it cannot score fake images
        b = self.backend
        self.schedule = module.schedule
        self.T = b.num_steps
        self.G = self.schedule.group_size
        self.K = self.schedule.final_size
        self.settings = Settings(
            prompts_per_step=prompts_per_step, sample_batch_size=sample_batch_size,
            train_batch_size=module.settings.train_batch_size,
            gradient_checkpointing=bool(getattr(b, "gradient_checkpointing", False)),
            offload_text_encoders=bool(getattr(b, "offload_text_encoders", False)),
            vae_decode_chunk=getattr(b, "vae_decode_chunk", None), drop_t5=bool(getattr(b, "drop_t5", False)))
        if self.settings.offload_text_encoders:  # the plan counts offloading itself: nothing moves
            b.set_offload_text_encoders(False)
        self.weights = self._weights()
        self._depth_setup()
        self._cache: dict[tuple, int] = {}
        self.image_row_bytes: dict[tuple[float, bool], int] = {}  # (preview_scale, preview) -> one image's bytes
        self.latent_row_bytes: dict[float, int] = {}  # preview_scale -> bytes of one latent decoded
        #: Fake-tensor traces run so far (each runs one library call op by op; the plan's cost).
        self.traces = 0
        self.cond1 = self._encode_one()  # {k: [1, ...]}
        self._cond: dict[int, dict[str, Tensor]] = {id(b): self.cond1}
        with self.fake_mode, torch.no_grad():
            self.latent_bytes = b.initial_latents(1).numel() * 4  # float32 latents
        side = b.resolution
        self.cond_row_bytes = sum(v[0].numel() * v.element_size() for v in self.cond1.values())
        self.image_bytes = 3 * side * side * 4  # float32 images in [0, 1]

    def _encode_one(self) -> dict[str, Tensor]:
        """The conditioning of one prompt, traced: it is also the plan's ``encode(1)``."""
        out: dict[str, Any] = {}

        def make() -> Callable[[], Any]:
            call = self.encode_call(1)
            return lambda: out.update(call())

        self._trace(("encode", 1), make)
        return out

    def _traceable(self, reward: Any) -> bool:
        """Whether ``reward`` scores fake images (a reward whose control flow reads pixel values,
        e.g. a loop until convergence, cannot): otherwise its activations are left out, with a note."""
        side = self.backend.resolution
        try:
            with self.fake_mode, torch.no_grad():
                reward(torch.zeros(1, 3, side, side), [self.prompt])
        except Exception as err:  # noqa: BLE001 - fake tensors refuse data-dependent ops in many ways
            self.notes.append(f"reward {reward.name}: activations not estimated (its scoring reads pixel "
                              f"values: {type(err).__name__}); its weights are counted")
            return False
        return True

    # ---- weights -------------------------------------------------------------------------------
    def _weights(self) -> dict[str, int]:
        """Bytes by component: frozen networks in their dtype, the LoRA adapter (fp32)."""
        out: dict[str, int] = {}
        lora = 0
        for name, child in self.backend.named_children():
            frozen = sum(_nbytes(p) for p in child.parameters() if not p.requires_grad)
            frozen += sum(_nbytes(t) for t in child.buffers())
            lora += sum(_nbytes(p) for p in child.parameters() if p.requires_grad)
            if frozen:
                out[name] = frozen
        if getattr(self.backend, "finetune", "lora") == "full":  # the denoiser itself trains, in its dtype
            out[TRAINED_FULL] = lora
            out["AdamW state (2 per trained weight, its dtype)"] = 2 * lora
            return out
        out[TRAINED] = lora
        out["AdamW state (2 x fp32 per LoRA weight)"] = 2 * lora
        return out

    def text_encoder_names(self) -> list[str]:
        return [n for n in self.weights if n.startswith("text_encoder")]

    # ---- depth ---------------------------------------------------------------------------------
    def _depth_setup(self) -> None:
        """The denoiser's stacks (``block_stacks``) and the shallow copies its calls are traced at.

        ``depth_base`` keeps one block of every run; each of ``depth_steps`` adds a second block to
        one run, with the number of blocks that run has beyond its first. A call's figure at full
        depth is then ``base + sum(extra * (step - base))`` (``_deep``): each block of a run adds
        the same stored activations (without gradient checkpointing everything its backward
        needs, with it only its input), and the peak's transient, one block's working set on top
        of what is stored, is in every shallow trace, at the same place as at full depth (the
        top block, the same in every copy). Without grad nothing is stored: the steps add 0."""
        nets = [self.backend.denoiser()]
        ref = getattr(self.backend, "reference_denoiser", None)
        if ref is not None:  # fully fine-tuned: the KL reference is a frozen copy of the same stack
            nets.append(ref)
        self.stacks = [st for net in nets for st in block_stacks(net)]
        n = len(block_stacks(nets[0]))
        base = [tuple(start for start, _ in runs) for _, _, runs in self.stacks[:n]]
        self.depth_base: tuple | None = None
        self.depth_steps: list[tuple[tuple, int]] = []
        if not base:
            return
        self.depth_base = tuple(base)
        for i, (_, _, runs) in enumerate(self.stacks[:n]):
            for j, (start, length) in enumerate(runs):
                if length > 1:
                    deeper = list(base)
                    deeper[i] = base[i][:j + 1] + (start + 1,) + base[i][j + 1:]
                    self.depth_steps.append((tuple(deeper), length - 1))

    @contextlib.contextmanager
    def _at_depth(self, depth: tuple | None):  # noqa: ANN202
        """The denoiser (and its reference copy) with only the blocks ``depth`` names (None: all)."""
        if depth is None:
            yield
            return
        n = len(depth)
        saved = []
        for k, (owner, attr, _) in enumerate(self.stacks):
            blocks = owner.get_submodule(attr)
            saved.append((owner, attr, blocks))
            owner.register_module(attr, nn.ModuleList([blocks[i] for i in depth[k % n]]))  # same place
        try:
            yield
        finally:
            for owner, attr, blocks in saved:
                owner.register_module(attr, blocks)

    def _deep(self, measure: Callable[[tuple | None], int]) -> int:
        """``measure`` of the full-depth denoiser from its shallow copies (see ``_depth_setup``)."""
        if self.depth_base is None:
            return measure(None)
        base = measure(self.depth_base)
        return base + sum(extra * (measure(depth) - base) for depth, extra in self.depth_steps)

    # ---- measured calls (cached) -------------------------------------------------------------
    def _trace(self, key: tuple, make: Callable[[], Callable[[], Any]], grad: bool = False,
               depth: tuple | None = None) -> int:
        key = (*key, depth)
        if key not in self._cache:
            self.traces += 1
            with self.fake_mode, self._at_depth(depth):
                fn = make()  # inputs: created before tracking (counted as persistent, not transient)
                tracker = LiveBytes(self.block)
                with torch.set_grad_enabled(grad), tracker:
                    fn()
            self._cache[key] = tracker.peak
        return self._cache[key]

    def _rows(self, n: int, backend: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if id(backend) not in self._cond:
            with torch.no_grad():
                self._cond[id(backend)] = backend.encode_prompts([self.prompt])  # {k: [1, ...]}
        cond1 = self._cond[id(backend)]
        x = backend.initial_latents(n)  # [n, *latent]
        cond = {k: v.expand(n, *v.shape[1:]).clone() for k, v in cond1.items()}  # [n, ...]
        return x, cond

    def denoise_call(self, rows: int, backend: Any = None) -> Callable[[], Any]:
        """One sampling call ``backend.step`` on ``rows`` samples (run it without grad)."""
        backend = backend or self.backend
        x, cond = self._rows(rows, backend)
        idx = torch.zeros(rows, dtype=torch.long, device=x.device)
        return lambda: backend.step(x, idx, cond)

    def encode_call(self, prompts: int, backend: Any = None) -> Callable[[], Any]:
        backend = backend or self.backend
        texts = [self.prompt] * prompts
        return lambda: backend.encode_prompts(texts)

    def score_call(self, rows: int, chunk: int | None, preview_scale: float = 1.0, backend: Any = None,
                   rewards: Sequence[Any] | None = None, sample_batch_size: int | None = None,
                   preview: bool = False) -> Callable[[], Any]:
        """Decode ``rows`` latents and score the images with every reward, as the rollout does:
        ``sample_batch_size`` rows per decode call (its outputs concatenated) and per reward call,
        ``chunk`` (``vae_decode_chunk``) latents per VAE call inside the decode; ``preview``: with
        the backend's preview decoder (``decode_preview``), as the rollout's previews."""
        from .rollout import chunked

        backend = backend or self.backend
        rewards = self.rewards if rewards is None else rewards
        x = backend.initial_latents(rows)
        texts = [self.prompt] * rows
        m = rows if sample_batch_size is None else min(sample_batch_size, rows)

        def run():
            z = x
            if preview_scale < 1.0 and z.ndim == 4:  # as ExpandPruneRollout.preview_images
                z = torch.nn.functional.interpolate(z, scale_factor=preview_scale, mode="bilinear", antialias=True)
            backend.set_decode_batch_size(chunk)
            decode = backend.decode_preview if preview else backend.decode
            images = chunked(decode, rows, m, z)  # [rows, 3, H, W]
            for r in rewards:  # as RewardSet.forward with chunk=sample_batch_size
                if m < rows:
                    torch.cat([r(images[i:i + m], texts[i:i + m]) for i in range(0, rows, m)])
                else:
                    r(images, texts)
        return run

    def decode_call(self, rows: int, chunk: int | None, preview_scale: float = 1.0,
                    preview: bool = False) -> Callable[[], Any]:
        """One ``backend.decode`` (``preview``: ``decode_preview``) of ``rows`` latents, ``chunk`` per
        VAE call (its output is counted)."""
        backend = self.backend
        x = backend.initial_latents(rows)
        if preview_scale < 1.0 and x.ndim == 4:
            x = torch.nn.functional.interpolate(x, scale_factor=preview_scale, mode="bilinear", antialias=True)
        self.latent_row_bytes[preview_scale] = x[0].numel() * x.element_size()
        decode = backend.decode_preview if preview else backend.decode

        def run():
            backend.set_decode_batch_size(chunk)
            images = decode(x)  # [rows, 3, H, W]
            self.image_row_bytes[preview_scale, preview] = images[0].numel() * images.element_size()
        return run

    def reward_call(self, rows: int, preview_scale: float = 1.0, preview: bool = False) -> Callable[[], Any]:
        """Every reward on ``rows`` decoded images (created before the call: not counted)."""
        side = self.decoded_side(preview_scale, preview)
        images = torch.zeros(rows, 3, side, side)  # [rows, 3, H, W]
        texts = [self.prompt] * rows
        rewards = list(self.rewards)

        def run():
            for r in rewards:
                r(images, texts)
        return run

    def update_call(self, batch: int, checkpointing: bool, backend: Any = None) -> Callable[[], Any]:
        """One update minibatch as ``update.grpo_update`` runs it: policy forward with grad, the
        reference forward when ``kl_beta > 0``, the PPO loss, backward (gradients dropped after)."""
        from .objectives import flow_grpo_kl, gaussian_kl, output_kl, ppo_clip_loss

        backend = backend or self.backend
        s = self.module.settings
        net = backend.denoiser()
        x, cond = self._rows(batch, backend)
        x_next = backend.initial_latents(batch)
        st = torch.full((batch,), min(1, self.T - 1), dtype=torch.long, device=x.device)
        old = torch.zeros(batch, device=x.device)
        adv = torch.ones(batch, device=x.device)

        def run():
            if checkpointing:  # set here, not when the call is built: builders may run ahead
                net.enable_gradient_checkpointing()
            else:
                net.disable_gradient_checkpointing()
            net.train()
            out = backend.step(x, st, cond, next_latents=x_next)
            loss, _ = ppo_clip_loss(out.log_prob, old, adv, s.clip_range)
            if s.kl_beta > 0:
                with torch.no_grad(), backend.reference():
                    ref = backend.step(x, st, cond, next_latents=x_next)
                if s.kl_type == "exact":
                    kl = gaussian_kl(out.mean, ref.mean, out.std)
                elif s.kl_type == "flow_grpo":
                    kl = flow_grpo_kl(out.mean, ref.mean, backend.kl_std(st))
                else:
                    kl = output_kl(out.model_output, ref.model_output)
                loss = loss + s.kl_beta * kl.mean()
            loss.backward()
            net.zero_grad(set_to_none=True)  # gradients are counted with the resident part
        return run

    def _linear(self, measure: Callable[[int], int], rows: int) -> int:
        """``measure`` at ``rows`` from its values at 1 and 2 rows: every activation of a denoiser
        call is [batch, ...] (CFG concatenates along the batch), so its peak is a + b * rows
        (checked against direct traces and measurements in tests/test_plan.py). Two traces then
        serve every chunk size the levers try."""
        one, two = measure(1), measure(2)
        return one + (two - one) * (rows - 1)

    def denoise(self, rows: int) -> int:
        """Transient of one sampling call ``backend.step`` on ``rows`` samples (no grad)."""
        return self._linear(lambda n: self._deep(lambda d: self.denoise_traced(n, d)), rows)

    def update(self, batch: int, checkpointing: bool) -> int:
        """Transient of one update minibatch of ``batch`` pairs (see ``update_call``)."""
        return self._linear(lambda n: self._deep(lambda d: self.update_traced(n, checkpointing, d)), batch)

    def denoise_traced(self, rows: int, depth: tuple | None = None) -> int:
        """One sampling call traced as it runs (``depth`` None: the whole denoiser)."""
        return self._trace(("denoise", rows), lambda: self.denoise_call(rows), depth=depth)

    def encode(self, prompts: int) -> int:
        return self._trace(("encode", prompts), lambda: self.encode_call(prompts))

    def _previews_differ(self, preview: bool) -> bool:
        """Whether ``preview`` decodes differ from ``decode``'s: only with a preview decoder (else the
        preview and final decodes are one cached trace)."""
        return preview and getattr(self.backend, "preview_decoder", None) is not None

    def decoded_side(self, preview_scale: float = 1.0, preview: bool = False) -> int:
        """Side of a decoded image (previews at ``preview_scale`` are smaller), from a decode of 1 row."""
        preview = self._previews_differ(preview)
        if (preview_scale, preview) not in self.image_row_bytes:
            self.decode(1, None, preview_scale, preview)
        return int(round((self.image_row_bytes[preview_scale, preview] / 12) ** 0.5))  # 3 float32 channels

    def decode(self, rows: int, chunk: int | None, preview_scale: float = 1.0, preview: bool = False) -> int:
        """Transient of one ``backend.decode`` of ``rows`` latents, ``chunk`` per VAE call, its
        images included. In one VAE call every activation is [rows, ...]: linear in rows
        (``_linear``). In ``q`` chunks and a last one of ``r`` rows (1 <= r <= chunk), each chunk
        adds the same (its images, kept for the final ``torch.cat``): linear in ``q`` from the
        traces at ``chunk + r`` and ``2 * chunk + r`` rows, so the levers' chunked decodes of many
        rows cost two traces of two and three VAE calls."""
        preview = self._previews_differ(preview)
        if chunk is None or chunk >= rows:
            return self._linear(lambda n: self._trace(("decode", n, None, preview_scale, preview),
                                                      lambda: self.decode_call(n, None, preview_scale, preview)),
                                rows)
        q, r = divmod(rows - 1, chunk)  # rows = q * chunk + (r + 1)
        r += 1

        def traced(k: int) -> int:
            n = k * chunk + r
            return self._trace(("decode", n, chunk, preview_scale, preview),
                               lambda: self.decode_call(n, chunk, preview_scale, preview))

        return traced(1) + (q - 1) * (traced(2) - traced(1)) if q > 1 else traced(q)

    def reward(self, rows: int, preview_scale: float = 1.0, preview: bool = False) -> int:
        """Transient of every reward on ``rows`` images (linear in rows: ``_linear``)."""
        preview = self._previews_differ(preview)
        def traced(n: int) -> int:
            key = ("reward", n, preview_scale, preview)
            try:
                return self._trace(key, lambda: self.reward_call(n, preview_scale, preview))
            except Exception:  # a reward that cannot score fake images: find it, leave it out, trace again
                kept = [rw for rw in self.rewards if self._traceable(rw)]
                if len(kept) == len(self.rewards):
                    raise
                self.rewards = kept
                return self._trace(key, lambda: self.reward_call(n, preview_scale, preview))
        return self._linear(traced, rows)

    def score(self, rows: int, chunk: int | None, preview_scale: float = 1.0,
              sample_batch_size: int | None = None, preview: bool = False) -> int:
        """Transient of decoding ``rows`` latents and scoring the images as the rollout does
        (``score_call``): ``sample_batch_size`` rows per ``decode`` and per reward call. The decodes'
        images accumulate for the final ``torch.cat`` (2 x the images at its end); the rewards then
        run on slices of the images, one slice at a time. Previews (``preview_scale`` < 1) are
        decoded from resized latents, alive through the decodes."""
        m = rows if sample_batch_size is None else min(sample_batch_size, rows)
        preview = self._previews_differ(preview)
        self.decoded_side(preview_scale, preview)
        img = self.image_row_bytes[preview_scale, preview]  # one decoded image, float32
        if m == rows:
            dec = self.decode(rows, chunk, preview_scale, preview)
        else:
            q, r = divmod(rows, m)  # q calls of m rows, a last one of r
            dec = max((q - 1) * m * img + self.decode(m, chunk, preview_scale, preview), 2 * rows * img)
            if r:
                dec = max(dec, q * m * img + self.decode(r, chunk, preview_scale, preview))
        if preview_scale < 1.0:
            dec += rows * self.latent_row_bytes[preview_scale]
        return max(dec, rows * img + self.reward(m, preview_scale, preview))

    def score_traced(self, rows: int, chunk: int | None, preview_scale: float = 1.0,
                     sample_batch_size: int | None = None, preview: bool = False) -> int:
        """``score_call`` traced as it runs (a check of ``score``)."""
        key = ("score", rows, chunk, preview_scale, sample_batch_size, preview)
        return self._trace(key, lambda: self.score_call(rows, chunk, preview_scale,
                                                        sample_batch_size=sample_batch_size, preview=preview))

    def update_traced(self, batch: int, checkpointing: bool, depth: tuple | None = None) -> int:
        """One update minibatch traced as it runs (``depth`` None: the whole denoiser)."""
        return self._trace(("update", batch, checkpointing), lambda: self.update_call(batch, checkpointing),
                           grad=True, depth=depth)

    # ---- assembling ----------------------------------------------------------------------------
    def resident(self, st: Settings, offloaded: bool = True) -> int:
        """Bytes on the device for the whole run: frozen weights, LoRA, its AdamW state, rewards."""
        total = 0
        for name, n in self.weights.items():
            if name.startswith("text_encoder"):
                if name == "text_encoder_3" and st.drop_t5:
                    continue
                if st.offload_text_encoders and offloaded:
                    continue
            if name.startswith(("LoRA", "AdamW")):
                total += n
            else:
                total += int(n * st.weight_bytes_scale)
        return total + sum(int(n * st.weight_bytes_scale) for n in self.reward_bytes.values())

    def live_rows(self, P: int, audit: bool) -> list[int]:
        """Live rows at each of the T denoiser calls."""
        if audit:
            return [P * self.G] * self.T
        return [P * g for g in self.schedule.group_sizes_per_step(self.T)]

    def mean_bytes(self) -> int:
        """Bytes per row and step of the recorded step means (GRPO-Guard's ``update.ratio_norm``
        makes the rollout keep them, ``RolloutResult.means``): one latent, else nothing."""
        return self.latent_bytes if self.module.rollout.record_means else 0

    def rollout_phases(self, st: Settings, audit: bool) -> list[Phase]:
        P, T, L, M = st.prompts_per_step, self.T, self.latent_bytes, self.mean_bytes()
        rows = self.live_rows(P, audit)
        res = self.resident(st)
        tag = "audit rollout" if audit else "rollout"
        phases: list[Phase] = []
        history = rows[0] * L  # x_T of every row
        keep_at = dict(zip(self.schedule.checkpoints, self.schedule.keep))
        best: Phase | None = None
        for t in range(T):
            chunk = rows[t] if st.sample_batch_size is None else min(st.sample_batch_size, rows[t])
            persistent = history + rows[t] * self.cond_row_bytes
            ph = Phase(f"{tag}: denoiser call, {chunk} of {rows[t]} rows", res, persistent, self.denoise(chunk))
            if best is None or ph.peak > best.peak:
                best = ph
            history += rows[t] * (L + 4 + M)  # x_{t+1} [B, *latent] float32, log-prob [B] (, mean)
            if t in keep_at and self.schedule.rule not in ("none", "random"):
                scale = self.module.rollout_settings.preview_scale
                phases.append(Phase(f"{tag}: previews after step {t}, {rows[t]} rows", res,
                                    history + rows[t] * (self.cond_row_bytes + L),  # + the step's x0
                                    self.score(rows[t], st.vae_decode_chunk, scale, st.sample_batch_size,
                                               preview=True)))
        phases.insert(0, best)
        final = rows[-1]
        survivors = P * self.K
        result = survivors * ((T + 1) * L + T * M + 4 * T + self.image_bytes)
        phases.append(Phase(f"{tag}: final decode + reward, {final} rows", res,
                            history + final * self.cond_row_bytes,
                            self.score(final, st.vae_decode_chunk, 1.0, st.sample_batch_size)))
        phases.append(Phase(f"{tag}: gather survivors ({survivors} trajectories)", res,
                            history + final * self.image_bytes, result))
        return phases

    def update_phase(self, st: Settings) -> Phase:
        P, T, L = st.prompts_per_step, self.T, self.latent_bytes
        N = P * self.K
        result = N * ((T + 1) * L + T * self.mean_bytes() + 4 * T + self.image_bytes) + P * self.cond_row_bytes
        lora = self.weights.get(TRAINED, self.weights.get(TRAINED_FULL, 0))  # its gradients
        b = st.train_batch_size
        ckpt = "with" if st.gradient_checkpointing else "without"
        return Phase(f"update: minibatch of {b}, {ckpt} gradient checkpointing", self.resident(st),
                     result + lora, self.update(b, st.gradient_checkpointing))

    def plan(self, st: Settings | None = None) -> list[Phase]:
        st = st or self.settings
        res_no_offload = self.resident(st, offloaded=False)
        phases = [Phase(f"encode {st.prompts_per_step} prompts", res_no_offload, 0,
                        self.encode(st.prompts_per_step))]
        phases += self.rollout_phases(st, audit=False)
        if self.module.rollout_settings.audit_every_n_rollouts > 0 and self.G != self.K:
            phases += self.rollout_phases(st, audit=True)
        phases.append(self.update_phase(st))
        return phases

    def peak(self, st: Settings | None = None) -> int:
        return max(p.peak for p in self.plan(st))

    # ---- levers --------------------------------------------------------------------------------
    def levers(self, st: Settings | None = None) -> list[Lever]:
        """Each lever alone, from ``st``: the new peak and the saving, largest saving first."""
        st = st or self.settings
        base = self.peak(st)
        rows0 = st.prompts_per_step * self.G
        current = rows0 if st.sample_batch_size is None else min(st.sample_batch_size, rows0)
        options: list[tuple[str, str, dict[str, Any], bool]] = []
        if st.train_batch_size > 1:
            tb = max(1, st.train_batch_size // 4)
            options.append(("train_batch_size", f"model.update.train_batch_size: {tb}", {"train_batch_size": tb}, False))
        if not st.gradient_checkpointing:
            options.append(("gradient_checkpointing", "model.backend.init_args.gradient_checkpointing: true",
                            {"gradient_checkpointing": True}, False))
        offloadable = hasattr(self.backend, "offload_text_encoders") and self.text_encoder_names()
        if offloadable and not st.offload_text_encoders:
            options.append(("offload_text_encoders", "model.backend.init_args.offload_text_encoders: true",
                            {"offload_text_encoders": True}, False))
        if st.vae_decode_chunk is None or st.vae_decode_chunk > 4:
            options.append(("vae_decode_chunk", "model.backend.init_args.vae_decode_chunk: 4",
                            {"vae_decode_chunk": 4}, False))
        # after vae_decode_chunk: on a tie (both split the decodes) the one that leaves the denoiser
        # and reward calls whole, which costs less time, comes first
        smaller = self.G if current > self.G else max(1, current // 2)
        if smaller < current:
            options.append(("sample_batch_size", f"model.rollout.sample_batch_size: {smaller} (rows per denoiser, "
                            "decode and reward call)", {"sample_batch_size": smaller}, False))
        if "text_encoder_3" in self.weights and not st.drop_t5:
            options.append(("drop_t5", "model.backend.init_args.drop_t5: true (T5 tokens become zeros: "
                            "changes the model's conditioning)", {"drop_t5": True}, True))
        if st.prompts_per_step > 1:
            options.append(("prompts_per_step", "data.prompts_per_step: 1 (fewer groups per rollout)",
                            {"prompts_per_step": 1}, True))
        if self.backend.weight_dtype == torch.float32 and st.weight_bytes_scale == 1.0:
            options.append(("dtype", "model.backend.init_args.dtype: bfloat16 (weights only; activations not "
                            "re-measured)", {"weight_bytes_scale": 0.5}, True))
        out = []
        for name, change, kw, changes in options:
            peak = self.peak(dataclasses.replace(st, **kw))
            out.append(Lever(name, change, peak, base - peak, changes))
        return sorted(out, key=lambda lv: -lv.saving)

    def advice(self, budget: int) -> list[Lever]:
        """Levers to pull in order until the peak fits ``budget`` (bytes, overhead excluded):
        result-neutral levers first, each time the one saving most; [] when it already fits."""
        st = self.settings
        chosen: list[Lever] = []
        while self.peak(st) > budget:
            used = {lv.name for lv in chosen}  # each lever once
            levers = [lv for lv in self.levers(st) if lv.saving > 0 and lv.name not in used]
            if not levers:
                break
            neutral = [lv for lv in levers if not lv.changes_results]
            pick = (neutral or levers)[0]
            chosen.append(pick)
            st = dataclasses.replace(st, **_lever_kwargs(pick, st, self))
        return chosen


def _lever_kwargs(lever: Lever, st: Settings, planner: Planner) -> dict[str, Any]:
    rows0 = st.prompts_per_step * planner.G
    current = rows0 if st.sample_batch_size is None else min(st.sample_batch_size, rows0)
    return {"sample_batch_size": {"sample_batch_size": planner.G if current > planner.G else max(1, current // 2)},
            "train_batch_size": {"train_batch_size": max(1, st.train_batch_size // 4)},
            "gradient_checkpointing": {"gradient_checkpointing": True},
            "offload_text_encoders": {"offload_text_encoders": True},
            "vae_decode_chunk": {"vae_decode_chunk": 4},
            "drop_t5": {"drop_t5": True},
            "prompts_per_step": {"prompts_per_step": 1},
            "dtype": {"weight_bytes_scale": 0.5}}[lever.name]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _module_bytes(m: nn.Module) -> int:
    return sum(_nbytes(p) for p in m.parameters()) + sum(_nbytes(b) for b in m.buffers())


# ---- the command -----------------------------------------------------------------------------------
def parse_memory(text: str) -> int:
    """"24GB", "24 GiB", "40g", "81559MiB" -> bytes. GB and GiB both mean 2**30 (GPU cards are sold
    in GiB-sized memories: a "24 GB" card has 24 GiB)."""
    s = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gib", GiB), ("gb", GiB), ("g", GiB), ("mib", MiB), ("mb", MiB), ("m", MiB)):
        if s.endswith(suffix):
            try:
                return int(float(s[: -len(suffix)]) * mult)
            except ValueError:
                break
    raise ValueError(f"--gpu-memory: cannot read {text!r}; write e.g. 24GB, 40GiB or 81559MiB")


_UNIT = {"GiB": GiB, "MiB": MiB}


def _fmt(n: int, unit: str) -> str:
    return f"{n / _UNIT[unit]:7.2f}"


def report(config: str | Sequence[str], gpu_memory: int | None = None, overrides: Sequence[str] = (),
           sample_batch_size: int | None = None, target: str = "cuda") -> dict[str, Any]:
    """The plan of ``config`` as a dict (what ``--json`` prints)."""
    module, datamodule = build_run(config, overrides)
    sbs = sample_batch_size if sample_batch_size is not None else module.rollout_settings.sample_batch_size
    first = datamodule.prompts[0]
    prompt = first if isinstance(first, str) else str(getattr(first, "prompt", first))
    planner = Planner(module, datamodule.prompts_per_step, target=target, sample_batch_size=sbs, prompt=prompt)
    st = planner.settings
    phases = planner.plan(st)
    other = dataclasses.replace(st, gradient_checkpointing=not st.gradient_checkpointing)
    peak = max(p.peak for p in phases)
    out: dict[str, Any] = {
        "config": config if isinstance(config, str) else " ".join(config), "target": target, "settings": dataclasses.asdict(st),
        "weights": {**planner.weights, **planner.reward_bytes},
        "resident": planner.resident(st),
        "phases": [dict(dataclasses.asdict(p), peak=p.peak) for p in phases],
        "update_other_checkpointing": dict(dataclasses.asdict(planner.update_phase(other)),
                                           peak=planner.update_phase(other).peak),
        "peak": peak, "overhead": RUNTIME_OVERHEAD if target == "cuda" else 0,
        "levers": [dataclasses.asdict(lv) for lv in planner.levers(st)],
        "notes": planner.notes,
        "traces": planner.traces,  # fake-tensor traces the plan ran (its cost)
    }
    if gpu_memory is not None:
        budget = gpu_memory - out["overhead"]
        out["gpu_memory"] = gpu_memory
        out["fits"] = peak <= budget
        out["advice"] = [dataclasses.asdict(lv) for lv in planner.advice(budget)]
    return out


def format_report(r: dict[str, Any]) -> str:
    unit = "GiB" if r["peak"] >= GiB else "MiB"

    def _gib(n: int) -> str:
        return _fmt(n, unit)

    lines = [f"Memory plan for {r['config']} (estimates in {unit}; {r['target']} allocator peak, no weights loaded)",
             ""]
    st = r["settings"]
    rows = "all live rows" if st["sample_batch_size"] is None else str(st["sample_batch_size"])
    lines.append(f"settings: prompts_per_step {st['prompts_per_step']}, "
                 f"rows per denoiser / decode / reward call {rows}, "
                 f"train_batch_size {st['train_batch_size']}, gradient_checkpointing "
                 f"{st['gradient_checkpointing']}, offload_text_encoders {st['offload_text_encoders']}, "
                 f"vae_decode_chunk {st['vae_decode_chunk']}")
    lines += ["", f"weights by component{unit:>35}"]
    offloaded = st["offload_text_encoders"]
    for name, n in r["weights"].items():
        where = " (offloaded to CPU)" if offloaded and name.startswith("text_encoder") else ""
        lines.append(f"  {name + where:<48}{_gib(n)}")
    lines.append(f"  {'resident on the device':<48}{_gib(r['resident'])}")
    lines += ["", f"{'phase':<64}{'resident':>9}{'stored':>9}{'call':>9}{'peak':>9}"]
    for p in r["phases"]:
        lines.append(f"  {p['name']:<62}{_gib(p['resident'])}  {_gib(p['persistent'])}  "
                     f"{_gib(p['transient'])}  {_gib(p['peak'])}")
    o = r["update_other_checkpointing"]
    lines.append(f"  ({o['name']}: peak {_gib(o['peak']).strip()})")
    lines += ["", f"peak: {_gib(r['peak']).strip()} {unit}" + (
        f" + {r['overhead'] / GiB:.1f} GiB runtime overhead (CUDA context, workspaces, fragmentation)"
        if r["overhead"] else "")]
    if "gpu_memory" in r:
        total = r["peak"] + r["overhead"]
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"{total / GiB:.2f} GiB on a {r['gpu_memory'] / GiB:.0f} GiB GPU: {verdict}")
        if r["advice"]:
            lines.append("pull, in this order:")
            for lv in r["advice"]:
                lines.append(f"  {lv['change']}  -> peak {_gib(lv['peak']).strip()} {unit} "
                             f"(saves {_gib(lv['saving']).strip()})")
        elif not r["fits"]:
            lines.append("no lever brings it under the GPU's memory: use a larger GPU or shard (FSDP)")
    lines += ["", "each lever alone (saving on the peak):"]
    for lv in r["levers"]:
        flag = "  [changes results]" if lv["changes_results"] else ""
        lines.append(f"  {lv['change']:<78}{_gib(lv['saving'])} {unit}{flag}")
    for note in r["notes"]:
        lines.append(f"note: {note}")
    if r["target"] == "cuda":
        lines.append(f"note: {allocator_note()}")
    return "\n".join(lines)


def allocator_note() -> str:
    """What "fits" means against a card: the plan estimates the allocator's *allocated* peak; what the
    card must hold is what PyTorch's caching allocator *reserves* (cached free blocks, fragmentation)
    plus the runtime overhead. Measured reserved / allocated peaks: docs/results/gpu_memory."""
    return ("the peak is what PyTorch allocates; its caching allocator reserves more (cached blocks, "
            "fragmentation: SD3.5-M's reserved peak was well above its allocated one on a GPU, "
            "docs/results/gpu_memory). On a card with little headroom set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which PyTorch provides to reduce fragmentation")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pro_grpo_lightning plan",
        description="Expected peak GPU memory of a config, per phase, without a GPU or weights; "
                    "extra arguments (e.g. --model.update.train_batch_size 2) override the config as in `fit`.")
    parser.add_argument("--config", required=True, action="append",
                        help="the run's YAML, as given to `fit` (repeatable: a base config, then its overlay)")
    parser.add_argument("--gpu-memory", default=None, help="e.g. 24GB: say whether it fits and what to change")
    parser.add_argument("--sample-batch-size", type=int, default=None,
                        help="rows per denoiser, decode and reward call in the rollout "
                             "(default: the config's, else all rows)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = parser.parse_known_args(argv)
    gpu = parse_memory(args.gpu_memory) if args.gpu_memory else None
    try:
        r = report(args.config[0] if len(args.config) == 1 else args.config, gpu, overrides, args.sample_batch_size)
    except UnknownArchitecture as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0
