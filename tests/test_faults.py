"""Fault cases: a run is never lost to a NaN reward, a bad file, a colliding run dir or a typo.

Numbered as the findings they guard (1: non-finite values, 2: unsafe loading, 3: run dirs,
4: checked resume/export, 5: atomic saves, 6: early validation, 7: one-line errors). CLI findings
are driven through ``cli.run_main`` in-process (what ``python -m pro_grpo_lightning`` runs);
only the kill test uses a subprocess.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pro_grpo_lightning import checkpointing
from pro_grpo_lightning.backends.sd15 import TinySD15Backend
from pro_grpo_lightning.checkpointing import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from pro_grpo_lightning.cli import main, run_main
from pro_grpo_lightning.export import main as export_main
from pro_grpo_lightning.health import BadRolloutGuard, NonFiniteError, finite_groups
from pro_grpo_lightning.objectives import group_advantages
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.selection import select_indices
from pro_grpo_lightning.update import UpdateSettings, grpo_update
from tests.cli_runs import ROOT, config_args, edited_config_copy, run_metrics
from tests.fakes import AffineBackend, MeanPixel

pytestmark = pytest.mark.usefixtures("one_thread")
NAN, INF = float("nan"), float("inf")


# ---- helpers ----------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m pro_grpo_lightning`` in-process: (exit status, stderr)."""
    rc = run_main(main, argv)
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one ``error:`` line of stderr (asserts there is exactly one and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def faulty_run(tmp_path: Path, name: str, schedule: str, reward: str, steps: int, extra: str = "") -> list[str]:
    """A tiny CLI fit whose only reward is ``FaultyBrightness`` (init_args given as YAML flow)."""
    override = f"""\
trainer:
  max_steps: {steps}
model:
  rewards:
    - class_path: tests.fakes.FaultyBrightness
      init_args: {reward}
  schedule: {schedule}
{extra}data:
  prompts_per_step: 2
"""
    return ["fit", *config_args(tmp_path, name, override.replace("{", "{{").replace("}", "}}"),
                                out=tmp_path / name)]


PLAIN4 = "{class_path: pro_grpo_lightning.schedules.PlainGRPOSchedule, init_args: {group_size: 4}}"
PRO = ("{class_path: pro_grpo_lightning.schedules.ProGRPOSchedule, "
       "init_args: {group_size: 6, checkpoints: [1], keep: [4], rule: ovf}}")


def metrics(out: Path) -> list[dict[str, float]]:
    return run_metrics(out, "reward/mean")  # one row per rollout (NaN when no reward was finite)


def assert_finite_checkpoint(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    for k, v in state["state_dict"].items():
        assert torch.isfinite(v).all(), k
    for s in state["optimizer_states"][0]["state"].values():
        assert all(torch.isfinite(v).all() for v in s.values() if torch.is_tensor(v))
    return state


# ---- 1. non-finite values: selection, advantages, statistics, update ----------------------------
@pytest.mark.parametrize("rule", ["ovf", "topk", "extremes", "random"])
def test_nonfinite_previews_are_never_selected_over_finite_ones(rule):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 8, generator=g)  # [P, G]
    bad = torch.rand(50, 8, generator=g) < 0.3
    bad[0] = torch.tensor([True] * 6 + [False] * 2)  # fewer finite than k: all of them are kept
    scores = scores.masked_fill(bad, NAN)
    scores[1, 0] = INF
    scores[2, 3] = -INF
    k = 3
    kept = select_indices(scores, k, rule, generator=torch.Generator().manual_seed(1))  # [P, k]
    n_finite = torch.isfinite(scores).sum(1)
    kept_finite = torch.isfinite(scores.gather(1, kept)).sum(1)
    assert torch.equal(kept_finite, n_finite.clamp(max=k))  # every finite one first
    assert kept[0].tolist() == [0, 6, 7]  # the 2 finite, then the lowest non-finite index
    if rule == "ovf":  # among the finite ones it is still the exact max-variance subset (brute force)
        for p in range(3, 50):
            fin = torch.isfinite(scores[p]).nonzero().flatten().tolist()
            if len(fin) < k:
                continue
            best = max(itertools.combinations(fin, k), key=lambda c: scores[p, list(c)].double().var(unbiased=False))
            assert float(scores[p, kept[p]].double().var(unbiased=False)) == pytest.approx(
                float(scores[p, list(best)].double().var(unbiased=False)), rel=1e-12, abs=1e-12)
    if rule == "topk":  # the k highest finite
        for p in range(3, 50):
            fin = scores[p][torch.isfinite(scores[p])]
            if len(fin) >= k:
                assert sorted(scores[p, kept[p]].tolist()) == sorted(fin.topk(k).values.tolist())


def test_all_finite_selection_is_unchanged():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.4, 0.95, 0.0]])
    assert select_indices(scores, 3, "ovf").tolist() == [[1, 4, 5]]
    assert select_indices(scores, 3, "topk").tolist() == [[1, 2, 4]]
    assert select_indices(scores, 3, "extremes").tolist() == [[1, 4, 5]]


