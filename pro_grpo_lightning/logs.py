"""What a run shows, in whichever Lightning logger it uses: rollout metrics, images, hyperparameters,
and a progress display inside a rollout.

Steps (the x-axis):
  - rollout scalars (``reward/*``, ``train/*``, ...) sit at Lightning's step for a training batch,
    the 0-based rollout index; the sample images of that rollout (``samples/fixed_prompts``,
    ``samples/survivors``) are logged at the same index, one tag per kind with a step slider;
  - held-out scalars (``val/*``, ``test/*``), their image grid, their table and ``hp_metric`` all sit
    at the optimizer steps behind the evaluated weights (``trained_steps``), the number in the
    table's file name. Lightning would put scalars logged in a validation run inside training at
    the training batch counter, one less than the optimizer step count after that batch, so the
    module sends them to the loggers itself, with this explicit step.

Images go through each logger's own API (``log_image``): TensorBoard ``add_image`` (and the
caption as text), W&B ``WandbLogger.log_image`` (caption attached), MLflow ``log_image`` on its
client; a logger without an image API (``CSVLogger``, others with a ``log_dir``) gets PNG files
``<log_dir>/images/<tag>/step_XXXXXX.png`` (+ ``.txt`` caption).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor

from .distributed import reduce_metrics
from .rollout import RolloutResult, proxy_reward_correlation

#: the metric TensorBoard's HParams view compares runs by: bound to the held-out total
HP_METRIC = "hp_metric"
#: modules whose run already has its TensorBoard HParams session (written once per module)
_HP_SESSION_WRITTEN: weakref.WeakSet = weakref.WeakSet()

DEFAULT_SAMPLE_PROMPTS = ["a cat", "a red square", "a horse", "a blue triangle"]


@dataclasses.dataclass
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

    def due(self, rollout: int) -> bool:
        """Whether rollout ``rollout`` (0-based) logs the grid: rollouts 0, N, 2N, ..."""
        return bool(self.every_n_rollouts) and rollout % self.every_n_rollouts == 0


# ---- rollout metrics -----------------------------------------------------------------------------
def finite_mean(x: Tensor) -> Tensor:
    """Mean of the finite entries (NaN when there are none)."""
    return x.float().masked_fill(~x.isfinite(), float("nan")).nanmean()


def finite_group_std(x: Tensor) -> Tensor:
    """[P, K] -> [P] population std of each group's finite entries."""
    x = x.float().masked_fill(~x.isfinite(), float("nan"))  # [P, K]
    return (x - x.nanmean(1, keepdim=True)).pow(2).nanmean(1).sqrt()  # [P]


