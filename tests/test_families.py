"""The model families of issue 26 (SDXL, Qwen-Image, Z-Image, ...) through one set of checks, each on
its tiny twin built in code (no files, no hub):

- with the SDE off, our sampling (encode -> per-row steps -> decode) is the stock diffusers
  pipeline's own output from the same initial noise and prompts: conditioning, CFG, timestep table
  and latent packing are the pipeline's;
- every recorded step log-prob is reproduced by re-scoring the stored transition, batched with
  mixed step indices and row by row;
- a two-rollout fit with checkpoints and an EMA resumes exactly; its exported LoRA, loaded by the
  stock pipeline (``load_lora_weights``), samples what our policy samples; ``predict`` writes the
  images; a fully fine-tuned denoiser exports as a folder ``Pipeline.from_pretrained`` loads;
- ``plan`` of the family's tiny config.

A family is one ``Family`` row of ``FAMILIES``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from pro_grpo_lightning import plan
from pro_grpo_lightning.backends.base import LoraSettings
from pro_grpo_lightning.data import PromptDataModule
from pro_grpo_lightning.ema import EMA
from pro_grpo_lightning.export import ExportLoRA, export_lora
from pro_grpo_lightning.loading import LORA_WEIGHT_NAME
from pro_grpo_lightning.module import ProGRPOModule
from pro_grpo_lightning.predict import PredictionWriter
from pro_grpo_lightning.rewards.image_stats import Brightness
from pro_grpo_lightning.schedules import ProGRPOSchedule
from pro_grpo_lightning.update import UpdateSettings

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cube on a table", "two cats"]
RES = 32

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Family:
    """How to build one family's tiny twin and run its stock pipeline on the same components."""

    backend: Callable[..., Any]  #: the tiny backend class
    components: Callable[[int, int], dict[str, Any]]  #: (resolution, seed) -> the pipeline's components
    pipeline: str  #: diffusers' pipeline class name
    sde_off: dict[str, Any]  #: backend settings that make every step the deterministic ODE step
    #: (pipe, prompts, backend, initial latents) -> images [B, 3, H, W] in [0, 1]
    call: Callable[[Any, list[str], Any, torch.Tensor], torch.Tensor]
    config: str | None  #: the tiny config in configs/ (None: the family's plan is its real configs')
    settings: dict[str, Any] = field(default_factory=dict)  #: extra backend settings for every test


def _sdxl_call(pipe, prompts, backend, x):
    return pipe(prompts, negative_prompt=backend.negative_prompt, num_inference_steps=backend.num_steps,
                guidance_scale=backend.guidance_scale, height=backend.resolution, width=backend.resolution,
                latents=x, eta=0.0, output_type="pt").images


def _qwenimage_call(pipe, prompts, backend, x):
    from pro_grpo_lightning.backends.flux import pack_latents

    return pipe(prompts, negative_prompt=backend.negative_prompt, true_cfg_scale=backend.guidance_scale,
                num_inference_steps=backend.num_steps, height=backend.resolution, width=backend.resolution,
                latents=pack_latents(x), max_sequence_length=backend.max_sequence_length, output_type="pt").images


def _zimage_call(pipe, prompts, backend, x):
    return pipe(list(prompts), negative_prompt=[backend.negative_prompt] * len(prompts),
                guidance_scale=backend.guidance_scale, cfg_normalization=backend.cfg_normalization or False,
                num_inference_steps=backend.num_steps, height=backend.resolution, width=backend.resolution,
                latents=x, max_sequence_length=backend.max_sequence_length, output_type="pt").images


def _sd3_call(pipe, prompts, backend, x):
    return pipe(prompts, negative_prompt=backend.negative_prompt, num_inference_steps=backend.num_steps,
                guidance_scale=backend.guidance_scale, height=backend.resolution, width=backend.resolution,
                latents=x, max_sequence_length=backend.max_sequence_length, output_type="pt").images


