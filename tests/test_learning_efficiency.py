"""benchmarks.learning_efficiency: the statistics against hand computations (closed forms, a quadrature,
the printed t table) and against the stored results the hand-written statistics produced, the
presets, the budget recorder with a fake clock, and one tiny end-to-end run. Never a time."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import evidence_stats
from benchmarks import learning_arms as A
from benchmarks import learning_efficiency as L
from benchmarks import learning_report as R
from benchmarks import learning_runs as W
from benchmarks import stats as S
from benchmarks.schedules import parse_schedule, reference
from pro_grpo_lightning.schedules import PlainGRPOSchedule, ProGRPOSchedule


pytestmark = pytest.mark.usefixtures("one_thread")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "learning_efficiency"

#: Two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30, as printed (4 decimals) in the standard
#: table (NIST/SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.2).
T975_TABLE = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
              2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
              2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


# ---- statistics ---------------------------------------------------------------------------------------
def _t_cdf_by_quadrature(t: float, df: float, n: int = 20000) -> float:
    """P(T <= t), t > 0, by Simpson's rule on the t density: independent of scipy."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / n
    s = pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


def test_t_quantiles_match_closed_forms_the_table_and_the_density():
    # closed forms: df = 1 is Cauchy, t = tan(pi (p - 1/2)); df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2)),
    # so F = 0.975 gives t^2 = 2 * 0.95^2 / (1 - 0.95^2)
    assert S.t975(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert S.t975(2) == pytest.approx(math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2)), rel=1e-12)
    for df, q in enumerate(T975_TABLE, start=1):  # the printed table, to its rounding
        assert S.t975(df) == pytest.approx(q, abs=5e-5)
    # Welch's fractional df: the quantile really has 97.5 % below it
    q = S.t975(50 / 17)
    assert T975_TABLE[2] < q < T975_TABLE[1]
    assert _t_cdf_by_quadrature(q, 50 / 17) == pytest.approx(0.975, abs=1e-6)
    assert S.t975(1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile
    with pytest.raises(ValueError, match="df > 0"):
        S.t975(0)


def test_mean_and_t_interval_of_three_seeds():
    s = S.mean_ci([0.2, 0.4, 0.6])
    # mean 0.4, sd 0.2, se 0.2 / sqrt(3) = 0.1154701, t(0.975, 2) = sqrt(2 * 0.9025 / 0.0975) = 4.3026527
    # -> half width 0.4968276
    assert s["mean"] == pytest.approx(0.4) and s["sd"] == pytest.approx(0.2) and s["n"] == 3
    assert s["lo"] == pytest.approx(0.4 - 0.4968276, abs=1e-7)
    assert s["hi"] == pytest.approx(0.4 + 0.4968276, abs=1e-7)
    one = S.mean_ci([0.7])
    assert one["mean"] == 0.7 and one["lo"] is None and one["hi"] is None
    assert S.mean_ci([])["mean"] is None


def test_step_function_resampling_onto_a_grid():
    pts = [(0.0, 0.5), (60.0, 0.6), (130.0, 0.7)]
    grid = [0, 30, 60, 90, 120, 150]
    assert S.resample(pts, grid) == [0.5, 0.5, 0.6, 0.6, 0.6, 0.7]
    assert S.step_value(pts, -1) is None
    assert S.step_value([(0, 0.1), (5, 0.2), (5, 0.3)], 5) == 0.3  # the last of equal x
    assert S.resample(pts, grid, until=100) == [0.5, 0.5, 0.6, 0.6, None, None]
    # mean over three seeds on the grid, with the t-interval of each column
    curves = [[(0, 0.2), (50, 0.4)], [(0, 0.4), (70, 0.6)], [(0, 0.6), (40, 0.5)]]
    m = S.mean_curve(curves, [0, 45, 60, 100])
    # columns: (0.2, 0.4, 0.6), (0.2, 0.4, 0.5), (0.4, 0.4, 0.5), (0.4, 0.6, 0.5)
    assert m["mean"] == pytest.approx([0.4, 1.1 / 3, 1.3 / 3, 0.5])
    assert m["hi"][0] == pytest.approx(0.4 + 0.4968276, abs=1e-7) and m["n"] == [3, 3, 3, 3]
    # a seed without a value at a grid point (past its last rollout) leaves no mean there
    r = S.mean_curve([[(0, 0.1), (2, 0.3)], [(0, 0.2), (4, 0.4)]], [0, 2, 4], until=[2, 4])
    assert r["mean"][:2] == pytest.approx([0.15, 0.25]) and r["mean"][2] is None


def test_time_to_target_reached_and_not_reached():
    curves = [[(0, 0.5), (60, 0.6), (120, 0.8)], [(0, 0.5), (70, 0.7), (110, 0.7)]]
    # seed-mean at the breakpoints: 0: 0.5, 60: 0.55, 70: 0.65, 110: 0.65, 120: 0.75
    assert S.time_to_target(curves, 0.65, 140) == 70
    assert S.speedup(140, 70) == 2.0
    assert S.time_to_target(curves, 0.7, 140) == 120
    assert S.time_to_target(curves, 0.7, 115) is None  # 120 is past the budget
    assert S.time_to_target(curves, 0.9, 140) is None and S.speedup(140, None) is None
    assert S.time_to_target(curves, 0.5, 140) == 0 and math.isinf(S.speedup(140, 0))


def test_welch_interval_by_hand():
    # equal variances and sizes: df = 2n - 2 = 4, se = sqrt(1/3 + 1/3)
    w = S.welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert w["diff"] == -3 and w["df"] == pytest.approx(4.0) and w["se"] == pytest.approx(math.sqrt(2 / 3))
    assert (w["lo"], w["hi"]) == (pytest.approx(-3 - 2.7764 * math.sqrt(2 / 3), abs=1e-4),
                                  pytest.approx(-3 + 2.7764 * math.sqrt(2 / 3), abs=1e-4))
    # unequal variances: var 1 and 4, se^2 = 1/3 + 4/3 = 5/3, df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    w = S.welch_interval([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert w["diff"] == -2 and w["df"] == pytest.approx(50 / 17) and w["se"] == pytest.approx(math.sqrt(5 / 3))
    assert _t_cdf_by_quadrature((w["hi"] - w["diff"]) / math.sqrt(5 / 3), 50 / 17) == pytest.approx(0.975, abs=1e-6)
    assert S.welch_interval([1.0], [2.0, 3.0])["lo"] is None
    assert S.welch_interval([1.0, 1.0], [2.0, 2.0])["lo"] == -1.0  # no spread: a point


def test_bootstrap_is_deterministic_and_counts_never_reached():
    # every seed the same: every resample gives target 0.6 reached at 50 s -> speed-up 200/50 = 4
    same = S.bootstrap_speedup([0.6, 0.6, 0.6], [[(0, 0.5), (50, 0.6)]] * 3, budget=200)
    assert (same["lo"], same["hi"], same["never_frac"], same["samples"]) == (4.0, 4.0, 0.0, 1000)
    # c1 reaches 0.7 at 50, c2 never leaves 0.5, c3 reaches 0.7 at 100; target 0.6
    curves = [[(0, 0.5), (50, 0.7)], [(0, 0.5)], [(0, 0.5), (100, 0.7)]]
    assert S.time_to_target(curves, 0.6, 200) == 100  # mean (0.7 + 0.5 + 0.7) / 3
    a = S.bootstrap_speedup([0.6] * 3, curves, budget=200)
    assert a == S.bootstrap_speedup([0.6] * 3, curves, budget=200)  # fixed generator seed
    # a resample never reaches 0.6 iff it holds c2 at least twice: P = 7/27 = 0.26
    assert 0.2 < a["never_frac"] < 0.32
    assert a["lo"] is None and a["lo_reached"] is False  # the 2.5 % bound falls on "never"
    assert a["hi"] == 4.0  # >= 2 copies of c1 reach at 50 s (P = 7/27 > 2.5 %)
    b = S.bootstrap_speedup([0.6] * 3, curves, budget=200, seed=1)
    assert 0.2 < b["never_frac"] < 0.32


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]


