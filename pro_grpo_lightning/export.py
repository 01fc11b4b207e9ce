"""Hand the trained policy to diffusers: the LoRA in diffusers' format, or merged into a full pipeline.

    export_lora(module_or_backend, "out/lora")              # pipe.load_lora_weights("out/lora")
    export_lora(module_or_backend, "out/merged", merge=True) # Pipeline.from_pretrained("out/merged")

The LoRA file is what the family's stock pipeline writes with ``save_lora_weights``
(``pytorch_lora_weights.safetensors``, keys prefixed ``unet.`` / ``transformer.``, peft layout)
with the adapter's config (rank, alpha, targets) as metadata, so ``load_lora_weights`` rebuilds the
same scale alpha / rank. Merging loads a fresh copy of the base components (the backend's own
loading code: the same folder, hub id or tiny seed), loads that file, fuses it and saves the
pipeline, so the trained model in memory is never modified.

Also: the ``ExportLoRA`` callback (exports at the end of fit; YAML ``trainer.callbacks``) and
``python -m pro_grpo_lightning.export --ckpt last.ckpt --out dir [--merge] [--ema] [--config run.yaml]``
(``--ema``: the EMA weights the checkpoint carries, see ``ema.py``).
Without ``--config`` the export uses the run's own config, which every checkpoint carries (or,
for a checkpoint written before it did, the ``config.yaml`` next to it / in the folder above).
The checkpoint is opened first (``weights_only=True``; refused if truncated, foreign, non-finite
or from another backend / LoRA setting), before any base weights load.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from .backends.base import DiffusionBackend
from .errors import OneLineParser
from .loading import LORA_WEIGHT_NAME


def _family(backend: DiffusionBackend) -> tuple[Any, str]:
    """(stock pipeline class, name of the denoiser component) of a backend."""
    name = getattr(backend, "pipeline_class", "")
    if not name:
        raise TypeError(f"no diffusers pipeline is known for {type(backend).__name__}: "
                        f"export supports the PipelineBackend families")
    import diffusers

    return getattr(diffusers, name), backend.denoiser_component


def fresh_pipeline(backend: DiffusionBackend) -> Any:
    """The stock pipeline on a fresh copy of the backend's frozen base components (no adapter)."""
    pipeline_cls, _ = _family(backend)
    comps = dict(backend.load_components())  # diffusers' component names
    return pipeline_cls(**{**backend.pipeline_defaults, **comps})


def _backend_of(module_or_backend: Any) -> DiffusionBackend:
    backend = getattr(module_or_backend, "backend", module_or_backend)
    if not isinstance(backend, DiffusionBackend):
        raise TypeError(f"expected a ProGRPOModule or a DiffusionBackend, got {type(module_or_backend).__name__}")
    return backend


