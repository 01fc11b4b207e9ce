"""The LightningModule: thin glue whose ``training_step`` reads like the algorithm.

    rollout (expand, prune at the checkpoints, finish the survivors)   -> rollout.py
    group-relative advantages over the survivors' true rewards          -> objectives.py
    inner epochs of PPO-clipped updates with an optional KL             -> update.py

Manual optimization: one ``training_step`` is one rollout and (inner_epochs x optimizer steps)
updates, so ``trainer.global_step`` counts optimizer steps and ``max_steps`` counts updates.
Checkpoints hold only what training changes: the LoRA weights, reward-normalisation statistics,
the optimizer/scheduler (Lightning) and the rollout counter; the rollout RNG is re-seeded from
(seed, rollout index) every rollout (``noise.py``), so resuming continues the run exactly.

Multi-GPU (DDP): each rank rolls out whole groups for its own prompts; the rollout noise is the
rank's slice of a global draw, so W ranks x P prompts sample what one process with W x P prompts
samples; gradients are averaged by the strategy in ``manual_backward``; reward statistics and
logged metrics are reduced across ranks (``distributed.py``).

Held-out evaluation (``validation_step`` / ``test_step``, the steps in ``evaluation.py``): every
(prompt, image) item of the datamodule's held-out set is sampled from the policy with its own
fixed noise, scored by the training rewards and ``eval_rewards``, logged as ``val/*`` / ``test/*``
and written as a table (CSV + markdown) under ``<log_dir>/eval/``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from .backends.base import DiffusionBackend
from .distributed import RankSyncedRewardSet, reduce_metrics
from .evaluation import (eval_columns, eval_scores, gather_items, item_rows, sample_items,
                         write_eval_table)
from .noise import LOCAL_STREAM, NOISE_STREAM, mix_seed, seeded_generator
from .objectives import group_advantages
from .rewards.base import Reward
from .rollout import ExpandPruneRollout, RolloutResult, proxy_reward_correlation
from .schedules import GroupSchedule
from .update import UpdateSettings, grpo_update

# With manual optimisation Lightning warns that a step-interval checkpoint holds the weights after
# the optimizer step: that is the state we mean to save (it matches the saved rollout counter).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

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
        seed: rollout RNG seed; rollout k draws its noise from (seed, k) (see ``noise.py``).
        audit_every_n_rollouts: every N rollouts keep the whole expanded group alive to measure
            how often the proxy picks what the true reward would (0: never; costs a full rollout).
        preview_scale: resize factor of x0 latents before the pruning previews' decode (< 1 is
            cheaper; watch ``pruning/audit_proxy_corr_full_*``).
        shared_initial_noise: all trajectories of a prompt's group start from one initial latent,
            so they differ only by the SDE step noise the gradient credits (``rollout.py``).
        sample_every_n_rollouts: log an image grid of ``sample_prompts`` every N rollouts (0: never).
        sample_prompts: the fixed prompts of that grid.
        sample_seed: the fixed seed of that grid (same noise every time: changes are the policy's).
        eval_rewards: extra rewards scored on held-out prompts only (validate / test), next to the
            training rewards; never trained on.
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
                 shared_initial_noise: bool = False,
                 sample_every_n_rollouts: int = 0, sample_prompts: list[str] | None = None,
                 sample_seed: int = 1234, eval_rewards: list[Reward] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backend", "rewards", "schedule", "optimizer", "lr_scheduler",
                                          "eval_rewards"])
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
        self.shared_initial_noise = shared_initial_noise
        self.backend = backend
        self.rewards = RankSyncedRewardSet(rewards, normalize=reward_normalize)
        self.eval_rewards = torch.nn.ModuleList(eval_rewards or [])
        self.eval_names = eval_columns(self.rewards, self.eval_rewards)  # refuses clashing names
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
        self.rollout: ExpandPruneRollout | None = None
        self._eval_rows: list[Tensor] = []  # per evaluation batch: [B, 2 + scores] on this rank
        self._eval_images: list[Tensor] = []

    # ---- setup ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load weights (idempotent): Lightning calls this before restoring a checkpoint."""
        self.backend.configure_model()
        self.rewards.configure_model()
        for reward in self.eval_rewards:
            reward.configure_model()
        if self.rollout is None:
            self.rollout = ExpandPruneRollout(self.backend, self.rewards, self.schedule,
                                              preview_scale=self.preview_scale,
                                              shared_initial_noise=self.shared_initial_noise)

    def configure_optimizers(self) -> Any:
        params = self.backend.trainable_parameters()
        if not params:
            raise RuntimeError("the backend has no trainable parameters: was configure_model() called?")
        opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.lr_scheduler_factory(opt)}

    def rollout_generators(self, rollout: int) -> tuple[torch.Generator, torch.Generator]:
        """(noise, local) generators of rollout ``rollout``, on the module's device.

        noise: same on every rank, draws the global batch's latents and step noise (each rank keeps
        its rows). local: per rank, for the update's shuffles and the "random" selection rule.
        Both are functions of (seed, rollout index) only: nothing to checkpoint, exact on resume.
        """
        noise = seeded_generator(self.device, self.seed, rollout, NOISE_STREAM)
        local = seeded_generator(self.device, self.seed, rollout, LOCAL_STREAM, self.global_rank)
        return noise, local

    # ---- the algorithm -------------------------------------------------------------------------
    def training_step(self, batch: Sequence[str], batch_idx: int) -> None:
        self.configure_model()
        prompts = list(batch)
        audit = self.audit_every_n_rollouts > 0 and self.rollouts_done % self.audit_every_n_rollouts == 0
        noise_gen, local_gen = self.rollout_generators(self.rollouts_done)
        # The noise is this rank's slice of a draw for the global batch (noise.py).
        result = self.rollout.run(prompts, local_gen, audit=audit, noise_generator=noise_gen,
                                  rank=self.global_rank, world_size=self.trainer.world_size)

        global_std = None
        if self.adv_std == "global" and self.trainer.world_size > 1:
            global_std = self.all_gather(result.rewards).float().std(unbiased=False)
        advantages = group_advantages(result.rewards, std_mode=self.adv_std, eps=self.adv_eps,
                                      clip=self.adv_clip, global_std=global_std)  # [P, K]

        opt = self.optimizers()
        sched = self.lr_schedulers()
        t0 = time.perf_counter()
        # manual_backward: under DDP the strategy all-reduces (averages) gradients in each backward;
        # each rank's loss is a mean over its equal-sized minibatches, so the average over ranks
        # is the single-process mean over the global batch.
        stats = grpo_update(self.backend, result, advantages.flatten(), self.settings, opt,
                            generator=local_gen, backward=self.manual_backward,
                            after_step=sched.step if sched is not None else None,
                            clip_grad_norm=self.clip_grad_norm)
        update_time = time.perf_counter() - t0
        self.rollouts_done += 1
        self._log_rollout(result, advantages, stats, update_time)
        if self.sample_every_n_rollouts and (self.rollouts_done - 1) % self.sample_every_n_rollouts == 0:
            self._log_images(result)

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """Clip the LoRA gradients to ``max_norm`` in place; return the pre-clip total norm.

        Under FSDP each rank holds a shard of every gradient, so only the wrapped root module's
        ``clip_grad_norm_`` computes the global norm (Lightning's FSDP precision plugin refuses
        ``clip_gradients`` for that reason). Untested here: Lightning runs FSDP on CUDA only.
        """
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            return strategy.model.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Ask for a stop on the last rollout: Lightning then runs the validation loop once more
        # (its "stop requested" rule), so held-out scores exist for the final weights too.
        trainer = self.trainer
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        last_epoch = (trainer.max_epochs is not None and trainer.max_epochs > 0
                      and trainer.current_epoch + 1 >= trainer.max_epochs
                      and batch_idx + 1 >= trainer.num_training_batches)
        if last_step or last_epoch:  # without held-out prompts the validation loop is empty: no cost
            trainer.should_stop = True

    # ---- sampling for inspection ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int | None = None) -> Tensor:
        """One image per prompt from the current policy with fixed noise: [B, 3, H, W] in [0, 1].

        Prompt i's noise is seeded (seed, i): the same image whatever else is in the batch.
        """
        self.configure_model()
        seed = self.sample_seed if seed is None else seed
        return sample_items(self.backend, list(prompts), [mix_seed(seed, i) for i in range(len(prompts))])

    # ---- logging -------------------------------------------------------------------------------
    def _log_rollout(self, r: RolloutResult, advantages: Tensor, stats: dict[str, float],
                     update_time: float) -> None:
        """Metrics of the whole global batch: means over ranks (equal sizes: global means), sums
        of counts, max/min of extremes, slowest rank's timings; one reduction per kind."""
        P, K = r.rewards.shape
        m: dict[str, Tensor | float] = {
            "reward/mean": r.rewards.mean(),
            "reward/group_std": r.rewards.std(1, unbiased=False).mean(),  # spread within groups
            "advantage/abs_mean": advantages.abs().mean(),
            "rollouts": float(self.rollouts_done),
        }
        counts = {"compute/nfe": float(r.nfe), "compute/nfe_plain_gmax": float(r.nfe_full),
                  "compute/previews": float(r.num_previews)}
        slowest = {"time/rollout_denoise_s": r.timings["denoise"], "time/rollout_preview_s": r.timings["preview"],
                   "time/rollout_final_s": r.timings["final"], "time/update_s": update_time,
                   "reward/max": r.rewards.max()}
        for name, v in r.components.items():
            m[f"reward/{name}"] = v.mean()
        first = next((c for c in r.checkpoints if c.scores is not None and c.step < r.num_steps), None)
        if first is not None:  # spread of the whole expanded group vs the survivors, on the first proxy
            prompt = torch.arange(P, device=first.scores.device).repeat_interleave(K)
            survivors = first.scores[prompt, first.survivors].view(P, K)
            m["group_std/expanded_proxy"] = first.scores.std(1, unbiased=False).mean()
            m["group_std/survivors_proxy"] = survivors.std(1, unbiased=False).mean()
        for i, c in enumerate(proxy_reward_correlation(r)):  # under DDP: the mean of the ranks' values
            m[f"pruning/proxy_true_corr_survivors_{i}"] = c
        for k, v in r.audit.items():
            m[f"pruning/audit_{k}"] = v
        for k, v in stats.items():
            m[f"train/{k}"] = v
        opt = self.optimizers()
        m["train/lr"] = opt.param_groups[0]["lr"]
        out = reduce_metrics(m, sums=counts, maxes=slowest, mins={"reward/min": r.rewards.min()},
                             device=self.device)
        out["compute/nfe_saved_frac"] = 1.0 - out["compute/nfe"] / out["compute/nfe_plain_gmax"]
        self.log_dict(out, on_step=True, on_epoch=False, batch_size=P)
        self.log("reward", out["reward/mean"], prog_bar=True, on_step=True, batch_size=P)

    def _log_images(self, r: RolloutResult) -> None:
        logger = self.logger
        if logger is None or self.global_rank != 0:  # only rank 0 writes; others need not sample
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
    def _adapter_names(self) -> set[str]:
        # Wrapper prefixes (FSDP units) never appear in a full state dict's keys: drop them here too.
        return {n.replace("_fsdp_wrapped_module.", "") for n, p in self.named_parameters() if p.requires_grad}

    def _kept_keys(self) -> set[str]:
        keys = self._adapter_names()
        keys |= {n for n, _ in self.rewards.named_buffers(prefix="rewards")}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._kept_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # No generator state: rollout k's RNG is re-seeded from (seed, k) (noise.py).
        checkpoint["pro_grpo"] = {"rollouts_done": self.rollouts_done, "seed": self.seed,
                                  "rng": "per-rollout (seed, rollout index)",
                                  "schedule": repr(self.schedule)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # LoRA parameters must exist to receive the weights
        lora = self._adapter_names()
        missing = sorted(lora - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} adapter weights of this model "
                           f"(e.g. {missing[0]}): was it trained with another backend or LoRA setting?")
        extra = checkpoint.get("pro_grpo", {})
        self.rollouts_done = int(extra.get("rollouts_done", 0))
        self._loaded_global_step = int(checkpoint.get("global_step", 0))

    # ---- held-out evaluation (evaluation.py) ------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: dict[str, Any]) -> None:
        self.configure_model()
        images = sample_items(self.backend, batch["prompts"], batch["seeds"])  # [B, 3, H, W]
        scores = eval_scores(self.rewards, self.eval_rewards, images, batch["prompts"])
        self._eval_rows.append(item_rows(batch, scores, self.device))  # [B, 2 + S]
        first = batch["image_index"] == 0  # one image per prompt for the grid
        self._eval_images.append(images[first.to(images.device)].cpu())

    def on_validation_epoch_start(self) -> None:
        self._eval_rows, self._eval_images = [], []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _finish_eval(self, stage: str) -> None:
        """Gather every rank's items, log the means, write the table (rank 0)."""
        names = self.eval_names
        rows = gather_items(self._eval_rows, len(names), self.device)  # [N, 2 + S], every rank
        images = self._eval_images
        self._eval_rows, self._eval_images = [], []
        dataloaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        dataset = getattr(dataloaders, "dataset", None)
        # A sanity check over the *whole* held-out set (``num_sanity_val_steps: -1``) is the
        # evaluation of the starting policy: log it, so curves start at the baseline. A partial
        # one (Lightning's default, 2 batches) is not a score of anything: dropped.
        starting_point = (self.trainer.sanity_checking and dataset is not None
                          and rows.shape[0] == len(dataset) > 0)
        if rows.shape[0] == 0 or (self.trainer.sanity_checking and not starting_point):
            return
        root = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: every rank
        means = rows[:, 2:].mean(0)  # [S]
        metrics = {f"{stage}/{n}": means[i] for i, n in enumerate(names)}
        if starting_point:  # Lightning discards self.log during the sanity check: to the loggers directly
            if self.global_rank == 0:
                for logger in self.loggers:
                    logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.trained_steps())
        else:
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=rows.shape[0])
        if self.global_rank != 0:
            return
        write_eval_table(stage, self.trained_steps(), rows, names, getattr(dataset, "prompts", None), root)
        logger = self.logger
        if images and isinstance(logger, TensorBoardLogger):
            shown = torch.cat(images)[:16]
            logger.experiment.add_image(f"{stage}/images", image_grid(shown, nrow=min(8, len(shown))),
                                        self.trained_steps())

    def trained_steps(self) -> int:
        """Optimizer steps behind the current weights (in validate/test: the checkpoint's)."""
        if self.trainer.state.fn == "fit":
            return self.trainer.global_step
        return getattr(self, "_loaded_global_step", self.trainer.global_step)
