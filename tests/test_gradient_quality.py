"""benchmarks.gradient_quality: arm selections, the per-trajectory gradient decomposition against the
real update's gradient, and one tiny run through the quickstart config."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.gradient_quality import (arm_gradient, arm_schedules, main, sample, select_arm,
                                         trajectory_gradients)
from benchmarks.gradient_snr import GradientCapture
from benchmarks.schedules import parse_schedule
from pro_grpo_lightning.objectives import group_advantages
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import PlainGRPOSchedule
from pro_grpo_lightning.selection import ovf_indices
from pro_grpo_lightning.update import UpdateSettings, grpo_update
from tests.fakes import AffineBackend, MeanPixel

PROMPTS = ["a cat", "two dogs", "a red square"]
ADV = dict(std_mode="global", eps=1e-4, clip=5.0)


def affine_module(T=5, G=6):
    backend = AffineBackend(num_steps=T)
    backend.configure_model()
    with torch.no_grad():
        backend.net.delta.copy_(torch.tensor([[0.1, -0.2], [0.3, 0.05]]))  # a non-trivial policy
    return SimpleNamespace(backend=backend,
                           rollout=ExpandPruneRollout(backend, RewardSet([MeanPixel()]), PlainGRPOSchedule(G)))


def test_arms_select_as_their_rules_say():
    gen = torch.Generator().manual_seed(0)
    final = torch.rand(2, 24, generator=gen)
    previews = {4: torch.rand(2, 24, generator=gen), 6: torch.rand(2, 24, generator=gen)}
    arms = {a.name: a.schedule for a in arm_schedules(6, 16, [parse_schedule("q=pro:16>10@4>6@6")])}
    g = torch.Generator()
    assert torch.equal(select_arm(arms["plain-K"], previews, final, g), torch.arange(6).expand(2, 6))
    assert torch.equal(select_arm(arms["plain-2K"], previews, final, g), torch.arange(12).expand(2, 12))
    assert torch.equal(select_arm(arms["static-ovf"], previews, final, g), ovf_indices(final[:, :16], 6))
    # Pro-GRPO: OVF on the step-4 previews of the first 16, then OVF on the step-6 previews of those 10
    first = ovf_indices(previews[4][:, :16], 10)  # [2, 10]
    second = first.gather(1, ovf_indices(previews[6].gather(1, first), 6))
    assert torch.equal(select_arm(arms["pro-q"], previews, final, g), second)
    ext = select_arm(arms["static-extremes"], previews, final, g)  # 3 best + 3 worst true rewards
    for p in range(2):
        order = final[p, :16].argsort()
        assert set(ext[p].tolist()) == set(order[:3].tolist()) | set(order[-3:].tolist())


def test_arm_gradient_is_the_updates_gradient_and_zero_for_a_constant_reward():
    """The per-trajectory decomposition reproduces grpo_update's gradient exactly (all steps trained,
    one minibatch, no clipping), on the same trajectories as the rollout samples."""
    T, G = 5, 6
    module = affine_module(T, G)
    cond, latents, previews, final = sample(module, PROMPTS, G, [], torch.Generator().manual_seed(3))
    res = module.rollout.run(PROMPTS, torch.Generator().manual_seed(3))
    torch.testing.assert_close(res.latents, latents)  # same draws in the same order
    torch.testing.assert_close(res.rewards, final)
    H, m = trajectory_gradients(module, cond, latents, 3, G, 1.0, torch.Generator().manual_seed(0))
    assert H.shape == (3, G, 4) and m == T
    idx = torch.arange(G).expand(3, G)
    mine = arm_gradient(H, idx, final, m, ADV)
    capture = GradientCapture(module.backend.trainable_parameters())
    settings = UpdateSettings(timestep_fraction=1.0, train_batch_size=10_000, clip_range=0.01, max_grad_norm=None)
    grpo_update(module.backend, res, group_advantages(final, **ADV).flatten(), settings, capture,
                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mine, capture.flat(), rtol=1e-4, atol=1e-7)
    assert mine.abs().max() > 1e-4  # not trivially zero
    # a constant reward: every advantage is 0, so the plain-K arm's gradient is exactly zero
    assert torch.equal(arm_gradient(H, idx[:, :3], torch.full((3, G), 0.7), m, ADV), torch.zeros(4))


ARGS = ["--rollouts", "6", "--prompts", "1", "--threads", "1", "--schedule", "q=pro:4>3@4>2@6", "--static-group", "4"]


def test_tiny_run_through_the_quickstart_config(tmp_path, one_thread):
    res = main(ARGS + ["--out", str(tmp_path)])
    assert res["G_sample"] == 4 and res["K"] == 2 and res["preview_steps"] == [4, 6]
    s = res["summary"]
    assert set(s["arms"]) == {"plain-K", "plain-2K", "static-ovf", "static-extremes", "pro-q", "topk-q", "random-q"}
    assert set(s["families"]) == {f"{f}/{m}" for f in ("positive_control", "pro_vs_plain", "pro_vs_ablations",
                                                      "other_arms_vs_plain") for m in ("per_rollout", "per_flop")}
    assert list(s["families"]["pro_vs_plain/per_rollout"]) == ["pro-q - plain-K", "pro-q - plain-2K"]
    assert s["arms"]["plain-2K"]["n_at_equal_flops"] == 1.0 and s["arms"]["plain-K"]["n_at_equal_flops"] == \
        pytest.approx(2.0)  # plain-K costs exactly half of plain-2K
    for a in s["arms"].values():
        assert -1 <= a["per_rollout"]["est"] <= 1 and a["per_rollout"]["se"] > 0
    # the stored Gram matrices recompute the summary
    from benchmarks.gradient_quality import load, summarize
    again = summarize(load(tmp_path))
    assert again["families"]["positive_control/per_rollout"] == s["families"]["positive_control/per_rollout"]
    # costs in denoiser calls: plain 2 x 10 + update; Pro 4 x 5 + 3 x 2 + 2 x 3 + previews + update
    units = res["units_flops"]
    c = units["train_pair"] / units["denoiser_call"]
    image = (units["decode"] + units["reward"]) / units["denoiser_call"]
    m = res["pairs_per_trajectory"]
    assert res["arms"]["plain-K"]["cost_F_per_prompt"]["total"] == pytest.approx(20 + 2 * image + 2 * m * c)
    assert res["arms"]["pro-q"]["cost_F_per_prompt"]["total"] == pytest.approx(
        32 + (4 + 3) * image + 2 * image + 2 * m * c)
    assert c > 1 and (tmp_path / "gradient_quality.md").exists() and (tmp_path / "grams.npz").exists()
    # the saved state is continued: asking again for 6 rollouts samples nothing and summarises the same
    assert main(ARGS + ["--out", str(tmp_path)])["summary"] == s
    with pytest.raises(ValueError, match="holds another setting"):
        main([*ARGS[:7], "q=pro:4>3@4>2@5", *ARGS[8:], "--out", str(tmp_path)])


def test_random_arms_draw_from_their_own_stream():
    """The random arms' subsets do not come from the sampling stream of the same rollout."""
    from benchmarks.gradient_quality import arm_generator

    a, b = arm_generator(0, 3), torch.Generator().manual_seed(3)
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    assert torch.equal(torch.rand(8, generator=arm_generator(0, 3)), torch.rand(8, generator=arm_generator(0, 3)))


