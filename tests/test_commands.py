"""``pro-grpo export`` and ``serve-reward`` parse like ``fit`` (``cli.CommandParser``): options from
the function's signature and docstring, ``--config`` files of them, ``--print_config``, flags, one
line naming the nearest option for a typo (exit 2); and renamed settings (``vae_decode_chunk``)
still load from old YAML files and old checkpoints."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
import yaml
from docstring_parser import parse as parse_docstring

from pro_grpo_lightning.cli import CommandParser, command_main, main
from pro_grpo_lightning.export import LORA_WEIGHT_NAME, export_checkpoint
from pro_grpo_lightning.reward_server import serve
from tests.cli_runs import ROOT, config_args, edited_config_copy

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
BRIGHTNESS = "pro_grpo_lightning.rewards.image_stats.Brightness"


def run_module(*args: str) -> subprocess.CompletedProcess:
    """``python -m pro_grpo_lightning ...`` in a fresh process (what the ``pro-grpo`` script runs)."""
    return subprocess.run([sys.executable, "-m", "pro_grpo_lightning", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny one-step run: (its folder, its last checkpoint)."""
    tmp = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    main(["fit", *config_args(tmp, "r", "trainer:\n  max_steps: 1\n")])
    return tmp, tmp / "ckpt" / "last.ckpt"


