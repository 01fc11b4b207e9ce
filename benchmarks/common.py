"""What the benchmark entry points share: settings, schedules, timing, memory, FLOPs, output.

Timing rules (every entry point): build once, warm up (every measured thing runs ``--warmup``
times unrecorded), then ``--repeats`` rounds in which every variant runs once, the order rotated
each round; report medians and *paired* ratios (variant / reference within the same round, then the
median over rounds), so slow drift of a shared machine cancels. A device sync brackets every timed
region. Nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from pro_grpo_lightning.backends.base import DiffusionBackend, select_rows  # noqa: E402
from pro_grpo_lightning.backends.flow_base import FlowMatchingBackend  # noqa: E402
from pro_grpo_lightning.backends.sd15 import SD15Backend  # noqa: E402
from pro_grpo_lightning.rewards import RewardSet  # noqa: E402
from pro_grpo_lightning.schedules import (GroupSchedule, PlainGRPOSchedule, ProGRPOSchedule,  # noqa: E402
                                          StaticOVFSchedule)

from .models import FAMILIES, REWARDS, SIZES, build_backend, build_rewards  # noqa: E402

SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parent
PROMPTS = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk",
           "a bowl of ramen, studio lighting", "a watercolor map of an island",
           "a robot reading a newspaper", "three green apples on a wooden table",
           "a city street in the rain at night", "a portrait of an old sailor"]


# ---- schedules ---------------------------------------------------------------------------------------
@dataclass
class NamedSchedule:
    """A schedule under a display name, with the spec text it came from."""

    name: str
    spec: str
    schedule: GroupSchedule

    @property
    def kind(self) -> str:
        return self.spec.split(":", 1)[0]

    def describe(self, num_steps: int) -> str:
        s = self.schedule
        if s.final_keep is not None:
            return f"{s.group_size} x {num_steps} steps, keep {s.final_keep} after the last ({s.rule})"
        if not s.checkpoints:
            return f"{s.group_size} x {num_steps} steps"
        parts = [str(s.group_size)] + [f"{k}@{c}" for c, k in zip(s.checkpoints, s.keep)]
        return " -> ".join(parts) + f" ({s.rule})"


def parse_schedule(text: str) -> NamedSchedule:
    """``[name=]kind:sizes`` with kind ``plain:G``, ``static:G>K[/rule]`` or ``pro:G>k1@c1>k2@c2[/rule]``.

    ``c`` are 0-based step indices: ``k1@c1`` keeps k1 per prompt right after step c1.
    """
    name, _, spec = text.rpartition("=")
    spec = spec.strip()
    kind, _, body = spec.partition(":")
    rule = "ovf"
    if "/" in body:
        body, rule = body.split("/", 1)
    try:
        if kind == "plain":
            sched: GroupSchedule = PlainGRPOSchedule(int(body))
        elif kind == "static":
            g, k = body.split(">")
            sched = StaticOVFSchedule(int(g), int(k), rule=rule)
        elif kind == "pro":
            first, *rest = body.split(">")
            keep, ckpts = [], []
            for item in rest:
                k, c = item.split("@")
                keep.append(int(k))
                ckpts.append(int(c))
            sched = ProGRPOSchedule(int(first), ckpts, keep, rule=rule)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except ValueError as err:
        raise ValueError(f"bad schedule {text!r} ({err}); write e.g. 'plain:24', 'static:48>12', "
                         f"'pro:48>24@5>12@7' or 'pro:48>24@5>12@7/topk', optionally 'name=...'") from None
    return NamedSchedule(name or spec, spec, sched)


#: The paper's schedules (docs/ALGORITHM.md section 3) at the paper's T; per backend family.
PAPER = {
    # SD3.5-M, T = 10, vs Flow-GRPO G = 24: "Standard" 48 -> 24 -> 12 and "Flash" 24 -> 16 -> 12 at {5, 7}
    "sd35": dict(T=10, plain=24, static=(48, 12),
                 pro={"pro-standard": (48, [(24, 5), (12, 7)]), "pro-flash": (24, [(16, 5), (12, 7)])}),
    # SD-v1.4, T = 50, vs DanceGRPO G = 16: 48 -> 32 -> 8 at {30, 40}
    "sd14": dict(T=50, plain=16, static=(48, 8), pro={"pro-paper": (48, [(32, 30), (8, 40)])}),
}
PAPER_FAMILY = {"sd15": "sd14", "sd3": "sd35", "flux": "sd35"}


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def scale_checkpoints(checkpoints: Sequence[int], paper_T: int, T: int) -> list[int]:
    """Paper step indices to a T-step sampler: ``round(c * T / paper_T)``, kept strictly increasing in [0, T-1)."""
    out: list[int] = []
    for c in checkpoints:
        v = min(max(_round(c * T / paper_T), 0), T - 2 if T >= 2 else 0)
        if out and v <= out[-1]:
            v = out[-1] + 1
        out.append(v)
    if out and out[-1] >= T:
        raise ValueError(f"cannot place checkpoints {list(checkpoints)} (of T={paper_T}) in T={T} steps")
    return out


def _scale_size(g: int, scale: float) -> int:
    return max(2, _round(g * scale))


def paper_schedules(backend_family: str, T: int, group_scale: float = 1.0,
                    custom: bool = True) -> list[NamedSchedule]:
    """Plain GRPO, static OVF, the paper's Pro-GRPO schedule(s) with checkpoints scaled to T, and a
    custom one (``pro-early``: one prune, G_max -> K right after step round(0.2 T)).

    ``group_scale`` multiplies every group size (rounded, >= 2), e.g. 0.25 for toy runs.
    """
    fam = PAPER[PAPER_FAMILY[backend_family]]
    sz = lambda g: _scale_size(g, group_scale)  # noqa: E731
    specs = [f"plain=plain:{sz(fam['plain'])}"]
    g, k = fam["static"]
    specs.append(f"static-ovf=static:{sz(g)}>{sz(k)}")
    first_pro = None
    for name, (g0, steps) in fam["pro"].items():
        cks = scale_checkpoints([c for _, c in steps], fam["T"], T)
        body = ">".join(f"{sz(kk)}@{c}" for (kk, _), c in zip(steps, cks))
        specs.append(f"{name}=pro:{sz(g0)}>{body}")
        first_pro = first_pro or (g0, steps[-1][0])
    if custom and first_pro:
        c = min(max(_round(0.2 * T), 0), T - 2)
        specs.append(f"pro-early=pro:{sz(first_pro[0])}>{sz(first_pro[1])}@{c}")
    return [parse_schedule(s) for s in specs]


def resolve_schedules(args: argparse.Namespace, T: int) -> list[NamedSchedule]:
    """``--schedule`` entries if given (a plain reference is added when none is), else the presets."""
    presets = paper_schedules(args.backend, T, args.group_scale)
    if not args.schedule:
        chosen = presets
    else:
        chosen = [parse_schedule(s) for s in args.schedule]
        if not any(s.kind == "plain" for s in chosen):
            chosen.insert(0, presets[0])
    for s in chosen:
        s.schedule.validate_steps(T)
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"schedule names must be unique, got {names}")
    return chosen


def reference(schedules: Sequence[NamedSchedule]) -> NamedSchedule:
    """The plain-GRPO schedule every ratio is taken against (the first plain one)."""
    return next(s for s in schedules if s.kind == "plain")


# ---- settings and the model under test -----------------------------------------------------------------
def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=FAMILIES, default="sd3",
                   help="model family: sd15 (SD-v1.4 paper schedules), sd3 / flux (SD3.5-M schedules)")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="tiny: the library's tiny models; full: real-size architectures, random weights "
                        "(GPU); mini: the full builders at toy numbers. Default: tiny on CPU, full on CUDA")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="T, denoising steps per trajectory")
    p.add_argument("--resolution", type=int, default=None, help="pixels; default 64 (tiny/mini), 512 (full)")
    p.add_argument("--prompts", type=int, default=1, help="P, prompts per rollout (groups in one batch)")
    p.add_argument("--group-scale", type=float, default=1.0,
                   help="multiply every preset group size (e.g. 0.25 for a toy run)")
    p.add_argument("--schedule", action="append", default=[],
                   help="'[name=]plain:24' | 'static:48>12' | 'pro:48>24@5>12@7[/rule]'; repeatable; "
                        "replaces the presets (plain GRPO is added as the reference if missing)")
    p.add_argument("--reward", choices=REWARDS, default="pickscore",
                   help="scores previews and final images (pickscore: PickScore's code on a random CLIP "
                        "of the model size's scale)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU; 0 leaves torch's setting)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--vae-decode-chunk", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--out", default=None, help=f"output folder (default benchmarks/results/{name})")
    return p


@dataclass
class Bench:
    """The model under test and the settings every entry point shares."""

    args: argparse.Namespace
    family: str
    size: str
    device: torch.device
    dtype: str
    num_steps: int
    resolution: int
    backend: DiffusionBackend
    rewards: RewardSet
    prompts: list[str]
    schedules: list[NamedSchedule]
    build_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def cfg_factor(self) -> int:
        """Physical denoiser rows per trajectory row: 2 with classifier-free guidance."""
        b = self.backend
        if isinstance(b, SD15Backend):
            return 2 if b.guidance_scale > 1 else 1
        if isinstance(b, FlowMatchingBackend):
            return 2 if b._uses_cfg() else 1
        return 1

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def resolve_defaults(args: argparse.Namespace) -> None:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    is_cuda = str(args.device).startswith("cuda")
    if args.size is None:
        args.size = "full" if is_cuda else "tiny"
    if args.dtype is None:
        args.dtype = "bfloat16" if is_cuda else "float32"
    if args.resolution is None:
        args.resolution = 512 if args.size == "full" else 64
    if args.threads is None and not is_cuda:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0 or args.prompts < 1:
        raise ValueError("--repeats >= 1, --warmup >= 0 and --prompts >= 1 please")


def build_bench(args: argparse.Namespace) -> Bench:
    """Build the backend and rewards once (timed, not part of any measurement)."""
    resolve_defaults(args)
    t0 = time.perf_counter()
    schedules = resolve_schedules(args, args.steps)
    backend = build_backend(args.backend, args.size, num_steps=args.steps, resolution=args.resolution,
                            device=args.device, dtype=args.dtype, seed=args.seed, lora_rank=args.lora_rank,
                            vae_decode_chunk=args.vae_decode_chunk)
    rewards = build_rewards(args.reward, "full" if args.size == "full" else "tiny", args.device,
                            dtype=args.dtype, seed=args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    sync(backend.device)
    return Bench(args=args, family=args.backend, size=args.size, device=backend.device, dtype=args.dtype,
                 num_steps=args.steps, resolution=args.resolution, backend=backend, rewards=rewards,
                 prompts=prompts, schedules=schedules, build_s=time.perf_counter() - t0)


# ---- timing ----------------------------------------------------------------------------------------------
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

    if isinstance(b, SD15Backend):
        def call() -> Tensor:
            return b.guided_output(x, step, cond)
    elif isinstance(b, FlowMatchingBackend):
        sigma = b.sigmas.to(bench.device)[step]

        def call() -> Tensor:
            return b._velocity(x, sigma, cond)
    else:
        def call() -> Tensor:
            return b.step(x, step, cond).model_output

    def run() -> Tensor:
        with torch.no_grad():
            return call()
    return run


def trainable_step_indices(bench: Bench) -> Tensor:
    return bench.backend.trainable_steps().nonzero().flatten()


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
    params = b.trainable_parameters()

    def run() -> None:
        out = b.step(x, step, cond, next_latents=x_next)
        out.log_prob.mean().backward()
        for p in params:
            p.grad = None
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


# ---- output -----------------------------------------------------------------------------------------------------
def out_dir(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.out) if args.out else ROOT / "results" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine: fine
        return None


def meta(bench: Bench) -> dict[str, Any]:
    import diffusers
    import transformers

    dev = bench.device
    info: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def settings(bench: Bench) -> dict[str, Any]:
    b = bench.backend
    denoiser = b.denoiser()
    return {
        "backend": bench.family, "size": bench.size, "backend_class": type(b).__name__,
        "denoiser_class": type(denoiser).__name__,
        "denoiser_params": sum(p.numel() for p in denoiser.parameters() if not p.requires_grad),
        "lora_params": sum(p.numel() for p in b.trainable_parameters()),
        "dtype": bench.dtype, "num_steps": bench.num_steps, "resolution": bench.resolution,
        "num_prompts": len(bench.prompts), "cfg_factor": bench.cfg_factor,
        "reward": bench.args.reward, "repeats": bench.args.repeats, "warmup": bench.args.warmup,
        "group_scale": bench.args.group_scale, "build_s": bench.build_s,
        "schedules": [{"name": s.name, "spec": s.spec, "kind": s.kind, "sizes": s.schedule.sizes(),
                       "checkpoints": s.schedule.checkpoints, "rule": s.schedule.rule,
                       "final_size": s.schedule.final_size,
                       "group_sizes_per_step": s.schedule.group_sizes_per_step(bench.num_steps),
                       "nfe_per_prompt": s.schedule.nfe_per_prompt(bench.num_steps),
                       "describe": s.describe(bench.num_steps)} for s in bench.schedules],
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Tensor):
        return _clean(obj.tolist())
    return obj


def write_outputs(out: Path, name: str, payload: dict[str, Any], table: str,
                  plot: Callable[[Path], None] | None) -> dict[str, str]:
    """``<name>.json``, ``<name>.md`` (the table) and ``<name>.png``; returns their paths."""
    paths = {"json": str(out / f"{name}.json"), "table": str(out / f"{name}.md")}
    Path(paths["table"]).write_text(table + "\n")
    if plot is not None:
        png = out / f"{name}.png"
        plot(png)
        paths["png"] = str(png)
    payload = dict(payload, files=paths)
    Path(paths["json"]).write_text(json.dumps(_clean(payload), indent=1) + "\n")
    return paths


def new_figure(ncols: int = 2, width: float = 11.0, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height))
    return plt, fig, axes


def save_figure(plt: Any, fig: Any, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_title(bench: Bench, what: str) -> str:
    dev = "GPU" if bench.device.type == "cuda" else f"CPU x{torch.get_num_threads()} thread(s)"
    return (f"{what}: {bench.family} ({bench.size}, {bench.resolution} px, T={bench.num_steps}, "
            f"P={len(bench.prompts)}, {bench.dtype}) on {dev}")


def logger(quiet: bool = False) -> Callable[[str], None]:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
    return log


@contextlib.contextmanager
def restored_lora(backend: DiffusionBackend) -> Iterator[None]:
    """Put the adapter weights back after the block (so every timed update starts the same)."""
    state = backend.lora_state_dict()
    try:
        yield
    finally:
        backend.load_lora_state_dict(state)


# ---- update settings shared by floor and iteration_cost --------------------------------------------------
def add_update_args(p: argparse.ArgumentParser, timestep_fraction: float = 0.5) -> None:
    p.add_argument("--train-batch-size", type=int, default=8, help="(trajectory, step) pairs per forward/backward")
    p.add_argument("--timestep-fraction", type=float, default=timestep_fraction,
                   help="share of each trajectory's trainable steps trained per epoch")
    p.add_argument("--inner-epochs", type=int, default=1)
    p.add_argument("--train-cost", default="counted",
                   help="FLOPs of one training pair in denoiser calls: 'counted' (torch flop counter) or a number")


def update_chunks(pairs: int, batch: int) -> list[int]:
    """Minibatch sizes the update runs for ``pairs`` pairs at ``batch`` per minibatch (one epoch)."""
    full, rem = divmod(pairs, batch)
    return [batch] * full + ([rem] if rem else [])


def rollout_rows(bench: Bench, s: NamedSchedule) -> list[int]:
    """Trajectory rows of the physical batch at each of the T steps (P * live group size)."""
    return [len(bench.prompts) * g for g in s.schedule.group_sizes_per_step(bench.num_steps)]


def run_entry_point(name: str, title: str, parser: argparse.ArgumentParser,
                    run: Callable[..., dict[str, Any]], table: Callable[[dict[str, Any]], str],
                    plot: Callable[[dict[str, Any], str, Path], None],
                    argv: list[str] | None = None, bench: Bench | None = None) -> dict[str, Any]:
    """The shared ``main`` of the timing entry points: parse, build (or reuse) the bench, run,
    print the table, write JSON + markdown + PNG into ``--out``. Returns the JSON payload."""
    args = parser.parse_args(argv)
    log = logger()
    bench = bench or build_bench(args)
    out = out_dir(args, name)
    result = run(bench, args, log)
    tab = table(result)
    print(tab)
    payload = {"benchmark": name, "schema_version": SCHEMA_VERSION, "meta": meta(bench),
               "settings": settings(bench), **result}
    full_title = run_title(bench, title)
    paths = write_outputs(out, name, payload, tab, None if args.no_plot else lambda p: plot(result, full_title, p))
    log(f"wrote {paths}")
    return payload
