"""The benchmark entry points at toy size: counts, FLOP ratios, files. Never a time."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import floor, flops, iteration_cost, rollout_cost
from benchmarks.gpu import run_all
from benchmarks.measure import FlopModel
from benchmarks.models import REAL_PARAMS, count_params_on_meta
from benchmarks.report import SCHEMA_VERSION
from benchmarks.schedules import paper_schedules, parse_schedule

# Tiny SD3-architecture model, T = 4, the SD3.5-M paper schedules with every group size / 4.
TOY = ["--backend", "sd3", "--steps", "4", "--group-scale", "0.25", "--repeats", "1", "--warmup", "0",
       "--reward", "brightness", "--threads", "0"]
# What those presets are (checkpoints 5, 7 of T = 10 scaled to T = 4: 2, 3; the custom one at round(0.2 T) = 1)
TOY_SPECS = {"plain": "plain:6", "static-ovf": "static:12>3", "pro-standard": "pro:12>6@2>3@3",
             "pro-flash": "pro:6>4@2>3@3", "pro-early": "pro:12>3@1"}


def load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["schema_version"] == SCHEMA_VERSION
    for key in ("meta", "settings", "files"):
        assert key in data
    png = out / f"{name}.png"
    assert png.exists() and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert (out / f"{name}.md").read_text().startswith("|")
    return data


def test_paper_schedules_and_scaling():
    specs = {s.name: s.spec for s in paper_schedules("sd3", 10)}
    assert specs == {"plain": "plain:24", "static-ovf": "static:48>12", "pro-standard": "pro:48>24@5>12@7",
                     "pro-flash": "pro:24>16@5>12@7", "pro-early": "pro:48>12@2"}
    specs = {s.name: s.spec for s in paper_schedules("sd15", 50)}
    assert specs["pro-paper"] == "pro:48>32@30>8@40" and specs["plain"] == "plain:16"
    assert {s.name: s.spec for s in paper_schedules("sd15", 20)}["pro-paper"] == "pro:48>32@12>8@16"
    assert {s.name: s.spec for s in paper_schedules("flux", 10, 0.5)}["pro-standard"] == "pro:24>12@5>6@7"
    assert {s.name: s.spec for s in paper_schedules("sd3", 4, 0.25)} == TOY_SPECS
    s = parse_schedule("mine=pro:32>16@3>8@6/topk")
    assert (s.name, s.schedule.group_size, s.schedule.checkpoints, s.schedule.keep, s.schedule.rule) == \
        ("mine", 32, [3, 6], [16, 8], "topk")
    with pytest.raises(ValueError, match="bad schedule"):
        parse_schedule("pro:8>8@1")


def test_flop_model_matches_hand_computation():
    # SD3.5-M setting: T = 10, 9 trainable steps (not the last), every step trained, c = 2.
    model = FlopModel(train_cost=2.0, trainable_steps=9, timestep_fraction=1.0)
    plain = parse_schedule("plain:24").schedule
    # plain GRPO: 24 x 10 denoiser calls + 2 x 24 trajectories x 9 steps = 240 + 432
    assert model.total(plain, 1, 10) == 672
    # Pro-GRPO 48 -> 24 -> 12 at [5, 7]: 48 x 6 + 24 x 2 + 12 x 2 = 360 calls, + 2 x 12 x 9 = 216
    pro = parse_schedule("pro:48>24@5>12@7").schedule
    assert model.rollout(pro, 1, 10) == 360 and model.total(pro, 1, 10) == 576
    assert math.isclose(model.total(pro, 1, 10) / model.total(plain, 1, 10), 576 / 672)  # 6/7: 14.3 % saved
    # Flash 24 -> 16 -> 12: 24 x 6 + 16 x 2 + 12 x 2 = 200, + 216; static 48 -> 12: 480 + 216
    assert model.total(parse_schedule("pro:24>16@5>12@7").schedule, 1, 10) == 416
    assert model.total(parse_schedule("static:48>12").schedule, 1, 10) == 696
    # timestep_fraction 0.5 of 9 steps trains ceil(4.5) = 5; P scales everything
    half = FlopModel(train_cost=2.0, trainable_steps=9, timestep_fraction=0.5)
    assert half.total(pro, 3, 10) == 3 * (360 + 2 * 12 * 5)


def test_floor_toy(tmp_path):
    floor.main(TOY + ["--batch-sizes", "1,2", "--train-batch-sizes", "1", "--out", str(tmp_path)])
    data = load(tmp_path, "floor")
    fwd = {r["rows"]: r["median_s"] for r in data["forward"]}
    train = {r["rows"]: r["median_s"] for r in data["train"]}
    assert {1, 2, 3, 4, 6, 12} <= set(fwd)  # the grid plus every batch size the schedules run
    by_name = {s["name"]: s for s in data["settings"]["schedules"]}
    for s in data["schedules"]:
        sched = parse_schedule(by_name[s["name"]]["spec"]).schedule
        assert s["nfe"] == sched.nfe_per_prompt(4) == sum(s["rows_per_step"])
        assert s["rollout_floor_s"] == pytest.approx(sum(fwd[r] for r in s["rows_per_step"]))
        assert s["update_floor_s"] == pytest.approx(sum(train[c] for c in s["update_chunks"]))
        assert sum(s["update_chunks"]) == s["update_pairs"]


def test_rollout_cost_toy(tmp_path):
    rollout_cost.main(TOY + ["--prompts", "2", "--no-memory-pass", "--out", str(tmp_path)])
    data = load(tmp_path, "rollout_cost")
    assert data["reference"] == "plain"
    res = {r["name"]: r for r in data["results"]}
    assert set(res) == set(TOY_SPECS)
    P = 2
    for name, spec in TOY_SPECS.items():
        r, sched = res[name], parse_schedule(spec).schedule
        assert r["spec"] == spec
        assert r["nfe"] == r["nfe_expected"] == sched.nfe_per_prompt(4) * P
        sizes = sched.group_sizes_per_step(4)
        assert r["num_previews"] == P * sum(sizes[c] for c in sched.checkpoints)
        assert r["survivors"] == P * sched.final_size
        assert r["nfe_ratio"] == pytest.approx(sched.nfe_per_prompt(4) / 24)
        for key in ("wall_s", "denoise_s", "preview_s", "final_s", "floor_s", "denoise_over_floor", "memory"):
            assert key in r
        assert r["wall_ratio"]["median"] > 0 and len(r["rounds"]) == 1
    assert res["plain"]["wall_ratio"]["median"] == 1.0
    assert set(data["targets"]) == {"denoise_within_10pct_of_floor", "rollout_wall_over_floor",
                                    "previews_add_under_10pct"}


def test_iteration_cost_toy(tmp_path):
    iteration_cost.main(TOY + ["--train-cost", "2", "--timestep-fraction", "1", "--train-batch-size", "4",
                               "--out", str(tmp_path)])
    data = load(tmp_path, "iteration_cost")
    fm = data["flop_model"]
    assert fm["train_cost"] == 2 and fm["trainable_steps"] == 3 and fm["steps_per_trajectory"] == 3
    assert 1.0 < fm["train_cost_counted"] < 4.0
    res = {r["name"]: r for r in data["results"]}
    # by hand, per prompt, T = 4, 3 trained steps, c = 2:
    #   plain 6 x 4 = 24 calls + 2 x 6 x 3 = 36                 -> 60
    #   static 12 x 4 = 48 + 2 x 3 x 3 = 18                      -> 66
    #   standard 12, 12, 12 | 6 (prune to 3 after the last) = 42, + 18 -> 60
    #   flash 6, 6, 6 | 4 = 22, + 18                              -> 40
    #   early 12, 12 | 3, 3 = 30, + 18                            -> 48
    hand = {"plain": 60, "static-ovf": 66, "pro-standard": 60, "pro-flash": 40, "pro-early": 48}
    for name, total in hand.items():
        r = res[name]
        assert r["flops_units"]["total"] == total
        assert r["flop_ratio"] == pytest.approx(total / 60)
        assert r["nfe"] == r["nfe_expected"] == parse_schedule(TOY_SPECS[name]).schedule.nfe_per_prompt(4)
        assert r["update_pairs"] == parse_schedule(TOY_SPECS[name]).schedule.final_size * 3
        assert r["trained_trajectories"] == parse_schedule(TOY_SPECS[name]).schedule.final_size
        assert r["saving_gap_points"] == pytest.approx(100 * (r["wall_saving"] - r["flop_saving"]))
    assert set(data["unit_flops"]) == {"denoiser_forward", "train_pair", "vae_decode", "reward"}
    assert set(data["targets"]["wall_saving_at_least_flop_saving_minus_5pts"]["value"]) == \
        {"pro-standard", "pro-flash", "pro-early"}


def test_full_size_flop_shares_by_hand():
    # units in FLOPs: F = 10, a preview image (decode 4 + reward 1) = 0.5 F, training pair = 2 F
    units = {"denoiser_call": 10.0, "train_pair": 20.0, "vae_decode": 4.0, "reward": 1.0}
    res = {r["name"]: r for r in flops.schedule_flops("sd3", 10, units)}
    std = res["pro-standard"]  # 48 -> 24 -> 12 at [5, 7]: 360 calls, 48 + 24 previews, 12 finals
    assert (std["nfe"], std["previews"], std["final_decodes"]) == (360, 72, 12)
    assert std["units"]["previews"] == 36 and std["preview_share_of_rollout"] == pytest.approx(36 / (360 + 6))
    assert std["flop_ratio"] == pytest.approx(576 / 672)
    assert std["all_ratio"] == pytest.approx((576 + 36 + 6) / (672 + 12))


def test_full_size_architectures_have_the_real_parameter_counts():
    for family, n in REAL_PARAMS.items():
        assert count_params_on_meta(family, "full") == pytest.approx(n, rel=0.002)


def test_gpu_plan_fits_and_its_python_runs_on_cpu(tmp_path):
    total = sum(run_all.estimate(b, run_all.PLAN[b])["total"] for b in run_all.PLAN)
    assert total < 8.5 * 60  # predicted from the per-sample timings measured on the H200
    for backend in run_all.PLAN:  # every planned command line parses
        argv = run_all.entry_args(backend, run_all.PLAN[backend], smoke=False)
        floor.parser().parse_args(argv["floor"])
        rollout_cost.parser().parse_args(argv["rollout_cost"])
        iteration_cost.parser().parse_args(argv["iteration_cost"])
    # the GPU code path (real-size builders at toy numbers, the summary) on CPU
    run_all.run_backend("sd3", tmp_path / "sd3", smoke=True,
                        extra=["--schedule", "plain:4", "--schedule", "pro:8>4@1>2@2", "--threads", "0"])
    for name in ("floor", "rollout_cost", "iteration_cost"):
        data = load(tmp_path / "sd3" / name, name)
        assert data["settings"]["backend_class"] == "RandomSD3Backend"
    text = run_all.summarize(tmp_path)
    assert "### iteration_cost" in text and "## flux" in text and (tmp_path / "summary.md").exists()
