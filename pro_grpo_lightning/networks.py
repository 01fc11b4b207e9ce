"""Where a backend's or a reward's networks come from: one public choice, ``NetworkSource``.

Three sources, the same classes and the same code after the networks exist:

- ``NetworkSource()`` (``weights="pretrained"``): today's path. A backend loads ``pretrained`` (hub
  id, folder, ``pkg://``), a reward its ``pretrained``; a model built in code (the tiny twins,
  ``built_in_code``) builds its code, as always.
- ``NetworkSource("random", device, seed)``: the architecture alone, built directly on ``device``
  (``"cpu"``, ``"cuda"``) in the network's dtype, with seeded random values. Benchmarks and the GPU
  memory check run the real sizes without weights this way.
- ``NetworkSource("empty")``: the architecture on the ``meta`` device, no storage at all. The memory
  plan builds the run this way, then turns the tensors into fake ones (``fake_tensors``).

The architecture of a pretrained source is read without its weights: a local diffusers folder's
``config.json`` files, else the hub id's row of ``architectures.py`` (``architecture_components``);
tokenizers are offline, shape-equivalent stand-ins (same padded lengths; ids are never meaningful
with random weights). Each reward declares its own network (``PretrainedReward.architecture``).

Callers choose with ``backend.use_networks(source)`` / ``reward.use_networks(source)`` (or
``ProGRPOModule.use_networks`` for all of a run) before ``configure_model()``; nothing outside a
class replaces its loaders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

#: ``NetworkSource.weights`` values.
WEIGHT_SOURCES = ("pretrained", "random", "empty")


class UnknownArchitecture(ValueError):
    """A source whose architecture is neither built in code, a local folder's config, nor in ``architectures.py``."""


@dataclass(frozen=True)
class NetworkSource:
    """Where networks come from (see the module docstring).

    Args:
        weights: "pretrained" (load them), "random" (the architecture with seeded random values on
            ``device``) or "empty" (the architecture on the meta device: shapes only).
        device: where "random" builds ("cpu", "cuda", "cuda:1"); "empty" is always "meta".
        seed: the random values' seed ("random"); the global RNG is left as it was.
    """

    weights: str = "pretrained"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_SOURCES:
            raise ValueError(f"NetworkSource.weights={self.weights!r}: choose one of {WEIGHT_SOURCES}")
        if self.weights == "empty":
            object.__setattr__(self, "device", "meta")
        elif self.weights == "random" and torch.device(self.device).type == "meta":
            raise ValueError("NetworkSource: random weights need a real device; use weights='empty' for meta")

    @property
    def pretrained(self) -> bool:
        return self.weights == "pretrained"

    def adapter(self) -> NetworkSource:
        """The source of a LoRA adapter added to these networks: the same device, its own seed."""
        return self if self.pretrained else dataclasses.replace(self, seed=self.seed + 1)

    @contextlib.contextmanager
    def building(self, dtype: torch.dtype) -> Iterator[None]:
        """Modules constructed inside are built where this source says: nothing changes for
        "pretrained"; "random" builds on ``device`` in ``dtype`` (no float32 CPU copy of billions of
        parameters first) from ``seed``; "empty" builds on the meta device."""
        if self.pretrained:
            yield
            return
        devices = [torch.device(self.device).index or 0] if torch.device(self.device).type == "cuda" else []
        old = torch.get_default_dtype()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            if self.weights == "random" and dtype.is_floating_point:
                torch.set_default_dtype(dtype)
            try:
                with torch.device(self.device):
                    yield
            finally:
                torch.set_default_dtype(old)


PRETRAINED = NetworkSource()
EMPTY = NetworkSource("empty")


# ---- architectures without weights ------------------------------------------------------------------
def transformers_model(cls_name: str, cfg: dict[str, Any]) -> nn.Module:
    """A transformers model by class name from its config fields (on the current device)."""
    import transformers

    cls = getattr(transformers, cls_name)
    return cls(cls.config_class(**cfg))


