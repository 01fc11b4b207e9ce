"""Finding and loading pretrained weights: what the backends and the rewards share.

- ``parse_dtype``: a config's dtype name -> ``torch.dtype``.
- ``resolve_pretrained_source`` / ``check_pretrained_source`` / ``check_source``: ``pkg://``
  folders inside installed packages, local folders, files, hub ids (and whether they are cached
  when ``HF_HUB_OFFLINE=1``), checked before any model loads so a bad path fails in one line.
- ``check_tokenizer_vocab`` / ``load_tokenizer``: the guard against offline dummy tokenizers.
- ``resolve_file``, ``load_state_dict_file``, ``save_state_dict_file``, ``from_pretrained_checked``,
  ``build_with_state_dict``: weight files and transformers models without silent random init.
- ``load_preview_decoder``: a diffusers ``AutoencoderTiny`` (the pruning previews' cheaper decoder).

Nothing here imports a backend or a reward: both build on this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


#: ``pretrained`` values starting with this name a folder inside an installed Python package.
PACKAGE_SCHEME = "pkg://"

#: the file ``export`` writes in a LoRA folder (diffusers' own default name) and ``predict`` reads
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_SKIP_SOURCE_CHECKS = contextvars.ContextVar("skip_source_checks", default=False)


@contextlib.contextmanager
def source_checks_skipped() -> Iterator[None]:
    """Inside this block ``check_pretrained_source`` / ``check_source`` accept any source: a run can
    be built for a hub id that is not downloaded when nothing will load (the memory plan)."""
    token = _SKIP_SOURCE_CHECKS.set(True)
    try:
        yield
    finally:
        _SKIP_SOURCE_CHECKS.reset(token)


def resolve_pretrained_source(pretrained: str) -> str:
    """``pkg://<package>/<folder>`` -> that folder's path inside the installed package; else unchanged.

    So a config can point at weights shipped with a package (``pkg://pro_grpo_lightning/assets/
    tiny_shapes_sd3``) wherever the package is installed and whatever the working directory.
    """
    if not pretrained.startswith(PACKAGE_SCHEME):
        return pretrained
    package, _, folder = pretrained[len(PACKAGE_SCHEME):].partition("/")
    from importlib.resources import files

    try:
        root = files(package)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"pretrained={pretrained!r}: no installed package {package!r}") from None
    return str(root.joinpath(folder)) if folder else str(root)


def check_pretrained_source(pretrained: str, what: str = "pretrained") -> None:
    """Fail early, before any model loads, when weights cannot be found.

    A local folder must exist (``pkg://`` sources are resolved first, see
    ``resolve_pretrained_source``). Anything that is not an existing folder is taken as a hub id;
    with ``HF_HUB_OFFLINE=1`` it must already be in the local hub cache.
    """
    if _SKIP_SOURCE_CHECKS.get():
        return
    if pretrained.startswith(PACKAGE_SCHEME):
        path = resolve_pretrained_source(pretrained)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{what}={pretrained!r}: no such folder ({path})")
        return
    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        return
    looks_local = pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1 or os.sep == "\\" and "\\" in pretrained
    if looks_local:
        raise FileNotFoundError(
            f"{what}={pretrained!r}: no such folder. Point it at a local diffusers folder or a hub id.")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(pretrained, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means "not available offline"
            raise FileNotFoundError(
                f"{what}={pretrained!r} is not a local folder and is not in the hub cache, and "
                f"HF_HUB_OFFLINE=1 (this machine may be offline): download it first or give a "
                f"local folder. ({type(err).__name__})") from None


def check_source(pretrained: str, what: str) -> None:
    """A weights file, a folder, or a hub id (cached when offline); else FileNotFoundError."""
    if _SKIP_SOURCE_CHECKS.get():
        return
    if os.path.isfile(os.path.expanduser(pretrained)):
        return
    check_pretrained_source(pretrained, what=what)


def resolve_file(pretrained: str, filename: str) -> str | None:
    """Path of ``filename`` inside a local folder or hub repo ``pretrained``; None if absent there."""
    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        return candidate if os.path.isfile(candidate) else None
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(pretrained, filename)
    except Exception:  # noqa: BLE001 - missing file, missing repo or offline: "not there"
        return None


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """A ``.safetensors`` file, or a torch pickle holding tensors (loaded with ``weights_only``)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such weights file: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"{path!r} is not a plain tensor checkpoint (torch.load(weights_only=True) failed: {err}). If you "
            f"trust the file, re-save its tensors once, e.g. torch.save(torch.load(path, weights_only=False)"
            f"['state_dict'], new_path), or as .safetensors.") from err


