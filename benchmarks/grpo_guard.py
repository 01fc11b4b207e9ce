"""GRPO-Guard on the shapes task: the log-ratio's distribution per step, and the held-out reward.

    python -m benchmarks.grpo_guard [--config configs/quickstart.yaml] [--seeds 5] [--first-seed 0] [--rollouts 30]
        [--eval-samples 2] [--eval-prompts N] [--jobs 2] [--set KEY=VALUE ...] [--out DIR]
    python -m benchmarks.grpo_guard --report DIR      (re-aggregate stored run files only)

Two arms train the config's policy (the pretrained tiny shapes SD3 model of the quickstart, its
Pro-GRPO schedule) for the same number of rollouts, once per seed, identical but for
``model.update.ratio_norm``: ``none`` (the plain PPO ratio) and ``grpo_guard`` (GRPO-Guard's
RatioNorm and 1 / (-dt) step reweighting, ``objectives.guard_log_ratio``; arXiv 2510.22319).
Every run sets ``model.update.minibatches_per_step`` (default 2 here, ``--set`` overrides): with
the quickstart's single optimizer step per rollout every minibatch is on-policy (ratio exactly 1)
and there would be no ratio distribution to see.

A run is one worker subprocess of ``benchmarks.learning_runs.run_one`` (one torch thread; the
module built by the library's CLI from the config, no logger), stopped after ``--rollouts``
rollouts; the held-out reward (``evaluate_shapes``, 36 held-out prompts, fixed noise) is measured
before training and at the end. Every rollout's logged ``train/*`` scalars are kept: per trained
step t the clipped log-ratio's mean, skewness and clip fractions on each side
(``train/log_ratio_mean/step_t``, ...) and the raw log-ratio's mean (``raw_log_ratio_mean``).

Aggregation: per arm and step, each seed's mean over its rollouts, then the mean over seeds with a
95 % t-interval (``benchmarks.stats.mean_ci``). The held-out reward at equal rollouts: guard - plain
with a Welch interval (``benchmarks.stats.welch_interval``), the smallest difference detectable
with 80 % power (``benchmarks.evidence_power.mdd80``) and the power to detect a difference as
large as the plain arm's whole training gain (``evidence_power.power``). Run files
(``runs/<arm>_seed<k>.json``; ``--report`` also reads ``run_files/``, the name stored results use
since ``runs/`` is git-ignored) are reused when their settings match, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from .evidence_power import mdd80, power
from .learning_runs import (DEFAULT_CONFIG, EVAL_SEED, existing_run, parse_sets, read_config, resolve_config,
                            run_queue)
from .report import json_safe
from .stats import mean_ci, welch_interval

NAME = "grpo_guard"
ARMS = {"plain": "none", "guard": "grpo_guard"}  # arm name -> model.update.ratio_norm
STATS = ("log_ratio_mean", "log_ratio_skew", "clip_frac_low", "clip_frac_high", "raw_log_ratio_mean")
#: per-rollout scalars over all trained pairs (``train/<name>``), compared guard - plain
POOLED = ("log_ratio_mean", "raw_log_ratio_mean", "log_ratio_std", "log_ratio_skew", "clip_frac_low",
          "clip_frac_high", "clip_frac", "grad_norm")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a shapes-task training config")
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm: first-seed .. first-seed + N - 1")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (to add seeds in another process)")
    p.add_argument("--rollouts", type=int, default=30, help="rollouts per run (equal for both arms)")
    p.add_argument("--eval-samples", type=int, default=2, help="held-out samples per prompt")
    p.add_argument("--eval-prompts", type=int, default=None, help="only the first N held-out prompts (quick runs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--set", dest="set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra CLI override for both arms (model.update.ratio_norm is the benchmark's)")
    p.add_argument("--out", default=f"benchmarks/results/{NAME}", help="output folder")
    p.add_argument("--report", default=None, metavar="DIR", help="only aggregate DIR's stored run files")
    return p


def run_settings(args: argparse.Namespace, arm: str, seed: int, spec: str, sets: list[tuple[str, str]],
                 config_sha: str) -> dict[str, Any]:
    """A worker's settings (what ``learning_runs.run_one`` reads) and what a stored run must match."""
    return {"config": args.config, "config_sha256": config_sha, "arm": arm, "spec": spec, "seed": seed,
            "budget_s": 1e9, "snapshot_every_s": 1e9, "eval_samples": args.eval_samples,
            "eval_prompts": args.eval_prompts, "eval_seed": EVAL_SEED, "max_rollouts": args.rollouts,
            "set": [list(kv) for kv in sets], "jobs": args.jobs}


