"""Pruning points chosen from measured proxy quality (``adaptive.py``, ``python -m pro_grpo_lightning adapt``)."""

import json

import pytest
import torch

from pro_grpo_lightning.adaptive import analyse, overlap_with_final, rollout_flops, sequential_choice
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.selection import select_indices
from tests.fakes import AffineBackend, MeanPixel


def known_quality_probes(R=12, P=4, G=8, T=8, informative_from=5, seed=0):
    """Final rewards, and previews that are pure noise before step ``informative_from`` and the final
    reward itself (plus a monotone offset) from there on: the proxy's quality per step is known."""
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(R, P, G, generator=g)  # [R, P, G]
    noise = torch.randn(R, T, P, G, generator=g)  # [R, T, P, G]
    good = (torch.arange(T) >= informative_from).view(1, T, 1, 1)  # [1, T, 1, 1]
    probes = torch.where(good, final.unsqueeze(1) * 2 + 1, noise)  # [R, T, P, G]
    return probes, final


def test_rule_picks_the_earliest_points_where_the_proxy_is_as_good_as_the_final_reward():
    probes, final = known_quality_probes()
    res = analyse(probes, final, list(range(8)), group_size=8, keep=[5, 3], rule="ovf", num_steps=8,
                  preview_cost=0.5, bound=0.05)
    assert res["reference"] == [6, 7]
    assert res["chosen"] == [5, 6]  # the first two steps whose previews rank exactly as the final reward
    by_step = {s["step"]: s for s in res["per_step"]}
    assert by_step[5]["corr"] == pytest.approx(1.0) and by_step[5]["overlap_one_stage"] == 1.0
    assert abs(by_step[2]["corr"]) < 0.3 and by_step[2]["overlap_one_stage"] < 0.8  # noise: about chance
    chosen = next(t for t in res["tuples"] if t["checkpoints"] == [5, 6])
    assert chosen["overlap"] == res["reference_overlap"]  # same scores' ranking: same choices
    # a mixed tuple (noise first) loses overlap, and an early pure-noise tuple is cheaper but refused
    early = next(t for t in res["tuples"] if t["checkpoints"] == [0, 1])
    assert early["flops_per_prompt"] < chosen["flops_per_prompt"]
    assert early["overlap"] < res["threshold"]
    # a bound as wide as the whole range accepts the cheapest tuple: the earliest points
    loose = analyse(probes, final, list(range(8)), 8, [5, 3], "ovf", 8, 0.5, bound=1.0)
    assert loose["chosen"] == [0, 1]


def test_rule_weighs_preview_cost_in_the_flop_model():
    """Two candidate steps with equally good previews: with pricey previews, pruning later but on
    fewer live trajectories can still be cheaper; the FLOP model, not the step index, decides."""
    sched = ProGRPOSchedule(8, [5, 6], [5, 3])
    assert rollout_flops(sched, 8, 0.0) == sched.nfe_per_prompt(8)
    assert rollout_flops(sched, 8, 2.0) == sched.nfe_per_prompt(8) + 2.0 * (8 + 5)


def test_sequential_choice_replays_the_rollouts_selections_and_overlap_matches_audit():
    """On a transparent backend: replaying the schedule on the audit rollout's recorded previews gives
    the rollout's own survivors and its logged overlap."""
    backend = AffineBackend(num_steps=6)
    backend.configure_model()
    sched = ProGRPOSchedule(8, [1, 3], [5, 3])
    rollout = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), sched)
    res = rollout.run(["a", "b", "c"], torch.Generator().manual_seed(0), audit=True, probe_steps=range(6))
    assert sorted(res.probe_scores) == list(range(6)) and res.expanded_rewards.shape == (3, 8)
    # probes at a checkpoint are the checkpoint's own scores (no second preview there)
    torch.testing.assert_close(res.probe_scores[1], res.checkpoints[0].scores)
    assert res.num_previews == 6 * 3 * 8
    chosen = sequential_choice([res.probe_scores[1], res.probe_scores[3]], [5, 3], "ovf")  # [P, 3]
    overlap = overlap_with_final(chosen, res.expanded_rewards, "ovf").mean()
    torch.testing.assert_close(overlap, res.audit["overlap"])
    torch.testing.assert_close(res.expanded_rewards.gather(1, chosen), res.rewards)
    with pytest.raises(ValueError, match="probe_steps needs audit"):
        rollout.run(["a"], torch.Generator().manual_seed(0), probe_steps=[1])


def test_overlap_is_one_for_the_final_rewards_own_choice_and_chance_for_a_reversed_order():
    final = torch.randn(50, 10, generator=torch.Generator().manual_seed(1))  # [B, G]
    own = select_indices(final, 4, "topk")  # [B, 4]
    assert torch.equal(overlap_with_final(own, final, "topk"), torch.ones(50))
    assert overlap_with_final(select_indices(-final, 4, "topk"), final, "topk").max() == 0


def test_adapt_command_writes_an_overlay_that_fit_accepts(tmp_path):
    from pro_grpo_lightning.adaptive import main
    from pro_grpo_lightning.cli import main as cli_main

    out = tmp_path / "adapt"
    small = ["--data.prompts_per_step=2", "--model.backend.init_args.resolution=32",
             "--model.backend.init_args.num_steps=4", "--model.schedule.init_args.checkpoints=[1, 2]"]
    args = ["--config", "configs/tiny_sd15.yaml", "--rollouts", "2", "--out", str(out), *small]
    assert main(args) == 0
    result = json.loads((out / "adaptive.json").read_text())
    assert result["rollouts"] == 2 and len(result["per_step"]) == result["num_steps"]
    assert result["chosen"] in [t["checkpoints"] for t in result["tuples"]]
    cli = cli_main(["--config", "configs/tiny_sd15.yaml", *small, "--config", str(out / "schedule.yaml")],
                   run=False, save_config=False)
    assert cli.model.schedule.checkpoints == result["chosen"]
    with pytest.raises(ValueError, match="already holds"):  # nothing is replaced
        main(args)


def test_benchmark_replays_arms_like_the_rule_and_scales_the_papers_points():
    from benchmarks.adaptive_schedule import paper_points, replay

    assert paper_points(10, 2) == [5, 7] and paper_points(50, 2) == [30, 40] and paper_points(20, 2) == [10, 14]
    assert paper_points(10, 3) is None
    probes, final = known_quality_probes(R=5)
    res = analyse(probes, final, list(range(8)), 8, [5, 3], "ovf", 8, 0.5, bound=0.05)
    for t in res["tuples"][:6]:
        got = replay(probes, final, list(range(8)), t["checkpoints"], [5, 3], "ovf")  # [R]
        assert got.tolist() == pytest.approx(t["overlap_per_rollout"])
