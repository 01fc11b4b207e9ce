#!/usr/bin/env python
"""Distil a tiny preview decoder (diffusers ``AutoencoderTiny``) for the shipped shapes model, on CPU.

    HF_HUB_OFFLINE=1 python scripts/train_tiny_preview_decoder.py \\
        --out pro_grpo_lightning/assets/tiny_shapes_sd3_preview_decoder     # 10 min on one CPU thread

Use it as ``model.backend.init_args.preview_decoder: pkg://pro_grpo_lightning/assets/
tiny_shapes_sd3_preview_decoder`` (the pruning previews; final images stay the VAE's).

What it learns from: the shapes model's own VAE (``pro_grpo_lightning/assets/tiny_shapes_sd3``),
as TAESD is distilled from SD's. Its latents are the diffusion-space latents the backend samples
(``(vae latent - shift_factor) * scaling_factor``), and the decoder is saved with
``scaling_factor`` 1 and ``shift_factor`` 0, as the public TAESD decoders read them (see
``PipelineBackend.decode_preview``). Two kinds of latents, half of each batch each:

1. the VAE encoder's latents (posterior mean) of ``--images`` images rendered from the 108 *train*
   prompts, and
2. x0 previews the model itself predicts along its sampler (``SD3Backend``, T = 10, guidance 1, the
   quickstart's settings) on train prompts: what the pruning previews decode, blurry early on.

Targets: the VAE decoder's images of the same latents (L1 + L2). The encoder is distilled at the
same time (MSE to the VAE's latents of the rendered images), so the folder is a whole
AutoencoderTiny, not a decoder with a random encoder. Deterministic for a given ``--seed`` and
``--threads``. Writes ``train_log.json`` (settings, seconds, held-out errors) next to the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pro_grpo_lightning.backends.sd3 import SD3Backend  # noqa: E402
from pro_grpo_lightning.rewards.shapes import ShapesReward  # noqa: E402
from pro_grpo_lightning.tasks.shapes import render_shapes, shapes_prompts  # noqa: E402

MODEL = "pkg://pro_grpo_lightning/assets/tiny_shapes_sd3"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", default="pro_grpo_lightning/assets/tiny_shapes_sd3_preview_decoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", type=int, default=16, help="width of every block (AutoencoderTiny needs one)")
    p.add_argument("--decoder-blocks", type=int, nargs="+", default=(2, 0),
                   help="AutoencoderTiny blocks per stage; one 2x up-sampling between stages (2 0: both "
                        "blocks at the latent resolution, 1.8x cheaper than 1 1 at the same proxy quality)")
    p.add_argument("--encoder-blocks", type=int, nargs="+", default=(1, 1))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--images", type=int, default=4096, help="rendered train images (their VAE latents) in the pool")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--preview-batches", type=int, default=6, help="sampled batches of 64 prompts for x0 previews")
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--eval-size", type=int, default=256)
    return p.parse_args(argv)


def load_model(args: argparse.Namespace) -> SD3Backend:
    backend = SD3Backend(pretrained=args.model, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                         resolution=32, max_sequence_length=12)
    backend.configure_model()
    return backend


def vae_latents(backend: SD3Backend, images: torch.Tensor) -> torch.Tensor:
    """Diffusion-space latents of images in [0, 1]: the VAE posterior mean, shifted and scaled."""
    cfg = backend.vae.config
    with torch.no_grad():
        mean = backend.vae.encode(images * 2 - 1).latent_dist.mean  # [B, 4, 16, 16]
    return (mean - cfg.shift_factor) * cfg.scaling_factor


def x0_previews(backend: SD3Backend, split: str, batches: int, seed: int) -> torch.Tensor:
    """Every step's x0 preview of ``batches`` x 64 sampled trajectories: [batches * 64 * T, 4, 16, 16]."""
    out = []
    for i in range(batches):
        prompts = shapes_prompts(split, 64, seed=seed + i)
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            cond = backend.encode_prompts(prompts)
            x = backend.initial_latents(len(prompts), gen)  # [64, 4, 16, 16]
            for t in range(backend.num_steps):
                step = backend.step(x, torch.full((len(prompts),), t, dtype=torch.long), cond, generator=gen)
                out.append(step.x0)
                x = step.next_latents
    return torch.cat(out)


def build(args: argparse.Namespace):
    from diffusers import AutoencoderTiny

    c = args.channels
    return AutoencoderTiny(
        latent_channels=4, encoder_block_out_channels=(c,) * len(args.encoder_blocks),
        decoder_block_out_channels=(c,) * len(args.decoder_blocks), num_encoder_blocks=tuple(args.encoder_blocks),
        num_decoder_blocks=tuple(args.decoder_blocks), upsampling_scaling_factor=2,
        scaling_factor=1.0, shift_factor=0.0)


