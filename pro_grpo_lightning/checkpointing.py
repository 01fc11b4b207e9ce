"""Checkpoint files that survive any kill, hold no code, and never hold NaN weights.

``AtomicCheckpointIO`` is a Lightning ``CheckpointIO`` plugin that ``ProGRPOModule.setup``
installs in place of Lightning's default ``TorchCheckpointIO`` (a user-given plugin is left as
it is), so nothing needs configuring:

    save: refuse non-finite or implausibly large weights (naming the tensor; ``health.py``), store
          a SHA-256 digest of every tensor (``tensor_digest``); write a temp file *in the checkpoint's own
          directory*, fsync it, ``os.replace`` it onto the target, fsync the directory. The target
          is at every instant either the previous complete file or the new complete file, whatever
          filesystem the system's temp dir is on; a temp file a killed writer left behind is
          removed by the next save into that directory.
    load: ``torch.load(weights_only=True)``: tensors and plain containers only, so a crafted
          checkpoint cannot run code. Empty, truncated, random and foreign files fail with one
          line naming the path (``CheckpointError``); so does a file whose tensors no longer
          match its digest (bit flips, a damaged copy), naming the newest good checkpoint beside it.

Remote paths (``s3://`` ...) fall back to Lightning's own save.

What a checkpoint holds and must match (``ProGRPOModule.on_save_checkpoint`` /
``on_load_checkpoint`` call ``pack_checkpoint`` / ``unpack_checkpoint``): only what training
changes (the adapter, the reward-normalisation statistics, Lightning's optimizer and scheduler
state) and a ``pro_grpo`` record: the rollout counter, the seed, the run's identity
(``run_identity``: backend, fine-tuning mode, LoRA rank/alpha/targets, schedule, optimizer class)
and the resolved run config. ``check_identity`` refuses a checkpoint of another setup with one line
naming both values, before any weights load when the CLI calls it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .errors import ConfigError
from .health import check_finite_tensors, check_weight_magnitudes, optimizer_tensors
from .outputs import output_error, publish_permissions

TEMP_MARK = ".pgl-tmp-"  # temp files are ".<name>.pgl-tmp-<pid>-<random>"


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used (missing, empty, truncated, foreign, unsafe)."""


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str) -> list[str]:
    """Delete temp files of writers that no longer run (killed mid-save); returns their paths."""
    removed = []
    pattern = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)-")
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except FileNotFoundError:
                pass
    return removed


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temp file in the same directory, fsync and ``os.replace``."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}{TEMP_MARK}{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish_permissions(tmp)  # mkstemp makes 0600; a checkpoint gets what any new file gets
        os.replace(tmp, path)  # atomic on POSIX: the same filesystem by construction
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def check_checkpoint_weights(checkpoint: dict[str, Any], where: str) -> None:
    """Refuse (``NonFiniteError``) a checkpoint whose weights or optimizer state hold NaN/inf, or
    whose weights hold an implausible magnitude (``health.MAX_WEIGHT_MAGNITUDE``; reward statistics,
    ``rewards.*``, are on the rewards' own scale and are not bounded)."""
    weights = checkpoint.get("state_dict") or {}
    check_finite_tensors(weights, where)
    check_weight_magnitudes({k: v for k, v in weights.items() if not k.startswith("rewards.")}, where)
    check_finite_tensors(optimizer_tensors(checkpoint.get("optimizer_states") or []), where)


#: where a checkpoint keeps the digest of its own tensors (``tensor_digest``)
DIGEST_KEY = "pro_grpo_digest"


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts / lists / tuples, with its key path, in a fixed order (dict keys
    sorted by their text, so the order does not depend on how the file was written)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key], f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _tensors(item, f"{path}/{i}")


