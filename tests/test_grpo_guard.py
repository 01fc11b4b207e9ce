"""GRPO-Guard (``update.ratio_norm: grpo_guard``): the normalised log-ratio, the step weight, the
per-step log-ratio statistics, the recorded means through pruning, and the update on flow steps."""

import math

import pytest
import torch
from scipy import stats as sst

from pro_grpo_lightning.backends.base import LoraSettings
from pro_grpo_lightning.backends.sd3 import TinySD3Backend
from pro_grpo_lightning.errors import ConfigError
from pro_grpo_lightning.objectives import (guard_log_ratio, guard_step_weight, ppo_clip_loss, ratio_step_sums,
                                           ratio_step_summary)
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rollout import ExpandPruneRollout, RolloutSettings
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.steps import gaussian_log_prob
from pro_grpo_lightning.update import UpdateSettings, check_trainable, grpo_update
from tests.fakes import AffineBackend, MeanPixel

PROMPTS = ["a cat", "two dogs"]


class FlowLikeAffine(AffineBackend):
    """The transparent fake with a flow backend's step size (sigma - sigma_next per step)."""

    def sigma_decrement(self, step_index: torch.Tensor) -> torch.Tensor:
        return (0.1 + 0.05 * torch.arange(self.num_steps, dtype=torch.float32))[step_index]  # [B]


# ---- the pure functions -------------------------------------------------------------------------
def test_guard_log_ratio_by_hand():
    old = torch.tensor([[0.0, 0.0], [1.0, -1.0]])  # [2, 2]
    nxt = old + torch.tensor([[0.2, -0.4], [0.0, 0.3]])  # s z
    mean = old + torch.tensor([[0.1, 0.3], [0.5, 0.0]])  # d
    std = torch.tensor([0.5, 0.25])
    # row 0: mean(0.2 * 0.1, -0.4 * 0.3) / 0.5 = (0.02 - 0.12) / 2 / 0.5 = -0.1; row 1: mean(0, 0) = 0
    torch.testing.assert_close(guard_log_ratio(mean, old, nxt, std), torch.tensor([-0.1, 0.0]))
    # a zero-std row (a deterministic step) gives 0, not NaN
    assert guard_log_ratio(mean, old, nxt, torch.tensor([0.0, 0.25])).tolist() == [0.0, 0.0]
    torch.testing.assert_close(guard_step_weight(torch.tensor([0.25, 0.1])), torch.tensor([4.0, 10.0]))


def flow_factory_ratio(log_prob, old_log_prob, mean, old_mean, dt, std_dev_t):
    """Flow-Factory's GRPOGuardTrainer ratio, re-written from reading it: scale = sqrt(-dt) * std_dev_t,
    ratio = exp((log_prob - old_log_prob) * scale + mse / (2 * scale)), mse over all non-batch dims."""
    scale = torch.sqrt(-dt) * std_dev_t
    mse = (mean - old_mean).flatten(1).pow(2).mean(dim=1)
    return torch.exp((log_prob - old_log_prob) * scale + mse / (2 * scale))


def verl_ratio(log_prob, old_log_prob, mean, old_mean, sqrt_dt, std_dev_t):
    """VeRL-Omni's documented GRPO-Guard ratio: exp((lp - lp_old + ||d||^2 / (2 (sqrt_dt s)^2)) * sqrt_dt s)."""
    s = sqrt_dt * std_dev_t
    bias = (mean - old_mean).flatten(1).pow(2).mean(dim=1) / (2 * s**2)
    return torch.exp((log_prob - old_log_prob + bias) * s)


