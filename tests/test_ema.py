"""The EMA callback: its arithmetic by hand, its state in the checkpoint (resume exact), raw and EMA
held-out scores both logged, and the EMA weights exported into the stock diffusers pipeline."""

import csv
import glob
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from pro_grpo_lightning.backends.base import LoraSettings
from pro_grpo_lightning.backends.sd15 import SD15Backend, TinySD15Backend, save_tiny_sd15_pipeline
from pro_grpo_lightning.cli import main as cli_main
from pro_grpo_lightning.data import PromptDataModule
from pro_grpo_lightning.ema import EMA, trainable_weights
from pro_grpo_lightning.evaluation import EvalItems, sample_items
from pro_grpo_lightning.export import LORA_WEIGHT_NAME, export_lora, fresh_pipeline
from pro_grpo_lightning.export import main as export_main
from pro_grpo_lightning.module import ProGRPOModule
from pro_grpo_lightning.rewards.image_stats import Brightness
from pro_grpo_lightning.update import UpdateSettings
from pro_grpo_lightning.schedules import ProGRPOSchedule
from tests.cli_runs import CALLBACKS_WITH_EXPORT, config_args
from tests.tiny_models import unet_out

VAL = ["a cat", "a red square"]


class Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)


def set_w(net: Two, *values: float) -> None:
    with torch.no_grad():
        net.w.copy_(torch.tensor(values))


def test_ema_arithmetic_by_hand_start_step_and_update_every():
    net = Two()
    ema = EMA(decay=0.5, start_step=1, update_every=2)
    ema.update(net, 0)  # starts as a copy of the weights: [0, 0]
    assert set(ema.shadow) == {"w"}  # the frozen weight is never averaged
    set_w(net, 2.0, -2.0)
    ema.update(net, 1)  # step 1 <= start_step: equal to the weights
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([2.0, -2.0]))
    set_w(net, 4.0, 0.0)
    ema.update(net, 2)  # too soon: last update at step 1, update_every 2
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([2.0, -2.0]))
    ema.update(net, 3)  # 0.5 * [2, -2] + 0.5 * [4, 0]
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([3.0, -1.0]))
    set_w(net, 1.0, 1.0)
    ema.update(net, 5)  # 0.5 * [3, -1] + 0.5 * [1, 1]
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([2.0, 0.0]))
    with ema.swapped(net):
        torch.testing.assert_close(net.w.detach(), torch.tensor([2.0, 0.0]))
        with ema.swapped(net):  # nested: still the EMA, restored only by the outer block
            pass
        torch.testing.assert_close(net.w.detach(), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(net.w.detach(), torch.tensor([1.0, 1.0]), rtol=0, atol=0)


def test_bad_ema_options_are_refused_in_one_line():
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="update_every must be >= 1, got 0"):
        EMA(update_every=0)


def tiny_module() -> ProGRPOModule:
    return ProGRPOModule(backend=TinySD15Backend(num_steps=4, resolution=32, guidance_scale=2.0, seed=0,
                                                 lora=LoraSettings(rank=2, alpha=2)),
                         rewards=[Brightness()], schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2),
                         update=UpdateSettings(train_batch_size=8, clip_range=0.01), seed=0)


def fit(tmp_path, name, max_steps, ema, ckpt_path=None, val_prompts=None):
    pl.seed_everything(0)
    module = tiny_module()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path, name=name),
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, val_check_interval=2, check_val_every_n_epoch=None,
                         num_sanity_val_steps=0,
                         callbacks=[ema, pl.callbacks.ModelCheckpoint(
                             dirpath=tmp_path / name / "ckpt", save_last=True, every_n_train_steps=1)])
    data = PromptDataModule(prompts="colors", prompts_per_step=2, seed=0, val_prompts=val_prompts,
                            eval_images_per_prompt=2, eval_seed=7, eval_batch_size=4)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def test_ema_is_in_the_checkpoint_and_resumes_exactly(tmp_path):
    straight_ema = EMA(decay=0.5)
    straight, _ = fit(tmp_path, "straight", 4, straight_ema)
    part_ema = EMA(decay=0.5)
    fit(tmp_path, "part", 2, part_ema)
    ckpt = tmp_path / "part" / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    state = next(s for s in saved.values() if "shadow" in s)
    assert state["updated_at"] == 2 and set(state["shadow"]) == set(trainable_weights(straight))
    resumed_ema = EMA(decay=0.5)
    resumed, trainer = fit(tmp_path, "resumed", 4, resumed_ema, ckpt_path=str(ckpt))
    assert trainer.global_step == 4 and resumed_ema.updated_at == 4
    raw = trainable_weights(straight)
    moved = 0.0
    for n, v in straight_ema.shadow.items():
        torch.testing.assert_close(resumed_ema.shadow[n], v, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((v - raw[n].detach()).abs().max()))
    assert moved > 1e-4  # the EMA lags the trained weights: it is not a copy of them


