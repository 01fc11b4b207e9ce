"""Hand the trained policy to diffusers: the LoRA in diffusers' format, or merged into a full pipeline.

    export_lora(module_or_backend, "out/lora")              # pipe.load_lora_weights("out/lora")
    export_lora(module_or_backend, "out/merged", merge=True) # Pipeline.from_pretrained("out/merged")

The LoRA file is what the family's stock pipeline writes with ``save_lora_weights``
(``pytorch_lora_weights.safetensors``, keys prefixed ``unet.`` / ``transformer.``, peft layout)
with the adapter's config (rank, alpha, targets) as metadata, so ``load_lora_weights`` rebuilds the
same scale alpha / rank. Merging loads a fresh copy of the base components (the backend's own
loading code: the same folder, hub id or tiny seed), loads that file, fuses it and saves the
pipeline, so the trained model in memory is never modified.

Every export folder also holds ``README.md`` (a model card: base model, config, rollouts trained,
rewards, held-out scores first/last; ``model_card.py``) and ``SHA256SUMS`` (its weights' digests,
which ``predict`` checks). A non-empty output folder is refused unless ``overwrite``; the export is
written beside it and moved into place only when complete (``outputs.py``).

Also: the ``ExportLoRA`` callback (exports at the end of fit; YAML ``trainer.callbacks``) and
``pro-grpo export --ckpt last.ckpt --out dir [--merge] [--ema] [--run_config run.yaml] [--overwrite]
[--trust_config_classes] [--config export.yaml] [--print_config]`` (also ``python -m
pro_grpo_lightning export`` / ``python -m pro_grpo_lightning.export``; ``export_checkpoint``'s
arguments, ``cli.CommandParser``; ``--ema``: the EMA weights the checkpoint carries, see
``ema.py``). Without ``--run_config`` the export uses the run's own config,
which every checkpoint carries (or, for a checkpoint written before it did, the ``config.yaml``
next to it / in the folder above). It builds only the backend: no reward is built, so nothing
connects to a reward server; a checkpoint's stored config may name only this package's backends
unless ``--trust_config_classes``. The checkpoint is opened first (``weights_only=True``; refused if
truncated, foreign, corrupted (digest), non-finite or from another backend / LoRA setting), before
any base weights load.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from .backends.base import DiffusionBackend
from .loading import LORA_WEIGHT_NAME
from .model_card import write_model_card
from .outputs import check_output_folder, staged_folder, write_digests


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


def check_export_weights(weights: dict[str, Any]) -> None:
    """Refuse (``NonFiniteError``) non-finite or implausibly large weights before anything is written."""
    from .health import check_finite_tensors, check_weight_magnitudes

    check_finite_tensors(weights, "export")
    check_weight_magnitudes(weights, "export")


def save_lora(backend: DiffusionBackend, path: str) -> str:
    """Write the adapter as the family's pipeline would (``save_lora_weights``); returns ``path``."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls, name = _family(backend)
    net = backend.denoiser()
    adapter = next(iter(net.peft_config))  # the policy's one adapter ("default")
    layers = {k: v.detach().float().cpu().contiguous()
              for k, v in get_peft_model_state_dict(net, adapter_name=adapter).items()}
    check_export_weights(layers)  # never write a NaN or exploded LoRA
    metadata = net.peft_config[adapter].to_dict()
    os.makedirs(path, exist_ok=True)
    pipeline_cls.save_lora_weights(path, **{f"{name}_lora_layers": layers,
                                            f"{name}_lora_adapter_metadata": metadata},
                                   weight_name=LORA_WEIGHT_NAME)
    return path


def save_pipeline(backend: DiffusionBackend, path: str) -> str:
    """A complete pipeline folder: fresh base components with the (fully fine-tuned) denoiser's
    current weights in place of the base ones (``Pipeline.from_pretrained(path)``); returns ``path``."""
    _, name = _family(backend)
    trained = {k: v.detach() for k, v in backend.denoiser().state_dict().items()}
    check_export_weights(trained)  # never write NaN or exploded weights
    pipe = fresh_pipeline(backend)
    getattr(pipe, name).load_state_dict(trained)  # strict: the same architecture, every weight
    pipe.save_pretrained(path)
    return path