def test_shards_joined_equal_one_run(tmp_path, one_thread):
    """Rollout r depends only on (seed, r): 2 shards sampled apart and joined give the one-process
    run's per-rollout values and summary."""
    whole = main(ARGS + ["--out", str(tmp_path / "whole")])
    parts = tmp_path / "parts"
    assert main(ARGS + ["--out", str(parts), "--shard", "1/2"])["rollouts"] == [1, 3, 5]
    with pytest.raises(ValueError, match=r"missing \[0"):  # rollout 0's shard not there yet
        main(ARGS + ["--out", str(parts), "--join"])
    assert main(ARGS + ["--out", str(parts), "--shard", "0/2"])["rollouts"] == [0, 2, 4]
    joined = main(ARGS + ["--out", str(parts), "--join", "--looks", "2"])
    assert [r["rollout"] for r in joined["per_rollout"]] == list(range(6))
    assert joined["looks"] == 2 and joined["summary"]["alpha"] == pytest.approx(0.025)
    assert "97.5 % interval" in (parts / "gradient_quality.md").read_text()
    for a, b in zip(joined["per_rollout"], whole["per_rollout"]):
        for arm in a["arms"]:
            for k, v in a["arms"][arm].items():
                assert v == pytest.approx(b["arms"][arm][k], rel=1e-6, abs=1e-9), (arm, k)
    np.testing.assert_allclose(joined["grams"]["GF"], whole["grams"]["GF"], rtol=1e-6, atol=1e-12)
    assert joined["summary"]["arms"]["pro-q"]["per_rollout"]["est"] == \
        pytest.approx(whole["summary"]["arms"]["pro-q"]["per_rollout"]["est"])
    pc = "positive_control/per_rollout", "plain-2K - plain-K"
    one, two = whole["summary"]["families"][pc[0]][pc[1]], joined["summary"]["families"][pc[0]][pc[1]]
    assert two["nominal"]["lo"] == pytest.approx(one["lo"]) and two["lo"] < one["lo"]  # the second look: wider
    with pytest.raises(SystemExit) as bad:
        main(ARGS + ["--out", str(parts), "--join", "--looks", "0"])
    assert bad.value.code == 2