def _families() -> dict[str, Family]:
    from pro_grpo_lightning.backends.qwenimage import TinyQwenImageBackend, build_tiny_qwenimage_components
    from pro_grpo_lightning.backends.sd3 import TinySD35LBackend, build_tiny_sd35l_components
    from pro_grpo_lightning.backends.sdxl import TinySDXLBackend, build_tiny_sdxl_components
    from pro_grpo_lightning.backends.zimage import TinyZImageBackend, build_tiny_zimage_components

    return {
        "sdxl": Family(TinySDXLBackend, build_tiny_sdxl_components, "StableDiffusionXLPipeline",
                       {"eta": 0.0}, _sdxl_call, "tiny_sdxl.yaml"),
        "qwenimage": Family(TinyQwenImageBackend, build_tiny_qwenimage_components, "QwenImagePipeline",
                            {"noise_level": 0.0}, _qwenimage_call, "tiny_qwenimage.yaml"),
        # CFG with the pipeline's norm cap on, so both of Z-Image's guidance rules are compared
        "zimage": Family(TinyZImageBackend, build_tiny_zimage_components, "ZImagePipeline",
                         {"noise_level": 0.0}, _zimage_call, "tiny_zimage.yaml", {"cfg_normalization": 1.0}),
        # SD3.5-Large: the SD3 backend on SD3.5-L's block type (its plan: configs/sd35l_* in docs/results/plan)
        "sd35l": Family(TinySD35LBackend, build_tiny_sd35l_components, "StableDiffusion3Pipeline",
                        {"noise_level": 0.0}, _sd3_call, None),
    }


FAMILIES = _families()


def make(name: str, **kw) -> Any:
    fam = FAMILIES[name]
    backend = fam.backend(**{"num_steps": 3, "resolution": RES, **fam.settings, **kw})
    backend.configure_model()
    return backend


def ode_images(backend, x: torch.Tensor, prompts=PROMPTS) -> torch.Tensor:
    """Our sampling from initial latents ``x``: every row at step i, then the decode."""
    cond = backend.encode_prompts(prompts)
    with torch.no_grad():
        for i in range(backend.num_steps):
            x = backend.step(x, torch.full((x.shape[0],), i), cond).next_latents
        return backend.decode(x)


def stock(name: str, pipe_or_folder: Any = None) -> Any:
    import diffusers

    fam = FAMILIES[name]
    cls = getattr(diffusers, fam.pipeline)
    if isinstance(pipe_or_folder, str):
        return cls.from_pretrained(pipe_or_folder)
    return cls(**fam.components(RES, 0))


def assert_pipeline_equal(name, backend, pipe, seed=7, prompts=PROMPTS):
    x = backend.initial_latents(len(prompts), torch.Generator().manual_seed(seed))
    ours = ode_images(backend, x, prompts)
    with torch.no_grad():
        theirs = FAMILIES[name].call(pipe, list(prompts), backend, x).float()
    assert ours.shape == theirs.shape == (len(prompts), 3, RES, RES)
    assert ours.std() > 1e-3  # not a constant image, which would match anything
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_with_the_sde_off_is_the_stock_pipeline(name):
    backend = make(name, **FAMILIES[name].sde_off)
    assert backend.trainable_steps().sum() == 0  # the SDE is off: nothing to train
    assert_pipeline_equal(name, backend, stock(name))


