"""Z-Image (a single-stream DiT on 2x2 latent patches, rectified flow) with the flow SDE steps.

What diffusers' ``ZImagePipeline`` (0.42.1) does, reproduced here so that with the SDE off our
rollout is the pipeline's output (``tests/test_families.py``):
    text       each prompt as one user message through the tokenizer's chat template
               (``add_generation_prompt``, ``enable_thinking``), padded to ``max_sequence_length``,
               through the Qwen3 text encoder; the second-to-last hidden state of the real tokens.
               Stored as ``prompt_embeds`` [B, L, 2560] + ``prompt_embeds_mask`` [B, L] (L: the
               batch's longest prompt); the transformer takes the real tokens of each row as a list.
    CFG        with ``guidance_scale > 0``: ``pos + s (pos - neg)`` (the pipeline's rule: s = 0 is no
               CFG, not s = 1), optionally ``cfg_normalization`` (the guided output's norm per sample
               capped at that multiple of the conditional one's). The negative prompt defaults to "".
               The pipeline's ``cfg_truncation`` (CFG off late in the trajectory) is not supported.
    timesteps  ``sigmas = torch.linspace(1, 1/T, T)`` (``get_default_z_image_sigmas``) with the
               scheduler config's shift (Turbo: static shift 3); the transformer takes ``1 - sigma`` and
               predicts ``-velocity``.
    latents    [B, 16, h, w] (FLUX.1's VAE: ``z / scaling_factor + shift_factor`` before decoding); the
               transformer patchifies them itself (each row as [16, 1, h, w]).

``TinyZImageBackend`` is the same architecture at toy size, built in code (``build_tiny_zimage_components``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Conditioning, LoraSettings
from .flow_base import FlowMatchingBackend, VariableTextMixin, shifted_sigma_table

TINY_ZIMAGE_SOURCE = "<tiny-zimage>"

#: Attention and SwiGLU projections of every DiT block (the refiners' too): the list public Z-Image
#: LoRA trainers use.
ZIMAGE_LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                       "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")

class ZImageBackend(VariableTextMixin, FlowMatchingBackend):
    """Z-Image (Turbo) from a diffusers folder or hub id ("Tongyi-MAI/Z-Image-Turbo"); see the module docstring.
    Its arguments are ``SD3Backend``'s (without ``drop_t5``: it has no T5), except:

    Args:
        num_steps: default 8 (Turbo's).
        guidance_scale: the pipeline's: > 0 runs CFG as ``pos + s (pos - neg)``; 0 (Turbo's) none.
        cfg_normalization: > 0 caps each guided sample's norm at this multiple of the conditional
            output's (the pipeline's ``cfg_normalization``); 0: off.
        max_sequence_length: text tokens per prompt (chat template included; the pipeline's 512).
        preview_decoder: an ``AutoencoderTiny`` for FLUX.1's VAE (``madebyollin/taef1``), see
            ``PipelineBackend``.
    """

    pipeline_class = "ZImagePipeline"
    default_lora_targets = ZIMAGE_LORA_TARGETS

    def __init__(self, pretrained: str, num_steps: int = 8, guidance_scale: float = 0.0,
                 resolution: int = 512, lora: LoraSettings | None = None, dtype: str = "float32",
                 negative_prompt: str = "", noise_level: float = 0.7, sde_kind: str = "flow_grpo",
                 max_sequence_length: int = 512, cfg_normalization: float = 0.0,
                 gradient_checkpointing: bool = False, offload_text_encoders: bool = False,
                 decode_chunk: int | None = None, revision: str | None = None,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        if cfg_normalization < 0:
            raise ValueError(f"cfg_normalization must be >= 0 (0: off), got {cfg_normalization}")
        super().__init__(
            pretrained=pretrained, revision=revision, num_steps=num_steps, guidance_scale=guidance_scale,
            resolution=resolution, lora=lora, dtype=dtype, negative_prompt=negative_prompt,
            noise_level=noise_level, sde_kind=sde_kind, max_sequence_length=max_sequence_length,
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
            decode_chunk=decode_chunk, sde_window=sde_window, finetune=finetune,
            preview_decoder=preview_decoder, compile=compile, compile_backend=compile_backend)
        self.cfg_normalization = float(cfg_normalization)

    # ---- the one place the networks come from -------------------------------------------------
    def load_components(self) -> dict[str, object]:
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        comps = self.load_flow_components(ZImageTransformer2DModel, AutoencoderKL, {"text_encoder": Qwen3Model})
        comps["tokenizer"] = self._load_tokenizer(AutoTokenizer, "tokenizer", comps["text_encoder"].config.vocab_size)
        return comps

    def _sigma_table(self, scheduler) -> Tensor:
        side = self.resolution // self.vae_scale_factor
        sigmas = torch.linspace(1.0, 1 / self.num_steps, self.num_steps).tolist()  # get_default_z_image_sigmas
        return shifted_sigma_table(scheduler, self.num_steps, (side // 2) ** 2, sigmas=sigmas)

    # ---- text ---------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        tok = self._tokenizers["tokenizer"]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True) for p in prompts]
        ids = tok(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                  return_tensors="pt").to(device)
        mask = ids.attention_mask.bool()  # [B, L0]
        hidden = self.text_encoder(input_ids=ids.input_ids, attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-2]  # [B, L0, D]
        # each row's real tokens first (stable sort: padding on either side), then cut to the longest
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # [B, L0]
        keep = max(self.row_lengths(mask))
        order = order[:, :keep]  # [B, L]
        embeds = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, L, D]
        mask = mask.gather(1, order)  # [B, L]
        embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)  # padding zeroed
        return {"prompt_embeds": embeds.to(self.weight_dtype), "prompt_embeds_mask": mask.long()}

    def row_lengths(self, mask: Tensor) -> list[int]:
        """Real tokens per row of a text mask [B, L], as host ints (the transformer takes a list of
        rows). Built empty (``NetworkSource("empty")``: the memory plan's shapes without values),
        every row counts as its padded length: an upper bound."""
        if self.networks.weights == "empty":
            return [mask.shape[1]] * mask.shape[0]
        return mask.sum(1).tolist()

    # ---- guidance -----------------------------------------------------------------------------
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 0  # ZImagePipeline.do_classifier_free_guidance

    def combine_guidance(self, uncond: Tensor, text: Tensor) -> Tensor:
        """``pos + s (pos - neg)`` on the velocities [B, C, h, w], each sample's norm capped at
        ``cfg_normalization`` times the conditional one's when that is > 0."""
        guided = text + self.guidance_scale * (text - uncond)  # [B, C, h, w]
        if self.cfg_normalization > 0:
            cap = text.flatten(1).norm(dim=1) * self.cfg_normalization  # [B]
            norm = guided.flatten(1).norm(dim=1)  # [B]
            scale = torch.where(norm > cap, cap / norm, torch.ones_like(norm))  # [B]
            guided = guided * scale.view(-1, 1, 1, 1)
        return guided

    # ---- denoiser ----------------------------------------------------------------------------
    def _velocity(self, latents: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        device, dt = self.device, self.weight_dtype

        def run(x: Tensor, s: Tensor, c: Conditioning) -> Tensor:  # rows: [negative; positive] with CFG
            embeds = c["prompt_embeds"].to(device, dt)  # [b, L, D], each row's real tokens first
            lengths = self.row_lengths(c["prompt_embeds_mask"])
            texts = [e[:n] for e, n in zip(embeds, lengths)]  # b x [L_i, D] views: the model takes a list
            out = self.transformer(list(x.to(device, dt).unsqueeze(2).unbind(0)),  # b x [C, 1, h, w]
                                   1 - s.to(device),  # [b]  the pipeline's (1000 - t) / 1000
                                   texts, return_dict=False)[0]  # b x [C, 1, h, w]
            return -torch.stack(out).squeeze(2).float()  # [b, C, h, w]  the model predicts -velocity

        return self._guided(run, latents, sigma, cond)  # [B, C, h, w]

    def extra_repr(self) -> str:
        norm = f", cfg_normalization={self.cfg_normalization}" if self.cfg_normalization else ""
        return super().extra_repr() + norm


# ---- tiny offline model --------------------------------------------------------------------------
def build_tiny_zimage_components(resolution: int = 64, seed: int = 0) -> dict[str, object]:
    """Random-init Z-Image-architecture components, built in code, seeded.

    Transformer: 2 main + 1 refiner block of each kind, width 32, 2 heads of 16 (rope axes 4 + 6 + 6),
    caption width 32 = the text encoder's; VAE: FLUX.1's layout (16 channels, its scaling and shift
    factors) at 8x down-sampling; text encoder: ``Qwen3Model`` (2 layers, hidden 32); a byte-level
    Qwen2 tokenizer with a Qwen-style chat template; Z-Image-Turbo's scheduler config (shift 3).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from ..architectures import ZIMAGE_SCHEDULER
    from ..offline_tokenizers import QWEN_CHAT_TEMPLATE, byte_level_qwen_tokenizer

    tok = byte_level_qwen_tokenizer(chat_template=QWEN_CHAT_TEMPLATE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
            axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), sample_size=resolution, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        torch.manual_seed(seed + 2)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.pad_token_id, eos_token_id=tok.pad_token_id))
    for net in (transformer, vae, text_encoder):
        net.eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tok,
            "scheduler": FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER)}


def save_tiny_zimage_pipeline(path: str, resolution: int = 64, seed: int = 0) -> str:
    """Write the tiny components as a diffusers folder (``ZImagePipeline.save_pretrained``)."""
    from diffusers import ZImagePipeline

    ZImagePipeline(**build_tiny_zimage_components(resolution, seed)).save_pretrained(path)
    return path


class TinyZImageBackend(ZImageBackend):
    """Z-Image architecture at toy size, random weights built in code (no files); seeded. CFG on by
    default (``guidance_scale`` 2.0), so the tests exercise it (Turbo runs without).

    Args:
        seed: seed of the random weights built in code (the same seed builds the same model).
    """

    built_in_code = True

    def __init__(self, seed: int = 0, num_steps: int = 4, guidance_scale: float = 2.0, resolution: int = 64,
                 lora: LoraSettings | None = None, dtype: str = "float32", negative_prompt: str = "",
                 noise_level: float = 0.7, sde_kind: str = "flow_grpo", max_sequence_length: int = 128,
                 cfg_normalization: float = 0.0, gradient_checkpointing: bool = False,
                 offload_text_encoders: bool = False, decode_chunk: int | None = None,
                 sde_window: list[int] | None = None, finetune: str = "lora",
                 preview_decoder: str | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        super().__init__(
            TINY_ZIMAGE_SOURCE, num_steps=num_steps, guidance_scale=guidance_scale, resolution=resolution,
            lora=lora, dtype=dtype, negative_prompt=negative_prompt, noise_level=noise_level, sde_kind=sde_kind,
            max_sequence_length=max_sequence_length, cfg_normalization=cfg_normalization,
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
            decode_chunk=decode_chunk, sde_window=sde_window, finetune=finetune,
            preview_decoder=preview_decoder, compile=compile, compile_backend=compile_backend)
        self.seed = seed


    def load_components(self) -> dict[str, object]:
        return build_tiny_zimage_components(self.resolution, self.seed)
