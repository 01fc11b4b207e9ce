"""The trained LoRA loads into the stock diffusers pipelines and reproduces the policy's denoiser."""

import glob

import pytest
import torch

from pro_grpo_lightning.backends.base import LoraSettings
from pro_grpo_lightning.backends.flux import TinyFluxBackend
from pro_grpo_lightning.backends.sd3 import TinySD3Backend
from pro_grpo_lightning.backends.sd15 import SD15Backend, save_tiny_sd15_pipeline
from pro_grpo_lightning.cli import main as cli_main
from pro_grpo_lightning.export import LORA_WEIGHT_NAME, export_lora, fresh_pipeline
from pro_grpo_lightning.export import main as export_main
from tests.cli_runs import CALLBACKS_WITH_EXPORT, config_args
from tests.tiny_models import unet_out



def train_like(backend) -> None:
    """Give the adapter nonzero weights (B starts at 0, which would make any export look right)."""
    backend.configure_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return save_tiny_sd15_pipeline(str(tmp_path_factory.mktemp("tiny_sd15")), resolution=32)


def test_sd15_lora_loads_into_stable_diffusion_pipeline_and_merges(sd15_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    backend = SD15Backend(sd15_folder, num_steps=4, resolution=32, lora=LoraSettings(rank=2, alpha=4))
    train_like(backend)  # alpha / rank = 2: the scale must travel with the file
    ours = unet_out(backend.unet)
    with backend.reference():
        base = unet_out(backend.unet)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters

    export_lora(backend, str(tmp_path / "lora"))
    assert (tmp_path / "lora" / LORA_WEIGHT_NAME).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(sd15_folder)
    torch.testing.assert_close(unet_out(pipe.unet), base, rtol=0, atol=1e-6)  # stock: the base model
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(unet_out(pipe.unet), ours, rtol=1e-4, atol=1e-5)

    export_lora(backend, str(tmp_path / "merged"), merge=True)
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())  # plain weights
    torch.testing.assert_close(unet_out(merged.unet), ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_out(backend.unet), ours, rtol=0, atol=0)  # the policy is untouched


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_lora_loads_into_its_stock_pipeline(family, tmp_path):
    backend = (TinySD3Backend if family == "sd3" else TinyFluxBackend)(
        num_steps=4, resolution=32, lora=LoraSettings(rank=2, alpha=4))
    train_like(backend)
    cond = backend.encode_prompts(["a cat", "a red square"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *backend.latent_shape(), generator=g)
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        ours = backend._velocity(x, sigma, cond)  # guided velocity through the policy

    export_lora(backend, str(tmp_path / "lora"))
    pipe = fresh_pipeline(backend)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    policy = backend.transformer
    backend.transformer = pipe.transformer  # the stock pipeline's denoiser, LoRA loaded by diffusers
    try:
        with torch.no_grad():
            loaded = backend._velocity(x, sigma, cond)
    finally:
        backend.transformer = policy
    torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-5)


OVERRIDE = """\
trainer:
  max_steps: 1
""" + CALLBACKS_WITH_EXPORT + """\
model:
  backend:
    init_args: {{lora: {{rank: 4, alpha: 8}}}}
optimizer:
  class_path: torch.optim.SGD
  init_args: {{lr: 5.0}}
data:
  prompts_per_step: 2
"""


def test_export_callback_and_script_from_a_checkpoint(tmp_path):
    from safetensors.torch import load_file

    base = config_args(tmp_path, "run", OVERRIDE)
    cli = cli_main(["fit", *base])
    (at_end,) = glob.glob(str(tmp_path / "run" / "*" / "lora" / LORA_WEIGHT_NAME))  # the callback's export
    (saved_config,) = glob.glob(str(tmp_path / "run" / "*" / "config.yaml"))  # what LightningCLI kept
    export_main(["--run_config", saved_config, "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"),
                 "--out", str(tmp_path / "from_ckpt")])
    a, b = load_file(at_end), load_file(str(tmp_path / "from_ckpt" / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(k.startswith("unet.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    trained = cli.model.backend.lora_state_dict()
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 0  # it trained
