"""Cross-fitted gradient quality from stored inner products, with delete-one-rollout jackknife intervals.

The mechanism benchmark (``benchmarks.gradient_quality``) scores each arm's policy gradient against a
reference that must not contain the arm's own trajectories, and whose noise must be accounted for.
Here rollouts are split into two halves (even / odd index); an arm's gradients in one half are scored
against the *other* half's reference (the sum of its rollouts' whole-group gradients): cross-fitting.
Everything needed is a few Gram matrices over rollouts, stored beside the results:

    GF[a, r, j] = <g_a(r), f(j)>     arm a's gradient in rollout r . rollout j's whole-group gradient
    GG[a, r, s] = <g_a(r), g_a(s)>   arm a's gradients across rollouts (diagonal: squared norms)
    FF[i, j]    = <f(i), f(j)>       the reference gradients

Quality of an arm at n rollouts' worth of its gradients, in half h against reference ref = sum_{j in
other half} f(j): the cosine with ref of the aggregate of n independent rollouts of the arm, from its
first two moments (m1 = E<g, ref>, s2 = E|g|^2, q = |E g|^2 estimated by the mean <g(r), g(s)>, r != s):

    cos_n = n m1 / (sqrt(n s2 + n (n - 1) q) |ref|),      theta = mean over the two halves

n = 1 is the quality per rollout; n = B / cost is the quality at equal compute B (n may be
fractional: the moments give the aggregate's expected inner products at any n). theta is a smooth
function of means over rollouts, so the delete-one-rollout jackknife (the reference recomputed
without the deleted rollout too) estimates its standard error, including the dependence that a
shared reference leaves between rollouts (``benchmarks.gradient_quality_sim`` checks the coverage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

LEVEL = 0.95


def half_index(R: int) -> np.ndarray:
    """[R] the half of each rollout (0: even index, 1: odd)."""
    return np.arange(R) % 2


def quality(GF: np.ndarray, GG: np.ndarray, FF: np.ndarray, n: np.ndarray | float,
            keep: np.ndarray | None = None) -> np.ndarray:
    """[A] theta per arm (module docstring) over the rollouts with ``keep`` (bool [R], all by default);
    ``n`` [A] or a scalar: rollouts' worth of each arm's gradients."""
    A, R, _ = GF.shape
    keep = np.ones(R, dtype=bool) if keep is None else keep
    half = half_index(R)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), (A,))
    out = np.zeros(A)
    for h in (0, 1):
        S = np.flatnonzero((half == h) & keep)  # scored rollouts
        O = np.flatnonzero((half != h) & keep)  # their reference
        ref2 = FF[np.ix_(O, O)].sum()
        m1 = GF[:, S][:, :, O].sum(2).mean(1)  # [A] E<g, ref>
        block = GG[:, S][:, :, S]  # [A, |S|, |S|]
        s2 = np.einsum("arr->a", block) / len(S)  # [A] E|g|^2
        q = (block.sum((1, 2)) - s2 * len(S)) / (len(S) * (len(S) - 1))  # [A] |E g|^2, unbiased
        var = np.maximum(n * s2 + n * (n - 1) * q, 1e-300)
        out += n * m1 / (np.sqrt(var) * math.sqrt(max(ref2, 1e-300))) / 2
    return out


def jackknife(stat, R: int) -> tuple[np.ndarray, np.ndarray]:
    """(full value, delete-one-rollout replicates [R, ...]) of ``stat(keep)``."""
    full = np.asarray(stat(np.ones(R, dtype=bool)))
    reps = []
    for j in range(R):
        keep = np.ones(R, dtype=bool)
        keep[j] = False
        reps.append(stat(keep))
    return full, np.asarray(reps)


def jack_se(reps: np.ndarray) -> np.ndarray:
    """Jackknife standard error of the replicates [R, ...]."""
    R = reps.shape[0]
    return np.sqrt((R - 1) / R * ((reps - reps.mean(0)) ** 2).sum(0))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p)
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def comparison(est: float, se: float, df: int, family_size: int, effect: float | None) -> dict[str, Any]:
    """One difference: its 95 % interval, the interval at the family's Bonferroni level (the widest
    Holm step), the unadjusted p, the power at the Bonferroni level against ``effect`` and the
    smallest difference detected with 80 % power at that level (t with ``df`` degrees of freedom)."""
    t = _st.t
    q95 = float(t.ppf(0.975, df))
    qfam = float(t.ppf(1 - (1 - LEVEL) / (2 * family_size), df))
    p = float(2 * t.sf(abs(est) / se, df)) if se > 0 else (0.0 if est else 1.0)
    out = {"est": est, "se": se, "lo": est - q95 * se, "hi": est + q95 * se,
           "lo_family": est - qfam * se, "hi_family": est + qfam * se, "p": p, "family_size": family_size,
           "mde80": (qfam + float(t.ppf(0.8, df))) * se}
    if effect is not None and se > 0:
        d = abs(effect) / se
        out["power"] = float(t.sf(qfam - d, df) + t.cdf(-qfam - d, df))
    return out


def compare_family(names: Sequence[str], ests: np.ndarray, reps: np.ndarray, effect: float | None) -> dict[str, Any]:
    """The comparisons ``names`` (estimates [m], jackknife replicates [R, m]) as one Holm family."""
    R = reps.shape[0]
    se = jack_se(reps)
    rows = {nm: comparison(float(e), float(s), R - 1, len(names), effect) for nm, e, s in zip(names, ests, se)}
    for nm, adj in zip(names, holm([rows[nm]["p"] for nm in names])):
        rows[nm]["p_holm"] = adj
        rows[nm]["resolved"] = bool(adj < 1 - LEVEL)
    return rows