def schedule_spec(schedule: Any) -> str:
    """The ``benchmarks.schedules`` spec of the config's Pro-GRPO / plain schedule."""
    sizes, cps = schedule.sizes(), schedule.checkpoints
    if not cps:
        return f"plain:{sizes[0]}"
    return f"pro:{sizes[0]}" + "".join(f">{k}@{c}" for k, c in zip(sizes[1:], cps)) + f"/{schedule.rule}"


def rollout_values(run: dict[str, Any]) -> tuple[dict[str, dict[int, list[float]]], dict[str, list[float]]]:
    """A run's per-rollout values from its ``train_log`` (NaN entries skipped): per step
    ``{stat: {step: [..]}}`` for ``STATS``, and over all trained pairs ``{name: [..]}`` for ``POOLED``
    plus ``clip_frac_low_minus_high`` (the clip's asymmetry)."""
    steps: dict[str, dict[int, list[float]]] = {s: {} for s in STATS}
    pooled: dict[str, list[float]] = {}
    for row in run["train_log"]:
        for key, val in row.items():
            if not key.startswith("train/") or val is None or not math.isfinite(val):
                continue
            name = key[len("train/"):]
            if "/step_" in name:
                stat, step = name.split("/step_")
                if stat in steps:
                    steps[stat].setdefault(int(step), []).append(float(val))
            elif name in POOLED:
                pooled.setdefault(name, []).append(float(val))
        if all(isinstance(row.get(f"train/clip_frac_{side}"), float) for side in ("low", "high")):
            pooled.setdefault("clip_frac_low_minus_high", []).append(row["train/clip_frac_low"] - row["train/clip_frac_high"])
    return steps, pooled


