"""TinySD3Backend and TinyFluxBackend against the DiffusionBackend contract, offline, on CPU."""

import os

import numpy as np
import pytest
import torch

from pro_grpo_lightning.backends import FluxBackend, LoraSettings, SD3Backend, TinyFluxBackend, TinySD3Backend
from pro_grpo_lightning.backends.flux import (image_position_ids, pack_latents, save_tiny_flux_pipeline,
                                              unpack_latents)
from pro_grpo_lightning.backends.sd3 import save_tiny_sd3_pipeline

PROMPTS = ["a red cube", "two cats"]
FAMILIES = {
    "sd3": (TinySD3Backend, SD3Backend, save_tiny_sd3_pipeline),
    "flux": (TinyFluxBackend, FluxBackend, save_tiny_flux_pipeline),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    tiny_cls, real_cls, save = FAMILIES[request.param]
    backend = tiny_cls(seed=0)
    backend.configure_model()
    backend.configure_model()  # idempotent
    cond = backend.encode_prompts(PROMPTS)
    return request.param, backend, cond, real_cls, save


def _rollout(backend, cond, seed):
    """Run every step for the batch; return the list of StepOutputs and the final latents."""
    g = torch.Generator().manual_seed(seed)
    x = backend.initial_latents(len(PROMPTS), generator=g)
    outs = []
    with torch.no_grad():
        for i in range(backend.num_steps):
            out = backend.step(x, torch.full((len(PROMPTS),), i), cond, generator=g)
            outs.append(out)
            x = out.next_latents
    return outs, x


def test_contract_shapes_dtypes_determinism(family):
    _, backend, cond, _, _ = family
    assert all(v.shape[0] == len(PROMPTS) for v in cond.values())
    outs, x = _rollout(backend, cond, seed=0)
    latent_shape = (len(PROMPTS), 16, 8, 8)
    for out in outs:
        for t in (out.next_latents, out.mean, out.x0, out.model_output):
            assert t.shape == latent_shape and t.dtype == torch.float32 and torch.isfinite(t).all()
        assert out.log_prob.shape == (2,) and out.std.shape == (2,)
        assert torch.isfinite(out.log_prob).all() and (out.std > 0).all()
    outs2, x2 = _rollout(backend, cond, seed=0)
    assert torch.equal(x, x2) and all(torch.equal(a.log_prob, b.log_prob) for a, b in zip(outs, outs2))
    _, x3 = _rollout(backend, cond, seed=1)
    assert not torch.allclose(x, x3)
    images = backend.decode(x)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    trainable = backend.trainable_steps()
    assert trainable.dtype == torch.bool and trainable.tolist() == [True] * (backend.num_steps - 1) + [False]
    assert backend.sigmas[0] == 1 and backend.sigmas[-1] == 0 and (backend.sigmas.diff() < 0).all()


def test_rescoring_and_per_sample_step_indices(family):
    _, backend, cond, _, _ = family
    g = torch.Generator().manual_seed(5)
    x = backend.initial_latents(2, generator=g)
    idx = torch.tensor([0, 2])
    with torch.no_grad():
        out = backend.step(x, idx, cond, generator=g)
        again = backend.step(x, idx, cond, next_latents=out.next_latents)
        assert torch.equal(again.log_prob, out.log_prob) and torch.equal(again.mean, out.mean)
        for b in range(2):  # each row alone, at its own step index, re-scoring the same transition
            rows = {k: v[b:b + 1] for k, v in cond.items()}
            one = backend.step(x[b:b + 1], idx[b:b + 1], rows, next_latents=out.next_latents[b:b + 1])
            torch.testing.assert_close(one.mean, out.mean[b:b + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(one.log_prob, out.log_prob[b:b + 1], rtol=1e-5, atol=1e-5)


def test_lora_reference_and_trainable_parameters(family):
    _, backend, cond, _, _ = family
    net = backend.denoiser()
    lora = {n for n, p in net.named_parameters() if "lora_" in n}
    assert lora and {n for n, p in net.named_parameters() if p.requires_grad} == lora
    lora_ids = {id(p) for n, p in net.named_parameters() if n in lora}
    assert {id(p) for p in backend.trainable_parameters()} == lora_ids
    assert not any(p.requires_grad for n, p in backend.named_parameters() if "lora_" not in n)
    x = backend.initial_latents(2, generator=torch.Generator().manual_seed(6))
    idx = torch.tensor([1, 1])
    state = backend.lora_state_dict()
    try:
        with torch.no_grad():
            base = backend.step(x, idx, cond, generator=torch.Generator().manual_seed(0))
            with backend.reference():
                ref = backend.step(x, idx, cond, next_latents=base.next_latents)
            torch.testing.assert_close(ref.mean, base.mean, rtol=0, atol=1e-6)  # B = 0 at init
            for n, p in net.named_parameters():
                if "lora_B" in n:
                    p.add_(0.1 * torch.randn_like(p))
            moved = backend.step(x, idx, cond, next_latents=base.next_latents)
            with backend.reference():
                ref2 = backend.step(x, idx, cond, next_latents=base.next_latents)
        assert not torch.allclose(moved.mean, base.mean, atol=1e-4)
        torch.testing.assert_close(ref2.mean, base.mean, rtol=0, atol=1e-6)
        # the policy's log-prob is differentiable w.r.t. the adapter only
        out = backend.step(x, idx, cond, next_latents=base.next_latents)
        out.log_prob.mean().backward()
        grads = [p.grad for p in backend.trainable_parameters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert any(gr.abs().sum() > 0 for gr in grads)
    finally:
        backend.load_lora_state_dict(state)
        for p in backend.trainable_parameters():
            p.grad = None


def test_saved_tiny_pipeline_loads_back_with_equal_outputs(family, tmp_path):
    name, backend, cond, real_cls, save = family
    save(str(tmp_path / name))
    extra = {"negative_prompt": ""} if name == "sd3" else {}
    loaded = real_cls(pretrained=str(tmp_path / name), num_steps=backend.num_steps,
                      guidance_scale=backend.guidance_scale, resolution=64, max_sequence_length=32, **extra)
    loaded.configure_model()
    torch.testing.assert_close(loaded.sigmas, backend.sigmas, rtol=0, atol=0)
    cond2 = loaded.encode_prompts(PROMPTS)
    for k in cond:
        torch.testing.assert_close(cond2[k], cond[k], rtol=0, atol=0)
    outs, x = _rollout(backend, cond, seed=3)
    outs2, x2 = _rollout(loaded, cond2, seed=3)
    torch.testing.assert_close(x2, x, rtol=0, atol=0)
    torch.testing.assert_close(outs2[0].log_prob, outs[0].log_prob, rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(x2), backend.decode(x), rtol=0, atol=0)


def test_dummy_tokenizer_is_refused(family, tmp_path):
    from transformers import CLIPTokenizer

    name, _, _, real_cls, save = family
    path = save(str(tmp_path / name))
    dummy = CLIPTokenizer(vocab={"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, merges=[])
    dummy.save_pretrained(os.path.join(path, "tokenizer"))
    backend = real_cls(pretrained=path, num_steps=2, resolution=64, max_sequence_length=32)
    with pytest.raises(ValueError, match="tokenizer"):
        backend.configure_model()


@pytest.mark.parametrize("cls", [SD3Backend, FluxBackend])
def test_missing_sources_fail_early_with_the_path(cls, tmp_path, monkeypatch):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        cls(pretrained=missing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        cls(pretrained="nobody/not-a-cached-model")


def test_sd3_cfg_and_drop_t5():
    sd3 = TinySD3Backend(guidance_scale=1.0, drop_t5=True, decode_chunk=1, offload_text_encoders=True)
    sd3.configure_model()
    assert not hasattr(sd3, "text_encoder_3")
    cond = sd3.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + 32, 64)
    assert torch.equal(cond["prompt_embeds"][:, 77:], torch.zeros(2, 32, 64))  # T5 tokens are zeros
    x = sd3.initial_latents(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v1 = sd3.step(x, torch.tensor([0, 1]), cond, generator=torch.Generator()).model_output
        sd3.guidance_scale = 3.0  # CFG on: v = v_neg + 3 (v_pos - v_neg), one call on [neg; pos]
        v3 = sd3.step(x, torch.tensor([0, 1]), cond, generator=torch.Generator()).model_output
        neg = sd3._negative_rows(2, sd3.device)
        sd3.guidance_scale = 1.0
        v_neg = sd3.step(x, torch.tensor([0, 1]), neg, generator=torch.Generator()).model_output
        torch.testing.assert_close(v3, v_neg + 3 * (v1 - v_neg), rtol=1e-4, atol=1e-5)
        chunked = sd3.decode(x)  # one latent per VAE call
        sd3.decode_chunk = None
        torch.testing.assert_close(chunked, sd3.decode(x), rtol=1e-5, atol=1e-5)
    assert chunked.shape == (2, 3, 64, 64)
    assert sd3.text_encoder.device.type == "cpu"


def test_sd3_sigma_table_is_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = TinySD3Backend(num_steps=6)
    sd3.configure_model()
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    torch.testing.assert_close(sd3.sigmas, ref.sigmas, rtol=0, atol=0)


def test_flux_packing_ids_sigmas_and_guidance():
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    x = torch.randn(2, 16, 8, 6)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), x, rtol=0, atol=0)
    torch.testing.assert_close(image_position_ids(8, 6, torch.device("cpu"), torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))

    dev = TinyFluxBackend(num_steps=5)
    dev.configure_model()
    assert dev.has_guidance_embedding
    ref = dev.scheduler.__class__.from_config(dev.scheduler.config)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    torch.testing.assert_close(dev.sigmas, ref.sigmas, rtol=0, atol=0)
    cond = dev.encode_prompts(PROMPTS)
    x = dev.initial_latents(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_a = dev.step(x, torch.tensor([0, 0]), cond, generator=torch.Generator()).model_output
        dev.guidance_scale = 7.0
        v_b = dev.step(x, torch.tensor([0, 0]), cond, generator=torch.Generator()).model_output
    assert not torch.allclose(v_a, v_b)  # the guidance embedding is wired in

    schnell = TinyFluxBackend(guidance_embeds=False, num_steps=2)
    schnell.configure_model()
    assert not schnell.has_guidance_embedding
    cond = schnell.encode_prompts(PROMPTS)
    with torch.no_grad():
        out = schnell.step(schnell.initial_latents(2), torch.tensor([0, 1]), cond)
    assert torch.isfinite(out.log_prob).all()


def test_constructor_validation():
    with pytest.raises(ValueError, match="sde_kind"):
        TinySD3Backend(sde_kind="euler")
    with pytest.raises(ValueError, match="noise_level"):
        TinyFluxBackend(sde_kind="cps", noise_level=2.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        TinySD3Backend(resolution=72)
    with pytest.raises(RuntimeError, match="configure_model"):
        TinySD3Backend().encode_prompts(["x"])
    with pytest.raises(ValueError, match="to_qq"):  # a LoRA target that names no layer
        TinyFluxBackend(lora=LoraSettings(target_modules=["to_qq"])).configure_model()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ode_rollout_matches_the_diffusers_pipeline(name):
    """noise_level 0: our encode -> per-sample steps -> decode equals diffusers' own pipeline."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from pro_grpo_lightning.backends.flux import build_tiny_flux_components
    from pro_grpo_lightning.backends.sd3 import build_tiny_sd3_components

    tiny_cls = FAMILIES[name][0]
    backend = tiny_cls(num_steps=3, noise_level=0.0, max_sequence_length=32)
    backend.configure_model()
    cond = backend.encode_prompts(PROMPTS)
    x = backend.initial_latents(2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        latents = x
        for i in range(backend.num_steps):
            latents = backend.step(latents, torch.full((2,), i), cond).next_latents
        ours = backend.decode(latents)
        if name == "sd3":
            pipe = StableDiffusion3Pipeline(**build_tiny_sd3_components())
            theirs = pipe(PROMPTS, negative_prompt="", num_inference_steps=3,
                          guidance_scale=backend.guidance_scale, height=64, width=64, latents=x,
                          max_sequence_length=32, output_type="pt").images
        else:
            pipe = FluxPipeline(**build_tiny_flux_components())
            theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=backend.guidance_scale, height=64,
                          width=64, latents=pack_latents(x), max_sequence_length=32, output_type="pt").images
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
