"""What the benchmarks run on: the library's tiny models, or real-size architectures with random weights.

Sizes (``--size``):
    tiny  the library's own ``TinySD15Backend`` / ``TinySD3Backend`` / ``TinyFluxBackend`` (about
          0.1-1 M parameters, built in code): what CPU runs and the tests measure.
    full  the real diffusers classes built from the real models' configuration numbers (written
          below, no hub, no files), random weights, made directly on the target device in the
          benchmark dtype (bf16 on a GPU):
            SD1.5:    UNet2DConditionModel, 0.86 B   (runwayml/stable-diffusion-v1-5 unet/config.json)
            SD3.5-M:  SD3Transformer2DModel, 2.24 B  (stabilityai/stable-diffusion-3.5-medium)
            FLUX.1-dev: FluxTransformer2DModel, 11.9 B (black-forest-labs/FLUX.1-dev)
          and each family's full-size VAE (AutoencoderKL, 4 or 16 latent channels: the preview and
          final decodes are real-size work). The text encoders are NOT real-size: one layer of the
          real width (CLIP-L 768, CLIP-G 1280, T5 4096), since prompts are encoded once per rollout
          and never timed; the token sequence the denoiser attends to has the real length (CLIP 77,
          SD3 T5 256, FLUX T5 512; SD3's T5 tokens are zeros, the backend's ``drop_t5`` path).
          The reward is PickScore's architecture (CLIP ViT-H/14, ~1 B) with random weights, scored by
          the library's own ``PickScore`` code.
    mini  the same builder classes as ``full`` with toy numbers: lets a CPU exercise the exact code
          the GPU run uses (``benchmarks/gpu/run_all.sh --smoke``).

Random weights change no timing: every kernel does the same work whatever the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pro_grpo_lightning.architectures import (CLIP_H_REWARD, FLUX_DEV_TRANSFORMER, FLUX_SCHEDULER, FLUX_VAE,
                                              SD3_VAE, SD15_SCHEDULER, SD15_UNET, SD15_VAE, SD35M_TRANSFORMER)
from pro_grpo_lightning.backends import (FluxBackend, LoraSettings, SD3Backend, SD15Backend, TinyFluxBackend,
                                         TinySD3Backend, TinySD15Backend)
from pro_grpo_lightning.backends.base import DiffusionBackend
from pro_grpo_lightning.loading import source_checks_skipped
from pro_grpo_lightning.networks import NetworkSource
from pro_grpo_lightning.offline_tokenizers import byte_level_clip_tokenizer, char_level_t5_tokenizer
from pro_grpo_lightning.rewards import Brightness, JpegCompressibility, PickScore, Reward, RewardSet

FAMILIES = ("sd15", "sd3", "flux")
SIZES = ("tiny", "mini", "full")

# ---- real configuration numbers: the package's table (pro_grpo_lightning/architectures.py) --------
#: SD1.5 UNet 859.5 M, SD1.x VAE 83.7 M (factor 8, 4 latent channels), SD3.5-Medium MMDiT-X 2.24 B,
#: SD3 / SD3.5 VAE (16 channels, no quant convs, shift and scale), FLUX.1-dev transformer 11.9 B,
#: FLUX's VAE and scheduler; PickScore_v1 = CLIP ViT-H/14 (986 M parameters).
PICKSCORE_CLIP = CLIP_H_REWARD

#: The public tiny preview decoder (diffusers ``AutoencoderTiny``, the TAESD family) of each family:
#: its hub id in the package's table (``pro_grpo_lightning/architectures.py: PREVIEW_DECODERS``).
TINY_DECODERS = {"sd15": "madebyollin/taesd", "sd3": "madebyollin/taesd3", "flux": "madebyollin/taef1"}


def tiny_decoder_config(family: str) -> dict[str, Any]:
    """``AutoencoderTiny`` keyword arguments of ``family``'s public tiny decoder (architecture only)."""
    from pro_grpo_lightning.architectures import PREVIEW_DECODERS

    if family not in TINY_DECODERS:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return dict(PREVIEW_DECODERS[TINY_DECODERS[family]])


#: Parameter counts the real models have (checked by tests on the meta device).
REAL_PARAMS = {"sd15": 859.52e6, "sd3": 2.243e9, "flux": 11.90e9}

# ---- toy numbers for "mini" (same builders) -----------------------------------------------------
MINI_SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
MINI_VAE = dict(
    in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
MINI_SD3_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=48,
    pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
MINI_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6))
MINI_CLIP = dict(
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="gelu"),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=32)