def diffusers_model(cls_name: str, cfg: dict[str, Any]) -> Any:
    """A diffusers model or scheduler by class name from its config fields (on the current device)."""
    import diffusers

    return getattr(diffusers, cls_name)(**cfg)


def _table_components(pretrained: str, text_encoders: Sequence[str]) -> dict[str, Any]:
    """A hub pipeline's components from ``architectures.PIPELINES`` (networks on the current device)."""
    from .architectures import PIPELINES

    if pretrained not in PIPELINES:
        raise UnknownArchitecture(f"backend pretrained={pretrained!r}: unknown architecture (not a local "
                                  f"folder, not in pro_grpo_lightning/architectures.py)")
    comps: dict[str, Any] = {}
    for name, (cls_name, cfg) in PIPELINES[pretrained].items():
        if name == "scheduler" or (name.startswith("text_encoder") and name not in text_encoders):
            continue
        if name.startswith("text_encoder"):  # transformers models; the rest are diffusers'
            comps[name] = transformers_model(cls_name, cfg).eval()
        else:
            comps[name] = diffusers_model(cls_name, cfg)
    cls_name, cfg = PIPELINES[pretrained]["scheduler"]
    with torch.device("cpu"):  # schedulers hold real tables
        comps["scheduler"] = diffusers_model(cls_name, cfg)
    return comps


def _folder_components(folder: str, text_encoders: Sequence[str]) -> dict[str, Any]:
    """A local diffusers folder's components from ``model_index.json`` and the config files only."""
    import diffusers
    import transformers

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    comps: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or name.startswith("tokenizer"):
            continue
        if name.startswith("text_encoder") and name not in text_encoders:
            continue
        library, cls_name = entry
        sub = os.path.join(folder, name)
        if library == "transformers":
            cls = getattr(transformers, cls_name)
            comps[name] = cls(cls.config_class.from_pretrained(sub)).eval()
        else:
            cls = getattr(diffusers, cls_name)
            with torch.device("cpu") if name == "scheduler" else contextlib.nullcontext():
                comps[name] = cls.from_config(cls.load_config(sub))
    return comps


def stand_in_tokenizers(comps: dict[str, Any], t5_length: int) -> dict[str, Any]:
    """Offline tokenizers that pad to the same lengths as the real ones (ids are never meaningful:
    the weights are random or absent): byte-level CLIP for CLIP encoders, character-level T5, and a
    byte-level Qwen2 tokenizer with a chat template for the Qwen encoders (Qwen-Image, Z-Image):
    those pad to the batch's longest prompt, which bytes make longer than the real BPE would (an
    overestimate of the text tokens)."""
    from .offline_tokenizers import QWEN_CHAT_TEMPLATE, byte_level_clip_tokenizer, byte_level_qwen_tokenizer, \
        char_level_t5_tokenizer

    for name, net in list(comps.items()):
        if not name.startswith("text_encoder"):
            continue
        tok_name = "tokenizer" + name[len("text_encoder"):]
        if type(net).__name__.startswith("Qwen"):
            comps[tok_name] = byte_level_qwen_tokenizer(chat_template=QWEN_CHAT_TEMPLATE)
        elif type(net).__name__.startswith("T5"):
            comps[tok_name] = char_level_t5_tokenizer(model_max_length=t5_length)
        else:  # CLIP pads to its context (77; a small local model may have fewer positions)
            positions = getattr(net.config, "max_position_embeddings", 77)
            comps[tok_name] = byte_level_clip_tokenizer(model_max_length=min(77, positions))
    return comps


def architecture_components(pretrained: str, text_encoders: Sequence[str], t5_length: int = 77) -> dict[str, Any]:
    """The pipeline components of ``pretrained`` with no weights read: a local diffusers folder's
    config files, else the hub id's row of ``architectures.PIPELINES``; networks on the current
    device (``NetworkSource.building``), schedulers on the CPU, stand-in tokenizers. Text encoders
    not in ``text_encoders`` (SD3's T5 with ``drop_t5``) are not built."""
    if os.path.isdir(pretrained):
        comps = _folder_components(pretrained, text_encoders)
    else:
        comps = _table_components(pretrained, text_encoders)
    return stand_in_tokenizers(comps, t5_length)


