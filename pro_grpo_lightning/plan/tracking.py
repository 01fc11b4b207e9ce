"""Counting bytes: fake-tensor traces (``LiveBytes``), the CPU / CUDA allocator's own peak
(``measured_peak_bytes``), building a run without weights (``build_run``, ``fake_backend``,
``fake_reward``: the library's ``NetworkSource("empty")``, then fake tensors) and the denoiser's
stacks of identical blocks (``block_stacks``, ``Depth``), which let a shallow copy stand for the
full depth."""

from __future__ import annotations

import bisect
import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..networks import EMPTY, fake_tensors

GiB = 1024 ** 3
MiB = 1024 ** 2
#: CUDA caching allocator granularity (c10/cuda/CUDACachingAllocator.cpp ``kMinBlockSize``).
CUDA_BLOCK = 512


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

    def __init__(self, block: int = 1, workspace: CpuWorkspace | None = None) -> None:
        super().__init__()
        self.block = block
        self.workspace = workspace  # what ops hold inside themselves (``CpuWorkspace``; ``settle()``)
        self.current = 0
        self.peak = 0
        self.peaks: list[int] = [0]
        self.starts: list[int] = [0]
        self._live: dict[int, weakref.ref] = {}  # id(storage) -> its weak reference (callback: freed)
        self._inside: list[tuple[int, int, tuple]] = []  # (segment, bytes alive with its outputs, op's key)
        self.tensor_peak = 0  # ``settle()``: the peak of what ops return alone ...
        self.inside_peak = 0  # ... and the peak inside the ops that hold a workspace

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
        if self.workspace is not None:  # inside the op, with its outputs: a peak, nothing kept
            key = self.workspace.key(func, args, kwargs or {})
            if key is not None:
                self._count_outputs(out, fresh, args)
                self._inside.append((len(self.peaks) - 1, self.current, key))
        if not any(fresh):
            return out
        self._count_outputs(out, fresh, args)
        if self.current > self.peaks[-1]:
            self.peaks[-1] = self.current
            self.peak = max(self.peak, self.current)
        return out

    def settle(self) -> None:
        """After the trace: the workspace of the ops that hold one (measured now, all at once) added
        to the bytes alive at each, into the peaks."""
        self.tensor_peak = self.peak
        if not self._inside:
            return
        size = self.workspace.measure({key for _, _, key in self._inside})
        for segment, alive, key in self._inside:
            self.peaks[segment] = max(self.peaks[segment], alive + size[key])
            self.inside_peak = max(self.inside_peak, alive + size[key])
        self.peak = max(self.peak, *self.peaks)
        self._inside.clear()

    def _count_outputs(self, out: Any, fresh: tuple[bool, ...], args: tuple) -> None:
        outs = (out,) if len(fresh) == 1 else out
        for o, new in zip(outs, fresh):
            if new:
                for t in (o if isinstance(o, (list, tuple)) else (o,)):
                    if isinstance(t, Tensor):
                        self._count(t, args)

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


