"""The LightningModule: thin glue whose ``training_step`` reads like the algorithm.

    rollout (expand, prune at the checkpoints, finish the survivors)   -> rollout.py
    group-relative advantages over the survivors' true rewards          -> objectives.py
    inner epochs of PPO-clipped updates with an optional KL             -> update.py

Manual optimization: one ``training_step`` is one rollout and (inner_epochs x optimizer steps)
updates, so ``trainer.global_step`` counts optimizer steps and ``max_steps`` counts updates.
Checkpoints hold only what training changes: the LoRA weights, reward-normalisation statistics,
the optimizer/scheduler (Lightning) and the rollout RNG state, so resuming continues the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from .backends.base import DiffusionBackend
from .objectives import group_advantages
from .rewards.base import Reward
from .rewards.combine import RewardSet
from .rollout import ExpandPruneRollout, RolloutResult, proxy_reward_correlation
from .schedules import GroupSchedule
from .update import UpdateSettings, grpo_update

DEFAULT_SAMPLE_PROMPTS = ["a cat", "a red square", "a horse", "a blue triangle"]


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """[B, 3, H, W] -> one [3, rows*H, nrow*W] grid (B padded with black to a full grid)."""
    B, C, H, W = images.shape
    rows = math.ceil(B / nrow)
    pad = images.new_zeros(rows * nrow - B, C, H, W)
    x = torch.cat([images, pad]).view(rows, nrow, C, H, W)  # [rows, nrow, C, H, W]
    return x.permute(2, 0, 3, 1, 4).reshape(C, rows * H, nrow * W)


class ProGRPOModule(pl.LightningModule):
    """Pro-GRPO (and its baselines, by schedule) on a LoRA policy.

    Args:
        backend: the model family, by ``class_path`` (SD1.5, SD3, FLUX, or a tiny variant).
        rewards: one or more rewards; the total is their weighted sum.
        schedule: group sizes, pruning checkpoints and selection rule, by ``class_path``.
        optimizer: optimizer over the LoRA parameters (``class_path`` + ``init_args``).
        lr_scheduler: optional; stepped after every optimizer step.
        reward_normalize: "none", "batch" or "running" z-scoring of each reward before weighting.
        inner_epochs: passes over each rollout.
        timestep_fraction: share of trainable steps trained per trajectory and epoch.
        train_batch_size: (trajectory, step) pairs per forward/backward.
        minibatches_per_step: minibatches per optimizer step (None: one step per inner epoch).
        clip_range: PPO clip epsilon on the per-step ratio.
        kl_beta: KL-to-reference weight (0: no reference forward).
        kl_type: "exact" (Gaussian KL with the step std) or "output" (denoiser-output MSE).
        max_grad_norm: gradient clipping (0 disables).
        adv_clip: advantages clipped to [-adv_clip, adv_clip].
        adv_std: "group" (per prompt) or "global" (whole batch, across ranks) std for advantages.
        adv_eps: added to the std.
        seed: rollout RNG seed (offset by rank).
        audit_every_n_rollouts: every N rollouts keep the whole expanded group alive to measure
            how often the proxy picks what the true reward would (0: never; costs a full rollout).
        preview_scale: resize factor of x0 latents before the pruning previews' decode (< 1 is
            cheaper; watch ``pruning/proxy_true_corr_*``).
        sample_every_n_rollouts: log an image grid of ``sample_prompts`` every N rollouts (0: never).
        sample_prompts: the fixed prompts of that grid.
        sample_seed: the fixed seed of that grid (same noise every time: changes are the policy's).
    """

    def __init__(self, backend: DiffusionBackend, rewards: list[Reward], schedule: GroupSchedule,
                 optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 reward_normalize: str = "none",
                 inner_epochs: int = 1, timestep_fraction: float = 1.0, train_batch_size: int = 8,
                 minibatches_per_step: int | None = None, clip_range: float = 1e-4,
                 kl_beta: float = 0.0, kl_type: str = "exact", max_grad_norm: float = 1.0,
                 adv_clip: float = 5.0, adv_std: str = "group", adv_eps: float = 1e-4,
                 seed: int = 0, audit_every_n_rollouts: int = 0, preview_scale: float = 1.0,
                 sample_every_n_rollouts: int = 0, sample_prompts: list[str] | None = None,
                 sample_seed: int = 1234) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backend", "rewards", "schedule", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapter, not the frozen base weights
        if adv_std not in ("group", "global"):
            raise ValueError(f"adv_std must be 'group' or 'global', got {adv_std!r}")
        schedule.validate_steps(backend.num_steps)  # before any weights load
        if kl_type == "flow_grpo" and not hasattr(backend, "kl_std"):
            raise ValueError(f"kl_type='flow_grpo' needs a flow-matching backend; {type(backend).__name__} "
                             f"has no SDE coefficient: use kl_type 'exact' or 'output'")
        if not 0.0 < preview_scale <= 1.0:
            raise ValueError(f"preview_scale must be in (0, 1], got {preview_scale}")
        self.preview_scale = preview_scale
        self.backend = backend
        self.rewards = RewardSet(rewards, normalize=reward_normalize)
        self.schedule = schedule
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.settings = UpdateSettings(inner_epochs=inner_epochs, timestep_fraction=timestep_fraction,
                                       train_batch_size=train_batch_size,
                                       minibatches_per_step=minibatches_per_step, clip_range=clip_range,
                                       kl_beta=kl_beta, kl_type=kl_type, max_grad_norm=max_grad_norm)
        self.adv_clip, self.adv_std, self.adv_eps = adv_clip, adv_std, adv_eps
        self.seed = seed
        self.audit_every_n_rollouts = audit_every_n_rollouts
        self.sample_every_n_rollouts = sample_every_n_rollouts
        self.sample_prompts = list(sample_prompts or DEFAULT_SAMPLE_PROMPTS)
        self.sample_seed = sample_seed
        self.rollouts_done = 0
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self.rollout: ExpandPruneRollout | None = None

    # ---- setup ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load weights (idempotent): Lightning calls this before restoring a checkpoint."""
        self.backend.configure_model()
        self.rewards.configure_model()
        if self.rollout is None:
            self.rollout = ExpandPruneRollout(self.backend, self.rewards, self.schedule,
                                              preview_scale=self.preview_scale)

    def configure_optimizers(self) -> Any:
        params = self.backend.trainable_parameters()
        if not params:
            raise RuntimeError("the backend has no trainable parameters: was configure_model() called?")
        opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.lr_scheduler_factory(opt)}

    @property
    def generator(self) -> torch.Generator:
        """The rollout RNG, on the module's device, seeded per rank; restored from checkpoints."""
        if self._generator is None or self._generator.device != self.device:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.seed + 1_000_003 * self.global_rank)
            if self._generator_state is not None:
                gen.set_state(self._generator_state)
                self._generator_state = None
            self._generator = gen
        return self._generator

    # ---- the algorithm -------------------------------------------------------------------------
    def training_step(self, batch: Sequence[str], batch_idx: int) -> None:
        self.configure_model()
        prompts = list(batch)
        audit = self.audit_every_n_rollouts > 0 and self.rollouts_done % self.audit_every_n_rollouts == 0
        result = self.rollout.run(prompts, self.generator, audit=audit)

        global_std = None
        if self.adv_std == "global" and self.trainer.world_size > 1:
            global_std = self.all_gather(result.rewards).float().std(unbiased=False)
        advantages = group_advantages(result.rewards, std_mode=self.adv_std, eps=self.adv_eps,
                                      clip=self.adv_clip, global_std=global_std)  # [P, K]

        opt = self.optimizers()
        sched = self.lr_schedulers()
        t0 = time.perf_counter()
        stats = grpo_update(self.backend, result, advantages.flatten(), self.settings, opt,
                            generator=self.generator, backward=self.manual_backward,
                            after_step=sched.step if sched is not None else None)
        update_time = time.perf_counter() - t0
        self.rollouts_done += 1
        self._log_rollout(result, advantages, stats, update_time)
        if self.sample_every_n_rollouts and (self.rollouts_done - 1) % self.sample_every_n_rollouts == 0:
            self._log_images(result)

    # ---- sampling for inspection ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int | None = None) -> Tensor:
        """One image per prompt from the current policy with a fixed seed: [B, 3, H, W] in [0, 1]."""
        self.configure_model()
        gen = torch.Generator(device=self.device).manual_seed(self.sample_seed if seed is None else seed)
        cond = self.backend.encode_prompts(list(prompts))
        x = self.backend.initial_latents(len(prompts), gen)
        for t in range(self.backend.num_steps):
            idx = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x = self.backend.step(x, idx, cond, generator=gen).next_latents
        return self.backend.decode(x)

    # ---- logging -------------------------------------------------------------------------------
    def _log_rollout(self, r: RolloutResult, advantages: Tensor, stats: dict[str, float],
                     update_time: float) -> None:
        P, K = r.rewards.shape
        m: dict[str, Tensor | float] = {
            "reward/mean": r.rewards.mean(),
            "reward/min": r.rewards.min(),
            "reward/max": r.rewards.max(),
            "reward/group_std": r.rewards.std(1, unbiased=False).mean(),  # spread within groups
            "advantage/abs_mean": advantages.abs().mean(),
            "compute/nfe": float(r.nfe),
            "compute/nfe_plain_gmax": float(r.nfe_full),
            "compute/nfe_saved_frac": 1.0 - r.nfe / r.nfe_full,
            "compute/previews": float(r.num_previews),
            "time/rollout_denoise_s": r.timings["denoise"],
            "time/rollout_preview_s": r.timings["preview"],
            "time/rollout_final_s": r.timings["final"],
            "time/update_s": update_time,
            "rollouts": float(self.rollouts_done),
        }
        for name, v in r.components.items():
            m[f"reward/{name}"] = v.mean()
        first = next((c for c in r.checkpoints if c.scores is not None and c.step < r.num_steps), None)
        if first is not None:  # spread of the whole expanded group vs the survivors, on the first proxy
            prompt = torch.arange(P, device=first.scores.device).repeat_interleave(K)
            survivors = first.scores[prompt, first.survivors].view(P, K)
            m["group_std/expanded_proxy"] = first.scores.std(1, unbiased=False).mean()
            m["group_std/survivors_proxy"] = survivors.std(1, unbiased=False).mean()
        for i, c in enumerate(proxy_reward_correlation(r)):
            m[f"pruning/proxy_true_corr_{i}"] = c
        for k, v in r.audit.items():
            m[f"pruning/audit_{k}"] = v
        for k, v in stats.items():
            m[f"train/{k}"] = v
        opt = self.optimizers()
        m["train/lr"] = opt.param_groups[0]["lr"]
        self.log_dict({k: (v.float() if isinstance(v, Tensor) else float(v)) for k, v in m.items()},
                      on_step=True, on_epoch=False, batch_size=P)
        self.log("reward", r.rewards.mean(), prog_bar=True, on_step=True, batch_size=P)

    def _log_images(self, r: RolloutResult) -> None:
        logger = self.logger
        if logger is None:
            return
        grid = image_grid(self.sample(self.sample_prompts).cpu(), nrow=len(self.sample_prompts))
        # what pruning kept: the first prompt's survivors, in their group order
        kept = image_grid(r.images[: r.group_size].cpu(), nrow=r.group_size)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("samples/fixed_prompts", grid, self.rollouts_done)
            logger.experiment.add_image(f"samples/survivors: {r.prompts[0]}", kept, self.rollouts_done)
        elif hasattr(logger, "log_image"):
            logger.log_image("samples/fixed_prompts", [grid], step=self.rollouts_done)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _kept_keys(self) -> set[str]:
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        keys |= {n for n, _ in self.rewards.named_buffers(prefix="rewards")}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._kept_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["pro_grpo"] = {"rollouts_done": self.rollouts_done,
                                  "generator": self.generator.get_state(),
                                  "schedule": repr(self.schedule)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # LoRA parameters must exist to receive the weights
        lora = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(lora - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} adapter weights of this model "
                           f"(e.g. {missing[0]}): was it trained with another backend or LoRA setting?")
        extra = checkpoint.get("pro_grpo", {})
        self.rollouts_done = int(extra.get("rollouts_done", 0))
        if "generator" in extra:
            self._generator_state = extra["generator"]
            self._generator = None
