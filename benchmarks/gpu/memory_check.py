"""Measured peak memory and seconds per iteration of shipped configs at their real size, against `plan`.

Each variant is a shipped config (a base and its overlays) plus overrides. Its module is built by the
CLI exactly as ``fit`` builds it; only the weights differ: every network is constructed from the
real architecture (``pro_grpo_lightning/architectures.py``, the table ``plan`` uses) directly on the
device in the config's dtype, with random values (no hub here): the library's own
``NetworkSource("random", device)`` (``ProGRPOModule.use_networks``). The run is a Lightning ``Trainer``
fit of ``--iterations`` rollouts + updates with the config's precision, no validation, no logger,
no checkpoints. Measured: the CUDA allocator's peak (``torch.cuda.max_memory_allocated``, which is
what ``plan`` estimates: its runtime overhead is on top), the caching allocator's reserved peak, and
seconds per iteration (the first includes CUDA warm-up and, where the config audits from rollout 0,
is an audit rollout). Each variant runs in its own process: a CUDA error costs that variant only.

    python -m benchmarks.gpu.memory_check --out DIR                       # every variant, on CUDA
    python -m benchmarks.gpu.memory_check --out DIR --only sd35m_pro      # one
    python -m benchmarks.gpu.memory_check --out DIR --smoke               # tiny configs on CPU
    python -m benchmarks.gpu.memory_check --plan DIR                      # the plan of each variant (CPU)
    python -m benchmarks.gpu.memory_check --compare DIR                   # DIR/comparison.md

``--plan`` writes each variant's ``plan --json`` report (``plan.report``; no GPU, no weights) and
``--compare`` joins the two into a table of measured vs planned peak.

Whether a config fits a card is decided by what the caching allocator *reserves* and what the card
holds besides (CUDA context, library workspaces), not by the allocated peak alone: as shipped,
SD3.5-M reserved 104 GiB on a 141 GiB H200 for a 60 GiB allocated peak, where nothing made the
allocator give cached blocks back. A variant name may carry allocator settings after the table
name (``allocator_settings``): ``sd35m_pro+cap80`` runs ``sd35m_pro`` with the allocator limited to
80 GiB (a smaller card emulated on a larger one: does it still fit once the allocator must free its
cache?), ``sd35m_pro+expandable`` with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``; ``DERIVED``
lists the ones measured by default. Every result records the reserved peak, the card's used memory
at each iteration's end and the allocator's retries (each a cache flush to avoid out-of-memory).

    python -m benchmarks.gpu.memory_check --out DIR --unmeasured docs/results/gpu_memory  # what has no result yet
    python -m benchmarks.gpu.memory_check --out DIR --only sd35m_pro+expandable+cap80
    python -m benchmarks.gpu.memory_check --match compile --list                          # names only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
C = "configs/"
LEVERS_ON = ["--model.backend.init_args.gradient_checkpointing=true",
             "--model.backend.init_args.offload_text_encoders=true",
             "--model.backend.init_args.decode_chunk=8"]
LEVERS_OFF = ["--model.backend.init_args.gradient_checkpointing=false",
              "--model.backend.init_args.offload_text_encoders=false",
              "--model.backend.init_args.decode_chunk=null"]
#: name -> (configs, overrides, iterations). Order: what no GPU run has measured yet first (the
#: SD3.5-M variants were measured on 2026-11-30: docs/results/gpu_memory/).
VARIANTS: dict[str, tuple[list[str], list[str], int]] = {
    "flux_pro": ([C + "flux_dev_pickscore_pro_grpo.yaml"], [], 1),
    "sd15_hps_pro": ([C + "sd15_hps_pro_grpo.yaml"], [], 1),
    "flux_pro_no_levers": ([C + "flux_dev_pickscore_pro_grpo.yaml"], LEVERS_OFF, 1),
    "sd35m_pro": ([C + "sd35m_pickscore_base.yaml", C + "sd35m_pickscore_pro_grpo.yaml"], [], 2),
    "sd35m_pro_levers": ([C + "sd35m_pickscore_base.yaml", C + "sd35m_pickscore_pro_grpo.yaml"],
                         LEVERS_ON + ["--model.rollout.sample_batch_size=48"], 1),
    # the families of issue 26 (never run on a GPU yet): each shipped Pro-GRPO config as it is
    "sdxl_pro": ([C + "sdxl_hps_pro_grpo.yaml"], [], 1),
    "zimage_pro": ([C + "zimage_pickscore_pro_grpo.yaml"], [], 1),
    "sd35l_pro": ([C + "sd35l_pickscore_base.yaml", C + "sd35l_pickscore_pro_grpo.yaml"], [], 1),
    "qwenimage_pro": ([C + "qwenimage_pickscore_pro_grpo.yaml"], [], 1),
}
SMOKE: dict[str, tuple[list[str], list[str], int]] = {
    "tiny_sd3": ([C + "tiny_sd3.yaml"], [], 2),
    "tiny_flux": ([C + "tiny_flux.yaml"], LEVERS_ON, 1),
    "tiny_sdxl": ([C + "tiny_sdxl.yaml"], [], 1),
    "tiny_qwenimage": ([C + "tiny_qwenimage.yaml"], [], 1),
    "tiny_zimage": ([C + "tiny_zimage.yaml"], [], 1),
}
#: Allocator settings a variant name can carry after its table name: ``NAME+expandable`` runs NAME with
#: PyTorch's expandable segments (the caching allocator grows segments instead of caching fixed-size
#: blocks, which is what closes the reserved-vs-allocated gap); ``NAME+capNN`` limits the caching
#: allocator to NN GiB (``torch.cuda.set_per_process_memory_fraction``): a card of that size emulated on
#: a larger one, where the allocator must free its cache and retry before it raises out-of-memory.
ALLOCATOR_ENV = {"expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}
#: Derived variants measured by default (``--unmeasured``): does SD3.5-M as shipped fit an 80 GiB card,
#: with the default allocator and with expandable segments?
DERIVED = ["sd35m_pro+cap80", "sd35m_pro+expandable", "sd35m_pro+expandable+cap80"]
#: ``NAME+compiled``: NAME with these overrides added, the CLI setting that compiles the denoiser
#: (``compiling.py``); the session's ``compile`` stage measures NAME and NAME+compiled side by side.
COMPILE_OVERRIDES: list[str] = ["--model.backend.init_args.compile=true"]
SMOKE_DERIVED = ["tiny_sd3+expandable+cap80"]


def allocator_settings(name: str) -> tuple[dict[str, str], float | None]:
    """(environment, cap in GiB or None) of a variant name ``NAME[+expandable][+capNN]``."""
    env: dict[str, str] = {}
    cap = None
    for mod in name.split("+")[1:]:
        if mod == "compiled":  # not an allocator setting: overrides added by ``with_derived``
            continue
        if mod in ALLOCATOR_ENV:
            env.update(ALLOCATOR_ENV[mod])
        elif mod.startswith("cap") and mod[3:].replace(".", "", 1).isdigit():
            cap = float(mod[3:])
        else:
            raise ValueError(f"variant {name!r}: unknown setting {mod!r} (known: "
                             f"{', '.join(sorted(ALLOCATOR_ENV))}, capNN)")
    return env, cap


def with_derived(table: dict[str, tuple[list[str], list[str], int]],
                 names: list[str]) -> dict[str, tuple[list[str], list[str], int]]:
    """The table plus derived variants (``NAME+setting``), each with its base variant's entry."""
    out = dict(table)
    for name in names:
        base = name.split("+")[0]
        if base not in table:
            raise ValueError(f"variant {name!r}: no variant {base!r} in the table")
        allocator_settings(name)  # refuse unknown settings now
        configs, overrides, iterations = table[base]
        if "compiled" in name.split("+")[1:]:
            if not COMPILE_OVERRIDES:
                raise ValueError(f"variant {name!r}: this version has no compile option (COMPILE_OVERRIDES is empty)")
            overrides = overrides + COMPILE_OVERRIDES
        out[name] = (configs, overrides, iterations)
    return out


