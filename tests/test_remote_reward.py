"""Rewards served from another process: the real ``reward_server`` as a subprocess on 127.0.0.1.

Same scores as in-process (exact with float32 images, to the PNG rounding with uint8), metadata
and non-finite scores across the wire, batching, the one-line errors (server down, wrong count,
a refusing scorer), a tiny CLI run whose reward is remote (same training as in-process), and a
server killed mid-run (retries, then a clean one-line stop, the last checkpoint intact).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
import torch

from pro_grpo_lightning.cli import main
from pro_grpo_lightning.reward_server import DEFAULT_MAX_BODY_BYTES, load_reward
from pro_grpo_lightning.rewards.image_stats import Brightness
from pro_grpo_lightning.rewards.remote import RemoteReward, RemoteRewardError, decode_request, encode_request
from tests.cli_runs import ROOT, config_args, run_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@contextmanager
def reward_server(reward: str, *extra: str):
    """Start ``python -m pro_grpo_lightning.reward_server`` on a free loopback port; yield (url, process);
    always kill it."""
    proc = subprocess.Popen([sys.executable, "-m", "pro_grpo_lightning.reward_server", "--reward", reward,
                             "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *extra],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        line = first[0] if first else ""
        if "listening on http://127.0.0.1:" not in line:
            proc.kill()
            raise RuntimeError(f"reward server did not start: {line!r} {proc.stderr.read()[-2000:]}")
        url = line.split("listening on ")[1].split()[0]
        yield url, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def brightness_url():
    with reward_server("pro_grpo_lightning.rewards.image_stats.Brightness") as (url, _):
        yield url


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wire_format_round_trip():
    images = torch.rand(3, 3, 5, 4)
    meta = [{"tag": "counting", "include": [{"class": "cat", "count": 2}]}, {}, {"text": "é ✓"}]
    body = encode_request(images, ["a", "b", "c"], meta)
    x, prompts, metadata = decode_request(body)
    assert torch.equal(x, images) and prompts == ["a", "b", "c"] and metadata == meta
    x8, _, none = decode_request(encode_request(images, ["a", "b", "c"], None, image_dtype="uint8"))
    assert none is None and torch.equal(x8, (images * 255).round() / 255)
    with pytest.raises(ValueError, match="not a safetensors file"):
        decode_request(b"\x00" * 16)


def test_remote_scores_equal_in_process(brightness_url):
    images = torch.rand(5, 3, 16, 16)
    prompts = [f"p{i}" for i in range(5)]
    local = Brightness()(images, prompts)  # [5]
    remote = RemoteReward(brightness_url)
    remote.configure_model()  # health check
    assert remote.health() == {"status": "ok", "name": "brightness",
                               "reward": "pro_grpo_lightning.rewards.image_stats.Brightness",
                               "max_body_bytes": DEFAULT_MAX_BODY_BYTES}
    assert torch.equal(remote(images, prompts), local)
    # several requests of batch_size images: the same scores, in order (a [2, ...] batch's float32 mean
    # may be reduced in another order than the [5, ...] one's: equal to the last bits, not always exactly)
    torch.testing.assert_close(RemoteReward(brightness_url, batch_size=2)(images, prompts), local, rtol=1e-6, atol=0)
    # uint8 on the wire = the in-process score of the images rounded to 1/255
    rounded = (images * 255).round() / 255
    assert torch.equal(RemoteReward(brightness_url, image_dtype="uint8")(images, prompts),
                       Brightness()(rounded, prompts))


@pytest.fixture(scope="module")
def scripted_url():
    with reward_server("tests.remote_rewards.Scripted") as (url, _):
        yield url


def test_metadata_and_non_finite_scores_cross_the_wire(scripted_url):
    remote = RemoteReward(scripted_url, batch_size=2)
    images = torch.zeros(3, 3, 4, 4)
    scores = remote(images, ["a", "b", "c"], [{"value": 1.5}, {"value": float("inf")}, {}])
    assert scores[0] == 1.5 and torch.isnan(scores[1:]).all()  # inf and missing: non-finite -> NaN
    assert torch.isnan(remote(images, ["a", "b", "c"])).all()  # no metadata at all


def test_server_down_is_retried_then_one_line(caplog):
    url = f"http://127.0.0.1:{free_port()}"
    remote = RemoteReward(url, retries=2, backoff=0.01, timeout=5)
    with caplog.at_level(logging.WARNING), pytest.raises(RemoteRewardError) as err:
        remote(torch.zeros(1, 3, 4, 4), ["a"])
    msg = str(err.value)
    assert "\n" not in msg and f"no answer from {url}/score after 3 attempt(s)" in msg
    assert [r.getMessage().split("; ")[-1] for r in caplog.records] == ["retry 1/2 in 0.0 s", "retry 2/2 in 0.0 s"]
    with pytest.raises(RemoteRewardError, match="is the reward server running"):
        RemoteReward(url, retries=0).configure_model()  # a wrong URL fails before the first rollout


def test_a_server_that_never_answers_times_out_and_is_retried(caplog):
    with socket.socket() as silent:  # listens (the kernel accepts the connection) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with caplog.at_level(logging.WARNING), pytest.raises(RemoteRewardError, match="after 2 attempt"):
            RemoteReward(url, timeout=0.2, retries=1, backoff=0.01)(torch.zeros(1, 3, 4, 4), ["a"])
    assert len(caplog.records) == 1 and "timed out" in caplog.records[0].getMessage()


def test_wrong_count_and_refusals_are_one_line_errors(scripted_url, caplog):
    images = torch.zeros(2, 3, 4, 4)
    # the server checks what its reward returns: one line naming it and the expected shape
    with pytest.raises(RemoteRewardError, match=r"/score answered HTTP 500: reward 'scripted' returned a "
                                                r"torch.float32 tensor of shape \[3\], expected a real tensor of "
                                                r"shape \[2\] \(one score per image\)$"):
        RemoteReward(scripted_url)(images, ["a", "b"], [{"value": 1}, {"misbehave": "extra_score"}])
    with caplog.at_level(logging.WARNING):
        with pytest.raises(RemoteRewardError, match="HTTP 400: this scorer refuses the batch$"):
            RemoteReward(scripted_url, retries=3, backoff=10)(images, ["a", "b"], [{}, {"misbehave": "refuse"}])
        assert not caplog.records  # the server answered: no retry (backoff=10 would have shown)
    # the server keeps serving after both
    assert RemoteReward(scripted_url)(images, ["a", "b"], [{"value": 2}, {"value": 3}]).tolist() == [2, 3]


def test_bad_arguments_fail_in_one_line():
    with pytest.raises(ValueError, match="must start with http"):
        RemoteReward("127.0.0.1:8000")
    with pytest.raises(ValueError, match="image_dtype must be one of"):
        RemoteReward("http://127.0.0.1:1", image_dtype="png")
    with pytest.raises(ValueError, match="is not a subclass of pro_grpo_lightning.rewards.Reward"):
        load_reward("torch.nn.Linear")
    with pytest.raises(ValueError, match="cannot import it"):
        load_reward("no_such_package.Reward")
    out = subprocess.run([sys.executable, "-m", "pro_grpo_lightning.reward_server", "--reward",
                          "pro_grpo_lightning.rewards.image_stats.Brightness", "--init_args", "[1]"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: pro-grpo serve-reward: init_args=[1]: expected dict[str, Any] or None"]


# ---- training against a served reward -----------------------------------------------------------

def rewards_override(reward_block: str) -> str:
    return ("trainer:\n  max_steps: {max_steps}\n"
            "model:\n  rewards:\n" + reward_block +
            "data:\n  prompts: colors\n  prompts_per_step: 2\n")


IN_PROCESS = "    - class_path: pro_grpo_lightning.rewards.image_stats.Brightness\n"
REMOTE = ("    - class_path: pro_grpo_lightning.rewards.remote.RemoteReward\n"
          "      init_args: {{url: \"{url}\", name: brightness, retries: 2, backoff: 0.05, timeout: 30}}\n")


@pytest.mark.slow
def test_training_against_the_served_reward_equals_in_process(tmp_path, brightness_url):
    for name, block in (("local", IN_PROCESS), ("remote", REMOTE)):
        main(["fit", *config_args(tmp_path, name, rewards_override(block), out=tmp_path / name,
                                  max_steps=2, url=brightness_url)])
    local, remote = run_metrics(tmp_path / "local", "reward/mean"), run_metrics(tmp_path / "remote", "reward/mean")
    assert len(local) == len(remote) == 2
    # The server scores a contiguous copy of the decoded images, the in-process reward the VAE's
    # output as laid out in memory: a reduction in another order, so scores agree to float32
    # rounding (~1e-7 on ~0.5), not bit for bit; advantages (divided by a ~1e-3 std) and gradients
    # inherit that. Step 2's rewards come from the weights step 1 updated: the updates matched too.
    for a, b in zip(local, remote):  # same rewards, hence the same pruning, advantages and updates
        for key, tol in (("reward/mean", 2e-7), ("reward/min", 2e-7), ("reward/max", 2e-7),
                         ("reward/group_std", 2e-7), ("group_std/expanded_proxy", 2e-7),
                         ("advantage/abs_mean", 1e-3 * float(a["advantage/abs_mean"])),
                         ("train/grad_norm", 1e-3 * float(a["train/grad_norm"]))):
            assert abs(float(a[key]) - float(b[key])) <= tol, (key, a[key], b[key])
    assert float(local[0]["reward/mean"]) > 0 and float(local[0]["reward/group_std"]) > 1e-4


@pytest.mark.slow
def test_server_killed_mid_run_retries_then_stops_cleanly(tmp_path):
    with reward_server("pro_grpo_lightning.rewards.image_stats.Brightness") as (url, server):
        override = rewards_override(REMOTE) + (
            "trainer:\n  max_steps: {max_steps}\n  callbacks:\n"
            "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            "      init_args: {{dirpath: \"{out}/ckpt\", save_last: true, every_n_train_steps: 1}}\n"
            "    - class_path: tests.remote_rewards.KillAtStep\n"
            "      init_args: {{pid: {pid}, step: 2}}\n")
        override = override.replace("trainer:\n  max_steps: {max_steps}\nmodel:", "model:", 1)
        args = config_args(tmp_path, "killed", override, max_steps=4, url=url, pid=server.pid)
        run = subprocess.run([sys.executable, "-m", "pro_grpo_lightning", "fit", *args], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=300)
        assert server.wait(timeout=30) == -9  # the callback killed it after step 2
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr[-3000:]
    assert err[-1].startswith(f"error: RemoteReward 'brightness': no answer from {url}/score "
                              f"after 3 attempt(s)"), err[-1]
    assert "Traceback" not in run.stderr
    assert sum("retry 1/2" in line for line in err) == 1 and sum("retry 2/2" in line for line in err) == 1
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # the last good step
    assert state["global_step"] == 2 and state["pro_grpo"]["rollouts_done"] == 2
    assert state["state_dict"] and all(torch.isfinite(v).all() for v in state["state_dict"].values())