def save_state_dict_file(state: dict[str, Tensor], path: str) -> None:
    """Write a state dict as ``.safetensors`` (by extension) or a torch pickle."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)


def load_tokenizer(source: str, vocab_size: int, what: str) -> Any:
    """``AutoTokenizer`` from a folder or hub id, checked against the text model's vocabulary.

    Why the check: offline, ``CLIPTokenizer.from_pretrained(<uncached hub id>)`` returns a dummy
    tokenizer of 2 tokens without error. ``AutoTokenizer`` raises instead, and a tokenizer whose
    size disagrees with the embedding table is refused here (``check_tokenizer_vocab``).
    """
    check_pretrained_source(source, what=what)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{what}={source!r}: no usable tokenizer there ({err})") from err
    check_tokenizer_vocab(tokenizer, vocab_size, source, what)
    return tokenizer


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int, source: str, what: str = "tokenizer") -> None:
    """Refuse a tokenizer that cannot belong to a text model with ``vocab_size`` embeddings.

    Offline (``HF_HUB_OFFLINE=1``), transformers' CLIP/T5 tokenizers can come back as a dummy of a
    few tokens instead of raising; its ids would be valid but meaningless. A real tokenizer has at
    least half of the encoder's ``vocab_size`` (T5 pads its table to a multiple of 128, CLIP
    matches exactly) and never more (its ids would index past the embedding table). Raises
    ValueError naming ``source``.
    """
    n = len(tokenizer)
    if not max(2, vocab_size // 2) <= n <= vocab_size:
        raise ValueError(
            f"{what}: the tokenizer loaded from {source!r} has {n} tokens but its text model has "
            f"{vocab_size} embeddings: this is not the model's tokenizer (offline, transformers can "
            f"return a dummy tokenizer for an uncached hub id instead of failing). Point it at the "
            f"folder holding the model's real tokenizer files.")
def from_pretrained_checked(model_cls: Any, source: str, dtype: torch.dtype, what: str,
                            allowed_missing: Sequence[str] = ()) -> nn.Module:
    """``model_cls.from_pretrained`` that refuses silently random-initialised weights.

    transformers fills missing weights with random values and only warns; a reward built on
    that would train a policy against noise. Missing keys are an error unless they start with one
    of ``allowed_missing`` (heads the reward never uses).
    """
    try:
        model, info = model_cls.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except OSError as err:
        raise FileNotFoundError(f"{what}={source!r}: cannot load {model_cls.__name__} ({err})") from err
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(tuple(allowed_missing))]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ValueError(f"{what}={source!r}: weights do not fit {model_cls.__name__}: "
                         f"missing {sorted(missing)[:8]}, mismatched {mismatched[:8]}")
    return model


def build_with_state_dict(factory: Any, state: dict[str, Tensor], dtype: torch.dtype, what: str) -> nn.Module:
    """``factory()`` built on the meta device, then given ``state`` (strict) without a random init.

    A random init of a 1 B-parameter CLIP takes ~30 s on 2 CPU cores, only to be overwritten. The
    non-persistent ``position_ids`` buffers (``arange``), which no checkpoint holds, are rebuilt.
    """
    with torch.device("meta"):
        model = factory()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{what}: the weights do not fit the architecture: {err}") from None
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        if leaf != "position_ids":
            raise RuntimeError(f"{what}: buffer {name!r} is not in the checkpoint and cannot be rebuilt")
        owner = model.get_submodule(owner_name)
        # not in a strict checkpoint, so non-persistent: rebuilt as such
        owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.to(dtype)


def load_preview_decoder(source: str, dtype: torch.dtype, what: str = "preview_decoder") -> nn.Module:
    """A diffusers ``AutoencoderTiny`` from a folder, a ``pkg://`` folder or a hub id, frozen, in ``dtype``.

    The TAESD family (``madebyollin/taesd`` for SD1.x, ``madebyollin/taesd3`` for SD3/SD3.5,
    ``madebyollin/taef1`` for FLUX.1) or a distilled one (``pkg://pro_grpo_lightning/assets/
    tiny_shapes_sd3_preview_decoder``). The source is checked first (``check_pretrained_source``);
    a folder that holds no AutoencoderTiny, or weights that do not fit its config, fail in one
    line naming ``what`` and the value.
    """
    check_pretrained_source(source, what=what)
    from diffusers import AutoencoderTiny

    path = resolve_pretrained_source(source)
    try:  # diffusers refuses missing or mis-shaped weights (no silent random init)
        decoder = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{what}={source!r}: cannot load an AutoencoderTiny there ({first})") from None
    return decoder.requires_grad_(False).eval()