def config_precision(configs: list[str]) -> str:
    """The ``trainer.precision`` of a base config and its overlays (the last one that sets it)."""
    import yaml

    precision = "32-true"
    for c in configs:
        with open(ROOT / c, encoding="utf-8") as f:
            precision = str((yaml.safe_load(f).get("trainer") or {}).get("precision", precision))
    return precision


class IterationTimer(pl.Callback):
    """Seconds per training iteration (one rollout + its updates), synchronised on CUDA."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.peaks: list[int] = []  # CUDA allocator peak after each iteration
        self.device_used: list[int] = []  # the card's used memory at the end of each iteration
        self._t0 = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)
        if torch.cuda.is_available():
            self.peaks.append(torch.cuda.max_memory_allocated())
            free, total = torch.cuda.mem_get_info()
            self.device_used.append(total - free)  # everything on the card: context, cache, workspaces


def measure(name: str, configs: list[str], overrides: list[str], iterations: int, device: str,
            workdir: Path) -> dict[str, Any]:
    from pro_grpo_lightning.networks import NetworkSource
    from pro_grpo_lightning.plan import build_run

    _, cap = allocator_settings(name)
    if cap is not None and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))

    t0 = time.perf_counter()
    module, datamodule = build_run([str(ROOT / c) for c in configs], overrides)
    # every network of the real architecture (a local folder's config files or architectures.py, as
    # the plan reads it), built on the device in its dtype with random values; tiny models their code
    module.use_networks(NetworkSource("random", device, seed=0))
    timer = IterationTimer()
    precision = config_precision(configs)
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                         max_steps=iterations, logger=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], default_root_dir=str(workdir / name))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=datamodule)
    out: dict[str, Any] = {
        "name": name, "configs": configs, "overrides": overrides, "precision": precision,
        "iterations": len(timer.seconds), "seconds_per_iteration": timer.seconds,
        "wall_s_with_build": time.perf_counter() - t0,
        "global_step": trainer.global_step,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        out.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                   peak_allocated_after_each_iteration=timer.peaks, device_used_after_teardown=total - free,
                   device_used_after_each_iteration=timer.device_used,
                   alloc_retries=stats.get("num_alloc_retries", 0), ooms=stats.get("num_ooms", 0),
                   device_total=total, device_name=torch.cuda.get_device_name())
    out.update(alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), cap_gib=cap)
    del trainer, module, datamodule
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def versions() -> dict[str, Any]:
    import platform

    import diffusers
    import lightning
    import peft
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "peft": peft.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(Exception):
        import subprocess

        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip()
    return info


def run(out: Path, variants: dict[str, tuple[list[str], list[str], int]], device: str, deadline: float,
        isolate: bool = True) -> None:
    """Measure each variant into ``out/<name>.json`` (or ``<name>.error.txt``). ``isolate``: each in its
    own process, so a CUDA error (which leaves the process's context unusable) costs one variant only."""
    out.mkdir(parents=True, exist_ok=True)
    if isolate or not (out / "versions.json").exists():  # once per run, not again in each variant's process
        (out / "versions.json").write_text(json.dumps(versions(), indent=1))
    for name, (configs, overrides, iterations) in variants.items():
        left = deadline - time.time()
        if left < 30:
            print(f"[memory_check] {name}: skipped, {left:.0f}s left", flush=True)
            continue
        print(f"[memory_check] {name}: {' '.join(configs + overrides)}", flush=True)
        if isolate:
            import subprocess

            cmd = [sys.executable, "-m", "benchmarks.gpu.memory_check", "--out", str(out), "--only", name,
                   "--in-process"] + (["--smoke"] if device == "cpu" else [])
            env = {**os.environ, **allocator_settings(name)[0]}  # read by the allocator when CUDA starts
            try:
                subprocess.run(cmd, cwd=ROOT, timeout=max(left, 30), env=env)
            except subprocess.TimeoutExpired:
                (out / f"{name}.error.txt").write_text(f"TimeoutExpired: stopped after {left:.0f}s\n")
            continue
        try:
            r = measure(name, configs, overrides, iterations, device, out / "work")
            (out / f"{name}.json").write_text(json.dumps(r, indent=1))
            gib = r.get("peak_allocated", 0) / 2**30
            print(f"[memory_check] {name}: peak {gib:.2f} GiB, s/iter {r['seconds_per_iteration']}", flush=True)
        except Exception as err:  # noqa: BLE001 - record it and go on to the next variant
            traceback.print_exc()
            (out / f"{name}.error.txt").write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")


def plan_all(out: Path, variants: dict[str, tuple[list[str], list[str], int]]) -> None:
    """``plan --json`` of each variant into ``out/<name>.plan.json`` (CPU, no weights)."""
    from pro_grpo_lightning.plan import report

    out.mkdir(parents=True, exist_ok=True)
    for name, (configs, overrides, _) in variants.items():
        if "+" in name:  # a derived variant: the plan of its table variant (allocator settings are not planned)
            continue
        t0 = time.perf_counter()
        r = report([str(ROOT / c) for c in configs], overrides=overrides, target="cuda")
        r["plan_seconds"] = time.perf_counter() - t0
        (out / f"{name}.plan.json").write_text(json.dumps(r, indent=1, default=str))
        print(f"[plan] {name}: peak {r['peak'] / 2**30:.2f} GiB ({r['plan_seconds']:.0f}s)", flush=True)


def compare(root: Path, variants: dict[str, tuple[list[str], list[str], int]]) -> str:
    lines = ["| variant | configs + overrides | planned peak (GiB) | measured peak allocated (GiB) | "
             "measured / planned | peak reserved (GiB) | "
             "s / iteration (first, then later) | card used at iteration ends (GiB) | allocator retries |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (configs, overrides, _) in variants.items():
        planned = root / f"{name.split('+')[0]}.plan.json"  # a derived variant: its table variant's plan
        measured = root / f"{name}.json"
        p = json.loads(planned.read_text())["peak"] if planned.exists() else None
        if not measured.exists():
            err = root / f"{name}.error.txt"
            why = err.read_text().splitlines()[0] if err.exists() else "not run"
            lines.append(f"| {name} | {' '.join(Path(c).name for c in configs)} {' '.join(overrides)} | "
                         f"{p / 2**30 if p else float('nan'):.2f} | {why} | | | | | |")
            continue
        m = json.loads(measured.read_text())
        g = 2**30
        ratio = f"{m['peak_allocated'] / p:.2f}" if p else "-"
        secs = ", ".join(f"{s:.1f}" for s in m["seconds_per_iteration"])
        lines.append(f"| {name} | {' '.join(Path(c).name for c in configs)} {' '.join(overrides)} | "
                     f"{p / g if p else float('nan'):.2f} | {m['peak_allocated'] / g:.2f} | {ratio} | "
                     f"{m['peak_reserved'] / g:.2f} | {secs} | "
                     f"{', '.join(f'{u / g:.1f}' for u in m.get('device_used_after_each_iteration', []))} | "
                     f"{m.get('alloc_retries', '')} |")
    text = "\n".join(lines) + "\n"
    (root / "comparison.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.memory_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--only", nargs="+", help="variant names (default: all)")
    p.add_argument("--smoke", action="store_true", help="the tiny configs on CPU (same code path)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip variants that would start after this")
    p.add_argument("--plan", type=Path, metavar="DIR", help="write the plan of each variant and exit")
    p.add_argument("--compare", type=Path, metavar="DIR", help="write DIR/comparison.md and exit")
    p.add_argument("--in-process", action="store_true", help="no process per variant (one variant, or debugging)")
    p.add_argument("--unmeasured", type=Path, metavar="DIR",
                   help="only the variants (table and derived) without a DIR/<name>.json yet")
    p.add_argument("--match", help="only the variants whose name contains this (e.g. 'compile')")
    p.add_argument("--list", action="store_true", help="print the selected variants' names and exit")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    variants = with_derived(SMOKE, SMOKE_DERIVED) if args.smoke else with_derived(VARIANTS, DERIVED)
    if args.only:
        try:  # any NAME+setting of a table variant may be named
            variants = with_derived(variants, [n for n in args.only if n not in variants and "+" in n])
        except ValueError as err:
            p.error(f"--only: {err}")
        unknown = set(args.only) - set(variants)
        if unknown:
            p.error(f"--only: unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    if args.unmeasured:
        variants = {k: v for k, v in variants.items() if not (args.unmeasured / f"{k}.json").exists()}
    if args.match:
        variants = {k: v for k, v in variants.items() if args.match in k}
    if args.list:
        print("\n".join(variants))
        return 0
    if args.plan:
        plan_all(args.plan, variants)
        return 0
    if args.compare:
        print(compare(args.compare, variants))
        return 0
    if args.out is None:
        p.error("--out is required")
    device = "cpu" if args.smoke else "cuda"
    run(args.out, variants, device, time.time() + args.budget_s, isolate=not args.in_process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
