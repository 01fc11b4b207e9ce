"""The progress display of a run, under whichever bar Lightning uses: ``rollout i/N``, the denoising
step of the rollout in flight, its live rows after each pruning, the last mean reward and held-out
score.

Lightning picks ``RichProgressBar`` when ``rich`` is installed and ``TQDMProgressBar`` otherwise;
both count the batches of the current epoch, which for a run bounded by ``max_steps`` reads
``Epoch 1/-2``. One training batch is one rollout, so the display counts rollouts out of the
run's planned number instead (``planned_rollouts``), and the rollout reports each denoising step
through ``rollout_progress``. ``RolloutDisplay`` holds what is shown; ``ProGRPOProgressBar`` (tqdm)
and ``ProGRPORichProgressBar`` (rich) put it on their bar through its public API. The CLI swaps
Lightning's own bar, default or named, for the matching one (``with_rollout_display``); a bar of
another class is left as it is.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

#: the key under which the rollout's mean reward reaches the progress bar (``logs.log_rollout``)
REWARD_KEY = "reward/mean"


def steps_per_rollout(trainer: pl.Trainer, module: pl.LightningModule) -> int | None:
    """Optimizer steps one rollout takes on this rank (``UpdateSettings.optimizer_steps``), or None
    for a module or datamodule without the settings to count them."""
    data = getattr(trainer, "datamodule", None)
    settings, schedule, backend = (getattr(module, k, None) for k in ("settings", "schedule", "backend"))
    if not hasattr(settings, "optimizer_steps") or schedule is None or not hasattr(data, "prompts_per_step"):
        return None
    trainable = int(backend.trainable_steps().sum())
    return max(1, settings.optimizer_steps(int(data.prompts_per_step) * schedule.final_size, trainable))


def planned_rollouts(trainer: pl.Trainer, module: pl.LightningModule) -> int | None:
    """N, the rollouts this run will have done when it stops (None when nothing bounds it).

    ``max_steps`` counts optimizer steps: the rollouts still to come are the steps left over the
    optimizer steps one rollout takes (``steps_per_rollout``); a skipped step (a
    non-finite gradient) adds a rollout, so the figure is recomputed after every rollout.
    ``max_epochs`` bounds it by epochs of training batches (one batch is one rollout)."""
    limits = []
    per = steps_per_rollout(trainer, module)
    if trainer.max_steps is not None and trainer.max_steps > 0 and per is not None:
        left = max(0, trainer.max_steps - trainer.global_step)
        limits.append(int(getattr(module, "rollouts_done", 0)) + math.ceil(left / per))
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        limits.append(trainer.max_epochs * int(batches))
    return min(limits) if limits else None


class RolloutDisplay:
    """What a Pro-GRPO run's progress bar says (mixed into a Lightning progress bar class).

    The bar's count is rollouts done out of ``planned_rollouts``; its description
    ``rollout i/N`` and, while rollout i runs, ``step t/T, live R`` (the rows still sampling after
    the last pruning); its metrics the last rollout's mean reward and the last held-out total
    (``module.last_heldout``), without Lightning's ``v_num``.

    live: redraw inside a rollout (after every denoising step). None: when the bar's output is a
    terminal; a log file then gets only the bar's own per-rollout updates.
    """

    def __init__(self, live: bool | None = None) -> None:
        self.live = live
        self.step_text = ""  # "step t/T, live R" while a rollout runs

    # ---- what is shown ---------------------------------------------------------------------------
    def description(self, trainer: pl.Trainer, module: pl.LightningModule, running: bool) -> str:
        """``rollout i/N`` (i: the rollout in flight when ``running``, else the last one done)."""
        done = int(getattr(module, "rollouts_done", 0))
        total = planned_rollouts(trainer, module)
        i = done + 1 if running else done
        head = f"rollout {i}" if total is None else f"rollout {min(i, total)}/{total}"
        return f"{head} {self.step_text}" if running and self.step_text else head

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = dict(super().get_metrics(trainer, pl_module))  # type: ignore[misc]
        items.pop("v_num", None)
        reward = items.pop(REWARD_KEY, None)
        if reward is not None:
            items["reward"] = f"{float(reward):.3f}"
        held_out = getattr(pl_module, "last_heldout", None)
        if held_out is not None:
            items["held-out"] = f"{float(held_out):.3f}"
        return items

    # ---- hooks -----------------------------------------------------------------------------------
    def live_on(self) -> bool:
        return self.live if self.live is not None else self.output_is_terminal()

    def output_is_terminal(self) -> bool:
        raise NotImplementedError

    def show(self, description: str, completed: int, total: int | None, refresh: bool) -> None:
        """Put ``description`` and ``completed`` / ``total`` rollouts on the training bar."""
        raise NotImplementedError

    def show_progress(self, trainer: pl.Trainer, module: pl.LightningModule, running: bool,
                      refresh: bool = True) -> None:
        self.show(self.description(trainer, module, running), int(getattr(module, "rollouts_done", 0)),
                  planned_rollouts(trainer, module), refresh)

    def rollout_step(self, trainer: pl.Trainer, module: pl.LightningModule, step: int, num_steps: int,
                     live: int) -> None:
        """Called by the rollout after every denoising step (and its pruning): ``rollout_progress``."""
        self.step_text = f"step {step}/{num_steps}, live {live}"
        if self.is_enabled and self.live_on():  # type: ignore[attr-defined]
            self.show_progress(trainer, module, running=True)


class ProGRPOProgressBar(RolloutDisplay, TQDMProgressBar):
    """Lightning's tqdm bar with the rollout display (``RolloutDisplay``)."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 live: bool | None = None) -> None:
        TQDMProgressBar.__init__(self, refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        RolloutDisplay.__init__(self, live)
        self.bar_per_epoch = leave

    def output_is_terminal(self) -> bool:
        return sys.stdout.isatty()  # where Lightning's tqdm bars write

    def show(self, description: str, completed: int, total: int | None, refresh: bool) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.set_description(description, refresh=False)
        if bar.total != total or bar.n > completed:
            bar.reset(total=total)  # tqdm's own API: the count restarts from 0 ...
        bar.update(completed - bar.n)  # ... and moves to the rollouts done (redraws)
        if refresh:
            bar.refresh()

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar (its settings), whose first frame already reads ``rollout i/N``
        rather than ``Training: 0/?``."""
        module = self.trainer.lightning_module
        return Tqdm(desc=self.description(self.trainer, module, running=True),
                    total=planned_rollouts(self.trainer, module), initial=int(getattr(module, "rollouts_done", 0)),
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """In place of tqdm's ``Epoch k`` bar over the epoch's batches: the rollout count, which
        goes on across epochs (one epoch is one pass over the training prompts): the bar is reset
        only when the planned number changes (``show``), so its count and clock never restart."""
        if self.bar_per_epoch:
            self.train_progress_bar = self.init_train_tqdm()
        self.step_text = ""
        self.show_progress(trainer, pl_module, running=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """In place of tqdm's batch count within the epoch: rollouts done out of N, every
        ``refresh_rate`` rollouts and after the last."""
        self.step_text = ""
        done, total = int(getattr(pl_module, "rollouts_done", 0)), planned_rollouts(trainer, pl_module)
        if self.is_enabled and (done % self.refresh_rate == 0 or done == total):
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.show_progress(trainer, pl_module, running=False)


class ProGRPORichProgressBar(RolloutDisplay, RichProgressBar):
    """Lightning's rich bar with the rollout display (``RolloutDisplay``).

    Its first column shows the rollout text for the training task (``configure_columns``), and
    the training task is created with that text before Lightning resets it, so no frame shows
    Lightning's ``Epoch k/max_epochs - 1`` (``Epoch 0/-2`` in a run bounded by ``max_steps``)."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False,
                 theme: RichProgressBarTheme = RichProgressBarTheme(),
                 console_kwargs: dict[str, Any] | None = None, live: bool | None = None) -> None:
        RichProgressBar.__init__(self, refresh_rate=refresh_rate, leave=leave, theme=theme,
                                 console_kwargs=console_kwargs)
        RolloutDisplay.__init__(self, live)
        self.train_text = ""
        self.bar_per_epoch = leave

    def output_is_terminal(self) -> bool:
        return self.progress is not None and self.progress.console.is_terminal

    def configure_columns(self, trainer: pl.Trainer) -> list:
        from rich.progress import ProgressColumn
        from rich.text import Text

        bar = self

        class Description(ProgressColumn):
            """The task's description; the rollout text for the training task."""

            def render(self, task: Any) -> Text:
                if task.id == bar.train_progress_bar_id and bar.train_text:
                    return Text(bar.train_text, style="progress.description")
                return Text(task.description, style="progress.description")

        return [Description(), *super().configure_columns(trainer)[1:]]

    def show(self, description: str, completed: int, total: int | None, refresh: bool) -> None:
        self.train_text = description
        if self.progress is None or self.train_progress_bar_id is None:
            return
        self.progress.update(self.train_progress_bar_id, completed=completed,
                             total=float("inf") if total is None else total, description=description)
        if refresh:
            self.progress.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The training task counts rollouts across epochs (one epoch is one pass over the training
        prompts): after the first epoch it is left as it is, not reset by Lightning's hook, so its
        count and clock never restart (unless ``leave`` asks for a bar per epoch)."""
        self.step_text = ""
        self.train_text = self.description(trainer, pl_module, running=True)
        if self.train_progress_bar_id is not None and not self.bar_per_epoch:
            self.show_progress(trainer, pl_module, running=True)
            return
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            total = planned_rollouts(trainer, pl_module)
            self.train_progress_bar_id = self.progress.add_task(
                self.train_text, total=float("inf") if total is None else total,
                completed=int(getattr(pl_module, "rollouts_done", 0)))
        super().on_train_epoch_start(trainer, pl_module)
        self.show_progress(trainer, pl_module, running=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.step_text = ""
        self.show_progress(trainer, pl_module, running=False)


def with_rollout_display(bar: ProgressBar | None) -> ProgressBar | None:
    """The rollout-display twin of Lightning's own bar (exactly ``TQDMProgressBar`` or
    ``RichProgressBar``, Lightning's default or named in a config), with its public settings;
    any other bar (or None) unchanged."""
    if type(bar) is TQDMProgressBar:  # noqa: E721 (exactly Lightning's class, not a subclass)
        return ProGRPOProgressBar(refresh_rate=bar.refresh_rate, process_position=bar.process_position)
    if type(bar) is RichProgressBar:  # noqa: E721
        return ProGRPORichProgressBar(refresh_rate=int(bar.refresh_rate), theme=bar.theme)
    return bar


def rollout_progress(module: pl.LightningModule) -> Callable[[int, int, int, int], None] | None:
    """The rollout's per-step callback ``(step, num_steps, live, previews)``, or None when the run's
    progress bar shows no rollout display (or this is not rank 0)."""
    if module._trainer is None or module.global_rank != 0:
        return None
    trainer = module.trainer
    bar = trainer.progress_bar_callback
    if not isinstance(bar, RolloutDisplay):
        return None
    return lambda step, num_steps, live, previews: bar.rollout_step(trainer, module, step, num_steps, live)
