"""A transparent backend for testing the rollout and the update without a diffusion model.

Latents are [B, 2]. The "denoiser" is out = W x + b + e_p (e_p a per-prompt embedding), the step
is Gaussian with mean 0.9 x + 0.1 out and a per-step std, so every stored transition can be
re-scored by hand and any misaligned row (wrong trajectory, step or prompt) shows up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pro_grpo_lightning.backends.base import Conditioning, DiffusionBackend
from pro_grpo_lightning.rewards.base import Reward
from pro_grpo_lightning.steps import StepOutput, gaussian_log_prob


class AdapterNet(nn.Module):
    """Base weights frozen, an additive trainable 'adapter' that can be switched off."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = nn.Linear(2, 2)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(2, 2, generator=g) * 0.5)
            self.base.bias.copy_(torch.randn(2, generator=g) * 0.1)
        self.base.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros(2, 2))
        self.enabled = True

    def disable_adapters(self) -> None:
        self.enabled = False

    def enable_adapters(self) -> None:
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        return out + x @ self.delta.T if self.enabled else out


class AffineBackend(DiffusionBackend):
    def __init__(self, num_steps: int = 5) -> None:
        super().__init__(num_steps=num_steps, guidance_scale=1.0, resolution=8)
        self.net: AdapterNet | None = None
        self.call_sizes: list[int] = []

    def configure_model(self) -> None:
        if self.net is None:
            self.net = AdapterNet()

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        codes = torch.tensor([[float(len(p)), float(sum(map(ord, p)) % 7)] for p in prompts])
        return {"emb": codes * 0.1}  # [P, 2]

    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(batch_size, 2, generator=generator)

    def stds(self) -> Tensor:
        return 0.2 + 0.1 * torch.arange(self.num_steps, dtype=torch.float32)  # [T]

    def kl_std(self, step_index: Tensor) -> Tensor:
        """What a Flow-GRPO-style KL divides by: here twice the step std, so that KL is exact / 4."""
        return 2 * self.stds()[step_index]

    def step(self, latents: Tensor, step_index: Tensor, cond: Conditioning, *,
             noise: Tensor | None = None, next_latents: Tensor | None = None,
             generator: torch.Generator | None = None) -> StepOutput:
        self.call_sizes.append(latents.shape[0])
        out = self.net(latents) + cond["emb"]  # [B, 2]
        mean = 0.9 * latents + 0.1 * out
        std = self.stds()[step_index]  # [B]
        if next_latents is None:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator)
            next_latents = mean + std[:, None] * noise
        return StepOutput(next_latents, gaussian_log_prob(next_latents, mean, std), mean, std,
                          latents + out, out)

    def decode(self, latents: Tensor) -> Tensor:
        v = torch.sigmoid(latents[:, :1])  # [B, 1]
        return v[:, :, None, None].expand(-1, 3, 2, 2).clone()  # [B, 3, 2, 2]

    def trainable_steps(self) -> Tensor:
        return torch.ones(self.num_steps, dtype=torch.bool)

    def denoiser(self) -> nn.Module:
        return self.net


class MeanPixel(Reward):
    default_name = "mean_pixel"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images.mean((1, 2, 3))


class FaultyBrightness(Reward):
    """Mean pixel brightness that returns NaN (or inf) on chosen calls and rows, for fault tests.

    The rollout scores in a fixed order (one call per pruning checkpoint, then the final images),
    so call ``c`` (counted from 0) is faulty when ``c % period`` is in ``calls`` and
    ``first_call <= c``; on a faulty call the rows ``i`` with ``i % every == 0`` (or the rows in
    ``rows``) get ``float(value)`` ("nan", "inf"). Calls made before training (evaluation) are not counted.
    """

    default_name = "faulty"

    def __init__(self, weight: float = 1.0, name: str | None = None, every: int = 3, period: int = 1,
                 calls: list[int] | None = None, first_call: int = 0, rows: list[int] | None = None,
                 value: str = "nan") -> None:
        super().__init__(weight, name)
        self.every, self.period, self.calls = every, period, list(calls if calls is not None else range(period))
        self.first_call, self.rows, self.value = first_call, rows, float(value)
        self.count = 0

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = images.float().mean((1, 2, 3))  # [B]
        c, self.count = self.count, self.count + 1
        if c >= self.first_call and c % self.period in self.calls:
            idx = torch.arange(out.shape[0])
            bad = (idx % self.every == 0) if self.rows is None else torch.isin(idx, torch.tensor(self.rows))
            out = out.masked_fill(bad.to(out.device), self.value)
        return out


class BrokenReward(Reward):
    """A reward with a bug, for the one-line error tests: ``mode`` "raise" (a ZeroDivisionError),
    "scalar" (one number for the batch), "list" (a Python list), "column" ([B, 1]) or
    "constant" (the same score for every image: nothing to learn from)."""

    default_name = "broken"

    def __init__(self, mode: str = "raise", weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.mode = mode

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor | list[float]:
        mean = images.float().mean((1, 2, 3))  # [B]
        if self.mode == "raise":
            return mean / 0 if mean.numel() < 0 else 1 // 0
        if self.mode == "scalar":
            return mean.mean()  # []
        if self.mode == "list":
            return mean.tolist()
        if self.mode == "column":
            return mean[:, None]  # [B, 1]
        return torch.full_like(mean, 0.5)  # "constant": [B]
