"""End to end on the three tiny backends (SD1.5, SD3, FLUX), and the flow configs' offline failure.

- ``fit`` through the CLI on each tiny config: the logged compute matches the schedule, the first
  (on-policy) update has ratio 1, the adapter moved and the frozen weights did not.
- Expand-and-prune on each tiny backend: the denoiser batch shrinks at each checkpoint and every
  survivor's stored chain re-scores to its stored log-probs.
- The real-weight flow configs mirror the paper and fail offline with a message naming the weights.
"""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from pro_grpo_lightning.backends import LoraSettings, TinyFluxBackend, TinySD3Backend, TinySD15Backend
from pro_grpo_lightning.cli import main
from pro_grpo_lightning.data import PromptDataModule
from pro_grpo_lightning.module import ProGRPOModule
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rewards.image_stats import Brightness
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import ProGRPOSchedule
from tests.cli_runs import config_command

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "configs"


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar series of the run's TensorBoard event file, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(log_dir / "events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(events[0], size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def frozen_and_lora(backend) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    frozen, lora = {}, {}
    for name, p in backend.named_parameters():
        (lora if p.requires_grad else frozen)[name] = p.detach().clone()
    return frozen, lora


# ---- fit through the CLI -----------------------------------------------------------------------
#: Per-config overrides that keep the run short (the quickstart runs in test_module.py).
SHORTER = {"tiny_sd15.yaml": ["--model.backend.init_args.resolution", "32", "--data.prompts_per_step", "2"],
           "tiny_sd3.yaml": [], "tiny_flux.yaml": []}


@pytest.mark.parametrize("config", list(SHORTER))
def test_cli_fit_on_tiny_backend(config, tmp_path):
    cli = main(["fit", "--config", str(CONFIGS / config), "--trainer.max_steps", "2",
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path),
                "--model.samples.every_n_rollouts", "0", "--model.rollout.audit_every_n_rollouts", "0",
                *SHORTER[config]])
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 2 and module.rollouts_done == 2

    # Logged compute: every rollout costs P * (denoiser calls per prompt of the schedule)
    P = cli.datamodule.prompts_per_step
    T = module.backend.num_steps
    sched = module.schedule
    assert sched.checkpoints, "the tiny configs must prune"
    m = scalars(Path(trainer.logger.log_dir))
    cm = {k: float(v) for k, v in trainer.callback_metrics.items()}  # the last rollout's; constants are not logged
    assert cm["compute/nfe"] == P * sched.nfe_per_prompt(T)
    assert cm["compute/nfe_plain_gmax"] == P * sched.group_size * T
    assert cm["compute/nfe"] < cm["compute/nfe_plain_gmax"]
    assert cm["compute/previews"] == P * sum([sched.group_size, *sched.keep[:-1]])
    assert not any(k.startswith("compute/") for k in m)
    # the first update is on-policy (1 inner epoch, 1 optimizer step): re-scored = sampled log-probs
    assert m["train/ratio_mean"][0] == pytest.approx(1.0, abs=1e-4)
    assert m["train/approx_kl"][0] == pytest.approx(0.0, abs=1e-8)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in m.values())

    # Only the adapter trained: compare with a fresh build of the same (seeded, code-built) model.
    fresh = cli.parser.instantiate_classes(cli.config)["fit"]["model"].backend
    fresh.configure_model()
    trained_frozen, trained_lora = frozen_and_lora(module.backend)
    fresh_frozen, fresh_lora = frozen_and_lora(fresh)
    assert trained_frozen.keys() == fresh_frozen.keys() and trained_lora.keys() == fresh_lora.keys()
    assert trained_lora and all("lora_" in k for k in trained_lora)
    for k, v in fresh_frozen.items():
        assert torch.equal(trained_frozen[k], v), k
    # peft's "gaussian" init starts every lora_B at 0 (policy = reference); training moved them all,
    # except where no gradient can reach: SD3's last joint block discards its text-stream output
    # (``context_pre_only``), so the LoRA on its text queries (add_q_proj) never trains.
    lora_b = [k for k in fresh_lora if "lora_B" in k]
    assert lora_b and all(fresh_lora[k].abs().max() == 0 for k in lora_b)
    prefix = "transformer." if hasattr(module.backend, "transformer") else "unet."
    dead = {f"{prefix}{name}.attn.add_q_proj.lora_B.default.weight"
            for name, block in module.backend.denoiser().named_modules()
            if type(block).__name__ == "JointTransformerBlock" and block.context_pre_only}
    assert dead <= set(lora_b)
    moved = {k for k in lora_b if trained_lora[k].abs().max() > 0}
    assert moved == set(lora_b) - dead, (set(lora_b) - dead) ^ moved


