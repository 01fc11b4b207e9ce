"""SD15Backend contract on the tiny code-built model (and its saved diffusers folder)."""

import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from pro_grpo_lightning.backends import LoraSettings, SD15Backend, TinySD15Backend
from pro_grpo_lightning.backends.sd15 import (SD15_SCHEDULER_CONFIG, build_tiny_sd15_components,
                                              save_tiny_sd15_pipeline)
from pro_grpo_lightning.steps.ddim import draw_noise

PROMPTS = ["a red cube", "a cat on a mat", "", "two dogs"]


def tiny(**kw) -> TinySD15Backend:
    backend = TinySD15Backend(**kw)
    backend.configure_model()
    return backend


def randomize_lora(backend, seed: int = 0, scale: float = 0.3) -> None:
    """Non-zero adapter weights (peft's init has B = 0, i.e. the adapter is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend():
    return tiny()


@pytest.fixture(scope="module")
def cond(backend):
    return backend.encode_prompts(PROMPTS)


def latents_at(backend, n=4, seed=0):
    return backend.initial_latents(n, torch.Generator().manual_seed(seed))


def test_shapes_dtypes_and_schedule(backend, cond):
    assert cond["prompt_embeds"].shape == (4, 77, 32)
    x = latents_at(backend)
    assert x.shape == (4, 4, 8, 8) and x.dtype == torch.float32
    assert backend.timesteps().tolist() == [751, 501, 251, 1]
    assert backend.trainable_steps().tolist() == [True] * 4
    out = backend.step(x, torch.tensor([0, 1, 2, 3]), cond, generator=torch.Generator().manual_seed(1))
    for name in ("next_latents", "mean", "x0", "model_output"):
        t = getattr(out, name)
        assert t.shape == x.shape and t.dtype == torch.float32 and torch.isfinite(t).all(), name
    for t in (out.log_prob, out.std):
        assert t.shape == (4,) and t.dtype == torch.float32 and torch.isfinite(t).all()
    assert (out.std > 0).all()
    assert backend.negative_embeds.shape == (1, 77, 32)
    assert "negative_embeds" not in backend.state_dict()  # a cache, not a weight


def test_matches_ddim_scheduler_for_every_step(backend, cond):
    sched = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(backend.num_steps)
    x = latents_at(backend)
    for i, t in enumerate(sched.timesteps):
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            out = backend.step(x, torch.full((4,), i), cond, generator=gen)
        z = draw_noise(x.shape, x.device, torch.Generator().manual_seed(10 + i))
        want = sched.step(out.model_output, t, x, eta=1.0, variance_noise=z)
        torch.testing.assert_close(out.next_latents, want.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.x0, want.pred_original_sample, rtol=1e-5, atol=1e-5)
        x = out.next_latents


def test_seeded_generation_is_deterministic_and_decodes(backend, cond):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        x = backend.initial_latents(4, gen)
        with torch.no_grad():
            for i in range(backend.num_steps):
                x = backend.step(x, torch.full((4,), i), cond, generator=gen).next_latents
        return x

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    images = backend.decode(a)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    chunked = TinySD15Backend(decode_chunk=3)
    chunked.configure_model()
    torch.testing.assert_close(chunked.decode(a), images, rtol=1e-5, atol=1e-6)


def test_rescoring_reproduces_stored_log_prob_exactly(backend, cond):
    x = latents_at(backend, seed=3)
    idx = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = backend.step(x, idx, cond, generator=torch.Generator().manual_seed(4))
    again = backend.step(x, idx, cond, next_latents=out.next_latents)  # with grad, as in training
    assert torch.equal(again.log_prob.detach(), out.log_prob)
    assert torch.equal(again.mean.detach(), out.mean)


def test_per_sample_steps_equal_separate_calls(backend, cond):
    x = latents_at(backend, seed=5)
    idx = torch.tensor([3, 1, 0, 2])
    nxt = latents_at(backend, seed=6)
    with torch.no_grad():
        batched = backend.step(x, idx, cond, next_latents=nxt)
        for r in range(4):
            rows = slice(r, r + 1)
            single = backend.step(x[rows], idx[rows], {k: v[rows] for k, v in cond.items()},
                                  next_latents=nxt[rows])
            torch.testing.assert_close(single.mean, batched.mean[rows], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(single.log_prob, batched.log_prob[rows], rtol=1e-5, atol=1e-5)
            assert single.std == batched.std[r]


def test_cfg_combination(backend, cond):
    x = latents_at(backend, seed=7)
    idx = torch.tensor([0, 1, 2, 3])
    unet = backend.denoiser()
    t = backend.timesteps()[idx]
    emb = cond["prompt_embeds"]
    with torch.no_grad():
        eps_c = unet(x, t, encoder_hidden_states=emb).sample
        eps_u = unet(x, t, encoder_hidden_states=backend.negative_embeds.expand(4, -1, -1)).sample
        guided = backend.step(x, idx, cond, next_latents=x).model_output
        no_cfg = tiny(guidance_scale=1.0).step(x, idx, cond, next_latents=x).model_output
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_cfg, eps_c, rtol=1e-5, atol=1e-6)
    # A negative prompt changes the unconditional branch.
    with torch.no_grad():
        neg = tiny(negative_prompt="blurry").step(x, idx, cond, next_latents=x).model_output
    assert not torch.allclose(neg, guided)


def test_reference_is_the_lora_free_unet():
    backend = tiny(guidance_scale=1.0)
    plain = build_tiny_sd15_components(seed=0)["unet"]  # same base weights, no adapter
    cond = backend.encode_prompts(PROMPTS)
    x = latents_at(backend, seed=8)
    idx = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        base = plain(x, backend.timesteps()[idx], encoder_hidden_states=cond["prompt_embeds"]).sample
        torch.testing.assert_close(backend.step(x, idx, cond, next_latents=x).model_output, base)  # B = 0
        randomize_lora(backend)
        policy = backend.step(x, idx, cond, next_latents=x).model_output
        with backend.reference():
            ref = backend.step(x, idx, cond, next_latents=x).model_output
        after = backend.step(x, idx, cond, next_latents=x).model_output
    torch.testing.assert_close(ref, base, rtol=1e-6, atol=1e-6)
    assert (policy - base).abs().max() > 1e-3
    assert torch.equal(after, policy)  # the adapter is back on


def test_trainable_parameters_are_the_lora_weights_and_get_gradients():
    backend = tiny()
    names = {n for n, p in backend.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    lora_names = {n for n, _ in backend.named_parameters() if "lora_" in n}
    assert names == lora_names
    assert len(backend.trainable_parameters()) == len(names)
    assert all(p.dtype == torch.float32 for p in backend.trainable_parameters())
    randomize_lora(backend, scale=0.05)
    cond = backend.encode_prompts(PROMPTS)
    x = latents_at(backend, seed=9)
    idx = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        stored = backend.step(x, idx, cond, generator=torch.Generator().manual_seed(0)).next_latents
    backend.step(x, idx, cond, next_latents=stored).log_prob.mean().backward()
    grads = [p.grad for p in backend.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_lora_state_dict_round_trip(cond):
    a, b = tiny(), tiny()
    randomize_lora(a, seed=1)
    state = a.lora_state_dict()
    assert set(state) == {n for n, p in a.denoiser().named_parameters() if p.requires_grad}
    b.load_lora_state_dict(state)
    x = latents_at(a, seed=10)
    idx = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(a.step(x, idx, cond, next_latents=x).mean, b.step(x, idx, cond, next_latents=x).mean)
    with pytest.raises(KeyError):
        b.load_lora_state_dict({"not.a.param": torch.zeros(1)})


def test_lora_settings_are_applied():
    backend = tiny(lora=LoraSettings(rank=2, alpha=4.0, target_modules=["to_q"]))
    names = [n for n, p in backend.named_parameters() if p.requires_grad]
    assert names and all(".to_q.lora_" in n for n in names)
    shapes = {p.shape for n, p in backend.named_parameters() if ".lora_A." in n}
    assert all(s[0] == 2 for s in shapes)


def test_bf16_weights_keep_step_math_in_float32(cond):
    backend = tiny(dtype="bfloat16")
    assert backend.denoiser().conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in backend.trainable_parameters())
    x = latents_at(backend, seed=11)
    with torch.no_grad():
        out = backend.step(x, torch.tensor([0, 1, 2, 3]), backend.encode_prompts(PROMPTS),
                           generator=torch.Generator().manual_seed(0))
    for t in (out.next_latents, out.log_prob, out.mean, out.std, out.x0, out.model_output):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert backend.decode(out.x0).dtype == torch.float32


def test_eta_zero_is_the_deterministic_ode(cond):
    backend = tiny(eta=0.0)
    assert backend.trainable_steps().tolist() == [False] * 4
    x = latents_at(backend, seed=12)
    with torch.no_grad():
        a = backend.step(x, torch.tensor([0, 1, 2, 3]), cond, generator=torch.Generator().manual_seed(0))
        b = backend.step(x, torch.tensor([0, 1, 2, 3]), cond, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.next_latents, b.next_latents) and torch.equal(a.next_latents, a.mean)
    assert torch.isfinite(a.next_latents).all() and torch.isfinite(a.x0).all()


def test_saved_folder_loads_through_the_real_path(tmp_path, cond):
    folder = save_tiny_sd15_pipeline(str(tmp_path / "tiny-sd15"), seed=0)
    loaded = SD15Backend(folder, num_steps=4, guidance_scale=3.0, resolution=64)
    loaded.configure_model()
    loaded.configure_model()  # idempotent
    built = tiny()
    torch.testing.assert_close(loaded.encode_prompts(PROMPTS)["prompt_embeds"], cond["prompt_embeds"])
    x = latents_at(built, seed=13)
    idx = torch.tensor([0, 3, 1, 2])
    with torch.no_grad():
        a = built.step(x, idx, cond, generator=torch.Generator().manual_seed(2))
        b = loaded.step(x, idx, cond, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(loaded.decode(a.x0), built.decode(a.x0))
    assert torch.equal(a.next_latents, b.next_latents) and torch.equal(a.log_prob, b.log_prob)

    # The dummy-tokenizer trap: a tokenizer far smaller than the text encoder's vocabulary.
    from transformers import CLIPTokenizer

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "tokenizer")
    vocab = {"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(broken / "tokenizer"))
    with pytest.raises(ValueError, match="tokenizer loaded from .*broken"):
        SD15Backend(str(broken), num_steps=4, resolution=64).configure_model()


def test_missing_weights_fail_in_init(monkeypatch):
    with pytest.raises(FileNotFoundError, match="/nonexistent/folder"):
        SD15Backend(pretrained="/nonexistent/folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="pro-grpo-tests/no-such-sd15.*HF_HUB_OFFLINE"):
        SD15Backend(pretrained="pro-grpo-tests/no-such-sd15")
    backend = TinySD15Backend()
    with pytest.raises(RuntimeError, match="configure_model"):
        backend.encode_prompts(["x"])