def arch(family: str, size: str) -> dict[str, Any]:
    """The component numbers of ``family`` at ``size`` ("full" or "mini")."""
    full = size == "full"
    if family == "sd15":
        return dict(unet=SD15_UNET if full else MINI_SD15_UNET,
                    vae=SD15_VAE if full else dict(MINI_VAE, latent_channels=4, scaling_factor=0.18215),
                    clip_width=768 if full else 32)
    if family == "sd3" and size == "block":  # SD3.5-M's first and last MMDiT-X blocks at real width (compile_cost)
        return dict(transformer=dict(SD35M_TRANSFORMER, num_layers=2, dual_attention_layers=(0,)),
                    vae=arch("sd3", "mini")["vae"], clip_widths=(768, 1280), max_sequence_length=77)
    if family == "sd3":
        return dict(transformer=SD35M_TRANSFORMER if full else MINI_SD3_TRANSFORMER,
                    vae=SD3_VAE if full else dict(MINI_VAE, latent_channels=16, scaling_factor=1.5305,
                                                  shift_factor=0.0609, use_quant_conv=False,
                                                  use_post_quant_conv=False),
                    clip_widths=(768, 1280) if full else (16, 32), max_sequence_length=256 if full else 16)
    if family == "flux":
        return dict(transformer=FLUX_DEV_TRANSFORMER if full else MINI_FLUX_TRANSFORMER,
                    vae=FLUX_VAE if full else dict(MINI_VAE, latent_channels=16, scaling_factor=0.3611,
                                                   shift_factor=0.1159, use_quant_conv=False,
                                                   use_post_quant_conv=False),
                    clip_width=768 if full else 32, t5_width=4096 if full else 64,
                    max_sequence_length=512 if full else 16)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _clip_text(width: int, tokenizer: Any, with_projection: bool) -> torch.nn.Module:
    """One CLIP text layer of the real width (the text encoders are not timed)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         projection_dim=width, num_hidden_layers=1, num_attention_heads=max(1, width // 64),
                         max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


class _RandomInit:
    """Mixin: components from ``arch(family, size)`` built in code, random weights on ``build_device``
    (the backend's ``NetworkSource``: ``use_networks(NetworkSource("empty"))`` builds them on meta)."""

    family = ""
    built_in_code = True

    def _setup_random(self, size: str, build_device: str, seed: int) -> None:
        if size not in ("full", "mini", "block"):
            raise ValueError(f"random-weight backends take size 'full', 'mini' or 'block' (sd3), got {size!r}")
        self.size = size
        self.seed = seed
        self.use_networks(NetworkSource("random", build_device, seed))

    def _components(self) -> dict[str, Any]:
        raise NotImplementedError


class RandomSD15Backend(_RandomInit, SD15Backend):
    """``SD15Backend`` on the SD1.5 UNet + VAE architecture with random weights (see module doc)."""

    family = "sd15"

    def __init__(self, size: str = "full", build_device: str = "cpu", seed: int = 0, **kwargs: Any) -> None:
        super().__init__("<random-sd15>", **kwargs)
        self._setup_random(size, build_device, seed)

    def load_components(self) -> dict[str, Any]:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        a = arch("sd15", self.size)
        tokenizer = byte_level_clip_tokenizer()
        unet = UNet2DConditionModel(**a["unet"]).eval()  # where the NetworkSource builds (build_components)
        vae = AutoencoderKL(**a["vae"]).eval()
        text_encoder = _clip_text(a["clip_width"], tokenizer, with_projection=False)
        return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                    scheduler=DDIMScheduler(**SD15_SCHEDULER))


class RandomSD3Backend(_RandomInit, SD3Backend):
    """``SD3Backend`` on the SD3.5-Medium MMDiT + SD3 VAE with random weights, T5 dropped (zeros)."""

    family = "sd3"

    def __init__(self, size: str = "full", build_device: str = "cpu", seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("max_sequence_length", arch("sd3", size)["max_sequence_length"])
        super().__init__("<random-sd3.5m>", drop_t5=True, **kwargs)
        self._setup_random(size, build_device, seed)

    def load_components(self) -> dict[str, object]:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        a = arch("sd3", self.size)
        tok = byte_level_clip_tokenizer()
        transformer = SD3Transformer2DModel(**a["transformer"])  # where the NetworkSource builds
        vae = AutoencoderKL(**a["vae"]).eval()
        clip_l = _clip_text(a["clip_widths"][0], tok, with_projection=True)
        clip_g = _clip_text(a["clip_widths"][1], tok, with_projection=True)
        return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
                "text_encoder": clip_l, "tokenizer": tok, "text_encoder_2": clip_g,
                "tokenizer_2": byte_level_clip_tokenizer()}


