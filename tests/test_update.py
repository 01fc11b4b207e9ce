"""The GRPO update on the transparent backend: pairs, on-policy ratio, gradients, KL, stepping."""

import math

import pytest
import torch

from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings, grpo_update, training_pairs
from tests.fakes import AffineBackend, MeanPixel

PROMPTS = ["a cat", "two dogs"]


@pytest.fixture()
def setup():
    backend = AffineBackend(num_steps=5)
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), ProGRPOSchedule(6, [1], [3]))
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(0))
    return backend, res


def test_training_pairs_cover_distinct_trainable_steps():
    trainable = torch.tensor([True, False, True, True, True])
    traj, step = training_pairs(4, trainable, 0.5, torch.Generator().manual_seed(0))
    assert traj.shape == step.shape == (4 * math.ceil(0.5 * 4),)
    assert not (step == 1).any()
    for n in range(4):
        s = step[traj == n]
        assert len(s) == 2 and len(set(s.tolist())) == 2
    again = training_pairs(4, trainable, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(traj, again[0]) and torch.equal(step, again[1])
    traj, step = training_pairs(3, trainable, 1.0, torch.Generator().manual_seed(1))
    assert sorted(zip(traj.tolist(), step.tolist())) == [(n, t) for n in range(3) for t in (0, 2, 3, 4)]


def test_on_policy_first_step_has_ratio_one_and_exact_gradient(setup):
    backend, res = setup
    adv = torch.randn(6, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=1.0)
    before = backend.net.delta.detach().clone()
    settings = UpdateSettings(train_batch_size=1000, clip_range=0.2, max_grad_norm=None)
    stats = grpo_update(backend, res, adv, settings, opt, generator=torch.Generator().manual_seed(2))
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-12)
    # reference gradient: d/dθ of -mean_i(A_i * log p_θ(x_{t+1}|x_t)) over all (trajectory, step)
    backend.net.delta.data.copy_(before)
    backend.net.delta.grad = None
    n = torch.arange(6).repeat_interleave(5)
    t = torch.arange(5).repeat(6)
    cond = {k: v[res.prompt_index[n]] for k, v in res.cond.items()}
    out = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[n, t + 1])
    (-(adv[n] * out.log_prob).mean()).backward()
    expected = before - backend.net.delta.grad
    backend.net.delta.grad = None
    # redo the update from the same start to compare the SGD step
    backend.net.delta.data.copy_(before)
    grpo_update(backend, res, adv, settings, opt, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(backend.net.delta.detach(), expected, rtol=1e-5, atol=1e-6)


def test_zero_advantages_leave_the_policy_unchanged(setup):
    backend, res = setup
    opt = torch.optim.AdamW(backend.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    before = backend.net.delta.detach().clone()
    stats = grpo_update(backend, res, torch.zeros(6), UpdateSettings(inner_epochs=2, train_batch_size=4),
                        opt, generator=torch.Generator().manual_seed(0))
    assert stats["loss"] == 0.0 and stats["grad_norm"] == 0.0
    assert torch.equal(backend.net.delta, before)


def test_kl_to_reference_is_zero_at_start_and_exact_after_a_change(setup):
    backend, res = setup
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.0)
    s = UpdateSettings(train_batch_size=1000, kl_beta=0.5)
    stats = grpo_update(backend, res, torch.zeros(6), s, opt, generator=torch.Generator().manual_seed(0))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-12)
    backend.net.delta.data.fill_(0.3)
    stats = grpo_update(backend, res, torch.zeros(6), s, opt, generator=torch.Generator().manual_seed(0))
    n = torch.arange(6).repeat_interleave(5)
    t = torch.arange(5).repeat(6)
    x = res.latents[n, t]
    diff = 0.1 * (x @ torch.full((2, 2), 0.3).T)  # mean - ref_mean = 0.1 * (x delta^T)
    expected = (diff.pow(2).mean(1) / (2 * backend.stds()[t] ** 2)).mean()
    assert stats["kl"] == pytest.approx(float(expected), rel=1e-5)
    assert stats["loss"] == pytest.approx(0.5 * float(expected), rel=1e-5)


