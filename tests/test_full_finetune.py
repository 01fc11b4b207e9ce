"""Full fine-tuning (``finetune: full``) on the three tiny backends: the reference copy exists only
with a KL, the denoiser learns (a reward and its reverse move it apart), training resumes exactly
and the export is a pipeline folder the stock diffusers class loads with the trained weights."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from pro_grpo_lightning.backends import TinyFluxBackend, TinySD3Backend, TinySD15Backend
from pro_grpo_lightning.data import PromptDataModule
from pro_grpo_lightning.errors import ConfigError
from pro_grpo_lightning.export import _family, export_lora, load_checkpoint_into
from pro_grpo_lightning.module import ProGRPOModule
from pro_grpo_lightning.objectives import group_advantages
from pro_grpo_lightning.rewards.combine import RewardSet
from pro_grpo_lightning.rewards.image_stats import Brightness
from pro_grpo_lightning.rollout import ExpandPruneRollout
from pro_grpo_lightning.schedules import PlainGRPOSchedule, ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings, grpo_update

FAMILIES = {"sd15": TinySD15Backend, "sd3": TinySD3Backend, "flux": TinyFluxBackend}


def make(family: str, **kw):
    return FAMILIES[family](num_steps=4, resolution=32, finetune="full", **kw)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_copy_only_with_a_kl(family):
    lora = FAMILIES[family](num_steps=4, resolution=32)
    no_kl = ProGRPOModule(backend=make(family), rewards=[Brightness()],
                          schedule=PlainGRPOSchedule(2), update=UpdateSettings(kl_beta=0.0)).backend
    with_kl = ProGRPOModule(backend=make(family), rewards=[Brightness()],
                            schedule=PlainGRPOSchedule(2), update=UpdateSettings(kl_beta=0.01)).backend
    for b in (lora, no_kl, with_kl):
        b.configure_model()
    net = count(no_kl.denoiser())
    trainable = sum(p.numel() for p in no_kl.trainable_parameters())
    assert trainable == net  # the denoiser's own weights train, every one of them
    assert no_kl.reference_denoiser is None
    assert count(with_kl) == count(no_kl) + net  # exactly one frozen copy of the denoiser
    assert count(no_kl) == count(lora) - sum(p.numel() for p in lora.trainable_parameters())  # no adapter
    assert not any(p.requires_grad for p in with_kl.reference_denoiser.parameters())
    # the reference is the base: after a change to the policy it still gives the base output
    cond = with_kl.encode_prompts(["a cat", "a red square"])
    x = with_kl.initial_latents(2, torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1])
    noise = torch.zeros_like(x)
    with torch.no_grad():
        before = with_kl.step(x, idx, cond, noise=noise).mean
        for p in with_kl.trainable_parameters():
            p.add_(0.05)
        moved = with_kl.step(x, idx, cond, noise=noise).mean
        with with_kl.reference():
            ref = with_kl.step(x, idx, cond, noise=noise).mean
    assert (moved - before).abs().max() > 1e-4
    torch.testing.assert_close(ref, before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="holds no reference copy"):
        with no_kl.reference():
            pass


def test_bad_finetune_mode_is_refused_in_one_line():
    with pytest.raises(ValueError, match="finetune must be 'lora' or 'full', got 'half'"):
        TinySD15Backend(finetune="half")


PROMPTS = ["a cat", "a red square"]


def improvement(family: str, sign: float) -> float:
    """One rollout and one full fine-tuning update for reward ``sign * brightness``; returns
    sum_i A_i * (log pi_new - log pi_old)(trajectory i) of the brightness advantages A over the
    stored trajectories' trainable steps: the first-order change of the policy-gradient objective."""
    torch.manual_seed(0)
    backend = make(family)
    backend.configure_model()
    rollout = ExpandPruneRollout(backend, RewardSet([Brightness(weight=sign)]), PlainGRPOSchedule(4))
    res = rollout.run(PROMPTS, torch.Generator().manual_seed(0))
    adv = group_advantages(res.rewards, std_mode="group").flatten()  # [N], for this run's reward
    settings = UpdateSettings(train_batch_size=64, clip_range=0.2, max_grad_norm=None)
    opt = torch.optim.Adam(backend.trainable_parameters(), lr=1e-5)
    grpo_update(backend, res, adv, settings, opt, generator=torch.Generator().manual_seed(0))
    N, T = res.log_probs.shape
    n = torch.arange(N).repeat_interleave(T)  # [N*T]
    t = torch.arange(T).repeat(N)  # [N*T]
    cond = {k: v.index_select(0, res.prompt_index[n]) for k, v in res.cond.items()}
    with torch.no_grad():
        new = backend.step(res.latents[n, t], t, cond, next_latents=res.latents[n, t + 1]).log_prob.view(N, T)
    trained = backend.trainable_steps().to(new.device)  # [T]
    delta = ((new - res.log_probs) * trained).sum(1)  # [N]
    return float((sign * adv * delta).sum())  # advantages of the brightness itself


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetuning_learns(family):
    """The update raises the log-probability of the brighter trajectories of each group when the
    reward is the brightness, and lowers it when the reward is its reverse."""
    up, down = improvement(family, 1.0), improvement(family, -1.0)
    assert up > 0 > down, (up, down)


