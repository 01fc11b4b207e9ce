"""The benchmark entry points at toy size: counts, FLOP ratios, files. Never a time."""

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import floor, flops, iteration_cost, preview_cost, rollout_cost
from benchmarks.gpu import run_all
from benchmarks.measure import FlopModel, count_flops, sde_window
from benchmarks.models import REAL_PARAMS, arch, count_params_on_meta, tiny_decoder_config
from benchmarks.report import SCHEMA_VERSION
from benchmarks.schedules import paper_schedules, parse_schedule, reference, trainable_steps_in, window_schedules
from pro_grpo_lightning.backends import TinyFluxBackend, TinySD3Backend, TinySD15Backend

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


# ---- SDE windows ----------------------------------------------------------------------------------
def test_window_specs_and_presets():
    s = parse_schedule("fast=pro:48>12@4/topk/window=2:4")
    assert (s.name, s.schedule.checkpoints, s.schedule.keep, s.schedule.rule, s.window) == \
        ("fast", [4], [12], "topk", (2, 4))
    assert parse_schedule("plain:24/window=2:4").window == (2, 4) and parse_schedule("plain:24").window is None
    for bad in ("plain:24/window=4:2", "plain:24/window=2", "plain:24/window=a:b"):
        with pytest.raises(ValueError, match="window"):
            parse_schedule(bad)
    with pytest.raises(ValueError, match=r"window \[2, 12\)"):
        parse_schedule("plain:24/window=2:12").validate_steps(10)
    # Flow-GRPO-Fast-like windows at T = 10: [2, 4) and [2, 5); prune inside (at the last window step)
    # or right after (at the first ODE step); the paper's G = 24, G_max = 48, K = 12
    specs = {s.name: s.spec for s in window_schedules("sd3", 10)}
    assert specs == {"plain": "plain:24",
                     "plain-w2": "plain:24/window=2:4", "pro-w2-inside": "pro:48>12@3/window=2:4",
                     "pro-w2-after": "pro:48>12@4/window=2:4", "flash-w2-after": "pro:24>12@4/window=2:4",
                     "plain-w3": "plain:24/window=2:5", "pro-w3-inside": "pro:48>12@4/window=2:5",
                     "pro-w3-after": "pro:48>12@5/window=2:5", "flash-w3-after": "pro:24>12@5/window=2:5"}
    assert reference(window_schedules("flux", 10)).name == "plain"


@pytest.mark.parametrize("cls,family,T,window", [
    (TinySD3Backend, "sd3", 4, None), (TinySD3Backend, "sd3", 4, (1, 3)), (TinySD3Backend, "sd3", 4, (1, 4)),
    (TinySD3Backend, "sd3", 4, (0, 1)), (TinyFluxBackend, "flux", 4, (2, 4)),
    (TinySD15Backend, "sd15", 4, None), (TinySD15Backend, "sd15", 4, (1, 4))])
def test_trainable_steps_and_the_window_context_equal_a_backend_built_with_the_window(cls, family, T, window):
    built = cls(seed=0, num_steps=T, sde_window=None if window is None else list(window))
    plain = cls(seed=0, num_steps=T)
    for b in (built, plain):
        b.configure_model()
    n = int(built.trainable_steps().sum())
    assert trainable_steps_in(family, T, window) == n
    cond = plain.encode_prompts(["a red cube"])
    x = plain.initial_latents(1, torch.Generator().manual_seed(0))
    with sde_window(plain, window):
        assert torch.equal(plain.trainable_steps(), built.trainable_steps())
        for t in range(T):
            idx = torch.full((1,), t, dtype=torch.long)
            with torch.no_grad():
                a = plain.step(x, idx, cond, generator=torch.Generator().manual_seed(t))
                b = built.step(x, idx, cond, generator=torch.Generator().manual_seed(t))
            torch.testing.assert_close(a.next_latents, b.next_latents)
            torch.testing.assert_close(a.log_prob, b.log_prob)
    assert plain.sde_window is None and int(plain.trainable_steps().sum()) == trainable_steps_in(family, T)


