"""FSDP smoke test: the tiny SD1.5 run under ``trainer.strategy: fsdp`` against the same run without it.

Lightning runs FSDP on CUDA only, so the project's CPU suite never runs it (README, "Scale-out").
On one GPU FSDP shards nothing, but every FSDP-aware path of the code runs: the module wrapped by
``FSDPStrategy``, the LoRA adapter trainable on the frozen base (``use_orig_params``), gradient
clipping through the wrapped root's ``clip_grad_norm_`` (``ProGRPOModule.clip_grad_norm``), the
checkpoint save, and ``ExportLoRA`` inside ``summon_full_params``. Both runs use the same seed, so
their logged loss, gradient norm and reward agree step by step to float tolerance when FSDP
computes what the plain run computes; the exported adapters must agree too.

    python -m benchmarks.gpu.fsdp_smoke --out DIR            # CUDA: strategy fsdp vs auto
    python -m benchmarks.gpu.fsdp_smoke --out DIR --smoke    # CPU: the same comparison with ddp
                                                             # (FSDP needs CUDA), the script's path
Each run is the real CLI (``python -m pro_grpo_lightning fit``) in its own process; DIR/fsdp_smoke.json
holds the per-step values, the largest differences, the export check and the verdict.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("train/loss", "train/grad_norm", "reward/mean")


def overlay(out: Path, steps: int) -> dict[str, Any]:
    """The config layered on the tiny SD1.5 one: a CSV log, a last checkpoint and the LoRA export in
    ``out``, no sample images (a YAML file may be JSON)."""
    return {"trainer": {
        "max_steps": steps, "enable_progress_bar": False, "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": out.as_posix(), "name": "run"}},
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": (out / "ckpt").as_posix(), "save_last": True}},
                      {"class_path": "pro_grpo_lightning.export.ExportLoRA",
                       "init_args": {"dirpath": (out / "lora").as_posix()}}]},
        "model": {"samples": {"every_n_rollouts": 0}}}


#: a smaller run than the config's: T = 4, 32 px, 4 -> 2 trajectories (minutes on a busy CPU, seconds on a GPU)
SMALLER = ["--model.backend.init_args.num_steps=4", "--model.backend.init_args.resolution=32",
           "--model.schedule.init_args.group_size=4", "--model.schedule.init_args.checkpoints=[1]",
           "--model.schedule.init_args.keep=[2]"]


def run(strategy: str, accelerator: str, out: Path, steps: int, timeout: float) -> dict[str, Any]:
    """One CLI fit of the tiny SD1.5 config under ``strategy``; its CSV rows by step."""
    out.mkdir(parents=True, exist_ok=True)
    extra = out / "overlay.yaml"
    extra.write_text(json.dumps(overlay(out, steps), indent=1))
    cmd = [sys.executable, "-m", "pro_grpo_lightning", "fit", "--config", str(ROOT / "configs/tiny_sd15.yaml"),
           "--config", str(extra), f"--trainer.strategy={strategy}", f"--trainer.accelerator={accelerator}",
           "--trainer.devices=1", *SMALLER]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        outs = [o.decode(errors="replace") if isinstance(o, bytes) else (o or "") for o in (err.stdout, err.stderr)]
        code, text = -1, "".join(outs) + f"\nTimeoutExpired: stopped after {timeout:.0f}s"
    (out / "log.txt").write_text(text if isinstance(text, str) else str(text))
    result: dict[str, Any] = {"strategy": strategy, "accelerator": accelerator, "returncode": code,
                              "seconds": time.perf_counter() - t0, "command": " ".join(cmd[1:])}
    found = glob.glob(str(out / "run" / "*" / "metrics.csv"))
    rows = []
    if found:
        with open(found[0]) as f:
            rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    result["steps"] = {int(r["step"]): {k: r[k] for k in KEYS if k in r} for r in rows if "train/loss" in r}
    lora = sorted((out / "lora").glob("*.safetensors"))
    result["export"] = [p.name for p in lora]
    if code:
        result["error"] = str(text).strip().splitlines()[-1:] or ["(no output)"]
    return result


def adapter_difference(a: Path, b: Path) -> float | None:
    """Largest absolute difference between two exported adapters (None when either is missing or
    their tensors differ in names)."""
    from safetensors.torch import load_file

    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if not fa or len(fa) != len(fb):
        return None
    worst = 0.0
    for x, y in zip(fa, fb):
        ta, tb = load_file(str(x)), load_file(str(y))
        if ta.keys() != tb.keys():
            return None
        worst = max([worst] + [float((ta[k].float() - tb[k].float()).abs().max()) for k in ta])
    return worst


def compare(plain: dict[str, Any], tested: dict[str, Any], tol: float) -> dict[str, Any]:
    """Per logged key, the largest relative difference over the steps both runs logged."""
    common = sorted(set(plain["steps"]) & set(tested["steps"]))
    diffs: dict[str, float] = {}
    for k in KEYS:
        vals = [(plain["steps"][s][k], tested["steps"][s][k]) for s in common
                if k in plain["steps"][s] and k in tested["steps"][s]]
        if vals:
            diffs[k] = max(abs(a - b) / max(abs(a), 1e-8) for a, b in vals)
    ok = (plain["returncode"] == 0 and tested["returncode"] == 0 and len(common) > 0
          and all(d <= tol for d in diffs.values()) and len(diffs) == len(KEYS))
    return {"steps_compared": common, "max_relative_difference": diffs, "tolerance": tol, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.fsdp_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="CPU: ddp instead of fsdp (FSDP runs on CUDA only)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--timeout-s", type=float, default=None, help="per run (default 240 on a GPU, 900 on CPU)")
    args = p.parse_args(argv)
    accelerator, strategy = ("cpu", "ddp") if args.smoke else ("gpu", "fsdp")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: FSDP runs on CUDA only (use --smoke for the CPU check of this script)")
    timeout = args.timeout_s or (900.0 if args.smoke else 240.0)
    plain = run("auto", accelerator, args.out / "auto", args.steps, timeout)
    tested = run(strategy, accelerator, args.out / strategy, args.steps, timeout)
    verdict = compare(plain, tested, args.tolerance)
    verdict["adapter_max_abs_difference"] = adapter_difference(args.out / "auto" / "lora", args.out / strategy / "lora")
    verdict["ok"] = verdict["ok"] and verdict["adapter_max_abs_difference"] is not None and \
        verdict["adapter_max_abs_difference"] <= args.tolerance
    result = {"tested_strategy": strategy, "runs": [plain, tested], **verdict}
    (args.out / "fsdp_smoke.json").write_text(json.dumps(result, indent=1))
    print(f"[fsdp_smoke] {strategy} vs auto: {'agree' if result['ok'] else 'DIFFER or failed'} "
          f"(max relative differences {verdict['max_relative_difference']}, adapters "
          f"{verdict['adapter_max_abs_difference']}; exit codes {plain['returncode']}, {tested['returncode']})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
