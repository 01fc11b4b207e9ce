"""The rectified-flow steps against diffusers' Euler scheduler, torch's Normal and hand values."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pro_grpo_lightning.steps.flow import (FLOW_STEP_KINDS, flow_diffusion_coefficient, flow_sde_step,
                                           flow_step_std)

KINDS = list(FLOW_STEP_KINDS)


def _table(num_steps=10, shift=3.0):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("kind", KINDS)
def test_zero_noise_is_the_schedulers_euler_step(kind):
    sched = _table()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g)  # [B, C, h, w]
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        ref = sched.step(v, t, x, return_dict=False)[0]  # stateful: walks i = 0..T-1
        sigma, sigma_next = sched.sigmas[i].expand(2), sched.sigmas[i + 1].expand(2)
        out = flow_sde_step(v, x, sigma, sigma_next, noise_level=0.0, kind=kind, generator=g)
        if kind == "cps":  # algebraically Euler, other rounding
            torch.testing.assert_close(out.next_latents, ref, rtol=0, atol=2e-6)
        else:
            assert torch.equal(out.next_latents, ref), (kind, i)
        assert torch.equal(out.std, torch.zeros(2)) and torch.equal(out.log_prob, torch.zeros(2))
        x = ref


def test_per_sample_sigmas_match_one_sample_calls():
    sched = _table()
    idx = torch.tensor([0, 9, 4, 6])
    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    out = flow_sde_step(v, x, sched.sigmas[idx], sched.sigmas[idx + 1], noise=noise)
    for b, i in enumerate(idx.tolist()):  # reference only: one call per sample
        one = flow_sde_step(v[b:b + 1], x[b:b + 1], sched.sigmas[i], sched.sigmas[i + 1],
                            noise=noise[b:b + 1])
        torch.testing.assert_close(out.next_latents[b:b + 1], one.next_latents, rtol=0, atol=0)
        torch.testing.assert_close(out.log_prob[b:b + 1], one.log_prob, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_log_prob_is_normal_mean_over_dims_and_rescoring_is_exact(kind):
    sched = _table()
    idx = torch.tensor([0, 3, 7])
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    out = flow_sde_step(v, x, sched.sigmas[idx], sched.sigmas[idx + 1], noise_level=0.5, kind=kind,
                        generator=g)
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1))
    expected = normal.log_prob(out.next_latents).flatten(1).mean(1)  # [B]
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    again = flow_sde_step(v, x, sched.sigmas[idx], sched.sigmas[idx + 1], noise_level=0.5, kind=kind,
                          next_latents=out.next_latents)
    assert torch.equal(again.log_prob, out.log_prob) and torch.equal(again.mean, out.mean)
    assert torch.equal(again.next_latents, out.next_latents)


def test_std_and_mean_hand_computed():
    s, sn = torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.8])
    # flow_grpo: g = a sqrt(s/(1-s)); at s = 1 the denominator uses sn:
    # g = 0.7 sqrt(1/0.2), std = g sqrt(0.2) = 0.7
    torch.testing.assert_close(flow_step_std(s, sn, 0.7, "flow_grpo"), torch.tensor([0.35, 0.7]))
    torch.testing.assert_close(flow_diffusion_coefficient(s, sn, 0.7, "flow_grpo"),
                               torch.tensor([0.7, 0.7 * math.sqrt(5.0)]))
    torch.testing.assert_close(flow_step_std(s, sn, 0.3, "dance"), torch.tensor([0.15, 0.3 * math.sqrt(0.2)]))
    torch.testing.assert_close(flow_step_std(s, sn, 0.7, "cps"), sn * math.sin(0.35 * math.pi))
    assert torch.equal(flow_step_std(s, sn, 0.7, "ode"), torch.zeros(2))
    # mean at x = 1, v = 2, s = 0.5, sn = 0.25, a = 0.7: g^2/(2s) = 0.49, dt = -0.25
    # x (1 - 0.49 * 0.25) + v (1 + 0.49 * 0.5)(-0.25) = 0.8775 - 0.6225 = 0.255
    out = flow_sde_step(torch.full((1, 1), 2.0), torch.ones(1, 1), 0.5, 0.25, noise_level=0.7,
                        noise=torch.zeros(1, 1))
    torch.testing.assert_close(out.mean, torch.tensor([[0.255]]))
    torch.testing.assert_close(out.x0, torch.tensor([[0.0]]))  # x - s v
    torch.testing.assert_close(out.std, torch.tensor([0.35]))


def test_cps_preserves_the_noise_coefficient():
    # With the exact velocity v = eps - x0 at x = (1-s) x0 + s eps, CPS gives
    # next = (1 - sn) x0 + sn (cos eps + sin n): the noise keeps unit variance and scale sn.
    g = torch.Generator().manual_seed(3)
    x0, eps, n = (torch.randn(2, 8, generator=g) for _ in range(3))
    s, sn, a = torch.tensor([0.9, 0.4]), torch.tensor([0.6, 0.1]), 0.6
    x = (1 - s[:, None]) * x0 + s[:, None] * eps
    out = flow_sde_step(eps - x0, x, s, sn, noise_level=a, kind="cps", noise=n)
    c, si = math.cos(a * math.pi / 2), math.sin(a * math.pi / 2)
    expected = (1 - sn[:, None]) * x0 + sn[:, None] * (c * eps + si * n)
    torch.testing.assert_close(out.next_latents, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_first_and_last_steps_are_finite(kind):
    # sigma = 1 (first), sigma_next = 0 (last), and a one-step table 1 -> 0; bf16 network output.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 4, 4, generator=g)
    v = torch.randn(3, 4, 4, 4, generator=g).bfloat16()
    s, sn = torch.tensor([1.0, 0.05, 1.0]), torch.tensor([0.9, 0.0, 0.0])
    out = flow_sde_step(v, x, s, sn, noise_level=0.7, kind=kind, generator=g)
    for t in (out.next_latents, out.mean, out.x0, out.log_prob, out.std):
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), kind
    again = flow_sde_step(v, x, s, sn, noise_level=0.7, kind=kind, next_latents=out.next_latents)
    assert torch.equal(again.log_prob, out.log_prob)
    if kind == "cps":  # std = sn sin(.) = 0 at the last step: a point mass on x0_hat, log-prob 0
        assert out.std[1] == 0 and out.log_prob[1] == 0
        torch.testing.assert_close(out.next_latents[1], out.x0[1])


def test_zero_std_steps_give_zero_not_nan_gradients():
    v = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = flow_sde_step(v, torch.randn(2, 3, 4, 4), 0.5, 0.25, kind="ode")
    out.log_prob.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        flow_sde_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.2, kind="euler")
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.2, kind="cps", noise_level=1.5)
    with pytest.raises(ValueError, match="per sample"):
        flow_sde_step(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0.5, 0.4, 0.3]), 0.2)
