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

import difflib
import inspect
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable
from typing import Any, NoReturn

import lightning.pytorch as pl
from docstring_parser import parse as docstring_parse
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace, get_loader, set_loader
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple, SaveConfigCallback
from torch.optim import Optimizer

from .checkpointing import check_checkpoint_weights, load_checkpoint_file, migrate_config
from .data import PromptDataModule
from .errors import ConfigError, OutputError, RewardError
from .health import NonFiniteError
from .module import ProGRPOModule
from .predict import PredictionWriter
from .progress import with_rollout_display

#: LightningCLI's subcommands (a parse error may name one as the group of a key)
SUBCOMMANDS = ("fit", "validate", "test", "predict")

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
        if self.already_saved or stage == "predict":  # predict writes beside its weights (predict.py), no run folder
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
    """``LightningCLI`` plus the checks that must come before any weights load.

    ``options``: a command built on a run's settings (``plan``, ``adapt``) adds its own settings,
    a callable's (a dataclass's) arguments (``add_options``), beside fit's: one parser, one
    ``--config`` (the run's YAML, which may hold them too), one ``--print_config``."""

    def __init__(self, *args: Any, options: Callable[..., Any] | None = None, **kwargs: Any) -> None:
        self.options = options
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's; with ``exit_on_error=False`` a parse error is a one-line ``ConfigError``
        naming the nearest valid setting (``OneLineMessages``), for ``run_main`` to print."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            if _debug() or not isinstance(parser, OneLineMessages):
                raise
            raise ConfigError(parser.one_line(str(err))) from None

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser; the main parser and every subcommand's share one list of all of them,
        so a parse error anywhere can suggest any valid key (``OneLineErrors``)."""
        if not hasattr(self, "parsers"):
            self.parsers: list[LightningArgumentParser] = []
        parser = super().init_parser(related=self.parsers, **kwargs)
        self.parsers.append(parser)
        return parser

    def _parse_ckpt_path(self) -> None:
        """Open ``--ckpt_path`` safely first (one line for a missing, empty, truncated, corrupted,
        unsafe or non-finite file). Unlike Lightning's own CLI, nothing of the checkpoint enters the
        config: its hyperparameters could name classes to import, and on resume they would silently
        replace the command line's settings (``_before_run`` compares them instead)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        self._ckpt_state = None
        if ckpt and str(ckpt) not in _SPECIAL_CKPT:
            self._ckpt_state = load_checkpoint_file(str(ckpt))
            check_checkpoint_weights(self._ckpt_state, f"ckpt_path={str(ckpt)!r}")

    def _before_run(self) -> None:
        sub = self.subcommand
        model, data = self.model, self.datamodule
        if isinstance(model, ProGRPOModule):
            if isinstance(data, PromptDataModule) and sub == "predict":
                data.predict_set()  # no prompts: one line before any weights load
            cfg = self.config[sub]
            model.set_run_config(self._parser(sub).dump(cfg, skip_none=False))
            ckpt, state = cfg.get("ckpt_path"), getattr(self, "_ckpt_state", None)
            if ckpt is not None and str(ckpt) == "last":  # Lightning opens it only after the base weights load
                ckpt = last_checkpoint(self.trainer)
                state = None if ckpt is None else load_checkpoint_file(ckpt)
                if state is not None:
                    check_checkpoint_weights(state, f"ckpt_path={ckpt!r}")
            if state is not None:
                check_checkpoint(model, state, str(ckpt), sub, model.run_config)
        if sub == "predict":
            for cb in self.trainer.callbacks:
                if isinstance(cb, PredictionWriter):  # an occupied or unwritable output: before any weights
                    cb.resolve_output(self.trainer, self.config[sub].get("ckpt_path"))
                    if isinstance(model, ProGRPOModule):
                        cb.check_lora(model.backend)

    before_fit = before_validate = before_test = before_predict = _before_run

    def before_instantiate_classes(self) -> None:
        """The top-level ``optimizer`` / ``lr_scheduler`` (LightningCLI's spelling, the configs')
        become the module's ``optimizer`` / ``lr_scheduler``: built over the trainable parameters
        (``backend.trainable_parameters()``) once the weights load, not over ``model.parameters()``
        when the CLI starts (empty then). ``model.optimizer`` is the same setting; both given and
        different is one line naming both. ``predict`` runs without a logger: it writes beside what it
        loads, not into a new logger version."""
        if self.subcommand == "predict":
            self.config["predict"]["trainer"]["logger"] = False
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        defaults = self._parser(self.subcommand).get_defaults() if self.subcommand else self.parser.get_defaults()
        for key in ("optimizer", "lr_scheduler"):
            top, nested, default = cfg.get(key), cfg.get(f"model.{key}"), defaults.get(f"model.{key}")
            if top is None:
                continue
            if nested is not None and nested != default and nested != top:
                raise ConfigError(f"{key}={_class_name(top)} and model.{key}={_class_name(nested)}: give one of the two "
                                  f"(the configs use `{key}`)")
            cfg[f"model.{key}"] = top

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's trainer; the progress bar Lightning picked by default (rich or tqdm) becomes its
        twin with the rollout display (``progress.with_rollout_display``). A bar the config names
        is kept as it is."""
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        named = cfg.get("trainer.callbacks") or []  # before the Trainer appends its defaults to this list
        named = any(isinstance(cb, ProgressBar) for cb in (named if isinstance(named, list) else [named]))
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if bar is not None and not named:
            trainer.callbacks[trainer.callbacks.index(bar)] = with_rollout_display(bar)
        return trainer

    def add_arguments_to_parser(self, parser: Any) -> None:
        # ``predict`` writes its images through this callback: ``--prediction.output_dir``,
        # ``--prediction.lora_path`` (it does nothing in the other subcommands).
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        # LightningCLI's own ``--optimizer`` / ``--lr_scheduler`` groups; ``before_instantiate_classes``
        # hands them to the module (``auto_configure_optimizers=False``: Lightning would build them
        # over ``model.parameters()``, which hold no LoRA weights before ``configure_model``).
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        if self.options is not None:
            add_options(parser, self.options)


def _class_name(value: Any) -> str:
    path = value.get("class_path") if hasattr(value, "get") else None
    return str(path or value).rsplit(".", 1)[-1]


class OneLineMessages:
    """What every parser of the package says on bad input: one line, and for a key that does not
    exist the nearest valid one (``--model.update.clip_rnge`` answers ``did you mean
    model.update.clip_range?``). Mixed into Lightning's parser (``OneLineErrors``: fit, validate,
    test, predict) and into jsonargparse's (``CommandParser``: export, serve-reward)."""

    _UNKNOWN = [
        re.compile(r"unrecognized arguments: --?(?P<key>[\w.\-]+)"),
        re.compile(r"(?:Group|Subcommand) '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
        re.compile(r'Parser key "(?P<group>[\w.]+)":\s*Problem with given class_path \'(?P<cls>[\w.]+)\':'
                   r"\s*Option '(?P<key>[\w.]+)' is not accepted"),
        re.compile(r"Option '(?P<key>[\w.]+)' is not accepted"),  # a key of a command's --config file
    ]

    def one_line(self, message: str) -> str:
        text = " ".join(message.split())
        for pattern in self._UNKNOWN:
            m = pattern.search(text)
            if m is None:
                continue
            found = m.groupdict()
            if found.get("group") in SUBCOMMANDS:  # "Subcommand 'fit' does not accept option 'model.x'"
                found["group"] = None
            key = ".".join(k for k in (found.get("group"), "init_args" if found.get("cls") else None, found["key"]) if k)
            valid = self.valid_keys(found.get("cls"))
            if found.get("cls"):
                valid = [f"{found['group']}.init_args.{k}" for k in valid]
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else " (see --help)"
            return f"unknown setting {key}{hint}"
        return self._wrong_type(text) or text

    _TYPE = re.compile(r'^Parser key "(?P<key>[\w.]+)":\s*(?:Expected a (?P<one>.+?)\. Got value: (?P<got>.+)'
                       r"|Does not validate against any of the Union subtypes Subtypes: \[(?P<any>.+?)\] Errors:.*"
                       r"Given value: (?P<given>.+))$")

    def _wrong_type(self, text: str) -> str | None:
        """jsonargparse's "Parser key "port": Expected a <class 'int'>. Got value: x" as
        ``port=x: expected int`` (the Union's subtypes for an Optional)."""
        m = self._TYPE.match(text)
        if m is None:
            return None
        types = m["one"] or m["any"]
        types = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", types).replace("NoneType", "None").replace("typing.", "")
        return f"{m['key']}={(m['got'] or m['given']).strip()}: expected {types.replace(', None', ' or None')}"

    def valid_keys(self, class_path: str | None = None) -> list[str]:
        """Every setting this parser (and its subcommands') accepts, dotted; with ``class_path`` (a
        class the config named and jsonargparse imported), that class's constructor arguments."""
        if class_path:
            module, _, name = class_path.rpartition(".")
            cls = getattr(sys.modules.get(module), name, None)
            return [] if cls is None else [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        keys = set()
        for parser in getattr(self, "related", None) or [self]:
            for key in parser.get_defaults().keys():
                first, _, rest = key.partition(".")
                keys.add(rest if first in SUBCOMMANDS and rest else key)
        return sorted(keys - {"config", "__default_config__"})


#: jsonargparse's YAML loader with renamed settings read under their new names
#: (``checkpointing.migrate_config``): the parser mode of Lightning's parsers here.
MIGRATING_YAML = "yaml_with_renames"
set_loader(MIGRATING_YAML, lambda text: migrate_config(get_loader("yaml")(text), "a YAML file"))


class OneLineErrors(OneLineMessages, LightningArgumentParser):
    """Lightning's parser with a parse error in one line, ``error: <what>`` (exit status 2), without
    the usage (``OneLineMessages``), reading YAML with renamed settings migrated (``MIGRATING_YAML``).
    ``PRO_GRPO_DEBUG=1``: jsonargparse's own output."""

    def __init__(self, *args: Any, related: list[LightningArgumentParser] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("parser_mode", MIGRATING_YAML)
        super().__init__(*args, **kwargs)
        self.related = related  # every parser of the CLI (``ProGRPOCLI.init_parser``)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or _debug():
            super().error(message, ex)
        sys.stderr.write(f"error: {self.one_line(message)}\n")
        self.exit(2)


def _debug() -> bool:
    return os.environ.get("PRO_GRPO_DEBUG", "") not in ("", "0")


class CommandParser(OneLineMessages, ArgumentParser):
    """The parser of a command beside Lightning's (``export``, ``serve-reward``), built like
    ``fit``'s: its options are the arguments of the function that does the work, typed and
    described by its signature and docstring (``add_options``); ``--config file.yaml``
    holds any of them, ``--print_config`` prints them as such a file. A bool argument is a flag
    (``--merge``, ``--merge false``, ``--no_merge``). A parse error is a ``ConfigError`` in one line
    naming the setting (``cli.run_main``: ``error: ...``, exit status 2)."""

    def __init__(self, function: Callable[..., Any], prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, exit_on_error=False)
        self.add_argument("--config", action=ActionConfigFile, help="a YAML file of these settings (as "
                          "--print_config writes it); later options override it")
        add_options(self, function)

    def parse(self, argv: list[str] | None) -> Namespace:
        try:
            return self.parse_args(argv)
        except ArgumentError as err:
            if _debug():
                raise
            raise ConfigError(f"{self.prog}: {self.one_line(str(err))}") from None


def add_options(parser: ArgumentParser, function: Callable[..., Any]) -> None:
    """``function``'s arguments (a function's or a dataclass's) as top-level options of ``parser``,
    typed by its signature and described by its docstring's ``Args``; a bool argument is a flag
    (``--merge``, ``--merge false``, ``--no_merge``), as a command's switches were before."""
    params = inspect.signature(function).parameters
    flags = {name for name, p in params.items() if p.annotation in (bool, "bool")}
    if isinstance(function, type):
        parser.add_class_arguments(function, as_group=False, skip=flags)
    else:
        parser.add_function_arguments(function, as_group=False, skip=flags)
    docs = {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parse(function.__doc__ or "").params}
    for name in sorted(flags, key=list(params).index):
        parser.add_argument(f"--{name}", action=ActionYesNo, nargs="?", default=params[name].default, help=docs.get(name))


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The file ``ckpt_path="last"`` names: the newest ``last*.ckpt`` of the trainer's checkpoint
    folders (a ``ModelCheckpoint``'s ``dirpath``, else ``<log_dir>/checkpoints``), as Lightning picks
    it, so it can be checked before the base weights load; None when there is none."""
    found = []
    for cb in trainer.checkpoint_callbacks:
        folder = getattr(cb, "dirpath", None) or (os.path.join(trainer.log_dir, "checkpoints")
                                                  if trainer.logger is not None and trainer.log_dir else None)
        if folder and os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in os.listdir(folder)
                      if n.startswith("last") and n.endswith(".ckpt")]
    return max(found, key=os.path.getmtime) if found else None


def check_checkpoint(model: ProGRPOModule, state: dict[str, Any], ckpt: str, sub: str, run_config: str) -> None:
    """A checkpoint against this run, before any weights load: it must carry this package's record
    (unless ``guards.allow_foreign_checkpoint``) and the same identity; resuming (``fit``) also
    compares every setting with the checkpoint's config: the ones that may change are stated and
    applied, the rest refused in one line (``checkpointing.resume_changes``)."""
    import yaml

    from .checkpointing import resume_changes

    extra = state.get("pro_grpo")
    if not extra and not model.guards.allow_foreign_checkpoint:
        raise ConfigError(f"ckpt_path={ckpt!r}: has no pro_grpo record (run identity, rollout counter, config): not "
                          f"written by this package, so nothing about it can be checked; to use it anyway: "
                          f"--model.guards.allow_foreign_checkpoint true")
    extra = extra or {}
    identity = dict(extra.get("identity") or {})
    identity.setdefault("schedule", extra.get("schedule"))  # older checkpoints
    if identity["schedule"] is None:
        identity.pop("schedule")
    model.check_identity(identity, f"ckpt_path={ckpt!r}", resume=sub == "fit")
    if sub != "fit" or not extra.get("config"):
        return
    saved = migrate_config(yaml.safe_load(extra["config"]) or {}, f"ckpt_path={ckpt!r} (its stored config)")
    applied, refused = resume_changes(saved, yaml.safe_load(run_config) or {},
                                      model.guards.allow_schedule_change)
    if refused:
        more = f" (and {len(refused) - 1} more: {'; '.join(refused[1:])})" if len(refused) > 1 else ""
        raise ConfigError(f"ckpt_path={ckpt!r}: resuming would change {refused[0]}{more}; these settings cannot "
                          f"change on resume (README, 'Resuming a run'): use the checkpoint's values or start a "
                          f"new run")
    if applied:
        print(f"resume from {ckpt}: applying {len(applied)} changed setting(s): {'; '.join(applied)}", file=sys.stderr)


def main(args: list[str] | None = None, run: bool = True, save_config: bool = True,
         exit_on_error: bool = True, options: Callable[..., Any] | None = None,
         description: str | None = None, prog: str | None = None) -> LightningCLI:
    """The CLI; ``run=False`` only builds the module, datamodule and trainer (scripts, benchmarks,
    ``plan``, ``adapt``). ``save_config=False`` keeps ``fit`` from writing the resolved config.yaml
    (runs without a logger). ``exit_on_error=False``: a settings error raises a one-line
    ``ConfigError`` instead of printing it and exiting (for ``run_main``). ``options`` and
    ``description``, ``prog``: a command's own settings beside the run's, what ``--help`` says of it
    and its name (``ProGRPOCLI``; with ``run=False``)."""
    parser_kwargs: dict[str, Any] = {} if exit_on_error else {"exit_on_error": False}
    parser_kwargs.update({k: v for k, v in (("description", description), ("prog", prog)) if v})
    return ProGRPOCLI(ProGRPOModule, PromptDataModule, args=args, run=run, parser_class=OneLineErrors,
                      auto_configure_optimizers=False, save_config_callback=RunConfig if save_config else None,
                      parser_kwargs=parser_kwargs, options=options)


#: errors that are about the user's settings or files: one line, exit status 2
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, UnicodeDecodeError, ArgumentError)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    own = (ConfigError, NonFiniteError, RewardError, OutputError)  # their messages name the field or the reward
    return text if isinstance(err, own) else f"{type(err).__name__}: {text}"


def run_main(fn: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run ``fn(argv)``; a settings/file error, a non-finite stop, a failing reward (or reward server)
    or an unwritable output becomes one ``error: ...`` line on stderr and exit status 2 (settings)
    or 1 (the run stopped). ``PRO_GRPO_DEBUG=1``: full traceback."""
    from .outputs import RUN_KEPT, output_error

    try:
        try:
            fn(argv)
        except OSError as err:  # a write that failed (full disk, read-only folder): OutputError's one line
            if isinstance(err, USER_ERRORS) or not err.filename:
                raise
            raise output_error(err, str(err.filename), RUN_KEPT) from err
    except (*USER_ERRORS, NonFiniteError, RewardError, OutputError) as err:
        if _debug():
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1 if isinstance(err, (NonFiniteError, RewardError, OutputError)) else 2
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