def test_guard_log_ratio_is_the_implementations_formula_on_the_same_tensors():
    g = torch.Generator().manual_seed(0)
    N, C, H = 6, 4, 5
    dt = -torch.rand(N, generator=g, dtype=torch.float64) * 0.2 - 0.01  # [N] < 0
    std_dev_t = torch.rand(N, generator=g, dtype=torch.float64) + 0.2  # g(sigma)
    s = torch.sqrt(-dt) * std_dev_t  # the step std
    old = torch.randn(N, C, H, H, generator=g, dtype=torch.float64)
    nxt = old + s[:, None, None, None] * torch.randn(N, C, H, H, generator=g, dtype=torch.float64)
    mean = old + 0.05 * torch.randn(N, C, H, H, generator=g, dtype=torch.float64)
    lp, lp_old = gaussian_log_prob(nxt, mean, s), gaussian_log_prob(nxt, old, s)
    ours = guard_log_ratio(mean, old, nxt, s).exp()
    torch.testing.assert_close(ours, flow_factory_ratio(lp, lp_old, mean, old, dt, std_dev_t), rtol=1e-10, atol=0)
    torch.testing.assert_close(ours, verl_ratio(lp, lp_old, mean, old, torch.sqrt(-dt), std_dev_t), rtol=1e-10, atol=0)
    assert not torch.allclose(ours, (lp - lp_old).exp())  # and it is not the plain ratio


def test_ratio_norm_centres_the_left_shifted_log_ratio():
    """The paper's observation and its fix, by Monte Carlo over the step noise: for a fixed drift d the
    plain log-ratio's mean is -mean(d^2) / (2 s^2) < 0, the normalised one's is 0, and its spread no
    longer depends on s."""
    g = torch.Generator().manual_seed(1)
    M, D = 20000, 16
    old = torch.zeros(M, D, dtype=torch.float64)
    d = 0.02 * torch.randn(1, D, generator=g, dtype=torch.float64).expand(M, D)
    spreads = []
    for s_val in (0.05, 0.2):
        s = torch.full((M,), s_val, dtype=torch.float64)
        nxt = old + s_val * torch.randn(M, D, generator=g, dtype=torch.float64)
        raw = gaussian_log_prob(nxt, old + d, s) - gaussian_log_prob(nxt, old, s)  # [M]
        norm = guard_log_ratio(old + d, old, nxt, s)  # [M]
        bias = -(d[0] ** 2).mean() / (2 * s_val**2)
        se_raw, se_norm = raw.std() / math.sqrt(M), norm.std() / math.sqrt(M)
        assert abs(raw.mean() - bias) < 4 * se_raw and bias < -10 * se_raw  # left-shifted, as predicted
        assert abs(norm.mean()) < 4 * se_norm  # centred
        spreads.append(float(norm.std()))
    assert spreads[0] == pytest.approx(spreads[1], rel=0.05)  # one scale for both step stds


