"""What a run shows in its loggers: TensorBoard events of a tiny CLI run read back (tags, the
custom-scalars layout, image sizes, hyperparameters), PNGs of a CSV run, W&B offline
(``pro_grpo_lightning/logs.py``, ``dashboard.py``)."""

from __future__ import annotations

import csv
import glob
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cli_runs import config_args
from pro_grpo_lightning.cli import main
from pro_grpo_lightning.dashboard import MIN_TILE, captioned_grid, upscale
from pro_grpo_lightning.logs import HP_METRIC, backend_settings, log_image

TB_RUN = """\
trainer:
  max_steps: 4
  log_every_n_steps: 1
  val_check_interval: 2
  check_val_every_n_epoch: null
  num_sanity_val_steps: -1
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: "{out}", name: tb}}
model:
  samples:
    every_n_rollouts: 1
    prompts: [a cat, a dog]
data:
  prompts: colors
  prompts_per_step: 2
  val_prompts: [a cat, a horse]
  eval_images_per_prompt: 1
"""


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(run_dir / "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _hparams(run_dir: Path) -> tuple[dict[str, object], list[str]]:
    """The HParams plugin's session: the hyperparameter values and the metric names it compares by."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(run_dir / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {}
    for k, v in start.hparams.items():
        kind = v.WhichOneof("kind")
        values[k] = getattr(v, kind) if kind else None
    return values, [m.name.tag for m in exp.metric_infos]


def _layout(acc):
    """The custom-scalars layout written into the run's events."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def _size(acc, tag, i=0):
    return Image.open(io.BytesIO(acc.Images(tag)[i].encoded_image_string)).size


def test_tensorboard_run_reads_well(tmp_path):
    main(["fit", *config_args(tmp_path, "tb", TB_RUN)])
    (run_dir,) = (tmp_path / "tb").iterdir()
    acc = _events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    # one quantity, one tag: no counters, no constants, no second copy of a reward or of the loss
    assert not {"epoch", "rollouts", "reward", "train/loss"} & scalars  # kl_beta 0: loss = policy loss
    assert not {t for t in scalars if t.startswith("compute/")}
    assert "reward/brightness" not in scalars and "val/brightness" not in scalars  # one reward: the total
    assert {"reward/mean", "reward/min", "reward/max", "group_std/expanded_proxy", "group_std/survivors_proxy",
            "train/policy_loss", "val/total", HP_METRIC} <= scalars
    # the first screen of the layout: reward and held-out score; every chart's tags exist
    layout = _layout(acc)
    titles = [c.title for c in layout.category]
    assert titles[:5] == ["1. reward and held-out score", "2. spread within groups", "3. pruning and proxy quality",
                          "4. compute", "5. losses"]
    first = layout.category[0].chart
    assert list(first[0].multiline.tag) == ["reward/mean", "reward/min", "reward/max"]
    assert list(first[1].multiline.tag)[0] == "val/.*" and len(first) == 2  # one reward: no components chart
    import re as _re
    for category in layout.category[:2]:  # reward, held-out score, spreads: all logged here
        for chart in category.chart:
            assert any(_re.fullmatch(t, s) for t in chart.multiline.tag for s in scalars), chart.title
    assert "denoiser calls saved vs plain G_max: 25%" in layout.category[3].chart[0].title  # 4+4+2+2 of 4 x 4
    images = acc.Tags()["images"]
    # one tag per kind, with a step per logged rollout (the slider), at the rollout scalars' steps
    assert sorted(t for t in images if t.startswith("samples/")) == ["samples/fixed_prompts", "samples/survivors"]
    survivors = [e.step for e in acc.Images("samples/survivors")]
    assert survivors == [0, 1, 2, 3] == [e.step for e in acc.Images("samples/fixed_prompts")]
    assert [e.step for e in acc.Scalars("reward/mean")] == survivors
    # images: 32 px tiles upscaled to 128 px, a caption band under each (and a title above the survivors)
    w, h = _size(acc, "samples/survivors")
    assert w == 2 * 128 and h > 128 + 13  # the 2 survivors of one prompt, side by side
    w, h = _size(acc, "samples/fixed_prompts")
    assert w == 2 * 128 and h > 128
    assert _size(acc, "val/images")[0] == 2 * 128  # 2 held-out prompts, first image of each
    # held-out: starting point (full sanity check) and every 2 updates; scalars, images and the
    # table all at the optimizer steps behind the evaluated weights
    val_steps = [e.step for e in acc.Scalars("val/total")]
    assert val_steps == [0, 2, 4]
    assert [e.step for e in acc.Images("val/images")] == val_steps
    tables = sorted(p.name for p in (run_dir / "eval").glob("val_step*.csv"))
    assert tables == [f"val_step{s:06d}.csv" for s in val_steps]
    # the table's mean total is the logged val/total, step by step
    for e in acc.Scalars("val/total"):
        with open(run_dir / "eval" / f"val_step{e.step:06d}.csv") as f:
            rows = list(csv.DictReader(f))
        assert e.value == pytest.approx(sum(float(r["total"]) for r in rows) / len(rows), rel=1e-4)
    # hp_metric: the held-out total at every evaluation, never the -1 placeholder
    hp = acc.Scalars(HP_METRIC)
    assert [e.step for e in hp] == val_steps
    assert [e.value for e in hp] == [e.value for e in acc.Scalars("val/total")]
    assert all(math.isfinite(e.value) and e.value != -1 for e in hp)
    # the HParams view: the run-defining settings, compared by hp_metric
    values, metrics = _hparams(run_dir)
    assert metrics == [HP_METRIC]
    assert values["backend"] == "pro_grpo_lightning.backends.sd15.TinySD15Backend"
    assert values["backend.num_steps"] == 4 and values["backend.guidance_scale"] == 3.0
    assert values["backend.eta"] == 1.0 and "backend.sde_kind" not in values  # SD1.5's own settings only
    assert values["schedule"] == "ProGRPOSchedule" and values["schedule.rule"] == "ovf"
    assert values["schedule.group_size"] == 4
    assert values["schedule.checkpoints"] == "[1]" and values["schedule.keep"] == "[2]"
    assert values["lora.rank"] == 4 and values["lora.alpha"] == 4.0
    assert values["optimizer.lr"] == pytest.approx(0.003)
    assert values["update.clip_range"] == 0.01 and values["update.kl_beta"] == 0.0
    assert values["data.prompts_per_step"] == 2
    # the constants, once: 2 prompts x (4 x 2 steps + 2 x 2 steps) of 2 x 4 x 4 unpruned
    assert values["compute.nfe_per_rollout"] == 24 and values["compute.nfe_plain_gmax"] == 32
    assert values["compute.nfe_saved_frac"] == pytest.approx(0.25) and values["compute.previews_per_rollout"] == 8
    saved = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert saved["schedule.keep"] == "[2]" and saved["lora.rank"] == 4


def test_hparams_hold_the_settings_the_backend_has():
    """SD3 has no ``eta`` (an SD1.5 field) but has ``sde_kind`` and ``noise_level``; nothing loads."""
    from pro_grpo_lightning.backends.sd3 import TinySD3Backend

    hp = backend_settings(TinySD3Backend(num_steps=6, noise_level=0.5, sde_kind="dance"))
    assert hp["backend.sde_kind"] == "dance" and hp["backend.noise_level"] == 0.5 and hp["backend.num_steps"] == 6
    assert "backend.eta" not in hp and hp["backend.dtype"] == "float32" and "lora.rank" in hp


def test_csv_run_writes_images(tmp_path):
    override = TB_RUN.replace(
        'class_path: lightning.pytorch.loggers.TensorBoardLogger\n    init_args: {{save_dir: "{out}", name: tb}}',
        'class_path: lightning.pytorch.loggers.CSVLogger\n    init_args: {{save_dir: "{out}", name: csv}}'
    ).replace("max_steps: 4", "max_steps: 2")
    main(["fit", *config_args(tmp_path, "csv", override)])
    (run_dir,) = (tmp_path / "csv").iterdir()
    shots = sorted(p.name for p in (run_dir / "images" / "samples" / "survivors").glob("*.png"))
    assert shots == ["step_000000.png", "step_000001.png"]
    from pro_grpo_lightning.data import load_prompt_set

    caption = (run_dir / "images" / "samples" / "survivors" / "step_000000.txt").read_text().strip()
    prompt, rewards = caption.split(": ", 1)
    assert prompt in load_prompt_set("colors")[0] and len(rewards.split(", ")) == 2  # its 2 survivors' rewards
    assert all(r.startswith("reward ") for r in rewards.split(", "))
    sheet = Image.open(run_dir / "images" / "samples" / "survivors" / "step_000000.png")
    assert sheet.size[0] == 2 * MIN_TILE and sheet.size[1] > MIN_TILE  # upscaled tiles, captions under them
    fixed = (run_dir / "images" / "samples" / "fixed_prompts" / "step_000000.txt").read_text().strip()
    assert fixed.startswith("a cat - reward ") and " | a dog - reward " in fixed
    val = sorted(p.name for p in (run_dir / "images" / "val" / "images").glob("*.png"))
    assert val == ["step_000000.png", "step_000002.png"]
    val_caption = (run_dir / "images" / "val" / "images" / "step_000000.txt").read_text()
    assert val_caption.startswith("a cat - 0.") and "a horse - " in val_caption
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert "epoch" not in rows[0] and "rollouts" not in rows[0] and "compute/nfe" not in rows[0]
    rows = [r for r in rows if r.get("val/total")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    assert [float(r[HP_METRIC]) for r in rows] == [float(r["val/total"]) for r in rows]
    assert yaml.safe_load((run_dir / "hparams.yaml").read_text())["lora.rank"] == 4


def test_log_image_csv_png_is_the_image(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="x")
    img = torch.rand(3, 5, 7)
    log_image([logger], "a/b", img, 12, caption="a cat")
    path = Path(logger.log_dir) / "images" / "a" / "b" / "step_000012.png"
    back = torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1).float() / 255  # [3, 5, 7]
    assert (back - img).abs().max() <= 0.5 / 255 + 1e-6
    assert path.with_suffix(".txt").read_text() == "a cat\n"


def test_wandb_offline_gets_images(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    logged = []
    monkeypatch.setattr(logger, "log_metrics", lambda metrics, step=None: logged.append((metrics, step)))
    log_image([logger], "samples/survivors", torch.rand(3, 8, 16), 3, caption="a cat")
    ((metrics, step),) = logged
    assert step == 3
    (image,) = metrics["samples/survivors"]
    assert isinstance(image, wandb.Image) and image._caption == "a cat"
    assert image.image.size == (16, 8)
    wandb.finish()


def test_captioned_grid_upscales_by_nearest_and_captions_each_tile():
    imgs = torch.rand(3, 3, 32, 16)  # 3 tiles of 32 x 16 px
    up = upscale(imgs)
    assert up.shape == (3, 3, 256, 128)  # x8: the short side reaches 128 px
    assert torch.equal(up[:, :, ::8, ::8], imgs)  # nearest: every pixel a block
    assert torch.equal(up[:, :, 7::8, 7::8], imgs)
    grid = captioned_grid(imgs, ["a red square - 0.500", "b", "c"], nrow=2)
    assert grid.shape[0] == 3 and grid.shape[2] == 2 * 128 and grid.shape[1] > 2 * 256  # 2 rows + caption bands
    back = (grid * 255).round()
    assert torch.equal(back[:, :256, :128], (up[0].clamp(0, 1) * 255).round())  # tile 0 at the top left, unchanged
    band = grid[:, 256:256 + 13, :128]
    assert (band < 0.5).any() and (band > 0.5).any()  # dark text on white under tile 0