def tiny_module(family: str) -> ProGRPOModule:
    return ProGRPOModule(backend=make(family), rewards=[Brightness()],
                         schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         update=UpdateSettings(train_batch_size=8, clip_range=0.01, kl_beta=0.01), seed=0)


def fit(module, tmp_path, name, max_steps, ckpt_path=None):
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path, name=name),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name / "ckpt",
                                                                 save_last=True, every_n_train_steps=1)])
    trainer.fit(module, PromptDataModule(prompts="colors", prompts_per_step=2, seed=0), ckpt_path=ckpt_path)


def weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.backend.denoiser().named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetuning_resumes_exactly_and_exports_a_pipeline(family, tmp_path):
    straight = tiny_module(family)
    fit(straight, tmp_path, "straight", 2)
    fit(tiny_module(family), tmp_path, "part", 1)
    ckpt = tmp_path / "part" / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    name = straight.backend.denoiser_component
    trained = {k for k in saved if k.startswith(f"backend.{name}.")}
    assert len(trained) == len(weights(straight))  # the whole denoiser, and no reference copy
    assert not any(k.startswith("backend.reference_denoiser.") for k in saved)
    resumed = tiny_module(family)
    fit(resumed, tmp_path, "resumed", 2, ckpt_path=str(ckpt))
    start = tiny_module(family)
    start.configure_model()
    moved = 0.0
    for n, v in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[n], v, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((v - weights(start)[n]).abs().max()))
    assert moved > 0  # it trained

    out = export_lora(resumed, str(tmp_path / "pipeline"))
    pipeline_cls, _ = _family(resumed.backend)
    pipe = pipeline_cls.from_pretrained(out)
    loaded = dict(getattr(pipe, name).named_parameters())
    for n, v in weights(resumed).items():
        torch.testing.assert_close(loaded[n].detach(), v, rtol=0, atol=0)

    # a LoRA run refuses the full fine-tuning checkpoint in one line
    lora = ProGRPOModule(backend=FAMILIES[family](num_steps=4, resolution=32), rewards=[Brightness()],
                         schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]))
    with pytest.raises(ConfigError, match="has finetune='full' but this run has finetune='lora'"):
        load_checkpoint_into(lora, str(ckpt))


@pytest.mark.parametrize("kl", [0.0, 0.01])
def test_memory_plan_counts_full_finetuning(kl):
    from pro_grpo_lightning import plan

    module = ProGRPOModule(backend=make("sd15"), rewards=[Brightness()], schedule=PlainGRPOSchedule(2),
                           update=UpdateSettings(kl_beta=kl))
    weights = plan.Planner(module, prompts_per_step=2, target="cpu").weights
    real = make("sd15")
    real.set_keep_reference(False)
    real.configure_model()
    net = sum(p.numel() * p.element_size() for p in real.denoiser().parameters())
    assert weights[plan.TRAINED_FULL] == net and plan.TRAINED not in weights
    assert weights["AdamW state (2 per trained weight, its dtype)"] == 2 * net
    assert weights.get("reference_denoiser", 0) == (net if kl > 0 else 0)
