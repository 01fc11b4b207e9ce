"""Flow-GRPO's KL (divides by the SDE's g^2, no dt) vs the exact Gaussian KL of a flow step."""

import math

import pytest
import torch

from pro_grpo_lightning.backends import LoraSettings, TinyFluxBackend, TinySD3Backend
from pro_grpo_lightning.objectives import flow_grpo_kl, gaussian_kl
from pro_grpo_lightning.steps.flow import flow_grpo_kl_std, flow_sde_step

SIGMA = torch.tensor([1.0, 0.5, 0.2])
SIGMA_NEXT = torch.tensor([0.9, 0.3, 0.0])


def test_kl_std_is_flow_grpos_std_dev_t():
    a = 0.7
    # flow_grpo: a * sqrt(sigma / (1 - sigma)), with sigma_next in the denominator at sigma = 1
    expected = torch.tensor([a * math.sqrt(1.0 / 0.1), a * math.sqrt(0.5 / 0.5), a * math.sqrt(0.2 / 0.8)])
    torch.testing.assert_close(flow_grpo_kl_std(SIGMA, SIGMA_NEXT, a, "flow_grpo"), expected)
    torch.testing.assert_close(flow_grpo_kl_std(SIGMA, SIGMA_NEXT, 0.3, "dance"), torch.full((3,), 0.3))
    # cps: Flow-GRPO's std_dev_t is the transition std itself, sigma_next * sin(a pi / 2)
    torch.testing.assert_close(flow_grpo_kl_std(SIGMA, SIGMA_NEXT, a, "cps"), SIGMA_NEXT * math.sin(a * math.pi / 2))
    assert torch.equal(flow_grpo_kl_std(SIGMA, SIGMA_NEXT, a, "ode"), torch.zeros(3))
    with pytest.raises(ValueError, match="unknown flow step kind"):
        flow_grpo_kl_std(SIGMA, SIGMA_NEXT, a, "euler")


def test_flow_grpo_kl_by_hand():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    kl_std = torch.tensor([0.5, 1.0, 2.0])
    expected = torch.stack([((mean[i] - ref[i]) ** 2).mean() / (2 * kl_std[i] ** 2) for i in range(3)])
    torch.testing.assert_close(flow_grpo_kl(mean, ref, kl_std), expected)
    assert torch.equal(flow_grpo_kl(mean, mean, kl_std), torch.zeros(3))


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_flow_grpo_kl_is_the_exact_kl_times_the_sigma_step(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, 2, generator=g)
    v, v_ref = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    a = 0.7 if kind != "dance" else 0.5
    out = flow_sde_step(v, x, SIGMA, SIGMA_NEXT, noise_level=a, kind=kind, generator=g)
    ref = flow_sde_step(v_ref, x, SIGMA, SIGMA_NEXT, noise_level=a, kind=kind, next_latents=out.next_latents)
    # rows with a density: cps has std 0 on its last step (sigma_next = 0), never trained
    keep = out.std > 0
    assert keep.tolist() == ([True, True, False] if kind == "cps" else [True] * 3)
    exact = gaussian_kl(out.mean, ref.mean, out.std)[keep]
    fg = flow_grpo_kl(out.mean, ref.mean, flow_grpo_kl_std(SIGMA, SIGMA_NEXT, a, kind))[keep]
    assert (exact > 0).all() and torch.isfinite(exact).all() and torch.isfinite(fg).all()
    if kind == "cps":  # Flow-GRPO's cps KL divides by the step std: it is the exact KL
        torch.testing.assert_close(fg, exact)
    else:  # s = g sqrt(-dt), so KL_flow_grpo = KL_exact * (sigma - sigma_next)
        torch.testing.assert_close(fg, exact * (SIGMA - SIGMA_NEXT), rtol=1e-5, atol=0)


@pytest.mark.parametrize("cls", [TinySD3Backend, TinyFluxBackend], ids=["sd3", "flux"])
def test_backend_kl_std_and_the_kl_against_the_reference(cls):
    backend = cls(num_steps=4, resolution=32, seed=0, max_sequence_length=8, lora=LoraSettings(rank=2, alpha=2))
    backend.configure_model()
    idx = torch.tensor([0, 1, 2, 2])
    sig = backend.sigmas
    torch.testing.assert_close(backend.kl_std(idx),
                               flow_grpo_kl_std(sig[idx], sig[idx + 1], backend.noise_level, backend.sde_kind))
    cond = backend.encode_prompts(["a", "b", "c", "d"])
    x = backend.initial_latents(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in backend.denoiser().named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = backend.step(x, idx, cond, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), backend.reference():
        ref = backend.step(x, idx, cond, next_latents=out.next_latents)
    kl = flow_grpo_kl(out.mean, ref.mean, backend.kl_std(idx))  # [4]
    exact = gaussian_kl(out.mean, ref.mean, out.std)  # [4]
    assert (kl > 0).all()
    torch.testing.assert_close(kl, exact * (sig[idx] - sig[idx + 1]), rtol=1e-5, atol=0)
    kl.mean().backward()
    grads = [p.grad for p in backend.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