class CpuWorkspace:
    """Bytes an op allocates inside itself on the CPU, on top of its outputs, for the ops found to
    do so at real size: convolutions, and matrix products in 16-bit floats. Measured once per
    signature (op, shapes, strides, dtypes, other arguments) on real zeros, by the allocator's
    events (``measured_peak_bytes``).

    A dispatch-level trace sees what ops return, not what they allocate while they run. On the CPU
    oneDNN's convolution copies its weight and its input into its own blocked layout on every call
    and frees the copies when it returns: at SD1.5's real width that copy (118 MB for an up block's
    2560 -> 1280 3x3 convolution) is most of a no-grad denoiser call's peak, its activations (16 x 16
    latents at 128 px) being small. A bfloat16 matrix product accumulates in a float32 buffer, and
    ``bmm`` of a strided input packs a copy first (SD3.5-M's peak). How much depends on the CPU
    (oneDNN picks the layout per instruction set), hence a measurement on this machine rather than
    a rule (docs/results/real_architectures/). float32 matrix products allocate nothing inside
    (measured) and are not probed: every op run for real would be running the network. The GPU
    plan has no such figure (cuDNN's and cuBLAS's workspaces are not modelled).
    """

    CONVOLUTIONS = ("convolution", "convolution_backward")
    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self) -> None:
        self.bytes: dict[tuple, int] = {}  # op's key -> bytes it held inside (measured)
        self._ops: dict[tuple, tuple[Any, tuple, dict]] = {}  # op's key -> (op, arguments described)

    def key(self, func: Any, args: tuple, kwargs: dict) -> tuple | None:
        """The key of this call when it is one of the ops measured (else None); kept for ``measure``."""
        name = func.overloadpacket.__name__
        half = any(isinstance(a, Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args)
        if name not in self.CONVOLUTIONS and not (name in self.PRODUCTS and half):
            return None
        described = (tuple(_describe(a) for a in args), {k: _describe(v) for k, v in kwargs.items()})
        key = (str(func), repr(described))
        self._ops.setdefault(key, (func, *described))
        return key

    def measure(self, keys: set[tuple]) -> dict[tuple, int]:
        """``keys``' workspace: those not measured yet run on real zeros, all in one profiler session
        (starting one costs ~0.1 s: one per op made the CPU plan of a tiny UNet take a minute), each
        in its own ``record_function`` range: the allocator's peak inside it above the bytes alive
        when it began, less what it returned."""
        todo = [k for k in keys if k not in self.bytes]
        if todo:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.profiler import record_function

            returned: dict[str, int] = {}

            def run() -> None:
                for i, k in enumerate(todo):
                    func, args, kwargs = self._ops[k]
                    r_args, r_kwargs = [_real(a) for a in args], {n: _real(v) for n, v in kwargs.items()}
                    with record_function(f"workspace {i}"):
                        out = func(*r_args, **r_kwargs)
                    outs = out if isinstance(out, (tuple, list)) else (out,)  # backward: (dx, dw, db)
                    returned[f"workspace {i}"] = sum(t.untyped_storage().nbytes() for t in outs
                                                     if isinstance(t, Tensor))
                    del out, outs, r_args, r_kwargs

            with unset_fake_temporarily(), torch.no_grad():
                events, times, levels = allocator_levels(run)
            for e in events:
                if e.name() in returned:
                    i = bisect.bisect_left(times, e.start_ns())
                    j = bisect.bisect_right(times, e.start_ns() + e.duration_ns())
                    before = levels[i - 1] if i else 0
                    held = max(levels[i:j], default=before) - before - returned[e.name()]
                    self.bytes[todo[int(e.name().split()[1])]] = max(0, held)
            for k in todo:  # an op that allocated nothing at all has no events in its range
                self.bytes.setdefault(k, 0)
        return {k: self.bytes[k] for k in keys}


def _real(a: Any) -> Any:
    """A described argument as a real value: tensors as zeros of their shape, strides and dtype."""
    if isinstance(a, tuple) and a[:1] == ("tensor",):
        _, shape, stride, dtype = a
        return torch.empty_strided(shape, stride, dtype=dtype, device="cpu").zero_()
    if isinstance(a, tuple):
        return [_real(x) for x in a]
    return a


def _describe(a: Any) -> Any:
    if isinstance(a, Tensor):
        return ("tensor", tuple(a.shape), a.stride(), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_describe(x) for x in a)
    return a


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
    levels = allocator_levels(fn)[2]
    return max(levels, default=0)


def allocator_levels(fn: Callable[[], Any]) -> tuple[list[Any], list[int], list[int]]:
    """``fn()`` under ``torch.profiler`` with the CPU allocator's events: (every profiler event, the
    allocator events' times, the bytes allocated since the start after each, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    levels, current = [], 0
    for _, n in memory:
        current += n
        levels.append(current)
    return events, [t for t, _ in memory], levels


# ---- building without weights ------------------------------------------------------------------------
def build_cli(argv: Sequence[str], options: Any = None, description: str | None = None, prog: str | None = None) -> Any:
    """``fit``'s CLI on ``argv`` without running it (``cli.main(run=False)``): the module and
    datamodule built, nothing loaded (backends load lazily), pretrained sources unchecked;
    ``options``: the command's own settings beside the run's (``cli.ProGRPOCLI``)."""
    from ..cli import main
    from ..loading import source_checks_skipped

    with source_checks_skipped(), warnings.catch_warnings():
        # LightningCLI reads only ``args`` here, and warns when the process's own argv has more
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return main(list(argv), run=False, save_config=False, exit_on_error=False, options=options,
                    description=description, prog=prog)


def build_run(config: str | Sequence[str], overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """(module, datamodule) of ``fit --config config`` (several: a base and its overlays, in order),
    nothing loaded (``build_cli``)."""
    configs = [config] if isinstance(config, str) else list(config)
    cli = build_cli([a for c in configs for a in ("--config", c)] + list(overrides))
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

def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def module_bytes(m: nn.Module) -> int:
    return sum(tensor_bytes(p) for p in m.parameters()) + sum(tensor_bytes(b) for b in m.buffers())


class Depth:
    """The denoiser's stacks (``block_stacks``) and the shallow copies its calls are traced at.

    ``base`` keeps one block of every run; each of ``steps`` adds a second block to one run, with
    the number of blocks that run has beyond its first. A call's figure at full depth is then
    ``base + sum(extra * (step - base))`` (``deep``): each block of a run adds the same stored
    activations (without gradient checkpointing everything its backward needs, with it only its
    input), and the peak's transient, one block's working set on top of what is stored, is in
    every shallow trace, at the same place as at full depth (the top block, the same in every
    copy). Without grad nothing is stored: the steps add 0.

    nets: the denoiser, then (full fine-tuning) its frozen reference copy, cut the same way.
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        self.stacks = [st for net in nets for st in block_stacks(net)]
        self.per_net = len(block_stacks(nets[0]))
        first = [tuple(start for start, _ in runs) for _, _, runs in self.stacks[:self.per_net]]
        self.base: tuple | None = tuple(first) if first else None
        self.steps: list[tuple[tuple, int]] = []
        for i, (_, _, runs) in enumerate(self.stacks[:self.per_net]):
            for j, (start, length) in enumerate(runs):
                if length > 1:
                    deeper = list(first)
                    deeper[i] = first[i][:j + 1] + (start + 1,) + first[i][j + 1:]
                    self.steps.append((tuple(deeper), length - 1))

    @contextlib.contextmanager
    def at(self, depth: tuple | None) -> Iterator[None]:
        """The networks with only the blocks ``depth`` names (None: all), through ``register_module``."""
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

    def deep(self, measure: Callable[[tuple | None], int]) -> int:
        """``measure`` of the full-depth networks from their shallow copies."""
        if self.base is None:
            return measure(None)
        base = measure(self.base)
        return base + sum(extra * (measure(depth) - base) for depth, extra in self.steps)