def export_lora(module_or_backend: Any, path: str, merge: bool = False, overwrite: bool = False,
                record: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                weights: str = "raw") -> str:
    """Export the trained LoRA of a ``ProGRPOModule`` (or a backend) to ``path``; returns ``path``.

    merge=False: ``path`` holds ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(path)``
    on the matching stock pipeline (StableDiffusionPipeline / StableDiffusion3Pipeline / FluxPipeline).
    merge=True: ``path`` is a complete diffusers pipeline folder with the LoRA fused into the
    denoiser's weights (``Pipeline.from_pretrained(path)``; no peft needed to use it).
    A fully fine-tuned backend (``finetune: full``) has no adapter: ``path`` is always a complete
    pipeline folder with the trained denoiser (``save_pipeline``).

    Every export also holds ``SHA256SUMS`` (its weights' digests) and ``README.md`` (a model card
    from ``record``, a checkpoint's ``pro_grpo`` record, and ``config``, the run's config; a
    module's own when a module is given). A non-empty ``path`` is refused unless ``overwrite``,
    before any weights load; the export is written beside ``path`` and moved into place only when
    complete (``outputs.staged_folder``), so a failure never leaves a half export or loses the old one.
    """
    backend = _backend_of(module_or_backend)
    check_output_folder(path, overwrite)
    if record is None and hasattr(module_or_backend, "rollouts_done"):  # a module: its own record
        record = {"rollouts_done": module_or_backend.rollouts_done, "schedule": repr(module_or_backend.schedule),
                  "held_out": dict(getattr(module_or_backend, "held_out", {}))}
        run_config = getattr(module_or_backend, "run_config", None)
        config = config if config is not None else (yaml.safe_load(run_config) if run_config else None)
    backend.configure_model()
    full = getattr(backend, "finetune", "lora") == "full"
    with staged_folder(path, overwrite) as tmp:
        if full:  # no adapter: the trained denoiser is the model
            save_pipeline(backend, tmp)
        elif not merge:
            save_lora(backend, tmp)
        else:
            with tempfile.TemporaryDirectory() as lora_dir:
                save_lora(backend, lora_dir)
                pipe = fresh_pipeline(backend)
                pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHT_NAME)
                pipe.fuse_lora()
                pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
            pipe.save_pretrained(tmp)
        write_digests(tmp)
        write_model_card(tmp, backend, record or {}, config, "pipeline" if full or merge else "LoRA", weights)
    return path


class ExportLoRA(pl.Callback):
    """Exports the policy's LoRA at the end of fit (rank 0); a fully fine-tuned policy is written as
    a complete pipeline folder (default ``<log_dir>/pipeline``). With an ``EMA`` callback whose
    ``export`` is on (``ema.py``), the EMA weights are exported instead of the raw ones. Each
    export holds a model card and ``SHA256SUMS`` (``export_lora``).

    Args:
        dirpath: where to write; default ``<log_dir>/lora`` (``<log_dir>/merged`` when merging).
        merge: also write a full pipeline folder with the LoRA fused (``<dirpath>/../merged`` by default).
        overwrite: replace a non-empty ``dirpath``; otherwise that is refused when fit starts,
            before any weights load (not after the training).
    """

    def __init__(self, dirpath: str | None = None, merge: bool = False, overwrite: bool = False) -> None:
        self.dirpath, self.merge, self.overwrite = dirpath, merge, overwrite

    def _targets(self, pl_module: pl.LightningModule, root: str) -> list[tuple[str, bool]]:
        """[(folder, merge)] this callback writes."""
        if getattr(_backend_of(pl_module), "finetune", "lora") == "full":
            return [(self.dirpath or os.path.join(root, "pipeline"), False)]
        lora_dir = self.dirpath or os.path.join(root, "lora")
        merged = os.path.join(os.path.dirname(os.path.abspath(lora_dir)), "merged")
        return [(lora_dir, False), *([(merged, True)] if self.merge else [])]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # an occupied folder is refused now, not after the training
            root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank
            for folder, _ in self._targets(pl_module, root):
                check_output_folder(folder, self.overwrite, "ExportLoRA.dirpath")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: before the rank test
        from .ema import ema_weights, find_ema

        with full_parameters(trainer):  # a collective under FSDP: every rank enters it
            if not trainer.is_global_zero:
                return
            weights = "EMA" if find_ema(pl_module, "export") is not None else "raw"
            full = getattr(_backend_of(pl_module), "finetune", "lora") == "full"
            with ema_weights(pl_module, "export"):
                for folder, merge in self._targets(pl_module, root):
                    export_lora(pl_module, folder, merge=merge, overwrite=self.overwrite, weights=weights)
                    what = "merged pipeline" if merge else "fully fine-tuned pipeline" if full else \
                        "LoRA in diffusers format"
                    rank_zero_info(f"[ExportLoRA] {what}: {folder}")


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
    from .checkpointing import check_checkpoint_weights, load_checkpoint_file

    if state is None:
        state = load_checkpoint_file(ckpt)
    check_checkpoint_weights(state, f"ckpt={ckpt!r}")
    if hasattr(module, "check_identity"):
        module.check_identity((state.get("pro_grpo") or {}).get("identity") or {}, f"ckpt={ckpt!r}", resume=False)
    module.configure_model()
    module.on_load_checkpoint(state)  # checks that every adapter weight is there
    result = module.load_state_dict(state["state_dict"], strict=False)
    foreign = [k for k in result.unexpected_keys if not k.startswith("rewards.")]
    if foreign:
        raise KeyError(f"{ckpt} has {len(foreign)} weights this model lacks (e.g. {foreign[0]}): was it "
                       f"trained with another backend or LoRA setting?")