def units(runs: list[dict[str, Any]], unit: str) -> tuple[dict[str, dict[int, list[float]]], dict[str, list[float]]]:
    """The samples an interval is over: each seed's mean over its rollouts (``unit='seeds'``) or
    every rollout of every seed (``'rollouts'``: consecutive rollouts of one run share a policy, so
    such an interval is optimistic; used only when an arm has fewer than 2 seeds)."""
    steps: dict[str, dict[int, list[float]]] = {s: {} for s in STATS}
    pooled: dict[str, list[float]] = {}
    for run in runs:
        st, po = rollout_values(run)
        for stat, by_step in st.items():
            for t, vals in by_step.items():
                steps[stat].setdefault(t, []).extend([sum(vals) / len(vals)] if unit == "seeds" else vals)
        for name, vals in po.items():
            pooled.setdefault(name, []).extend([sum(vals) / len(vals)] if unit == "seeds" else vals)
    return steps, pooled


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm, stat and step the mean with a 95 % interval over seeds (over rollouts when an arm has
    a single seed: ``unit``); the same over all trained pairs (``pooled``, with guard - plain Welch
    intervals); held-out rewards and their comparison."""
    unit = "seeds" if min(len(rs) for rs in runs.values()) >= 2 else "rollouts"
    samples = {arm: units(rs, unit) for arm, rs in runs.items()}
    per_step = {arm: {stat: {str(t): mean_ci(v) for t, v in sorted(by_step.items())} for stat, by_step in st.items()}
                for arm, (st, _) in samples.items()}
    pooled_ci = {arm: {k: mean_ci(v) for k, v in sorted(po.items())} for arm, (_, po) in samples.items()}
    pooled_cmp = {}
    if {"plain", "guard"} <= set(samples):
        for k, v in samples["plain"][1].items():
            if k in samples["guard"][1]:
                pooled_cmp[k] = welch_interval(samples["guard"][1][k], v)
    held: dict[str, dict[str, Any]] = {}
    for arm, rs in runs.items():
        start = [next(p for p in r["curve"] if p["kind"] == "start") for r in rs]
        end = [next(p for p in r["curve"] if p["kind"] == "end") for r in rs]
        held[arm] = {"rollouts": [e["rollouts"] for e in end],
                     **{f"{k}_{when}": mean_ci([p[k] for p in pts]) | {"values": [p[k] for p in pts]}
                        for k in ("reward", "exact") for when, pts in (("start", start), ("end", end))},
                     "gain": mean_ci([e["reward"] - s["reward"] for s, e in zip(start, end)])}
    comparison = {}
    if {"plain", "guard"} <= set(held):
        for key in ("reward", "exact"):
            a, b = held["guard"][f"{key}_end"]["values"], held["plain"][f"{key}_end"]["values"]
            w = welch_interval(a, b)
            cmp: dict[str, Any] = dict(w)
            if len(a) > 1 and len(b) > 1:
                va, vb = _var(a), _var(b)
                se = math.sqrt(va / len(a) + vb / len(b))
                df = (va / len(a) + vb / len(b)) ** 2 / (
                    (va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1)) if se > 0 else float("inf")
                cmp["se"], cmp["df"], cmp["mdd80"] = se, df, mdd80(se, df) if se > 0 else 0.0
                gain = held["plain"]["gain"]["mean"] if key == "reward" else None
                if gain is not None and se > 0:
                    cmp["plain_gain"] = gain
                    cmp["power_at_plain_gain"] = power(abs(gain), se, df)
            comparison[key] = cmp
    return {"unit": unit, "per_step": per_step, "pooled": pooled_ci, "pooled_guard_minus_plain": pooled_cmp, "heldout": held,
            "guard_minus_plain": comparison, "seeds": {arm: sorted(r["seed"] for r in rs) for arm, rs in runs.items()}}


def _var(x: list[float]) -> float:
    m = sum(x) / len(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)


def table(result: dict[str, Any]) -> str:
    """A markdown table per arm: step, then each stat's mean [95 % interval] over seeds."""
    lines = [f"Per trained step: mean [95 % CI] over {result['unit']} (seeds: {result['seeds']})"]
    for arm, stats in result["per_step"].items():
        lines += [f"\n{arm} (ratio_norm={ARMS.get(arm, arm)}):", "",
                  "| step | " + " | ".join(STATS) + " |", "|---" * (len(STATS) + 1) + "|"]
        steps = sorted({int(t) for s in STATS for t in stats[s]})
        for t in steps:
            cells = []
            for s in STATS:
                c = stats[s].get(str(t))
                cells.append("" if c is None else _fmt(c))
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", f"All trained pairs: mean [95 % CI] over {result['unit']}:", "",
              "| stat | " + " | ".join(result["pooled"]) + " | guard - plain |", "|---" * (len(result["pooled"]) + 2) + "|"]
    for k in next(iter(result["pooled"].values())):
        cells = [_fmt(result["pooled"][arm][k]) if k in result["pooled"][arm] else "" for arm in result["pooled"]]
        diff = result["pooled_guard_minus_plain"].get(k)
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {'' if diff is None else _fmt(diff)} |")
    lines.append("")
    for arm, h in result["heldout"].items():
        lines.append(f"{arm}: held-out reward {_fmt(h['reward_start'])} -> {_fmt(h['reward_end'])} after "
                     f"{h['rollouts']} rollouts; gain {_fmt(h['gain'])}; exact {_fmt(h['exact_start'])} -> "
                     f"{_fmt(h['exact_end'])}")
    for key, c in result["guard_minus_plain"].items():
        extra = f", MDD80 {c['mdd80']:.4f}" if "mdd80" in c else ""
        if "power_at_plain_gain" in c:
            extra += f", power at the plain gain ({c['plain_gain']:+.4f}): {c['power_at_plain_gain']:.2f}"
        lines.append(f"guard - plain, held-out {key}: {_fmt(c)}{extra}")
    d = result.get("design")
    if d is not None:
        lines.append(f"design: held-out reward SD over seeds after {d['rollouts']} rollouts in {d['reference']} "
                     f"({d['arm']}, {len(d['values'])} seeds): {d['sd']:.4f}; MDD80 with n seeds per arm: "
                     + ", ".join(f"n={n}: {v:.4f}" for n, v in d["mdd80_by_seeds"].items()))
    return "\n".join(lines)


