"""Held-out evaluation: fixed noise per (prompt, image), tables in the log dir, validate/test on a checkpoint."""

import csv
import glob
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from pro_grpo_lightning.backends.base import LoraSettings
from pro_grpo_lightning.backends.sd15 import TinySD15Backend
from pro_grpo_lightning.cli import main
from pro_grpo_lightning.data import PromptDataModule
from pro_grpo_lightning.evaluation import EvalItems, sample_items
from pro_grpo_lightning.module import ProGRPOModule
from pro_grpo_lightning.rewards.image_stats import Brightness, Colorfulness
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings
from tests.cli_runs import config_args

VAL = ["a cat", "a red square", "a horse"]


def tiny_module(**kw) -> ProGRPOModule:
    args = dict(backend=TinySD15Backend(num_steps=4, resolution=32, guidance_scale=2.0, seed=0,
                                        lora=LoraSettings(rank=2, alpha=2)),
                rewards=[Brightness()], schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]),
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), update=UpdateSettings(train_batch_size=8, clip_range=0.01),
                eval_rewards=[Colorfulness()])
    args.update(kw)
    return ProGRPOModule(**args)


def fit(tmp_path, name, val_prompts=None, max_steps=3, eval_batch_size=4, sanity=0):
    pl.seed_everything(0)
    module = tiny_module()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path, name=name),
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, val_check_interval=2, check_val_every_n_epoch=None,
                         num_sanity_val_steps=sanity)
    data = PromptDataModule(prompts="colors", prompts_per_step=2, val_prompts=val_prompts,
                            eval_images_per_prompt=2, eval_seed=7, eval_batch_size=eval_batch_size)
    trainer.fit(module, data)
    return module, trainer


def read_table(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluation_every_n_and_at_the_end_with_fixed_noise_and_no_effect_on_training(tmp_path):
    module, trainer = fit(tmp_path, "eval", val_prompts=VAL)
    plain, _ = fit(tmp_path, "plain", val_prompts=None)
    # evaluating (sampling with its own noise) leaves training exactly as it was
    for k, v in plain.backend.lora_state_dict().items():
        torch.testing.assert_close(module.backend.lora_state_dict()[k], v, rtol=0, atol=0)

    eval_dir = Path(trainer.log_dir) / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == [
        "val_step000002.csv", "val_step000002.md", "val_step000003.csv", "val_step000003.md"]  # every 2 + end
    table = read_table(eval_dir / "val_step000003.csv")
    assert [(r["prompt"], r["image_index"]) for r in table] == [(p, str(j)) for p in VAL for j in range(2)]
    assert list(table[0]) == ["prompt_index", "prompt", "image_index", "total", "brightness", "colorfulness"]

    # each image is the policy's sample from its own seed: recompute item by item
    items = EvalItems(VAL, 2, eval_seed=7)
    images = sample_items(module.backend, [items[k]["prompt"] for k in range(6)], [items[k]["seed"] for k in range(6)])
    bright = Brightness()(images, VAL * 2)
    for k, row in enumerate(table):
        assert float(row["brightness"]) == pytest.approx(float(bright[k]), rel=1e-5)
        assert float(row["total"]) == float(row["brightness"])  # weight 1, raw
    one = sample_items(module.backend, [items[3]["prompt"]], [items[3]["seed"]])  # alone: same image
    torch.testing.assert_close(one[0], images[3], rtol=0, atol=1e-5)

    # logged: the means over all items, at the two evaluation steps
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("val/total")]
    # at the optimizer steps behind the evaluated weights, the tables' steps (not Lightning's training
    # batch counter, one less)
    assert [int(r["step"]) for r in logged] == [2, 3]
    mean = sum(float(r["brightness"]) for r in table) / len(table)
    assert float(logged[-1]["val/total"]) == pytest.approx(mean, rel=1e-5)  # one reward, weight 1: the total
    assert "val/brightness" not in logged[-1]  # not logged twice
    assert "val/colorfulness" in logged[-1]
    md = (eval_dir / "val_step000003.md").read_text()
    assert "| a horse |" in md and "**mean**" in md


def logged_val(trainer) -> list[dict[str, str]]:
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("val/total")]


def test_a_full_sanity_check_is_logged_as_the_starting_point(tmp_path):
    module, trainer = fit(tmp_path, "start", val_prompts=VAL, sanity=-1)
    logged = logged_val(trainer)
    assert [int(r["step"]) for r in logged] == [0, 2, 3]  # the start, then as without it
    start = read_table(Path(trainer.log_dir) / "eval" / "val_step000000.csv")
    assert len(start) == 6
    # the starting policy's scores: a fresh module (zero-initialised LoRA B) samples the same images
    fresh = tiny_module()
    fresh.configure_model()
    items = EvalItems(VAL, 2, eval_seed=7)
    images = sample_items(fresh.backend, [items[k]["prompt"] for k in range(6)], [items[k]["seed"] for k in range(6)])
    bright = Brightness()(images, [items[k]["prompt"] for k in range(6)])
    assert float(logged[0]["val/total"]) == pytest.approx(float(bright.mean()), rel=1e-5)
    for k, row in enumerate(start):
        assert float(row["brightness"]) == pytest.approx(float(bright[k]), rel=1e-5)
    # a partial sanity check (1 batch of 4 of the 6 items) scores nothing: not logged, no table
    _, partial = fit(tmp_path, "partial", val_prompts=VAL, sanity=1)
    assert [int(r["step"]) for r in logged_val(partial)] == [2, 3]
    assert not (Path(partial.log_dir) / "eval" / "val_step000000.csv").exists()


def test_eval_rewards_must_not_shadow_training_rewards():
    with pytest.raises(ValueError, match="share a name"):
        tiny_module(eval_rewards=[Brightness()])


OVERRIDE = """\
trainer:
  max_steps: 2
  num_sanity_val_steps: 0
model:
  eval_rewards:
    - class_path: pro_grpo_lightning.rewards.image_stats.Colorfulness
data:
  prompts_per_step: 2
  val_prompts: [a cat, a horse]
  test_prompts: colors
  eval_images_per_prompt: 2
  eval_batch_size: 3
"""


def test_cli_validate_and_test_on_a_checkpoint(tmp_path):
    base = config_args(tmp_path, "eval", OVERRIDE)
    main(["fit", *base])  # validates at the end: step 2
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    main(["validate", *base, "--ckpt_path", str(ckpt)])
    main(["test", *base, "--ckpt_path", str(ckpt)])

    fit_table, validate_table = sorted(glob.glob(str(tmp_path / "run" / "*" / "eval" / "val_step000002.csv")))
    assert Path(fit_table).read_text() == Path(validate_table).read_text()  # same weights, same noise
    assert len(read_table(fit_table)) == 4
    (test_table,) = glob.glob(str(tmp_path / "run" / "*" / "eval" / "test_step000002.csv"))
    rows = read_table(test_table)
    assert len(rows) == 12 * 2 and rows[0]["prompt"] == "a red square" and "colorfulness" in rows[0]

    with pytest.raises(ValueError, match="val_prompts"):
        main(["validate", *base, "--data.val_prompts", "null", "--ckpt_path", str(ckpt)])
