"""What the timing entry points measure with: device-synced timers, interleaved rounds, peak memory,
the bare denoiser call and training step, and the FLOP model.

Timing rules (every entry point): build once, warm up (every measured thing runs ``--warmup``
times unrecorded), then ``--repeats`` rounds in which every variant runs once, the order rotated
each round; report medians and *paired* ratios (variant / reference within the same round, then the
median over rounds), so slow drift of a shared machine cancels. A device sync brackets every timed
region. Nothing here asserts on a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pro_grpo_lightning.backends.base import DiffusionBackend, PipelineBackend, select_rows
from pro_grpo_lightning.schedules import GroupSchedule

if TYPE_CHECKING:
    from .harness import Bench


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()`` with a device sync before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(tasks: dict[str, Callable[[], dict[str, Any]]], repeats: int, warmup: int,
                log: Callable[[str], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run every task ``warmup`` times unrecorded, then ``repeats`` rounds of all tasks, the order
    rotated by one each round. Returns each task's per-round records (round order)."""
    names = list(tasks)
    for w in range(warmup):
        for n in names:
            tasks[n]()
        if log:
            log(f"warm-up round {w + 1}/{warmup} done")
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            out[n].append(tasks[n]())
        if log:
            log(f"round {r + 1}/{repeats} done")
    return out


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def paired_ratios(records: dict[str, list[dict[str, Any]]], key: str, ref: str) -> dict[str, dict[str, float]]:
    """Per task: median / min / max over rounds of ``record[key] / ref_record[key]`` (same round)."""
    out = {}
    for name, recs in records.items():
        ratios = [a[key] / b[key] for a, b in zip(recs, records[ref]) if b[key] > 0]
        out[name] = {"median": median(ratios), "min": min(ratios) if ratios else float("nan"),
                     "max": max(ratios) if ratios else float("nan")}
    return out


# ---- memory ------------------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a block. CUDA: ``max_memory_allocated`` (peak, and peak minus what was allocated
    at entry). CPU: resident set size sampled every 2 ms by a thread, minus the RSS at entry after
    ``gc`` and ``malloc_trim`` (approximate: the allocator may keep freed pages). Else n/a."""

    def __init__(self, device: torch.device, cpu_sampling: bool = True) -> None:
        self.device = torch.device(device)
        self.cpu_sampling = cpu_sampling
        self.result: dict[str, Any] = {"method": "n/a", "peak_bytes": None, "delta_bytes": None}

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_sampling and _rss_bytes() is not None:
            gc.collect()
            _malloc_trim()
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"method": "cuda.max_memory_allocated", "peak_bytes": peak,
                           "delta_bytes": peak - self._base}
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes() or 0
            peak = max(self._peak, rss)
            self.result = {"method": "rss-sampled", "peak_bytes": peak, "delta_bytes": peak - self._base}


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def mem_str(result: dict[str, Any]) -> str:
    """Human-readable memory of a ``PeakMemory`` result: GiB on CUDA, MiB of RSS delta on CPU."""
    if result.get("delta_bytes") is None:
        return "n/a"
    if result["method"].startswith("cuda"):
        return f"{gib(result['peak_bytes'])} GiB (+{gib(result['delta_bytes'])})"
    return f"+{mib(result['delta_bytes'])} MiB RSS"


# ---- the denoiser alone -------------------------------------------------------------------------------------
def trajectory_cond(bench: Bench, rows: int) -> dict[str, Tensor]:
    """Conditioning for ``rows`` trajectories spread over the bench's prompts (group-major)."""
    cond = bench.backend.encode_prompts(bench.prompts)
    P = len(bench.prompts)
    idx = torch.arange(rows, device=bench.device) * P // max(rows, 1)
    return select_rows(cond, idx.clamp(max=P - 1))