def test_masked_advantages_by_hand():
    r = torch.tensor([[1.0, NAN, 3.0, 5.0],   # 3 valid: mean 3, std sqrt(8/3)
                      [2.0, NAN, INF, 7.0],   # 2 valid: mean 4.5, std 2.5
                      [NAN, 4.0, NAN, -INF],  # 1 valid: whole group dropped
                      [1.0, 2.0, 3.0, 4.0]])  # all valid: mean 2.5, std sqrt(1.25)
    valid = finite_groups(r)
    assert valid.tolist() == [[True, False, True, True], [True, False, False, True],
                              [False] * 4, [True] * 4]
    adv = group_advantages(r, valid, eps=0.0, clip=None)
    s = (8 / 3) ** 0.5
    expected = torch.tensor([[-2 / s, 0, 0, 2 / s], [-1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    expected[3] = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / 1.25 ** 0.5
    torch.testing.assert_close(adv, expected)
    assert torch.isfinite(adv).all()
    glob_adv = group_advantages(r, valid, std_mode="global", eps=0.0, clip=None)
    vals = torch.tensor([1.0, 3.0, 5.0, 2.0, 7.0, 1.0, 2.0, 3.0, 4.0])  # every valid reward
    torch.testing.assert_close(glob_adv[1], torch.tensor([-2.5, 0, 0, 2.5]) / vals.std(unbiased=False))


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_reward_statistics_never_absorb_nonfinite_scores(mode):
    scores = torch.tensor([[1.0, 10.0], [NAN, 20.0], [3.0, INF], [5.0, 30.0]])  # [B, n]
    rs = RewardSet([MeanPixel(name="a"), MeanPixel(name="b")], normalize=mode)
    out = rs._normalize(scores, update_stats=True)
    fin_a, fin_b = torch.tensor([1.0, 3.0, 5.0]), torch.tensor([10.0, 20.0, 30.0])
    exp_a = (scores[:, 0] - fin_a.mean()) / (fin_a.var(unbiased=False).sqrt() + rs.eps)
    exp_b = (scores[:, 1] - fin_b.mean()) / (fin_b.var(unbiased=False).sqrt() + rs.eps)
    torch.testing.assert_close(out[[0, 2, 3], 0], exp_a[[0, 2, 3]])
    torch.testing.assert_close(out[[0, 1, 3], 1], exp_b[[0, 1, 3]])
    assert out[1, 0].isnan() and out[2, 1].isinf()  # the faulty scores stay faulty (masked later)
    if mode == "running":
        torch.testing.assert_close(rs.running_mean, torch.tensor([3.0, 20.0]))
        rs._normalize(torch.full((4, 2), NAN), update_stats=True)  # an all-NaN batch changes nothing
        torch.testing.assert_close(rs.running_mean, torch.tensor([3.0, 20.0]))
        assert torch.isfinite(rs.running_var).all()


@pytest.fixture()
def affine():
    backend = AffineBackend(num_steps=4)
    backend.configure_model()
    res = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), ProGRPOSchedule(6, [1], [3])).run(
        ["a cat", "two dogs"], torch.Generator().manual_seed(0))
    return backend, res


def test_nonfinite_gradient_skips_the_optimizer_step(affine):
    backend, res = affine
    with torch.no_grad():
        backend.net.delta.copy_(torch.tensor([[0.1, -0.2], [0.3, 0.05]]))
    before = backend.net.delta.detach().clone()
    opt = torch.optim.AdamW(backend.trainable_parameters(), lr=0.1)
    adv = torch.ones(6)
    adv[2] = NAN  # poisons every minibatch holding trajectory 2 (one step per epoch: all of them)
    stepped = []
    stats = grpo_update(backend, res, adv, UpdateSettings(inner_epochs=2, train_batch_size=1000), opt,
                        generator=torch.Generator().manual_seed(0), after_step=lambda: stepped.append(1))
    assert stats["steps"] == 2 and stats["skipped_steps"] == 2 and not stepped
    assert torch.equal(backend.net.delta, before) and not opt.state  # weights and Adam moments untouched
    # masking the trajectory leaves it out: both steps run, weights move and stay finite
    valid = torch.ones(6, dtype=torch.bool)
    valid[2] = False
    stats = grpo_update(backend, res, adv, UpdateSettings(inner_epochs=2, train_batch_size=1000), opt,
                        generator=torch.Generator().manual_seed(0), valid=valid)
    assert stats["steps"] == 2 and stats["skipped_steps"] == 0
    assert torch.isfinite(backend.net.delta).all() and not torch.equal(backend.net.delta, before)


def test_masked_update_equals_the_update_on_the_valid_trajectories_alone(affine):
    """Leaving trajectory pairs out is exact: the same step as an update whose advantages are 0
    there and that draws only the other trajectories' pairs (timestep_fraction 1, one minibatch)."""
    backend, res = affine
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5])
    valid = torch.tensor([True, True, False, True, True, True])
    settings = UpdateSettings(train_batch_size=1000, max_grad_norm=None, clip_range=10.0)
    start = backend.net.delta.detach().clone()
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=1.0)
    grpo_update(backend, res, adv.masked_fill(~valid, NAN), settings, opt, valid=valid)
    masked = backend.net.delta.detach().clone()
    # by hand: -mean over the 5 valid trajectories x 4 steps of A * log p
    backend.net.delta.data.copy_(start)
    n = valid.nonzero().flatten().repeat_interleave(4)
    t = torch.arange(4).repeat(5)
    cond = {k: v[res.prompt_index[n]] for k, v in res.cond.items()}
    out = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[n, t + 1])
    (-(adv[n] * out.log_prob).mean()).backward()
    torch.testing.assert_close(masked, start - backend.net.delta.grad)


def test_bad_rollout_guard_names_the_reward_after_n():
    guard = BadRolloutGuard(patience=3)
    guard.update(True, {"pick": 8}, total=8)
    guard.update(False, {"pick": 2}, total=8)  # a rollout that trained resets the streak
    guard.update(True, {"pick": 8, "hps": 1}, total=8)
    guard.update(True, {"pick": 8}, total=8)
    with pytest.raises(NonFiniteError) as err:
        guard.update(True, {"pick": 8}, total=8)
    msg = str(err.value)
    assert "\n" not in msg and "reward 'pick' returned NaN/inf for 24 of 24 images" in msg
    assert "reward 'hps' returned NaN/inf for 1 of 24" in msg and "max_bad_rollouts=3" in msg


