"""The GPU plan: one process per backend builds the real-size architecture once and runs
``floor``, ``rollout_cost`` and ``iteration_cost`` on it (in that order, each writing its files).

    python -m benchmarks.gpu.run_all --backend sd3 --out OUT/sd3      # one backend (run_all.sh loops)
    python -m benchmarks.gpu.run_all --backend sd3 --out DIR --smoke  # same code, CPU, toy size
    python -m benchmarks.gpu.run_all --estimate                       # predicted GPU seconds
    python -m benchmarks.gpu.run_all --summarize OUT                  # OUT/summary.md from the JSONs

Sizes are chosen to fit about 8 minutes for the three backends on one H200 (see ``--estimate``,
from the per-sample timings measured there, in the project's offline notes): P = 1 prompt; SD3.5-M at the paper's
T = 10 and group sizes; SD1.5 at T = 20 (the paper's T = 50 checkpoints scaled: 30, 40 -> 12, 16);
FLUX.1-dev at T = 10 with every group size halved (its per-sample cost is flat from batch 4, so
halving changes no ratio and halves the time). Warm-up: one untimed iteration of the cheapest
schedule, then the timed rounds (2 for rollouts, 1 for iterations).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

PLAN: dict[str, dict[str, Any]] = {
    "sd3": dict(steps=10, group_scale=1.0, train_batch_size=8, timestep_fraction=0.5,
                floor_grid="1,4,8,16,24,48", train_grid="1,4,8", floor_repeats=3, rollout_repeats=2,
                iteration_repeats=1),
    "sd15": dict(steps=20, group_scale=1.0, train_batch_size=8, timestep_fraction=0.5,
                 floor_grid="1,4,8,16,24,48", train_grid="1,4,8", floor_repeats=3, rollout_repeats=2,
                 iteration_repeats=1),
    "flux": dict(steps=10, group_scale=0.5, train_batch_size=2, timestep_fraction=0.5,
                 floor_grid="1,4,8,24", train_grid="1,2", floor_repeats=2, rollout_repeats=2,
                 iteration_repeats=1),
}
SMOKE = dict(steps=4, group_scale=0.25, train_batch_size=4, timestep_fraction=0.5, floor_grid="1,4",
             train_grid="1,2", floor_repeats=1, rollout_repeats=1, iteration_repeats=1)

#: Denoiser forward ms per *physical* sample on one H200 (bf16, 512 px, random weights, eager), measured
#: on the project's device machine before this plan; forward+backward at batch 8: SD1.5 11.8, SD3.5-M 22.9
#: (FLUX: ~3x forward, a guess).
H200_FWD_MS = {"sd15": {1: 33.0, 4: 6.8, 8: 6.1, 16: 3.1, 24: 3.0, 48: 2.9},
               "sd3": {1: 53.3, 4: 12.3, 8: 10.2, 16: 9.4, 24: 9.2, 48: 9.1},
               "flux": {1: 71.1, 4: 53.8, 8: 52.8, 16: 52.1, 24: 51.7, 48: 51.7}}
H200_TRAIN_MS = {"sd15": 11.8, "sd3": 22.9, "flux": 155.0}
CFG = {"sd15": 2, "sd3": 2, "flux": 1}
#: guesses for what the per-sample table does not cover (decode + reward per image, build + import)
PREVIEW_MS = {"sd15": 12.0, "sd3": 12.0, "flux": 12.0}
FIXED_S = {"sd15": 25.0, "sd3": 25.0, "flux": 45.0}


def entry_args(backend: str, plan: dict[str, Any], smoke: bool) -> dict[str, list[str]]:
    common = ["--backend", backend, "--steps", str(plan["steps"]), "--group-scale", str(plan["group_scale"]),
              "--prompts", "1"]
    if smoke:
        common += ["--size", "mini", "--device", "cpu", "--dtype", "float32", "--resolution", "64"]
    else:
        common += ["--size", "full", "--device", "cuda", "--dtype", "bfloat16", "--resolution", "512",
                   "--lora-rank", "32"]
    upd = ["--train-batch-size", str(plan["train_batch_size"]), "--timestep-fraction", str(plan["timestep_fraction"])]
    return {
        "floor": common + upd + ["--batch-sizes", plan["floor_grid"], "--train-batch-sizes", plan["train_grid"],
                                 "--repeats", str(plan["floor_repeats"]), "--warmup", "1"],
        "rollout_cost": common + ["--repeats", str(plan["rollout_repeats"]), "--warmup", "0"],
        "iteration_cost": common + upd + ["--repeats", str(plan["iteration_repeats"]), "--warmup", "0"],
    }


def _per_sample(table: dict[int, float], rows: int) -> float:
    keys = sorted(table)
    if rows <= keys[0]:
        return table[keys[0]]
    for a, b in zip(keys, keys[1:]):
        if rows <= b:  # linear in log2(rows)
            f = (math.log2(rows) - math.log2(a)) / (math.log2(b) - math.log2(a))
            return table[a] + f * (table[b] - table[a])
    return table[keys[-1]]


def estimate(backend: str, plan: dict[str, Any]) -> dict[str, float]:
    """Predicted seconds per stage on one H200 from the per-sample table (denoiser time + previews)."""
    from ..schedules import paper_schedules

    fwd, cfg = H200_FWD_MS[backend], CFG[backend]
    step_s = lambda rows: rows * cfg * _per_sample(fwd, rows * cfg) / 1e3  # noqa: E731
    scheds = paper_schedules(backend, plan["steps"], plan["group_scale"])
    T = plan["steps"]
    roll = sum(step_s(g) for s in scheds for g in s.schedule.group_sizes_per_step(T))
    decodes = 0
    for s in scheds:
        sizes = s.schedule.group_sizes_per_step(T)
        decodes += sum(sizes[c] for c in s.schedule.checkpoints) + (sizes[-1] if s.schedule.final_keep is None
                                                                    else s.schedule.group_size)
    roll += decodes * PREVIEW_MS[backend] / 1e3
    n_train = T - 1 if backend != "sd15" else T
    m = max(1, math.ceil(plan["timestep_fraction"] * n_train))
    pairs = sum(s.schedule.final_size * m for s in scheds)
    upd = pairs * cfg * H200_TRAIN_MS[backend] / 1e3
    grid = [int(x) for x in plan["floor_grid"].split(",")]
    floor = (1 + plan["floor_repeats"]) * (sum(step_s(r) for r in grid)
                                           + sum(int(x) * cfg * H200_TRAIN_MS[backend] / 1e3
                                                 for x in plan["train_grid"].split(",")))
    out = {"fixed (import, build, warm-up)": FIXED_S[backend], "floor": floor,
           "rollout_cost": plan["rollout_repeats"] * roll,
           "iteration_cost": plan["iteration_repeats"] * (roll + upd)}
    out["total"] = sum(out.values())
    return out


def run_backend(backend: str, out: Path, smoke: bool, extra: list[str] | None = None) -> None:
    """Build ``backend`` once and run the three measurements into ``out/<name>/``.
    ``extra``: more arguments for every entry point (e.g. ``--schedule`` to trim a test run)."""
    from .. import floor, iteration_cost, rollout_cost
    from ..harness import build_bench
    from ..report import logger

    plan = SMOKE if smoke else PLAN[backend]
    argv = {k: v + list(extra or []) for k, v in entry_args(backend, plan, smoke).items()}
    log = logger()
    args = floor.parser().parse_args(argv["floor"] + ["--out", str(out / "floor")])
    bench = build_bench(args)
    log(f"{backend}: built {type(bench.backend).__name__} in {bench.build_s:.1f}s on {bench.device}")
    # warm-up: one untimed iteration of the cheapest schedule (every kernel, decode, reward, update)
    from pro_grpo_lightning.update import UpdateSettings

    cheapest = min(bench.schedules, key=lambda s: s.schedule.nfe_per_prompt(bench.num_steps))
    opt = __import__("torch").optim.AdamW(bench.backend.trainable_parameters(), lr=1e-5)
    upd = UpdateSettings(train_batch_size=plan["train_batch_size"], timestep_fraction=plan["timestep_fraction"])
    t0 = time.perf_counter()
    iteration_cost.iteration_task(bench, cheapest, upd, opt, 0, False)()
    log(f"warm-up iteration ({cheapest.name}) {time.perf_counter() - t0:.1f}s")
    for name, mod in (("floor", floor), ("rollout_cost", rollout_cost), ("iteration_cost", iteration_cost)):
        t0 = time.perf_counter()
        try:
            mod.main(argv[name] + ["--out", str(out / name)], bench=bench)
        except Exception as err:  # noqa: BLE001 - keep going: the next measurement may still fit
            import traceback

            traceback.print_exc()
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "error.txt").write_text(f"{type(err).__name__}: {err}\n")
        log(f"{name} took {time.perf_counter() - t0:.1f}s")
        if bench.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def summarize(root: Path) -> str:
    """OUT/summary.md: every table and target found under OUT (missing parts say so)."""
    lines = [f"# Benchmark results under {root}", ""]
    for b in ("sd3", "sd15", "flux"):
        lines += [f"## {b}", ""]
        for name in ("floor", "rollout_cost", "iteration_cost"):
            d = root / b / name
            js = d / f"{name}.json"
            if not js.exists():
                err = d / "error.txt"
                lines += [f"### {name}: not measured" + (f" ({err.read_text().strip()})" if err.exists() else ""), ""]
                continue
            data = json.loads(js.read_text())
            s = data["settings"]
            lines += [f"### {name}", "",
                      f"{s['backend_class']} ({s['denoiser_class']}, {_count(s['denoiser_params'])} frozen + "
                      f"{_count(s['lora_params'])} LoRA), {s['resolution']} px, T={s['num_steps']}, "
                      f"{s['dtype']}, {data['meta']['device_name']}", "",
                      (d / f"{name}.md").read_text().strip(), ""]
            for tname, t in (data.get("targets") or {}).items():
                lines.append(f"- target `{tname}`: {'met' if t['met'] else 'MISSED'}: "
                             + ", ".join(f"{k} {v:+.3f}" for k, v in t["value"].items()))
            lines.append("")
    text = "\n".join(lines)
    (root / "summary.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=sorted(PLAN))
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, 'mini' size builders, toy schedules")
    p.add_argument("--estimate", action="store_true", help="print predicted GPU seconds and exit")
    p.add_argument("--summarize", type=Path, metavar="OUT", help="write OUT/summary.md and exit")
    a = p.parse_args(argv)
    if a.estimate:
        total = 0.0
        for b in ("sd3", "sd15", "flux"):
            est = estimate(b, PLAN[b])
            total += est["total"]
            print(f"{b}: " + ", ".join(f"{k} {v:.0f}s" for k, v in est.items()))
        print(f"all three: {total:.0f}s ({total / 60:.1f} min) predicted on one H200")
        return
    if a.summarize:
        print(summarize(a.summarize))
        return
    if not a.backend or not a.out:
        p.error("--backend and --out are required (or --estimate / --summarize)")
    if not a.smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: use --smoke for the CPU check")
    run_backend(a.backend, a.out, a.smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
