"""A reward scored by another process: ``RemoteReward`` is the client of ``reward_server``.

Run a reward where it fits (another environment, another GPU, another machine of the cluster) and
train against it over HTTP::

    python -m pro_grpo_lightning.reward_server --reward my_pkg.scorers.OCRReward \\
        --init_args '{"lang": "en"}' --host 127.0.0.1 --port 8000

    model:
      rewards:
        - class_path: pro_grpo_lightning.rewards.remote.RemoteReward
          init_args: {url: "http://127.0.0.1:8000", name: ocr}

Wire format (version 1; no pickle anywhere, only data):

``POST /score``, body ``application/octet-stream``: a safetensors file holding one tensor
``images`` [B, 3, H, W] (dtype uint8 for value * 255 rounded, or float16 / float32 in [0, 1]);
the file's string metadata holds ``prompts`` (JSON list of B strings), ``metadata`` (JSON list
of B objects, or ``null`` when the prompt set has none) and ``format`` (``"pro-grpo-reward/1"``).
Answer ``200 application/json``: ``{"scores": [B numbers, null for a non-finite score], "name":
<the served reward's name>}``. Errors: a status >= 400 with ``{"error": <one line>}``.

``GET /health``: ``200 {"status": "ok", "name": ..., "reward": <class path>}``.

Client behaviour: each request has ``timeout`` seconds; a connection failure, a timeout or a
502/503/504 is retried ``retries`` times after ``backoff * 2**i`` seconds (each retry logged as
a warning), then ``RemoteRewardError`` is raised with one line naming the URL. Any other error
status is the server's answer (the reward refused the batch): raised at once with its message.
A wrong number of scores raises too. Non-finite scores come back as NaN, for the training side's
non-finite policy to handle like any reward's.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from ..errors import RewardError
from .base import Reward

WIRE_FORMAT = "pro-grpo-reward/1"
IMAGE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
RETRY_STATUS = (502, 503, 504)  # a proxy or a busy server: worth another try

log = logging.getLogger(__name__)


class RemoteRewardError(RewardError):
    """The reward server cannot be reached, or answered something unusable (one-line message)."""


def encode_request(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None,
                   image_dtype: str = "float32") -> bytes:
    """images [B, 3, H, W] in [0, 1] (+ prompts, metadata) -> the safetensors body of ``POST /score``."""
    x = images.detach().float().cpu().clamp(0, 1)  # [B, 3, H, W]
    if image_dtype == "uint8":
        x = (x * 255).round().to(torch.uint8)  # [B, 3, H, W] 0..255, as a PNG would hold it
    else:
        x = x.to(IMAGE_DTYPES[image_dtype])
    header = {"format": WIRE_FORMAT, "prompts": json.dumps(list(prompts)),
              "metadata": json.dumps(None if metadata is None else list(metadata))}
    return save_safetensors({"images": x.contiguous()}, metadata=header)


def decode_request(body: bytes) -> tuple[Tensor, list[str], list[dict] | None]:
    """The server side of ``encode_request``: (images [B, 3, H, W] float32 in [0, 1], prompts, metadata).

    Raises ValueError with one line on a malformed body.
    """
    try:
        tensors = load_safetensors(body)
    except Exception as err:  # safetensors raises its own error types for a malformed file
        raise ValueError(f"body is not a safetensors file ({type(err).__name__}: {err})") from None
    # The string metadata sits in the file's JSON header (8-byte little-endian length, then the
    # header), under "__metadata__"; ``load`` has just checked the header is well formed.
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + size]).get("__metadata__") or {}
    if header.get("format") != WIRE_FORMAT:
        raise ValueError(f"format {header.get('format')!r}: expected {WIRE_FORMAT!r}")
    images = tensors.get("images")
    if images is None or images.ndim != 4 or images.shape[1] != 3:
        shape = None if images is None else tuple(images.shape)
        raise ValueError(f"expected a tensor 'images' [B, 3, H, W], got {shape}")
    if images.dtype == torch.uint8:
        images = images.float() / 255  # [B, 3, H, W]
    elif images.dtype in (torch.float16, torch.float32):
        images = images.float()
    else:
        raise ValueError(f"images dtype {images.dtype}: expected one of {sorted(IMAGE_DTYPES)}")
    prompts = json.loads(header.get("prompts", "null"))
    metadata = json.loads(header.get("metadata", "null"))
    B = images.shape[0]
    if not isinstance(prompts, list) or len(prompts) != B or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"'prompts' must be a JSON list of {B} strings")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != B
                                 or not all(isinstance(m, dict) for m in metadata)):
        raise ValueError(f"'metadata' must be null or a JSON list of {B} objects")
    return images, prompts, metadata


def scores_to_json(scores: Tensor) -> list[float | None]:
    """[B] -> JSON-safe numbers (a non-finite score becomes null)."""
    return [v if math.isfinite(v) else None for v in scores.detach().double().cpu().tolist()]


class RemoteReward(Reward):
    """A reward served by ``python -m pro_grpo_lightning.reward_server`` (see the module docstring).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` (``/score`` and ``/health`` are added).
        timeout: seconds one request may take (scoring included).
        retries: extra attempts after a connection failure, a timeout or a 502/503/504.
        backoff: seconds before the first retry; doubled each time.
        batch_size: images per request (None: all the images of a call in one request).
        image_dtype: "float32" (exact, 4 bytes a value), "float16" or "uint8" (rounded to 1/255 as
            a PNG would be; a quarter of the bytes).
        weight, name: see ``Reward`` (the name is the training side's; the server's is only shown).
    """

    default_name = "remote"

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int | None = None, image_dtype: str = "float32", weight: float = 1.0,
                 name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward.url must start with http:// or https://, got {url!r}")
        if timeout <= 0:
            raise ValueError(f"RemoteReward.timeout must be > 0 seconds, got {timeout}")
        if retries < 0 or backoff < 0:
            raise ValueError(f"RemoteReward.retries and backoff must be >= 0, got {retries} and {backoff}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"RemoteReward.batch_size must be None or >= 1, got {batch_size}")
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"RemoteReward.image_dtype must be one of {sorted(IMAGE_DTYPES)}, got {image_dtype!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size = batch_size
        self.image_dtype = image_dtype
        self._healthy = False

    def _request(self, path: str, body: bytes | None = None) -> dict[str, Any]:
        """One JSON answer, retrying what is worth retrying (see the module docstring)."""
        url = self.url + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning("RemoteReward %r: %s (%s); retry %d/%d in %.1f s", self.name, url, last, attempt,
                            self.retries, delay)
                time.sleep(delay)
            request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                             headers={"Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                try:
                    message = json.loads(err.read()).get("error", "")
                except (ValueError, AttributeError):
                    message = err.reason
                if err.code in RETRY_STATUS:
                    last = f"HTTP {err.code}: {message}"
                    continue
                raise RemoteRewardError(f"RemoteReward {self.name!r}: {url} answered HTTP {err.code}: "
                                        f"{message}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
        raise RemoteRewardError(f"RemoteReward {self.name!r}: no answer from {url} after {self.retries + 1} "
                                f"attempt(s) (last: {last}); is the reward server running?")

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (raises ``RemoteRewardError`` when it is down)."""
        return self._request("/health")

    def configure_model(self) -> None:
        """Check once that the server answers, so a wrong URL fails before the first rollout."""
        if not self._healthy:
            answer = self.health()
            if answer.get("status") != "ok":
                raise RemoteRewardError(f"RemoteReward {self.name!r}: {self.url}/health answered {answer}")
            self._healthy = True

    def score(self, images: Tensor, prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> Tensor:
        B = images.shape[0]
        step = self.batch_size or max(B, 1)
        out = []
        for i in range(0, B, step):  # requests, not samples: one per batch_size images
            chunk_meta = None if metadata is None else list(metadata[i:i + step])
            body = encode_request(images[i:i + step], prompts[i:i + step], chunk_meta, self.image_dtype)
            scores = self._request("/score", body).get("scores")
            n = min(step, B - i)
            if not isinstance(scores, list) or len(scores) != n:
                got = f"{len(scores)} scores" if isinstance(scores, list) else repr(scores)[:80]
                raise RemoteRewardError(f"RemoteReward {self.name!r}: {self.url}/score returned {got} for {n} images")
            out.append(torch.tensor([math.nan if v is None else float(v) for v in scores], dtype=torch.float32))
        return torch.cat(out).to(images.device) if out else images.new_zeros(0)  # [B]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, url={self.url!r}, image_dtype={self.image_dtype!r}"
