"""What a run shows in its loggers: TensorBoard events of a tiny CLI run read back, PNGs of a CSV run,
W&B offline, and the rollout's progress display (``pro_grpo_lightning/logs.py``)."""

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
from pro_grpo_lightning.logs import HP_METRIC, ProGRPOProgressBar, image_grid, log_image

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


def test_tensorboard_run_reads_well(tmp_path):
    main(["fit", *config_args(tmp_path, "tb", TB_RUN)])
    (run_dir,) = (tmp_path / "tb").iterdir()
    acc = _events(run_dir)
    images = acc.Tags()["images"]
    # one tag per kind, with a step per logged rollout (the slider), at the rollout scalars' steps
    assert sorted(t for t in images if t.startswith("samples/")) == ["samples/fixed_prompts", "samples/survivors"]
    survivors = [e.step for e in acc.Images("samples/survivors")]
    assert survivors == [0, 1, 2, 3] == [e.step for e in acc.Images("samples/fixed_prompts")]
    assert [e.step for e in acc.Scalars("reward/mean")] == survivors
    # the prompt travels as the image's caption (a text summary at the same step)
    assert "samples/survivors/caption/text_summary" in acc.Tags()["tensors"]
    # a survivors image is the 2 survivors of one prompt side by side: 2 x 32 px wide
    img = Image.open(io.BytesIO(acc.Images("samples/survivors")[0].encoded_image_string))
    assert img.size == (2 * 32, 32)
    # held-out: starting point (full sanity check) and every 2 updates; scalars, images and the
    # table all at the optimizer steps behind the evaluated weights
    val_steps = [e.step for e in acc.Scalars("val/total")]
    assert val_steps == [0, 2, 4]
    assert [e.step for e in acc.Images("val/images")] == val_steps
    assert [e.step for e in acc.Scalars("val/brightness")] == val_steps
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
    assert values["schedule"] == "ProGRPOSchedule" and values["schedule.rule"] == "ovf"
    assert values["schedule.group_size"] == 4
    assert values["schedule.checkpoints"] == "[1]" and values["schedule.keep"] == "[2]"
    assert values["lora.rank"] == 4 and values["lora.alpha"] == 4.0
    assert values["optimizer.lr"] == pytest.approx(0.003)
    assert values["update.clip_range"] == 0.01 and values["update.kl_beta"] == 0.0
    assert values["data.prompts_per_step"] == 2
    saved = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert saved["schedule.keep"] == "[2]" and saved["lora.rank"] == 4


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
    assert caption in load_prompt_set("colors")[0]  # the survivors' prompt
    val = sorted(p.name for p in (run_dir / "images" / "val" / "images").glob("*.png"))
    assert val == ["step_000000.png", "step_000002.png"]
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/total")]
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


PROGRESS_RUN = """\
trainer:
  max_steps: 2
  enable_progress_bar: true
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: "{out}", name: tb}}
  callbacks:
    - class_path: pro_grpo_lightning.logs.ProGRPOProgressBar
      init_args: {{live: true}}
data:
  prompts: colors
  prompts_per_step: 2
"""


def test_progress_bar_and_a_run_without_held_out_set(tmp_path):
    """Inside a rollout the bar says where it is; its count is updates out of max_steps. Without
    held-out prompts there is no hp_metric (not even Lightning's -1 placeholder)."""
    cli = main(config_args(tmp_path, "progress", PROGRESS_RUN), run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, ProGRPOProgressBar)
    seen = []
    step_fn = bar.rollout_step

    def recording(rollout, step, num_steps, live, previews):
        step_fn(rollout, step, num_steps, live, previews)
        seen.append((rollout, step, num_steps, live, previews, bar.train_progress_bar.desc.rstrip(": ")))

    bar.rollout_step = recording
    cli.trainer.fit(cli.model, cli.datamodule)
    # 2 rollouts x T=4 steps; 2 prompts x 4 trajectories, pruned to 2 each at step index 1 (8 previews)
    assert [(r, s) for r, s, *_ in seen] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert [x[3] for x in seen[:4]] == [8, 4, 4, 4]
    assert [x[4] for x in seen[:4]] == [0, 8, 8, 8]
    assert seen[1][5] == "rollout 0: step 2/4, live 4, previews 8"
    assert bar.train_progress_bar.total == 2 and bar.train_progress_bar.n == 2
    (run_dir,) = (tmp_path / "tb").iterdir()
    assert HP_METRIC not in _events(run_dir).Tags()["scalars"]
    assert yaml.safe_load((run_dir / "hparams.yaml").read_text())["schedule.rule"] == "ovf"


def test_image_grid_layout():
    imgs = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    g = image_grid(imgs, nrow=2)
    assert g.shape == (3, 4, 4)
    assert g[0, 0, 0] == 0 and g[0, 0, 2] == 1 and g[0, 2, 0] == 2 and g[0, 2, 2] == 0  # padded black
