"""Statistics of the learning-efficiency benchmark: pure functions, no torch, no Lightning.

- ``mean_ci``: mean over seeds with a 95 % Student-t interval (df = n - 1), quantile from
  ``scipy.stats.t``.
- ``welch_interval``: difference of two means with a 95 % Welch interval (Welch-Satterthwaite df),
  from ``scipy.stats.ttest_ind(equal_var=False)``.
- Curves: a seed's held-out reward is a step function of training wall time (or rollouts), the
  last snapshot at or before x; ``mean_curve`` puts seeds on one grid, ``time_to_target`` finds where
  their mean first reaches a target.
- ``bootstrap_speedup``: a percentile bootstrap over seeds of the speed-up to a target, written out
  by hand because a resample may never reach the target (no number to interpolate), which
  ``scipy.stats.bootstrap`` has no way to express.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
EPS = 1e-12  # "reaches the target": mean >= target - EPS (float noise of equal means)
LEVEL = 0.95  # every interval here is two-sided 95 %


def t975(df: float) -> float:
    """t_{0.975, df}, the two-sided 95 % Student-t quantile (df real, > 0)."""
    if not df > 0:
        raise ValueError(f"t975 needs df > 0, got {df}")
    return float(_st.t.ppf(0.5 + LEVEL / 2, df))


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval (df = n - 1) of ``values``; lo/hi None for n < 2."""
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    n = int(vals.size)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    m = float(vals.mean())
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = float(vals.std(ddof=1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "sd": sd}


def welch_interval(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) with a 95 % Welch t-interval; lo/hi None if a side has < 2 values, a point
    interval if neither side varies (scipy's test is undefined there)."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        return {"diff": None, "lo": None, "hi": None, "df": None, "se": None}
    diff = float(xa.mean() - xb.mean())
    if xa.size < 2 or xb.size < 2:
        return {"diff": diff, "lo": None, "hi": None, "df": None, "se": None}
    se = math.sqrt(xa.var(ddof=1) / xa.size + xb.var(ddof=1) / xb.size)
    if se == 0.0:
        return {"diff": diff, "lo": diff, "hi": diff, "df": None, "se": 0.0}
    with warnings.catch_warnings():
        # one side without spread (e.g. two seeds with the same exact rate) is legitimate: its
        # variance is exactly 0 and the interval comes from the other side; scipy warns regardless
        warnings.filterwarnings("ignore", message="Precision loss", category=RuntimeWarning)
        test = _st.ttest_ind(xa, xb, equal_var=False)
    ci = test.confidence_interval(confidence_level=LEVEL)
    return {"diff": diff, "lo": float(ci.low), "hi": float(ci.high), "df": float(test.df), "se": se}


# ---- curves ---------------------------------------------------------------------------------------------
Curve = Sequence[tuple[float, float]]  # (x, y) snapshots of one seed, x non-decreasing


def step_value(points: Curve, x: float) -> float | None:
    """y of the last point with px <= x (a step function); None before the first point."""
    out = None
    for px, py in points:
        if px <= x:
            out = py
        else:
            break
    return out


def resample(points: Curve, grid: Sequence[float], until: float | None = None) -> list[float | None]:
    """``step_value`` at every grid point; None past ``until`` (the seed's last observed x) if given."""
    return [None if until is not None and g > until else step_value(points, g) for g in grid]


def mean_curve(curves: Sequence[Curve], grid: Sequence[float],
               until: Sequence[float | None] | None = None) -> dict[str, list]:
    """Per grid point: mean and 95 % t-interval over seeds; None where any seed has no value."""
    until = until or [None] * len(curves)
    cols = [resample(c, grid, u) for c, u in zip(curves, until)]
    out: dict[str, list] = {"x": list(grid), "mean": [], "lo": [], "hi": [], "n": []}
    for i in range(len(grid)):
        vals = [col[i] for col in cols]
        s = mean_ci(vals) if all(v is not None for v in vals) else mean_ci([])
        for k in ("mean", "lo", "hi", "n"):
            out[k].append(s[k])
    return out


def time_to_target(curves: Sequence[Curve], target: float, budget: float) -> float | None:
    """First x <= budget at which the seed-mean step function reaches ``target`` (exact: checked at
    every seed's breakpoints); None if it never does."""
    xs = sorted({x for c in curves for x, _ in c if x <= budget})
    for x in xs:
        vals = [step_value(c, x) for c in curves]
        if any(v is None for v in vals):
            continue
        if sum(vals) / len(vals) >= target - EPS:
            return x
    return None


def speedup(budget: float, t: float | None) -> float | None:
    """budget / time to target (inf if reached at t = 0, None if never)."""
    if t is None:
        return None
    return math.inf if t <= 0 else budget / t


def nearest_rank(sorted_vals: Sequence[float], q: float) -> float:
    """The q-quantile by the nearest-rank rule (no interpolation: works with inf and sentinels)."""
    n = len(sorted_vals)
    return sorted_vals[min(n - 1, max(0, math.ceil(q * n) - 1))]


def bootstrap_speedup(ref_finals: Sequence[float], curves: Sequence[Curve], budget: float,
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Percentile bootstrap over seeds of the speed-up: resample the reference's final rewards (the
    target) and the arm's seed curves with replacement, ``samples`` times, ``random.Random(seed)``.

    Returns {lo, hi} (2.5 / 97.5 % by nearest rank; a bound that falls on a sample which never reached
    the target is None with ``lo_reached``/``hi_reached`` False), ``never_frac`` (share of samples that
    never reach it) and ``samples``. Speed-ups of reached samples are >= 1; "never" sorts below them.
    """
    if not ref_finals or not curves:
        return {"lo": None, "hi": None, "never_frac": None, "samples": 0, "lo_reached": None, "hi_reached": None}
    rng = random.Random(seed)
    nr, na = len(ref_finals), len(curves)
    vals: list[float] = []
    never = 0
    for _ in range(samples):
        target = sum(ref_finals[rng.randrange(nr)] for _ in range(nr)) / nr
        pick = [curves[rng.randrange(na)] for _ in range(na)]
        s = speedup(budget, time_to_target(pick, target, budget))
        if s is None:
            never += 1
            vals.append(-1.0)  # sentinel below every reached speed-up (>= 1)
        else:
            vals.append(s)
    vals.sort()
    lo, hi = nearest_rank(vals, 0.025), nearest_rank(vals, 0.975)
    return {"lo": None if lo < 0 else lo, "hi": None if hi < 0 else hi, "lo_reached": lo >= 0,
            "hi_reached": hi >= 0, "never_frac": never / samples, "samples": samples, "seed": seed}