def test_weighted_clip_loss_and_its_two_sided_clip_fractions_by_hand():
    lp = torch.zeros(4, requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    log_ratio = torch.tensor([0.3, 0.3, -0.3, 0.0])  # ratios e^.3 (high), e^.3, e^-.3 (low), 1
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss, st = ppo_clip_loss(lp, old, adv, 0.2, log_ratio=log_ratio, weight=w)
    r = math.exp(0.3)
    # entry: max(-A r, -A clip(r)): 1: max(-r, -1.2) = -1.2; 2: max(r, 1.2) = r; 3: max(-1/r, -0.8) = -1/r
    # (the unclipped term is larger); 4: -(-1) * 1 = 1
    expected = (1 * -1.2 + 2 * r + 3 * -1 / r + 4 * 1.0) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(st["clip_frac_high"]) == 0.5 and float(st["clip_frac_low"]) == 0.25
    assert float(st["clip_frac"]) == 0.75
    assert float(st["raw_log_ratio_mean"]) == 0.0 and float(st["log_ratio_mean"]) == pytest.approx(0.3 / 4)
    with pytest.raises(ValueError, match="weight must have log_prob's shape"):
        ppo_clip_loss(lp, old, adv, 0.2, weight=torch.ones(3))


def test_per_step_ratio_statistics_match_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    T, clip = 5, 0.1
    lr = 0.1 * torch.randn(200, generator=g) + 0.02  # [N]
    step = torch.randint(0, 4, (200,), generator=g)  # step 4 never drawn
    half = 120  # summed over two "minibatches"
    sums = ratio_step_sums(lr[:half], step[:half], T, clip) + ratio_step_sums(lr[half:], step[half:], T, clip)
    out = ratio_step_summary(sums)
    for t in range(4):
        x = lr[step == t].double()
        assert out["count"][t] == x.numel()
        assert float(out["log_ratio_mean"][t]) == pytest.approx(float(x.mean()), abs=1e-12)
        assert float(out["log_ratio_std"][t]) == pytest.approx(float(x.std(unbiased=False)), rel=1e-9)
        assert float(out["log_ratio_skew"][t]) == pytest.approx(float(sst.skew(x.numpy())), rel=1e-6)
        assert float(out["clip_frac_low"][t]) == pytest.approx(float((x.exp() < 1 - clip).double().mean()))
        assert float(out["clip_frac_high"][t]) == pytest.approx(float((x.exp() > 1 + clip).double().mean()))
    assert math.isnan(float(out["log_ratio_mean"][4]))  # never trained: NaN, not 0
    assert float(out["log_ratio_skew_all"]) == pytest.approx(float(sst.skew(lr[step < 4].double().numpy())), rel=1e-6)


# ---- the rollout records mu_old, aligned through the prunes ---------------------------------------
@pytest.mark.parametrize("chunk", [None, 5])
def test_recorded_means_follow_the_survivors(chunk):
    backend = FlowLikeAffine(num_steps=5)
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), ProGRPOSchedule(6, [1, 3], [4, 2]),
                                 RolloutSettings(sample_batch_size=chunk), record_means=True)
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(0))
    N, T = res.latents.shape[0], 5
    assert res.means.shape == (N, T, 2)
    n, t = torch.arange(N).repeat_interleave(T), torch.arange(T).repeat(N)
    cond = {k: v[res.prompt_index[n]] for k, v in res.cond.items()}
    out = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[n, t + 1])
    torch.testing.assert_close(out.mean.view(N, T, 2), res.means, rtol=0, atol=1e-7)
    # the check has teeth: another survivor's means differ
    assert (res.means - res.means.roll(1, 0)).abs().amax((1, 2)).min() > 1e-3
    assert ExpandPruneRollout(backend, RewardSet([MeanPixel()]), ProGRPOSchedule(6, [1], [3])).run(
        PROMPTS, torch.Generator().manual_seed(0)).means is None  # off unless asked