# ---- 1. non-finite values through the CLI ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("normalize", ["none", "batch", "running"])
def test_nan_on_a_third_of_the_final_images_trains_on(tmp_path, capsys, normalize):
    # plain G=4, 2 prompts: rows 0, 3, 6 of the 8 are NaN every rollout; both groups keep >= 2
    args = faulty_run(tmp_path, "r", PLAIN4, "{every: 3}", steps=3, extra=f"  reward_normalize: {normalize}\n")
    rc, err = run_cli(args, capsys)
    assert rc == 0, err[-3000:]
    rows = metrics(tmp_path / "r")
    assert len(rows) == 3
    for r in rows:
        assert r["health/nonfinite_rewards"] == 3 and r["health/masked_trajectories"] == 3
        assert r["health/skipped_updates"] == 0 and r["train/grad_norm"] > 0
        faulty = r["reward/faulty"] if normalize != "none" else r["reward/mean"]  # one reward, weight 1: the mean
        assert 0 < faulty < 1 and math.isfinite(r["reward/mean"])  # the finite ones' mean
    state = assert_finite_checkpoint(tmp_path / "r/ckpt/last.ckpt")
    assert state["global_step"] == 3  # every rollout trained
    if normalize == "running":
        assert torch.isfinite(state["state_dict"]["rewards.running_mean"]).all()
        assert int(state["state_dict"]["rewards.num_updates"]) == 3


