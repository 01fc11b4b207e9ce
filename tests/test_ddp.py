"""DDP through Lightning's strategy: 2 gloo processes on CPU equal 1 process with the same global batch.

The 2-rank run has P = 1 prompt per rank, the 1-process run P = 2: the sampler gives rank r the
r-th prompt of each global batch, the rollout noise is each rank's slice of one global draw, and
DDP averages the ranks' mean losses' gradients, which is the single process's mean over all
(trajectory, step) pairs (train_batch_size divides each rank's pair count). So the groups, the
rewards and the updates are the same up to float summation order.
"""

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pro_grpo_lightning.cli import main
from pro_grpo_lightning.data import PromptDataModule, ResumableDataLoader, ResumableShuffleSampler
from tests.cli_runs import CALLBACKS_WITH_EXPORT, ROOT, config_args, run_metrics


# Tiny SD1.5 at 32 px, 4 steps, groups of 4 pruned to 2 after step 1. SGD, not Adam: Adam's first
# update is about lr * sign(g), which turns float rounding of near-zero gradient entries into
# lr-sized differences; SGD keeps weight differences at rounding level, so the test can be tight.
OVERRIDE = """\
trainer:
  max_steps: 2
""" + CALLBACKS_WITH_EXPORT + """\
model:
  reward_normalize: batch
  update:
    train_batch_size: 8
optimizer:
  class_path: torch.optim.SGD
  init_args: {{lr: 1.0}}
data:
  val_prompts: [a cat, a dog, a horse]  # 3 items on 2 ranks: shards of 2 and 1, gathered at the end
  eval_images_per_prompt: 1
"""


def run_args(tmp_path: Path, name: str) -> list[str]:
    return config_args(tmp_path, name, OVERRIDE, out=tmp_path / name)


