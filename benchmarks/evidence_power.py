"""What a learning-efficiency design can resolve: power of each comparison, and arms at equal rollouts.

    python -m benchmarks.evidence_power DIR BUDGET_S [--speedups 1.26 1.41]

From a learning-efficiency output folder's run files (``DIR/runs`` or ``DIR/run_files``), for the
held-out reward at the end of the budget:
- every arm against ``grpo`` (and pro - grpo12, pro - static): the Welch difference and interval
  (``benchmarks.stats.welch_interval``), the smallest difference detectable with 80 % power at
  the 5 % level given the observed SDs and seeds, ``MDD80 = (t_{0.975, df} + t_{0.80, df}) * se``,
  and the power (noncentral t, Welch df) to detect the difference a given speed-up implies;
- the difference a speed-up s implies at the end of the budget, if ``grpo``'s mean gain grows
  linearly in training time: ``gain_grpo * (s - 1)`` (an arm that is s times faster has, at the
  budget, the gain plain GRPO would have at s x the budget);
- arms at **equal rollouts**: each run's held-out reward linearly interpolated between its
  snapshots at R = the smallest number of rollouts any ``pro`` run reached, with Welch intervals.
"""

from __future__ import annotations

import argparse
import glob
import json
import math

import numpy as np
from scipy import stats as _st

from .learning_report import final_value
from .stats import mean_ci, welch_interval

PAIRS = (("pro", "grpo12"), ("pro", "static"))


def mdd80(se: float, df: float) -> float:
    """Smallest true difference a two-sided 5 % Welch test detects with 80 % power."""
    return (_st.t.ppf(0.975, df) + _st.t.ppf(0.80, df)) * se


def power(delta: float, se: float, df: float) -> float:
    """Power of the two-sided 5 % t test against a true difference ``delta`` (noncentral t)."""
    crit = _st.t.ppf(0.975, df)
    nc = delta / se
    return float(_st.nct.sf(crit, df, nc) + _st.nct.cdf(-crit, df, nc))


def at_rollouts(run: dict, r: float, key: str = "reward") -> float:
    pts = sorted((p["rollouts"], p[key]) for p in run["curve"])
    xs, ys = zip(*pts)
    if r > xs[-1]:
        raise ValueError(f"run {run['arm']} seed {run['seed']} stops at {xs[-1]} rollouts < {r}")
    return float(np.interp(r, xs, ys))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evidence_power", description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("budget_s", type=float)
    p.add_argument("--speedups", type=float, nargs="+", default=[1.26, 1.41], help="the paper's reported range")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for f in sorted(glob.glob(f"{args.folder}/runs/*.json") or glob.glob(f"{args.folder}/run_files/*.json")):
        with open(f) as fh:
            r = json.load(fh)
        runs.setdefault(r["settings"]["arm"], []).append(r)
    final = {a: [final_value(r, args.budget_s) for r in rs] for a, rs in runs.items()}
    gain_grpo = mean_ci([f - r["curve"][0]["reward"] for f, r in zip(final["grpo"], runs["grpo"])])["mean"]
    implied = {s: gain_grpo * (s - 1) for s in args.speedups}
    out: dict = {"gain_grpo": gain_grpo, "implied_difference": implied, "at_budget": {}, "at_equal_rollouts": {}}
    print(f"grpo's mean gain {gain_grpo:+.4f}; implied end-of-budget differences: "
          + ", ".join(f"{s}x -> {d:+.4f}" for s, d in implied.items()))
    pairs = [(a, "grpo") for a in final if a != "grpo"] + [pr for pr in PAIRS if all(x in final for x in pr)]
    print("--- held-out reward at the end of the budget")
    for a, b in pairs:
        w = welch_interval(final[a], final[b])
        w["mdd80"] = mdd80(w["se"], w["df"])
        w["power"] = {s: power(d, w["se"], w["df"]) for s, d in implied.items()}
        out["at_budget"][f"{a} - {b}"] = w
        print(f"{a} - {b}: {w['diff']:+.4f} [{w['lo']:+.4f}, {w['hi']:+.4f}]  MDD80 {w['mdd80']:.4f}  power "
              + ", ".join(f"{s}x: {pw:.2f}" for s, pw in w["power"].items()))
    if "pro" in runs:
        R = min(max(p["rollouts"] for p in r["curve"]) for r in runs["pro"])
        print(f"--- held-out reward at equal rollouts (R = {R}, interpolated between snapshots)")
        eq = {a: [at_rollouts(r, R) for r in rs] for a, rs in runs.items()
              if all(max(p["rollouts"] for p in r["curve"]) >= R for r in rs)}
        out["at_equal_rollouts"]["R"] = R
        for a, b in [(x, y) for x, y in pairs if x in eq and y in eq]:
            w = welch_interval(eq[a], eq[b])
            w["mdd80"] = mdd80(w["se"], w["df"])
            out["at_equal_rollouts"][f"{a} - {b}"] = w
            print(f"{a} - {b}: {w['diff']:+.4f} [{w['lo']:+.4f}, {w['hi']:+.4f}]  MDD80 {w['mdd80']:.4f}")
    n = len(final["grpo"])
    sd = mean_ci(final["grpo"])["sd"]
    need = math.ceil(2 * ((_st.norm.ppf(0.975) + _st.norm.ppf(0.8)) * sd / min(implied.values())) ** 2)
    out["seeds_needed"] = need
    print(f"seeds per arm for 80 % power at {min(implied.values()):+.4f} (grpo's SD {sd:.4f}, n = {n}): "
          f"about {need} (normal approximation)")
    return out


if __name__ == "__main__":
    main()
