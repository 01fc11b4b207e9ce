"""What a user sees on the console: the progress display of a tiny run under Lightning's default
(rich) bar and under tqdm, LightningCLI's ``--optimizer`` / ``--lr_scheduler`` next to
``--model.optimizer``, one-line parse errors naming the nearest valid key, a description for every
setting of ``fit --help`` and for every argument of every shipped backend, reward and schedule
(``--model.backend.help <class>``), every shipped reward listed, and an overlay that adds callbacks."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

import pro_grpo_lightning.backends as backends_pkg
import pro_grpo_lightning.rewards as rewards_pkg
from cli_runs import ROOT, config_args
from pro_grpo_lightning import schedules
from pro_grpo_lightning.backends.base import DiffusionBackend
from pro_grpo_lightning.cli import main, run_main
from pro_grpo_lightning.progress import ProGRPOProgressBar, ProGRPORichProgressBar, with_rollout_display
from pro_grpo_lightning.rewards.base import Reward
from pro_grpo_lightning.schedules import GroupSchedule

TINY = str(ROOT / "configs/tiny_sd15.yaml")
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")

RUN = """\
trainer:
  max_steps: 2
  enable_progress_bar: true
  num_sanity_val_steps: -1
{callbacks}
data:
  prompts: colors
  prompts_per_step: 2
  val_prompts: [a cat]
  eval_images_per_prompt: 1
"""
TQDM_BAR = """\
  callbacks:
    - class_path: pro_grpo_lightning.progress.ProGRPOProgressBar
      init_args: {{live: true}}
"""


#: two training prompts, two a rollout: each rollout is an epoch of its own
TWO_EPOCHS = ["--data.prompts=[a red square, a blue circle]"]


def screen(text: str) -> str:
    """What the terminal showed, as lines: ANSI codes dropped, carriage returns as line breaks."""
    return ANSI.sub("", text).replace("\r", "\n")


def check_rollout_display(text: str) -> None:
    # 2 rollouts of T = 4 steps; 2 prompts x 4 trajectories, pruned to 2 each after step index 1
    assert "rollout 1/2 step 1/4, live 8" in text and "rollout 1/2 step 2/4, live 4" in text
    assert "rollout 2/2 step 4/4, live 4" in text
    assert "Epoch" not in text and "/-" not in text  # no "Epoch 0/-2" of a max_steps run


def test_rich_bar_shows_rollouts_steps_reward_and_held_out(tmp_path):
    """``python -m pro_grpo_lightning fit`` as a user runs it, its console captured as a terminal
    shows it: Lightning's own choice (rich is installed) becomes its twin with the rollout display;
    none of the package's own noise (the eval-mode module warning)."""
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "pro_grpo_lightning", "fit",
                          *config_args(tmp_path, "rich", RUN.format(callbacks="")), *TWO_EPOCHS],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = screen(run.stdout)
    check_rollout_display(text)
    # two prompts, two a rollout: rollout 2 is the second epoch; the count and the clock go on
    frames = [ln for ln in text.splitlines() if ln.startswith("rollout")]
    counts = [int(m.group(1)) for m in (re.search(r" (\d)/2 ", ln) for ln in frames) if m]
    clock = [m.group(0) for m in (re.search(r"\d+:\d\d:\d\d", ln) for ln in frames) if m]
    assert counts == sorted(counts) and clock == sorted(clock), (counts, clock)
    last = [ln for ln in text.splitlines() if ln.startswith("rollout 2/2")][-1]
    assert " 2/2 " in last and re.search(r"reward: 0\.\d{3}", last) and re.search(r"held-out: 0\.\d{3}", last), last
    assert "v_num" not in text
    assert "in eval mode" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]


def test_tqdm_bar_shows_the_same(tmp_path, capsys):
    """Two prompts, two a rollout: every rollout is an epoch of its own, and the count and the
    clock go on across the epoch boundary (no frame back at 0/2 after rollout 1)."""
    cli = main(["fit", *config_args(tmp_path, "tqdm", RUN.format(callbacks=TQDM_BAR)), *TWO_EPOCHS])
    assert type(cli.trainer.progress_bar_callback) is ProGRPOProgressBar  # named: kept as it is
    assert cli.trainer.current_epoch == 2  # the run crossed an epoch boundary
    text = screen(capsys.readouterr().out)
    check_rollout_display(text)
    frames = [ln for ln in text.splitlines() if ln.startswith("rollout")]
    assert "Training:" not in text  # the training bar's first frame already counts rollouts
    counts = [int(re.search(r" (\d)/2 \[", ln).group(1)) for ln in frames]
    assert counts[0] == 0 and counts[-1] == 2 and counts == sorted(counts), counts  # never back to 0/2
    last = frames[-1]
    assert "2/2 [" in last and re.search(r"reward=0\.\d{3}", last) and re.search(r"held-out=0\.\d{3}", last), last


def test_lightnings_default_bars_get_the_rollout_display():
    assert type(with_rollout_display(TQDMProgressBar(refresh_rate=3))) is ProGRPOProgressBar
    assert with_rollout_display(TQDMProgressBar(refresh_rate=3)).refresh_rate == 3
    assert type(with_rollout_display(RichProgressBar())) is ProGRPORichProgressBar
    own = ProGRPOProgressBar()
    assert with_rollout_display(own) is own and with_rollout_display(None) is None


# ---- --optimizer / --lr_scheduler ---------------------------------------------------------------
STEPS = ["--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--model.samples.every_n_rollouts=0"]