def test_window_schedule_flops_by_hand():
    # F = 10, a training pair 20 (c = 2); a final image: VAE 4 + reward 1 = 0.5 F; previews: VAE 0.5 F,
    # VAE at 0.5: (1 + 1) / 10 = 0.2 F, tiny: (0.25 + 1) / 10 = 0.125 F
    units = {"denoiser_call": 10.0, "train_pair": 20.0, "vae_decode": 4.0, "reward": 1.0,
             "preview_decode": {"vae": 4.0, "vae@0.5": 1.0, "tiny": 0.25}}
    res = {r["name"]: r for r in flops.schedule_flops("sd3", 10, units, schedules=window_schedules("sd3", 10))}
    # (calls, trained steps, K, previews, final decodes), counted by hand; T = 10, 9 trainable steps
    hand = {"plain": (240, 9, 24, 0, 24),
            "plain-w2": (240, 2, 24, 0, 24),                  # same sampling, 2 trained steps
            "pro-w2-inside": (48 * 4 + 12 * 6, 2, 12, 48, 12),  # steps 0-3 at 48, 4-9 at 12
            "pro-w2-after": (48 * 5 + 12 * 5, 2, 12, 48, 12),
            "flash-w2-after": (24 * 5 + 12 * 5, 2, 12, 24, 12),
            "plain-w3": (240, 3, 24, 0, 24),
            "pro-w3-inside": (48 * 5 + 12 * 5, 3, 12, 48, 12),
            "pro-w3-after": (48 * 6 + 12 * 4, 3, 12, 48, 12),
            "flash-w3-after": (24 * 6 + 12 * 4, 3, 12, 24, 12)}
    assert set(res) == set(hand)
    for name, (calls, steps, K, previews, finals) in hand.items():
        r = res[name]
        assert (r["nfe"], r["trainable_steps"], r["trained"], r["previews"], r["final_decodes"]) == \
            (calls, steps, K, previews, finals), name
        assert r["update_pairs"] == K * steps and r["flop_model_total"] == calls + 2 * K * steps
        assert r["flop_ratio"] == pytest.approx((calls + 2 * K * steps) / (240 + 2 * 24 * 9))
        rest = calls + 0.5 * finals
        for opt, per in (("vae", 0.5), ("vae@0.5", 0.2), ("tiny", 0.125)):
            assert r["preview_options"][opt]["share"] == pytest.approx(previews * per / rest)
    assert res["pro-w2-after"]["preview_options"]["tiny"]["share"] == pytest.approx(6 / 306)


# ---- preview options --------------------------------------------------------------------------------
def test_preview_option_flops_equal_a_direct_count_of_the_decoders():
    from diffusers import AutoencoderKL, AutoencoderTiny
    from torch.nn.attention import SDPBackend, sdpa_kernel

    units = flops.unit_flops_full("sd15", 64, size="mini")  # counted on the meta device
    torch.manual_seed(0)
    tiny = AutoencoderTiny(latent_channels=4).eval()  # TAESD's architecture, random weights
    vae = AutoencoderKL(**arch("sd15", "mini")["vae"]).eval()
    # the math attention kernel: its matmuls are counted (the meta count includes attention; the
    # CPU's fused kernel has no FLOP formula registered)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        direct = {"vae": count_flops(lambda: vae.decode(torch.randn(1, 4, 8, 8))),
                  "vae@0.5": count_flops(lambda: vae.decode(torch.randn(1, 4, 4, 4))),
                  "tiny": count_flops(lambda: tiny.decode(torch.randn(1, 4, 8, 8)))}
    assert units["preview_decode"] == direct and units["vae_decode"] == direct["vae"]
    assert units["reward"] == sum(units["reward_parts"].values())
    per = flops.preview_units(units)
    for k, d in direct.items():
        assert per[k] == pytest.approx((d + units["reward"]) / units["denoiser_call"])
    assert tiny_decoder_config("sd15")["latent_channels"] == 4  # SD1.x's VAE: 4 latent channels
    assert tiny_decoder_config("sd3")["latent_channels"] == tiny_decoder_config("flux")["latent_channels"] == 16


def test_flops_entry_point_preview_columns_and_windows_at_toy_size(tmp_path):
    data = flops.main(["--size", "mini", "--resolution", "64", "--families", "sd15", "sd3", "--steps-sd15", "20",
                       "--steps-flow", "10", "--out", str(tmp_path)])
    assert (tmp_path / "flops.png").exists() and "previews add (tiny)" in (tmp_path / "flops.md").read_text()
    sd15 = data["backends"]["sd15"]
    units = sd15["unit_flops"]
    pro = {r["name"]: r for r in sd15["schedules"]["20"]}["pro-paper"]  # 48 -> 32@12 -> 8@16: 48 + 32 previews
    image = (units["vae_decode"] + units["reward"]) / units["denoiser_call"]
    for opt in flops.PREVIEW_OPTIONS:
        per = (units["preview_decode"][opt] + units["reward"]) / units["denoiser_call"]
        assert pro["preview_options"][opt]["share"] == pytest.approx(80 * per / (776 + 8 * image))
    target = data["targets"]["previews_add_under_3pct"]
    assert set(target["best_option"]) == {"sd15@T=20", "sd3@T=10"}
    shares = target["by_family_and_T"]["sd15@T=20"]
    assert shares[target["best_option"]["sd15@T=20"]]["shares"]["pro-paper"] == \
        min(v["shares"]["pro-paper"] for v in shares.values())
    win = {r["name"]: r for r in data["backends"]["sd3"]["window_schedules"]["10"]}
    assert win["flash-w2-after"]["nfe"] == 180 and win["plain-w2"]["update_pairs"] == 48
    assert data["backends"]["sd15"]["window_schedules"] == {}
    lora = data["sd35m_configs"]["lora_train"]  # counted on the mini SD3 with the backend's LoRA targets
    assert lora["lora_forward"] > lora["base_forward"] and 1.5 < lora["backward_factor"] < 3.5 and lora["lora_params"] > 0


