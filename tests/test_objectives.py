"""Value-level tests of the GRPO objectives against hand-computed numbers and torch.distributions."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pro_grpo_lightning.objectives import gaussian_kl, group_advantages, output_kl, ppo_clip_loss


# ---------------------------------------------------------------------------------------- advantages
def test_advantages_hand_computed():
    # rewards 1, 2, 3: mean 2, population std sqrt(2/3).
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0]]))
    s = math.sqrt(2 / 3) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([[-1 / s, 0.0, 1 / s]]))


def test_advantages_per_group_and_eps():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    adv = group_advantages(rewards, eps=0.5)
    s0 = statistics.pstdev([1, 2, 3]) + 0.5
    s1 = statistics.pstdev([0, 0, 6]) + 0.5
    expected = torch.tensor([[-1 / s0, 0.0, 1 / s0], [-2 / s1, -2 / s1, 4 / s1]])
    torch.testing.assert_close(adv, expected)


def test_advantages_clipping():
    # One outlier in 100: (1 - 0.01) / (std 0.0995 + 1e-4) ~ 9.94 > 5.
    rewards = torch.zeros(1, 100)
    rewards[0, 7] = 1.0
    adv = group_advantages(rewards)
    assert adv[0, 7].item() == 5.0
    torch.testing.assert_close(adv[0, 0], torch.tensor(-0.01 / (0.0995 + 1e-4)), rtol=1e-4, atol=0)
    unclipped = group_advantages(rewards, clip=None)
    expected = 0.99 / (statistics.pstdev([0] * 99 + [1]) + 1e-4)
    assert unclipped[0, 7].item() == pytest.approx(expected, rel=1e-5)
    assert group_advantages(rewards, clip=1.0).abs().max().item() == 1.0


def test_advantages_all_equal_group_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floats: without the mask this gives ~1e-12, not 0.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 2.0, 3.0], [7.3, 7.3, 7.3]], dtype=torch.float64)
    adv = group_advantages(rewards, eps=1e-12)
    assert torch.equal(adv[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(adv[2], torch.zeros(3, dtype=torch.float64))
    assert adv[1].abs().sum() > 0


def test_advantages_group_size_one_and_constant_batch():
    assert torch.equal(group_advantages(torch.tensor([[3.0], [-1.0]])), torch.zeros(2, 1))
    const = torch.full((3, 4), 0.7)
    for mode in ("group", "global"):
        adv = group_advantages(const, std_mode=mode)
        assert torch.equal(adv, torch.zeros(3, 4))
    assert torch.equal(group_advantages(torch.tensor([[2.0]]), std_mode="global"), torch.zeros(1, 1))


def test_advantages_global_std():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 13.0], [4.0, 4.0, 4.0]])
    adv = group_advantages(rewards, std_mode="global", clip=None)
    s = statistics.pstdev([1, 2, 3, 10, 10, 13, 4, 4, 4]) + 1e-4
    expected = torch.tensor([[-1 / s, 0.0, 1 / s], [-1 / s, -1 / s, 2 / s], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    # A std computed elsewhere (e.g. over DDP ranks) replaces the local one.
    adv_ext = group_advantages(rewards, std_mode="global", clip=None, global_std=torch.tensor(2.0))
    s = 2.0 + 1e-4
    expected = torch.tensor([[-1 / s, 0.0, 1 / s], [-1 / s, -1 / s, 2 / s], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv_ext, expected)


def test_advantages_dtype_and_validation():
    adv = group_advantages(torch.tensor([[0, 1], [2, 2]]))
    assert adv.dtype == torch.float32
    assert group_advantages(torch.rand(2, 3, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(torch.rand(2, 3), std_mode="batch")
    with pytest.raises(ValueError, match="global_std"):
        group_advantages(torch.rand(2, 3), global_std=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(torch.rand(6))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-100, 100), min_size=4, max_size=4), min_size=1, max_size=4))
def test_advantages_unclipped_are_centred_and_finite(rows):
    rewards = torch.tensor(rows, dtype=torch.float64)
    adv = group_advantages(rewards, clip=None)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.sum(1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ PPO loss
def test_ppo_ratio_e_is_clipped():
    # ratio e, A = 1: min(e * 1, 1.2 * 1) = 1.2, so loss -1.2.
    loss, stats = ppo_clip_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor(-1.2))
    assert stats["clip_frac"].item() == 1.0


def test_ppo_pessimistic_cases():
    log_prob = torch.tensor([1.0, 1.0, -1.0, -1.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, _ = ppo_clip_loss(log_prob, torch.zeros(4), adv, 0.2)
    e = math.e
    # Per entry max(-A r, -A clip(r)): A>0, r=e -> -1.2; A<0, r=e -> e (unclipped, pessimistic);
    # A>0, r=1/e -> -1/e (unclipped); A<0, r=1/e -> 0.8 (clipped).
    expected = (-1.2 + e - 1 / e + 0.8) / 4
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_ppo_on_policy_is_minus_mean_advantage():
    log_prob = torch.tensor([-3.0, 0.5, 2.0], requires_grad=True)
    adv = torch.tensor([0.5, -2.0, 1.0])
    loss, stats = ppo_clip_loss(log_prob, log_prob.detach().clone(), adv, 1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["clip_frac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0
    loss.backward()
    # d ratio / d log_prob = ratio = 1 on-policy: the plain policy gradient -A / N.
    torch.testing.assert_close(log_prob.grad, -adv / 3)


def test_ppo_clipped_entries_have_no_gradient():
    log_prob = torch.tensor([1.0, 0.0], requires_grad=True)
    loss, _ = ppo_clip_loss(log_prob, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.2)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.5]))


def test_ppo_stats_values():
    log_ratio = torch.tensor([1.0, -1.0, 0.0, 5e-5])
    log_prob = torch.tensor([0.5, 0.2, -0.3, 0.1], requires_grad=True)
    loss, stats = ppo_clip_loss(log_prob, (log_prob - log_ratio).detach(), torch.ones(4), 1e-4)
    # |e - 1|, |1/e - 1| > 1e-4; |1 - 1| and |exp(5e-5) - 1| ~ 5e-5 are not.
    assert stats["clip_frac"].item() == 0.5
    torch.testing.assert_close(stats["approx_kl"], 0.5 * (log_ratio**2).mean())
    torch.testing.assert_close(stats["ratio_mean"], log_ratio.exp().mean())
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    assert loss.requires_grad


def test_ppo_validation():
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_loss(torch.zeros(4), torch.zeros(4), torch.zeros(2, 2), 0.2)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.0)


# ------------------------------------------------------------------------------------------------ KL
def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, 5, 5, generator=g)
    ref_mean = torch.randn(4, 3, 5, 5, generator=g)
    std = torch.rand(4, generator=g) + 0.1
    std_b = std.reshape(4, 1, 1, 1).expand_as(mean)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std_b), torch.distributions.Normal(ref_mean, std_b)
    )  # [4, 3, 5, 5]
    expected = kl.flatten(1).sum(1) / (3 * 5 * 5)
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, std), expected)


def test_gaussian_kl_hand_value_and_scalar_std():
    mean = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # sample 0: (1/(2*0.25) + 0)/2 = 1; sample 1: (0 + 4/(2*0.25))/2 = 4.
    torch.testing.assert_close(gaussian_kl(mean, ref, torch.tensor(0.5)), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(gaussian_kl(mean, ref, torch.tensor([0.5, 1.0])), torch.tensor([1.0, 1.0]))
    assert gaussian_kl(mean.bfloat16(), ref.bfloat16(), torch.tensor(0.5)).dtype == torch.float32
    with pytest.raises(ValueError, match="std"):
        gaussian_kl(mean, ref, torch.ones(3))


def test_output_kl():
    out = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])  # [2, 2, 2]
    ref = torch.zeros(2, 2, 2)
    torch.testing.assert_close(output_kl(out, ref), torch.tensor([7.5, 0.0]))
    assert torch.equal(output_kl(out, out), torch.zeros(2))
    with pytest.raises(ValueError):
        output_kl(out, ref[:1])