def test_top_level_optimizer_and_lr_scheduler_train_the_lora_weights(tmp_path):
    """LightningCLI's spelling (the configs'): SGD over exactly the trainable parameters, the
    scheduler stepped after each optimizer step."""
    cli = main(["fit", "--config", TINY, *STEPS, f"--trainer.default_root_dir={tmp_path}",
                "--optimizer", "SGD", "--optimizer.lr", "0.5",
                "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5"])
    (opt,) = cli.trainer.optimizers
    assert type(opt) is torch.optim.SGD and cli.trainer.global_step == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5 ** 2)  # two StepLR steps
    trained = {id(p) for p in cli.model.backend.trainable_parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trained and trained
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


def test_model_optimizer_is_the_same_setting(tmp_path, capsys):
    # the config sets the top-level group; without it (null) the module's own argument is used
    cli = main(["--config", TINY, "--optimizer", "null", "--model.optimizer", "SGD", "--model.optimizer.lr", "0.25"],
               run=False)
    cli.model.configure_model()
    opt = cli.model.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.25
    # both spellings with different values: one line naming both
    rc = run_main(main, ["fit", "--config", TINY, *STEPS, "--optimizer", "SGD", "--model.optimizer", "Adam"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == "error: optimizer=SGD and model.optimizer=Adam: give one of the two " \
                                  "(the configs use `optimizer`)"


# ---- parse errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--model.update.clip_rnge", "0.1"], "unknown setting model.update.clip_rnge; did you mean model.update.clip_range?"),
    (["--model.backend.init_args.num_step", "3"],
     "unknown setting model.backend.init_args.num_step; did you mean model.backend.init_args.num_steps?"),
    ("yaml", "unknown setting model.rollout.sample_batchsize; did you mean model.rollout.sample_batch_size?"),
])
def test_a_mistyped_key_is_one_line_naming_the_nearest(args, expected, tmp_path, capsys):
    if args == "yaml":
        typo = tmp_path / "typo.yaml"
        typo.write_text("model:\n  rollout:\n    sample_batchsize: 4\n")
        args = ["--config", str(typo)]
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", TINY, *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == f"error: {expected}\n", err


# ---- help ---------------------------------------------------------------------------------------
def shipped_classes(package: ModuleType, base: type) -> list[type]:
    """Every concrete subclass of ``base`` defined in ``package`` (a module, or each module of a package)."""
    modules = ([importlib.import_module(f"{package.__name__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)]
               if hasattr(package, "__path__") else [package])
    return [c for m in modules for _, c in inspect.getmembers(m, inspect.isclass)
            if issubclass(c, base) and c is not base and c.__module__ == m.__name__ and not inspect.isabstract(c)]


def options_and_descriptions(help_text: str) -> list[tuple[str, str]]:
    """(option, description) of each option of a jsonargparse help text ("" when it has none: the
    line shows only its type, or it is the next option)."""
    lines = help_text.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (--[\w.+\-]+)(?: [^ ].*?)?(?:\s{2,}(?P<desc>\S.*))?$", line)
        if not m:
            continue
        desc = m.group("desc") or (lines[i + 1].strip() if i + 1 < len(lines) else "")
        found.append((m.group(1), "" if desc.startswith(("(type:", "(required", "--")) else desc))
    return found


def test_fit_help_describes_every_setting_and_lists_every_reward(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no class path broken across lines
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    options = options_and_descriptions(out[out.index("\noptions:"):])
    assert len(options) > 100 and [o for o, d in options if not d] == []
    help_text = " ".join(" ".join(lines).split())
    readme = (ROOT / "README.md").read_text()
    rewards = shipped_classes(rewards_pkg, Reward)
    assert {c.__name__ for c in rewards} >= {"ShapesReward", "ShapesExact", "PickScore", "RemoteReward"}
    for cls in rewards:  # in the known subclasses of --model.rewards, and in the README
        assert re.search(rf"pro_grpo_lightning\.rewards\.(\w+\.)?{cls.__name__}\b", help_text), cls
        assert cls.__name__ in readme, cls


# ---- overlays -----------------------------------------------------------------------------------
def test_shipped_overlay_adds_callbacks_and_keeps_the_base_ones():
    overlay = ROOT / "configs/quickstart_ema.yaml"
    assert "callbacks+:" in overlay.read_text()
    cli = main(["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(overlay)], run=False)
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"ModelCheckpoint", "EMA", "ExportLoRA"} <= set(kinds)  # the base's checkpoint callback kept
    readme = (ROOT / "README.md").read_text()
    assert "callbacks+:" in readme and "--trainer.callbacks+=" in readme
    for config in sorted(Path(ROOT / "configs").glob("*.yaml")):  # no shipped overlay replaces the base's list
        command, body = config.read_text().split("\n", 1)
        overlay = command.count("--config ") >= 2 and command.rstrip().endswith(f"configs/{config.name}")
        if overlay and "callbacks" in body:
            assert "callbacks+:" in body and "  callbacks:" not in body, config.name


def test_every_backend_reward_and_schedule_describes_each_argument(monkeypatch):
    """What ``fit --model.backend.help <class>`` (``--model.rewards.help``, ``--model.schedule.help``)
    prints: jsonargparse's arguments of the class, each with its description from the docstrings
    (``Args:`` sections, read through the class's bases)."""
    monkeypatch.setenv("COLUMNS", "400")
    classes = (shipped_classes(backends_pkg, DiffusionBackend) + shipped_classes(rewards_pkg, Reward)
               + shipped_classes(schedules, GroupSchedule))
    assert {"SD3Backend", "TinyFluxBackend", "ZImageBackend", "ShapesReward", "ProGRPOSchedule"} <= {c.__name__ for c in classes}
    missing = {}
    for cls in classes:
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "init_args")
        options = options_and_descriptions(parser.format_help())
        assert options, cls
        missing.update({f"{cls.__name__} {o}": "" for o, d in options if not d})
    assert not missing, sorted(missing)
