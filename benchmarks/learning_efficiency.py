"""Learning efficiency: does Pro-GRPO reach plain GRPO's final held-out reward in less wall time?

    python -m benchmarks.learning_efficiency [--config configs/quickstart.yaml]
        [--preset main|gmax|checkpoints] [--arms "grpo=plain:6" "pro=pro:16>10@4>6@6" ...]
        [--seeds 5] [--budget-s 600] [--snapshot-every-s 60] [--eval-samples 2] [--eval-prompts N]
        [--jobs 2] [--max-rollouts N] [--set KEY=VALUE ...] [--out DIR] [--list-arms]

Every arm (a group schedule, ``[name=]plain:G | static:G>K | pro:G>k1@c1>k2@c2``) trains the shapes
task's policy from the same pretrained model for the same wall-clock TRAINING budget, at the same
final (trained) group size K, once per seed. One (arm, seed) run is one subprocess with one torch
thread; ``--jobs`` run at a time, seed-major (seed 0 of every arm, then seed 1, ...) so the load of
a shared machine spreads evenly over the arms.

A run (``benchmarks.learning_runs``): the module and datamodule come from the config through the
library's CLI (``cli.main(run=False)``) with the arm's schedule and the seed (``seed_everything``,
``model.seed``, ``data.seed``) overriding it, no logger, no checkpoints. A callback measures training wall time (``perf_counter`` from
``on_train_start``, i.e. after the weights are loaded, minus the time the callback itself spends),
records every rollout, and keeps a CPU copy of the trainable (LoRA) weights at t = 0, every
``--snapshot-every-s`` seconds of training time, at the last rollout that ended within the budget
and at the end. It stops training at the first rollout that ends past the budget (or at
``--max-rollouts``). Then, outside the budget, every snapshot is scored on the held-out prompts
with fixed noise (``evaluate_shapes(..., seed=1000)``: every snapshot of every arm sees the same
noise). Written to ``<out>/runs/<arm>_seed<k>.json``; a run whose file exists with the same
settings is skipped, so an interrupted benchmark resumes.

Aggregation (``benchmarks.learning_report``; the statistics in ``benchmarks.stats``): each seed's
held-out reward is a step function of training wall time (and of rollouts): the last snapshot at or
before t. Over seeds: mean and a 95% t-interval (scipy's t quantile).
Final reward = the curve at the budget (the last snapshot whose rollout ended within it).
Target = the reference (first ``plain:``) arm's final mean; an arm's time to target = the first
snapshot time at which its seed-mean curve reaches it; speed-up = budget / that time, with a
bootstrap interval over seeds (both arms resampled). Difference of final rewards vs the reference:
Welch t-interval (``scipy.stats.ttest_ind``). Times to target are only as fine as the snapshots (an
upper bound, rounded up to the next snapshot of some seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from .learning_arms import PRESETS, preset_arms, resolve_arms
from .learning_report import aggregate, meta, plot, table
from .learning_runs import (DEFAULT_CONFIG, EVAL_SEED, existing_run, parse_sets, read_config, resolve_config,
                            run_one, run_queue, run_settings)
from .report import SCHEMA_VERSION, logger, out_dir, write_outputs
from .schedules import reference
from .stats import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED

NAME = "learning_efficiency"


# ---- entry point -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"the shapes-task training config (default: {DEFAULT_CONFIG} in the repository)")
    p.add_argument("--preset", choices=PRESETS, default="main",
                   help="main: grpo / static OVF / pro at the config's sizes; paper: main plus plain GRPO at "
                        "2K (the paper's comparison); gmax: Pro-GRPO G_max ablation; "
                        "checkpoints: early / middle / late checkpoints (each with grpo as the reference)")
    p.add_argument("--arms", nargs="+", default=None,
                   help="'[name=]plain:G' | 'static:G>K' | 'pro:G>k1@c1>k2@c2[/rule]'; replaces the preset")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per arm")
    p.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock budget per run (s)")
    p.add_argument("--snapshot-every-s", type=float, default=60.0, help="weight snapshot interval (training s)")
    p.add_argument("--eval-samples", type=int, default=2, help="held-out samples per prompt and snapshot")
    p.add_argument("--eval-prompts", type=int, default=None, help="only the first N held-out prompts (quick runs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--max-rollouts", type=int, default=None, help="also stop a run after N rollouts")
    p.add_argument("--set", dest="set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra CLI override for every run, e.g. data.prompts_per_step=4")
    p.add_argument("--allow-unequal-k", action="store_true", help="allow arms with different final group sizes")
    p.add_argument("--list-arms", action="store_true", help="print the arms and exit")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--out", default=None, help=f"output folder (default benchmarks/results/{NAME})")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.seeds < 1 or args.jobs < 1 or args.eval_samples < 1:
        raise ValueError("--seeds, --jobs and --eval-samples must be >= 1")
    if args.budget_s <= 0 or args.snapshot_every_s <= 0:
        raise ValueError("--budget-s and --snapshot-every-s must be > 0")
    if args.max_rollouts is not None and args.max_rollouts < 1:
        raise ValueError("--max-rollouts must be >= 1")
    if args.eval_prompts is not None and not 1 <= args.eval_prompts <= 36:
        raise ValueError("--eval-prompts must be in 1..36 (the held-out prompts)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.worker is not None:
        return run_one(json.loads(args.worker))
    args.sets = parse_sets([s for group in args.set for s in group])
    check_args(args)
    args.config, config_path = resolve_config(args.config or DEFAULT_CONFIG)
    unequal_k = args.allow_unequal_k or (not args.arms and args.preset == "paper")
    if args.arms:
        resolve_arms(args.arms, None, unequal_k)  # the specs' own errors before the config is built
    T, base = read_config(str(config_path), args.sets)
    specs = args.arms if args.arms else preset_arms(args.preset, T, base)
    arms = resolve_arms(specs, T, unequal_k)
    log = logger()
    print(f"arms ({'--arms' if args.arms else 'preset ' + args.preset}, T = {T}, reference = {reference(arms).name}):")
    for a in arms:
        print(f"  {a.name:12s} {a.spec:24s} {a.describe(T)}; NFE/prompt {a.schedule.nfe_per_prompt(T)}")
    if args.list_arms:
        return {"arms": [{"name": a.name, "spec": a.spec} for a in arms]}
    notes = []
    if args.seeds < 5:
        notes.append(f"only {args.seeds} seed(s): intervals are wide or absent (use >= 5)")
    out = out_dir(args, NAME)
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    config_sha = hashlib.sha256(config_path.read_bytes()).hexdigest()
    tasks, skipped = [], 0
    for seed in range(args.seeds):  # seed-major: machine load spreads evenly over the arms
        for arm in arms:
            path = runs_dir / f"{arm.name}_seed{seed}.json"
            settings = run_settings(args, arm, seed, config_sha)
            if existing_run(path, settings) is not None:
                skipped += 1
                continue
            tasks.append({"arm": arm.name, "settings": settings, "config_path": str(config_path), "run_file": str(path),
                          "log_file": str(runs_dir / f"{arm.name}_seed{seed}.log")})
    log(f"{len(tasks)} run(s) to do, {skipped} reused from {runs_dir}; budget {args.budget_s:.0f} s each, "
        f"{args.jobs} at a time")
    failures = run_queue(tasks, args.jobs, log)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed:\n" + "\n\n".join(failures))
    runs_by_arm = {a.name: [json.loads((runs_dir / f"{a.name}_seed{s}.json").read_text())
                            for s in range(args.seeds)] for a in arms}
    result = aggregate(runs_by_arm, arms, args.budget_s, T)
    capped = sorted({a for a, runs in runs_by_arm.items() for r in runs if r["stopped_by"] != "budget"})
    if capped:
        notes.append(f"runs of {capped} stopped before the budget (--max-rollouts or the data ran out): their "
                     f"last weights count until the budget, so the comparison is not at equal training time")
    if not result["start_reward_identical"]:
        notes.append("the t = 0 held-out rewards differ between runs: the runs did not start from the same "
                     "weights or the evaluation noise is not fixed")
    tab = table(result, args.budget_s)
    print(tab)
    for n in notes:
        print("note:", n)
    payload = {"benchmark": NAME, "schema_version": SCHEMA_VERSION, "meta": meta(),
               "settings": {"config": args.config, "config_sha256": config_sha, "num_steps": T,
                            "preset": None if args.arms else args.preset, "budget_s": args.budget_s,
                            "snapshot_every_s": args.snapshot_every_s, "eval_samples": args.eval_samples,
                            "eval_prompts": args.eval_prompts, "eval_seed": EVAL_SEED, "seeds": args.seeds,
                            "jobs": args.jobs, "max_rollouts": args.max_rollouts,
                            "set": [list(kv) for kv in args.sets], "bootstrap_samples": BOOTSTRAP_SAMPLES,
                            "bootstrap_seed": BOOTSTRAP_SEED,
                            "arms": [{"name": a.name, "spec": a.spec, "kind": a.kind, "sizes": a.schedule.sizes(),
                                      "checkpoints": a.schedule.checkpoints, "rule": a.schedule.rule,
                                      "final_size": a.schedule.final_size,
                                      "nfe_per_prompt": a.schedule.nfe_per_prompt(T)} for a in arms]},
               "notes": notes, **result,
               "runs": {a.name: [f"runs/{a.name}_seed{s}.json" for s in range(args.seeds)] for a in arms}}
    title = (f"Held-out reward at equal training wall time: {Path(args.config).name}, T={T}, "
             f"{args.seeds} seed(s), budget {args.budget_s:.0f} s, 1 thread/run, {args.jobs} run(s) at a time")
    paths = write_outputs(out, NAME, payload, tab, None if args.no_plot else lambda p: plot(result, title, p))
    log(f"wrote {paths}")
    return payload


if __name__ == "__main__":
    main()
