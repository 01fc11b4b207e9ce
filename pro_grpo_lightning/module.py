"""The LightningModule: thin glue whose ``training_step`` reads like the algorithm.

    rollout (expand, prune at the checkpoints, finish the survivors)   -> rollout.py
    group-relative advantages over the survivors' true rewards          -> objectives.py
    inner epochs of PPO-clipped updates with an optional KL             -> update.py
    non-finite rewards masked, bad rollouts counted                     -> health.py

Manual optimization: one ``training_step`` is one rollout and (inner_epochs x optimizer steps)
updates, so ``trainer.global_step`` counts optimizer steps and ``max_steps`` counts updates.
Checkpoints hold only what training changes: the LoRA weights, reward-normalisation statistics,
the optimizer/scheduler (Lightning) and the rollout counter; the rollout RNG is re-seeded from
(seed, rollout index) every rollout (``noise.py``), so resuming continues the run exactly
(``checkpointing.py``: what is kept, and the run identity a checkpoint must match).

Multi-GPU (DDP): each rank rolls out whole groups for its own prompts; the rollout noise is the
rank's slice of a global draw, so W ranks x P prompts sample what one process with W x P prompts
samples; gradients are averaged by the strategy in ``manual_backward``; reward statistics and
logged metrics are reduced across ranks (``distributed.py``).

Held-out evaluation (``validation_step`` / ``test_step``, the steps in ``evaluation.py``): every
(prompt, image) item of the datamodule's held-out set is sampled from the policy with its own
fixed noise, scored by the training rewards and ``eval_rewards``, logged as ``val/*`` / ``test/*``
and written as a table (CSV + markdown) under ``<log_dir>/eval/``. ``predict_step`` samples the
same items for ``trainer.predict`` (PNGs, contact sheets, scores: ``predict.py``). What a run logs,
and when: ``logs.py``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from . import checkpointing, evaluation, logs, progress
from .backends.base import DiffusionBackend
from .data import PromptBatch
from .distributed import RankSyncedRewardSet
from .ema import ema_weights
from .errors import ConfigError
from .health import BadRolloutGuard, GuardSettings, finite_advantages, nonfinite_counts
from .logs import DEFAULT_SAMPLE_PROMPTS, SampleSettings
from .networks import NetworkSource
from .noise import LOCAL_STREAM, NOISE_STREAM, mix_seed, seeded_generator
from .objectives import AdvantageSettings
from .rewards.base import Reward
from .rollout import ExpandPruneRollout, RolloutSettings
from .schedules import GroupSchedule
from .update import UpdateSettings, check_optimizer, check_trainable, grpo_update

# With manual optimisation Lightning warns that a step-interval checkpoint holds the weights after
# the optimizer step: that is the state we mean to save (it matches the saved rollout counter).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# The frozen parts (base denoiser weights under LoRA, VAE, text encoders, reward models) are in eval
# mode on purpose: no dropout while sampling or scoring. Lightning warns about any eval-mode module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Lightning's pytree helper (evaluation results, batch sizes) builds torch's ``LeafSpec``, which
# recent torch releases deprecate: a notice about Lightning's code that a user of this package cannot act on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


class ProGRPOModule(pl.LightningModule):
    """Pro-GRPO (and its baselines, by schedule) on a LoRA policy.

    Args:
        backend: the model family, by ``class_path`` (SD1.5, SDXL, SD3, FLUX, Qwen-Image, Z-Image, or a tiny variant).
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
        samples: the logged image grid (``logs.SampleSettings``).
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
                                  logger=False)  # logs.log_run_start logs the run's flattened settings
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapter, not the frozen base weights
        self.optimizer_name = check_optimizer(optimizer)  # refuses a learning rate that trains nothing
        check_trainable(backend, update)
        self.backend = backend
        backend.set_keep_reference(update.kl_beta > 0)  # full fine-tuning copies the base denoiser only for a KL
        self.rewards = RankSyncedRewardSet(rewards, normalize=reward_normalize)
        self.eval_rewards = torch.nn.ModuleList(eval_rewards or [])
        self.eval_names = evaluation.eval_columns(self.rewards, self.eval_rewards)  # refuses clashing names
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
        self.rollout = ExpandPruneRollout(backend, self.rewards, schedule, rollout,
                                          record_means=update.ratio_norm != "none")  # GRPO-Guard needs mu_old
        self.guards = guards
        self.guard = BadRolloutGuard(guards.max_bad_rollouts)
        self.run_config: str | None = None  # the resolved YAML of this run (set by the CLI), saved in checkpoints
        self.held_out: dict[str, dict[int, dict[str, float]]] = {}  # {stage: {step: {column: mean}}}, saved too
        self._eval_rows: list[Tensor] = []  # per evaluation batch: [B, 2 + scores] on this rank
        self._eval_images: list[tuple[Tensor, Tensor]] = []  # per batch: first images [n, 3, H, W], their rows
        self.last_heldout: float | None = None  # the last held-out total (val/total), for the progress bar

    def set_run_config(self, text: str) -> None:
        """The resolved YAML of this run (the CLI gives it), saved in every checkpoint."""
        self.run_config = text

    def use_networks(self, source: NetworkSource) -> None:
        """Build every network of the run (the backend's, each reward's) from ``source`` in
        ``configure_model`` (``networks.py``): pretrained weights, or the architectures with random
        values on a device, or empty on the meta device (the memory plan)."""
        self.backend.use_networks(source)
        for reward in [*self.rewards.rewards, *self.eval_rewards]:
            reward.use_networks(source)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Install the atomic, weights_only, finite-only checkpoint IO before Lightning opens or
        writes any checkpoint, run each reward's ``preflight`` and check every prompt set against
        the rewards (``Reward.validate_prompts``), all before any weights load."""
        checkpointing.install(self.trainer)
        for reward in [*self.rewards.rewards, *self.eval_rewards]:
            reward.preflight()  # e.g. a reward server that does not answer: before any weights load
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
                                  progress=progress.rollout_progress(self))

        # Non-finite guard (health.py): trajectories with a NaN/inf reward are masked, groups left
        # with < 2 finite rewards too; nothing non-finite reaches the optimizer.
        adv = finite_advantages(result.rewards, self.advantages, self.trainer.strategy)  # .advantages: [P, K]
        opt, sched = self.optimizers(), self.lr_schedulers()
        t0 = time.perf_counter()
        # manual_backward: under DDP the strategy all-reduces (averages) gradients in each backward;
        # each rank's loss is a mean over its equal-sized minibatches, so the average over ranks
        # is the single-process mean over the global batch.
        if adv.n_valid > 0:
            stats = grpo_update(self.backend, result, adv.advantages.flatten(), self.settings, opt,
                                generator=local_gen, backward=self.manual_backward,
                                after_step=sched.step if sched is not None else None,
                                clip_grad_norm=self.clip_grad_norm, valid=adv.update_mask(self.trainer.world_size))
        else:  # nothing finite to train on anywhere: no backward, no step
            stats = {"steps": 0.0, "skipped_steps": 0.0}
        update_time = time.perf_counter() - t0
        steps, skipped = stats.pop("steps"), stats.pop("skipped_steps")
        bad, health = adv.report(result, steps, skipped)
        self.rollouts_done += 1
        logged = logs.rollout_metrics(result, adv.advantages, stats, update_time, health,
                                      opt.param_groups[0]["lr"], self.device)
        logged.update({k: torch.tensor(v) for k, v in self.backend.compile_metrics().items()})  # this rank's graphs
        written = logs.log_rollout(self, logged, batch_size=len(prompts), step=self.rollouts_done - 1)
        with logs.written_if_raised(self, logged, self.rollouts_done - 1, written):  # the rollout a guard stops on
            self.guard.update(bad, nonfinite_counts(result.components), total=result.rewards.numel(),
                              skipped_steps=int(skipped), health=health, components=result.components)
        if self.samples.due(self.rollouts_done - 1):
            # at the rollout's own step: the step Lightning gives its scalars (0-based rollout index)
            logs.log_rollout_images(self, result, self.sample_prompts, step=self.rollouts_done - 1,
                                    score=evaluation.text_scores)

    def on_fit_start(self) -> None:
        logs.log_run_start(self)

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
        if evaluation.final_batch(self.trainer, batch_idx):  # Lightning then evaluates the final weights too
            self.trainer.should_stop = True

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
            seeds = [mix_seed(seed, i) for i in range(len(prompts))]
            return evaluation.sample_items(self.backend, list(prompts), seeds, self.sample_batch_size)

    # ---- checkpoints (checkpointing.py) --------------------------------------------------------
    def run_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed or exported by this module (plain types)."""
        return checkpointing.run_identity(self.backend, self.schedule, self.optimizer_name)

    def check_identity(self, saved: dict[str, Any], path: str, resume: bool = True) -> None:
        """Refuse a checkpoint of another run setup with one line naming both values. ``resume``
        also compares the schedule (unless ``allow_schedule_change``) and the optimizer class."""
        checkpointing.check_identity(saved, self.run_identity(), path, resume, self.guards.allow_schedule_change)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.pack_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume = self._trainer is not None and self._trainer.state.fn == "fit"
        self.rollouts_done, self._loaded_global_step = checkpointing.unpack_checkpoint(self, checkpoint, resume)
        self.held_out = dict((checkpoint.get("pro_grpo") or {}).get("held_out") or {})

    def record_held_out(self, stage: str, step: int, means: dict[str, float]) -> None:
        """A held-out evaluation's means at ``step``: kept in checkpoints for the export's model card."""
        self.held_out.setdefault(stage, {})[step] = dict(means)

    # ---- held-out evaluation (evaluation.py) ------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rows, images = self.eval_outputs(batch)
        self._eval_rows.append(rows)
        self._eval_images.append(images)

    test_step = validation_step

    def eval_outputs(self, batch: dict[str, Any]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One held-out batch: its score rows [B, 2 + S] and the grid's images (one per prompt, CPU)
        with their rows (the captions: prompt and score)."""
        images, rows = evaluation.eval_batch(self, batch, self.sample_batch_size)  # [B, 3, H, W], [B, 2 + S]
        first = (batch["image_index"] == 0).to(images.device)  # one image per prompt for the grid
        return rows, (images[first].cpu(), rows[first.to(rows.device)].cpu())

    def evaluate(self, batches: Iterable[dict[str, Any]], stage: str) -> None:
        """The held-out evaluation of ``batches`` at once, logged as ``<stage>/*`` (the EMA
        callback's second pass with its weights); an evaluation in progress is left as it is."""
        outputs = [self.eval_outputs(batch) for batch in batches]
        evaluation.finish_eval(self, stage, [r for r, _ in outputs], [im for _, im in outputs])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Images of held-out-style items and their raw scores (``predict.PredictionWriter`` writes them)."""
        images, rows = evaluation.eval_batch(self, batch)  # [B, 3, H, W], [B, 2 + S]
        return {"images": images.cpu(), "rows": rows}

    def on_validation_epoch_start(self) -> None:
        self._eval_rows, self._eval_images = [], []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _finish_eval(self, stage: str) -> None:
        rows, images, self._eval_rows, self._eval_images = self._eval_rows, self._eval_images, [], []
        total = evaluation.finish_eval(self, stage, rows, images)
        if stage == "val" and total is not None:
            self.last_heldout = total

    def trained_steps(self) -> int:
        """Optimizer steps behind the current weights (in validate/test: the checkpoint's)."""
        if self.trainer.state.fn == "fit":
            return self.trainer.global_step
        return getattr(self, "_loaded_global_step", self.trainer.global_step)