def _fmt(c: dict[str, Any]) -> str:
    """``mean [lo, hi]`` of a ``mean_ci`` or ``welch_interval`` (its ``diff``) result."""
    m = c["mean"] if "mean" in c else c["diff"]
    if m is None:
        return "n/a"
    if c.get("lo") is None:
        return f"{m:+.4g}"
    return f"{m:+.4g} [{c['lo']:+.3g}, {c['hi']:+.3g}]"


REFERENCE = "docs/results/learning_efficiency/main/run_files"  # the 5-seed quickstart runs (issue 6)


def design(reference: Path, rollouts: int, arm: str = "pro") -> dict[str, Any]:
    """What a held-out comparison at ``rollouts`` rollouts can resolve, from the seed-to-seed SD of
    the held-out reward after that many rollouts in stored learning-efficiency runs of the same task
    (``reference``, arm ``arm``; interpolated between snapshots, ``evidence_power.at_rollouts``):
    the smallest difference a two-sided 5 % Welch test detects with 80 % power (MDD80) with n seeds
    per arm, both arms with that SD (df = 2n - 2)."""
    from .evidence_power import at_rollouts

    runs = [json.loads(f.read_text()) for f in sorted(reference.glob(f"{arm}_seed*.json"))]
    values = [at_rollouts(r, rollouts) for r in runs]
    sd = math.sqrt(_var(values))
    return {"reference": REFERENCE, "arm": arm, "rollouts": rollouts, "values": values, "sd": sd,
            "mdd80_by_seeds": {n: mdd80(sd * math.sqrt(2 / n), 2 * n - 2) for n in (2, 3, 5, 10, 20)}}


def report(out: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for f in sorted([*(out / "runs").glob("*_seed*.json"), *(out / "run_files").glob("*_seed*.json")]):
        run = json.loads(f.read_text())
        runs.setdefault(run["arm"], []).append(run)
    if not runs:
        raise FileNotFoundError(f"{out}: no run files in runs/ or run_files/")
    result = aggregate(runs)
    reference = Path(__file__).resolve().parent.parent / REFERENCE
    if reference.is_dir():
        rollouts = min(min(h["rollouts"]) for h in result["heldout"].values())
        result["design"] = design(reference, rollouts)
    tab = table(result)
    print(tab)
    (out / f"{NAME}.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    (out / f"{NAME}.md").write_text(tab + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.report is not None:
        return report(Path(args.report))
    if args.seeds < 1 or args.rollouts < 1 or args.jobs < 1 or args.eval_samples < 1:
        raise ValueError("--seeds, --rollouts, --jobs and --eval-samples must be >= 1")
    sets = parse_sets([s for group in args.set for s in group])
    if any(k == "model.update.ratio_norm" for k, _ in sets):
        raise ValueError("--set model.update.ratio_norm: the benchmark sets it per arm")
    if not any(k == "model.update.minibatches_per_step" for k, _ in sets):
        sets.append(("model.update.minibatches_per_step", "2"))
    args.config, config_path = resolve_config(args.config)
    _, schedule = read_config(str(config_path), sets)
    spec = schedule_spec(schedule)
    config_sha = hashlib.sha256(config_path.read_bytes()).hexdigest()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    tasks = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):  # seed-major: the machine's load spreads evenly over the arms
        for arm, mode in ARMS.items():
            path = out / "runs" / f"{arm}_seed{seed}.json"
            settings = run_settings(args, arm, seed, spec, [*sets, ("model.update.ratio_norm", mode)], config_sha)
            if existing_run(path, settings) is None:
                tasks.append({"arm": arm, "settings": settings, "config_path": str(config_path),
                              "run_file": str(path), "log_file": str(out / "runs" / f"{arm}_seed{seed}.log")})
    print(f"{len(tasks)} run(s) to do; schedule {spec}; sets {sets}", flush=True)
    failures = run_queue(tasks, args.jobs, lambda m: print(m, flush=True))
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed:\n" + "\n\n".join(failures))
    return report(out)


if __name__ == "__main__":
    main()

