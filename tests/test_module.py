"""The LightningModule end to end on the tiny SD1.5 model: Trainer fit, logs, checkpoint/resume, CLI."""

import glob
import os

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from pro_grpo_lightning.backends.base import LoraSettings
from pro_grpo_lightning.backends.sd15 import TinySD15Backend
from pro_grpo_lightning.cli import main
from pro_grpo_lightning.data import PromptDataModule
from pro_grpo_lightning.module import ProGRPOModule
from pro_grpo_lightning.rollout import RolloutSettings
from pro_grpo_lightning.rewards.image_stats import Brightness
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings


def tiny_module(**kw) -> ProGRPOModule:
    args = dict(
        backend=TinySD15Backend(num_steps=4, resolution=32, guidance_scale=2.0, seed=0,
                                lora=LoraSettings(rank=2, alpha=2)),
        rewards=[Brightness()],
        schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        update=UpdateSettings(train_batch_size=8, clip_range=0.01), seed=0)
    args.update(kw)
    return ProGRPOModule(**args)


def fit(module, tmp_path, max_steps, ckpt_path=None, name="run"):
    pl.seed_everything(0)  # the LoRA init draws from the global RNG, as with the CLI's seed_everything
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path, name=name),
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name / "ckpt",
                                                                 save_last=True, every_n_train_steps=1)])
    trainer.fit(module, PromptDataModule(prompts="colors", prompts_per_step=2, seed=0), ckpt_path=ckpt_path)
    return trainer


def read_metrics(trainer):
    import csv
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        return [r for r in csv.DictReader(f) if r.get("reward/mean")]


def lora(module):
    return {k: v.clone() for k, v in module.backend.lora_state_dict().items()}


def test_fit_logs_what_a_user_needs_and_updates_only_lora(tmp_path):
    module = tiny_module(rollout=RolloutSettings(audit_every_n_rollouts=2))
    trainer = fit(module, tmp_path, max_steps=2)
    assert trainer.global_step == 2 and module.rollouts_done == 2
    rows = read_metrics(trainer)
    assert len(rows) == 2
    keys = set(rows[0])
    for k in ["reward/mean", "reward/group_std", "group_std/expanded_proxy",
              "group_std/survivors_proxy", "train/policy_loss",
              "train/clip_frac", "train/approx_kl", "train/grad_norm", "train/lr",
              "pruning/proxy_true_corr_survivors_0", "pruning/audit_overlap", "pruning/audit_proxy_corr_full_0"]:
        assert k in keys, k
    # one quantity, one column: the one reward is reward/mean, the loss without KL is the policy loss,
    # the compute figures are constants (hyperparameters), the rollout counter is the step
    assert not {"reward/brightness", "train/loss", "rollouts", "epoch"} & keys
    assert not {k for k in keys if k.startswith("compute/")}
    # callbacks still see every figure: 2 prompts x (4 x 2 steps + 2 x 2 steps) = 24 denoiser calls
    # vs 2 x 4 x 4 = 32 (rollout 1; rollout 0 was audited: the whole group ran)
    assert float(trainer.callback_metrics["compute/nfe"]) == 24.0
    assert float(trainer.callback_metrics["compute/nfe_saved_frac"]) == pytest.approx(0.25)
    assert float(trainer.callback_metrics["reward/brightness"]) == float(trainer.callback_metrics["reward/mean"])
    assert float(rows[0]["train/ratio_mean"]) == pytest.approx(1.0, abs=1e-4)  # on-policy