def test_stored_results_are_reproduced_by_the_scipy_statistics(capsys):
    """docs/results/learning_efficiency/main holds the raw run files and what the earlier hand-written
    statistics (incomplete-beta t quantiles, the 4-decimal t table) made of them: the aggregate JSON and
    ``evidence_stats``' printout. scipy's statistics reproduce both from the raw files."""
    stored = json.loads((RESULTS / "main" / "learning_efficiency.json").read_text())
    runs: dict[str, list] = {}
    for f in sorted((RESULTS / "main" / "run_files").glob("*.json")):
        run = json.loads(f.read_text())
        runs.setdefault(run["settings"]["arm"], []).append(run)
    arms = [parse_schedule(f"{a['name']}={a['spec']}") for a in stored["settings"]["arms"]]
    new = R.aggregate({a.name: runs[a.name] for a in arms}, arms, stored["settings"]["budget_s"], 10)
    assert new["reference"] == stored["reference"] == "grpo" and new["target"] == pytest.approx(stored["target"])
    for name, arm in stored["arms"].items():
        for key in ("final_reward", "final_exact", "delta_vs_reference"):
            for stat in ("mean", "diff", "lo", "hi", "df", "se", "sd"):
                if arm[key].get(stat) is not None:  # the table rounded t to 4 decimals: relative 1e-5
                    assert new["arms"][name][key][stat] == pytest.approx(arm[key][stat], rel=2e-5, abs=1e-9)
        for stat in ("time_s", "speedup"):
            assert new["arms"][name]["time_to_target"][stat] == pytest.approx(arm["time_to_target"][stat])
        assert new["arms"][name]["time_to_target"]["bootstrap"] == arm["time_to_target"]["bootstrap"]
        got = [v for v in new["arms"][name]["curve_wall"]["hi"] if v is not None]
        want = [v for v in arm["curve_wall"]["hi"] if v is not None]
        assert got == pytest.approx(want, rel=2e-5)
    evidence_stats.main([str(RESULTS / "main"), "360"])
    printed = _numbers(capsys.readouterr().out)
    kept = _numbers((RESULTS / "main" / "extra_stats.txt").read_text())
    assert len(printed) == len(kept) > 200
    assert printed == pytest.approx(kept, abs=2e-6)


