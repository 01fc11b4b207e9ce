"""``python -m pro_grpo_lightning fit --config configs/X.yaml``: Lightning's own CLI.

The backend, the rewards and the schedule are ``class_path`` blocks in the YAML; every other
setting is a typed argument of ``ProGRPOModule`` / ``PromptDataModule`` / ``Trainer`` (see
``--help`` and ``--print_config``). ``main(args)`` is importable so tests drive the CLI in-process.

Before any weights load, every subcommand checks what is cheap to check: the prompts against
rewards that parse them, and a ``--ckpt_path`` (readable, finite, same backend / LoRA / schedule /
optimizer as this run; ``checkpointing.py``). Each run writes its resolved config as
``config.yaml`` beside its own checkpoints, never over another run's (``RunConfig``), and the
config also travels inside every checkpoint, which is what ``export`` reads by default.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .checkpointing import check_checkpoint_finite, load_checkpoint_file
from .data import PromptDataModule
from .errors import ConfigError
from .health import NonFiniteError
from .logs import ProGRPOProgressBar
from .module import ProGRPOModule
from .predict import PredictionWriter

#: ``ckpt_path`` values Lightning resolves itself (no file to check up front).
_SPECIAL_CKPT = {"last", "best", "hpc", "registry"}


def _free_name(directory: str, stem: str, ext: str) -> str:
    """``stem.ext`` if free in ``directory``, else ``stem-v1.ext``, ``stem-v2.ext``, ..."""
    name, n = f"{stem}{ext}", 0
    while os.path.exists(os.path.join(directory, name)):
        n += 1
        name = f"{stem}-v{n}{ext}"
    return name


def _next_version_dir(root: str) -> str:
    """``<root>/version_<N>`` with N one past the highest existing version."""
    versions = [int(m.group(1)) for d in (os.listdir(root) if os.path.isdir(root) else [])
                if (m := re.fullmatch(r"version_(\d+)", d))]
    return os.path.join(root, f"version_{max(versions, default=-1) + 1}")


class RunConfig(SaveConfigCallback):
    """Writes the run's resolved config beside the run's own checkpoints and never overwrites one.

    With a logger: ``<logger's version folder>/config.yaml`` (each run gets a fresh version
    folder; ``config-v1.yaml`` ... if a config is already there, e.g. a fixed ``version``).
    Without a logger: a fresh ``<default_root_dir>/version_<N>/`` holds ``config.yaml`` and, for
    every ``ModelCheckpoint`` without a ``dirpath``, the ``checkpoints/`` folder.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.logger is not None:
            run_dir = trainer.log_dir  # a collective under DDP: every rank calls it
        else:
            run_dir = _next_version_dir(trainer.default_root_dir) if trainer.is_global_zero else None
            run_dir = trainer.strategy.broadcast(run_dir)
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                    cb.dirpath = os.path.join(run_dir, "checkpoints")
        if trainer.is_global_zero:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, _free_name(run_dir, "config", ".yaml"))
            self.parser.save(self.config, path, skip_none=False, overwrite=False, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class ProGRPOCLI(LightningCLI):
    """``LightningCLI`` plus the checks that must come before any weights load."""

    def _parse_ckpt_path(self) -> None:
        """Open ``--ckpt_path`` safely first (one line for a missing, empty, truncated, unsafe or
        non-finite file), then let Lightning read the hyperparameters from it as usual."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        self._ckpt_state = None
        if ckpt and str(ckpt) not in _SPECIAL_CKPT:
            self._ckpt_state = load_checkpoint_file(str(ckpt))
            check_checkpoint_finite(self._ckpt_state, f"ckpt_path={str(ckpt)!r}")
        super()._parse_ckpt_path()

    def _before_run(self) -> None:
        sub = self.subcommand
        model, data = self.model, self.datamodule
        if isinstance(model, ProGRPOModule):
            if isinstance(data, PromptDataModule) and sub == "predict":
                data.predict_set()  # no prompts: one line before any weights load
            cfg = self.config[sub]
            model.set_run_config(self._parser(sub).dump(cfg, skip_none=False))
            ckpt, state = cfg.get("ckpt_path"), getattr(self, "_ckpt_state", None)
            if state is not None:  # opened and checked in _parse_ckpt_path
                extra = state.get("pro_grpo") or {}
                identity = dict(extra.get("identity") or {})
                identity.setdefault("schedule", extra.get("schedule"))  # older checkpoints
                if identity["schedule"] is None:
                    identity.pop("schedule")
                model.check_identity(identity, f"ckpt_path={str(ckpt)!r}", resume=sub == "fit")

    before_fit = before_validate = before_test = before_predict = _before_run

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's trainer; its default progress bar becomes ``ProGRPOProgressBar`` (updates out of
        ``max_steps``, the rollout's steps inside it). A bar the config names is kept as it is."""
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar:  # noqa: E721 (exactly Lightning's default, not a subclass)
            trainer.callbacks[trainer.callbacks.index(bar)] = ProGRPOProgressBar(refresh_rate=bar.refresh_rate)
        return trainer

    def add_arguments_to_parser(self, parser: Any) -> None:
        # ``predict`` writes its images through this callback: ``--prediction.output_dir``,
        # ``--prediction.lora_path`` (it does nothing in the other subcommands).
        parser.add_lightning_class_args(PredictionWriter, "prediction")


def main(args: list[str] | None = None, run: bool = True, save_config: bool = True,
         exit_on_error: bool = True) -> LightningCLI:
    """The CLI; ``run=False`` only builds the module, datamodule and trainer (scripts, benchmarks).
    ``save_config=False`` keeps ``fit`` from writing the resolved config.yaml (runs without a logger).
    ``exit_on_error=False``: a settings error raises ``argparse.ArgumentError`` instead of printing
    the usage and exiting (the plan turns it into one line)."""
    kwargs = {} if exit_on_error else {"parser_kwargs": {"exit_on_error": False}}
    return ProGRPOCLI(ProGRPOModule, PromptDataModule, args=args, run=run,
                      save_config_callback=RunConfig if save_config else None, **kwargs)


#: errors that are about the user's settings or files: one line, exit status 2
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, UnicodeDecodeError, argparse.ArgumentError)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ConfigError, NonFiniteError)) else f"{type(err).__name__}: {text}"


