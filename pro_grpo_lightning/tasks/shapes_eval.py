"""Score a backend on the shapes task: sample with its own stochastic sampler, check exactly.

Used by ``scripts/train_tiny_shapes.py`` (when to stop pretraining, the asset's README numbers)
and by tests and benchmarks (how much a fine-tuned policy improved on held-out prompts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends.base import DiffusionBackend
from ..rewards.shapes import ShapesReward
from .shapes import shapes_prompts


@torch.no_grad()
def sample_backend(backend: DiffusionBackend, prompts: Sequence[str], seed: int = 0) -> Tensor:
    """Images [B, 3, H, W] in [0, 1]: the backend's T stochastic steps (what a rollout samples)."""
    gen = torch.Generator(device=backend.device).manual_seed(seed)
    cond = backend.encode_prompts(list(prompts))
    x = backend.initial_latents(len(prompts), gen)  # [B, *latent]
    for t in range(backend.num_steps):
        step = torch.full((x.shape[0],), t, dtype=torch.long, device=backend.device)  # [B]
        x = backend.step(x, step, cond, generator=gen).next_latents
    return backend.decode(x)  # [B, 3, H, W]


@torch.no_grad()
def evaluate_shapes(backend: DiffusionBackend, split: str = "heldout", samples_per_prompt: int = 4,
                    seed: int = 0, batch_size: int = 72, reward: ShapesReward | None = None,
                    max_prompts: int | None = None) -> dict[str, float]:
    """Mean reward parts of ``samples_per_prompt`` samples of every prompt of ``split`` (of its
    first ``max_prompts`` only, when given: quick checks).

    Returns {"reward", "exact", "colour", "count", "shape", "position", "n"}. Batches are seeded
    ``seed + i``, so the numbers are a pure function of (policy, split, samples, seed, batch_size).
    """
    backend.configure_model()
    reward = reward or ShapesReward()
    prompts = [p for p in shapes_prompts(split, seed=None)[:max_prompts] for _ in range(samples_per_prompt)]
    parts: dict[str, list[Tensor]] = {}
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        images = sample_backend(backend, chunk, seed=seed + i)
        out = reward.parts(images, chunk)
        out["reward"] = reward(images, chunk)
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu())
    result = {k: torch.cat(v).mean().item() for k, v in parts.items()}
    result["n"] = len(prompts)
    return result