def test_sdxl_negative_prompt_text_is_encoded_as_the_pipeline_does():
    """The default zeroes the unconditional rows (``force_zeros_for_empty_prompt``); a negative
    prompt is encoded by both text encoders, as the pipeline's ``negative_prompt``."""
    backend = make("sdxl", eta=0.0, negative_prompt="blurry")
    assert backend.negative_embeds.abs().sum() > 0 and backend.negative_pooled.abs().sum() > 0
    assert make("sdxl").negative_embeds.abs().sum() == 0
    assert_pipeline_equal("sdxl", backend, stock("sdxl"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_step_log_probs_are_reproduced_by_rescoring(name):
    backend = make(name, num_steps=4)
    cond = backend.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(3)
    x = backend.initial_latents(2, g)
    xs, logps = [x], []
    with torch.no_grad():
        for i in range(backend.num_steps):
            out = backend.step(xs[-1], torch.full((2,), i), cond, generator=g)
            xs.append(out.next_latents)
            logps.append(out.log_prob)
    traj, logps = torch.stack(xs, 1), torch.stack(logps, 1)  # [2, T + 1, ...], [2, T]
    assert torch.isfinite(logps).all()
    trained = backend.trainable_steps()
    assert trained.any()
    # every (row, step) pair in one call, mixed step indices, with grad as in the update
    n = torch.arange(2).repeat_interleave(backend.num_steps)  # [2T]
    t = torch.arange(backend.num_steps).repeat(2)  # [2T]
    rows = {k: v.index_select(0, n) for k, v in cond.items()}
    again = backend.step(traj[n, t], t, rows, next_latents=traj[n, t + 1])
    torch.testing.assert_close(again.log_prob.detach().view(2, -1), logps, rtol=1e-5, atol=1e-4)
    again.log_prob[trained[t]].sum().backward()  # differentiable w.r.t. the adapter
    grads = [p.grad for p in backend.trainable_parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    with torch.no_grad():
        one = backend.step(traj[1:, 2], t[2:3], {k: v[1:] for k, v in cond.items()}, next_latents=traj[1:, 3])
    torch.testing.assert_close(one.log_prob, logps[1:, 2], rtol=1e-5, atol=1e-4)


def _module(name: str, **backend_kw) -> ProGRPOModule:
    backend = FAMILIES[name].backend(**{"num_steps": 4, "resolution": RES, **FAMILIES[name].settings,
                                        "lora": LoraSettings(rank=2, alpha=4), **backend_kw})
    return ProGRPOModule(backend=backend, rewards=[Brightness()],
                         schedule=ProGRPOSchedule(group_size=4, checkpoints=[1], keep=[2]),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=0.05),
                         update=UpdateSettings(train_batch_size=8, clip_range=0.2), seed=0)


def _fit(module, root: Path, run: str, max_steps: int, ckpt_path=None, export=False) -> pl.Trainer:
    pl.seed_everything(0)
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=root / run / "ckpt", filename="{step}", save_top_k=-1,
                                              save_last=True, every_n_train_steps=1),
                 EMA(decay=0.5, export=False)]
    if export:
        callbacks.append(ExportLoRA(dirpath=str(root / run / "lora")))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(root, name=run),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, PromptDataModule(prompts="colors", prompts_per_step=2, seed=0), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fit_resumes_exports_to_the_stock_pipeline_and_predicts(name, tmp_path):
    straight = _module(name)
    _fit(straight, tmp_path, "straight", 2, export=True)
    resumed = _module(name)  # from the straight run's first checkpoint to its second rollout
    _fit(resumed, tmp_path, "resumed", 2, ckpt_path=str(tmp_path / "straight" / "ckpt" / "step=1.ckpt"))
    a, b = straight.backend.lora_state_dict(), resumed.backend.lora_state_dict()
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    ema = [torch.load(tmp_path / run / "ckpt" / "last.ckpt", weights_only=True)["callbacks"] for run in
           ("straight", "resumed")]
    (key,) = [k for k in ema[0] if k.startswith("EMA")]
    prefix = f"backend.{straight.backend.denoiser_component}."
    assert {k.removeprefix(prefix) for k in ema[0][key]["shadow"]} == a.keys()  # the EMA averages the adapter
    for k, v in ema[0][key]["shadow"].items():
        torch.testing.assert_close(ema[1][key]["shadow"][k], v, rtol=1e-5, atol=1e-6)

    # the exported LoRA in the stock pipeline samples what our policy samples (SDE off)
    lora = tmp_path / "straight" / "lora"
    assert (lora / LORA_WEIGHT_NAME).is_file()
    policy = make(name, lora=LoraSettings(rank=2, alpha=4), **FAMILIES[name].sde_off)
    policy.load_lora_state_dict(a)
    pipe = stock(name)
    pipe.load_lora_weights(str(lora))
    assert_pipeline_equal(name, policy, pipe)

    # predict from the resumed run's checkpoint: one PNG per held-out prompt, and the score table
    out = tmp_path / "predict"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[PredictionWriter(output_dir=str(out))])
    preds = trainer.predict(_module(name), PromptDataModule(prompts="colors", val_prompts=PROMPTS,
                                                            eval_images_per_prompt=1),
                            ckpt_path=str(tmp_path / "resumed" / "ckpt" / "last.ckpt"))
    images = torch.cat([p["images"] for p in preds])
    assert images.shape == (2, 3, RES, RES) and torch.isfinite(images).all()
    assert len(list(out.glob("*/*.png"))) == 2 and (out / "scores.csv").is_file()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_finetuning_exports_a_pipeline_folder(name, tmp_path):
    backend = make(name, finetune="full", **FAMILIES[name].sde_off)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-like denoiser: every weight moved
        for p in backend.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    folder = export_lora(backend, str(tmp_path / "pipeline"))
    assert_pipeline_equal(name, backend, stock(name, folder))


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.config])
def test_plan_of_the_tiny_config(name, capsys):
    assert plan.main(["--config", str(ROOT / "configs" / FAMILIES[name].config), "--json", "--gpu_memory", "2GB"]) == 0
    r = json.loads(capsys.readouterr().out)
    denoiser = FAMILIES[name].backend.denoiser_component
    assert r["weights"][denoiser] > 0 and r["fits"] is True
    assert any(p["name"].startswith("update") for p in r["phases"])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_real_backend_loads_a_folder_and_builds_its_architecture_with_random_weights(name, tmp_path):
    """On a saved tiny folder, the family's real backend class loads the weights (``load_components``:
    the denoiser equals the twin's), and builds every network from the folder's config files alone
    with seeded random values and stand-in tokenizers (``NetworkSource("random")``: the path of the
    GPU memory check), and samples."""
    import importlib

    from pro_grpo_lightning.networks import NetworkSource

    fam = FAMILIES[name]
    module = importlib.import_module(fam.backend.__module__)
    save = getattr(module, f"save_tiny_{name}_pipeline")
    real = next(c for c in fam.backend.__mro__ if not c.built_in_code)  # the real-model class of the twin
    folder = save(str(tmp_path / name), resolution=RES)
    loaded = real(folder, num_steps=3, resolution=RES, **fam.settings)  # the real loading path first
    loaded.configure_model()
    base = {n: p for n, p in make(name).denoiser().state_dict().items() if "lora_" not in n}  # not the adapter
    assert base and all(torch.equal(loaded.denoiser().state_dict()[n], p) for n, p in base.items())
    backend = real(folder, num_steps=3, resolution=RES, **fam.settings)
    backend.use_networks(NetworkSource("random", "cpu", seed=1))
    backend.configure_model()
    saved = make(name).denoiser()
    built = backend.denoiser()
    first = next(n for n, p in saved.named_parameters() if p.ndim == 2 and p.std() > 0)
    assert dict(built.named_parameters())[first].shape == dict(saved.named_parameters())[first].shape
    assert not torch.equal(dict(built.named_parameters())[first], dict(saved.named_parameters())[first])
    cond = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        out = backend.step(backend.initial_latents(2, torch.Generator().manual_seed(0)), torch.tensor([0, 1]), cond)
    assert torch.isfinite(out.log_prob).all() and out.next_latents.shape[0] == 2


