"""Rewards computed from the pixels alone: no weights, no prompt, cheap enough for tests and demos.

- ``JpegCompressibility``: DDPO's compressibility task (Black et al., "Training Diffusion Models with
  Reinforcement Learning", 2023): minus the JPEG file size in kB.
- ``Brightness``: mean ITU-R BT.601 luma, or closeness to a target luma.
- ``Colorfulness``: Hasler & Suesstrunk, "Measuring colourfulness in natural images", SPIE 2003.

All take images [B, 3, H, W] in [0, 1] and ignore the prompts.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import Reward

# ITU-R BT.601 luma weights (R, G, B), as in PIL's ``convert("L")``.
BT601_LUMA = (0.299, 0.587, 0.114)


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8 numpy, the whole batch in one tensor op."""
    # round-then-cast like DDPO's ``(images * 255).round().clamp(0, 255).to(torch.uint8)``
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [B, H, W, 3]


def jpeg_size_kb(image: np.ndarray, quality: int) -> float:
    """Size in kB (1000 bytes) of one [H, W, 3] uint8 image saved as JPEG by PIL at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegCompressibility(Reward):
    """-(JPEG size in kB) at ``quality``: smaller files (flatter, simpler images) score higher.

    Follows DDPO's ``jpeg_compressibility`` (kvablack/ddpo-pytorch, ``ddpo_pytorch/rewards.py``:
    uint8 round, PIL ``save(format="JPEG", quality=95)``, ``buffer.tell() / 1000``, negated).
    For DDPO's *incompressibility* task use ``weight: -1``.

    Args:
        quality: PIL JPEG quality (1-95 is PIL's useful range).
        num_workers: threads for the per-image encode (PIL releases the GIL while encoding);
            1 encodes serially.
        weight, name: see ``Reward``.
    """

    default_name = "jpeg_compressibility"

    def __init__(self, quality: int = 95, num_workers: int = 4, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        if not 1 <= quality <= 100:
            raise ValueError(f"JpegCompressibility.quality must be in [1, 100], got {quality}")
        if num_workers < 1:
            raise ValueError(f"JpegCompressibility.num_workers must be >= 1, got {num_workers}")
        self.quality = int(quality)
        self.num_workers = int(num_workers)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        pixels = to_uint8_hwc(images)  # [B, H, W, 3] uint8
        workers = min(self.num_workers, len(pixels))
        if workers <= 1:
            sizes = [jpeg_size_kb(p, self.quality) for p in pixels]
        else:
            # a pool per call: a few ms, and the module stays picklable/deep-copyable
            with ThreadPoolExecutor(max_workers=workers) as pool:
                sizes = list(pool.map(lambda p: jpeg_size_kb(p, self.quality), pixels))
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)  # [B]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quality={self.quality}"


class Brightness(Reward):
    """Mean BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` in [0, 1]; or ``-|luma - target|``.

    Args:
        target: when set, reward hitting this mean luma instead of maximising it.
        weight, name: see ``Reward``.
    """

    default_name = "brightness"

    def __init__(self, target: float | None = None, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        if target is not None and not 0.0 <= target <= 1.0:
            raise ValueError(f"Brightness.target must be in [0, 1] or None, got {target}")
        self.target = None if target is None else float(target)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        coeffs = images.new_tensor(BT601_LUMA, dtype=torch.float32)  # [3]
        luma = images.float().mean(dim=(2, 3)) @ coeffs  # [B]; mean is linear, so mean-then-weight
        if self.target is None:
            return luma
        return -(luma - self.target).abs()  # [B]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target}"


class Colorfulness(Reward):
    """Hasler & Suesstrunk (2003) colourfulness on [0, 1] images (their paper uses [0, 255]: x 255).

    ``rg = R - G``, ``yb = (R + G) / 2 - B`` per pixel;
    ``C = sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2)``, with population std over
    the pixels of each image. A grey image scores 0. Over-saturation is a known reward-hacking sign,
    so this is also useful logged with weight 0.
    """

    default_name = "colorfulness"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        x = images.float().flatten(2)  # [B, 3, H*W]
        r, g, b = x.unbind(1)  # each [B, H*W]
        rg = r - g  # [B, H*W]
        yb = 0.5 * (r + g) - b  # [B, H*W]
        spread = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()  # [B]
        offset = (rg.mean(1).square() + yb.mean(1).square()).sqrt()  # [B]
        return spread + 0.3 * offset  # [B]