def rollout_metrics(r: RolloutResult, advantages: Tensor, stats: Mapping[str, float], update_time: float,
                    health: Mapping[str, float] | None, rollouts_done: int, lr: float,
                    device: torch.device) -> dict[str, Tensor]:
    """Metrics of the whole global batch: means over ranks (equal sizes: global means), sums of
    counts, max/min of extremes, slowest rank's timings; one reduction per kind (``reduce_metrics``:
    two collectives for every metric at once). Reward statistics are over the finite rewards
    (``health/*`` counts the others)."""
    P, K = r.rewards.shape
    finite = r.rewards.isfinite()  # [P, K]
    m: dict[str, Tensor | float] = {
        "reward/mean": finite_mean(r.rewards),
        "reward/group_std": finite_mean(finite_group_std(r.rewards)),  # spread within groups
        "advantage/abs_mean": advantages.abs().mean(),
        "rollouts": float(rollouts_done),
    }
    counts = {"compute/nfe": float(r.nfe), "compute/nfe_plain_gmax": float(r.nfe_full),
              "compute/previews": float(r.num_previews), **(health or {})}
    slowest = {"time/rollout_denoise_s": r.timings["denoise"], "time/rollout_preview_s": r.timings["preview"],
               "time/rollout_final_s": r.timings["final"], "time/update_s": update_time,
               "reward/max": r.rewards.masked_fill(~finite, float("-inf")).max()}
    for name, v in r.components.items():
        m[f"reward/{name}"] = finite_mean(v)
    first = next((c for c in r.checkpoints if c.scores is not None and c.step < r.num_steps), None)
    if first is not None:  # spread of the whole expanded group vs the survivors, on the first proxy
        prompt = torch.arange(P, device=first.scores.device).repeat_interleave(K)  # [P*K]
        survivors = first.scores[prompt, first.survivors].view(P, K)  # [P, K]
        m["group_std/expanded_proxy"] = finite_mean(finite_group_std(first.scores))
        m["group_std/survivors_proxy"] = finite_mean(finite_group_std(survivors))
    for i, c in enumerate(proxy_reward_correlation(r)):  # under DDP: the mean of the ranks' values
        m[f"pruning/proxy_true_corr_survivors_{i}"] = c
    for k, v in r.audit.items():
        m[f"pruning/audit_{k}"] = v
    for k, v in stats.items():
        m[f"train/{k}"] = v
    m["train/lr"] = lr
    out = reduce_metrics(m, sums=counts, maxes=slowest,
                         mins={"reward/min": r.rewards.masked_fill(~finite, float("inf")).min()}, device=device)
    out["compute/nfe_saved_frac"] = 1.0 - out["compute/nfe"] / out["compute/nfe_plain_gmax"]
    return out


def log_rollout(module: pl.LightningModule, metrics: Mapping[str, Tensor], batch_size: int) -> None:
    """A rollout's ``rollout_metrics`` through Lightning at its training step; ``reward`` (the
    mean) also on the progress bar."""
    module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
    module.log("reward", metrics["reward/mean"], prog_bar=True, on_step=True, batch_size=batch_size)


@contextlib.contextmanager
def written_if_raised(module: pl.LightningModule, metrics: Mapping[str, Tensor]) -> Iterator[None]:
    """Send ``metrics`` to every logger at once (rank 0, at the trainer's step) if the body raises:
    Lightning drops the metrics of a training step that fails, and the rollout that stopped a run
    (``health.BadRolloutGuard``) is the one to look at."""
    try:
        yield
    except Exception:
        if module.global_rank == 0:
            for logger in module.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=module.trainer.global_step)
                logger.save()
        raise


# ---- images --------------------------------------------------------------------------------------
def image_grid(images: Tensor, nrow: int) -> Tensor:
    """[B, 3, H, W] -> one [3, rows*H, nrow*W] grid (B padded with black to a full grid)."""
    B, C, H, W = images.shape
    rows = math.ceil(B / nrow)
    pad = images.new_zeros(rows * nrow - B, C, H, W)
    x = torch.cat([images, pad]).view(rows, nrow, C, H, W)  # [rows, nrow, C, H, W]
    return x.permute(2, 0, 3, 1, 4).reshape(C, rows * H, nrow * W)


def to_uint8_hwc(image: Tensor):
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 numpy array (what PIL, W&B and MLflow take)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def image_path(log_dir: str, tag: str, step: int) -> str:
    """``<log_dir>/images/<tag>/step_XXXXXX.png`` (a tag's ``/`` become folders)."""
    return os.path.join(log_dir, "images", *tag.split("/"), f"step_{step:06d}.png")