def test_shipped_sd35m_config_flops_by_hand():
    """Everything that runs, per prompt: calls x adapted forward, images x (decode + reward), pairs x
    (LoRA train pair + the KL reference forward when kl_beta > 0); units in TFLOP for round numbers."""
    T = 1e12
    units = {"vae_decode": 3 * T, "reward": 1 * T}
    train = {"lora_forward": 10 * T, "train_pair": 21 * T, "base_forward": 9 * T}
    cfg = {name: flops.read_config(flops.ROOT.parent / "configs" / name) for name in flops.SD35M_CONFIGS}
    plain = flops.config_flops(cfg["sd35m_pickscore_flow_grpo.yaml"], units, train)
    assert (plain["nfe"], plain["pairs"], plain["kl"]) == (240, 24 * 9, True)  # G 24, 9 trained steps, kl 0.01
    assert plain["total"] == pytest.approx(240 * 10 + 24 * 4 + 216 * (21 + 9))
    std = flops.config_flops(cfg["sd35m_pickscore_pro_grpo.yaml"], units, train)  # 48 -> 24 @5 -> 12 @7
    assert (std["nfe"], std["previews_n"], std["pairs"]) == (360, 72, 108)
    assert std["total"] == pytest.approx(360 * 10 + (72 + 12) * 4 + 108 * 30)
    no_kl = dict(cfg["sd35m_pickscore_pro_grpo.yaml"], model=dict(cfg["sd35m_pickscore_pro_grpo.yaml"]["model"],
                 update=dict(cfg["sd35m_pickscore_pro_grpo.yaml"]["model"]["update"], kl_beta=0.0)))
    assert flops.config_flops(no_kl, units, train)["kl_reference"] == 0.0


def test_flux_depth_extrapolation_is_exact_in_flops():
    # FLUX.1-dev = 19 units of (1 double + 2 single blocks): FLOPs(1) + 18 (FLOPs(2) - FLOPs(1)) = FLOPs(19)
    check = preview_cost.flop_extrapolation_check("flux", arch("flux", "full"), 128)
    assert check["units"] == 19 and check["extrapolated"] == check["counted"]
    assert preview_cost.depth_units("sd3", arch("sd3", "full")) == (1, None)


def test_preview_cost_toy(tmp_path):
    data = preview_cost.main(["--size", "mini", "--families", "flux", "--repeats", "2", "--warmup", "0",
                              "--threads", "0", "--out", str(tmp_path)])
    assert (tmp_path / "preview_cost.png").exists() and (tmp_path / "preview_cost.md").read_text().startswith("|")
    r = data["families"]["flux"]
    assert r["denoiser"]["measured_as"].startswith("extrapolated") and len(r["rounds"]) == 2
    units = flops.unit_flops_full("flux", 64, size="mini")
    assert r["denoiser"]["flops"] == units["denoiser_call"]  # one unit at mini size: extrapolation = itself
    for k in flops.PREVIEW_OPTIONS:
        o = r["options"][k]
        assert o["flops"]["decode"] == units["preview_decode"][k]
        assert o["flops"]["preview_over_denoiser"] == pytest.approx(
            (units["preview_decode"][k] + units["reward"]) / units["denoiser_call"])
        for x in r["rounds"]:  # ratios taken within a round
            assert x["times_s"][k] > 0 and x["denoiser_s"] == pytest.approx(x["times_s"]["denoiser@1"])
        assert o["decode_over_denoiser"]["min"] <= o["decode_over_denoiser"]["median"] <= \
            o["decode_over_denoiser"]["max"]


def test_iteration_cost_window_rows_toy(tmp_path):
    iteration_cost.main(TOY + ["--windows", "--train-cost", "2", "--timestep-fraction", "1", "--train-batch-size", "4",
                               "--no-plot", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "iteration_cost.json").read_text())
    res = {r["name"]: r for r in data["results"]}
    # T = 4, G 6, G_max 12, K 3, window start round(0.8) = 1: [1, 3) and [1, 4); c = 2; by hand:
    #   (calls, trained steps (the window's, not the last), stochastic steps sampled, FLOP model)
    hand = {"plain": (24, 3, 4, 24 + 2 * 6 * 3), "plain-w2": (24, 2, 2, 24 + 2 * 6 * 2),
            "pro-w2-inside": (12 * 3 + 3, 2, 2, 39 + 2 * 3 * 2), "pro-w2-after": (48, 2, 2, 48 + 12),
            "flash-w2-after": (24, 2, 2, 24 + 12), "plain-w3": (24, 2, 3, 24 + 24), "pro-w3-inside": (48, 2, 3, 60)}
    assert set(res) == set(hand)  # the 3-step window ends at T: no step after it to prune at
    for name, (calls, steps, stochastic, total) in hand.items():
        r = res[name]
        assert (r["nfe"], r["trainable_steps"], r["stochastic_steps"]) == (calls, steps, stochastic), name
        assert r["flops_units"]["total"] == total and r["flop_ratio"] == pytest.approx(total / 60)
        assert r["update_pairs"] == r["trained_trajectories"] * steps
