"""Sampling noise that does not depend on how a batch is split across processes.

Why: a DDP run with W ranks of P prompts must sample exactly what one process with W * P prompts
samples, or "same global batch, same seed" means nothing and a 1-GPU debug run cannot reproduce a
cluster run. So the noise of a row must be a function of its *global* position, never of a rank:

    rollout k, every rank:  one generator seeded ``mix_seed(seed, k, NOISE_STREAM)`` (same on all
                            ranks), which draws the noise of the whole global batch,
                            [W * B_local, *latent] per draw, and each rank keeps its own rows
                            ``rank * B_local .. (rank + 1) * B_local - 1``.

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
of one image, so scores do not depend on batch size, rank count or the training RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends.base import Conditioning, DiffusionBackend
from .steps import StepOutput, gaussian_log_prob
from .steps.ddim import draw_noise

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


def step_with_noise(backend: DiffusionBackend, latents: Tensor, step_index: Tensor, cond: Conditioning,
                    noise: Tensor) -> StepOutput:
    """``backend.step`` with the standard-normal step noise given instead of drawn.

    Uses the ``StepOutput`` contract every step function follows (``steps.ddim``, ``steps.flow``):
    ``next_latents = mean + std * noise`` and ``log_prob = log N(next_latents; mean, std^2)``
    (mean over latent dims, 0 on zero-std rows). The backend re-scores a placeholder transition
    (its current latents), so no noise is drawn inside; the cost is one extra elementwise
    log-density.
    """
    out = backend.step(latents, step_index, cond, next_latents=latents)
    std_b = out.std.reshape(-1, *([1] * (out.mean.ndim - 1)))  # [B, 1, ...]
    next_latents = out.mean + std_b * noise.to(out.mean.device).float()  # [B, *latent]
    positive = out.std > 0  # [B]
    safe_std = torch.where(positive, out.std, torch.ones_like(out.std))  # [B]
    log_prob = gaussian_log_prob(next_latents.detach(), out.mean, safe_std)  # [B]
    log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob))  # [B]
    return StepOutput(next_latents=next_latents, log_prob=log_prob, mean=out.mean, std=out.std,
                      x0=out.x0, model_output=out.model_output)


class RankSlicedNoise:
    """A view of a backend for the rollout: its noise is this rank's rows of a global draw.

    Everything but ``initial_latents`` and sampling ``step`` is the backend's own (attribute
    access is forwarded). The rollout's ``generator`` argument is ignored for noise: ``generator``
    here (same seed on every rank) draws it. Re-scoring (``next_latents`` given) draws nothing.
    """

    def __init__(self, backend: DiffusionBackend, generator: torch.Generator | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.backend = backend
        self.set(generator, rank, world_size)

    def set(self, generator: torch.Generator | None, rank: int, world_size: int) -> None:
        """The generator of the next rollout and this process's place (set before every rollout)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.generator, self.rank, self.world_size = generator, rank, world_size

    def __getattr__(self, name: str):
        if name == "backend":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    def _gen(self, given: torch.Generator | None) -> torch.Generator | None:
        # Without a generator of its own (a caller driving the rollout directly) it is the backend.
        return self.generator if self.generator is not None else given

    def _mine(self, full: Tensor, rows: int) -> Tensor:
        return full[self.rank * rows:(self.rank + 1) * rows]  # [rows, *latent]

    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        full = self.backend.initial_latents(batch_size * self.world_size, self._gen(generator))  # [W*B, *latent]
        return self._mine(full, batch_size)

    def step(self, latents: Tensor, step_index: Tensor, cond: Conditioning, *,
             generator: torch.Generator | None = None, next_latents: Tensor | None = None) -> StepOutput:
        if next_latents is not None:
            return self.backend.step(latents, step_index, cond, next_latents=next_latents)
        B = latents.shape[0]
        full = draw_noise((B * self.world_size, *latents.shape[1:]), latents.device,
                          self._gen(generator))  # [W*B, *latent]
        return step_with_noise(self.backend, latents, step_index, cond, self._mine(full, B))


@torch.no_grad()
def sample_items(backend: DiffusionBackend, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
    """One image per (prompt, seed) from the current policy: [B, 3, H, W] in [0, 1].

    Item i's initial latent and step noise come from its own generator seeded ``seeds[i]``, so an
    image depends on its seed only, not on the batch it is drawn in. Not the training hot path:
    the per-item draws are B small ``randn`` calls per step next to one batched denoiser call.
    """
    device = backend.device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    cond = backend.encode_prompts(list(prompts))
    x = torch.cat([backend.initial_latents(1, g) for g in gens])  # [B, *latent]
    for t in range(backend.num_steps):
        noise = torch.cat([draw_noise((1, *x.shape[1:]), x.device, g) for g in gens])  # [B, *latent]
        idx = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)  # [B]
        x = step_with_noise(backend, x, idx, cond, noise).next_latents
    return backend.decode(x)  # [B, 3, H, W]
