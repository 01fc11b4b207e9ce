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
             prompts in ``<out>/contact_sheet.png`` (one row each; tiles upscaled to >= 128 px and
             captioned with the prompt and the image's total score), and the scores as
             ``<out>/scores.csv`` (one row per image) and ``<out>/scores.md`` (mean per prompt),
             then prints ``<out>``.

Where: by default beside the weights loaded, ``<run>/predict/<checkpoint name>`` (no logger
version is created by predict); an occupied ``<out>`` is refused unless ``overwrite``, and an
unwritable one, both before any weights load.

Weights: ``--ckpt_path`` (a training checkpoint, opened ``weights_only=True``), or
``lora_path`` (a folder ``export`` wrote, ``pytorch_lora_weights.safetensors``, loaded through
diffusers' and peft's own loading and refused if its keys, rank or alpha differ from the run's
adapter), or neither: the adapter at its initialisation, i.e. the base model (before/after).
Under DDP every rank must see one output folder (one node, or a shared file system).
"""

from __future__ import annotations

import contextlib
import os
import re
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from diffusers.utils import make_image_grid
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor

from .errors import ConfigError
from .evaluation import gather_items, write_score_table
from .loading import LORA_WEIGHT_NAME
from .outputs import check_digests, check_output_folder, output_error



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
    check_lora_settings(meta, backend, folder)
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


def check_lora_settings(meta: dict[str, Any], backend: Any, folder: str) -> None:
    """Refuse (one line) an exported LoRA whose adapter metadata (``<component>.r``,
    ``<component>.lora_alpha``, as diffusers writes it) differs from the backend's ``lora`` settings."""
    prefix = f"{backend.denoiser_component}."
    for field, mine in (("r", backend.lora.rank), ("lora_alpha", backend.lora.alpha)):
        saved = meta.get(prefix + field)
        if saved is not None and float(saved) != float(mine):
            setting = "rank" if field == "r" else "alpha"
            raise ConfigError(f"lora_path={folder!r}: has lora.{setting}={saved} but this run has "
                              f"lora.{setting}={mine}")


class PredictionWriter(BasePredictionWriter):
    """Writes ``trainer.predict``'s images (PNGs, captioned contact sheets) and score table (see module doc).

    The CLI adds one to every run (``--prediction.output_dir``, ``--prediction.lora_path``,
    ``--prediction.overwrite``); in Python pass it to the ``Trainer``'s callbacks.

    Args:
        output_dir: where to write; default beside what is loaded: ``<run>/predict/<checkpoint
            name>`` for ``<run>/checkpoints/<name>.ckpt`` (``<run>/predict/<folder name>`` for a
            LoRA folder ``<run>/<folder>``), ``<default_root_dir>/predict/base`` for the base model.
        lora_path: start from this exported LoRA folder instead of a checkpoint (None: the
            ``ckpt_path`` given to predict, or the base model when there is none); its
            ``SHA256SUMS`` is checked first.
        overwrite: write into a non-empty output folder (its files of the same names are
            replaced); otherwise that is refused before any weights load.
    """

    def __init__(self, output_dir: str | None = None, lora_path: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        if lora_path is not None:
            if not os.path.isfile(os.path.join(lora_path, LORA_WEIGHT_NAME)):
                raise ConfigError(f"prediction.lora_path={lora_path!r}: no {LORA_WEIGHT_NAME} there "
                                  f"(a folder written by export / ExportLoRA)")
            check_digests(lora_path, "prediction.lora_path")  # a damaged export: before any weights load
            check_safetensors(os.path.join(lora_path, LORA_WEIGHT_NAME), "prediction.lora_path")
        self.output_dir, self.lora_path, self.overwrite = output_dir, lora_path, overwrite
        self.out_dir: str | None = None  # the folder of the current predict run
        self._rows: list[Tensor] = []
        self._count = 0

    def default_output(self, ckpt_path: str | None, root: str) -> str:
        """``<run>/predict/<name>`` beside the weights loaded (class docstring)."""
        if self.lora_path is not None:
            folder = os.path.abspath(self.lora_path)
            return os.path.join(os.path.dirname(folder), "predict", os.path.basename(folder))
        if ckpt_path and os.path.isfile(str(ckpt_path)):
            ckpt = os.path.abspath(str(ckpt_path))
            folder = os.path.dirname(ckpt)
            run = os.path.dirname(folder) if os.path.basename(folder) in ("checkpoints", "ckpt") else folder
            return os.path.join(run, "predict", os.path.splitext(os.path.basename(ckpt))[0])
        return os.path.join(root, "predict", "base")

    def resolve_output(self, trainer: pl.Trainer, ckpt_path: str | None) -> str:
        """Fix this run's output folder and check it (writable; empty unless ``overwrite``) and
        that only one source of weights is given: cheap checks, before any weights load."""
        if self.lora_path is not None and ckpt_path:
            raise ConfigError(f"prediction.lora_path={self.lora_path!r} and ckpt_path={ckpt_path!r} "
                              f"both give the weights: pass one")
        self.out_dir = os.path.abspath(self.output_dir or self.default_output(ckpt_path, trainer.default_root_dir))
        check_output_folder(self.out_dir, self.overwrite, "prediction.output_dir")
        return self.out_dir

    def check_lora(self, backend: Any) -> None:
        """The LoRA folder's rank and alpha against ``backend``'s, from the file's header only:
        before any weights load (``load_lora`` checks every key again when it loads)."""
        import json

        if self.lora_path is None:
            return
        meta = check_safetensors(os.path.join(self.lora_path, LORA_WEIGHT_NAME), "prediction.lora_path")
        try:
            adapter = json.loads(meta.get("lora_adapter_metadata") or "{}")
        except ValueError:
            adapter = {}
        check_lora_settings(adapter if isinstance(adapter, dict) else {}, backend, self.lora_path)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and self.out_dir is None:  # in Python: Trainer.predict(ckpt_path=...) is not known yet
            self.resolve_output(trainer, None)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores ``ckpt_path`` before this hook: a LoRA folder and a checkpoint would
        # silently override one another.
        if self.lora_path is not None:
            if trainer.ckpt_path:
                raise ConfigError(f"prediction.lora_path={self.lora_path!r} and ckpt_path={trainer.ckpt_path!r} "
                                  f"both give the weights: pass one")
            load_lora(pl_module.backend, self.lora_path)
        if self.out_dir is None:
            self.resolve_output(trainer, trainer.ckpt_path)
        with written(self.out_dir):
            os.makedirs(self.out_dir, exist_ok=True)
        self._rows, self._count = [], 0

    def _folder(self, prompts: Sequence[str], i: int) -> str:
        return os.path.join(self.out_dir, f"{i:03d}_{slug(prompts[i])}")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: dict[str, Tensor],
                           batch_indices: Sequence[int] | None, batch: dict[str, Any], batch_idx: int,
                           dataloader_idx: int) -> None:
        prompts = trainer.predict_dataloaders.dataset.prompts
        with written(self.out_dir):
            for image, i, j in zip(prediction["images"], batch["prompt_index"].tolist(), batch["image_index"].tolist()):
                folder = self._folder(prompts, i)
                os.makedirs(folder, exist_ok=True)
                to_pil(image).save(os.path.join(folder, f"{j:02d}.png"))
        self._count += len(prediction["images"])
        self._rows.append(prediction["rows"])

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = pl_module.eval_names
        rows = gather_items(self._rows, len(names), pl_module.device)  # [N, 2 + S], every rank
        self._rows = []
        trainer.strategy.barrier()  # every rank's PNGs are on disk
        if not trainer.is_global_zero or rows.shape[0] == 0:
            return
        dataset = trainer.predict_dataloaders.dataset
        step = pl_module.trained_steps() if hasattr(pl_module, "trained_steps") else trainer.global_step
        source = (f"LoRA {self.lora_path}" if self.lora_path else
                  f"checkpoint {trainer.ckpt_path} (step {step})" if trainer.ckpt_path else "the module's current weights")
        with written(self.out_dir):
            self.write_sheets(dataset.prompts, dataset.images_per_prompt, rows, names)
            write_score_table(os.path.join(self.out_dir, "scores"), f"predict from {source}", rows, names,
                              dataset.prompts, dataset.metadata)
        print(f"predict: {rows.shape[0]} images of {len(dataset.prompts)} prompts from {source}: "
              f"PNGs, contact_sheet.png and scores.csv / scores.md in {self.out_dir}", flush=True)

    def write_sheets(self, prompts: Sequence[str], images_per_prompt: int, rows: Tensor | None = None,
                     names: Sequence[str] = ()) -> list[str]:
        """One contact sheet per prompt (its images side by side) and one of all prompts
        (``contact_sheet.png``, a row each): tiles upscaled (nearest) to at least ``MIN_TILE`` px,
        each captioned with its prompt and its score (``rows`` [N, 2 + S], columns ``names``:
        the ``total`` column, else the first)."""
        score: dict[tuple[int, int], float] = {}
        if rows is not None and len(names):
            col = 2 + (list(names).index("total") if "total" in names else 0)
            score = {(int(r[0]), int(r[1])): float(r[col]) for r in rows.cpu().tolist()}
        label = "total" if "total" in names else (names[0] if len(names) else "")
        every, paths = [], []
        for i in range(len(prompts)):
            folder = self._folder(prompts, i)
            tiles = [caption_tile(Image.open(os.path.join(folder, f"{j:02d}.png")).convert("RGB"), prompts[i],
                                  None if (i, j) not in score else f"{label} {score[(i, j)]:.3f}")
                     for j in range(images_per_prompt)]
            paths.append(folder + ".png")
            make_image_grid(tiles, rows=1, cols=len(tiles)).save(paths[-1])
            every += tiles
        make_image_grid(every, rows=len(prompts), cols=images_per_prompt).save(
            os.path.join(self.out_dir, "contact_sheet.png"))
        return paths


#: the smallest side of a contact sheet's tile, in pixels (small models' 32-px images are upscaled)
MIN_TILE = 128
#: caption lines under a tile: up to 3 of the prompt, then the score
CAPTION_LINES = 4


def caption_tile(image: Image.Image, prompt: str, score: str | None) -> Image.Image:
    """``image`` upscaled (nearest: no invented detail) to at least ``MIN_TILE`` px, with its prompt
    (wrapped, at most 3 lines) and ``score`` written below it in a readable font."""
    from PIL import ImageDraw, ImageFont

    scale = max(1, -(-MIN_TILE // min(image.size)))  # ceil
    tile = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=14)
    width = max(8, tile.width // 8)  # characters a line at this font size (~8 px each)
    lines = textwrap.wrap(prompt, width)[:CAPTION_LINES - 1] + ([score] if score else [])
    pad, line_h = 4, 18
    # a fixed caption height: every tile of a sheet has one size (diffusers' make_image_grid needs it)
    out = Image.new("RGB", (tile.width, tile.height + pad * 2 + line_h * CAPTION_LINES), "white")
    out.paste(tile, (0, 0))
    draw = ImageDraw.Draw(out)
    for n, text in enumerate(lines):
        draw.text((pad, tile.height + pad + n * line_h), text, fill="black", font=font)
    return out


@contextlib.contextmanager
def written(folder: str) -> Iterator[None]:
    """Writing predict's outputs: an ``OSError`` (full disk, read-only or vanished folder) becomes
    one ``OutputError`` line naming ``folder``."""
    try:
        yield
    except OSError as err:
        raise output_error(err, folder, "the images written before it are kept") from err


def check_safetensors(path: str, what: str) -> dict[str, str]:
    """Refuse (one line) a file named ``.safetensors`` that is not one, e.g. a pickle under that
    name: read its header only, before any weights load (nothing is unpickled either way).
    Returns the file's string metadata."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{what}: {path!r} is not a safetensors file ({first[:120]})") from None