def test_flow_grpo_kl_divides_by_the_backends_kl_std(setup):
    backend, res = setup
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.0)
    backend.net.delta.data.fill_(0.3)
    exact = grpo_update(backend, res, torch.zeros(6), UpdateSettings(train_batch_size=1000, kl_beta=1.0),
                        opt, generator=torch.Generator().manual_seed(0))["kl"]
    flow = grpo_update(backend, res, torch.zeros(6), UpdateSettings(train_batch_size=1000, kl_beta=1.0,
                       kl_type="flow_grpo"), opt, generator=torch.Generator().manual_seed(0))["kl"]
    assert flow == pytest.approx(exact / 4, rel=1e-5)


def test_optimizer_steps_follow_minibatches_per_step(setup):
    backend, res = setup
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.0)
    calls = []
    # 6 trajectories x 5 steps = 30 pairs; batches of 4 -> 8 minibatches; 3 per step -> 3 steps; x2 epochs
    grpo_update(backend, res, torch.ones(6), UpdateSettings(inner_epochs=2, train_batch_size=4,
                minibatches_per_step=3), opt, generator=torch.Generator().manual_seed(0),
                after_step=lambda: calls.append(1))
    assert len(calls) == 6


@pytest.mark.parametrize("kwargs", [dict(inner_epochs=0), dict(timestep_fraction=0.0),
                                    dict(timestep_fraction=1.5), dict(kl_type="js"),
                                    dict(train_batch_size=0), dict(clip_range=0.0)])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        UpdateSettings(**kwargs)


def test_a_strategy_clip_replaces_torchs_and_reports_its_norm(setup):
    """The module passes a strategy-aware clip (FSDP's root clip_grad_norm_): it is called once per
    optimizer step with the parameters and max norm, and its pre-clip norm is what is logged."""
    backend, res = setup
    calls = []

    def clip(params, max_norm):
        calls.append((len(params), max_norm))
        return torch.tensor(7.0)

    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.1)
    settings = UpdateSettings(train_batch_size=10, minibatches_per_step=1, max_grad_norm=0.5)
    stats = grpo_update(backend, res, torch.randn(6), settings, opt, clip_grad_norm=clip)
    assert calls == [(len(backend.trainable_parameters()), 0.5)] * 3  # 30 pairs / 10 a step
    assert stats["grad_norm"] == 7.0


def test_a_later_minibatch_sees_the_stepped_weights_under_autocast():
    """bf16 autocast caches each fp32 LoRA weight's bf16 copy for its whole region (Lightning wraps
    the training step in it): after the update's optimizer steps inside the region, a forward in
    that region must compute with the new weights, as one in a fresh region does (a stale copy
    would give what the weights of before the update give)."""
    from pro_grpo_lightning.backends.base import LoraSettings
    from pro_grpo_lightning.backends.flux import TinyFluxBackend

    backend = TinyFluxBackend(num_steps=3, resolution=32, max_sequence_length=8, lora=LoraSettings(rank=4, alpha=4))
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), ProGRPOSchedule(4, [0], [2]))
    res = rollout.run(["a cat"], torch.Generator().manual_seed(0))
    settings = UpdateSettings(train_batch_size=2, minibatches_per_step=1, clip_range=10.0, max_grad_norm=None)
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=5.0)
    x, x_next, st = res.latents[:, 0], res.latents[:, 1], torch.zeros(2, dtype=torch.long)
    cond = {k: v[res.prompt_index] for k, v in res.cond.items()}

    def log_prob():
        return backend.step(x, st, cond, next_latents=x_next).log_prob.detach()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = log_prob()  # casts (and caches) the adapter's weights as they are now
        stats = grpo_update(backend, res, torch.tensor([1.0, -1.0]), settings, opt,
                            generator=torch.Generator().manual_seed(1))
        inside = log_prob()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = log_prob()
    assert stats["steps"] == 2  # 2 trajectories x 2 trainable steps, 2 pairs per minibatch and per step
    assert not torch.equal(fresh, before)  # the update moved the policy
    assert torch.equal(inside, fresh)
