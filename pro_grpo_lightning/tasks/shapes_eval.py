"""Score a backend on the shapes task: sample held-out prompts with fixed noise, check exactly.

Used by ``scripts/train_tiny_shapes.py`` (when to stop pretraining, the asset's README numbers),
``scripts/eval_shapes.py``, tests and benchmarks (how much a fine-tuned policy improved on
held-out prompts). It samples through ``evaluation.sample_items``, the path validation uses, so
its numbers and a run's ``val/*`` scores mean the same thing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.base import DiffusionBackend
from ..evaluation import EvalItems, collate_items, sample_items
from ..rewards.shapes import ShapesReward
from .shapes import shapes_prompts


@torch.no_grad()
def evaluate_shapes(backend: DiffusionBackend, split: str = "heldout", samples_per_prompt: int = 4,
                    seed: int = 0, batch_size: int = 72, reward: ShapesReward | None = None,
                    max_prompts: int | None = None) -> dict[str, float]:
    """Mean reward parts of ``samples_per_prompt`` samples of every prompt of ``split`` (of its
    first ``max_prompts`` only, when given: quick checks).

    Returns {"reward", "exact", "colour", "count", "shape", "position", "n"}. Sample j of prompt i
    is seeded ``mix_seed(seed, i, j)`` (``evaluation.EvalItems``), so the numbers are a pure
    function of (policy, split, samples, seed); ``batch_size`` (images per sampling batch) only
    sets the memory used.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend.configure_model()
    reward = reward or ShapesReward()
    items = EvalItems(shapes_prompts(split, seed=None)[:max_prompts], samples_per_prompt, eval_seed=seed)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(items), batch_size):
        batch = collate_items([items[k] for k in range(start, min(start + batch_size, len(items)))])
        images = sample_items(backend, batch["prompts"], batch["seeds"])  # [b, 3, H, W]
        out = reward.parts(images, batch["prompts"])
        out["reward"] = reward(images, batch["prompts"])
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu())
    result = {k: torch.cat(v).mean().item() for k, v in parts.items()}
    result["n"] = len(items)
    return result
