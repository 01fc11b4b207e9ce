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
and written as a table (CSV + markdown) under ``<log_dir>/eval/``. ``predict_step`` samples the
same items for ``trainer.predict`` (PNGs, contact sheets, scores: ``predict.py``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from . import checkpointing, logs
from .backends.base import DiffusionBackend
from .data import PromptBatch
from .distributed import RankSyncedRewardSet
from .ema import ema_weights
from .errors import ConfigError
from .evaluation import (EVAL_TOTAL, eval_columns, eval_scores, gather_items, item_rows, sample_items,
                         write_eval_table)
from .health import (BadRolloutGuard, GuardSettings, NonFiniteError, check_finite_tensors, finite_groups, finite_std,
                     masked_group_advantages, nonfinite_counts, optimizer_tensors)
from .logs import image_grid  # noqa: F401  (re-exported: it lived here)
from .noise import LOCAL_STREAM, NOISE_STREAM, mix_seed, seeded_generator
from .objectives import AdvantageSettings, group_advantages
from .rewards.base import Reward
from .rollout import ExpandPruneRollout, RolloutSettings
from .schedules import GroupSchedule
from .update import UpdateSettings, grpo_update

# With manual optimisation Lightning warns that a step-interval checkpoint holds the weights after
# the optimizer step: that is the state we mean to save (it matches the saved rollout counter).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

DEFAULT_SAMPLE_PROMPTS = ["a cat", "a red square", "a horse", "a blue triangle"]


def _check_optimizer(optimizer: OptimizerCallable) -> str:
    """Build the optimizer on a dummy parameter (no weights needed): its class name, and a
    refusal of a learning rate that trains nothing."""
    probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    lr = probe.param_groups[0].get("lr")
    if lr is not None and not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ConfigError(f"model.optimizer.init_args.lr={float(lr)}: must be a finite number > 0 "
                          f"(a learning rate of 0 trains nothing)")
    return f"{type(probe).__module__}.{type(probe).__qualname__}"


def _check_trainable_steps(backend: DiffusionBackend) -> None:
    """At least one step can be trained, known from the settings alone (no weights): a flow
    backend never trains its last step (it ends on the data, std 0); a DDIM backend with eta 0
    samples no step stochastically."""
    from .backends.flow_base import FlowMatchingBackend

    steps = backend.window_steps()  # [T] bool
    if isinstance(backend, FlowMatchingBackend):
        steps[-1] = False
    elif float(getattr(backend, "eta", 1.0)) == 0.0:
        steps[:] = False
    if not bool(steps.any()):
        window = f", sde_window={list(backend.sde_window)}" if backend.sde_window is not None else ""
        raise ConfigError(f"model.backend: num_steps={backend.num_steps}{window} leaves no trainable step "
                          f"(the last step of a flow sampler and every step with eta=0 are deterministic)")


@dataclass
class SampleSettings:
    """The image grid logged during training; YAML ``model.samples``.

    every_n_rollouts: log a grid of ``prompts`` every N rollouts (0: never).
    prompts: the fixed prompts of that grid (None: a default four).
    seed: the grid's fixed seed (same noise every time: changes are the policy's).
    """

    every_n_rollouts: int = 0
    prompts: list[str] | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.every_n_rollouts < 0:
            raise ValueError(f"samples.every_n_rollouts must be >= 0, got {self.every_n_rollouts}")
        if self.prompts is not None and len(self.prompts) == 0:
            raise ValueError("samples.prompts must be None or non-empty, got []")


class ProGRPOModule(pl.LightningModule):
    """Pro-GRPO (and its baselines, by schedule) on a LoRA policy.

    Args:
        backend: the model family, by ``class_path`` (SD1.5, SD3, FLUX, or a tiny variant).
        rewards: one or more rewards; the total is their weighted sum.
        schedule: group sizes, pruning checkpoints and selection rule, by ``class_path``.
        optimizer: optimizer over the LoRA parameters (``class_path`` + ``init_args``).
        lr_scheduler: optional; stepped after every optimizer step.
        reward_normalize: "none", "batch" or "running" z-scoring of each reward before weighting
            (top level: it configures the ``rewards`` list, which cannot hold a group).
        update: inner epochs, minibatches, PPO clip, KL, gradient clip (``update.UpdateSettings``).
        advantages: clip, std mode, eps (``objectives.AdvantageSettings``).
        rollout: preview scale, shared starts, audit period, rows per denoiser call
            (``rollout.RolloutSettings``).
        samples: the logged image grid (``SampleSettings``).
        seed: rollout RNG seed; rollout k draws its noise from (seed, k) (see ``noise.py``). Top
            level: the rollout noise, the update's shuffles and the checkpoint all use it.
        eval_rewards: extra rewards scored on held-out prompts only (validate / test), next to the
            training rewards; never trained on.
        guards: bad-rollout patience and schedule-change permission (``health.GuardSettings``);
            this run's choice, not saved with the hyperparameters.
    """

    def __init__(self, backend: DiffusionBackend, rewards: list[Reward], schedule: GroupSchedule,
                 optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 reward_normalize: str = "none",
                 update: UpdateSettings = UpdateSettings(),
                 advantages: AdvantageSettings = AdvantageSettings(),
                 rollout: RolloutSettings = RolloutSettings(),
                 samples: SampleSettings = SampleSettings(),
                 seed: int = 0, eval_rewards: list[Reward] | None = None,
                 guards: GuardSettings = GuardSettings()) -> None:
        super().__init__()
        # Plain nested dicts (hparams.yaml: ``update: {clip_range: ...}``), read back by LightningCLI
        # on resume. ``guards`` is not saved: how this run treats faults is this run's choice.
        self.save_hyperparameters({"reward_normalize": reward_normalize, "update": asdict(update),
                                   "advantages": asdict(advantages), "rollout": asdict(rollout),
                                   "samples": asdict(samples), "seed": seed},
                                  logger=False)  # logs.log_run_hparams logs the run's flattened settings
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapter, not the frozen base weights
        self.optimizer_name = _check_optimizer(optimizer)
        _check_trainable_steps(backend)
        if update.kl_type == "flow_grpo" and not hasattr(backend, "kl_std"):
            raise ValueError(f"update.kl_type='flow_grpo' needs a flow-matching backend; {type(backend).__name__} "
                             f"has no SDE coefficient: use kl_type 'exact' or 'output'")
        self.backend = backend
        if hasattr(backend, "keep_reference"):  # full fine-tuning copies the base denoiser only for a KL
            backend.keep_reference = update.kl_beta > 0
        self.rewards = RankSyncedRewardSet(rewards, normalize=reward_normalize)
        self.eval_rewards = torch.nn.ModuleList(eval_rewards or [])
        self.eval_names = eval_columns(self.rewards, self.eval_rewards)  # refuses clashing names
        self.schedule = schedule
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.settings = update
        self.advantages = advantages
        self.rollout_settings = rollout
        self.samples = samples
        self.sample_prompts = list(samples.prompts or DEFAULT_SAMPLE_PROMPTS)
        self.seed = seed
        self.rollouts_done = 0
        # checks the schedule against the backend's steps here, before any weights load
        self.rollout = ExpandPruneRollout(backend, self.rewards, schedule, rollout)
        self.guards = guards
        self.guard = BadRolloutGuard(guards.max_bad_rollouts)
        self.run_config: str | None = None  # the resolved YAML of this run (set by the CLI), saved in checkpoints
        self._eval_rows: list[Tensor] = []  # per evaluation batch: [B, 2 + scores] on this rank
        self._eval_images: list[Tensor] = []

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Install the atomic, weights_only, finite-only checkpoint IO before Lightning opens or
        writes any checkpoint, and check every prompt set against the rewards
        (``Reward.validate_prompts``) before any weights load."""
        checkpointing.install(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "validate_prompts"):
            try:  # one line naming the data field, the reward and the prompt
                datamodule.validate_prompts([*self.rewards.rewards, *self.eval_rewards])
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def configure_model(self) -> None:
        """Load weights (idempotent): Lightning calls this before restoring a checkpoint."""
        self.backend.configure_model()
        self.rewards.configure_model()
        for reward in self.eval_rewards:
            reward.configure_model()

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
    def training_step(self, batch: PromptBatch | Sequence[str], batch_idx: int) -> None:
        self.configure_model()
        prompts, metadata = (batch.prompts, batch.metadata) if isinstance(batch, PromptBatch) else (list(batch), None)
        every = self.rollout_settings.audit_every_n_rollouts
        audit = every > 0 and self.rollouts_done % every == 0
        noise_gen, local_gen = self.rollout_generators(self.rollouts_done)
        # The noise is this rank's slice of a draw for the global batch (noise.py).
        result = self.rollout.run(prompts, local_gen, audit=audit, metadata=metadata,
                                  noise_generator=noise_gen,
                                  rank=self.global_rank, world_size=self.trainer.world_size,
                                  progress=logs.rollout_progress(self))

        # Non-finite guard (health.py): trajectories with a NaN/inf reward are masked, groups left
        # with < 2 finite rewards too; nothing non-finite reaches the optimizer.
        valid = finite_groups(result.rewards)  # [P, K]
        all_valid = bool(valid.all())
        global_std = None
        adv = self.advantages
        if adv.std == "global" and self.trainer.world_size > 1:
            every = self.all_gather(result.rewards).float()  # [W, P, K]
            global_std = every.std(unbiased=False) if bool(every.isfinite().all()) else finite_std(every)
        if all_valid:
            advantages = group_advantages(result.rewards, std_mode=adv.std, eps=adv.eps,
                                          clip=adv.clip, global_std=global_std)  # [P, K]
        else:
            advantages = masked_group_advantages(result.rewards, valid, std_mode=adv.std, eps=adv.eps,
                                                 clip=adv.clip, global_std=global_std)  # [P, K]
        n_valid = self.trainer.strategy.reduce(valid.sum().float(), reduce_op="sum")  # over all ranks

        opt = self.optimizers()
        sched = self.lr_schedulers()
        t0 = time.perf_counter()
        # manual_backward: under DDP the strategy all-reduces (averages) gradients in each backward;
        # each rank's loss is a mean over its equal-sized minibatches, so the average over ranks
        # is the single-process mean over the global batch.
        # Alone, masked trajectories' pairs are left out; under DDP every rank must run the same
        # number of backward passes, so they stay in with advantage 0 (no policy gradient).
        mask = None if all_valid or self.trainer.world_size > 1 else valid.flatten()  # [N]
        if float(n_valid) > 0:
            stats = grpo_update(self.backend, result, advantages.flatten(), self.settings, opt,
                                generator=local_gen, backward=self.manual_backward,
                                after_step=sched.step if sched is not None else None,
                                clip_grad_norm=self.clip_grad_norm, valid=mask)
        else:  # nothing finite to train on anywhere: no backward, no step
            stats = {"steps": 0.0, "skipped_steps": 0.0}
        update_time = time.perf_counter() - t0
        steps, skipped = stats.pop("steps"), stats.pop("skipped_steps")
        bad = float(n_valid) == 0 or skipped == steps
        nonfinite = nonfinite_counts(result.components)
        health = {"health/nonfinite_rewards": float((~result.rewards.isfinite()).sum()),
                  "health/nonfinite_previews": float(sum(int((~c.scores.isfinite()).sum()) for c in result.checkpoints
                                                         if c.scores is not None and c.step < result.num_steps)),
                  "health/masked_trajectories": float((~valid).sum()),
                  "health/skipped_updates": skipped + (1.0 if float(n_valid) == 0 else 0.0)}
        self.rollouts_done += 1
        logged = logs.rollout_metrics(result, advantages, stats, update_time, health, self.rollouts_done,
                                      opt.param_groups[0]["lr"], self.device)
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=len(prompts))
        self.log("reward", logged["reward/mean"], prog_bar=True, on_step=True, batch_size=len(prompts))
        try:
            self.guard.update(bad, nonfinite, total=result.rewards.numel(), skipped_steps=int(skipped))
        except NonFiniteError:  # Lightning would drop this rollout's metrics: write them now
            if self.global_rank == 0:
                for logger in self.loggers:
                    logger.log_metrics({k: float(v) for k, v in logged.items()}, step=self.trainer.global_step)
                    logger.save()
            raise
        every = self.samples.every_n_rollouts
        if every and (self.rollouts_done - 1) % every == 0:
            # at the rollout's own step: the step Lightning gives its scalars (0-based rollout index)
            logs.log_rollout_images(self, result, self.sample_prompts, step=self.rollouts_done - 1)

    def on_fit_start(self) -> None:
        logs.log_run_hparams(self)

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

    @property
    def sample_batch_size(self) -> int | None:
        """Rows per denoiser / decode / reward call (``rollout.sample_batch_size``; the memory plan reads it)."""
        return self.rollout_settings.sample_batch_size

    # ---- sampling for inspection ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int | None = None) -> Tensor:
        """One image per prompt from the current policy with fixed noise: [B, 3, H, W] in [0, 1].

        Prompt i's noise is seeded (seed, i): the same image whatever else is in the batch.
        """
        self.configure_model()
        seed = self.samples.seed if seed is None else seed
        with ema_weights(self, "eval"):  # the EMA's weights when an EMA callback asks (ema.py)
            return sample_items(self.backend, list(prompts), [mix_seed(seed, i) for i in range(len(prompts))],
                                self.sample_batch_size)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _adapter_names(self) -> set[str]:
        # Wrapper prefixes (FSDP units) never appear in a full state dict's keys: drop them here too.
        return {n.replace("_fsdp_wrapped_module.", "") for n, p in self.named_parameters() if p.requires_grad}

    def _kept_keys(self) -> set[str]:
        keys = self._adapter_names()
        keys |= {n for n, _ in self.rewards.named_buffers(prefix="rewards")}
        return keys

    def run_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed or exported by this module (plain types)."""
        lora = self.backend.lora
        targets = None if lora.target_modules is None else sorted(lora.target_modules)
        return {"backend": f"{type(self.backend).__module__}.{type(self.backend).__qualname__}",
                "finetune": getattr(self.backend, "finetune", "lora"),
                "lora.rank": int(lora.rank), "lora.alpha": float(lora.alpha), "lora.target_modules": targets,
                "schedule": repr(self.schedule), "optimizer": self.optimizer_name}

    def check_identity(self, saved: dict[str, Any], path: str, resume: bool = True) -> None:
        """Refuse a checkpoint of another run setup with one line naming both values. ``resume``
        also compares the schedule (unless ``allow_schedule_change``) and the optimizer class."""
        mine = self.run_identity()
        fields = ["backend", "finetune", "lora.rank", "lora.alpha", "lora.target_modules"]
        if resume:
            fields += [] if self.guards.allow_schedule_change else ["schedule"]
            fields += ["optimizer"]
        for key in fields:
            if key in saved and saved[key] != mine[key]:
                hint = (" (to change the schedule on purpose: --model.guards.allow_schedule_change true)"
                        if key == "schedule" else "")
                raise ConfigError(f"{path}: has {key}={saved[key]!r} but this run has "
                                  f"{key}={mine[key]!r}{hint}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._kept_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # Never write non-finite weights: the previous (good) checkpoint stays the latest.
        check_finite_tensors(checkpoint["state_dict"], "checkpoint save")
        check_finite_tensors(optimizer_tensors(checkpoint.get("optimizer_states", [])), "checkpoint save")
        # No generator state: rollout k's RNG is re-seeded from (seed, k) (noise.py).
        checkpoint["pro_grpo"] = {"rollouts_done": self.rollouts_done, "seed": self.seed,
                                  "rng": "per-rollout (seed, rollout index)",
                                  "schedule": repr(self.schedule), "identity": self.run_identity()}
        if self.run_config is not None:  # export reads the run's own config from here
            checkpoint["pro_grpo"]["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_tensors(checkpoint["state_dict"], "checkpoint load")
        resume = self._trainer is not None and self._trainer.state.fn == "fit"
        self.check_identity(checkpoint.get("pro_grpo", {}).get("identity") or {}, "checkpoint", resume=resume)
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
        images = sample_items(self.backend, batch["prompts"], batch["seeds"], self.sample_batch_size)  # [B, 3, H, W]
        scores = eval_scores(self.rewards, self.eval_rewards, images, batch["prompts"], batch.get("metadata"))
        self._eval_rows.append(item_rows(batch, scores, self.device))  # [B, 2 + S]
        first = batch["image_index"] == 0  # one image per prompt for the grid
        self._eval_images.append(images[first.to(images.device)].cpu())

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Images of held-out-style items and their raw scores (``predict.PredictionWriter`` writes them)."""
        self.configure_model()
        images = sample_items(self.backend, batch["prompts"], batch["seeds"])  # [B, 3, H, W]
        scores = eval_scores(self.rewards, self.eval_rewards, images, batch["prompts"], batch.get("metadata"))
        return {"images": images.cpu(), "rows": item_rows(batch, scores, self.device)}  # rows: [B, 2 + S]

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
        dataloaders = self.trainer.val_dataloaders if stage.startswith("val") else self.trainer.test_dataloaders
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
        fitting = self.trainer.state.fn == "fit"
        if not starting_point:  # for callbacks (checkpoint monitor, progress bar) and the return value of
            # trainer.validate/test. During fit not for the loggers: Lightning would log them at the
            # training batch counter, one behind the trained step, so logs.log_eval logs them instead.
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=rows.shape[0], logger=not fitting)
        if self.global_rank != 0:
            return
        write_eval_table(stage, self.trained_steps(), rows, names, getattr(dataset, "prompts", None), root,
                         getattr(dataset, "metadata", None))
        logs.log_eval(self, stage, metrics, images, self.trained_steps(), f"{stage}/{EVAL_TOTAL}",
                      scalars=fitting or starting_point)

    def trained_steps(self) -> int:
        """Optimizer steps behind the current weights (in validate/test: the checkpoint's)."""
        if self.trainer.state.fn == "fit":
            return self.trainer.global_step
        return getattr(self, "_loaded_global_step", self.trainer.global_step)
