"""An exponential moving average (EMA) of the trained weights, as a Lightning callback.

    trainer:
      callbacks:
        - class_path: pro_grpo_lightning.ema.EMA
          init_args: {decay: 0.999, start_step: 0}

Only the trainable weights are averaged (the LoRA adapter, or the whole denoiser with
``finetune: full``), never the frozen base: one float32 copy of what the optimizer trains
(Lightning's ``EMAWeightAveraging`` copies the whole module, frozen base included).

After every optimizer step past ``start_step`` (``trainer.global_step`` counts them), every
``update_every`` steps: ``ema = decay * ema + (1 - decay) * weights``; up to ``start_step`` the
EMA equals the weights. The update runs at the end of each rollout: with several optimizer steps
per rollout (``inner_epochs`` / ``minibatches_per_step``) it sees the weights after the rollout's
last step. Under DDP every rank holds the same weights, so every rank's EMA is the same without
any communication.

The EMA lives in the checkpoint (the callback's state: resuming continues it exactly) and is
swapped into the module (``EMA.swapped``) for:
    - held-out evaluation (``use_for_eval``): with ``eval_both`` the raw weights are logged as
      ``val/*`` / ``test/*`` as always and the EMA weights as ``val_ema/*`` / ``test_ema/*``
      (a second pass over the held-out set); without it ``val/*`` / ``test/*`` are the EMA's;
    - ``predict`` and the sample grids logged during training (``use_for_eval``);
    - the ``ExportLoRA`` callback's export (``export``); ``python -m pro_grpo_lightning.export
      --ema`` exports a checkpoint's EMA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


def trainable_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The weights the optimizer trains, by name (what the EMA averages)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class EMA(pl.Callback):
    """EMA of the trainable weights; see the module docstring.

    Args:
        decay: weight of the old average per update, in [0, 1).
        start_step: optimizer steps before averaging starts (until then the EMA equals the weights).
        update_every: update the EMA every this many optimizer steps.
        use_for_eval: held-out evaluation, ``predict`` and the sample grids use the EMA weights.
        eval_both: with ``use_for_eval``, evaluate both: raw as ``val/*``, EMA as ``val_ema/*``.
        export: ``ExportLoRA`` exports the EMA weights instead of the raw ones.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, update_every: int = 1,
                 use_for_eval: bool = True, eval_both: bool = True, export: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.decay, self.start_step, self.update_every = float(decay), int(start_step), int(update_every)
        self.use_for_eval, self.eval_both, self.export = use_for_eval, eval_both, export
        self.shadow: dict[str, Tensor] = {}  # name -> float32 average, on the weights' device
        self.updated_at = -1  # trainer.global_step of the last update (-1: never)
        self._swapped = False
        self._stack: contextlib.ExitStack | None = None

    # ---- the average ----------------------------------------------------------------------------
    def tracked_weights(self, module: nn.Module, step: int = 0) -> dict[str, nn.Parameter]:
        """The module's trainable weights; the EMA starts as a copy of them if it does not exist."""
        params = trainable_weights(module)
        if not self.shadow:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
            self.updated_at = step
            return params
        if set(self.shadow) != set(params):
            missing = sorted(set(params) ^ set(self.shadow))
            raise KeyError(f"EMA state does not match the trainable weights (e.g. {missing[0]}): "
                           f"was it saved by another backend or fine-tuning mode?")
        for n, p in params.items():
            if self.shadow[n].device != p.device:
                self.shadow[n] = self.shadow[n].to(p.device)
        return params

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Fold the weights after optimizer step ``step`` into the average (see the class docstring)."""
        params = self.tracked_weights(module, step)
        if step <= self.start_step:
            for n, p in params.items():
                self.shadow[n].copy_(p.detach())
        elif step - self.updated_at >= self.update_every:
            for n, p in params.items():  # ema += (1 - decay) * (w - ema)
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)
        else:
            return
        self.updated_at = step

    @contextlib.contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        """Inside the block the module's trainable weights are the EMA's; restored exactly after."""
        if self._swapped:  # already in (e.g. sample grids inside an EMA evaluation)
            yield
            return
        params = self.tracked_weights(module)
        raw = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        self._swapped = True
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(raw[n])
            self._swapped = False

    # ---- Lightning hooks -------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tracked_weights(pl_module, trainer.global_step)  # the average starts at the initial (or resumed) weights

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step != self.updated_at:  # a rollout that stepped the optimizer
            self.update(pl_module, trainer.global_step)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.swapped(pl_module))

    def _swap_out(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_for_eval and not self.eval_both:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    on_test_start = on_validation_start
    on_test_end = on_validation_end

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_for_eval:
            self._swap_in(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks run before the module's hook: the raw rows wait while the EMA pass logs.
        if self.use_for_eval and self.eval_both and not trainer.sanity_checking:
            self._evaluate_ema(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_for_eval and self.eval_both:
            self._evaluate_ema(trainer, pl_module, "test", trainer.test_dataloaders)

    def _evaluate_ema(self, trainer: pl.Trainer, pl_module: Any, stage: str, dataloaders: Any) -> None:
        """The module's held-out evaluation once more with the EMA weights, logged as ``<stage>_ema/*``."""
        if not hasattr(pl_module, "evaluate") or dataloaders is None:
            return
        loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        # under DDP: this rank's shard, as in the loop itself
        batches = (trainer.strategy.batch_to_device(batch, dataloader_idx=i)
                   for i, loader in enumerate(loaders) for batch in loader)
        with self.swapped(pl_module), torch.no_grad():
            pl_module.evaluate(batches, f"{stage}_ema")

    # ---- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {n: t.detach().clone() for n, t in self.shadow.items()}, "updated_at": self.updated_at,
                "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = {n: t.float().clone() for n, t in state_dict["shadow"].items()}
        self.updated_at = int(state_dict["updated_at"])


def find_ema(module: Any, purpose: str = "eval") -> EMA | None:
    """The trainer's EMA callback if it asks to be used for ``purpose`` ("eval" or "export")."""
    trainer = getattr(module, "_trainer", None)
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, EMA) and (cb.use_for_eval if purpose == "eval" else cb.export):
            return cb
    return None


def ema_weights(module: Any, purpose: str = "eval") -> contextlib.AbstractContextManager:
    """The EMA weights swapped in for ``purpose`` when an EMA callback asks for it, else nothing."""
    ema = find_ema(module, purpose)
    return ema.swapped(module) if ema is not None else contextlib.nullcontext()


def load_ema_into(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Copy the EMA weights a training checkpoint carries into the module's trainable weights."""
    states = [s for s in (checkpoint.get("callbacks") or {}).values() if isinstance(s, dict) and "shadow" in s]
    if not states:
        raise KeyError("the checkpoint carries no EMA weights (was the run's EMA callback on?)")
    ema = EMA()
    ema.load_state_dict(states[0])
    params = ema.tracked_weights(module)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ema.shadow[n])