def tensor_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 over every tensor of ``checkpoint`` (its key path, dtype, shape and bytes), except
    the digest itself: what ``AtomicCheckpointIO`` stores at save and ``load_checkpoint_file``
    checks at every load, so a flipped bit or a partial copy is refused before anything loads."""
    h = hashlib.sha256()
    for name, t in _tensors({k: v for k, v in checkpoint.items() if k != DIGEST_KEY}):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the raw bytes
    return h.hexdigest()


def previous_good(path: str, limit: int = 3) -> str | None:
    """The newest other ``.ckpt`` beside ``path`` that opens and matches its digest (at most
    ``limit`` candidates tried), or None: the way back named by a refusal."""
    folder = os.path.dirname(os.path.abspath(path))
    others = [os.path.join(folder, n) for n in os.listdir(folder)
              if n.endswith(".ckpt") and os.path.join(folder, n) != os.path.abspath(path)]
    for candidate in sorted(others, key=os.path.getmtime, reverse=True)[:limit]:
        try:
            load_checkpoint_file(candidate, way_back=False)
        except (CheckpointError, OSError):
            continue
        return candidate
    return None


#: how every ``torch.save`` file begins: a zip archive (PyTorch >= 1.6) or the legacy format's
#: pickled magic number (protocol 2, then the 10-byte long 0x1950a86a20f9469cfc6c)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def load_checkpoint_file(path: str, map_location: Any = "cpu", way_back: bool = True) -> dict[str, Any]:
    """Open a training checkpoint safely and check its digest (``tensor_digest``); every failure is
    one ``CheckpointError`` line naming ``path`` (and, for a corrupted file, the newest good
    checkpoint beside it unless ``way_back`` is False)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"ckpt_path={path!r}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"ckpt_path={path!r}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head.startswith(_ZIP_MAGIC) and head != _LEGACY_MAGIC:
        raise CheckpointError(f"ckpt_path={path!r}: not a PyTorch checkpoint (it starts with neither a "
                              f"zip nor a legacy torch.save header: corrupted, or another kind of file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise CheckpointError(f"ckpt_path={path!r}: refused, it holds Python objects that loading would "
                                  f"execute (only tensors and plain types are loaded: weights_only=True)") from None
        raise CheckpointError(f"ckpt_path={path!r}: not a readable checkpoint ({first})") from None
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"ckpt_path={path!r}: truncated or not a PyTorch checkpoint "
                              f"({type(err).__name__}: {first[:120]})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"ckpt_path={path!r}: not a training checkpoint (no state_dict)")
    saved = state.get(DIGEST_KEY)
    if saved is not None and saved != tensor_digest(state):
        back = previous_good(path) if way_back else None
        hint = (f"the newest good checkpoint beside it is {back!r}" if back else
                "no good checkpoint is beside it") if way_back else ""
        raise CheckpointError(f"ckpt_path={path!r}: corrupted: its tensors do not match the digest written with it "
                              f"(a flipped bit or a damaged copy){'; ' + hint if hint else ''}")
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic same-directory saves, a finite-weights check and
    ``weights_only=True`` loading (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = str(path)
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        check_checkpoint_weights(checkpoint, f"saving {path}")
        checkpoint[DIGEST_KEY] = tensor_digest(checkpoint)
        local = path.removeprefix("file://")
        try:
            atomic_save(checkpoint, local)
        except OSError as err:  # a full disk, a read-only folder: one line, the previous file as it was
            folder = os.path.dirname(os.path.abspath(local))
            others = sorted(n for n in os.listdir(folder) if n.endswith(".ckpt")) if os.path.isdir(folder) else []
            kept = (f"the previous {os.path.basename(local)} there is intact" if os.path.isfile(local) else
                    f"the checkpoints already there are intact ({', '.join(others)})" if others else
                    "no checkpoint was written there")
            raise output_error(err, local, kept) from err

    def load_checkpoint(self, path: Any, map_location: Callable | Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = str(path)
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path.removeprefix("file://"),
                                    map_location=map_location if map_location is not None else "cpu")


# ---- what a checkpoint holds and must match -------------------------------------------------------
#: identity fields every use of a checkpoint must match; resuming also checks the schedule and the optimizer
IDENTITY_FIELDS = ("backend", "finetune", "lora.rank", "lora.alpha", "lora.target_modules")


def adapter_names(module: torch.nn.Module) -> set[str]:
    """The trainable parameters' names as a full state dict spells them (FSDP wrapper prefixes,
    which never appear in a full state dict's keys, dropped)."""
    return {n.replace("_fsdp_wrapped_module.", "") for n, p in module.named_parameters() if p.requires_grad}


def backend_identity(backend: Any) -> dict[str, Any]:
    """What a checkpoint must match to be exported into ``backend`` (``IDENTITY_FIELDS``, plain types)."""
    lora = backend.lora
    targets = None if lora.target_modules is None else sorted(lora.target_modules)
    return {"backend": f"{type(backend).__module__}.{type(backend).__qualname__}",
            "finetune": getattr(backend, "finetune", "lora"),
            "lora.rank": int(lora.rank), "lora.alpha": float(lora.alpha), "lora.target_modules": targets}


def run_identity(backend: Any, schedule: Any, optimizer_name: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed or exported by a module (plain types)."""
    return {**backend_identity(backend), "schedule": repr(schedule), "optimizer": optimizer_name}


def check_identity(saved: dict[str, Any], mine: dict[str, Any], path: str, resume: bool = True,
                   allow_schedule_change: bool = False) -> None:
    """Refuse (``ConfigError``) a checkpoint whose ``saved`` identity differs from ``mine`` with
    one line naming both values. ``resume`` also compares the schedule (unless
    ``allow_schedule_change``) and the optimizer class; a field the checkpoint lacks is not compared."""
    fields = list(IDENTITY_FIELDS)
    if resume:
        fields += ([] if allow_schedule_change else ["schedule"]) + ["optimizer"]
    for key in fields:
        if key in saved and saved[key] != mine[key]:
            hint = (" (to change the schedule on purpose: --model.guards.allow_schedule_change true)"
                    if key == "schedule" else "")
            raise ConfigError(f"{path}: has {key}={saved[key]!r} but this run has "
                              f"{key}={mine[key]!r}{hint}")


#: Settings that may differ from the checkpoint's when a run is resumed (README, "Resuming a run"):
#: how long and where the run goes (``trainer.*``), what is evaluated, predicted and logged, the
#: guards, and ``rollout.sample_batch_size`` (rows per call: the same samples either way). Every
#: other ``model.*`` / ``data.*`` setting shapes what rollout k samples or how it trains, so a
#: resumed run that changed it would be neither the old run nor a new one: refused.
RESUME_MAY_CHANGE = ("trainer.", "ckpt_path", "seed_everything", "prediction.", "model.guards.", "model.samples.",
                     "model.eval_rewards", "model.rollout.sample_batch_size", "data.val_prompts",
                     "data.test_prompts", "data.eval_", "data.predict_", "data.num_workers")


#: Settings renamed since a config or a checkpoint may have been written: old key -> new key.
#: Decided here, at the config (not as extra keyword arguments of every backend, which would show
#: the old names in ``--help`` for ever): ``migrate_config`` reads the old key as the new one with one
#: line saying so, for every YAML file ``fit`` / ``validate`` / ``test`` / ``predict`` / ``plan`` /
#: ``adapt`` read (their parser's loader, ``cli.OneLineErrors``), for a checkpoint's stored config
#: (resume's comparison, ``cli.check_checkpoint``) and for ``export``'s run config. On the command
#: line an old key is refused in one line naming the new one as the nearest setting.
RENAMED = {"vae_decode_chunk": "decode_chunk"}  # it chunks the preview decoder's decodes too
_RENAMES_SAID: set[tuple[str, str]] = set()


def migrate_config(cfg: Any, where: str = "a config") -> Any:
    """``cfg`` (nested dicts and lists, as YAML loads them) with every key of ``RENAMED`` under
    its new name; one line on stderr per old key and ``where`` (once per process). Both names
    in one mapping is a ``ConfigError``."""
    if isinstance(cfg, list):
        return [migrate_config(v, where) for v in cfg]
    if not isinstance(cfg, dict):
        return cfg
    out: dict[Any, Any] = {}
    for key, value in cfg.items():
        new = RENAMED.get(key, key) if isinstance(key, str) else key
        if new != key:
            if new in cfg:
                raise ConfigError(f"{where}: both {key} and {new}: {key} is {new}'s old name; give only {new}")
            if (key, where) not in _RENAMES_SAID:
                _RENAMES_SAID.add((key, where))
                print(f"deprecated: {key} ({where}) is now called {new}: read as {new}", file=sys.stderr)
        out[new] = migrate_config(value, where)
    return out


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of nested dicts (lists stay whole values)."""
    if not isinstance(cfg, dict):
        return {prefix[:-1]: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def resume_changes(saved: dict[str, Any], mine: dict[str, Any],
                   allow_schedule_change: bool = False) -> tuple[list[str], list[str]]:
    """(applied, refused): the settings of this run (``mine``, a resolved config) that differ from
    the checkpoint's (``saved``), each as ``"key: old -> new"``. Applied: ``RESUME_MAY_CHANGE`` (and
    ``model.schedule`` with ``allow_schedule_change``); refused: the rest. A key one side lacks
    (another version of the package) is not compared."""
    old, new = _flat(saved), _flat(mine)
    may = RESUME_MAY_CHANGE + (("model.schedule",) if allow_schedule_change else ())
    applied, refused = [], []
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            (applied if key.startswith(may) else refused).append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return applied, refused


def pack_checkpoint(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: keep only the adapter and the reward statistics of the state dict,
    refuse non-finite weights or optimizer state (the previous, good checkpoint stays the latest),
    and add the ``pro_grpo`` record (module docstring)."""
    keep = adapter_names(module) | {n for n, _ in module.rewards.named_buffers(prefix="rewards")}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    check_checkpoint_weights(checkpoint, "checkpoint save")
    # No generator state: rollout k's RNG is re-seeded from (seed, k) (noise.py).
    checkpoint["pro_grpo"] = {"rollouts_done": module.rollouts_done, "seed": module.seed,
                              "rng": "per-rollout (seed, rollout index)",
                              "schedule": repr(module.schedule), "identity": module.run_identity()}
    checkpoint["pro_grpo"]["held_out"] = dict(getattr(module, "held_out", {}))  # for export's model card
    if module.run_config is not None:  # export reads the run's own config from here
        checkpoint["pro_grpo"]["config"] = module.run_config


def unpack_checkpoint(module: Any, checkpoint: dict[str, Any], resume: bool) -> tuple[int, int]:
    """``on_load_checkpoint``: refuse non-finite weights, another run setup (``module.check_identity``,
    ``resume``: continuing training) and a checkpoint lacking any of the module's adapter weights;
    load the module's weights first (the adapter must exist to receive them).

    Returns (rollouts done, optimizer steps) of the checkpoint.
    """
    check_checkpoint_weights({"state_dict": checkpoint["state_dict"]}, "checkpoint load")
    extra = checkpoint.get("pro_grpo") or {}
    module.check_identity(extra.get("identity") or {}, "checkpoint", resume=resume)
    module.configure_model()  # LoRA parameters must exist to receive the weights
    missing = sorted(adapter_names(module) - set(checkpoint["state_dict"]))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} adapter weights of this model "
                       f"(e.g. {missing[0]}): was it trained with another backend or LoRA setting?")
    return int(extra.get("rollouts_done", 0)), int(checkpoint.get("global_step", 0))


def install(trainer: Any) -> None:
    """Put ``AtomicCheckpointIO`` in place of Lightning's default IO (a custom one is kept)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