# ---- the update ---------------------------------------------------------------------------------
@pytest.fixture()
def affine_rollout():
    backend = FlowLikeAffine(num_steps=5)
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), ProGRPOSchedule(6, [1], [3]), record_means=True)
    return backend, rollout.run(PROMPTS, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("reweight", [True, False])
def test_on_policy_guard_ratio_is_one_and_its_gradient_is_the_weighted_plain_one(affine_rollout, reweight):
    backend, res = affine_rollout
    adv = torch.randn(6, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=1.0)
    before = backend.net.delta.detach().clone()
    settings = UpdateSettings(train_batch_size=1000, clip_range=0.2, max_grad_norm=None, ratio_norm="grpo_guard",
                              guard_reweight=reweight)
    stats = grpo_update(backend, res, adv, settings, opt, generator=torch.Generator().manual_seed(2))
    # as for the plain update (tests/test_update.py): 1 up to the rounding of a matmul on another batch size
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["clip_frac"] == 0.0
    assert abs(stats["log_ratio_mean"]) < 1e-8 and abs(stats["raw_log_ratio_mean"]) < 1e-6
    # at r = 1 the guard's gradient is, per entry, the plain one times w * s (d(norm)/d(mu) = s d(log p)/d(mu))
    moved = backend.net.delta.detach().clone()
    backend.net.delta.data.copy_(before)
    n, t = torch.arange(6).repeat_interleave(5), torch.arange(5).repeat(6)
    cond = {k: v[res.prompt_index[n]] for k, v in res.cond.items()}
    out = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[n, t + 1])
    w = 1 / backend.sigma_decrement(t) if reweight else torch.ones(30)
    (-(adv[n] * w * out.std * out.log_prob).mean()).backward()
    torch.testing.assert_close(moved, before - backend.net.delta.grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(moved, before)


def test_guard_update_off_policy_logs_centred_per_step_ratios(affine_rollout):
    backend, res = affine_rollout
    adv = torch.randn(6, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.5)
    settings = UpdateSettings(train_batch_size=5, minibatches_per_step=1, clip_range=1e-3, ratio_norm="grpo_guard")
    stats = grpo_update(backend, res, adv, settings, opt, generator=torch.Generator().manual_seed(2))
    assert stats["steps"] == 6
    keys = {k for k in stats if "/step_" in k}
    assert keys == {f"{s}/step_{t:02d}" for t in range(5) for s in
                    ("log_ratio_mean", "log_ratio_skew", "clip_frac_low", "clip_frac_high", "raw_log_ratio_mean")}
    assert stats["raw_log_ratio_mean"] != stats["log_ratio_mean"]  # both are reported
    assert all(math.isfinite(stats[k]) for k in keys)


def test_guard_without_recorded_means_says_how_to_get_them(affine_rollout):
    backend, res = affine_rollout
    res.means = None
    opt = torch.optim.SGD(backend.trainable_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="record_means=True"):
        grpo_update(backend, res, torch.ones(6), UpdateSettings(ratio_norm="grpo_guard"), opt)


def test_settings_refuse_unknown_modes_and_backends_without_a_flow_step():
    with pytest.raises(ValueError, match="update.ratio_norm must be one of"):
        UpdateSettings(ratio_norm="guard")
    with pytest.raises(ConfigError, match="ratio_norm='grpo_guard' is defined for flow-matching backends"):
        check_trainable(AffineBackend(num_steps=5), UpdateSettings(ratio_norm="grpo_guard"))
    check_trainable(FlowLikeAffine(num_steps=5), UpdateSettings(ratio_norm="grpo_guard"))


# ---- every flow step kind, LoRA and full fine-tuning, with pruning -------------------------------------
def tiny_flow(finetune: str = "lora") -> TinySD3Backend:
    torch.manual_seed(0)
    backend = TinySD3Backend(num_steps=4, resolution=32, guidance_scale=1.0, seed=0, max_sequence_length=8,
                             noise_level=0.7, finetune=finetune,
                             lora=LoraSettings(rank=2, alpha=2) if finetune == "lora" else None)
    backend.configure_model()
    return backend


@pytest.fixture(scope="module")
def tiny_lora():
    return tiny_flow("lora")


def guard_round(backend: TinySD3Backend) -> None:
    """Roll out with pruning, check the recorded means against re-scoring, train one guarded update."""
    res = ExpandPruneRollout(backend, RewardSet([MeanPixel()]), ProGRPOSchedule(4, [0], [2]),
                             record_means=True).run(PROMPTS, torch.Generator().manual_seed(0))
    N, T = res.latents.shape[0], backend.num_steps
    assert res.means.shape == (N, T, *res.latents.shape[2:])
    # the survivors' recorded means are what re-scoring their transitions gives (batch of another size)
    n, t = torch.arange(N).repeat_interleave(T), torch.arange(T).repeat(N)
    cond = {k: v.index_select(0, res.prompt_index[n]) for k, v in res.cond.items()}
    with torch.no_grad():
        out = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[n, t + 1])
    torch.testing.assert_close(out.mean.view(res.means.shape), res.means, rtol=0, atol=1e-5)
    params = backend.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    settings = UpdateSettings(train_batch_size=4, minibatches_per_step=1, clip_range=0.2, ratio_norm="grpo_guard")
    stats = grpo_update(backend, res, torch.tensor([1.0, -1.0, 0.5, -0.5]), settings, opt,
                        generator=torch.Generator().manual_seed(1))
    trained = backend.trainable_steps().nonzero().flatten().tolist()
    assert {k.split("/step_")[1] for k in stats if "/step_" in k} == {f"{t:02d}" for t in trained}
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_guard_trains_every_flow_kind_after_pruning(tiny_lora, kind):
    """RatioNorm needs only a Gaussian step with a known std, which every stochastic kind has."""
    tiny_lora.sde_kind = kind
    try:
        guard_round(tiny_lora)
    finally:
        tiny_lora.sde_kind = "flow_grpo"


@pytest.mark.slow
def test_guard_trains_full_fine_tuning():
    guard_round(tiny_flow("full"))