def denoiser_forward(bench: Bench, rows: int) -> Callable[[], Tensor]:
    """A closure running the denoiser call the rollout makes for ``rows`` trajectories at one step
    (CFG included: 2 x rows physical rows), without the step arithmetic. Inputs are made once."""
    b = bench.backend
    x = b.initial_latents(rows, bench.generator(1))
    step = torch.full((rows,), bench.num_steps // 2, dtype=torch.long, device=bench.device)
    cond = trajectory_cond(bench, rows)

    if isinstance(b, PipelineBackend):  # the guided network output, without the step arithmetic
        def call() -> Tensor:
            return b.guided_output(x, step, cond)
    else:
        def call() -> Tensor:
            return b.step(x, step, cond).model_output

    def run() -> Tensor:
        with torch.no_grad():
            return call()
    return run


def trainable_step_indices(bench: Bench) -> Tensor:
    return bench.backend.trainable_steps().nonzero().flatten()


@contextlib.contextmanager
def sde_window(backend: DiffusionBackend, window: tuple[int, int] | None) -> Iterator[None]:
    """Run the block as if ``backend`` had been built with ``sde_window=window`` (None: no window),
    so schedules with and without a window are timed on one model, in the same rounds
    (``DiffusionBackend.set_sde_window``). A test checks the result against a backend constructed
    with the window."""
    old = backend.sde_window
    backend.set_sde_window(window)
    try:
        yield
    finally:
        backend.set_sde_window(old)


def denoiser_train_step(bench: Bench, rows: int) -> Callable[[], None]:
    """A closure running what the update does per minibatch of ``rows`` (trajectory, step) pairs:
    the policy step re-scoring stored transitions, with grad, and the backward pass."""
    b = bench.backend
    g = bench.generator(2)
    x = b.initial_latents(rows, g)
    x_next = b.initial_latents(rows, g)
    steps = trainable_step_indices(bench)
    step = steps[torch.arange(rows) % steps.numel()].to(bench.device)
    cond = trajectory_cond(bench, rows)
    net = b.denoiser()

    def run() -> None:
        out = b.step(x, step, cond, next_latents=x_next)
        out.log_prob.mean().backward()
        net.zero_grad(set_to_none=True)
    return run


# ---- FLOPs ------------------------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def unit_flops(bench: Bench) -> dict[str, int]:
    """FLOPs per trajectory sample, counted by ``torch.utils.flop_counter`` at batch 1: one denoiser
    call (CFG included), one training pair (forward with grad + backward), one VAE decode, one
    reward call. Matmuls and convolutions; attention kernels where PyTorch registers a count
    (CUDA SDPA yes, the CPU flash kernel no)."""
    b = bench.backend
    fwd = count_flops(denoiser_forward(bench, 1))
    train = count_flops(denoiser_train_step(bench, 1))
    x = b.initial_latents(1, bench.generator(3))
    decode = count_flops(lambda: b.decode(x))
    img = b.decode(x)
    reward = count_flops(lambda: bench.rewards(img, bench.prompts[:1]))
    return {"denoiser_forward": fwd, "train_pair": train, "vae_decode": decode, "reward": reward}


@dataclass
class FlopModel:
    """FLOPs of one iteration in units of F = one denoiser call on one trajectory (CFG included):

        rollout  = nfe                                     (denoiser calls, P * sum_t live_t)
        update   = pairs * c,  pairs = P * K * m * inner_epochs,  m = ceil(timestep_fraction * n)
        total    = rollout + update

    K: trajectories trained on per prompt (the schedule's final size); n: the backend's trainable
    steps; c: FLOPs of one training pair (forward with grad + backward) over F. Previews, decodes and
    rewards are not in this model (reported as time). ``c`` is counted (``unit_flops``) or given.
    """

    train_cost: float
    trainable_steps: int
    timestep_fraction: float = 1.0
    inner_epochs: int = 1

    @property
    def steps_per_trajectory(self) -> int:
        return max(1, math.ceil(self.timestep_fraction * self.trainable_steps))

    def pairs(self, schedule: GroupSchedule, num_prompts: int) -> int:
        return num_prompts * schedule.final_size * self.steps_per_trajectory * self.inner_epochs

    def rollout(self, schedule: GroupSchedule, num_prompts: int, num_steps: int) -> int:
        return num_prompts * schedule.nfe_per_prompt(num_steps)

    def total(self, schedule: GroupSchedule, num_prompts: int, num_steps: int) -> float:
        return self.rollout(schedule, num_prompts, num_steps) + self.train_cost * self.pairs(schedule, num_prompts)


def decoded_images(schedule: GroupSchedule, num_prompts: int, num_steps: int) -> tuple[int, int]:
    """(previews, finals): images a rollout decodes and scores at the checkpoints (rules that read
    scores) and at the end (every trajectory alive after the last step)."""
    sizes = schedule.group_sizes_per_step(num_steps)
    previews = 0 if schedule.rule in ("none", "random") else sum(sizes[c] for c in schedule.checkpoints)
    return num_prompts * previews, num_prompts * sizes[-1]