def log_image(loggers: Iterable[Logger], tag: str, image: Tensor, step: int, caption: str | None = None) -> None:
    """One [3, H, W] image in [0, 1] under ``tag`` at ``step``, through each logger's own API.

    Call on rank 0 only (Lightning's loggers write on rank 0; the PNG files would clash)."""
    from PIL import Image

    for logger in loggers:
        kind = type(logger).__name__
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image.detach().float().clamp(0, 1).cpu(), step)
            if caption:
                logger.experiment.add_text(f"{tag}/caption", caption, step)
        elif kind == "WandbLogger":
            logger.log_image(key=tag, images=[to_uint8_hwc(image)], step=step,
                             **({"caption": [caption]} if caption else {}))
        elif kind == "MLFlowLogger":
            logger.experiment.log_image(logger.run_id, to_uint8_hwc(image), key=tag.replace("/", "."), step=step)
        elif getattr(logger, "log_dir", None):  # CSVLogger and any other file logger: PNG files
            path = image_path(logger.log_dir, tag, step)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(to_uint8_hwc(image)).save(path)
            if caption:
                with open(path[:-4] + ".txt", "w", encoding="utf-8") as f:
                    f.write(caption + "\n")


def log_rollout_images(module: pl.LightningModule, r: RolloutResult, prompts: list[str], step: int) -> None:
    """``samples/fixed_prompts``: ``prompts`` with fixed noise (changes are the policy's);
    ``samples/survivors``: what pruning kept of the first prompt's group, in group order, the prompt
    as caption. Rank 0 only: the other ranks need not sample."""
    if not module.loggers or module.global_rank != 0:
        return
    grid = image_grid(module.sample(prompts).cpu(), nrow=len(prompts))
    log_image(module.loggers, "samples/fixed_prompts", grid, step, caption=" | ".join(prompts))
    kept = image_grid(r.images[: r.group_size].cpu(), nrow=r.group_size)
    log_image(module.loggers, "samples/survivors", kept, step, caption=r.prompts[0])


# ---- held-out evaluation -------------------------------------------------------------------------
def log_eval(module: pl.LightningModule, stage: str, metrics: Mapping[str, Tensor], images: list[Tensor],
             step: int, total_key: str, scalars: bool = True) -> None:
    """Rank 0: the held-out means, ``hp_metric`` (= the held-out total, validation only) and an
    image grid (first image of up to 16 prompts), all at ``step``. ``scalars=False`` (a standalone
    ``validate``/``test``, where Lightning itself logs the means it returns): the image grid only."""
    if module.global_rank != 0 or not module.loggers:
        return
    values = {k: float(v) for k, v in metrics.items()} if scalars else {}
    hp = stage == "val" and total_key in values
    for logger in module.loggers if values else ():
        if hp and isinstance(logger, TensorBoardLogger) and module not in _HP_SESSION_WRITTEN:
            # the HParams view's session, bound to hp_metric (logged at ``step`` with it)
            logger.log_hyperparams(run_hparams(module), {HP_METRIC: values[total_key]}, step=step)
            _HP_SESSION_WRITTEN.add(module)
            logger.log_metrics(values, step=step)
        else:
            logger.log_metrics({**values, **({HP_METRIC: values[total_key]} if hp else {})}, step=step)
        logger.save()
    if images:
        shown = torch.cat(images)[:16]  # [n, 3, H, W]
        log_image(module.loggers, f"{stage}/images", image_grid(shown, nrow=min(8, len(shown))), step)


# ---- hyperparameters -----------------------------------------------------------------------------
def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix] = value
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        out[prefix] = str(list(value))
    # anything else (callables, modules) does not define a run by a value a table can show


