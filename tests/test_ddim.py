"""ddim_step against diffusers' DDIMScheduler.step and hand-computed values."""

import pytest
import torch
from diffusers import DDIMScheduler

from pro_grpo_lightning.backends.sd15 import SD15_SCHEDULER_CONFIG
from pro_grpo_lightning.steps.ddim import ddim_std, ddim_step, ddim_tables

T = 10
SHAPE = (4, 8, 8)


def make_scheduler(**overrides) -> DDIMScheduler:
    sched = DDIMScheduler(**{**SD15_SCHEDULER_CONFIG, **overrides})
    sched.set_timesteps(T)
    return sched


def tables(sched: DDIMScheduler, eta: float) -> dict:
    return ddim_tables(sched.alphas_cumprod, sched.final_alpha_cumprod, sched.timesteps,
                       sched.config.num_train_timesteps, eta)


def batch_at_steps(seed: int = 0):
    """One row per step index, in a shuffled order: per-sample timesteps in one batch."""
    g = torch.Generator().manual_seed(seed)
    step_index = torch.randperm(T, generator=g)  # [T]
    latents = torch.randn(T, *SHAPE, generator=g)  # [T, 4, 8, 8]
    model_output = torch.randn(T, *SHAPE, generator=g)  # [T, 4, 8, 8]
    noise = torch.randn(T, *SHAPE, generator=g)  # [T, 4, 8, 8]
    return step_index, latents, model_output, noise


def reference_step(sched, step_index, latents, model_output, eta, noise=None):
    """diffusers, one row at a time (its step takes a scalar timestep)."""
    prev, x0 = [], []
    for r, i in enumerate(step_index.tolist()):
        out = sched.step(model_output[r:r + 1], sched.timesteps[i], latents[r:r + 1], eta=eta,
                         variance_noise=None if noise is None else noise[r:r + 1])
        prev.append(out.prev_sample)
        x0.append(out.pred_original_sample)
    return torch.cat(prev), torch.cat(x0)


def test_tables_follow_ddim_scheduler_rule():
    sched = make_scheduler()
    tab = tables(sched, eta=1.0)
    assert tab["timesteps"].tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ac = sched.alphas_cumprod
    assert torch.equal(tab["alpha_prod_t"], ac[tab["timesteps"]])
    assert torch.equal(tab["alpha_prod_prev"][:-1], ac[tab["timesteps"][1:]])
    assert tab["alpha_prod_prev"][-1] == ac[0]  # prev timestep -99 < 0: final_alpha_cumprod
    assert (tab["std"] > 0).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eta_zero_matches_diffusers(prediction_type):
    sched = make_scheduler(prediction_type=prediction_type)
    tab = tables(sched, eta=0.0)
    step_index, latents, model_output, _ = batch_at_steps()
    out = ddim_step(model_output, latents, tab["alpha_prod_t"][step_index], tab["alpha_prod_prev"][step_index],
                    eta=0.0, prediction_type=prediction_type)
    want_prev, want_x0 = reference_step(sched, step_index, latents, model_output, eta=0.0)
    torch.testing.assert_close(out.next_latents, want_prev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x0, want_x0, rtol=1e-5, atol=1e-5)
    # Deterministic update: std 0, next = mean, nothing NaN, log_prob a documented 0 placeholder.
    assert torch.equal(out.std, torch.zeros(T))
    assert torch.equal(out.next_latents, out.mean)
    for t in (out.next_latents, out.mean, out.x0, out.log_prob):
        assert torch.isfinite(t).all()
    assert torch.equal(out.log_prob, torch.zeros(T))


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_eta_positive_matches_diffusers_with_fixed_noise(eta):
    sched = make_scheduler()
    tab = tables(sched, eta=eta)
    step_index, latents, model_output, noise = batch_at_steps(seed=1)
    a_t, a_prev = tab["alpha_prod_t"][step_index], tab["alpha_prod_prev"][step_index]  # [T] each
    out = ddim_step(model_output, latents, a_t, a_prev, eta=eta, noise=noise)
    want_prev, want_x0 = reference_step(sched, step_index, latents, model_output, eta=eta, noise=noise)
    torch.testing.assert_close(out.next_latents, want_prev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x0, want_x0, rtol=1e-5, atol=1e-5)

    # std: DDIM eq. (16) by hand, in float64 from the scheduler's alphas_cumprod.
    ac = sched.alphas_cumprod.double()
    t = sched.timesteps[step_index]
    p = t - 1000 // T
    abar_t = ac[t]
    abar_prev = torch.where(p >= 0, ac[p.clamp(min=0)], ac[0].expand_as(abar_t))
    std = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()
    torch.testing.assert_close(out.std.double(), std, rtol=1e-5, atol=0)

    # log_prob: Normal(mean, std) density, mean over latent dims.
    normal = torch.distributions.Normal(out.mean, out.std.reshape(-1, 1, 1, 1))
    want_lp = normal.log_prob(out.next_latents).flatten(1).mean(1)  # [T]
    torch.testing.assert_close(out.log_prob, want_lp, rtol=1e-6, atol=1e-5)

    # Re-scoring the sampled transition reproduces it exactly.
    again = ddim_step(model_output, latents, a_t, a_prev, eta=eta, next_latents=out.next_latents)
    assert torch.equal(again.log_prob, out.log_prob)
    assert torch.equal(again.mean, out.mean)
    assert torch.equal(again.next_latents, out.next_latents)