@pytest.mark.slow
def test_nan_in_a_whole_group_and_on_previews_and_final_images(tmp_path, capsys):
    # Pro schedule 6 -> 4, 2 prompts: calls alternate preview (12 rows), final (8 rows).
    # previews: rows 0, 3, 6, 9 NaN (never selected: each group has 4 finite to keep);
    # final: rows 0..3 NaN, i.e. prompt 0's whole group: dropped, prompt 1's group trains.
    args = faulty_run(tmp_path, "g", PRO, "{every: 3, period: 2, calls: [0]}", steps=2)
    args_final = faulty_run(tmp_path, "f", PRO, "{rows: [0, 1, 2, 3], period: 2, calls: [1]}", steps=2)
    rc, err = run_cli(args, capsys)
    assert rc == 0, err[-3000:]
    for r in metrics(tmp_path / "g"):
        assert r["health/nonfinite_previews"] == 4 and r["health/nonfinite_rewards"] == 0
        assert r["health/masked_trajectories"] == 0 and r["train/grad_norm"] > 0
    assert_finite_checkpoint(tmp_path / "g/ckpt/last.ckpt")
    rc, err = run_cli(args_final, capsys)
    assert rc == 0, err[-3000:]
    for r in metrics(tmp_path / "f"):
        assert r["health/nonfinite_rewards"] == 4 and r["health/masked_trajectories"] == 4
        assert r["health/skipped_updates"] == 0 and r["train/grad_norm"] > 0
    assert assert_finite_checkpoint(tmp_path / "f/ckpt/last.ckpt")["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_always_nonfinite_reward_stops_in_n_rollouts_and_keeps_the_last_good_checkpoint(tmp_path, capsys, value):
    # 2 good rollouts (checkpointed), then every reward non-finite: stop after 2 more (max_bad_rollouts 2)
    args = faulty_run(tmp_path, "a", PLAIN4, f"{{every: 1, first_call: 2, value: {value!r}}}", steps=20,
                      extra="  guards:\n    max_bad_rollouts: 2\n")
    rc, err = run_cli(args, capsys)
    assert rc == 1
    line = error_line(err)
    assert "model.guards.max_bad_rollouts=2: 2 consecutive rollouts trained nothing" in line
    assert "reward 'faulty' returned NaN/inf for 16 of 16 images" in line
    state = assert_finite_checkpoint(tmp_path / "a/ckpt/last.ckpt")
    assert state["global_step"] == 2 and state["pro_grpo"]["rollouts_done"] == 2
    rows = metrics(tmp_path / "a")
    assert [r["health/skipped_updates"] for r in rows] == [0, 0, 1, 1]
    assert [r["health/nonfinite_rewards"] for r in rows] == [0, 0, 8, 8]


# ---- 1/2/4. checkpoints: finite, safe, matching ---------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run: its checkpoint and config, shared by the checkpoint tests."""
    tmp = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    main(["fit", *config_args(tmp, "t", "trainer:\n  max_steps: 2\n", out=tmp / "t")])
    return tmp / "t/ckpt/last.ckpt"


class LoadCounter:
    """Counts base-weight loads of the tiny SD1.5 backend (monkeypatched ``configure_model``)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = TinySD15Backend.configure_model

        def counted(backend):
            if backend.unet is None:
                self.calls += 1
            return original(backend)
        monkeypatch.setattr(TinySD15Backend, "configure_model", counted)


def resume_args(tmp_path: Path, ckpt: Path, override: str = "") -> list[str]:
    return ["fit", *config_args(tmp_path, "resume", "trainer:\n  max_steps: 3\n" + override,
                                out=tmp_path / "resume"), "--ckpt_path", str(ckpt)]


def nan_copy(ckpt: Path, dst: Path) -> tuple[Path, str]:
    """A copy with one NaN weight and a digest that matches it (as a buggy writer would leave it)."""
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["state_dict"] if "lora_B" in k)
    state["state_dict"][key][0, 0] = NAN
    state[checkpointing.DIGEST_KEY] = checkpointing.tensor_digest(state)
    torch.save(state, dst)
    return dst, key


def test_nonfinite_weights_are_refused_at_save_export_and_resume(trained, tmp_path, capsys, monkeypatch):
    bad, key = nan_copy(trained, tmp_path / "nan.ckpt")
    # save: refused, the previous file stays as it was
    target = tmp_path / "last.ckpt"
    target.write_bytes(trained.read_bytes())
    with pytest.raises(NonFiniteError, match=f"tensor '{key}' has 1 non-finite"):
        AtomicCheckpointIO().save_checkpoint(torch.load(bad, weights_only=True), str(target))
    assert target.read_bytes() == trained.read_bytes() and not glob.glob(str(tmp_path / ".*"))
    loads = LoadCounter(monkeypatch)
    # export: one line, nothing built
    rc = run_main(export_main, ["--ckpt", str(bad), "--out", str(tmp_path / "x")])
    assert rc == 1 and key in error_line(capsys.readouterr().err) and loads.calls == 0
    # resume: one line, before the base weights load
    rc, err = run_cli(resume_args(tmp_path, bad), capsys)
    assert rc == 1 and key in error_line(err) and loads.calls == 0


class Payload:
    """Unpickling it would create ``marker``: what a crafted checkpoint's code could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_at_export_and_resume(trained, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    state = torch.load(trained, weights_only=True)
    state["payload"] = Payload(str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)
    loads = LoadCounter(monkeypatch)
    rc = run_main(export_main, ["--ckpt", str(evil), "--out", str(tmp_path / "x")])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "evil.ckpt" in line and "refused" in line
    rc, err = run_cli(resume_args(tmp_path, evil), capsys)
    assert rc == 2 and "refused" in error_line(err)
    with pytest.raises(CheckpointError, match="refused"):  # also Lightning's own load path
        AtomicCheckpointIO().load_checkpoint(str(evil))
    assert not marker.exists() and loads.calls == 0


@pytest.mark.parametrize("kind", ["empty", "truncated", "foreign", "missing"])
def test_unreadable_checkpoints_are_one_line_naming_the_path(trained, tmp_path, capsys, monkeypatch, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    loads = LoadCounter(monkeypatch)
    for argv, fn in [(resume_args(tmp_path, path), main),
                     (["--ckpt", str(path), "--out", str(tmp_path / "x")], export_main)]:
        rc = run_main(fn, argv)
        line = error_line(capsys.readouterr().err)
        assert rc == 2 and str(path) in line, line
    assert loads.calls == 0


@pytest.mark.parametrize("override, field", [
    ("model:\n  schedule:\n    init_args: {group_size: 6, checkpoints: [1], keep: [2], rule: ovf}\n", "schedule"),
    ("model:\n  backend:\n    init_args: {lora: {rank: 2, alpha: 4}}\n", "lora.rank=4"),
    ("optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}\n", "optimizer"),
])
def test_resume_mismatch_is_one_line_before_weights_load(trained, tmp_path, capsys, monkeypatch, override, field):
    loads = LoadCounter(monkeypatch)
    rc, err = run_cli(resume_args(tmp_path, trained, override.replace("{", "{{").replace("}", "}}")), capsys)
    line = error_line(err)
    assert rc == 2 and f"has {field}" in line and "but this run has" in line, line
    assert loads.calls == 0


@pytest.mark.slow
def test_schedule_change_on_purpose_resumes(trained, tmp_path, capsys):
    override = ("model:\n  guards:\n    allow_schedule_change: true\n  schedule:\n"
                "    init_args: {group_size: 6, checkpoints: [1], keep: [2], rule: ovf}\n")
    rc, err = run_cli(resume_args(tmp_path, trained, override.replace("{", "{{").replace("}", "}}")), capsys)
    assert rc == 0, err[-3000:]
    stated = [ln for ln in err.splitlines() if ln.startswith(f"resume from {trained}: applying ")]
    assert len(stated) == 1 and "model.schedule.init_args.group_size: 4 -> 6" in stated[0] \
        and "trainer.max_steps: 2 -> 3" in stated[0], err[-3000:]
    state = torch.load(tmp_path / "resume/ckpt/last.ckpt", weights_only=True)
    assert state["global_step"] == 3 and "sizes=6 -> 2" in state["pro_grpo"]["identity"]["schedule"]


def test_export_refuses_another_lora_setting_before_weights_load(trained, tmp_path, capsys, monkeypatch):
    cfg = yaml.safe_load(torch.load(trained, weights_only=True)["pro_grpo"]["config"])
    cfg["model"]["backend"]["init_args"]["lora"]["rank"] = 8
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    loads = LoadCounter(monkeypatch)
    rc = run_main(export_main, ["--ckpt", str(trained), "--run_config", str(other), "--out", str(tmp_path / "x")])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "lora.rank=4" in line and "lora.rank=8" in line and loads.calls == 0


# ---- 3. run directories ---------------------------------------------------------------------------
def no_logger_run(root: Path, rank: int) -> list[str]:
    """tiny_sd15 without a logger, its ModelCheckpoint without a dirpath, in ``root``."""
    return ["fit", "--config", str(ROOT / "configs/tiny_sd15.yaml"), "--trainer.max_steps=1",
            "--trainer.logger=false", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
            "init_args: {save_last: true, every_n_train_steps: 1}}]",
            "--model.samples.every_n_rollouts=0", f"--model.backend.init_args.lora.rank={rank}"]


@pytest.mark.slow
def test_two_runs_in_one_root_dir_never_collide_and_export_pairs_them(tmp_path, capsys):
    root = tmp_path / "root"
    for rank in (4, 2):
        rc, err = run_cli(no_logger_run(root, rank), capsys)
        assert rc == 0, err[-3000:]
    assert sorted(os.listdir(root)) == ["version_0", "version_1"]
    for version, rank in [("version_0", 4), ("version_1", 2)]:
        run = root / version
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["model"]["backend"]["init_args"]["lora"]["rank"] == rank
        assert (run / "checkpoints" / "last.ckpt").is_file()  # beside its own config, no -v1 names
        # export reads the config the checkpoint carries: no --run_config, the right LoRA rank
        out = tmp_path / f"lora_{version}"
        assert run_main(export_main, ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
        from safetensors.torch import load_file
        lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert {v.shape[0] for k, v in lora.items() if "lora_A" in k} == {rank}


@pytest.mark.slow
def test_a_fixed_logger_version_gets_a_new_config_name_not_an_overwrite(tmp_path, capsys):
    override = ("trainer:\n  max_steps: 1\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
                "    init_args: {{save_dir: \"{out}\", name: run, version: fixed}}\n")
    for seed in (0, 1):
        rc, err = run_cli(["fit", *config_args(tmp_path, "v", override), f"--model.seed={seed}"], capsys)
        assert rc == 0, err[-3000:]
    first = yaml.safe_load((tmp_path / "run/fixed/config.yaml").read_text())
    second = yaml.safe_load((tmp_path / "run/fixed/config-v1.yaml").read_text())
    assert first["model"]["seed"] == 0 and second["model"]["seed"] == 1


# ---- 5. atomic saves ----------------------------------------------------------------------------------
KILLER = """
import os, signal, sys, torch
from pro_grpo_lightning import checkpointing
from pro_grpo_lightning.checkpointing import AtomicCheckpointIO
where, target = sys.argv[1], sys.argv[2]
state = {"state_dict": {"w": torch.full((256, 1024), 2.0)}, "global_step": 2}
if where == "writing":  # killed after half of the bytes reached the temp file
    real = torch.save
    def partial(obj, f):
        real(obj, f); f.flush(); f.truncate(f.tell() // 2); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.torch.save = partial
elif where == "replacing":  # killed just before the rename
    def die(*a): os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.os.replace = die
AtomicCheckpointIO().save_checkpoint(state, target)
"""


@pytest.mark.parametrize("where", ["writing"])  # "replacing": a kill just before the rename
def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path, where):
    """The temp dir is another filesystem here (TMPDIR on /dev/shm when it exists): the save
    never touches it, so no copy across filesystems can be cut short."""
    logdir = tmp_path / "ckpt"
    logdir.mkdir()
    target = logdir / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, str(target))
    good = target.read_bytes()
    other_fs = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path / "tmpdir"
    tmpdir = other_fs / f"pgl-{os.getpid()}-{where}"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, where, str(target)], env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == good  # the previous good checkpoint survives
    assert load_checkpoint_file(str(target))["global_step"] == 1
    assert not os.listdir(tmpdir)  # nothing was written to the temp dir
    left = [n for n in os.listdir(logdir) if n != "last.ckpt"]
    assert len(left) == 1 and checkpointing.TEMP_MARK in left[0]  # the killed writer's temp file
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 3}, str(target))
    assert os.listdir(logdir) == ["last.ckpt"]  # the next save removes it
    assert load_checkpoint_file(str(target))["global_step"] == 3
    tmpdir.rmdir()