#: Published parameter counts of the real architectures the configs name (``architectures.PIPELINES``
#: builds them on the meta device for the plan and the GPU memory check).
REAL_COUNTS = {
    ("stabilityai/stable-diffusion-xl-base-1.0", "unet"): 2.567e9,
    ("stabilityai/stable-diffusion-xl-base-1.0", "text_encoder_2"): 0.6947e9,
    ("stabilityai/stable-diffusion-3.5-large", "transformer"): 8.06e9,
    ("Qwen/Qwen-Image", "transformer"): 20.43e9,
    ("Qwen/Qwen-Image", "text_encoder"): 8.29e9,  # Qwen2.5-VL-7B with its vision tower and LM head
    ("Tongyi-MAI/Z-Image-Turbo", "transformer"): 6.15e9,
    ("Tongyi-MAI/Z-Image-Turbo", "text_encoder"): 4.02e9,  # Qwen3-4B
}


@pytest.mark.parametrize("hub_id, name", list(REAL_COUNTS))
def test_architecture_table_matches_the_published_sizes(hub_id, name):
    from pro_grpo_lightning.architectures import PIPELINES
    from pro_grpo_lightning.networks import diffusers_model, transformers_model

    build = transformers_model if name.startswith("text_encoder") else diffusers_model
    with torch.device("meta"):
        net = build(*PIPELINES[hub_id][name])
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - REAL_COUNTS[hub_id, name]) < 3e-3 * REAL_COUNTS[hub_id, name], n


@pytest.mark.parametrize("hub_id", sorted({h for h, _ in REAL_COUNTS}))
def test_hub_architectures_build_on_meta_with_stand_in_tokenizers(hub_id):
    """What ``plan`` and the GPU memory check build for a hub id: every component of the table row
    (transformers text encoders, diffusers networks) and a stand-in tokenizer per text encoder."""
    from pro_grpo_lightning.architectures import PIPELINES
    from pro_grpo_lightning.networks import architecture_components

    names = tuple(n for n in PIPELINES[hub_id] if n.startswith("text_encoder"))
    with torch.device("meta"):
        comps = architecture_components(hub_id, names)
    assert set(PIPELINES[hub_id]) <= set(comps)
    for name in names:
        tok = comps["tokenizer" + name[len("text_encoder"):]]
        assert len(tok(["a red cube"]).input_ids[0]) > 0
    assert all(type(comps[n]).__name__ == PIPELINES[hub_id][n][0] for n in PIPELINES[hub_id])