# ---- DDP: 2 gloo ranks equal 1 process with the same global batch (as tests/test_ddp.py) ------------
GUARD_DDP = """\
trainer:
  max_steps: 2
model:
  backend:
    class_path: pro_grpo_lightning.backends.sd3.TinySD3Backend
    init_args: {{num_steps: 4, resolution: 32, guidance_scale: 1.0, seed: 0, max_sequence_length: 8,
                lora: {{rank: 2, alpha: 2}}}}
  optimizer:
    class_path: torch.optim.SGD
    init_args: {{lr: 1.0}}
  reward_normalize: batch
  update: {{train_batch_size: 6, ratio_norm: grpo_guard}}
data:
  val_prompts: null
"""


@pytest.mark.slow
def test_guard_under_two_gloo_ranks_equals_one_process(tmp_path):
    """The guarded loss is a mean over (trajectory, step) pairs like the plain one, so DDP's gradient
    average over equal-sized ranks is the single process's; the per-step statistics have the same
    keys on every rank (the metric reduction lines up)."""
    import os
    import subprocess
    import sys

    from pro_grpo_lightning.cli import main
    from tests.cli_runs import ROOT, config_args, run_metrics

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = {n: config_args(tmp_path, n, GUARD_DDP, out=tmp_path / n) for n in ("ddp", "single")}
    with open(tmp_path / "ddp.log", "w") as log:
        ddp = subprocess.Popen([sys.executable, "-m", "pro_grpo_lightning", "fit", *args["ddp"],
                                "--data.prompts_per_step", "1", "--trainer.strategy", "ddp",
                                "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            main(["fit", *args["single"], "--data.prompts_per_step", "2"])
            ddp.wait(timeout=600)
        finally:
            ddp.kill()
    assert ddp.returncode == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    ckpts = [torch.load(tmp_path / n / "ckpt/last.ckpt", weights_only=False) for n in ("single", "ddp")]
    assert all(c["hyper_parameters"]["update"]["ratio_norm"] == "grpo_guard" for c in ckpts)
    single, two = (c["state_dict"] for c in ckpts)
    assert set(single) == set(two) and any("lora_B" in k for k in single)
    for k, v in single.items():
        torch.testing.assert_close(two[k], v, rtol=0, atol=2e-6)
    assert max(v.abs().max().item() for k, v in single.items() if "lora_B" in k) > 1e-4  # it trained
    rows = [run_metrics(tmp_path / n, "train/log_ratio_mean/step_00") for n in ("single", "ddp")]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows):
        for key in ("train/grad_norm", "train/ratio_mean", "train/clip_frac_low/step_02"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), key


def test_benchmark_aggregates_per_step_ratio_statistics_and_the_heldout_comparison():
    from benchmarks.grpo_guard import aggregate, schedule_spec, table

    def run(arm, seed, lr_means, start, end):
        log = [{"rollouts": r + 1, **{f"train/log_ratio_mean/step_{t:02d}": v + 0.1 * r for t, v in enumerate(lr_means)},
                "train/clip_frac_low/step_00": float("nan")} for r in range(2)]
        curve = [{"kind": "start", "rollouts": 0, "reward": start, "exact": 0.5},
                 {"kind": "end", "rollouts": 2, "reward": end, "exact": 0.5}]
        return {"arm": arm, "seed": seed, "train_log": log, "curve": curve}

    runs = {"plain": [run("plain", 0, [0.0, -1.0], 0.5, 0.6), run("plain", 1, [0.0, -3.0], 0.5, 0.8)],
            "guard": [run("guard", 0, [0.0, 0.0], 0.5, 0.7), run("guard", 1, [0.0, 0.0], 0.5, 0.7)]}
    r = aggregate(runs)
    step1 = r["per_step"]["plain"]["log_ratio_mean"]["1"]
    assert step1["mean"] == pytest.approx(-1.95) and step1["n"] == 2  # seeds' means over rollouts: -0.95, -2.95
    assert r["per_step"]["plain"]["clip_frac_low"] == {}  # NaN entries are skipped
    assert r["heldout"]["plain"]["gain"]["mean"] == pytest.approx(0.2)
    cmp = r["guard_minus_plain"]["reward"]
    assert cmp["diff"] == pytest.approx(0.0) and cmp["mdd80"] > 0 and 0 < cmp["power_at_plain_gain"] < 1
    assert "| 1 | -1.95" in table(r)
    assert schedule_spec(ProGRPOSchedule(16, [4, 6], [10, 6])) == "pro:16>10@4>6@6/ovf"