#: where the backends a checkpoint's stored config may name live (``trust_config_classes``)
PACKAGE_BACKENDS = "pro_grpo_lightning.backends."


def _merged(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Later configs over earlier ones, as ``--config a --config b`` layers them (dicts merged
    key by key, anything else replaced)."""
    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return b
    out: dict[str, Any] = {}
    for cfg in configs:
        out = merge(out, cfg)
    return out


def read_run_config(ckpt: str, state: dict[str, Any], configs: list[str] | None = None) -> tuple[dict[str, Any], bool]:
    """(the run's config as a dict, whether it came from the user): the ``configs`` the user names
    (merged in order), else the config the checkpoint carries, else a config.yaml beside it; renamed
    settings under their new names (``checkpointing.migrate_config``)."""
    from .checkpointing import migrate_config
    from .errors import ConfigError

    def read(path: str) -> dict[str, Any]:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"run_config={path!r}: expected a YAML mapping, got {type(cfg).__name__}")
        return cfg

    if configs:
        return _merged([migrate_config(read(p), f"run_config={p!r}") for p in configs]), True
    text = (state.get("pro_grpo") or {}).get("config")
    if text:
        cfg = yaml.safe_load(text)
        if isinstance(cfg, dict):
            return migrate_config(cfg, f"ckpt={ckpt!r} (its stored config)"), False
    here = os.path.dirname(os.path.abspath(ckpt))
    for folder in (here, os.path.dirname(here)):
        path = os.path.join(folder, "config.yaml")
        if os.path.isfile(path):
            return migrate_config(read(path), repr(path)), False
    raise ConfigError(f"ckpt={ckpt!r} carries no config and none is beside it: pass --run_config")


def build_backend(config: dict[str, Any], where: str, trust_config_classes: bool = False) -> DiffusionBackend:
    """The backend of a run config (``model.backend``) and nothing else: no reward, no schedule.

    A config the checkpoint carries (``where`` names it) may only name a backend of this package
    unless ``trust_config_classes``: editing the text inside a checkpoint must not make export
    import a module of the file's choosing. The class path is checked as text, before any import.
    """
    from jsonargparse import ArgumentParser

    from .errors import ConfigError

    block = (config.get("model") or {}).get("backend")
    if not isinstance(block, dict) or not isinstance(block.get("class_path"), str):
        raise ConfigError(f"{where}: no model.backend class_path in the run's config")
    class_path = block["class_path"]
    if not trust_config_classes and not (class_path.startswith(PACKAGE_BACKENDS)
                                         and class_path.count(".") == PACKAGE_BACKENDS.count(".") + 1):
        raise ConfigError(f"{where}: model.backend.class_path={class_path!r} is not a backend of this package; "
                          f"if you trust the file, pass --trust_config_classes (or your own --run_config)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DiffusionBackend, "backend", required=True)
    try:
        cfg = parser.parse_object({"backend": block})
    except Exception as err:  # noqa: BLE001 - jsonargparse's own parse errors: one line
        raise ConfigError(f"{where}: model.backend: {' '.join(str(err).split())[:300]}") from None
    return parser.instantiate_classes(cfg).backend


def load_adapter(backend: DiffusionBackend, state: dict[str, Any], ckpt: str) -> torch.nn.Module:
    """Put a checkpoint's adapter weights (``backend.*`` of the module's state dict) into ``backend``
    after checking its identity (backend, fine-tuning, LoRA; one line, before the base weights load)
    and that the weights are exactly the adapter's. Returns a holder module whose ``backend`` is
    ``backend`` (the module's names, for ``ema.load_ema_into``)."""
    from .checkpointing import adapter_names, backend_identity, check_identity

    check_identity((state.get("pro_grpo") or {}).get("identity") or {}, backend_identity(backend),
                   f"ckpt={ckpt!r}", resume=False)
    holder = torch.nn.Module()
    holder.backend = backend
    backend.configure_model()
    weights = {k: v for k, v in state["state_dict"].items() if k.startswith("backend.")}
    missing = sorted(adapter_names(holder) - set(weights))
    if missing:
        raise KeyError(f"{ckpt} lacks {len(missing)} adapter weights of this model (e.g. {missing[0]}): was it "
                       f"trained with another backend or LoRA setting?")
    result = holder.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"{ckpt} has {len(result.unexpected_keys)} weights this model lacks (e.g. "
                       f"{result.unexpected_keys[0]}): was it trained with another backend or LoRA setting?")
    return holder


def export_checkpoint(ckpt: str, out: str, run_config: str | list[str] | None = None, merge: bool = False,
                      ema: bool = False, overwrite: bool = False, trust_config_classes: bool = False) -> str:
    """Export a training checkpoint's LoRA (or pipeline) to ``out``; returns ``out``.

    Every check that needs no weights comes first: ``out`` (writable, empty unless ``overwrite``),
    the checkpoint (readable, ``weights_only=True``, its digest, finite and plausible weights), the
    config and its backend class. Only the backend is built (no reward, so no network and no
    reward weights); the checkpoint's stored config may name only this package's backends unless
    ``trust_config_classes`` (a ``run_config`` the user names is the user's own).

    Args:
        ckpt: a checkpoint of the run (e.g. checkpoints/last.ckpt).
        out: the output folder (refused if not empty, unless overwrite).
        run_config: the run's YAML, or a list of them layered in order as for fit (on the command
            line: --run_config '[base.yaml, overlay.yaml]'); default: the config the checkpoint carries.
        merge: write a full pipeline with the LoRA fused.
        ema: export the EMA weights the checkpoint carries (the run's EMA callback), not the raw ones.
        overwrite: replace a non-empty out (only once the new export is complete).
        trust_config_classes: let the checkpoint's stored config name a backend outside this package.
    """
    from .checkpointing import check_checkpoint_weights, load_checkpoint_file

    check_output_folder(out, overwrite)  # before anything is read: a typo costs nothing
    state = load_checkpoint_file(ckpt)
    check_checkpoint_weights(state, f"ckpt={ckpt!r}")
    configs = [run_config] if isinstance(run_config, str) else run_config
    cfg, users = read_run_config(ckpt, state, configs)
    backend = build_backend(cfg, "--run_config" if users else f"ckpt={ckpt!r} (its stored config)",
                            trust_config_classes or users)
    holder = load_adapter(backend, state, ckpt)
    if ema:
        from .ema import load_ema_into

        load_ema_into(holder, state)
    path = export_lora(backend, out, merge=merge, overwrite=overwrite, record=state.get("pro_grpo") or {},
                       config=cfg, weights="EMA" if ema else "raw")
    full = getattr(backend, "finetune", "lora") == "full"
    print(f"exported {'pipeline' if merge or full else 'LoRA'}{' (EMA weights)' if ema else ''} to {path}")
    return path


def main(argv: list[str] | None = None) -> str:
    """``pro-grpo export`` / ``python -m pro_grpo_lightning export``: ``export_checkpoint``'s arguments
    as options (``cli.CommandParser``: ``--config`` files of them, ``--print_config``, one-line errors)."""
    from .cli import CommandParser

    parser = CommandParser(export_checkpoint, "pro-grpo export", DESCRIPTION)
    args = parser.parse(legacy_run_config(argv, parser.prog))
    return export_checkpoint(**{k: v for k, v in vars(args).items() if k != "config"})


DESCRIPTION = ("Export a Pro-GRPO checkpoint's LoRA in diffusers format (or a pipeline with it merged). Only "
               "the backend is built (no reward); the run's config comes from the checkpoint unless --run_config "
               "names it. --config takes this command's own settings as YAML (as --print_config writes them).")


def legacy_run_config(argv: list[str] | None, prog: str) -> list[str] | None:
    """Until this command took ``--config`` files of its own settings (as ``fit`` does), ``--config``
    named the run's YAML. Such a file (a run's config: a top-level ``model`` mapping, a key no export
    setting has) still works as ``--run_config`` with one line saying so. Decided here, before the
    parser, because jsonargparse would refuse the file's keys."""
    if argv is None:
        argv = sys.argv[1:]
    out, runs = list(argv), []
    i = 0
    while i < len(out):
        arg = out[i]
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else out[i + 1] if arg == "--config" and \
            i + 1 < len(out) else None
        cfg = None
        if path is not None and os.path.isfile(path):
            with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError, OSError), open(path, encoding="utf-8") as f:
                cfg = yaml.safe_load(f)
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            runs.append(path)
            del out[i:i + (1 if "=" in arg else 2)]
            continue
        i += 1
    if runs:
        print(f"{prog}: --config {' '.join(runs)} is a run's config: read as --run_config (deprecated spelling; "
              f"--config now takes export's own settings)", file=sys.stderr)
        out += ["--run_config", runs[0] if len(runs) == 1 else "[" + ", ".join(map(repr, runs)) + "]"]
    return out


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