# ---- expand and prune on every tiny backend ----------------------------------------------------
TINY = {
    "sd15": lambda: TinySD15Backend(num_steps=4, resolution=32, guidance_scale=3.0, seed=0,
                                    lora=LoraSettings(rank=2, alpha=2)),
    "sd3": lambda: TinySD3Backend(num_steps=4, resolution=32, guidance_scale=4.5, seed=0,
                                  max_sequence_length=16, lora=LoraSettings(rank=2, alpha=2)),
    "flux": lambda: TinyFluxBackend(num_steps=4, resolution=32, guidance_scale=3.5, seed=0,
                                    max_sequence_length=16, lora=LoraSettings(rank=2, alpha=2)),
}

#: Re-scoring runs the denoiser on a batch of another size than sampling did (16 rows vs 12/8/4),
#: and float32 matmuls may then reduce in another order: the velocity/eps of a row can move by a
#: few ulps (~1e-7 relative). The log-prob is a mean over dims of z * d(mean) / std, so with the
#: smallest step std here (~6e-3, SD3's last step) that is ~1e-5; 1e-4 leaves a margin and is
#: still ~5000x below what a transition paired with another trajectory's latents scores (>= 0.5).
LOG_PROB_ATOL = 1e-4


@pytest.mark.parametrize("family", list(TINY))
def test_expand_prune_survivors_rescore_to_their_log_probs(family):
    backend = TINY[family]()
    backend.configure_model()
    sched = ProGRPOSchedule(group_size=6, checkpoints=[0, 2], keep=[4, 2])
    prompts = ["a red cube", "two cats"]
    P, T, K = len(prompts), backend.num_steps, sched.final_size

    calls: list[int] = []
    step = backend.step

    def counting_step(latents, *args, **kwargs):
        calls.append(latents.shape[0])
        return step(latents, *args, **kwargs)

    backend.step = counting_step
    try:
        res = ExpandPruneRollout(backend, RewardSet([Brightness()]), sched).run(
            prompts, torch.Generator().manual_seed(0))
    finally:
        del backend.step  # back to the class's method
    # the denoiser batch shrinks right after each checkpoint: 12 -> 8 -> 8 -> 4 rows
    assert calls == [P * g for g in sched.group_sizes_per_step(T)] == [12, 8, 8, 4]
    assert res.nfe == sum(calls) == P * sched.nfe_per_prompt(T) and res.nfe_full == P * 6 * T
    assert res.num_previews == P * (6 + 4)
    N = P * K
    assert res.latents.shape[:2] == (N, T + 1) and res.log_probs.shape == (N, T)
    assert torch.isfinite(res.log_probs).all()

    # re-score every (survivor, step) transition in one batch, with each row's own step index
    n = torch.arange(N).repeat_interleave(T)  # [N*T]
    t = torch.arange(T).repeat(N)  # [N*T]
    cond = {k: v.index_select(0, res.prompt_index[n]) for k, v in res.cond.items()}
    with torch.no_grad():
        out = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[n, t + 1])
        torch.testing.assert_close(out.log_prob.view(N, T), res.log_probs, rtol=0, atol=LOG_PROB_ATOL)
        # the check has teeth: the same transitions paired with another survivor's next latents fail
        other = torch.roll(torch.arange(N), 1)
        wrong = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[other][n, t + 1])
    assert ((wrong.log_prob.view(N, T) - res.log_probs).abs() > 100 * LOG_PROB_ATOL).all()
    # the final rewards are the survivors' own final images
    final = Brightness()(backend.decode(res.latents[:, T]), [prompts[i] for i in res.prompt_index.tolist()])
    torch.testing.assert_close(res.rewards.flatten(), final, rtol=0, atol=1e-5)


# ---- the real-weight flow configs ----------------------------------------------------------------
REAL = {
    "sd35m_pickscore_pro_grpo.yaml": "stabilityai/stable-diffusion-3.5-medium",
    "sd35m_pickscore_pro_grpo_flash.yaml": "stabilityai/stable-diffusion-3.5-medium",
    "sd35m_pickscore_flow_grpo.yaml": "stabilityai/stable-diffusion-3.5-medium",
    "flux_dev_pickscore_pro_grpo.yaml": "black-forest-labs/FLUX.1-dev",
}


class ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:  # parse and validate, build nothing
        pass


def parse(name: str) -> ParseOnlyCLI:
    return ParseOnlyCLI(ProGRPOModule, PromptDataModule, run=False, args=config_command(CONFIGS / name),
                        save_config_kwargs={"overwrite": True})


