#!/usr/bin/env python
"""Pretrain the tiny shapes text-to-image model (SD3 architecture) offline, on CPU.

    HF_HUB_OFFLINE=1 python scripts/train_tiny_shapes.py --out pro_grpo_lightning/assets/tiny_shapes_sd3

Two stages, both on images rendered on the fly by ``tasks.shapes`` from the 108 *train* prompts:

1. VAE: an ``AutoencoderKL`` (2x down-sampling, 4 latent channels: 32 px -> 4 x 16 x 16) trained
   on reconstruction (L1 + L2) plus a small KL; its ``shift_factor`` / ``scaling_factor`` are then
   set so the scaled latents have zero mean and unit variance, as SD3's VAE config does.
2. Denoiser: an ``SD3Transformer2DModel`` with two tiny CLIP text encoders and a tiny T5 (trained
   jointly), rectified-flow objective ``x_sigma = (1 - sigma) x0 + sigma noise``, target
   ``noise - x0`` (diffusers' SD3 convention), 10 % empty prompts for classifier-free guidance.
   The tokenizers are ``offline_tokenizers``' byte-level CLIP and character-level T5 with the
   task's words as single tokens.

Every ``--eval-every`` steps the model is saved with ``StableDiffusion3Pipeline.save_pretrained``,
loaded back through ``SD3Backend(pretrained=...)`` (the path a user's model takes) and sampled with
the backend's stochastic sampler on the 36 *held-out* prompts; training stops at the first
evaluation whose exact-match rate reaches ``--target-exact`` (deliberately: a model that gets
about half of them right leaves RL something to do). Deterministic for a given ``--seed`` and
``--threads``. Writes ``train_log.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pro_grpo_lightning.backends.sd3 import SD3Backend  # noqa: E402
from pro_grpo_lightning.offline_tokenizers import byte_level_clip_tokenizer, char_level_t5_tokenizer  # noqa: E402
from pro_grpo_lightning.rewards.shapes import ShapesReward  # noqa: E402
from pro_grpo_lightning.tasks.shapes import (COUNT_WORDS, POSITION_PHRASES, SHAPES, COLOURS,  # noqa: E402
                                             render_shapes, shapes_prompts)
from pro_grpo_lightning.tasks.shapes_eval import evaluate_shapes  # noqa: E402

#: Words that get one token each (every word of every shapes prompt, plus "a"/"an").
WORDS = sorted({*COUNT_WORDS.values(), "a", "an", *COLOURS, *SHAPES, *(s + "s" for s in SHAPES),
                *(w for phrase in POSITION_PHRASES.values() for w in phrase.split())})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="pro_grpo_lightning/assets/tiny_shapes_sd3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-5)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-channels", type=int, nargs="+", default=(8, 32),
                   help="block widths; the VAE down-samples 2x per block after the first")
    p.add_argument("--vae-cache", default=None, help="reuse the VAE saved there (trained and saved if absent)")
    p.add_argument("--steps", type=int, default=4000, help="most denoiser steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--shift", type=float, default=1.0, help="the scheduler's (and training's) sigma shift")
    p.add_argument("--text-len", type=int, default=12, help="CLIP and T5 tokens per prompt")
    p.add_argument("--cfg-drop", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt per evaluation")
    p.add_argument("--final-eval-samples", type=int, default=8)
    p.add_argument("--target-exact", type=float, default=0.5)
    p.add_argument("--num-steps", type=int, default=10, help="T of the evaluation sampler (the config's)")
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--noise-level", type=float, default=0.7)
    return p.parse_args(argv)


# ---- components ------------------------------------------------------------------------------
def build_vae(resolution: int, channels=(8, 32)):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         block_out_channels=tuple(channels), sample_size=resolution, scaling_factor=1.0,
                         shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_add_attention=False)


def build_text_and_denoiser(args: argparse.Namespace, latent_side: int) -> dict[str, object]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok = byte_level_clip_tokenizer(args.text_len, WORDS)
    t5_tok = char_level_t5_tokenizer(args.text_len, WORDS)
    clips = []
    for _ in range(2):
        cfg = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, projection_dim=32,
                             num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=args.text_len,
                             bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                             pad_token_id=clip_tok.pad_token_id, hidden_act="gelu")
        clips.append(CLIPTextModelWithProjection(cfg))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    inner = args.heads * args.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=args.patch_size, in_channels=4, out_channels=4,
        num_layers=args.layers, attention_head_dim=args.head_dim, num_attention_heads=args.heads,
        joint_attention_dim=64, caption_projection_dim=inner, pooled_projection_dim=64,
        pos_embed_max_size=latent_side // args.patch_size)
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=args.shift),
            "text_encoder": clips[0], "tokenizer": clip_tok,
            "text_encoder_2": clips[1], "tokenizer_2": byte_level_clip_tokenizer(args.text_len, WORDS),
            "text_encoder_3": t5, "tokenizer_3": t5_tok}


def encode(comps: dict[str, object], prompts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``SD3Backend._encode`` computes (checked against it at the first evaluation), with grad."""
    hidden, pooled = [], []
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok = comps[tok_name]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # [B, L]
        out = comps[enc_name](ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # [B, L, 32]
        pooled.append(out.text_embeds)  # [B, 32]
    clip = torch.cat(hidden, -1)  # [B, L, 64]
    ids = comps["tokenizer_3"](prompts, padding="max_length", max_length=text_len, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids  # [B, L3]
    t5 = comps["text_encoder_3"](ids)[0]  # [B, L3, 64]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], 1), torch.cat(pooled, -1)  # [B, L + L3, 64], [B, 64]


def batch_images(step: int, args: argparse.Namespace, stream: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """A fresh batch of train-split (image in [-1, 1], prompt) pairs, a pure function of its seed."""
    seed = args.seed * 1_000_003 + stream * 100_003 + step
    prompts = shapes_prompts("train", size, seed=seed)
    return render_shapes(prompts, args.resolution, seed=seed) * 2 - 1, prompts


# ---- stage 1: the VAE ------------------------------------------------------------------------
def train_vae(args: argparse.Namespace, log: dict) -> object:
    from diffusers import AutoencoderKL

    if args.vae_cache and os.path.isdir(args.vae_cache):
        log["vae"] = json.load(open(os.path.join(args.vae_cache, "vae_log.json")))
        print("vae from cache", log["vae"], flush=True)
        return AutoencoderKL.from_pretrained(args.vae_cache).eval()
    torch.manual_seed(args.seed)
    vae = build_vae(args.resolution, args.vae_channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    for step in range(args.vae_steps):
        lr = args.vae_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, _ = batch_images(step, args, stream=1, size=args.vae_batch_size)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            if step % 500 == 0 and step:
                vae.eval()
                with torch.no_grad():
                    xe, pe = batch_images(0, args, stream=2, size=128)
                    re = (vae.decode(vae.encode(xe).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
                    print("  reconstruction exact", ShapesReward().parts(re, pe)["exact"].mean().item(), flush=True)
                vae.train()
            print(f"vae {step:5d} rec {rec.item():.4f} kl {kl.item():.2f} {time.perf_counter() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():  # latent statistics -> shift and scale, as SD3's VAE config carries
        x, prompts = batch_images(0, args, stream=2, size=512)
        post = vae.encode(x).latent_dist
        shift, scale = post.mean.mean().item(), 1.0 / post.mean.std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        recon = (vae.decode(post.mean).sample / 2 + 0.5).clamp(0, 1)
        parts = ShapesReward().parts(recon, prompts)
    log["vae"] = {"steps": args.vae_steps, "seconds": round(time.perf_counter() - t0, 1),
                  "shift_factor": shift, "scaling_factor": scale,
                  "reconstruction_exact": parts["exact"].mean().item(),
                  "reconstruction_l1": ((recon - (x / 2 + 0.5)).abs().mean().item())}
    print("vae done", log["vae"], flush=True)
    if args.vae_cache:
        vae.save_pretrained(args.vae_cache)
        json.dump(log["vae"], open(os.path.join(args.vae_cache, "vae_log.json"), "w"))
    return vae


# ---- stage 2: the denoiser -------------------------------------------------------------------
def save_pipeline(comps: dict[str, object], vae, path: str) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(vae=vae, **comps)
    pipe.save_pretrained(path, safe_serialization=True)


def evaluate(path: str, args: argparse.Namespace, samples: int, seed: int) -> dict[str, float]:
    backend = SD3Backend(pretrained=path, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                         resolution=args.resolution, max_sequence_length=args.text_len,
                         noise_level=args.noise_level)
    backend.configure_model()
    return evaluate_shapes(backend, "heldout", samples_per_prompt=samples, seed=seed)


def check_encoding(path: str, comps: dict[str, object], args: argparse.Namespace) -> None:
    backend = SD3Backend(pretrained=path, num_steps=args.num_steps, guidance_scale=1.0,
                         resolution=args.resolution, max_sequence_length=args.text_len)
    backend.configure_model()
    prompts = shapes_prompts("heldout", 4, seed=0)
    cond = backend.encode_prompts(prompts)
    with torch.no_grad():
        embeds, pooled = encode(comps, prompts, args.text_len)
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)


def train_denoiser(args: argparse.Namespace, vae, log: dict) -> None:
    torch.manual_seed(args.seed + 2)
    latent_side = args.resolution // 2 ** (len(args.vae_channels) - 1)
    comps = build_text_and_denoiser(args, latent_side)
    nets = [comps[k] for k in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")]
    params = [p for n in nets for p in n.parameters()]
    log["params"] = {k: sum(p.numel() for p in comps[k].parameters())
                     for k in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
    log["params"]["vae"] = sum(p.numel() for p in vae.parameters())
    print("parameters", log["params"], flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 3)
    vae.requires_grad_(False)
    cfg = vae.config
    log["evals"] = []
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="tiny_shapes_")
    reached = False
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / args.warmup)
        for n in nets:
            n.train()
        x, prompts = batch_images(step, args, stream=3, size=args.batch_size)
        with torch.no_grad():
            x0 = (vae.encode(x).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor  # [B, 4, h, w]
        drop = torch.rand(len(prompts), generator=gen) < args.cfg_drop
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        # sigma: logit-normal(0, 1), shifted as the scheduler shifts its sampling sigmas
        u = torch.sigmoid(torch.randn(len(prompts), generator=gen))
        sigma = args.shift * u / (1 + (args.shift - 1) * u)  # [B]
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        embeds, pooled = encode(comps, prompts, args.text_len)
        v = comps["transformer"](hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                 pooled_projections=pooled, return_dict=False)[0]
        loss = ((v - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            for n in nets:
                n.eval()
            path = os.path.join(tmp, f"step{step}")
            save_pipeline(comps, vae, path)
            if not log["evals"]:
                check_encoding(path, comps, args)
            t1 = time.perf_counter()
            res = evaluate(path, args, args.eval_samples, seed=10_000 + step)
            res.update(step=step, train_seconds=round(t1 - t0, 1), eval_seconds=round(time.perf_counter() - t1, 1))
            log["evals"].append(res)
            print("eval", json.dumps(res), flush=True)
            if res["exact"] >= args.target_exact:
                reached = True
            if reached or step == args.steps:
                if os.path.exists(args.out):
                    shutil.rmtree(args.out)
                shutil.copytree(path, args.out)
                log["stopped_at_step"] = step
                log["denoiser_seconds"] = round(time.perf_counter() - t0, 1)
                break
            shutil.rmtree(path)
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    log: dict = {"args": vars(args), "command": " ".join(["python", *sys.argv])}
    t0 = time.perf_counter()
    vae = train_vae(args, log)
    if args.steps == 0:  # the VAE only (with --vae-cache)
        return
    train_denoiser(args, vae, log)
    log["total_seconds"] = round(time.perf_counter() - t0, 1)
    final = evaluate(args.out, args, args.final_eval_samples, seed=0)
    log["final_eval"] = final
    print("final", json.dumps(final), flush=True)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
