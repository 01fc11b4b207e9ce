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
             "--model.backend.init_args.vae_decode_chunk=8"]
LEVERS_OFF = ["--model.backend.init_args.gradient_checkpointing=false",
              "--model.backend.init_args.offload_text_encoders=false",
              "--model.backend.init_args.vae_decode_chunk=null"]
#: name -> (configs, overrides, iterations). Order: what no GPU run has measured yet first (the
#: SD3.5-M variants were measured on 2026-11-30: docs/results/gpu_memory/).
VARIANTS: dict[str, tuple[list[str], list[str], int]] = {
    "flux_pro": ([C + "flux_dev_pickscore_pro_grpo.yaml"], [], 1),
    "sd15_hps_pro": ([C + "sd15_hps_pro_grpo.yaml"], [], 1),
    "flux_pro_no_levers": ([C + "flux_dev_pickscore_pro_grpo.yaml"], LEVERS_OFF, 1),
    "sd35m_pro": ([C + "sd35m_pickscore_base.yaml", C + "sd35m_pickscore_pro_grpo.yaml"], [], 2),
    "sd35m_pro_levers": ([C + "sd35m_pickscore_base.yaml", C + "sd35m_pickscore_pro_grpo.yaml"],
                         LEVERS_ON + ["--model.rollout.sample_batch_size=48"], 1),
}
SMOKE: dict[str, tuple[list[str], list[str], int]] = {
    "tiny_sd3": ([C + "tiny_sd3.yaml"], [], 2),
    "tiny_flux": ([C + "tiny_flux.yaml"], LEVERS_ON, 1),
}


def _precision(configs: list[str]) -> str:
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


def measure(name: str, configs: list[str], overrides: list[str], iterations: int, device: str,
            workdir: Path) -> dict[str, Any]:
    from pro_grpo_lightning.networks import NetworkSource
    from pro_grpo_lightning.plan import build_run

    t0 = time.perf_counter()
    module, datamodule = build_run([str(ROOT / c) for c in configs], overrides)
    # every network of the real architecture (a local folder's config files or architectures.py, as
    # the plan reads it), built on the device in its dtype with random values; tiny models their code
    module.use_networks(NetworkSource("random", device, seed=0))
    timer = IterationTimer()
    precision = _precision(configs)
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
        out.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                   peak_allocated_after_each_iteration=timer.peaks, device_used_after_teardown=total - free,
                   device_total=total, device_name=torch.cuda.get_device_name())
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
            try:
                subprocess.run(cmd, cwd=ROOT, timeout=max(left, 30))
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
        t0 = time.perf_counter()
        r = report([str(ROOT / c) for c in configs], overrides=overrides, target="cuda")
        r["plan_seconds"] = time.perf_counter() - t0
        (out / f"{name}.plan.json").write_text(json.dumps(r, indent=1, default=str))
        print(f"[plan] {name}: peak {r['peak'] / 2**30:.2f} GiB ({r['plan_seconds']:.0f}s)", flush=True)


def compare(root: Path, variants: dict[str, tuple[list[str], list[str], int]]) -> str:
    lines = ["| variant | configs + overrides | planned peak (GiB) | measured peak allocated (GiB) | "
             "measured / planned | peak reserved (GiB) | "
             "s / iteration (first, then later) |", "|---|---|---|---|---|---|---|"]
    for name, (configs, overrides, _) in variants.items():
        planned = root / f"{name}.plan.json"
        measured = root / f"{name}.json"
        p = json.loads(planned.read_text())["peak"] if planned.exists() else None
        if not measured.exists():
            err = root / f"{name}.error.txt"
            why = err.read_text().splitlines()[0] if err.exists() else "not run"
            lines.append(f"| {name} | {' '.join(Path(c).name for c in configs)} {' '.join(overrides)} | "
                         f"{p / 2**30 if p else float('nan'):.2f} | {why} | | | |")
            continue
        m = json.loads(measured.read_text())
        g = 2**30
        ratio = f"{m['peak_allocated'] / p:.2f}" if p else "-"
        secs = ", ".join(f"{s:.1f}" for s in m["seconds_per_iteration"])
        lines.append(f"| {name} | {' '.join(Path(c).name for c in configs)} {' '.join(overrides)} | "
                     f"{p / g if p else float('nan'):.2f} | {m['peak_allocated'] / g:.2f} | {ratio} | "
                     f"{m['peak_reserved'] / g:.2f} | {secs} |")
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
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    variants = SMOKE if args.smoke else VARIANTS
    if args.only:
        unknown = set(args.only) - set(variants)
        if unknown:
            p.error(f"--only: unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
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