def run_main(fn: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run ``fn(argv)``; a settings/file error, a non-finite stop or an unusable reward server becomes
    one ``error: ...`` line on stderr and exit status 2 (settings) or 1 (the run stopped).
    ``PRO_GRPO_DEBUG=1``: full traceback."""
    from .rewards.remote import RemoteRewardError

    try:
        fn(argv)
    except (*USER_ERRORS, NonFiniteError, RemoteRewardError) as err:
        if os.environ.get("PRO_GRPO_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1 if isinstance(err, (NonFiniteError, RemoteRewardError)) else 2
    return 0


#: ``pro-grpo <command> ...`` beside Lightning's own (fit, validate, test, predict): command ->
#: (module, function taking argv), each with its own ``--help``.
COMMANDS = {"plan": ("pro_grpo_lightning.plan.report", "run"),
            "adapt": ("pro_grpo_lightning.adaptive", "main"),
            "export": ("pro_grpo_lightning.export", "main"),
            "serve-reward": ("pro_grpo_lightning.reward_server", "main")}


def command_main(argv: list[str]) -> int:
    """``pro-grpo`` and ``python -m pro_grpo_lightning`` alike: a command of ``COMMANDS`` or
    Lightning's CLI, with one-line errors (``run_main``); returns the exit status."""
    if argv[:1] and argv[0] in COMMANDS:
        import importlib

        module, name = COMMANDS[argv[0]]
        return run_main(getattr(importlib.import_module(module), name), argv[1:])
    # Lightning reads the process's own arguments itself (it warns when given a copy of them)
    return run_main(lambda args: main(args), None if argv == sys.argv[1:] else argv)


def console_main() -> None:
    """The ``pro-grpo`` console script (``command_main`` on the process's arguments)."""
    sys.exit(command_main(sys.argv[1:]))
