"""What TensorBoard opens on, and images a reader can read.

``layout(module)``: a custom-scalars layout (TensorBoard's "Custom Scalars" tab), written once at
the start of fit (``write_layout``) through the logger's own ``SummaryWriter.add_custom_scalars``.
Its categories, in order: the training reward and the held-out score, the spread within groups
(the whole expanded group's previews vs the kept ones), pruning and proxy quality, compute (wall
time per rollout phase; the constant denoiser-call saving is in the chart's title and in the
hyperparameters), the update's losses, and health counts. Charts name tags by regular expression,
so a run's own reward and checkpoint names appear without configuration.

``captioned_grid``: image tiles upscaled (nearest neighbour, every pixel stays a block) to at least
``MIN_TILE`` px, each with its caption (prompt, reward) drawn under it, so the same picture reads
the same in TensorBoard, W&B, MLflow and the PNG files of a CSV run.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: smallest side of an image tile in a logged grid (px)
MIN_TILE = 128


# ---- the custom-scalars layout -------------------------------------------------------------------
def single_reward_is_total(rewards: Any) -> bool:
    """Whether the weighted total *is* the one reward's score (one reward, weight 1, not
    normalised): then ``reward/<name>`` and ``val/<name>`` would repeat ``reward/mean`` / ``val/total``."""
    names, weights = list(getattr(rewards, "names", [])), list(getattr(rewards, "weights", []))
    return len(names) == 1 and float(weights[0]) == 1.0 and getattr(rewards, "normalize", "none") in (None, "none")


def compute_figures(module: Any) -> dict[str, float]:
    """The constant cost of a (non-audit) rollout of the global batch, from the schedule alone:
    denoiser calls (per sample; CFG's doubled batch counts once), what the expanded group would cost
    unpruned (P x G_max x T), the fraction saved, and previews decoded and scored. Audit rollouts
    (``rollout.audit_every_n_rollouts``) finish the whole group: they cost P x G_max x T."""
    schedule, T = module.schedule, module.backend.num_steps
    prompts = global_prompts_per_step(module)
    if prompts is None:
        return {}
    nfe = prompts * schedule.nfe_per_prompt(T)
    full = prompts * schedule.group_size * T
    sizes = schedule.group_sizes_per_step(T)
    previews = 0 if schedule.rule in ("none", "random") else prompts * sum(sizes[c] for c in schedule.checkpoints)
    return {"compute.nfe_per_rollout": float(nfe), "compute.nfe_plain_gmax": float(full),
            "compute.nfe_saved_frac": 1.0 - nfe / full, "compute.previews_per_rollout": float(previews)}


def global_prompts_per_step(module: Any) -> int | None:
    """Prompts of one rollout over all ranks (None without a ``PromptDataModule``-like datamodule)."""
    if module._trainer is None:
        return None
    data = getattr(module.trainer, "datamodule", None)
    per_rank = getattr(data, "prompts_per_step", None)
    return None if per_rank is None else int(per_rank) * module.trainer.world_size


def layout(module: Any) -> dict[str, dict[str, list]]:
    """``{category: {chart title: [kind, [tag regexes]]}}`` for ``SummaryWriter.add_custom_scalars``."""
    saved = compute_figures(module).get("compute.nfe_saved_frac")
    compute_title = "wall time per rollout phase (s)"
    if saved is not None:
        compute_title += f"; denoiser calls saved vs plain G_max: {saved:.0%} (constant, see HParams)"
    kl = module.settings.kl_beta > 0
    first = {
        "training reward of the kept trajectories: mean, min, max":
            ["Multiline", ["reward/mean", "reward/min", "reward/max"]],
        "held-out score, same noise each time (val/total = hp_metric)": ["Multiline", [r"val/.*", r"val_ema/.*"]],
    }
    if not single_reward_is_total(module.rewards):
        first["training reward components (raw)"] = ["Multiline", [r"reward/(?!mean$|min$|max$|group_std$).*"]]
    return {
        "1. reward and held-out score": first,
        "2. spread within groups": {
            "reward std within a group: whole expanded group (first checkpoint's previews) vs kept":
                ["Multiline", ["group_std/expanded_proxy", "group_std/survivors_proxy"]],
            "true-reward std within the kept groups": ["Multiline", ["reward/group_std"]],
            "mean |advantage|": ["Multiline", ["advantage/abs_mean"]],
        },
        "3. pruning and proxy quality": {
            "preview-to-final rank correlation of the kept trajectories, per checkpoint":
                ["Multiline", [r"pruning/proxy_true_corr_survivors_.*"]],
            "audit rollouts: proxy over the whole group, overlap with the true reward's choice":
                ["Multiline", [r"pruning/audit_.*"]],
        },
        "4. compute": {compute_title: ["Multiline", [r"time/.*"]]},
        "5. losses": {
            ("loss = policy loss + kl_beta x KL" if kl else "policy loss (PPO-clip; no KL term)"):
                ["Multiline", ["train/loss", "train/policy_loss", "train/kl"] if kl else ["train/policy_loss"]],
            "clipped fraction, approximate KL to the sampling policy":
                ["Multiline", ["train/clip_frac", "train/approx_kl"]],
            "the log-ratio the clip sees: mean, std, skew, clipped below / above":
                ["Multiline", [r"train/(raw_)?log_ratio_\w+", r"train/clip_frac_(low|high)"]],
            "per trained step: log-ratio mean and skew, clip fractions": ["Multiline", [r"train/\w+/step_\d+"]],
            "gradient norm (before clipping)": ["Multiline", ["train/grad_norm"]],
            "learning rate": ["Multiline", ["train/lr"]],
        },
        "6. health": {"non-finite rewards and previews, masked trajectories, skipped updates":
                      ["Multiline", [r"health/.*"]]},
    }


def write_layout(module: Any) -> None:
    """Rank 0, at the start of fit: the layout to every TensorBoard logger."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if module.global_rank != 0:
        return
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(layout(module))


# ---- captioned image grids -----------------------------------------------------------------------
def upscale(images: Tensor, min_tile: int = MIN_TILE) -> Tensor:
    """[B, 3, H, W] -> [B, 3, s*H, s*W], s the smallest integer making min(s*H, s*W) >= ``min_tile``;
    nearest neighbour, so each generated pixel stays one visible block."""
    s = max(1, math.ceil(min_tile / min(images.shape[-2:])))
    return images if s == 1 else F.interpolate(images.float(), scale_factor=s, mode="nearest")


def captioned_grid(images: Tensor, captions: Sequence[str], nrow: int, title: str | None = None,
                   min_tile: int = MIN_TILE) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> one [3, H', W'] picture: the tiles upscaled (``upscale``), ``nrow``
    to a row, each caption (wrapped to the tile's width) under its tile, an optional title above."""
    from PIL import Image, ImageDraw, ImageFont

    tiles = upscale(images.detach().float().clamp(0, 1).cpu(), min_tile)  # [B, 3, h, w]
    B, _, h, w = tiles.shape
    font = ImageFont.load_default(size=11)
    line_h = 13
    chars = max(8, w // 6)  # about 6 px per character at this size
    wrapped = ["\n".join(textwrap.wrap(c, chars) or [""]) for c in captions]
    band = 4 + line_h * max((t.count("\n") + 1 for t in wrapped), default=0)
    head = [] if title is None else textwrap.wrap(title, max(8, nrow * w // 6))
    top = 4 + line_h * len(head) if head else 0
    rows = math.ceil(B / nrow)
    sheet = Image.new("RGB", (nrow * w, top + rows * (h + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(head):
        draw.text((4, 2 + k * line_h), line, fill="black", font=font)
    pixels = (tiles * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, h, w, 3]
    for i in range(B):  # PIL paste per tile: logging only, at most a few dozen tiles
        x, y = (i % nrow) * w, top + (i // nrow) * (h + band)
        sheet.paste(Image.fromarray(pixels[i]), (x, y))
        draw.multiline_text((x + 3, y + h + 2), wrapped[i], fill="black", font=font, spacing=2)
    return torch.from_numpy(np.asarray(sheet).copy()).permute(2, 0, 1).float() / 255  # [3, H', W']
