"""Sampling noise that does not depend on how a batch is split across processes.

Why: a DDP run with W ranks of P prompts must sample exactly what one process with W * P prompts
samples, or "same global batch, same seed" means nothing and a 1-GPU debug run cannot reproduce a
cluster run. So the noise of a row must be a function of its *global* position, never of a rank:

    rollout k, every rank:  one generator seeded ``mix_seed(seed, k, NOISE_STREAM)`` (same on all
                            ranks), which draws the noise of the whole global batch,
                            [W * B_local, *latent] per draw, and each rank keeps its own rows
                            ``rank * B_local .. (rank + 1) * B_local - 1``.

``rollout.ExpandPruneRollout.run(..., noise_generator, rank, world_size)`` does the drawing and
slicing and hands each step its rows (``DiffusionBackend.step(..., noise=)``).

All ranks consume identical streams, so they stay in lockstep with each other and with a single
process that draws [B_global, *latent]; the rank's prompts are the rank's contiguous slice of the
global batch (``data.ResumableShuffleSampler``), so row r of the single process's batch gets the
same noise as the same row on its rank. Cost: each rank draws W times the noise it uses (a few
ms on a GPU for SD latents; see the README for large W). Re-seeding per rollout from (seed, k)
also makes a resumed run exact with no generator state in the checkpoint.

Rank-local randomness (the update's (trajectory, step) shuffles, the "random" selection rule) uses
a second generator, ``mix_seed(seed, k, LOCAL_STREAM, rank)``; it does not change the gradient
when every (trajectory, step) pair of an epoch goes into one optimizer step (the default).

Evaluation noise is per item: ``mix_seed(eval_seed, prompt_index, image_index)`` seeds the noise
of one image, so scores do not depend on batch size, rank count or the training RNG
(``evaluation.sample_items``).
"""

from __future__ import annotations

import torch

NOISE_STREAM = 0  # shared by all ranks: rollout latents and step noise
LOCAL_STREAM = 1  # per rank: update shuffles, random selection

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser folded over them): distinct tuples give
    unrelated seeds, unlike ``a * K + b`` where (0, K) and (1, 0) collide."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def seeded_generator(device: torch.device | str, *values: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(*values))