def render(split: str, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    prompts = shapes_prompts(split, size, seed=seed)
    return render_shapes(prompts, 32, seed=seed), prompts  # [B, 3, 32, 32] in [0, 1]


def errors(tiny, backend: SD3Backend, z: torch.Tensor, prompts: list[str] | None) -> dict[str, float]:
    """Tiny vs VAE decode of the same latents: mean / max |pixel difference|, and (with prompts) the
    shapes reward of both images (mean |difference|, share of images scored the same)."""
    with torch.no_grad():
        ref = backend.decode(z)  # [B, 3, 32, 32] in [0, 1]
        ours = (tiny.decode(z).sample / 2 + 0.5).clamp(0, 1)
    out = {"mean_abs": (ours - ref).abs().mean().item(), "max_abs": (ours - ref).abs().max().item()}
    if prompts is not None:
        reward = ShapesReward()
        a, b = reward(ours, prompts), reward(ref, prompts)
        out["reward_abs_diff"] = (a - b).abs().mean().item()
        out["reward_same"] = (a == b).float().mean().item()
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    backend = load_model(args)
    previews = x0_previews(backend, "train", args.preview_batches, seed=args.seed * 1000)  # [N, 4, 16, 16]
    pool_images, _ = render("train", args.images, seed=args.seed * 1_000_003)  # [M, 3, 32, 32]
    pool_latents = torch.cat([vae_latents(backend, x) for x in pool_images.split(256)])  # [M, 4, 16, 16]
    with torch.no_grad():  # the VAE's images of both pools: the distillation targets
        preview_targets = torch.cat([backend.decode(p) for p in previews.split(256)])  # [N, 3, 32, 32]
        pool_targets = torch.cat([backend.decode(z) for z in pool_latents.split(256)])  # [M, 3, 32, 32]
    print(f"{previews.shape[0]} x0 previews, {pool_images.shape[0]} images: {time.perf_counter() - t0:.0f}s",
          flush=True)

    torch.manual_seed(args.seed)
    tiny = build(args)
    opt = torch.optim.AdamW(tiny.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    half = args.batch_size // 2
    t1 = time.perf_counter()
    for step in range(args.steps):
        cosine = torch.cos(torch.tensor(torch.pi * step / args.steps)).item()  # float32, as the shipped run
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + cosine)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = torch.randint(pool_images.shape[0], (half,), generator=gen)
        pick = torch.randint(previews.shape[0], (half,), generator=gen)
        images, z_img = pool_images[rows], pool_latents[rows]  # [half, 3, 32, 32], [half, 4, 16, 16]
        z = torch.cat([z_img, previews[pick]])  # [B, 4, 16, 16]
        target = torch.cat([pool_targets[rows], preview_targets[pick]])  # [B, 3, 32, 32]
        decoded = tiny.decode(z).sample / 2 + 0.5  # [B, 3, 32, 32]
        encoded = tiny.encode(images * 2 - 1).latents  # [half, 4, 16, 16]
        dec_loss = (decoded - target).abs().mean() + ((decoded - target) ** 2).mean()
        enc_loss = ((encoded - z_img) ** 2).mean()
        loss = dec_loss + 0.1 * enc_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} decoder {dec_loss.item():.4f} encoder {enc_loss.item():.4f} "
                  f"{time.perf_counter() - t1:.0f}s", flush=True)
    tiny.eval()

    # held-out: rendered images of the 36 held-out prompts, and x0 previews sampled on them
    images, prompts = render("heldout", args.eval_size, seed=12345)
    held = x0_previews(backend, "heldout", 1, seed=777)  # [64 * T, 4, 16, 16]
    T = backend.num_steps
    held_prompts = shapes_prompts("heldout", 64, seed=777)
    by_step = held.view(T, 64, *held.shape[1:])  # [T, 64, 4, 16, 16]
    log = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "parameters": {"decoder": sum(p.numel() for p in tiny.decoder.parameters()),
                       "encoder": sum(p.numel() for p in tiny.encoder.parameters()),
                       "vae_decoder": sum(p.numel() for p in backend.vae.decoder.parameters())},
        "seconds": round(time.perf_counter() - t0, 1),
        "heldout_vae_latents": errors(tiny, backend, vae_latents(backend, images), prompts),
        "heldout_x0_previews_by_step": [errors(tiny, backend, by_step[t], held_prompts) for t in range(T)],
    }
    with torch.no_grad():
        enc = tiny.encode(images * 2 - 1).latents
    log["heldout_encoder_mse"] = ((enc - vae_latents(backend, images)) ** 2).mean().item()
    print(json.dumps(log, indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    tiny.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "train_log.json"), "w") as fh:
        json.dump(log, fh, indent=1)
    return log


if __name__ == "__main__":
    main()