def test_proxy_quality_summary_of_a_csv_log(tmp_path):
    from benchmarks.proxy_quality import summarize

    path = tmp_path / "metrics.csv"
    path.write_text("step,pruning/audit_overlap,pruning/audit_proxy_corr_full_0,train/loss\n"
                    "0,0.5,0.7,1\n1,0.7,,2\n2,0.6,0.9,3\n")
    out = summarize(str(path))
    assert set(out) == {"pruning/audit_overlap", "pruning/audit_proxy_corr_full_0"}  # train/* not read
    assert out["pruning/audit_overlap"]["mean"] == pytest.approx(0.6) and out["pruning/audit_overlap"]["n"] == 3
    # mean 0.6, sd 0.1, t_{0.975, 2} = 4.3027: half-width 0.1 * 4.3027 / sqrt(3)
    assert out["pruning/audit_overlap"]["hi"] == pytest.approx(0.6 + 0.1 * 4.302653 / 3 ** 0.5, rel=1e-5)
    assert out["pruning/audit_proxy_corr_full_0"]["mean"] == pytest.approx(0.8)  # blank cells skipped


def test_packed_grams_keep_what_the_scoring_reads():
    """grams.npz holds float32 blocks (cross-half GF, within-half GG and FF): unpacked they equal the
    full matrices there, NaN elsewhere, and score as the full float64 matrices do (odd R)."""
    from benchmarks.gradient_quality import pack_grams, summarize, unpack_grams
    from benchmarks.gradient_quality_sim import simulate_run

    res = simulate_run(9, 2, 12, 2, 4, ["q=pro:4>3@4>2@6"], seed=1, signal=2.0)
    full = res["grams"]
    back = unpack_grams(pack_grams(full))
    half = np.arange(9) % 2
    same = half[:, None] == half[None, :]  # [R, R]
    for k in ("GF", "GG", "FF"):
        stored = ~same if k == "GF" else same
        np.testing.assert_allclose(back[k][..., stored], full[k][..., stored], rtol=1e-6)
        assert np.isnan(back[k][..., ~stored]).all()
    a, b = summarize(res), summarize(dict(res, grams=back))
    for fam, comps in a["families"].items():
        for nm, c in comps.items():
            assert b["families"][fam][nm]["est"] == pytest.approx(c["est"], rel=1e-5, abs=1e-9)
            assert b["families"][fam][nm]["se"] == pytest.approx(c["se"], rel=1e-4)


def test_the_first_look_is_recomputed_from_its_stored_grams():
    """docs/results/gradient_quality/main: its Gram matrices (full float64) give its stored summary
    and tables (the fast jackknife and the looks option change nothing at one look)."""
    from pathlib import Path

    from benchmarks.gradient_quality import ROOT, load, summarize, table

    out = Path(ROOT / "docs/results/gradient_quality/main")
    res = load(out)
    s = summarize(res)
    assert table(s) + "\n" == (out / "gradient_quality.md").read_text()
    for fam, comps in res["summary"]["families"].items():
        for nm, c in comps.items():
            for k, v in c.items():
                assert s["families"][fam][nm][k] == (pytest.approx(v, rel=1e-10, abs=1e-15)
                                                     if isinstance(v, float) else v), (fam, nm, k)


def test_the_second_look_continues_the_first():
    """docs/results/gradient_quality/extension continued the first look's saved states: its rollouts
    0..127 are the first look's (per-rollout values equal, Gram matrices to float32 precision, the
    first look's tables recomputed from them), and its stored summary is recomputed at two looks."""
    from pathlib import Path

    from benchmarks.gradient_quality import ROOT, load, summarize, table

    first, second = (load(Path(ROOT / "docs/results/gradient_quality" / d)) for d in ("main", "extension"))
    R1 = first["rollouts"]
    assert second["rollouts"] > R1 and second["looks"] == 2
    assert second["per_rollout"][:R1] == first["per_rollout"]
    sub = dict(second, per_rollout=second["per_rollout"][:R1],
               grams={k: v[..., :R1, :R1] for k, v in second["grams"].items()})  # rollouts 0..127
    first_md = (ROOT / "docs/results/gradient_quality/main/gradient_quality.md").read_text()
    assert table(summarize(sub, looks=1)) + "\n" == first_md
    again = summarize(second)
    assert again["alpha"] == pytest.approx(0.025) and table(again) + "\n" == \
        (ROOT / "docs/results/gradient_quality/extension/gradient_quality.md").read_text()
