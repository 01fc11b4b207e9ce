"""benchmarks.crossfit: cross-fitted quality from Gram matrices against a direct computation, the
jackknife, Holm, power; and the zero-signal simulation of benchmarks.gradient_quality_sim."""

import math

import numpy as np
import pytest

from benchmarks.crossfit import comparison, holm, jack_se, jackknife, quality
from benchmarks.gradient_quality_sim import coverage, simulate_run
from benchmarks.gradient_quality import summarize


def test_quality_from_grams_equals_the_direct_cosine_formula():
    rng = np.random.default_rng(0)
    A, R, D = 2, 6, 5
    g = rng.normal(size=(A, R, D)) + 0.3  # a common direction: q > 0
    f = rng.normal(size=(R, D)) + 0.3
    GF, GG, FF = np.einsum("ard,jd->arj", g, f), np.einsum("ard,asd->ars", g, g), f @ f.T
    for n in (1.0, 2.5):
        got = quality(GF, GG, FF, n)
        want = np.zeros(A)
        for h in (0, 1):
            S, O = [r for r in range(R) if r % 2 == h], [r for r in range(R) if r % 2 != h]
            ref = f[O].sum(0)  # the other half's whole-group gradients
            for a in range(A):
                m1 = np.mean([g[a, r] @ ref for r in S])
                s2 = np.mean([g[a, r] @ g[a, r] for r in S])
                q = np.mean([g[a, r] @ g[a, s] for r in S for s in S if r != s])
                want[a] += n * m1 / (math.sqrt(n * s2 + n * (n - 1) * q) * np.linalg.norm(ref)) / 2
        np.testing.assert_allclose(got, want, rtol=1e-10)
    # n = 1 with one vector repeated: the aggregate of any n is that vector, whose cosine is known
    one = np.tile(g[:1, :1], (1, R, 1))  # [1, R, D] every rollout the same gradient
    GF1, GG1 = np.einsum("ard,jd->arj", one, f), np.einsum("ard,asd->ars", one, one)
    direct = np.mean([one[0, 0] @ f[[r for r in range(R) if r % 2 != h]].sum(0)
                      / (np.linalg.norm(one[0, 0]) * np.linalg.norm(f[[r for r in range(R) if r % 2 != h]].sum(0)))
                      for h in (0, 1)])
    assert quality(GF1, GG1, FF, 3.0)[0] == pytest.approx(direct, rel=1e-10)


def test_jackknife_of_a_mean_is_the_usual_standard_error():
    x = np.array([1.0, 4.0, 2.0, 8.0, 5.0])
    full, reps = jackknife(lambda keep: x[keep].mean(), len(x))
    assert full == pytest.approx(4.0) and jack_se(reps) == pytest.approx(x.std(ddof=1) / math.sqrt(5))


def test_holm_by_hand_and_power_at_zero_effect_is_the_level():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    c = comparison(0.1, 0.05, 1000, 4, 0.0)  # zero effect: power = the two-sided level 0.05 / 4
    assert c["power"] == pytest.approx(0.0125, abs=2e-4) and c["lo"] < 0.1 - 1.9 * 0.05 < c["lo_family"] + 0.1
    assert comparison(0.1, 0.05, 1000, 1, 0.2)["power"] > 0.97  # 4 SE away