def test_an_interrupted_save_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 1}, str(target))

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpointing.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 2}, str(target))
    assert os.listdir(tmp_path) == ["last.ckpt"] and load_checkpoint_file(str(target))["global_step"] == 1


def test_the_module_installs_the_atomic_io(trained):
    state = load_checkpoint_file(str(trained))  # written through it: loads with weights_only=True
    assert state["global_step"] == 2 and not glob.glob(str(trained.parent / ".*"))


# ---- 6. early validation: one line, before any weights load ------------------------------------------
TINY = ["fit", "--config", str(ROOT / "configs/tiny_sd15.yaml"), "--trainer.max_steps=1", "--trainer.logger=false"]


@pytest.mark.parametrize("args, expected", [
    (["--optimizer.lr=0"], "optimizer.init_args.lr=0.0: must be a finite number > 0"),
    (["--model.rewards=[{class_path: pro_grpo_lightning.rewards.image_stats.Brightness, init_args: {weight: 0}}]"],
     "every weight is 0 (brightness=0)"),
    (["--model.rewards=[{class_path: pro_grpo_lightning.rewards.image_stats.Brightness, init_args: {weight: .nan}}]"],
     "reward 'brightness': weight=nan must be a finite number"),
    (["--model.backend.init_args.guidance_scale=-1"], "guidance_scale=-1.0: must be a finite number >= 0"),
    (["--model.backend.init_args.eta=0"], "leaves no trainable step"),
    (["--model.update.ratio_norm=grpo_guard"], "update.ratio_norm='grpo_guard' is defined for flow-matching backends"),
    (["--model.update.ratio_norm=bogus"], "update.ratio_norm must be one of ('none', 'grpo_guard'), got 'bogus'"),
    (["--model.rewards=[{class_path: pro_grpo_lightning.rewards.shapes.ShapesReward}]"],
     "data.prompts: reward 'shapes', prompt 0: "),
])
def test_bad_settings_fail_in_one_line_before_weights_load(args, expected, tmp_path, capsys, monkeypatch):
    loads = LoadCounter(monkeypatch)
    rc, err = run_cli([*TINY, f"--trainer.default_root_dir={tmp_path}", *args], capsys)
    line = error_line(err)
    assert rc == 2 and expected in line, line
    assert loads.calls == 0


def test_flow_window_without_a_trainable_step_is_refused_up_front(tmp_path, capsys):
    rc, err = run_cli(["fit", "--config", str(ROOT / "configs/tiny_sd3.yaml"), "--trainer.logger=false",
                       f"--trainer.default_root_dir={tmp_path}",
                       "--model.backend.init_args.sde_window=[5,6]"], capsys)  # only the last of 6 steps
    assert rc == 2 and "sde_window=[5, 6] leaves no trainable step" in error_line(err)


def test_non_utf8_prompts_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("a caf\u00e9\n".encode("latin-1"))
    rc, err = run_cli([*TINY, f"--trainer.default_root_dir={tmp_path}", f"--data.prompts={bad}"], capsys)
    line = error_line(err)
    assert rc == 2 and str(bad) in line and "not UTF-8" in line


