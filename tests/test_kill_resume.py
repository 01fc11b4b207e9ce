"""A run killed with SIGKILL and resumed from its last checkpoint continues exactly as if never stopped.

Exact because everything that decides the next rollout and update is in the checkpoint or is a
function of it: the LoRA weights, AdamW's moments, the rollout counter (rollout k's noise is seeded
from (seed, k)), and the data position (epoch and batches done; the epoch's order is seeded from
(seed, epoch)). Lightning writes checkpoints through a file-system transaction, so a kill never
leaves a truncated ``last.ckpt``.
"""

import csv
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pro_grpo_lightning.cli import main
from tests.cli_runs import ROOT, config_args

ROLLOUTS = 5  # 12 prompts / 4 per rollout = 3 rollouts per epoch: the run crosses an epoch boundary
MAX_STEPS = 2 * ROLLOUTS  # optimizer steps: 16 (trajectory, step) pairs / (4 per minibatch x 2 per step)

OVERRIDE = """\
trainer:
  max_steps: {max_steps}
model:
  reward_normalize: running
  update:
    timestep_fraction: 0.5
    train_batch_size: 4
    minibatches_per_step: 2
data:
  prompts: colors
  prompts_per_step: 4
"""


def config(tmp_path: Path, name: str) -> list[str]:
    return ["fit", *config_args(tmp_path, name, OVERRIDE, out=tmp_path / name, max_steps=MAX_STEPS)]


def metrics_by_step(out: Path) -> dict[int, dict[str, str]]:
    rows = {}
    for path in sorted(glob.glob(str(out / "run" / "*" / "metrics.csv"))):
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get("reward/mean"):
                    rows[int(r["step"]) + 1] = r  # rollouts done; the resumed version overwrites the killed one
    return rows


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    # The killed run's first rollouts run in a subprocess, the rest here: both with this process's
    # thread count, since a CPU reduction's rounding depends on how many threads split it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(tmp_path / "killed.log", "w")  # a file, not a pipe: a full pipe would stall the run
    victim = subprocess.Popen([sys.executable, "-m", "pro_grpo_lightning", *config(tmp_path, "killed")],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not glob.glob(str(tmp_path / "killed/ckpt/*step=4.ckpt")):  # after rollout 2
            assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 4 appeared"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim.kill()
        log.close()
    assert victim.returncode == -signal.SIGKILL  # killed mid-training, not finished
    main(config(tmp_path, "full"))  # the uninterrupted run, in this process

    last = tmp_path / "killed/ckpt/last.ckpt"
    state = torch.load(last, weights_only=False)  # complete, never truncated
    k = state["pro_grpo"]["rollouts_done"]  # 1 if killed between the step file and last.ckpt
    assert 1 <= k < ROLLOUTS and state["global_step"] == 2 * k
    loader_state = {"epoch": (k - 1) // 3, "batches_done": (k - 1) % 3 + 1}
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [loader_state]

    main(config(tmp_path, "killed") + ["--ckpt_path", str(last)])  # the same command, resumed

    full = torch.load(tmp_path / "full/ckpt/last.ckpt", weights_only=False)
    resumed = torch.load(last, weights_only=False)
    assert full["global_step"] == resumed["global_step"] == MAX_STEPS
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():  # LoRA weights and running reward statistics
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-7)
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=0, atol=1e-10)

    # the rollouts after the resume are the uninterrupted run's: same prompts, noise and rewards
    ref, got = metrics_by_step(tmp_path / "full"), metrics_by_step(tmp_path / "killed")
    assert sorted(ref) == list(range(1, ROLLOUTS + 1)) and set(range(k + 1, ROLLOUTS + 1)) <= set(got)
    for step in range(k + 1, ROLLOUTS + 1):
        for key in ["reward/mean", "reward/max", "train/policy_loss", "train/grad_norm"]:
            assert float(got[step][key]) == pytest.approx(float(ref[step][key]), rel=1e-6, abs=1e-9), (step, key)
