"""Aggregating the learning-efficiency runs (curves over seeds, final rewards, time to the reference's
final reward, speed-ups) and reporting them: the table, the figure and the JSON's ``meta``.
Pure functions of the run files (``benchmarks.stats`` does the statistics); no model, no torch
except in ``meta``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import git_commit, markdown_table, new_figure, save_figure
from .schedules import NamedSchedule, reference
from .stats import bootstrap_speedup, mean_ci, mean_curve, speedup, step_value, time_to_target, welch_interval

GRID_POINTS = 201  # resolution of the curves written to the JSON and plotted


def wall_curve(run: dict[str, Any], key: str = "reward") -> list[tuple[float, float]]:
    """(wall_s, value) of the snapshots within the budget."""
    return [(p["wall_s"], p[key]) for p in run["curve"] if p["within_budget"]]


def rollout_curve(run: dict[str, Any], key: str = "reward") -> list[tuple[float, float]]:
    return sorted(((p["rollouts"], p[key]) for p in run["curve"]), key=lambda x: x[0])


def final_value(run: dict[str, Any], budget: float, key: str = "reward") -> float:
    return step_value(wall_curve(run, key), budget)


def rollouts_in_budget(run: dict[str, Any]) -> int:
    return max(p["rollouts"] for p in run["curve"] if p["within_budget"])


def aggregate(runs_by_arm: dict[str, list[dict[str, Any]]], arms: Sequence[NamedSchedule], budget: float,
              T: int) -> dict[str, Any]:
    """Per-arm curves and summaries, the target and every arm's time to it (see the module docstring)."""
    ref = reference(arms).name
    ref_finals = [final_value(r, budget) for r in runs_by_arm[ref]]
    target = sum(ref_finals) / len(ref_finals)
    wall_grid = [budget * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    max_r = max(p["rollouts"] for runs in runs_by_arm.values() for r in runs for p in r["curve"])
    step = max(1, math.ceil(max_r / (GRID_POINTS - 1)))
    roll_grid = list(range(0, max_r + 1, step)) + ([max_r] if max_r % step else [])
    out: dict[str, Any] = {}
    for arm in arms:
        runs = sorted(runs_by_arm[arm.name], key=lambda r: r["seed"])
        curves = [wall_curve(r) for r in runs]
        finals = [final_value(r, budget) for r in runs]
        exact = [final_value(r, budget, "exact") for r in runs]
        t = time_to_target(curves, target, budget)
        logs = [row for r in runs for row in r["train_log"]]
        compute = {}
        for key in ("compute/nfe", "compute/previews", "compute/nfe_saved_frac", "time/rollout_denoise_s",
                    "time/rollout_preview_s", "time/rollout_final_s", "time/update_s"):
            vals = [row[key] for row in logs if row.get(key) is not None]
            if vals:
                compute[key + " (mean per rollout)"] = sum(vals) / len(vals)
        walls = [r["wall_total_s"] / r["rollouts_total"] for r in runs if r["rollouts_total"]]
        s = arm.schedule
        out[arm.name] = {
            "spec": arm.spec, "kind": arm.kind, "describe": arm.describe(T), "final_size": s.final_size,
            "nfe_per_prompt": s.nfe_per_prompt(T), "seeds": [r["seed"] for r in runs],
            "curve_wall": mean_curve(curves, wall_grid),
            "curve_rollouts": mean_curve([rollout_curve(r) for r in runs], roll_grid,
                                         [max(p["rollouts"] for p in r["curve"]) for r in runs]),
            "final_reward": dict(mean_ci(finals), values=finals),
            "final_exact": dict(mean_ci(exact), values=exact),
            "rollouts_in_budget": dict(mean_ci([rollouts_in_budget(r) for r in runs]),
                                       values=[rollouts_in_budget(r) for r in runs]),
            "wall_s_per_rollout": mean_ci(walls)["mean"] if walls else None,
            "stopped_by": [r["stopped_by"] for r in runs],
            "delta_vs_reference": welch_interval(finals, ref_finals),
            "time_to_target": {"time_s": t, "reached": t is not None, "reached_at_start": t == 0,
                               "speedup": speedup(budget, t),  # inf (reached at t = 0) is written as null
                               "bootstrap": bootstrap_speedup(ref_finals, curves, budget)},
            "compute": compute,
            "start_reward": [r["curve"][0]["reward"] for r in runs],
        }
    starts = {round(v, 9) for a in out.values() for v in a["start_reward"]}
    return {"reference": ref, "target": target, "target_definition":
            f"mean over seeds of {ref!r}'s held-out reward at the budget", "arms": out,
            "start_reward_identical": len(starts) == 1}


# ---- report ----------------------------------------------------------------------------------------------
def _pm(s: dict[str, Any], digits: int = 3) -> str:
    if s.get("mean", s.get("diff")) is None:
        return "n/a"
    m = s.get("mean", s.get("diff"))
    if s.get("lo") is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def _speed(x: float | None) -> str:
    if x is None:
        return "not reached"
    return "inf (at start)" if math.isinf(x) else f"{x:.2f}x"


def table(result: dict[str, Any], budget: float) -> str:
    ref = result["reference"]
    rows = []
    for name, a in result["arms"].items():
        tt = a["time_to_target"]
        if name == ref:
            own = "n/a" if tt["time_s"] is None else f"{tt['time_s']:.0f} s"
            delta, when, spd = "reference", f"{own} (its own final)", "reference"
        else:
            delta = _pm({"diff": a["delta_vs_reference"]["diff"], "lo": a["delta_vs_reference"]["lo"],
                         "hi": a["delta_vs_reference"]["hi"]})
            delta = ("+" if (a["delta_vs_reference"]["diff"] or 0) >= 0 else "") + delta
            when = "not reached within budget" if tt["time_s"] is None else f"{tt['time_s']:.0f} s"
            b, spd = tt["bootstrap"], _speed(tt["speedup"])
            if b["samples"] and len(a["seeds"]) > 1 and len(result["arms"][ref]["seeds"]) > 1:
                spd += f" [{_speed(b['lo'])}, {_speed(b['hi'])}]"
                if b["never_frac"]:
                    spd += f"; not reached in {100 * b['never_frac']:.0f} % of resamples"
        rows.append([name, f"`{a['spec']}`", len(a["seeds"]), f"{a['rollouts_in_budget']['mean']:.1f}",
                     _pm(a["final_reward"]), _pm(a["final_exact"]), delta, when, spd])
    head = ["arm", "spec", "seeds", "rollouts in budget (mean)", "final held-out reward [95% CI]",
            "exact-rate [95% CI]", f"Δ vs {ref} [95% CI]", f"time to {ref}'s final ({result['target']:.3f})",
            f"speed-up = {budget:.0f} s / time [bootstrap 95%]"]
    return markdown_table(head, rows)


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    plt, fig, axes = new_figure(2)
    nan = float("nan")
    for i, (name, a) in enumerate(result["arms"].items()):
        color = f"C{i}"
        for ax, key in ((axes[0], "curve_wall"), (axes[1], "curve_rollouts")):
            c = a[key]
            f = lambda vals: [nan if v is None else v for v in vals]  # noqa: E731
            ax.plot(c["x"], f(c["mean"]), color=color, label=f"{name} ({a['spec']}, n={len(a['seeds'])})",
                    drawstyle="steps-post")
            if len(a["seeds"]) > 1:
                ax.fill_between(c["x"], f(c["lo"]), f(c["hi"]), color=color, alpha=0.18, step="post", linewidth=0)
    for ax in axes:
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, -0.02), min(hi, 1.02))  # rewards lie in [0, 1]; t-bands of few seeds may not
        ax.axhline(result["target"], color="0.4", linestyle="--", linewidth=0.8,
                   label=f"target: {result['reference']}'s final")
        ax.set_ylabel("held-out reward (mean over seeds, 95% band)")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training wall time (s)")
    axes[1].set_xlabel("rollouts")
    axes[0].legend(fontsize=7, loc="lower right")
    save_figure(plt, fig, path, title)


def meta() -> dict[str, Any]:
    import lightning
    import torch

    return {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "device": "cpu",
            "device_name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads_per_run": 1, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