# ---- the budget recorder ----------------------------------------------------------------------------------
class FakeClock:
    """perf_counter replacement: returns the queued readings in order."""

    def __init__(self, readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def _drive(readings, budget, every, max_rollouts=None):
    clock = FakeClock(readings)
    rec = W.make_recorder(budget, every, max_rollouts, clock=clock)
    w = torch.nn.Parameter(torch.zeros(2))
    module = SimpleNamespace(rollouts_done=0, named_parameters=lambda: [("w", w)])
    trainer = SimpleNamespace(callback_metrics={"reward/mean": torch.tensor(0.25)},
                              logged_metrics={"compute/nfe": torch.tensor(30.0)}, should_stop=False)
    rec.on_train_start(trainer, module)
    while not trainer.should_stop and clock.readings:
        module.rollouts_done += 1
        with torch.no_grad():
            w.fill_(module.rollouts_done)  # the weights after rollout k are all k
        rec.on_train_batch_end(trainer, module, None, None, module.rollouts_done - 1)
    rec.on_train_end(trainer, module)
    return rec, trainer


def test_recorder_snapshots_budget_and_its_own_time():
    # on_train_start reads (t0, enter, exit); each rollout end reads (enter, exit). The callback spends
    # 1 s at the start and 0.5 s per rollout: training wall time = raw clock - t0 - callback time.
    readings = [0, 0, 1,  4, 4.5,  7, 7.5,  11.5, 12,  15, 15.5]
    rec, trainer = _drive(readings, budget=10, every=4)
    walls = [r["wall_s"] for r in rec.rows]
    assert walls == [3, 5.5, 9.5, 12.5]  # 4-1, 7-1.5, 11.5-2, 15-2.5
    assert rec.rows[0]["reward/mean"] == 0.25 and rec.rows[0]["compute/nfe"] == 30
    snaps = [(s["kind"], s["rollouts"], s["wall_s"], s["within_budget"], s["params"]["w"][0].item())
             for s in rec.snapshots]
    assert snaps == [("start", 0, 0.0, True, 0.0),
                     ("periodic", 2, 5.5, True, 2.0),    # first rollout end at >= 4 s
                     ("periodic", 3, 9.5, True, 3.0),    # >= 8 s
                     ("end", 4, 12.5, False, 4.0)]       # past the 10 s budget: stop
    assert trainer.should_stop and rec.stopped_by == "budget"
    # the last rollout within the budget was not a snapshot: it is kept as the "budget" one
    rec, _ = _drive([0, 0, 0,  3, 3,  5, 5,  7, 7,  11, 11], budget=10, every=4)
    assert [(s["kind"], s["rollouts"], s["wall_s"]) for s in rec.snapshots] == \
        [("start", 0, 0.0), ("periodic", 2, 5), ("budget", 3, 7), ("end", 4, 11)]
    assert rec.snapshots[2]["params"]["w"][0].item() == 3.0
    # --max-rollouts
    rec, trainer = _drive([0, 0, 0,  1, 1,  2, 2,  3, 3], budget=10, every=4, max_rollouts=2)
    assert [(s["kind"], s["rollouts"]) for s in rec.snapshots] == [("start", 0), ("end", 2)]
    assert rec.stopped_by == "max_rollouts" and len(rec.rows) == 2


# ---- arms and presets ---------------------------------------------------------------------------------------
QUICKSTART = ProGRPOSchedule(16, [4, 6], [10, 6])  # the shapes config's schedule


def test_presets_shrink_to_the_same_k():
    assert A.preset_arms("main", 10, QUICKSTART) == ["grpo=plain:6", "static=static:16>6", "pro=pro:16>10@4>6@6"]
    paper = A.preset_arms("paper", 10, QUICKSTART)
    assert paper == ["grpo=plain:6", "static=static:16>6", "pro=pro:16>10@4>6@6", "grpo12=plain:12"]
    with pytest.raises(ValueError, match="same final group size"):
        A.resolve_arms(paper, 10)  # K = 6 and 12: only with allow_unequal_k (the preset sets it)
    assert [a.schedule.final_size for a in A.resolve_arms(paper, 10, allow_unequal_k=True)] == [6, 6, 6, 12]
    gmax = A.resolve_arms(A.preset_arms("gmax", 10, QUICKSTART), 10)
    assert [a.name for a in gmax] == ["grpo", "gmax8", "gmax12", "gmax16", "gmax24"]
    ck = A.resolve_arms(A.preset_arms("checkpoints", 10, QUICKSTART), 10)
    # the paper's SD-v1.4 ablation (10, 20), (20, 30), (30, 40) of T = 50, scaled to T = 10
    assert [(a.name, a.schedule.checkpoints) for a in ck[1:]] == \
        [("ck-early", [2, 4]), ("ck-middle", [4, 6]), ("ck-late", [6, 8])]
    for arms in (gmax, ck):
        assert arms[0].spec == "plain:6" and reference(arms).name == "grpo"
        for a in arms[1:]:
            s = a.schedule
            assert isinstance(s, ProGRPOSchedule) and s.final_size == 6
            assert all(x > y for x, y in zip(s.sizes(), s.sizes()[1:]))
            s.validate_steps(10)
    assert {a.schedule.checkpoints[0] for a in gmax[1:]} == {4}
    assert [a.schedule.group_size for a in gmax[1:]] == [8, 12, 16, 24]
    assert gmax[3].spec == "pro:16>10@4>6@6"  # the config's own schedule is one of them
    assert {a.schedule.group_size for a in ck[1:]} == {16}
    # a config without pruning gets a Pro-GRPO schedule at its K
    main = A.resolve_arms(A.preset_arms("main", 10, PlainGRPOSchedule(6)), 10)
    assert main[2].schedule.final_size == 6 and main[2].schedule.checkpoints == [4, 6]
    with pytest.raises(ValueError, match="cannot shrink"):
        A.rescale_keep([16, 10, 6], 7)
    with pytest.raises(ValueError, match="unknown preset"):
        A.preset_arms("fast", 10, QUICKSTART)


@pytest.mark.parametrize("arms, match", [
    (["grpo=plain:6", "pro=pro:8>8@1"], "bad schedule"),
    (["grpo=plain:6", "pro=pro:16>10@12>6@13"], "outside"),
    (["grpo=plain:6", "pro=pro:16>10@4>4@6"], "same final group size"),
    (["pro=pro:16>10@4>6@6", "static=static:16>6"], "plain-GRPO arm"),
    (["grpo=plain:6", "grpo=static:16>6"], "unique"),
    (["a/b=plain:6"], "letters"),
])
def test_bad_arms_fail_before_any_model_loads(tmp_path, arms, match):
    with pytest.raises(ValueError, match=match):
        L.main(["--arms", *arms, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_options_fail_early(tmp_path):
    with pytest.raises(ValueError, match="sets model.schedule"):
        L.main(["--set", "model.schedule.init_args.group_size=4", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        L.main(["--set", "data.prompts_per_step", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError):
        L.main(["--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")])
    brightness = 'model.rewards=[{"class_path": "pro_grpo_lightning.rewards.image_stats.Brightness"}]'
    with pytest.raises(ValueError, match=r"not a shapes-task config \(model.rewards is \['Brightness'\]"):
        L.main(["--set", brightness, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    # the default config's T and schedule, as the library's CLI builds them (with --set applied)
    T, base = W.read_config(str(W.REPO / W.DEFAULT_CONFIG), [("model.backend.init_args.num_steps", "12")])
    assert T == 12 and isinstance(base, ProGRPOSchedule) and base.sizes() == [16, 10, 6]
    assert base.checkpoints == [4, 6]


# ---- end to end -----------------------------------------------------------------------------------------------
def test_tiny_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "le"
    argv = ["--arms", "grpo=plain:2", "pro=pro:4>2@4", "--seeds", "1", "--max-rollouts", "2",
            "--set", "data.prompts_per_step=1", "--eval-samples", "1", "--eval-prompts", "4", "--jobs", "1",
            "--out", str(out)]
    payload = L.main(argv)
    for ext in ("json", "md", "png"):
        assert (out / f"learning_efficiency.{ext}").stat().st_size > 0
    assert (out / "learning_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "learning_efficiency.md").read_text().startswith("| arm |")
    data = json.loads((out / "learning_efficiency.json").read_text())
    assert data["benchmark"] == "learning_efficiency" and data["reference"] == "grpo"
    assert set(data["arms"]) == {"grpo", "pro"} and data["start_reward_identical"]
    assert data["settings"]["eval_seed"] == 1000 and data["settings"]["num_steps"] == 10
    runs = {}
    for arm, spec in (("grpo", "plain:2"), ("pro", "pro:4>2@4")):
        path = out / "runs" / f"{arm}_seed0.json"
        run = json.loads(path.read_text())
        runs[arm] = path.read_bytes()
        assert run["spec"] == spec and run["seed"] == 0 and run["stopped_by"] == "max_rollouts"
        assert [p["rollouts"] for p in run["curve"]] == [0, 2]
        walls = [p["wall_s"] for p in run["curve"]]
        assert walls[0] == 0 and all(b > a for a, b in zip(walls, walls[1:]))
        for p in run["curve"]:
            for key in ("reward", "exact", "colour", "count", "shape", "position"):
                assert 0.0 <= p[key] <= 1.0
            assert p["n"] == 4
        assert [r["rollouts"] for r in run["train_log"]] == [1, 2]
        assert all(0.0 <= r["reward/mean"] <= 1.0 for r in run["train_log"])
        assert [r["wall_s"] for r in run["train_log"]] == sorted(r["wall_s"] for r in run["train_log"])
        a = data["arms"][arm]
        assert a["rollouts_in_budget"]["mean"] == 2 and a["final_reward"]["mean"] == run["curve"][-1]["reward"]
    assert json.loads(runs["pro"])["train_log"][0]["compute/previews"] == 4  # 4 live trajectories previewed
    assert payload["target"] == data["arms"]["grpo"]["final_reward"]["mean"]
    capsys.readouterr()
    # a rerun with the same settings reuses both runs: files untouched
    L.main(argv)
    assert "0 run(s) to do, 2 reused" in capsys.readouterr().out
    for arm, content in runs.items():
        assert (out / "runs" / f"{arm}_seed0.json").read_bytes() == content


# ---- power of the stored comparisons (benchmarks.evidence_power) ------------------------------------------
def test_power_and_detectable_difference_by_their_definitions():
    from benchmarks.evidence_power import at_rollouts, mdd80, power

    assert power(0.0, 0.01, 8.0) == pytest.approx(0.05)  # no effect: the test's own level
    # MDD80 is the normal-style approximation; the exact noncentral-t power there is close to 0.80
    for se, df in ((0.0026, 7.5), (0.004, 5.4), (0.01, 30.0)):
        assert power(mdd80(se, df), se, df) == pytest.approx(0.80, abs=0.02)
    run = {"arm": "a", "seed": 0, "curve": [{"rollouts": 0, "reward": 0.8}, {"rollouts": 10, "reward": 0.9}]}
    assert at_rollouts(run, 4) == pytest.approx(0.84)
    with pytest.raises(ValueError, match="stops at 10 rollouts"):
        at_rollouts(run, 11)


def test_stored_power_file_is_reproduced(capsys):
    from benchmarks import evidence_power

    res = evidence_power.main([str(RESULTS / "main"), "360"])
    printed = _numbers(capsys.readouterr().out)
    assert printed == pytest.approx(_numbers((RESULTS / "main" / "power.txt").read_text()), abs=1e-6)
    w = res["at_budget"]["pro - grpo"]  # the numbers docs/evidence.md quotes
    assert w["power"][1.26] < 0.2 and w["power"][1.41] < 0.4 and w["mdd80"] > 1.8 * res["implied_difference"][1.41]
