"""What a run shows, in whichever Lightning logger it uses: rollout metrics, images and hyperparameters
(the TensorBoard layout and the captioned image grids: ``dashboard.py``; the progress bar: ``progress.py``).

One quantity, one tag: the loggers get each rollout metric once (``logged_rollout_metrics``: a
reward component only when it differs from ``reward/mean``, ``train/loss`` only with a KL term),
no counters (the step is the rollout index) and no constants (the denoiser-call figures are
hyperparameters, ``dashboard.compute_figures``). ``hp_metric`` is Lightning's name for the metric
TensorBoard's HParams view compares runs by: the held-out total, ``val/total``, logged with it.

Steps (the x-axis):
  - rollout scalars (``reward/*``, ``train/*``, ...) sit at Lightning's step for a training batch,
    the 0-based rollout index; the sample images of that rollout (``samples/fixed_prompts``,
    ``samples/survivors``) are logged at the same index, one tag per kind with a step slider;
  - held-out scalars (``val/*``, ``test/*``), their image grid, their table and ``hp_metric`` all sit
    at the optimizer steps behind the evaluated weights (``trained_steps``), the number in the
    table's file name. Lightning would put scalars logged in a validation run inside training at
    the training batch counter, one less than the optimizer step count after that batch, so the
    module sends them to the loggers itself, with this explicit step.

Images are grids of tiles upscaled to at least 128 px with each tile's prompt and reward drawn
under it (``dashboard.captioned_grid``), and go through each logger's own API (``log_image``):
TensorBoard ``add_image``, W&B ``WandbLogger.log_image`` (caption attached), MLflow ``log_image``
on its client; a logger without an image API (``CSVLogger``, others with a ``log_dir``) gets PNG
files ``<log_dir>/images/<tag>/step_XXXXXX.png`` (+ ``.txt`` caption).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor

from .dashboard import captioned_grid, compute_figures, single_reward_is_total, write_layout
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

    Args:
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
                    health: Mapping[str, float] | None, lr: float, device: torch.device) -> dict[str, Tensor]:
    """Metrics of the whole global batch: means over ranks (equal sizes: global means), sums of
    counts, max/min of extremes, slowest rank's timings; one reduction per kind (``reduce_metrics``:
    two collectives for every metric at once). Reward statistics are over the finite rewards
    (``health/*`` counts the others). All of them reach ``trainer.callback_metrics``; the loggers
    get ``logged_rollout_metrics`` of them."""
    P, K = r.rewards.shape
    finite = r.rewards.isfinite()  # [P, K]
    m: dict[str, Tensor | float] = {
        "reward/mean": finite_mean(r.rewards),
        "reward/group_std": finite_mean(finite_group_std(r.rewards)),  # spread within groups
        "advantage/abs_mean": advantages.abs().mean(),
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


def logged_rollout_metrics(metrics: Mapping[str, Tensor], rewards: Any) -> dict[str, float]:
    """What the loggers get of ``rollout_metrics``: no constants (``compute/*``: hyperparameters, see
    ``dashboard.compute_figures``), no component equal to ``reward/mean`` by construction, no
    ``train/loss`` equal to ``train/policy_loss`` (no KL term)."""
    dup = {f"reward/{n}" for n in getattr(rewards, "names", [])} if single_reward_is_total(rewards) else set()
    if "train/kl" not in metrics:
        dup.add("train/loss")
    return {k: float(v) for k, v in metrics.items() if not k.startswith("compute/") and k not in dup}


def log_rollout(module: pl.LightningModule, metrics: Mapping[str, Tensor], batch_size: int, step: int) -> bool:
    """A rollout's ``rollout_metrics``: all of them to ``trainer.callback_metrics`` (callbacks, the
    checkpoint monitor; ``reward/mean`` also to the progress bar), and on rank 0
    ``logged_rollout_metrics`` to every logger at ``step`` (the 0-based rollout index), every
    ``log_every_n_steps`` rollouts and the last. Written here rather than through ``self.log``
    so that Lightning adds no ``epoch`` counter to every row. Returns whether the loggers got them."""
    module.log_dict({k: v for k, v in metrics.items() if k != "reward/mean"}, on_step=True, on_epoch=False,
                    batch_size=batch_size, logger=False)
    module.log("reward/mean", metrics["reward/mean"], prog_bar=True, on_step=True, on_epoch=False,
               batch_size=batch_size, logger=False)
    trainer = module.trainer
    last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    if module.global_rank != 0 or not module.loggers or ((step + 1) % max(1, trainer.log_every_n_steps) and not last):
        return False
    values = logged_rollout_metrics(metrics, getattr(module, "rewards", None))
    for logger in module.loggers:
        logger.log_metrics(values, step=step)
    return True


@contextlib.contextmanager
def written_if_raised(module: pl.LightningModule, metrics: Mapping[str, Tensor], step: int,
                      logged: bool) -> Iterator[None]:
    """If the body raises: send ``metrics`` to every logger (rank 0, at the rollout's ``step``)
    unless ``log_rollout`` already did (``logged``), and flush them: the rollout that stopped a
    run (``health.BadRolloutGuard``) is the one to look at, whatever ``log_every_n_steps`` says."""
    try:
        yield
    except Exception:
        if module.global_rank == 0:
            values = logged_rollout_metrics(metrics, getattr(module, "rewards", None))
            for logger in module.loggers:
                if not logged:
                    logger.log_metrics(values, step=step)
                logger.save()
        raise


# ---- images --------------------------------------------------------------------------------------
def to_uint8_hwc(image: Tensor):
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 numpy array (what PIL, W&B and MLflow take)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def image_path(log_dir: str, tag: str, step: int) -> str:
    """``<log_dir>/images/<tag>/step_XXXXXX.png`` (a tag's ``/`` become folders)."""
    return os.path.join(log_dir, "images", *tag.split("/"), f"step_{step:06d}.png")


def log_image(loggers: Iterable[Logger], tag: str, image: Tensor, step: int, caption: str | None = None) -> None:
    """One [3, H, W] image in [0, 1] under ``tag`` at ``step``, through each logger's own API;
    ``caption`` where the logger takes one (W&B; a ``.txt`` beside a PNG file).

    Call on rank 0 only (Lightning's loggers write on rank 0; the PNG files would clash)."""
    from PIL import Image

    for logger in loggers:
        kind = type(logger).__name__
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image.detach().float().clamp(0, 1).cpu(), step)
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


def log_rollout_images(module: pl.LightningModule, r: RolloutResult, prompts: list[str], step: int,
                       score: Callable[[Any, Tensor, list[str]], list[float] | None]) -> None:
    """``samples/fixed_prompts``: ``prompts`` with fixed noise (changes are the policy's), each
    captioned with its prompt and its reward by ``score(module, images, prompts)`` (None: prompts
    only); ``samples/survivors``: what pruning kept of the first prompt's group, in group order,
    each with the reward it was trained on. Rank 0 only: the other ranks need not sample."""
    if not module.loggers or module.global_rank != 0:
        return
    images = module.sample(prompts).cpu()  # [B, 3, H, W]
    scores = score(module, images, prompts)
    captions = prompts if scores is None else [f"{p} - reward {s:.3f}" for p, s in zip(prompts, scores)]
    log_image(module.loggers, "samples/fixed_prompts", captioned_grid(images, captions, nrow=len(prompts)), step,
              caption=" | ".join(captions))
    K = r.group_size
    kept = [f"reward {float(v):.3f}" for v in r.rewards[0]]
    grid = captioned_grid(r.images[:K].cpu(), kept, nrow=K, title=f"kept of the group of: {r.prompts[0]}")
    log_image(module.loggers, "samples/survivors", grid, step, caption=f"{r.prompts[0]}: " + ", ".join(kept))


# ---- held-out evaluation -------------------------------------------------------------------------
def log_eval(module: pl.LightningModule, stage: str, metrics: Mapping[str, Tensor],
             images: list[tuple[Tensor, Tensor]], step: int, total_key: str, scalars: bool = True,
             prompts: list[str] | None = None) -> None:
    """Rank 0: the held-out means, ``hp_metric`` (= the held-out total, validation only) and an
    image grid (first image of up to 16 prompts, each captioned with its prompt and total), all at
    ``step``. ``images``: (images [n, 3, H, W], their item rows [n, 2 + S]) per batch. A column
    equal to the total by construction (one training reward, weight 1) is not logged twice.
    ``scalars=False`` (a standalone ``validate``/``test``, where Lightning itself logs the means it
    returns): the image grid only."""
    if module.global_rank != 0 or not module.loggers:
        return
    rewards = getattr(module, "rewards", None)
    dup = {f"{stage}/{n}" for n in rewards.names} if single_reward_is_total(rewards) else set()
    values = {k: float(v) for k, v in metrics.items() if k not in dup} if scalars else {}
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
        shown = torch.cat([i for i, _ in images])[:16]  # [n, 3, H, W]
        rows = torch.cat([r.cpu() for _, r in images])[:16]  # [n, 2 + S]; column 2: the total
        text = (lambda i: prompts[i]) if prompts is not None else (lambda i: f"prompt {i}")
        captions = [f"{text(int(r[0]))} - {float(r[2]):.3f}" for r in rows]
        log_image(module.loggers, f"{stage}/images", captioned_grid(shown, captions, nrow=min(8, len(shown))), step,
                  caption=" | ".join(captions))


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


#: constructor arguments a backend keeps under another attribute name
BACKEND_ATTRIBUTES = {"dtype": "dtype_name", "preview_decoder": "preview_source"}


def backend_settings(backend: Any) -> dict[str, Any]:
    """``backend.<arg>`` for every argument of the backend class's constructor, as the backend holds
    it: the settings this family has (SD1.5's ``eta``, SD3's ``sde_kind`` and ``noise_level``),
    none of another family's. ``lora`` becomes ``lora.<field>``."""
    out: dict[str, Any] = {}
    missing = object()
    for name in inspect.signature(type(backend).__init__).parameters:
        value = getattr(backend, BACKEND_ATTRIBUTES.get(name, name), missing)
        if name == "self" or value is missing:
            continue
        _flatten("lora" if name == "lora" else f"backend.{name}", value, out)
    return out


def run_hparams(module: pl.LightningModule) -> dict[str, Any]:
    """The settings that define a run, flattened to plain values for the HParams view / W&B config /
    ``hparams.yaml``: the module's own arguments, the backend (class and its own constructor
    settings, LoRA), the schedule (class, sizes, checkpoints, rule), the optimizer (class, lr,
    weight decay), the rewards and their weights, the datamodule's prompts per step, and the
    constant compute of a rollout (``dashboard.compute_figures``)."""
    hp: dict[str, Any] = {}
    _flatten("", dict(module.hparams_initial), hp)
    b = module.backend
    hp["backend"] = f"{type(b).__module__}.{type(b).__qualname__}"
    hp.update(backend_settings(b))
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
    hp.update(compute_figures(module))
    return hp


def log_run_start(module: pl.LightningModule) -> None:
    """Rank 0, at the start of fit: TensorBoard's custom-scalars layout (``dashboard.write_layout``)
    and the run's hyperparameters to every logger (``hparams.yaml``, W&B config, MLflow params). No
    ``hp_metric`` placeholder: TensorBoard's HParams session is written with the first held-out
    total (``log_eval``); a run without held-out prompts has none."""
    if module.global_rank != 0:
        return
    write_layout(module)
    hp = run_hparams(module)
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hp, {})  # stores them (hparams.yaml), no placeholder metric
        else:
            logger.log_hyperparams(hp)
