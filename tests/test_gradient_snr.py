"""benchmarks.gradient_snr: the statistics by hand, and one tiny run through the quickstart config."""

import math

import pytest
import torch

from benchmarks.gradient_snr import GradientCapture, main, snr_statistics


def test_statistics_by_hand():
    # gram [[10, 8], [8, 10]]: |s|^2 = 8, E|g|^2 = 10, noise 2, N_half = 2 / 24, cos 0.8
    s = snr_statistics(torch.tensor([[3.0, 1.0], [3.0, -1.0]]))
    assert s["signal_share"] == pytest.approx(0.8)
    assert s["pairwise_cos_mean"] == pytest.approx(0.8)
    assert s["n_half"] == pytest.approx(1 / 12)
    pure_noise = snr_statistics(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert pure_noise["signal_share"] == 0 and math.isinf(pure_noise["n_half"])
    with pytest.raises(ValueError, match="at least 2"):
        snr_statistics(torch.ones(1, 3))


def test_noise_model_is_recovered():
    """g_i = s + n_i with |s|^2 = 1 and E|n|^2 = 4: share 1/5, N_half = 4/3, from 400 draws."""
    gen = torch.Generator().manual_seed(0)
    D = 2000
    s = torch.zeros(D)
    s[0] = 1.0
    g = s + torch.randn(400, D, generator=gen) * (2 / math.sqrt(D))
    out = snr_statistics(g)
    assert out["signal_share"] == pytest.approx(0.2, abs=0.02)
    assert out["n_half"] == pytest.approx(4 / 3, rel=0.15)


def test_capture_sums_gradients_and_leaves_parameters():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GradientCapture([p])
    for k in (1.0, 2.0):
        p.grad = torch.full((3,), k)
        opt.step()
    assert torch.equal(opt.flat(), torch.full((3,), 3.0)) and torch.equal(p.detach(), torch.ones(3))


def test_tiny_run_through_the_quickstart_config(tmp_path, one_thread):
    # one_thread restores the thread count after this file: the entry point sets it for the process
    res = main(["--rollouts", "2", "--prompts", "1", "--threads", "1", "--out", str(tmp_path),
                "--set", "model.backend.init_args.sde_window=[0,5]", "--set", "model.rollout.shared_initial_noise=true",
                "--tag", "window"])
    assert res["rollouts"] == 2 and res["trajectories_per_rollout"] == 6  # 16 -> 10 -> 6 survivors
    assert -1 <= res["pairwise_cos_mean"] <= 1 and res["signal_share"] <= 1
    assert 0 <= res["within_group_reward_std"] <= 0.5 and 0 <= res["reward_mean"] <= 1
    assert res["sets"] == ["model.backend.init_args.sde_window=[0,5]", "model.rollout.shared_initial_noise=true"]
    assert (tmp_path / "gradient_snr_config_window.json").exists()
