"""The SDE window (stochastic, trained steps inside it; the sampler's deterministic ODE step outside)
and shared initial noise within a group, checked value by value on the tiny backends."""

import pytest
import torch

from pro_grpo_lightning.backends import TinySD3Backend
from pro_grpo_lightning.backends.base import select_rows
from pro_grpo_lightning.backends.flux import TinyFluxBackend
from pro_grpo_lightning.backends.sd15 import TinySD15Backend
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout, RolloutSettings
from pro_grpo_lightning.schedules import ProGRPOSchedule
from tests.fakes import AffineBackend, MeanPixel

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red cube", "two cats"]


def _steps(backend, x, t, cond, seed):
    idx = torch.full((x.shape[0],), t, dtype=torch.long)
    with torch.no_grad():
        return backend.step(x, idx, cond, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", [TinySD3Backend, TinyFluxBackend])
def test_flow_window_is_euler_outside_and_the_sde_inside(cls):
    windowed = cls(seed=0, num_steps=4, sde_window=[1, 3])
    full = cls(seed=0, num_steps=4)
    for b in (windowed, full):
        b.configure_model()
    cond = windowed.encode_prompts(PROMPTS)
    assert windowed.trainable_steps().tolist() == [False, True, True, False]
    assert full.trainable_steps().tolist() == [True, True, True, False]  # the last is never trained
    x = windowed.initial_latents(2, torch.Generator().manual_seed(0))
    sig = windowed.sigmas
    for t in range(4):
        out_w, out_f = _steps(windowed, x, t, cond, seed=t), _steps(full, x, t, cond, seed=t)
        torch.testing.assert_close(out_w.model_output, out_f.model_output)  # same network
        if t in (1, 2):  # inside: exactly the SDE step, same noise
            for name in ("next_latents", "log_prob", "mean", "std", "x0"):
                torch.testing.assert_close(getattr(out_w, name), getattr(out_f, name))
            assert (out_w.std > 0).all()
        else:  # outside: diffusers' Euler step x + (sigma_next - sigma) v, a point mass
            euler = x + (sig[t + 1] - sig[t]) * out_w.model_output
            torch.testing.assert_close(out_w.next_latents, euler)
            torch.testing.assert_close(out_w.mean, euler)
            assert torch.equal(out_w.std, torch.zeros(2)) and torch.equal(out_w.log_prob, torch.zeros(2))
            torch.testing.assert_close(out_w.x0, out_f.x0)
        x = out_w.next_latents
    # a batch mixing steps inside and outside the window: each row as if alone
    xs = torch.cat([x[:1], x[1:]])
    mixed = windowed.step(xs, torch.tensor([0, 1]), cond, next_latents=xs)
    alone0 = windowed.step(xs[:1], torch.tensor([0]), select_rows(cond, torch.tensor([0])), next_latents=xs[:1])
    alone1 = windowed.step(xs[1:], torch.tensor([1]), select_rows(cond, torch.tensor([1])), next_latents=xs[1:])
    torch.testing.assert_close(mixed.mean, torch.cat([alone0.mean, alone1.mean]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.std, torch.cat([alone0.std, alone1.std]))
    assert mixed.std[0] == 0 and mixed.std[1] > 0


def test_sd15_window_is_ddim_eta_zero_outside():
    windowed = TinySD15Backend(num_steps=4, eta=1.0, sde_window=[0, 2])
    sde, ode = TinySD15Backend(num_steps=4, eta=1.0), TinySD15Backend(num_steps=4, eta=0.0)
    for b in (windowed, sde, ode):
        b.configure_model()
    assert windowed.trainable_steps().tolist() == [True, True, False, False]
    cond = windowed.encode_prompts(PROMPTS)
    x = windowed.initial_latents(2, torch.Generator().manual_seed(0))
    for t in range(4):
        out_w = _steps(windowed, x, t, cond, seed=t)
        ref = _steps(sde if t < 2 else ode, x, t, cond, seed=t)
        for name in ("next_latents", "log_prob", "mean", "std", "x0"):
            torch.testing.assert_close(getattr(out_w, name), getattr(ref, name))
        x = out_w.next_latents


@pytest.mark.parametrize("window", [[2, 2], [0, 5], [-1, 2], [3], [1, 2, 3]])
def test_bad_windows_fail_before_any_weights_load(window):
    with pytest.raises(ValueError, match="sde_window"):
        TinySD3Backend(num_steps=4, sde_window=window)
    with pytest.raises(ValueError, match="sde_window"):
        TinySD15Backend(num_steps=4, sde_window=window)


def test_shared_initial_noise_one_start_per_group_and_rank_independent():
    sched = ProGRPOSchedule(4, [1], [2])
    prompts = ["a cat", "two dogs", "a red square", "one blue circle"]
    backend = AffineBackend(num_steps=4)
    backend.configure_model()
    rewards = RewardSet([MeanPixel()])

    def run(ps, shared, rank=0, world_size=1):
        return ExpandPruneRollout(backend, rewards, sched, RolloutSettings(shared_initial_noise=shared)).run(
            ps, torch.Generator().manual_seed(5), noise_generator=torch.Generator().manual_seed(3), rank=rank,
            world_size=world_size)

    res = run(prompts, True)
    starts = res.latents[:, 0].view(4, 2, -1)  # [P, K, 2]
    assert torch.equal(starts[:, 0], starts[:, 1])  # one start per group
    assert not torch.allclose(starts[0, 0], starts[1, 0])  # groups differ
    assert not torch.allclose(res.latents[0::2, -1], res.latents[1::2, -1])  # the SDE noise separates them
    indep = run(prompts, False)
    assert not torch.equal(indep.latents[0::2, 0], indep.latents[1::2, 0])
    # two ranks of 2 prompts start where one process of 4 does
    for rank in range(2):
        part = run(prompts[2 * rank:2 * rank + 2], True, rank, 2)
        torch.testing.assert_close(part.latents[:, 0], res.latents[4 * rank:4 * rank + 4, 0])


def test_cli_sets_the_window_and_shared_starts_and_refuses_a_bad_window():
    from pro_grpo_lightning.cli import main

    cfg = ["--config", "configs/quickstart.yaml", "--trainer.logger=false"]
    cli = main([*cfg, "--model.backend.init_args.sde_window=[0,5]", "--model.rollout.shared_initial_noise=true"],
               run=False, save_config=False)
    cli.model.configure_model()
    assert cli.model.backend.sde_window == (0, 5) and cli.model.rollout.shared_initial_noise
    assert cli.model.backend.trainable_steps().tolist() == [True] * 5 + [False] * 5
    with pytest.raises(ValueError, match="sde_window"):  # T = 10: raised while the config is parsed
        main([*cfg, "--model.backend.init_args.sde_window=[4,11]"], run=False, save_config=False)