def run_hparams(module: pl.LightningModule) -> dict[str, Any]:
    """The settings that define a run, flattened to plain values for the HParams view / W&B config /
    ``hparams.yaml``: the module's own arguments, the backend (class, T, guidance, resolution, LoRA
    rank/alpha), the schedule (class, sizes, checkpoints, rule), the optimizer (class, lr, weight
    decay), the rewards and their weights, and the datamodule's prompts per step."""
    hp: dict[str, Any] = {}
    _flatten("", dict(module.hparams_initial), hp)
    b = module.backend
    hp["backend"] = f"{type(b).__module__}.{type(b).__qualname__}"
    for k in ("num_steps", "guidance_scale", "resolution", "eta", "sde_window", "seed"):
        _flatten(f"backend.{k}", getattr(b, k, None), hp)
    lora = getattr(b, "lora", None)
    hp["lora.rank"] = None if lora is None else int(lora.rank)
    hp["lora.alpha"] = None if lora is None else float(lora.alpha)
    s = module.schedule
    hp["schedule"] = type(s).__name__
    for k in ("group_size", "checkpoints", "keep", "final_keep", "rule"):
        _flatten(f"schedule.{k}", getattr(s, k, None), hp)
    hp["optimizer"] = getattr(module, "optimizer_name", None)
    if module._trainer is not None and module.trainer.optimizers:
        group = module.trainer.optimizers[0].param_groups[0]
        for k in ("lr", "weight_decay"):
            if isinstance(group.get(k), (int, float)):
                hp[f"optimizer.{k}"] = float(group[k])
    rewards = getattr(module, "rewards", None)
    if rewards is not None:
        hp["rewards"] = ", ".join(f"{n}*{w:g}" for n, w in zip(rewards.names, rewards.weights))
        hp["reward_normalize"] = getattr(rewards, "normalize", None)
    data = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if data is not None and hasattr(data, "prompts_per_step"):
        hp["data.prompts_per_step"] = int(data.prompts_per_step)
    return hp


def log_run_hparams(module: pl.LightningModule) -> None:
    """Rank 0, at the start of fit: the run's hyperparameters to every logger (``hparams.yaml``,
    W&B config, MLflow params). No ``hp_metric`` placeholder: TensorBoard's HParams session is
    written with the first held-out total (``log_eval``); a run without held-out prompts has none."""
    if module.global_rank != 0:
        return
    hp = run_hparams(module)
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hp, {})  # stores them (hparams.yaml), no placeholder metric
        else:
            logger.log_hyperparams(hp)


# ---- progress inside a rollout -------------------------------------------------------------------
class ProGRPOProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer updates against ``max_steps`` (not "Epoch 0/-2" of an
    endless epoch), with the rollout's progress inside it: ``rollout k: step t/T, live N, previews M``.

    The in-rollout updates redraw only on a terminal (``isatty``): a CI log gets Lightning's own
    per-``refresh_rate`` lines and nothing more. Use it in ``trainer.callbacks``."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False, live: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.live = live  # None: on when stderr is a terminal

    def _counts_updates(self, trainer: pl.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_updates(trainer):
            bar = self.train_progress_bar
            bar.total, bar.initial, bar.n = trainer.max_steps, 0, trainer.global_step
            bar.set_description(f"rollout {getattr(pl_module, 'rollouts_done', 0)}, updates")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._counts_updates(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if self.is_enabled and (batch_idx + 1) % self.refresh_rate == 0:
            bar.n = trainer.global_step
            bar.set_description(f"rollout {getattr(pl_module, 'rollouts_done', 0)}, updates", refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def rollout_step(self, rollout: int, step: int, num_steps: int, live: int, previews: int) -> None:
        """Called by the rollout after every denoising step (see ``rollout_progress``)."""
        live_on = self.live if self.live is not None else sys.stderr.isatty()
        if not (self.is_enabled and live_on):
            return
        try:
            bar = self.train_progress_bar
        except TypeError:  # not training (no bar yet)
            return
        bar.set_description(f"rollout {rollout}: step {step}/{num_steps}, live {live}, previews {previews}")


def rollout_progress(module: pl.LightningModule) -> Callable[[int, int, int, int], None] | None:
    """The rollout's per-step callback ``(step, num_steps, live, previews)``, or None when the run's
    progress bar is not a ``ProGRPOProgressBar`` (or is off)."""
    if module._trainer is None or module.global_rank != 0:
        return None
    bar = module.trainer.progress_bar_callback
    if not isinstance(bar, ProGRPOProgressBar):
        return None
    rollout = module.rollouts_done
    return lambda step, num_steps, live, previews: bar.rollout_step(rollout, step, num_steps, live, previews)