def test_raw_and_ema_held_out_scores_are_both_logged(tmp_path):
    ema = EMA(decay=0.5)
    module, trainer = fit(tmp_path, "eval", 3, ema, val_prompts=VAL)
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # one training reward (brightness, weight 1): its held-out score is the total
    raw = {r["step"]: float(r["val/total"]) for r in rows if r.get("val/total")}
    ema_rows = {r["step"]: float(r["val_ema/total"]) for r in rows if r.get("val_ema/total")}
    assert len(raw) == 2 and set(raw) == set(ema_rows)  # every 2 steps and at the end, both
    assert sorted(p.name for p in (Path(trainer.log_dir) / "eval").glob("val_ema_*.csv")) == [
        "val_ema_step000002.csv", "val_ema_step000003.csv"]
    # recompute the last EMA score by hand: the EMA weights, the held-out items' own noise
    items = EvalItems(VAL, 2, eval_seed=7)
    prompts, seeds = [items[k]["prompt"] for k in range(4)], [items[k]["seed"] for k in range(4)]
    with ema.swapped(module):
        ema_score = Brightness()(sample_items(module.backend, prompts, seeds), prompts).mean()
    raw_score = Brightness()(sample_items(module.backend, prompts, seeds), prompts).mean()
    last = max(raw, key=int)
    assert ema_rows[last] == pytest.approx(float(ema_score), rel=1e-5)
    assert raw[last] == pytest.approx(float(raw_score), rel=1e-5)
    assert abs(float(ema_score) - float(raw_score)) > 1e-6  # two different models were scored


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return save_tiny_sd15_pipeline(str(tmp_path_factory.mktemp("tiny_sd15")), resolution=32)


def test_ema_export_loads_in_the_stock_pipeline(sd15_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    backend = SD15Backend(sd15_folder, num_steps=4, resolution=32, lora=LoraSettings(rank=2, alpha=4))
    backend.configure_model()
    params = backend.trainable_parameters()
    g = torch.Generator().manual_seed(1)
    first = [torch.randn(p.shape, generator=g) * 0.3 for p in params]
    second = [torch.randn(p.shape, generator=g) * 0.3 for p in params]
    ema = EMA(decay=0.5)
    with torch.no_grad():
        for p, a in zip(params, first):
            p.copy_(a)
        ema.update(backend, 0)
        for p, b in zip(params, second):
            p.copy_(b)
        ema.update(backend, 1)  # the EMA is the midpoint of the two
    raw_out = unet_out(backend.unet)
    with torch.no_grad():  # the expected model: the midpoint set by hand
        for p, a, b in zip(params, first, second):
            p.copy_((a + b) / 2)
    mid_out = unet_out(backend.unet)
    with torch.no_grad():
        for p, b in zip(params, second):
            p.copy_(b)
    assert (mid_out - raw_out).abs().max() > 1e-3

    with ema.swapped(backend):
        export_lora(backend, str(tmp_path / "lora"))
    torch.testing.assert_close(unet_out(backend.unet), raw_out, rtol=0, atol=0)  # raw weights back
    pipe = StableDiffusionPipeline.from_pretrained(sd15_folder)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)
    torch.testing.assert_close(unet_out(pipe.unet), mid_out, rtol=1e-4, atol=1e-5)


OVERRIDE = """\
trainer:
  max_steps: 2
""" + CALLBACKS_WITH_EXPORT + """\
    - class_path: pro_grpo_lightning.ema.EMA
      init_args: {{decay: 0.5}}
optimizer:
  class_path: torch.optim.AdamW
  init_args: {{lr: 0.03}}
data:
  prompts_per_step: 2
"""


def test_export_callback_and_cli_write_the_ema_weights(tmp_path):
    cli = cli_main(["fit", *config_args(tmp_path, "run", OVERRIDE)])
    (ema,) = [c for c in cli.trainer.callbacks if isinstance(c, EMA)]
    module = cli.model
    unet = module.backend.unet
    raw_out = unet_out(unet)
    with ema.swapped(module):
        ema_out = unet_out(unet)
    assert (ema_out - raw_out).abs().max() > 1e-6

    def exported(folder):
        pipe = fresh_pipeline(module.backend)
        pipe.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME)
        return unet_out(pipe.unet)

    (at_end,) = glob.glob(str(tmp_path / "run" / "*" / "lora"))  # the ExportLoRA callback: the EMA
    torch.testing.assert_close(exported(at_end), ema_out, rtol=1e-4, atol=1e-5)
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    export_main(["--ckpt", ckpt, "--out", str(tmp_path / "ema"), "--ema"])
    torch.testing.assert_close(exported(str(tmp_path / "ema")), ema_out, rtol=1e-4, atol=1e-5)
    export_main(["--ckpt", ckpt, "--out", str(tmp_path / "raw")])
    torch.testing.assert_close(exported(str(tmp_path / "raw")), raw_out, rtol=1e-4, atol=1e-5)