def save_lora(backend: DiffusionBackend, path: str) -> str:
    """Write the adapter as the family's pipeline would (``save_lora_weights``); returns ``path``."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls, name = _family(backend)
    net = backend.denoiser()
    adapter = next(iter(net.peft_config))  # the policy's one adapter ("default")
    layers = {k: v.detach().float().cpu().contiguous()
              for k, v in get_peft_model_state_dict(net, adapter_name=adapter).items()}
    from .health import check_finite_tensors

    check_finite_tensors(layers, "export")  # never write a NaN LoRA
    metadata = net.peft_config[adapter].to_dict()
    os.makedirs(path, exist_ok=True)
    pipeline_cls.save_lora_weights(path, **{f"{name}_lora_layers": layers,
                                            f"{name}_lora_adapter_metadata": metadata},
                                   weight_name=LORA_WEIGHT_NAME)
    return path


def save_pipeline(backend: DiffusionBackend, path: str) -> str:
    """A complete pipeline folder: fresh base components with the (fully fine-tuned) denoiser's
    current weights in place of the base ones (``Pipeline.from_pretrained(path)``); returns ``path``."""
    from .health import check_finite_tensors

    _, name = _family(backend)
    trained = {k: v.detach() for k, v in backend.denoiser().state_dict().items()}
    check_finite_tensors(trained, "export")  # never write NaN weights
    pipe = fresh_pipeline(backend)
    getattr(pipe, name).load_state_dict(trained)  # strict: the same architecture, every weight
    pipe.save_pretrained(path)
    return path


def export_lora(module_or_backend: Any, path: str, merge: bool = False) -> str:
    """Export the trained LoRA of a ``ProGRPOModule`` (or a backend) to ``path``; returns ``path``.

    merge=False: ``path`` holds ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(path)``
    on the matching stock pipeline (StableDiffusionPipeline / StableDiffusion3Pipeline / FluxPipeline).
    merge=True: ``path`` is a complete diffusers pipeline folder with the LoRA fused into the
    denoiser's weights (``Pipeline.from_pretrained(path)``; no peft needed to use it).
    A fully fine-tuned backend (``finetune: full``) has no adapter: ``path`` is always a complete
    pipeline folder with the trained denoiser (``save_pipeline``).
    """
    backend = _backend_of(module_or_backend)
    backend.configure_model()
    if getattr(backend, "finetune", "lora") == "full":  # no adapter: the trained denoiser is the model
        return save_pipeline(backend, path)
    if not merge:
        return save_lora(backend, path)
    with tempfile.TemporaryDirectory() as tmp:
        save_lora(backend, tmp)
        pipe = fresh_pipeline(backend)
        pipe.load_lora_weights(tmp, weight_name=LORA_WEIGHT_NAME)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
    pipe.save_pretrained(path)
    return path


class ExportLoRA(pl.Callback):
    """Exports the policy's LoRA at the end of fit (rank 0); a fully fine-tuned policy is written as
    a complete pipeline folder (default ``<log_dir>/pipeline``). With an ``EMA`` callback whose
    ``export`` is on (``ema.py``), the EMA weights are exported instead of the raw ones.

    Args:
        dirpath: where to write; default ``<log_dir>/lora`` (``<log_dir>/merged`` when merging).
        merge: also write a full pipeline folder with the LoRA fused (``<dirpath>/../merged`` by default).
    """

    def __init__(self, dirpath: str | None = None, merge: bool = False) -> None:
        self.dirpath, self.merge = dirpath, merge

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: before the rank test
        from .ema import ema_weights

        with full_parameters(trainer):  # a collective under FSDP: every rank enters it
            if not trainer.is_global_zero:
                return
            with ema_weights(pl_module, "export"):
                self._export(pl_module, root)

    def _export(self, pl_module: pl.LightningModule, root: str) -> None:
        if getattr(_backend_of(pl_module), "finetune", "lora") == "full":
            out = self.dirpath or os.path.join(root, "pipeline")
            export_lora(pl_module, out)
            rank_zero_info(f"[ExportLoRA] fully fine-tuned pipeline: {out}")
            return
        lora_dir = self.dirpath or os.path.join(root, "lora")
        export_lora(pl_module, lora_dir)
        rank_zero_info(f"[ExportLoRA] LoRA in diffusers format: {lora_dir}")
        if self.merge:
            merged = os.path.join(os.path.dirname(os.path.abspath(lora_dir)), "merged")
            export_lora(pl_module, merged, merge=True)
            rank_zero_info(f"[ExportLoRA] merged pipeline: {merged}")


def full_parameters(trainer: pl.Trainer) -> contextlib.AbstractContextManager:
    """Whole (unsharded) parameters inside the block: ``summon_full_params`` under FSDP, else nothing.

    Untested here (Lightning runs FSDP on CUDA only); read-only (``writeback=False``).
    """
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
    return contextlib.nullcontext()


def load_checkpoint_into(module: Any, ckpt: str, state: dict[str, Any] | None = None) -> None:
    """Put a training checkpoint's adapter weights into a freshly built module.

    Opens ``ckpt`` safely (``weights_only=True``, one-line errors) unless its ``state`` is given;
    refuses non-finite weights and a checkpoint whose saved backend / LoRA setting differs from
    the module's, both before the base weights load. Then refuses a checkpoint of another model
    both ways: one that lacks an adapter weight of this module (``on_load_checkpoint``), and one
    with weights this module does not have (other LoRA targets or another backend).
    Reward-normalisation statistics (``rewards.*``) this module has no reward for are ignored:
    they do not change the policy.
    """
    from .checkpointing import check_checkpoint_finite, load_checkpoint_file

    if state is None:
        state = load_checkpoint_file(ckpt)
    check_checkpoint_finite(state, f"ckpt={ckpt!r}")
    if hasattr(module, "check_identity"):
        module.check_identity((state.get("pro_grpo") or {}).get("identity") or {}, f"ckpt={ckpt!r}", resume=False)
    module.configure_model()
    module.on_load_checkpoint(state)  # checks that every adapter weight is there
    result = module.load_state_dict(state["state_dict"], strict=False)
    foreign = [k for k in result.unexpected_keys if not k.startswith("rewards.")]
    if foreign:
        raise KeyError(f"{ckpt} has {len(foreign)} weights this model lacks (e.g. {foreign[0]}): was it "
                       f"trained with another backend or LoRA setting?")


#: ``Trainer.fit`` arguments that LightningCLI writes into a run's config.yaml (e.g. ckpt_path).
_FIT_ARGUMENTS = set(inspect.signature(pl.Trainer.fit).parameters) - {"self", "model"}


def main(argv: list[str] | None = None) -> str:
    parser = OneLineParser(
        prog="pro-grpo export",
        description="Export a Pro-GRPO checkpoint's LoRA in diffusers format (or merged into a pipeline).")
    parser.add_argument("--config", action="append",
                        help="the run's YAML (repeatable, as for fit); default: the config the checkpoint carries")
    parser.add_argument("--ckpt", required=True, help="a checkpoint of that run (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge", action="store_true", help="write a full pipeline with the LoRA fused")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA weights the checkpoint carries (the run's EMA callback), not the raw ones")
    args = parser.parse_args(argv)

    import yaml

    from .checkpointing import check_checkpoint_finite, load_checkpoint_file
    from .cli import main as cli_main

    state = load_checkpoint_file(args.ckpt)  # before anything is built: a typo costs nothing
    check_checkpoint_finite(state, f"ckpt={args.ckpt!r}")
    with tempfile.TemporaryDirectory() as tmp:
        configs = args.config or [_run_config(args.ckpt, state, tmp)]
        cli_args = []
        for i, path in enumerate(configs):
            with open(path, encoding="utf-8") as f:
                cfg = yaml.safe_load(f) or {}
            fit_only = set(cfg) & _FIT_ARGUMENTS  # a run's saved config.yaml has fit's own arguments
            if fit_only:
                for key in fit_only:
                    cfg.pop(key)
                path = os.path.join(tmp, f"config_{i}.yaml")
                with open(path, "w", encoding="utf-8") as f:
                    yaml.safe_dump(cfg, f)
            cli_args += ["--config", path]
        cli = cli_main(cli_args, run=False, save_config=False)
    load_checkpoint_into(cli.model, args.ckpt, state)
    if args.ema:
        from .ema import load_ema_into

        load_ema_into(cli.model, state)
    out = export_lora(cli.model, args.out, merge=args.merge)
    full = getattr(cli.model.backend, "finetune", "lora") == "full"
    print(f"exported {'pipeline' if args.merge or full else 'LoRA'}{' (EMA weights)' if args.ema else ''} to {out}")
    return out


def _run_config(ckpt: str, state: dict[str, Any], tmp: str) -> str:
    """The config of the run that wrote ``ckpt``: the one it carries, else a config.yaml beside it."""
    from .errors import ConfigError

    text = (state.get("pro_grpo") or {}).get("config")
    if text:
        path = os.path.join(tmp, "run_config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    here = os.path.dirname(os.path.abspath(ckpt))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "config.yaml")):
            return os.path.join(folder, "config.yaml")
    raise ConfigError(f"ckpt={ckpt!r} carries no config and none is beside it: pass --config")


if __name__ == "__main__":
    import sys

    from .cli import run_main

    sys.exit(run_main(main))