def test_zero_signal_simulation_covers_and_a_signal_is_found():
    sched = ["q=pro:8>6@2>4@3"]
    res = coverage(reps=12, rollouts=24, prompts=2, dim=30, K=4, G_static=8, schedules=sched, seed=1, log=lambda *_: None)
    assert res["intervals"] == 12 * sum(v["intervals"] // 12 for v in res["families"].values())
    assert 0.85 <= res["coverage_all"] <= 1.0
    two = coverage(reps=4, rollouts=24, prompts=2, dim=30, K=4, G_static=8, schedules=sched, seed=1, log=lambda *_: None,
                   looks=2)  # the same runs' first 4, scored at the two-look level: wider intervals cover more
    assert two["level"] == 0.975 and two["coverage_all"] >= two["coverage_all_nominal"]
    assert all(f["familywise_error"] <= f["familywise_error_nominal"] for f in two["families"].values())
    # a real policy gradient: more trajectories give a better gradient, resolved (the positive control)
    s = summarize(simulate_run(24, 2, 30, 4, 8, sched, seed=2, signal=3.0))
    pc = s["families"]["positive_control/per_rollout"]["plain-2K - plain-K"]
    assert pc["est"] > 0 and pc["resolved"]
    assert abs(s["families"]["positive_control/per_flop"]["plain-2K - plain-K"]["est"]) < pc["est"]


def test_equal_flop_quality_is_the_cosine_of_an_actual_aggregate():
    """At integer n the moment formula predicts the cosine of a real sum of n rollouts' gradients
    (scored against the same cross-fitted reference)."""
    rng = np.random.default_rng(3)
    R, D, n = 600, 40, 3
    mu = np.zeros(D)
    mu[0] = 1.0
    g = mu + 3.0 * rng.normal(size=(1, R, D))  # one arm; signal share 1 / 361 per rollout: cos grows ~ sqrt(n)
    f = mu + 3.0 * rng.normal(size=(R, D))
    GF, GG, FF = np.einsum("ard,jd->arj", g, f), np.einsum("ard,asd->ars", g, g), f @ f.T
    predicted = quality(GF, GG, FF, float(n))[0]
    empirical = []
    for h in (0, 1):
        S, O = np.arange(h, R, 2), np.arange(1 - h, R, 2)
        ref = f[O].sum(0)
        sums = g[0, S][: len(S) // n * n].reshape(-1, n, D).sum(1)  # disjoint aggregates of n rollouts
        empirical.append(np.mean(sums @ ref / (np.linalg.norm(sums, axis=1) * np.linalg.norm(ref))))
    assert predicted == pytest.approx(np.mean(empirical), abs=0.02)
    assert predicted > 1.5 * quality(GF, GG, FF, 1.0)[0]  # more compute, a better aggregate


def test_jackknife_from_running_sums_equals_the_generic_jackknife():
    """quality_jackknife's replicates are the generic delete-one jackknife's (odd R: unequal halves)."""
    from benchmarks.crossfit import quality_jackknife

    rng = np.random.default_rng(4)
    A, R, D = 3, 11, 7
    g = rng.normal(size=(A, R, D)) + 0.2
    f = rng.normal(size=(R, D)) + 0.2
    GF, GG, FF = np.einsum("ard,jd->arj", g, f), np.einsum("ard,asd->ars", g, g), f @ f.T
    n = np.array([1.0, 2.5, 0.7])
    full, reps = jackknife(lambda keep: np.concatenate([quality(GF, GG, FF, 1.0, keep),
                                                        quality(GF, GG, FF, n, keep)]), R)
    got_full, got_reps = quality_jackknife(GF, GG, FF, [1.0, n])
    np.testing.assert_allclose(got_full, full, rtol=1e-12)
    np.testing.assert_allclose(got_reps, reps, rtol=1e-12)


def test_a_second_look_widens_every_interval_and_keeps_the_nominal_figures():
    """looks = 2: intervals, Holm decisions, power and 80 %-power differences at alpha 0.025; the
    nominal ones are the single look's."""
    from benchmarks.crossfit import compare_family

    rng = np.random.default_rng(5)
    ests, reps = np.array([0.03, 0.01]), rng.normal(scale=0.05, size=(40, 2))
    one, two = compare_family(["a", "b"], ests, reps, 0.02), compare_family(["a", "b"], ests, reps, 0.02, looks=2)
    for nm in ("a", "b"):
        c1, c2 = one[nm], two[nm]
        assert c2["p"] == c1["p"] and c2["p_holm"] == c1["p_holm"] and "nominal" not in c1
        assert c2["lo"] < c1["lo"] < c1["hi"] < c2["hi"] and c2["lo_family"] < c1["lo_family"]
        assert c2["power"] < c1["power"] and c2["mde80"] > c1["mde80"]
        assert {k: c2["nominal"][k] for k in c2["nominal"]} == {k: c1[k] for k in c2["nominal"]}
    # the 97.5 % interval by hand: t quantile at 1 - 0.025 / 2 with R - 1 = 39 degrees of freedom
    se = jack_se(reps)[0]
    assert two["a"]["hi"] - 0.03 == pytest.approx(2.3313 * se, rel=1e-4)
    # a p between the two levels resolves at the first look's alpha only
    spread = np.array([[0.0], [0.1], [0.2], [0.05], [0.15]])  # jackknife SE sqrt(0.8 x 0.025) = sqrt(0.02)
    c = compare_family(["x"], np.array([0.1]), spread * 0.1 / (3 * math.sqrt(0.02)), None, looks=2)  # t = 3, df 4
    assert 0.025 < c["x"]["p_holm"] < 0.05 and c["x"]["nominal"]["resolved"] and not c["x"]["resolved"]
