"""From a trained policy to pictures: ``trainer.predict`` with fixed seeds, PNGs, contact sheets, scores.

    python -m pro_grpo_lightning predict --config configs/quickstart.yaml --ckpt_path <ckpt>
    python -m pro_grpo_lightning predict --config configs/quickstart.yaml              # the base model
    python -m pro_grpo_lightning predict --config configs/quickstart.yaml --prediction.lora_path <lora dir>

    items    ``PromptDataModule.predict_dataloader``: every (prompt, image) pair of
             ``data.predict_prompts`` (default: the held-out ``val_prompts``), image j of prompt i
             seeded ``mix_seed(eval_seed, i, j)``: the evaluation's items (``evaluation.py``), so
             predict's images are the held-out evaluation's images for the same weights;
    sample   ``ProGRPOModule.predict_step``: ``sample_items`` + the raw reward scores of each image;
    write    ``PredictionWriter`` (a ``BasePredictionWriter``): each rank writes its own items'
             PNGs ``<out>/<prompt:03d>_<slug>/<image:02d>.png``; after a gather rank 0 writes one
             contact sheet per prompt ``<out>/<prompt:03d>_<slug>.png`` (its images in a row), all
             prompts in ``<out>/contact_sheet.png`` (one row each), and the scores as
             ``<out>/scores.csv`` (one row per image) and ``<out>/scores.md`` (mean per prompt).

Weights: ``--ckpt_path`` (a training checkpoint, opened ``weights_only=True``), or
``lora_path`` (a folder ``export`` wrote, ``pytorch_lora_weights.safetensors``, loaded through
diffusers' and peft's own loading and refused if its keys, rank or alpha differ from the run's
adapter), or neither: the adapter at its initialisation, i.e. the base model (before/after).
Under DDP every rank must see one output folder (one node, or a shared file system).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor

from .errors import ConfigError
from .evaluation import gather_items, write_score_table
from .loading import LORA_WEIGHT_NAME



def slug(prompt: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt: lower-case words joined by ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_len] or "prompt"


def to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> an RGB PIL image (8 bits, rounded)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [3, H, W]
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def load_lora(backend: Any, folder: str) -> None:
    """Load an exported LoRA folder (``export.save_lora``'s format) into the backend's adapter.

    The file is read by the family's pipeline (``lora_state_dict``, diffusers) and put into the
    adapter by peft (``set_peft_model_state_dict``). Refused with one line when its rank or alpha
    differ from this run's ``lora`` settings, or when its keys are not exactly the adapter's.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    path = os.path.join(folder, LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"lora_path={folder!r}: no {LORA_WEIGHT_NAME} there (a folder written by export)")
    import diffusers

    backend.configure_model()
    if not getattr(backend, "pipeline_class", ""):
        raise ConfigError(f"lora_path: no diffusers pipeline is known for {type(backend).__name__}")
    pipeline_cls, name = getattr(diffusers, backend.pipeline_class), backend.denoiser_component
    out = pipeline_cls.lora_state_dict(folder, weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True)
    state, meta = out[0], (out[-1] or {})
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for field, mine in (("r", backend.lora.rank), ("lora_alpha", backend.lora.alpha)):
        saved = meta.get(prefix + field)
        if saved is not None and float(saved) != float(mine):
            setting = "rank" if field == "r" else "alpha"
            raise ConfigError(f"lora_path={folder!r}: has lora.{setting}={saved} but this run has "
                              f"lora.{setting}={mine}")
    net = backend.denoiser()
    adapter = next(iter(net.peft_config))
    expected = set(get_peft_model_state_dict(net, adapter_name=adapter))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        example = f"{len(extra)} weights this model lacks (e.g. {extra[0]})" if extra else \
            f"no weight for {len(missing)} adapter weights (e.g. {missing[0]})"
        raise ConfigError(f"lora_path={folder!r}: has {example}: exported from another backend or LoRA setting?")
    try:
        set_peft_model_state_dict(net, state, adapter_name=adapter)
    except RuntimeError as err:  # size mismatches
        raise ConfigError(f"lora_path={folder!r}: {' '.join(str(err).split())[:300]}") from None


class PredictionWriter(BasePredictionWriter):
    """Writes ``trainer.predict``'s images (PNGs, contact sheets) and score table (see module doc).

    The CLI adds one to every run (``--prediction.output_dir``, ``--prediction.lora_path``); in
    Python pass it to the ``Trainer``'s callbacks.

    Args:
        output_dir: where to write; default ``<log_dir>/predict`` (``<default_root_dir>/predict``
            without a logger).
        lora_path: start from this exported LoRA folder instead of a checkpoint (None: the
            ``ckpt_path`` given to predict, or the base model when there is none).
    """

    def __init__(self, output_dir: str | None = None, lora_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        if lora_path is not None and not os.path.isfile(os.path.join(lora_path, LORA_WEIGHT_NAME)):
            raise ConfigError(f"prediction.lora_path={lora_path!r}: no {LORA_WEIGHT_NAME} there "
                              f"(a folder written by export / ExportLoRA)")
        self.output_dir, self.lora_path = output_dir, lora_path
        self.out_dir: str | None = None  # the folder of the current predict run
        self._rows: list[Tensor] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores ``ckpt_path`` before this hook: a LoRA folder and a checkpoint would
        # silently override one another.
        if self.lora_path is not None:
            if trainer.ckpt_path:
                raise ConfigError(f"prediction.lora_path={self.lora_path!r} and ckpt_path={trainer.ckpt_path!r} "
                                  f"both give the weights: pass one")
            load_lora(pl_module.backend, self.lora_path)
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank
        self.out_dir = self.output_dir or os.path.join(root, "predict")
        os.makedirs(self.out_dir, exist_ok=True)
        self._rows = []

    def _folder(self, prompts: Sequence[str], i: int) -> str:
        return os.path.join(self.out_dir, f"{i:03d}_{slug(prompts[i])}")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: dict[str, Tensor],
                           batch_indices: Sequence[int] | None, batch: dict[str, Any], batch_idx: int,
                           dataloader_idx: int) -> None:
        prompts = trainer.predict_dataloaders.dataset.prompts
        for image, i, j in zip(prediction["images"], batch["prompt_index"].tolist(), batch["image_index"].tolist()):
            folder = self._folder(prompts, i)
            os.makedirs(folder, exist_ok=True)
            to_pil(image).save(os.path.join(folder, f"{j:02d}.png"))
        self._rows.append(prediction["rows"])

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = pl_module.eval_names
        rows = gather_items(self._rows, len(names), pl_module.device)  # [N, 2 + S], every rank
        self._rows = []
        trainer.strategy.barrier()  # every rank's PNGs are on disk
        if not trainer.is_global_zero or rows.shape[0] == 0:
            return
        dataset = trainer.predict_dataloaders.dataset
        self.write_sheets(dataset.prompts, dataset.images_per_prompt)
        step = pl_module.trained_steps() if hasattr(pl_module, "trained_steps") else trainer.global_step
        source = (f"LoRA {self.lora_path}" if self.lora_path else
                  f"checkpoint {trainer.ckpt_path} (step {step})" if trainer.ckpt_path else "the module's current weights")
        write_score_table(os.path.join(self.out_dir, "scores"), f"predict from {source}", rows, names,
                          dataset.prompts, dataset.metadata)

    def write_sheets(self, prompts: Sequence[str], images_per_prompt: int) -> list[str]:
        """One contact sheet per prompt (its images side by side) and one of all prompts (a row each)."""
        sheets, paths = [], []
        for i in range(len(prompts)):
            folder = self._folder(prompts, i)
            row = np.concatenate([np.asarray(Image.open(os.path.join(folder, f"{j:02d}.png")).convert("RGB"))
                                  for j in range(images_per_prompt)], axis=1)  # [H, n*W, 3]
            paths.append(folder + ".png")
            Image.fromarray(row).save(paths[-1])
            sheets.append(row)
        Image.fromarray(np.concatenate(sheets, axis=0)).save(os.path.join(self.out_dir, "contact_sheet.png"))
        return paths