def test_resume_restores_lora_optimizer_rng_and_counters(tmp_path):
    full = tiny_module()
    fit(full, tmp_path, max_steps=3, name="full")
    part = tiny_module()
    fit(part, tmp_path, max_steps=2, name="part")
    ckpt = tmp_path / "part" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    # only the adapter (and reward stats) is stored, not the frozen base model
    assert state["state_dict"] and all("lora" in k or k.startswith("rewards.") for k in state["state_dict"])
    assert state["pro_grpo"]["rollouts_done"] == 2
    # the prompt loader resumes mid-epoch: 2 batches of epoch 0 were consumed
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_done": 2}]
    resumed = tiny_module()
    trainer = fit(resumed, tmp_path, max_steps=3, ckpt_path=str(ckpt), name="resumed")
    assert trainer.global_step == 3 and resumed.rollouts_done == 3
    for k, v in lora(full).items():
        torch.testing.assert_close(lora(resumed)[k], v, rtol=1e-5, atol=1e-6)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    fit(tiny_module(), tmp_path, max_steps=1, name="a")
    other = tiny_module(backend=TinySD15Backend(num_steps=4, resolution=32, seed=0,
                                                lora=LoraSettings(rank=2, alpha=2, target_modules=["to_q"])))
    ckpt = str(tmp_path / "a" / "ckpt" / "last.ckpt")
    other.configure_model()
    # a model with other adapter targets lacks none of these keys but has fewer; rank change -> shape error
    wider = tiny_module(backend=TinySD15Backend(num_steps=4, resolution=32, seed=0,
                                                lora=LoraSettings(rank=2, alpha=2,
                                                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])))
    from pro_grpo_lightning.errors import ConfigError
    from pro_grpo_lightning.export import load_checkpoint_into
    # the checkpoint names its LoRA setting: refused in one line naming both values
    with pytest.raises(ConfigError, match=r"has lora.target_modules=None but this run has lora.target_modules=\['ff"):
        fit(wider, tmp_path, max_steps=2, ckpt_path=ckpt, name="b")
    with pytest.raises(ConfigError, match=r"has lora.target_modules=None but this run has lora.target_modules=\['to_q'\]"):
        load_checkpoint_into(other, ckpt)
    # a checkpoint without that record (older ones) is still refused by its weights' names
    state = torch.load(ckpt, weights_only=True)
    del state["pro_grpo"]["identity"]
    ckpt = str(tmp_path / "old.ckpt")
    torch.save(state, ckpt)
    with pytest.raises(KeyError, match="adapter weights"):
        fit(wider, tmp_path, max_steps=2, ckpt_path=ckpt, name="b")
    # outside a Trainer (export, scripts/eval_shapes.py): refused both ways, accepted when it matches
    with pytest.raises(KeyError, match="weights this model lacks"):
        load_checkpoint_into(other, ckpt)  # fewer targets: the checkpoint has more
    with pytest.raises(KeyError, match="adapter weights"):
        load_checkpoint_into(wider, ckpt)
    same = tiny_module()
    load_checkpoint_into(same, ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    adapter = {n: p for n, p in same.named_parameters() if p.requires_grad}
    assert adapter and set(adapter) <= set(saved)
    for n, p in adapter.items():
        torch.testing.assert_close(p.detach(), saved[n])


def test_cli_fit_quickstart_config_for_a_few_steps(tmp_path):
    """The README's quickstart (the pretrained shapes model, exact reward), fewer prompts a rollout."""
    main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", "2",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path), "--model.samples.every_n_rollouts", "1",
          "--data.prompts_per_step", "2", "--data.eval_images_per_prompt", "1"])
    events = glob.glob(str(tmp_path / "quickstart" / "*" / "events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(events[0], size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "reward/mean" in acc.Tags()["scalars"]
    assert len(acc.Scalars("reward/mean")) == 2
    assert "samples/fixed_prompts" in acc.Tags()["images"]
    # the held-out evaluation before training (the config's full sanity check) and after the last
    # rollout: graded reward and exact rate, 36 prompts, at the optimizer steps behind the weights
    exact = acc.Scalars("val/shapes_exact")
    assert [e.step for e in exact] == [0, 2] and all(0.0 <= e.value <= 1.0 for e in exact)
    assert all(0.5 < v.value <= 1.0 for v in acc.Scalars("val/total"))  # the shapes reward (one reward: the total)
    assert "val/shapes" not in acc.Tags()["scalars"]


def test_bad_module_options_fail_before_any_weights_load():
    backend = TinySD15Backend(num_steps=4, resolution=32, seed=0)
    with pytest.raises(ValueError, match="flow-matching backend"):
        tiny_module(backend=backend, update=UpdateSettings(kl_type="flow_grpo", kl_beta=0.01))
    with pytest.raises(ValueError, match="preview_scale"):
        tiny_module(rollout=RolloutSettings(preview_scale=1.5))
    with pytest.raises(ValueError, match="outside"):
        tiny_module(schedule=ProGRPOSchedule(group_size=4, checkpoints=[4], keep=[2]))


def test_cli_sample_batch_size_below_a_group_runs_and_hparams_are_nested(tmp_path):
    """``--model.rollout.sample_batch_size 3`` (groups of 8) end to end through the CLI, with a nested
    override of the update; hparams.yaml holds the groups as plain nested mappings. (That chunks
    change no result is tests/test_rollout.py's check, per backend: here Adam's first step would
    amplify float-rounding differences of near-zero gradients.)"""
    cli = main(["fit", "--config", "configs/tiny_sd15.yaml", "--trainer.max_steps", "1",
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                "--trainer.default_root_dir", str(tmp_path), "--model.samples.every_n_rollouts", "0",
                "--data.prompts_per_step", "2", "--model.rollout.sample_batch_size", "3",
                "--model.update.clip_range", "0.02"])
    module = cli.model
    assert module.sample_batch_size == 3 and module.rollout.sample_batch_size == 3
    assert module.settings.clip_range == 0.02 and module.trainer.global_step == 1
    (hparams,) = glob.glob(str(tmp_path / "**" / "hparams.yaml"), recursive=True)
    saved = yaml.safe_load(open(hparams))
    # the run's hyperparameters, flattened (logs.run_hparams: the HParams view's keys)
    assert saved["rollout.sample_batch_size"] == 3 and saved["update.clip_range"] == 0.02
    assert (saved["advantages.clip"], saved["advantages.std"], saved["advantages.eps"]) == (5.0, "group", 1e-4)
    assert not any(k.startswith("guards") for k in saved)