# ---- 7. messages ---------------------------------------------------------------------------------------
def test_constructor_errors_are_one_line_and_debug_shows_the_trace(capsys, monkeypatch):
    # fails while the module is built: nothing is written whatever the root dir
    rc, err = run_cli([*TINY, "--model.update.clip_range=-1"], capsys)
    assert rc == 2 and error_line(err) == "error: ValueError: update.clip_range must be > 0, got -1.0"
    monkeypatch.setenv("PRO_GRPO_DEBUG", "1")
    with pytest.raises(ValueError, match="clip_range"):
        run_main(main, [*TINY, "--model.update.clip_range=-1"])


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    rc = run_main(export_main, ["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")])
    assert rc == 2 and error_line(capsys.readouterr().err) == (
        f"error: ckpt_path={str(tmp_path / 'nope.ckpt')!r}: no such file")


def test_python_dash_m_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pro_grpo_lightning", *TINY[:3], "--model.update.clip_range=-1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: ValueError: update.clip_range must be > 0, got -1.0"


def test_export_lora_refuses_nonfinite_adapter_weights(tmp_path):
    from pro_grpo_lightning.export import export_lora

    backend = TinySD15Backend(num_steps=2, resolution=32, seed=0)
    backend.configure_model()
    name, param = next((n, p) for n, p in backend.denoiser().named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = INF
    with pytest.raises(NonFiniteError, match="lora_B"):
        export_lora(backend, str(tmp_path / "lora"))
    assert not (tmp_path / "lora").exists()


# ---- issue 23: what a file, a reward or a peer hands us ---------------------------------------------
@pytest.mark.parametrize("mode, expected", [
    ("raise", r"reward 'broken' \(BrokenReward\) raised ZeroDivisionError: integer division or modulo by zero"),
    ("scalar", r"reward 'broken' returned a torch.float32 tensor of shape \[\], expected a real tensor of shape "
               r"\[(\d+)\] \(one score per image\)"),
    ("list", r"reward 'broken' returned a list, expected a torch.Tensor of shape \[(\d+)\] \(one score per image\)"),
    ("column", r"reward 'broken' returned a torch.float32 tensor of shape \[(\d+), 1\], expected a real tensor "
               r"of shape \[\1\] \(one score per image\)"),
])
def test_a_broken_reward_is_one_line_naming_it(tmp_path, capsys, mode, expected):
    reward = "{class_path: tests.fakes.BrokenReward, init_args: {mode: %s}}" % mode
    args = ["fit", *config_args(tmp_path, "b", "trainer:\n  max_steps: 1\n", out=tmp_path / "b"),
            f"--model.rewards=[{reward}]"]
    rc, err = run_cli(args, capsys)
    assert rc == 1 and re.fullmatch(f"error: {expected}", error_line(err)), error_line(err)
    assert not (tmp_path / "b/ckpt").exists() or not glob.glob(str(tmp_path / "b/ckpt/.*"))


@pytest.mark.parametrize("content, expected", [
    ("a cat\nbad\x00prompt\n", "prompt 1 holds a NUL byte"),
    ("a cat\n" + "x" * 20_000 + "\n", "prompt 1 is 20,000 characters long (at most 10,000"),
])
def test_binary_or_absurd_prompt_files_are_one_line(tmp_path, capsys, monkeypatch, content, expected):
    bad = tmp_path / "prompts.txt"
    bad.write_text(content)
    loads = LoadCounter(monkeypatch)
    rc, err = run_cli([*TINY, f"--trainer.default_root_dir={tmp_path}", f"--data.prompts={bad}"], capsys)
    line = error_line(err)
    assert rc == 2 and str(bad) in line and expected in line, line
    assert loads.calls == 0


def test_duplicate_prompts_are_reported():
    from pro_grpo_lightning.data import load_prompt_set

    with pytest.warns(UserWarning, match=r"50 of 52 prompts are duplicates \(e.g. 'a cat' 51 times\)"):
        load_prompt_set(["a cat"] * 51 + ["a dog"])


def test_random_bytes_are_not_a_checkpoint(tmp_path, capsys, monkeypatch):
    path = tmp_path / "random.ckpt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    loads = LoadCounter(monkeypatch)
    for argv, fn in [(resume_args(tmp_path, path), main),
                     (["--ckpt", str(path), "--out", str(tmp_path / "x")], export_main)]:
        rc = run_main(fn, argv)
        line = error_line(capsys.readouterr().err)
        assert rc == 2 and str(path) in line and "not a PyTorch checkpoint" in line and "Python objects" not in line
    assert loads.calls == 0


def flip_exponent(state: dict, key: str) -> None:
    """One flipped bit: the top exponent bit of the first element of ``state_dict[key]`` (float32)."""
    w = state["state_dict"][key]
    w.view(-1).view(torch.int32)[0] ^= 1 << 30


@pytest.mark.parametrize("digest", ["kept", "rewritten"])
def test_a_flipped_bit_is_refused_at_resume_export_and_predict(trained, tmp_path, capsys, monkeypatch, digest):
    """kept: the file's digest no longer matches (one line naming the file and the newest good
    checkpoint beside it); rewritten (a writer that stored the bad weight): its magnitude is refused."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    step = next(trained.parent.glob("epoch=*.ckpt"))
    good = folder / step.name
    good.write_bytes(step.read_bytes())
    state = torch.load(trained, weights_only=True)
    key = next(k for k in state["state_dict"] if "lora_A" in k)
    flip_exponent(state, key)
    assert abs(float(state["state_dict"][key].view(-1)[0])) > 1e30
    if digest == "rewritten":
        state[checkpointing.DIGEST_KEY] = checkpointing.tensor_digest(state)
    bad = folder / "last.ckpt"
    torch.save(state, bad)
    before = bad.read_bytes()
    loads = LoadCounter(monkeypatch)
    predict = ["predict", *config_args(tmp_path, "p", "data:\n  val_prompts: [a cat]\n", out=tmp_path / "p"),
               "--ckpt_path", str(bad)]
    for argv, fn in [(resume_args(tmp_path, bad), main), (predict, main),
                     (["--ckpt", str(bad), "--out", str(tmp_path / "x")], export_main)]:
        rc = run_main(fn, argv)
        line = error_line(capsys.readouterr().err)
        if digest == "kept":
            assert rc == 2 and line == (f"error: ckpt_path={str(bad)!r}: corrupted: its tensors do not match the "
                                        f"digest written with it (a flipped bit or a damaged copy); the newest good "
                                        f"checkpoint beside it is {str(good)!r}"), line
        else:
            assert rc == 1 and f"tensor {key!r} has 1 values of magnitude > 65504 (largest " in line, line
    assert loads.calls == 0 and bad.read_bytes() == before and not (tmp_path / "x").exists()


def test_implausible_weights_are_refused_at_save(trained, tmp_path):
    state = torch.load(trained, weights_only=True)
    key = next(k for k in state["state_dict"] if "lora_A" in k)
    flip_exponent(state, key)
    target = tmp_path / "last.ckpt"
    target.write_bytes(trained.read_bytes())
    with pytest.raises(NonFiniteError, match=f"tensor '{key}' has 1 values of magnitude > 65504"):
        AtomicCheckpointIO().save_checkpoint(state, str(target))
    assert target.read_bytes() == trained.read_bytes()


def test_every_checkpoint_carries_a_digest_of_its_tensors(trained):
    state = load_checkpoint_file(str(trained))
    assert state[checkpointing.DIGEST_KEY] == checkpointing.tensor_digest(state)
    assert oct(trained.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_builds_only_the_backend_of_a_checkpoints_config(trained, tmp_path, capsys):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    url = "http://127.0.0.1:%d" % listener.getsockname()[1]

    def planted_rewards(cfg):
        cfg["model"]["rewards"] = [{"class_path": "this.Brightness"},
                                   {"class_path": "pro_grpo_lightning.rewards.remote.RemoteReward",
                                    "init_args": {"url": url}}]
    ckpt = edited_config_copy(trained, tmp_path / "planted.ckpt", planted_rewards)
    sys.modules.pop("this", None)
    rc = run_main(export_main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "lora")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "this" not in sys.modules and "Beautiful is better" not in out.out  # nothing of the file's choosing ran
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing connected to the reward server the file names
    listener.close()
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    def foreign_backend(cfg):
        cfg["model"]["backend"]["class_path"] = "tests.fakes.AffineBackend"
    ckpt = edited_config_copy(trained, tmp_path / "foreign.ckpt", foreign_backend)
    rc = run_main(export_main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "other")])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and line == (f"error: ckpt={str(ckpt)!r} (its stored config): model.backend.class_path="
                                f"'tests.fakes.AffineBackend' is not a backend of this package; if you trust the "
                                f"file, pass --trust_config_classes (or your own --run_config)")
    assert not (tmp_path / "other").exists()


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    real, saves = torch.save, []

    def full_disk(obj, f):  # step 2's last.ckpt (the 4th save) finds the disk full, after some bytes
        saves.append(1)
        if len(saves) == 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f)
    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    args = ["fit", *config_args(tmp_path, "d", "trainer:\n  max_steps: 3\n", out=tmp_path / "d")]
    rc, err = run_cli(args, capsys)
    last = tmp_path / "d/ckpt/last.ckpt"
    assert rc == 1 and error_line(err) == (f"error: cannot write {str(last)!r}: no space left on the device; the "
                                           f"previous last.ckpt there is intact"), err[-2000:]
    assert load_checkpoint_file(str(last))["global_step"] == 1  # the good one, loadable
    assert not glob.glob(str(tmp_path / "d/ckpt/.*"))  # no temp file left


def test_a_read_only_log_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system", self.metrics_file_path)
    monkeypatch.setattr(_ExperimentWriter, "save", read_only)
    args = ["fit", *config_args(tmp_path, "r", "trainer:\n  max_steps: 2\n", out=tmp_path / "r")]
    rc, err = run_cli(args, capsys)
    line = error_line(err)
    assert rc == 1 and line.startswith("error: cannot write ") and "metrics.csv': read-only file system; the " \
        "checkpoints already written are intact" in line, line


@pytest.mark.parametrize("where", ["occupied", "under_a_file"])
def test_export_refuses_an_occupied_or_impossible_output_before_loading(trained, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "out"
    if where == "occupied":
        out.mkdir()
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"an earlier export")
        expected = f"error: out={str(out)!r}: not empty (1 entries); choose another folder, or pass overwrite"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        expected = f"error: out={str(out)!r}: cannot create it, {str(tmp_path / 'file')!r} is a file"
    loads = LoadCounter(monkeypatch)
    rc = run_main(export_main, ["--ckpt", str(trained), "--out", str(out)])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(expected), line
    assert loads.calls == 0
    if where == "occupied":
        assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"an earlier export"
        assert run_main(export_main, ["--ckpt", str(trained), "--out", str(out), "--overwrite"]) == 0
        assert sorted(os.listdir(out)) == ["README.md", "SHA256SUMS", "pytorch_lora_weights.safetensors"]
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left


def test_resume_refuses_settings_that_cannot_change_in_one_line(trained, tmp_path, capsys, monkeypatch):
    loads = LoadCounter(monkeypatch)
    rc, err = run_cli([*resume_args(tmp_path, trained), "--model.update.clip_range=0.5", "--model.seed=7"], capsys)
    line = error_line(err)
    assert rc == 2 and line == (f"error: ckpt_path={str(trained)!r}: resuming would change model.seed: 0 -> 7 (and 1 "
                                f"more: model.update.clip_range: 0.01 -> 0.5); these settings cannot change on "
                                f"resume (README, 'Resuming a run'): use the checkpoint's values or start a new run")
    assert loads.calls == 0


def test_resume_states_the_settings_it_applies(trained):
    """What may change is applied and said (``checkpointing.resume_changes``, the README's list)."""
    saved = yaml.safe_load(torch.load(trained, weights_only=True)["pro_grpo"]["config"])
    mine = yaml.safe_load(yaml.safe_dump(saved))
    mine["trainer"]["max_steps"] = 5
    mine["model"]["guards"]["max_bad_rollouts"] = 9
    mine["model"]["rollout"]["sample_batch_size"] = 2
    applied, refused = checkpointing.resume_changes(saved, mine)
    assert applied == ["model.guards.max_bad_rollouts: 3 -> 9", "model.rollout.sample_batch_size: None -> 2",
                       "trainer.max_steps: 2 -> 5"] and refused == []
    mine["model"]["schedule"]["init_args"]["group_size"] = 6
    mine["model"]["optimizer"]["init_args"]["lr"] = 1.0
    _, refused = checkpointing.resume_changes(saved, mine)
    assert [r.split(":")[0] for r in refused] == ["model.optimizer.init_args.lr", "model.schedule.init_args.group_size"]
    _, refused = checkpointing.resume_changes(saved, mine, allow_schedule_change=True)
    assert [r.split(":")[0] for r in refused] == ["model.optimizer.init_args.lr"]


def test_a_checkpoint_without_our_record_is_refused_unless_asked(trained, tmp_path, capsys, monkeypatch):
    state = torch.load(trained, weights_only=True)
    del state["pro_grpo"]
    state[checkpointing.DIGEST_KEY] = checkpointing.tensor_digest(state)
    bare = tmp_path / "bare.ckpt"
    torch.save(state, bare)
    loads = LoadCounter(monkeypatch)
    rc, err = run_cli(resume_args(tmp_path, bare), capsys)
    line = error_line(err)
    assert rc == 2 and line.startswith(f"error: ckpt_path={str(bare)!r}: has no pro_grpo record") and \
        line.endswith("to use it anyway: --model.guards.allow_foreign_checkpoint true"), line
    assert loads.calls == 0


def test_a_planted_pickle_at_ckpt_path_last_is_refused_before_weights_load(trained, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    state = torch.load(trained, weights_only=True)
    state["payload"] = Payload(str(marker))
    (tmp_path / "resume/ckpt").mkdir(parents=True)
    torch.save(state, tmp_path / "resume/ckpt/last.ckpt")  # where resume_args' ModelCheckpoint writes
    loads = LoadCounter(monkeypatch)
    rc, err = run_cli([*resume_args(tmp_path, trained)[:-1], "last"], capsys)
    line = error_line(err)
    assert rc == 2 and "last.ckpt" in line and "refused" in line, line
    assert loads.calls == 0 and not marker.exists()


def test_rewards_near_the_float32_maximum_are_masked_not_clipped_into_advantages():
    from pro_grpo_lightning.health import finite_advantages
    from pro_grpo_lightning.objectives import AdvantageSettings

    r = torch.tensor([[3e38, 0.5, 3e38, 0.4],   # finite, but the variance overflows float32
                      [0.1, 0.2, 0.3, 0.4],     # fine
                      [0.7, 0.7, 0.7, 0.7]])    # no spread
    adv = finite_advantages(r, AdvantageSettings())
    assert adv.valid[0].tolist() == [False] * 4 and adv.advantages[0].tolist() == [0.0] * 4
    assert torch.isfinite(adv.advantages).all() and adv.advantages[1].abs().sum() > 0
    assert (adv.unrepresentable, adv.flat_groups, adv.n_spread) == (1, 1, 1.0)


@pytest.mark.parametrize("reward, expected", [
    ("{class_path: tests.fakes.BrokenReward, init_args: {mode: constant}}",
     "every group's rewards were equal (zero spread, so every advantage is 0); reward 'broken' gave all images of "
     "a prompt the same score"),
    ("{class_path: tests.fakes.FaultyBrightness, init_args: {value: '3e38', every: 2}}",
     "the rewards were finite but their mean or variance overflows float32 in 4 groups"),
])
def test_rollouts_that_learn_nothing_from_finite_rewards_stop_the_run(tmp_path, capsys, reward, expected):
    args = ["fit", *config_args(tmp_path, "h", "trainer:\n  max_steps: 4\n", out=tmp_path / "h"),
            f"--model.rewards=[{reward}]", "--model.guards.max_bad_rollouts=2", "--data.prompts_per_step=2"]
    rc, err = run_cli(args, capsys)
    line = error_line(err)
    assert rc == 1 and "model.guards.max_bad_rollouts=2: 2 consecutive rollouts trained nothing: " in line \
        and expected in line, line
    rows = metrics(tmp_path / "h")
    counts = [r.get("health/flat_groups", 0) + r.get("health/unrepresentable_groups", 0) for r in rows]
    assert len(rows) == 2 and all(c == 2 for c in counts), rows


def test_an_unreachable_reward_server_is_one_line_before_weights_load(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there
    reward = ("{class_path: pro_grpo_lightning.rewards.remote.RemoteReward, "
              "init_args: {url: 'http://127.0.0.1:%d', retries: 0, timeout: 2}}" % port)
    loads = LoadCounter(monkeypatch)
    rc, err = run_cli([*TINY, f"--trainer.default_root_dir={tmp_path}", f"--model.rewards=[{reward}]"], capsys)
    line = error_line(err)
    assert rc == 1 and f"no answer from http://127.0.0.1:{port}/health after 1 attempt(s)" in line, line
    assert loads.calls == 0


def test_an_empty_pretrained_folder_is_one_line(tmp_path):
    from pro_grpo_lightning.loading import check_pretrained_source

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pretrained=.*empty.*: an empty folder, no weights there"):
        check_pretrained_source(str(tmp_path / "empty"))
