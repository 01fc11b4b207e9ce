"""The model under test and the settings every timing entry point shares (``rollout_cost``,
``iteration_cost``, ``floor``, ``gpu/run_all``): the command line, building the backend and rewards
once, the JSON's ``meta`` and ``settings``, and the shared ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pro_grpo_lightning.backends.base import DiffusionBackend  # noqa: E402
from pro_grpo_lightning.rewards import RewardSet  # noqa: E402

from .measure import sync  # noqa: E402
from .models import FAMILIES, REWARDS, SIZES, build_backend, build_rewards  # noqa: E402
from .report import SCHEMA_VERSION, git_commit, logger, out_dir, write_outputs  # noqa: E402
from .schedules import NamedSchedule, resolve_schedules  # noqa: E402

PROMPTS = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk",
           "a bowl of ramen, studio lighting", "a watercolor map of an island",
           "a robot reading a newspaper", "three green apples on a wooden table",
           "a city street in the rain at night", "a portrait of an old sailor"]


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
    p.add_argument("--decode-chunk", type=int, default=None)
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
        return 2 if self.backend.uses_cfg() else 1

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def resolve_defaults(parsed: argparse.Namespace) -> argparse.Namespace:
    """The arguments with the device's defaults filled in (a new namespace)."""
    args = argparse.Namespace(**vars(parsed))
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
    return args


def build_bench(args: argparse.Namespace) -> Bench:
    """Build the backend and rewards once (timed, not part of any measurement)."""
    args = resolve_defaults(args)
    t0 = time.perf_counter()
    schedules = resolve_schedules(args, args.steps)
    backend = build_backend(args.backend, args.size, num_steps=args.steps, resolution=args.resolution,
                            device=args.device, dtype=args.dtype, seed=args.seed, lora_rank=args.lora_rank,
                            decode_chunk=args.decode_chunk)
    rewards = build_rewards(args.reward, "full" if args.size == "full" else "tiny", args.device,
                            dtype=args.dtype, seed=args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    sync(backend.device)
    return Bench(args=args, family=args.backend, size=args.size, device=backend.device, dtype=args.dtype,
                 num_steps=args.steps, resolution=args.resolution, backend=backend, rewards=rewards,
                 prompts=prompts, schedules=schedules, build_s=time.perf_counter() - t0)


# ---- output ----------------------------------------------------------------------------------------------------
def meta(bench: Bench) -> dict[str, Any]:
    import diffusers
    import transformers

    dev = bench.device
    info: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
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


def run_title(bench: Bench, what: str) -> str:
    dev = "GPU" if bench.device.type == "cuda" else f"CPU x{torch.get_num_threads()} thread(s)"
    return (f"{what}: {bench.family} ({bench.size}, {bench.resolution} px, T={bench.num_steps}, "
            f"P={len(bench.prompts)}, {bench.dtype}) on {dev}")


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
    if bench is None:
        bench = build_bench(args)
        args = bench.args  # with the device's defaults filled in
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