class RandomFluxBackend(_RandomInit, FluxBackend):
    """``FluxBackend`` on the FLUX.1-dev transformer + FLUX VAE with random weights, 1-layer text encoders."""

    family = "flux"

    def __init__(self, size: str = "full", build_device: str = "cpu", seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("max_sequence_length", arch("flux", size)["max_sequence_length"])
        super().__init__("<random-flux-dev>", **kwargs)
        self._setup_random(size, build_device, seed)

    def load_components(self) -> dict[str, object]:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        a = arch("flux", self.size)
        tok = byte_level_clip_tokenizer()
        t5_tok = char_level_t5_tokenizer(model_max_length=self.max_sequence_length)
        width = a["t5_width"]
        transformer = FluxTransformer2DModel(**a["transformer"])  # where the NetworkSource builds
        vae = AutoencoderKL(**a["vae"]).eval()
        clip = _clip_text(a["clip_width"], tok, with_projection=False)
        t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=width, d_kv=64, d_ff=256, num_layers=1,
                                     num_heads=max(1, width // 64), relative_attention_num_buckets=8,
                                     dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)).eval()
        return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                "text_encoder": clip, "tokenizer": tok, "text_encoder_2": t5, "tokenizer_2": t5_tok}


def build_backend(family: str, size: str, *, num_steps: int, resolution: int, device: str,
                  dtype: str = "float32", seed: int = 0, lora_rank: int = 8,
                  decode_chunk: int | None = None, **options: Any) -> DiffusionBackend:
    """A configured backend on ``device`` (see the module docstring for what each size is);
    ``options``: further backend settings (e.g. ``compile``, ``guidance_scale``)."""
    lora = LoraSettings(rank=lora_rank, alpha=2.0 * lora_rank)
    common = dict(num_steps=num_steps, resolution=resolution, lora=lora, dtype=dtype,
                  decode_chunk=decode_chunk, **options)
    if size == "tiny":
        cls = {"sd15": TinySD15Backend, "sd3": TinySD3Backend, "flux": TinyFluxBackend}[family]
        backend = cls(seed=seed, **common)
        backend.configure_model()
        return backend.to(device)
    cls = {"sd15": RandomSD15Backend, "sd3": RandomSD3Backend, "flux": RandomFluxBackend}[family]
    backend = cls(size=size, build_device=device, seed=seed, **common)
    backend.configure_model()
    return backend.to(device)


def count_params_on_meta(family: str, size: str = "full") -> int:
    """Parameters of the denoiser of ``arch(family, size)``, built on the meta device (no memory)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    a = arch(family, size)
    cls, cfg = {"sd15": (UNet2DConditionModel, a.get("unet")), "sd3": (SD3Transformer2DModel, a.get("transformer")),
                "flux": (FluxTransformer2DModel, a.get("transformer"))}[family]
    with torch.device("meta"):
        net = cls(**cfg)
    return sum(p.numel() for p in net.parameters())


# ---- rewards -----------------------------------------------------------------------------------------
class RandomPickScore(PickScore):
    """The library's ``PickScore`` scoring code on a random-weight CLIP of PickScore's size ("full")
    or a toy one ("tiny"/"mini"). Non-finite scores (possible with random weights) become 0 so a
    timing run never stops in the selection's NaN check."""

    def __init__(self, size: str = "full", dtype: str = "float32", seed: int = 0, device: str = "cpu") -> None:
        with source_checks_skipped():  # nothing to find: its architecture is built in code
            super().__init__(pretrained="<random-pickscore>", processor_pretrained=None, dtype=dtype)
        self.size, self.seed = size, seed
        self.use_networks(NetworkSource("random", device, seed))

    def architecture(self) -> torch.nn.Module:
        from transformers import CLIPConfig, CLIPModel

        spec = PICKSCORE_CLIP if self.size == "full" else MINI_CLIP
        tok = byte_level_clip_tokenizer()
        ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        cfg = CLIPConfig(text_config=dict(spec["text"], projection_dim=spec["projection_dim"], **ids),
                         vision_config=dict(spec["vision"], projection_dim=spec["projection_dim"]),
                         projection_dim=spec["projection_dim"])
        return CLIPModel(cfg)  # where and how the NetworkSource builds, with its stand-in tokenizer

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.nan_to_num(super().score(images, prompts), nan=0.0, posinf=0.0, neginf=0.0)


REWARDS = ("pickscore", "jpeg", "brightness")


def build_rewards(name: str, size: str, device: str, dtype: str = "float32", seed: int = 0) -> RewardSet:
    """A configured ``RewardSet`` with one reward on ``device``."""
    if name == "pickscore":
        reward: Reward = RandomPickScore(size=size, dtype=dtype, seed=seed, device=device)
    elif name == "jpeg":
        reward = JpegCompressibility()
    elif name == "brightness":
        reward = Brightness()
    else:
        raise ValueError(f"unknown reward {name!r}; choose one of {REWARDS}")
    rewards = RewardSet([reward]).to(device)
    rewards.configure_model()
    return rewards
