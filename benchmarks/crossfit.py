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
``quality_jackknife`` gives the same replicates from running sums (O(A R^2), not O(A R^3)).

Repeated looks at the same comparisons (a run continued after a first analysis) share one error
budget: with ``looks`` = L, every interval, Holm decision, power and 80 %-power difference is at
family-wise alpha 0.05 / L (Bonferroni over the looks), the nominal 0.05 figures kept beside them.
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


def quality_jackknife(GF: np.ndarray, GG: np.ndarray, FF: np.ndarray,
                      ns: Sequence[np.ndarray | float]) -> tuple[np.ndarray, np.ndarray]:
    """``jackknife`` of ``concatenate([quality(GF, GG, FF, n) for n in ns])``, from running sums:
    (full [len(ns) * A], delete-one-rollout replicates [R, len(ns) * A]), equal to the generic
    jackknife up to rounding. Deleting a scored rollout s removes its row from the half's sums;
    deleting a reference rollout o removes its column from <g, ref> and its row and column from |ref|^2."""
    A, R, _ = GF.shape
    half = half_index(R)
    ns = [np.broadcast_to(np.asarray(n, dtype=np.float64), (A,)) for n in ns]
    full = np.zeros(len(ns) * A)
    reps = np.zeros((R, len(ns) * A))
    for h in (0, 1):
        S, O = np.flatnonzero(half == h), np.flatnonzero(half != h)
        nS = len(S)
        M = GF[:, S][:, :, O]  # [A, |S|, |O|]
        B = GG[:, S][:, :, S]  # [A, |S|, |S|]
        FO = FF[np.ix_(O, O)]  # [|O|, |O|]
        diag = np.einsum("arr->ar", B)  # [A, |S|] squared norms
        tr, Btot, Mtot, Ftot = diag.sum(1), B.sum((1, 2)), M.sum((1, 2)), FO.sum()  # [A], [A], [A], scalar
        # moments per replicate [R + 1, A]: row 0 everything kept, row 1 + j rollout j deleted
        m1, s2, q = (np.zeros((R + 1, A)) for _ in range(3))
        ref2 = np.full(R + 1, Ftot)  # [R + 1]
        m1[0], s2[0], q[0] = Mtot / nS, tr / nS, (Btot - tr) / (nS * (nS - 1))
        tr_s = tr[:, None] - diag  # [A, |S|] without scored rollout s
        B_s = Btot[:, None] - 2 * B.sum(2) + diag  # [A, |S|]
        m1[1 + S] = ((Mtot[:, None] - M.sum(2)) / (nS - 1)).T
        s2[1 + S] = (tr_s / (nS - 1)).T
        q[1 + S] = ((B_s - tr_s) / ((nS - 1) * (nS - 2))).T
        m1[1 + O] = ((Mtot[:, None] - M.sum(1)) / nS).T  # reference rollout o deleted: scored half intact
        s2[1 + O], q[1 + O] = s2[0], q[0]
        ref2[1 + O] = Ftot - 2 * FO.sum(1) + np.diag(FO)
        for k, n in enumerate(ns):
            var = np.maximum(n * s2 + n * (n - 1) * q, 1e-300)  # [R + 1, A]
            cos = n * m1 / (np.sqrt(var) * np.sqrt(np.maximum(ref2, 1e-300))[:, None]) / 2  # [R + 1, A]
            full[k * A:(k + 1) * A] += cos[0]
            reps[:, k * A:(k + 1) * A] += cos[1:]
    return full, reps


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


def comparison(est: float, se: float, df: int, family_size: int, effect: float | None,
               alpha: float = 1 - LEVEL) -> dict[str, Any]:
    """One difference: its 1 - ``alpha`` interval, the interval at the family's Bonferroni level
    alpha / family_size (the widest Holm step), the unadjusted p, the power at the Bonferroni level
    against ``effect`` and the smallest difference detected with 80 % power at that level (t with
    ``df`` degrees of freedom)."""
    t = _st.t
    q95 = float(t.ppf(1 - alpha / 2, df))
    qfam = float(t.ppf(1 - alpha / (2 * family_size), df))
    p = float(2 * t.sf(abs(est) / se, df)) if se > 0 else (0.0 if est else 1.0)
    out = {"est": est, "se": se, "lo": est - q95 * se, "hi": est + q95 * se,
           "lo_family": est - qfam * se, "hi_family": est + qfam * se, "p": p, "family_size": family_size,
           "mde80": (qfam + float(t.ppf(0.8, df))) * se}
    if effect is not None and se > 0:
        d = abs(effect) / se
        out["power"] = float(t.sf(qfam - d, df) + t.cdf(-qfam - d, df))
    return out


def compare_family(names: Sequence[str], ests: np.ndarray, reps: np.ndarray, effect: float | None,
                   looks: int = 1) -> dict[str, Any]:
    """The comparisons ``names`` (estimates [m], jackknife replicates [R, m]) as one Holm family at
    family-wise alpha (1 - LEVEL) / ``looks``; with looks > 1 each also has ``nominal``: its interval,
    Holm-level interval, power, 80 %-power difference and Holm decision at alpha 1 - LEVEL."""
    R = reps.shape[0]
    se = jack_se(reps)
    alpha = (1 - LEVEL) / looks
    rows = {nm: comparison(float(e), float(s), R - 1, len(names), effect, alpha) for nm, e, s in zip(names, ests, se)}
    for nm, adj in zip(names, holm([rows[nm]["p"] for nm in names])):
        rows[nm]["p_holm"] = adj
        rows[nm]["resolved"] = bool(adj < alpha)
        if looks > 1:
            c = rows[nm]
            nominal = comparison(c["est"], c["se"], R - 1, len(names), effect)
            c["nominal"] = {k: nominal[k] for k in ("lo", "hi", "lo_family", "hi_family", "mde80", "power")
                            if k in nominal} | {"resolved": bool(adj < 1 - LEVEL)}
    return rows
