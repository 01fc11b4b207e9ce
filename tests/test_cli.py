"""Every YAML in configs/ parses through the CLI; tiny ones instantiate, real ones fail clearly."""

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from pro_grpo_lightning.data import PromptDataModule
from pro_grpo_lightning.module import ProGRPOModule

from tests.cli_runs import config_command

ALL = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
BASES = [c for c in ALL if c.stem.endswith("_base")]  # shared settings, used under an overlay only
CONFIGS = [c for c in ALL if c not in BASES]


class ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:  # parse and validate, build nothing
        pass


def parse(config: Path) -> ParseOnlyCLI:
    return ParseOnlyCLI(ProGRPOModule, PromptDataModule, run=False, args=config_command(config),
                        save_config_kwargs={"overwrite": True})


def is_tiny(cfg) -> bool:
    """Runs offline: a model built in code, or weights shipped inside the package (pkg://)."""
    pretrained = str(cfg.model.backend.init_args.get("pretrained", "") or "")
    return ".Tiny" in cfg.model.backend.class_path or pretrained.startswith("pkg://")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses_and_starts_with_its_command(config):
    cli = parse(config)  # with the --config files of the command on its first line
    cfg = cli.config
    assert cfg.model.backend.class_path.startswith("pro_grpo_lightning.backends.")
    assert cfg.model.schedule.class_path.startswith("pro_grpo_lightning.schedules.")
    assert len(cfg.model.rewards) >= 1
    init = cli.parser.instantiate_classes
    if is_tiny(cfg):
        built = init(cfg)  # cheap: no weights load before configure_model()
        assert isinstance(built.model, ProGRPOModule)
        built.model.schedule.validate_steps(built.model.backend.num_steps)
    else:
        # real weights: offline, instantiation fails at once naming the weights, not deep in a library
        with pytest.raises(FileNotFoundError, match="offline|no such folder"):
            init(cfg)


@pytest.mark.parametrize("base", BASES, ids=[c.name for c in BASES])
def test_every_base_config_is_used_by_an_overlay_and_refused_alone(base, capsys):
    users = [c for c in CONFIGS if str(base) in config_command(c)]
    assert users, f"{base.name}: no config's command uses it"
    for line in base.read_text().splitlines()[:4]:  # its header names the commands
        assert not line.startswith("#   python") or "--config configs/" + base.name in line
    with pytest.raises(SystemExit):  # alone it has no schedule: jsonargparse names the missing key
        ParseOnlyCLI(ProGRPOModule, PromptDataModule, run=False, args=["--config", str(base)])
    assert "model.schedule" in capsys.readouterr().err


def test_paper_sd14_configs_mirror_the_paper():
    by_name = {c.name: parse(c).config for c in CONFIGS}
    pro = by_name["sd15_hps_pro_grpo.yaml"].model
    assert pro.backend.init_args.num_steps == 50 and pro.backend.init_args.eta == 1.0
    assert pro.backend.init_args.guidance_scale == 5.0 and pro.backend.init_args.resolution == 512
    assert pro.schedule.init_args.group_size == 48
    assert pro.schedule.init_args.checkpoints == [30, 40] and pro.schedule.init_args.keep == [32, 8]
    plain = by_name["sd15_hps_grpo.yaml"].model
    assert plain.schedule.class_path.endswith("PlainGRPOSchedule") and plain.schedule.init_args.group_size == 16


def test_flow_grpo_baseline_mirrors_flow_grpos_pickscore_config():
    # Flow-GRPO's config/grpo.py::pickscore_sd3 (github.com/yifan123/flow_grpo): 10 steps, CFG 4.5,
    # 512 px, 24 images per prompt, noise level 0.7, beta 0.01, clip 1e-4, global_std = True
    m = parse(next(c for c in CONFIGS if c.name == "sd35m_pickscore_flow_grpo.yaml")).config.model
    b = m.backend.init_args
    assert (b.num_steps, b.guidance_scale, b.resolution, b.noise_level, b.sde_kind) == (10, 4.5, 512, 0.7, "flow_grpo")
    assert m.schedule.class_path.endswith("PlainGRPOSchedule") and m.schedule.init_args.group_size == 24
    assert (m.advantages.std, m.advantages.clip) == ("global", 5.0)
    assert (m["update"].kl_beta, m["update"].kl_type, m["update"].clip_range) == (0.01, "flow_grpo", 1e-4)


def test_unknown_backend_is_a_clear_error(tmp_path, capsys):
    quickstart = next(c for c in CONFIGS if c.name == "tiny_sd15.yaml")  # names its backend
    cfg = quickstart.read_text().replace("pro_grpo_lightning.backends.sd15.TinySD15Backend",
                                         "pro_grpo_lightning.backends.nope.Missing")
    p = tmp_path / "bad.yaml"
    p.write_text(cfg)
    with pytest.raises(SystemExit):
        parse(p)
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("command,words", [("plan", "peak GPU memory"), ("export", "Export"),
                                           ("serve-reward", "Serve a Reward")])
def test_commands_beside_lightnings_say_what_they_do(command, words, capsys):
    """``pro-grpo plan|export|serve-reward --help`` (the console script and ``python -m
    pro_grpo_lightning`` both run ``cli.command_main``) describe the command."""
    from pro_grpo_lightning.cli import command_main

    with pytest.raises(SystemExit) as exit_:
        command_main([command, "--help"])
    assert exit_.value.code == 0 and words in capsys.readouterr().out