@pytest.fixture(scope="module")
def real_configs():
    return {name: parse(name) for name in REAL}


def test_sd35m_and_flux_configs_mirror_the_paper(real_configs):
    cfg = {name: cli.config.model for name, cli in real_configs.items()}
    shared = None
    for name in [n for n in REAL if n.startswith("sd35m")]:
        m = cfg[name]
        b = m.backend.init_args
        assert m.backend.class_path == "pro_grpo_lightning.backends.sd3.SD3Backend"
        assert (b.pretrained, b.num_steps, b.guidance_scale, b.resolution) == (REAL[name], 10, 4.5, 512)
        assert (b.noise_level, b.sde_kind, b.dtype) == (0.7, "flow_grpo", "bfloat16")
        assert (b.lora.rank, b.lora.alpha) == (32, 64)
        assert [r.class_path for r in m.rewards] == ["pro_grpo_lightning.rewards.pickscore.PickScore"]
        assert (m["update"].clip_range, m.advantages.clip, m["update"].kl_beta) == (1e-4, 5.0, 0.01)  # m.update: a method
        opt = real_configs[name].config.optimizer  # the top-level --optimizer (LightningCLI's spelling)
        assert opt.class_path == "torch.optim.AdamW" and opt.init_args.lr == 3e-4
        assert real_configs[name].config.trainer.precision == "bf16-mixed"
        # the three runs differ in their schedule only (and in their log name)
        rest = {k: v for k, v in m.as_dict().items() if k not in ("schedule", "rollout")}
        assert {**m.rollout.as_dict(), "audit_every_n_rollouts": 0} == {
            "preview_scale": 1.0, "shared_initial_noise": False, "audit_every_n_rollouts": 0, "sample_batch_size": None}
        shared = shared or rest
        assert rest == shared, name
    std, flash = cfg["sd35m_pickscore_pro_grpo.yaml"].schedule, cfg["sd35m_pickscore_pro_grpo_flash.yaml"].schedule
    assert std.class_path.endswith(".ProGRPOSchedule") and flash.class_path.endswith(".ProGRPOSchedule")
    assert (std.init_args.group_size, std.init_args.checkpoints, std.init_args.keep) == (48, [5, 7], [24, 12])
    assert (flash.init_args.group_size, flash.init_args.checkpoints, flash.init_args.keep) == (24, [5, 7], [16, 12])
    assert std.init_args.rule == flash.init_args.rule == "ovf"
    plain = cfg["sd35m_pickscore_flow_grpo.yaml"].schedule
    assert plain.class_path.endswith(".PlainGRPOSchedule") and plain.init_args.group_size == 24

    flux = cfg["flux_dev_pickscore_pro_grpo.yaml"]
    b = flux.backend.init_args
    assert flux.backend.class_path == "pro_grpo_lightning.backends.flux.FluxBackend"
    assert (b.pretrained, b.guidance_scale, b.gradient_checkpointing, b.offload_text_encoders) == \
        (REAL["flux_dev_pickscore_pro_grpo.yaml"], 3.5, True, True)
    s = flux.schedule.init_args
    assert all(0 <= c < b.num_steps for c in s.checkpoints) and s.keep[-1] >= 2
    ProGRPOSchedule(s.group_size, s.checkpoints, s.keep, s.rule).validate_steps(b.num_steps)


@pytest.mark.parametrize("name", list(REAL))
def test_real_flow_config_fails_offline_naming_its_weights(name, real_configs, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty hub cache, so the result does not depend on what this machine has downloaded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cli = real_configs[name]
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1") as err:
        cli.parser.instantiate_classes(cli.config)
    assert repr(REAL[name]) in str(err.value)  # the backend's weights, checked before anything loads


def _run_cli_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pro_grpo_lightning", "fit", "--config",
                           "configs/sd35m_pickscore_base.yaml", "--config", "configs/sd35m_pickscore_pro_grpo.yaml"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    return _run_cli_offline(tmp_path_factory.mktemp("offline"))


def test_python_m_fit_on_real_config_offline_exits_with_a_clear_message(offline_run):
    proc = offline_run
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    # the last line of stderr is the message, naming the weights and the reason
    assert "stabilityai/stable-diffusion-3.5-medium" in last, proc.stderr[-2000:]
    assert "HF_HUB_OFFLINE=1" in last and "offline" in last
    assert "FileNotFoundError" in last


def test_python_m_fit_offline_prints_no_library_traceback(offline_run):
    assert "Traceback" not in offline_run.stderr, offline_run.stderr[-3000:]
    assert "jsonargparse" not in offline_run.stderr