def preview_decoder_architecture(source: str) -> nn.Module:
    """The ``AutoencoderTiny`` named by a backend's ``preview_decoder``, without weights: a local
    folder's config.json, else ``architectures.PREVIEW_DECODERS`` (hub ids); on the current device."""
    from diffusers import AutoencoderTiny

    from .architectures import PREVIEW_DECODERS
    from .loading import resolve_pretrained_source

    path = resolve_pretrained_source(source)
    if os.path.isdir(path):
        cfg = AutoencoderTiny.load_config(path)
    elif source in PREVIEW_DECODERS:
        cfg = PREVIEW_DECODERS[source]
    else:
        raise UnknownArchitecture(f"preview_decoder={source!r}: unknown architecture (not a local folder, "
                                  f"not in pro_grpo_lightning/architectures.py)")
    return AutoencoderTiny.from_config(cfg).eval()


def clip_architecture(pretrained: str, what: str) -> Any:
    """The ``CLIPConfig`` of a CLIP reward: a local folder's config.json, else ``architectures.REWARD_MODELS``."""
    from transformers import CLIPConfig

    from .architectures import REWARD_MODELS

    if os.path.isdir(pretrained) and os.path.isfile(os.path.join(pretrained, "config.json")):
        return CLIPConfig.from_pretrained(pretrained)
    if pretrained in REWARD_MODELS:
        spec = REWARD_MODELS[pretrained]
        return CLIPConfig(text_config=dict(spec["text"], projection_dim=spec["projection_dim"]),
                          vision_config=dict(spec["vision"], projection_dim=spec["projection_dim"]),
                          projection_dim=spec["projection_dim"])
    raise UnknownArchitecture(f"{what}={pretrained!r}: unknown architecture (not a local folder with "
                              f"config.json, not in architectures.py)")


# ---- fake tensors (the plan) --------------------------------------------------------------------------
def fake_tensors(module: nn.Module, fake_mode: Any) -> None:
    """Every parameter and buffer of ``module`` replaced, through ``register_parameter`` /
    ``register_buffer``, by a fake CPU tensor of its shape and dtype (``FakeTensorMode``: no storage).

    Unlike ``Module.to_empty`` this keeps tied weights tied (T5's shared embedding): one fake
    tensor per original tensor, set on every module that holds it. Meta tensors are wrapped as they
    are (what ``empty_like`` under the mode makes, 100x faster).

    The fakes never move: ``Module.to`` swaps a fake parameter (``torch.utils.swap_tensors``),
    which refuses a tensor that the mode's converter holds a weak reference to, and every fake made
    here is held that way. That is why they are made with the mode's dispatch cache off: the cache
    is one for the whole process (``FakeTensorMode.cache``, shared by every mode), and a parameter
    whose ``detach`` came from it (an identical one was faked earlier in the process) was not held,
    so it moved where the first one refused: offloading then behaved by what ran before.
    """
    from torch._subclasses.fake_tensor import FakeTensor, disable_fake_tensor_cache

    memo: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (original, fake); the original kept alive
    persistent = set(module.state_dict(keep_vars=True))

    def fake(t: Tensor, param: bool) -> Tensor:
        if id(t) not in memo:
            if t.device.type == "meta":
                new = FakeTensor(fake_mode, t.detach(), torch.device("cpu"))
            else:
                with fake_mode:
                    new = torch.empty_like(t, device="cpu")
            memo[id(t)] = (t, nn.Parameter(new, requires_grad=t.requires_grad) if param else new)
        return memo[id(t)][1]

    with disable_fake_tensor_cache(fake_mode):
        for prefix, mod in module.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(name, fake(p, True))
            for name, b in list(mod.named_buffers(recurse=False)):
                mod.register_buffer(name, fake(b, False), persistent=dot + name in persistent)