def test_sampler_shards_each_global_batch_by_rank_and_resumes_mid_epoch():
    single = list(ResumableShuffleSampler(12, seed=3, batch_size=4, num_replicas=1, rank=0))
    ranks = [list(ResumableShuffleSampler(12, seed=3, batch_size=2, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(single) == list(range(12))
    for b in range(3):  # global batch b of one process = rank 0's batch b, then rank 1's
        assert single[4 * b:4 * b + 4] == ranks[0][2 * b:2 * b + 2] + ranks[1][2 * b:2 * b + 2]
    assert not set(ranks[0]) & set(ranks[1])
    # incomplete global batches are dropped on every rank: 10 prompts, 2 x 2 per step -> 2 steps
    assert [len(ResumableShuffleSampler(10, 0, 2, 2, r)) for r in range(2)] == [4, 4]
    # resume: skip the batches already done, on this rank's own stream
    s = ResumableShuffleSampler(12, seed=3, batch_size=2, num_replicas=2, rank=1)
    loader = ResumableDataLoader(list(range(12)), batch_size=2, sampler=s, drop_last=True, progress=lambda: (0, 0))
    loader.load_state_dict({"epoch": 0, "batches_done": 2})
    assert [t.tolist() for t in loader] == [ranks[1][4:6]]
    with pytest.raises(ValueError, match="prompts_per_step"):
        ResumableShuffleSampler(3, 0, batch_size=2, num_replicas=2, rank=0)


def test_lightning_keeps_our_sampler_under_ddp():
    """Lightning only injects a DistributedSampler where the loader's sampler is not one."""
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector

    dm = PromptDataModule(prompts="colors", prompts_per_step=2)

    class FakeTrainer:  # what train_dataloader reads
        global_rank, world_size = 1, 3

    dm.trainer = FakeTrainer()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
    assert (loader.sampler.rank, loader.sampler.num_replicas) == (1, 3) and len(loader) == 2

    class Connector:  # _requires_distributed_sampler with use_distributed_sampler=True, distributed
        use_distributed_sampler, is_distributed = True, True

    fake = type("T", (), {"_accelerator_connector": Connector()})()
    assert not _DataConnector(fake)._requires_distributed_sampler(loader)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_file = tmp_path / "ddp.log"
    with open(log_file, "w") as log:  # a file, not a pipe: a full pipe would stall the ranks
        ddp = subprocess.Popen(
            [sys.executable, "-m", "pro_grpo_lightning", "fit", *run_args(tmp_path, "ddp"),
             "--data.prompts_per_step", "1",
             "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:  # the 1-process run in this process meanwhile
            main(["fit", *run_args(tmp_path, "single"), "--data.prompts_per_step", "2"])
            ddp.wait(timeout=300)
        finally:
            ddp.kill()
    log = log_file.read_text()
    assert ddp.returncode == 0, log[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log

    single = torch.load(tmp_path / "single/ckpt/last.ckpt", weights_only=False)
    two = torch.load(tmp_path / "ddp/ckpt/last.ckpt", weights_only=False)
    assert single["global_step"] == two["global_step"] == 2
    assert single["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_done": 2}]
    lora_single, lora_two = single["state_dict"], two["state_dict"]
    assert set(lora_single) == set(lora_two) and any("lora_B" in k for k in lora_single)
    moved = 0.0
    for k, v in lora_single.items():
        if "lora_B" in k:
            moved = max(moved, v.abs().max().item())  # B starts at 0: the updates are real
        torch.testing.assert_close(lora_two[k], v, rtol=0, atol=2e-6)
    assert moved > 1e-3

    # same groups (rewards), same global counts, same synchronised gradient, rollout by rollout
    rows_single, rows_two = run_metrics(tmp_path / "single", "reward/mean"), run_metrics(tmp_path / "ddp", "reward/mean")
    assert len(rows_single) == len(rows_two) == 2
    for a, b in zip(rows_single, rows_two):
        # the raw reward to float precision; the batch-z-scored total (O(1) values, whose global
        # statistics the ranks share) to 1e-4: z-scoring divides VAE/batch-size rounding by a small std
        for key, tol in [("reward/brightness", 1e-6), ("reward/mean", 1e-4), ("reward/min", 1e-4),
                         ("reward/max", 1e-4), ("reward/group_std", 1e-4), ("train/grad_norm", 1e-5),
                         ("train/ratio_mean", 1e-6)]:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=tol, abs=tol), key
    for n in ("single", "ddp"):  # the global batch's denoiser calls: 2 x 2 prompts in both (a constant, logged once)
        (hp,) = glob.glob(str(tmp_path / n / "run" / "*" / "hparams.yaml"))
        assert yaml.safe_load(open(hp))["compute.nfe_per_rollout"] == 2 * (4 * 2 + 2 * 2)

    # the held-out table after the last rollout (gathered from both ranks) and the exported LoRA
    tables = [list(csv.DictReader(open(glob.glob(str(tmp_path / n / "run" / "*" / "eval" / "val_step000002.csv"))[0])))
              for n in ("single", "ddp")]
    assert [r["prompt"] for r in tables[1]] == ["a cat", "a dog", "a horse"]
    for a, b in zip(*tables):
        assert float(a["brightness"]) == pytest.approx(float(b["brightness"]), rel=1e-5)
    (lora,) = glob.glob(str(tmp_path / "ddp" / "run" / "*" / "lora" / "pytorch_lora_weights.safetensors"))
    from safetensors.torch import load_file
    exported = load_file(lora)
    assert len(exported) == sum("lora_" in k for k in lora_two) and all(k.startswith("unet.") for k in exported)


@pytest.mark.parametrize("window", [None, [1, 3]])
def test_step_with_given_noise_is_the_backends_own_sampling_step(window):
    from pro_grpo_lightning.backends.flux import TinyFluxBackend
    from pro_grpo_lightning.backends.sd3 import TinySD3Backend
    from pro_grpo_lightning.backends.sd15 import TinySD15Backend
    from pro_grpo_lightning.steps import draw_noise

    for backend in (TinySD15Backend(num_steps=4, resolution=32, sde_window=window),
                    TinySD3Backend(num_steps=4, resolution=32, sde_window=window),
                    TinyFluxBackend(num_steps=4, resolution=32, sde_window=window)):
        backend.configure_model()
        cond = backend.encode_prompts(["a cat", "a dog", "a fox"])
        x = backend.initial_latents(3, torch.Generator().manual_seed(0))
        idx = torch.tensor([0, 1, 3])  # mixed steps, including the last
        z = draw_noise(x.shape, x.device, torch.Generator().manual_seed(5))  # [3, *latent]
        with torch.no_grad():
            drawn = backend.step(x, idx, cond, generator=torch.Generator().manual_seed(5))
            given = backend.step(x, idx, cond, noise=z)
            other = backend.step(x, idx, cond, noise=torch.randn_like(z))
            rescored = backend.step(x, idx, cond, next_latents=given.next_latents)
        torch.testing.assert_close(given.next_latents, drawn.next_latents, rtol=0, atol=0)
        torch.testing.assert_close(given.log_prob, drawn.log_prob, rtol=0, atol=0)
        torch.testing.assert_close(rescored.log_prob, given.log_prob, rtol=0, atol=0)
        # the noise is used as z of next = mean + std z (rows with std 0 ignore it)
        std = given.std.view(-1, *[1] * (z.ndim - 1))
        torch.testing.assert_close(given.next_latents, given.mean + std * z, rtol=0, atol=1e-6)
        moved = (given.std > 0).tolist()
        assert [not torch.equal(a, b) for a, b in zip(given.next_latents, other.next_latents)] == moved
        assert any(moved)
        with pytest.raises(ValueError, match="not both"):
            backend.step(x, idx, cond, noise=z, next_latents=given.next_latents)


def test_rank_slices_of_one_rollout_are_the_single_process_rollout():
    """2 'ranks' x 1 prompt sample exactly the groups of 1 process x 2 prompts (no processes needed)."""
    from pro_grpo_lightning.backends.sd15 import TinySD15Backend
    from pro_grpo_lightning.noise import mix_seed
    from pro_grpo_lightning.rewards.combine import RewardSet
    from pro_grpo_lightning.rewards.image_stats import Brightness
    from pro_grpo_lightning.rollout import ExpandPruneRollout
    from pro_grpo_lightning.schedules import ProGRPOSchedule

    backend = TinySD15Backend(num_steps=4, resolution=32)
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([Brightness()]),
                                 ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]))
    prompts = ["a cat", "a dog"]

    def run(prompts, rank, world):
        return rollout.run(prompts, torch.Generator().manual_seed(1),
                           noise_generator=torch.Generator().manual_seed(mix_seed(0, 7, 0)), rank=rank,
                           world_size=world)

    whole = run(prompts, 0, 1)
    parts = [run(prompts[r:r + 1], r, 2) for r in range(2)]
    torch.testing.assert_close(torch.cat([p.latents for p in parts]), whole.latents, rtol=1e-4, atol=1e-5)  # batch-size-dependent conv kernels: rounding
    torch.testing.assert_close(torch.cat([p.rewards for p in parts]), whole.rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p.checkpoints[0].kept for p in parts]), whole.checkpoints[0].kept)
    assert not torch.allclose(parts[0].latents[:, 0], parts[1].latents[:, 0])  # ranks' noise differs


def test_mix_seed_separates_tuples_that_a_linear_formula_would_merge():
    from pro_grpo_lightning.noise import mix_seed

    seeds = {mix_seed(s, k, stream) for s in range(4) for k in range(50) for stream in range(2)}
    assert len(seeds) == 400 and all(0 <= v < 2**63 for v in seeds)
    assert mix_seed(0, 1_000_003) != mix_seed(1, 0) and mix_seed(1, 2) != mix_seed(2, 1)