def test_generator_sampling_is_seeded_and_float32():
    sched = make_scheduler()
    tab = tables(sched, eta=1.0)
    step_index, latents, model_output, _ = batch_at_steps(seed=2)
    args = (model_output.bfloat16(), latents, tab["alpha_prod_t"][step_index], tab["alpha_prod_prev"][step_index])
    a = ddim_step(*args, eta=1.0, generator=torch.Generator().manual_seed(7))
    b = ddim_step(*args, eta=1.0, generator=torch.Generator().manual_seed(7))
    c = ddim_step(*args, eta=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.next_latents, b.next_latents)
    assert not torch.equal(a.next_latents, c.next_latents)
    for t in (a.next_latents, a.log_prob, a.mean, a.std, a.x0):
        assert t.dtype == torch.float32
    # The generator draws standard normal noise: next = mean + std * z.
    z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.next_latents, a.mean + a.std.reshape(-1, 1, 1, 1) * z)


def test_log_prob_gradient_flows_through_mean_only():
    sched = make_scheduler()
    tab = tables(sched, eta=1.0)
    step_index, latents, model_output, noise = batch_at_steps(seed=3)
    eps = model_output.clone().requires_grad_(True)
    out = ddim_step(eps, latents, tab["alpha_prod_t"][step_index], tab["alpha_prod_prev"][step_index],
                    eta=1.0, noise=noise)
    (grad,) = torch.autograd.grad(out.log_prob.sum(), eps)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # d/d eps of mean over dims of -(x - mu)^2 / (2 s^2), with d mu/d eps = c per sample:
    # grad = (x - mu) / s^2 * c / numel, c = sqrt(1 - abar_prev - s^2) - sqrt(abar_prev (1 - abar_t) / abar_t).
    a_t, a_prev = tab["alpha_prod_t"][step_index], tab["alpha_prod_prev"][step_index]
    s = out.std
    c = (1 - a_prev - s**2).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()  # [T]
    want = (noise / s.reshape(-1, 1, 1, 1)) * c.reshape(-1, 1, 1, 1) / noise[0].numel()
    torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-6)


def test_zero_std_row_in_a_mixed_batch_has_finite_gradient():
    # set_alpha_to_one: the last step has abar_prev = 1, so std = 0 even with eta = 1.
    sched = make_scheduler(set_alpha_to_one=True)
    tab = tables(sched, eta=1.0)
    assert tab["std"][-1] == 0 and (tab["std"][:-1] > 0).all()
    step_index, latents, model_output, noise = batch_at_steps(seed=4)
    eps = model_output.clone().requires_grad_(True)
    out = ddim_step(eps, latents, tab["alpha_prod_t"][step_index], tab["alpha_prod_prev"][step_index],
                    eta=1.0, noise=noise)
    last = step_index == T - 1
    assert out.log_prob[last].item() == 0.0 and torch.isfinite(out.log_prob).all()
    (grad,) = torch.autograd.grad(out.log_prob.sum(), eps)
    assert torch.isfinite(grad).all()
    assert grad[last].abs().sum() == 0
    want_prev, _ = reference_step(sched, step_index, latents, model_output, eta=1.0, noise=noise)
    torch.testing.assert_close(out.next_latents, want_prev, rtol=1e-5, atol=1e-5)


def test_std_helper_and_argument_checks():
    a_t, a_prev = torch.tensor([0.1, 0.5]), torch.tensor([0.2, 1.0])
    want = torch.tensor([((0.8 / 0.9) * (1 - 0.5)) ** 0.5, 0.0])
    torch.testing.assert_close(ddim_std(a_t, a_prev, 1.0), want)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="not both"):
        ddim_step(x, x, a_t, a_prev, eta=1.0, noise=x, next_latents=x)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step(x, x, a_t, a_prev, eta=1.0, prediction_type="flow")