def test_export_prints_its_config_and_reads_it_back_in_a_fresh_process(run, tmp_path, capsys):
    _, ckpt = run
    out = tmp_path / "lora"
    with pytest.raises(SystemExit) as stop:
        command_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--merge", "false", "--print_config"])
    printed = capsys.readouterr().out
    assert stop.value.code == 0 and yaml.safe_load(printed) == {
        "ckpt": str(ckpt), "out": str(out), "run_config": None, "merge": False, "ema": False, "overwrite": False,
        "trust_config_classes": False}
    (tmp_path / "export.yaml").write_text(printed)
    proc = run_module("export", "--config", str(tmp_path / "export.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / LORA_WEIGHT_NAME).is_file() and f"exported LoRA to {out}" in proc.stdout


@pytest.mark.parametrize("command, args, expected", [
    ("export", ["--ckpt", "a.ckpt", "--out", "x", "--mrge"], "unknown setting mrge; did you mean merge?"),
    ("export", ["--ckpt_path", "a.ckpt", "--out", "x"], "unknown setting ckpt_path; did you mean ckpt?"),
    ("export", "yaml", "unknown setting overwrit; did you mean overwrite?"),
    ("export", ["--ckpt", "a.ckpt"], "the following arguments are required: out"),
    ("serve-reward", ["--reward", BRIGHTNESS, "--max_conections", "2"],
     "unknown setting max_conections; did you mean max_connections?"),
    ("serve-reward", ["--reward", BRIGHTNESS, "--port", "eighty"], "port=eighty: expected int"),
    ("serve-reward", ["--reward", BRIGHTNESS, "--init_args", "[1]"], "init_args=[1]: expected dict[str, Any] or None"),
])
def test_bad_input_is_one_line_naming_the_option(command, args, expected, tmp_path, capsys):
    if args == "yaml":
        (tmp_path / "typo.yaml").write_text("ckpt: a.ckpt\nout: x\noverwrit: true\n")
        args = ["--config", str(tmp_path / "typo.yaml")]
    assert command_main([command, *args]) == 2
    assert capsys.readouterr().err == f"error: pro-grpo {command}: {expected}\n"


def test_a_typo_from_the_installed_entry_is_one_line_and_exit_2():
    proc = run_module("serve-reward", "--reward", BRIGHTNESS, "--prot", "0")
    assert proc.returncode == 2 and proc.stderr == "error: pro-grpo serve-reward: unknown setting prot; did you mean port?\n"


def test_plan_of_the_quickstart_from_the_installed_script():
    """The README's plan command on the quickstart, whose shapes reward cannot score fake images:
    the plan still answers (decodes traced, the reward's activations left out with a note)."""
    script = os.path.join(os.path.dirname(sys.executable), "pro-grpo")
    assert os.path.exists(script), f"{script}: the package's console script is not installed"
    proc = subprocess.run([script, "plan", "--config", "configs/quickstart.yaml"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "24 GiB  fits as is" in proc.stdout and "rollout: final decode + reward" in proc.stdout
    assert "note: reward shapes: activations not estimated" in proc.stdout


def described(function) -> dict[str, str]:
    return {p.arg_name: " ".join(p.description.split()) for p in parse_docstring(function.__doc__).params}


def option_help(help_text: str, name: str) -> str:
    """The text ``--help`` prints for ``--name`` (its line and the indented lines after it)."""
    lines = help_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"  --{name} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_serve_reward_help_says_what_it_does_and_describes_every_option():
    proc = run_module("serve-reward", "--help")
    assert proc.returncode == 0 and "Serve a Reward over HTTP" in proc.stdout
    docs = described(serve)
    assert set(docs) == set(inspect.signature(serve).parameters)  # every argument has a description
    for name, text in docs.items():
        assert text in option_help(proc.stdout, name), name
    assert "--config CONFIG" in proc.stdout and "--print_config" in proc.stdout


def test_export_help_describes_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as stop:
        command_main(["export", "--help"])
    assert stop.value.code == 0
    help_text = capsys.readouterr().out
    assert "Export a Pro-GRPO checkpoint" in help_text
    docs = described(export_checkpoint)
    assert set(docs) == set(inspect.signature(export_checkpoint).parameters)
    for name, text in docs.items():
        assert text in option_help(help_text, name), name


@pytest.mark.parametrize("args, merge", [([], False), (["--merge"], True), (["--merge", "true"], True),
                                         (["--merge", "false"], False), (["--merge", "--no_merge"], False)])
def test_bool_options_are_flags(args, merge):
    parser = CommandParser(export_checkpoint, "pro-grpo export", "")
    assert parser.parse(["--ckpt", "a", "--out", "b", *args]).merge is merge


# ---- renamed settings: old runs still load ------------------------------------------------------
def old_checkpoint(run, tmp_path, chunk: int):
    """The run's checkpoint as an older version wrote it: its stored config names ``vae_decode_chunk``."""
    def rename(cfg):
        init_args = cfg["model"]["backend"]["init_args"]
        assert init_args.pop("decode_chunk") is None and "vae_decode_chunk" not in init_args
        init_args["vae_decode_chunk"] = chunk
    return edited_config_copy(run[1], tmp_path / "old.ckpt", rename)


def test_export_reads_an_old_checkpoints_config_and_an_old_config_flag(run, tmp_path, capsys):
    folder, _ = run
    old = old_checkpoint(run, tmp_path, 2)
    assert command_main(["export", "--ckpt", str(old), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"deprecated: vae_decode_chunk (ckpt={str(old)!r} (its stored config)) is now called decode_chunk" in err
    # the spelling before export had settings files of its own: --config <the run's YAML>
    (saved,) = (folder / "run").glob("*/config.yaml")
    assert command_main(["export", "--config", str(saved), "--ckpt", str(old), "--out", str(tmp_path / "b")]) == 0
    assert "read as --run_config (deprecated spelling" in capsys.readouterr().err
    assert (tmp_path / "b" / LORA_WEIGHT_NAME).is_file()


def test_an_old_yaml_and_an_old_checkpoint_resume_with_the_new_name(run, tmp_path, capsys):
    folder, _ = run
    old = old_checkpoint(run, tmp_path, 2)
    args = config_args(tmp_path, "r", "trainer:\n  max_steps: 2\n", out=tmp_path / "resumed")
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("model:\n  backend:\n    init_args:\n      vae_decode_chunk: 2\n")
    # a different value is compared under the new name (and refused: it is not a resumable setting) ...
    assert command_main(["fit", *args, "--model.backend.init_args.decode_chunk", "1", "--ckpt_path", str(old)]) == 2
    assert "model.backend.init_args.decode_chunk: 2 -> 1" in capsys.readouterr().err
    # ... the same value, from an old YAML, resumes
    assert command_main(["fit", *args, "--config", str(legacy), "--ckpt_path", str(old)]) == 0
    err = capsys.readouterr().err
    assert "deprecated: vae_decode_chunk (a YAML file) is now called decode_chunk" in err
    assert torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_an_old_key_on_the_command_line_names_the_new_one(capsys):
    tiny = ["fit", "--config", str(ROOT / "configs/tiny_sd15.yaml")]
    with pytest.raises(SystemExit) as stop:
        main([*tiny, "--model.backend.init_args.vae_decode_chunk", "2"])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        "error: unknown setting model.backend.init_args.vae_decode_chunk; did you mean "
        "model.backend.init_args.decode_chunk?")
