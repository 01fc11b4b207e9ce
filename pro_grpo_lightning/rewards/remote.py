"""A reward scored by another process: ``RemoteReward`` is the client of ``reward_server``.

Run a reward where it fits (another environment, another GPU, another machine of the cluster) and
train against it over HTTP::

    pro-grpo serve-reward --reward my_pkg.scorers.OCRReward \\
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

``GET /health``: ``200 {"status": "ok", "name": ..., "reward": <class path>, "max_body_bytes": <limit>}``.

Client behaviour: each socket operation waits at most ``timeout`` seconds and a whole call at most
``deadline`` (retries and a server that drips its answer included); a connection failure, a
timeout or a 502/503/504 is retried ``retries`` times after ``backoff * 2**i`` seconds (each
retry logged as a warning), then ``RemoteRewardError`` is raised with one line naming the URL. Any
other error status is the server's answer (the reward refused the batch): raised at once with its
message. Every other failure is a ``RemoteRewardError`` naming the URL too: an answer that is not
JSON, not an object with a list of scores, another number of scores, or a score that is not a
number or null (a string, a boolean, a nested value). Non-finite scores come back as NaN, for the
training side's non-finite policy to handle like any reward's.

Security: the server requires a token (``Authorization: Bearer <token>``; ``--token`` or the
environment variable ``PRO_GRPO_REWARD_TOKEN`` on both sides) whenever it binds beyond loopback,
caps its connections, times out slow clients and refuses bodies past its limit (``/health``
announces it; the client splits its requests to fit).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.parse
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


#: the environment variable both sides read the shared token from (a command line is visible in ``ps``)
TOKEN_ENV = "PRO_GRPO_REWARD_TOKEN"


def parse_scores(answer: Any, n: int, where: str) -> list[float]:
    """The ``scores`` of a ``/score`` answer as n floats (null -> NaN); anything else (not an object,
    no list, another count, a string, a boolean, a nested value) raises ``RemoteRewardError``
    naming ``where`` (the reward and the URL)."""
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
        raise RemoteRewardError(f"{where} answered {_short(answer)}: expected an object with a list 'scores'")
    if len(scores) != n:
        raise RemoteRewardError(f"{where} returned {len(scores)} scores for {n} images")
    bad = next((v for v in scores if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))), None)
    if bad is not None:
        raise RemoteRewardError(f"{where} returned a non-numeric score {_short(bad)} ({type(bad).__name__}): "
                                f"expected numbers or null")
    return [math.nan if v is None else float(v) for v in scores]


def _short(value: Any) -> str:
    return repr(value)[:80]


class RemoteReward(Reward):
    """A reward served by ``python -m pro_grpo_lightning.reward_server`` (see the module docstring).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` (``/score`` and ``/health`` are added).
        timeout: seconds one request may wait for the server at any moment (connect, send, each read).
        retries: extra attempts after a connection failure, a timeout or a 502/503/504.
        backoff: seconds before the first retry; doubled each time.
        deadline: seconds one call (``score`` of a batch, or ``health``) may take in all, retries
            and a slowly dripping answer included (None: ``(retries + 1) * timeout`` plus the backoffs).
        batch_size: images per request (None: all the images of a call in one request, split to
            stay under the body limit the server announces in ``/health``).
        image_dtype: "float32" (exact, 4 bytes a value), "float16" or "uint8" (rounded to 1/255 as
            a PNG would be; a quarter of the bytes).
        token: the server's token (sent as ``Authorization: Bearer``); None: the environment
            variable ``PRO_GRPO_REWARD_TOKEN`` if set. A server bound beyond loopback requires one.
        weight, name: see ``Reward`` (the name is the training side's; the server's is only shown).
    """

    default_name = "remote"

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 deadline: float | None = None, batch_size: int | None = None, image_dtype: str = "float32",
                 token: str | None = None, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward.url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or (deadline is not None and deadline <= 0):
            raise ValueError(f"RemoteReward.timeout and deadline must be > 0 seconds, got {timeout} and {deadline}")
        if retries < 0 or backoff < 0:
            raise ValueError(f"RemoteReward.retries and backoff must be >= 0, got {retries} and {backoff}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"RemoteReward.batch_size must be None or >= 1, got {batch_size}")
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"RemoteReward.image_dtype must be one of {sorted(IMAGE_DTYPES)}, got {image_dtype!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.deadline = float(deadline) if deadline is not None else (
            (self.retries + 1) * self.timeout + sum(self.backoff * 2 ** i for i in range(self.retries)))
        self.batch_size = batch_size
        self.image_dtype = image_dtype
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.max_body_bytes: int | None = None  # the server's limit, from /health
        self._healthy = False

    def _attempt(self, url: str, body: bytes | None, until: float) -> tuple[int, bytes]:
        """One HTTP exchange: (status, body). Every socket operation waits at most ``timeout``, and
        a watchdog closes the connection at ``until`` (a server dripping bytes cannot hold it longer)."""
        parts = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=min(self.timeout, max(until - time.monotonic(), 1e-3)))
        watchdog = threading.Timer(max(until - time.monotonic(), 0.0), _close, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            headers = {"Content-Type": "application/octet-stream"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            conn.request("GET" if body is None else "POST", parts.path or "/", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            watchdog.cancel()
            conn.close()

    def _request(self, path: str, body: bytes | None = None) -> Any:
        """One JSON answer, retrying what is worth retrying (see the module docstring); every
        failure is a ``RemoteRewardError`` naming the URL."""
        url = self.url + path
        until = time.monotonic() + self.deadline
        last, made = "", 0
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                if time.monotonic() + delay >= until:
                    break
                log.warning("RemoteReward %r: %s (%s); retry %d/%d in %.1f s", self.name, url, last, attempt,
                            self.retries, delay)
                time.sleep(delay)
            made += 1
            try:
                status, data = self._attempt(url, body, until)
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, closed at the deadline
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                if time.monotonic() >= until:
                    last += f"; the call's deadline of {self.deadline:g} s passed"
                    break
                continue
            if status in RETRY_STATUS:
                last = f"HTTP {status}: {_error_text(data)}"
                continue
            if status >= 400:
                raise RemoteRewardError(f"RemoteReward {self.name!r}: {url} answered HTTP {status}: {_error_text(data)}")
            try:
                return json.loads(data)
            except ValueError:
                raise RemoteRewardError(f"RemoteReward {self.name!r}: {url} answered {data[:60]!r}, not JSON") from None
        raise RemoteRewardError(f"RemoteReward {self.name!r}: no answer from {url} after {made} "
                                f"attempt(s) (last: {last}); is the reward server running?")

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (raises ``RemoteRewardError`` when it is down)."""
        answer = self._request("/health")
        if not isinstance(answer, dict):
            raise RemoteRewardError(f"RemoteReward {self.name!r}: {self.url}/health answered {_short(answer)}")
        return answer

    def configure_model(self) -> None:
        """Check once that the server answers, so a wrong URL fails before the first rollout, and
        read the largest body it accepts."""
        if not self._healthy:
            answer = self.health()
            if answer.get("status") != "ok":
                raise RemoteRewardError(f"RemoteReward {self.name!r}: {self.url}/health answered {answer}")
            limit = answer.get("max_body_bytes")
            self.max_body_bytes = int(limit) if isinstance(limit, int) and not isinstance(limit, bool) else None
            self._healthy = True

    def preflight(self) -> None:
        """The server answers (``configure_model``'s check): before any model loads."""
        self.configure_model()

    def _step(self, images: Tensor) -> int:
        """Images per request: ``batch_size``, or as many as fit the server's body limit."""
        B = max(images.shape[0], 1)
        if self.batch_size is not None:
            return self.batch_size
        if self.max_body_bytes is None:
            return B
        per_image = images[0].numel() * torch.empty((), dtype=IMAGE_DTYPES[self.image_dtype]).element_size()
        return max(1, min(B, (self.max_body_bytes - (1 << 20)) // max(per_image, 1)))

    def score(self, images: Tensor, prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> Tensor:
        B = images.shape[0]
        step = self._step(images)
        out = []
        for i in range(0, B, step):  # requests, not samples: one per batch_size images
            chunk_meta = None if metadata is None else list(metadata[i:i + step])
            body = encode_request(images[i:i + step], prompts[i:i + step], chunk_meta, self.image_dtype)
            n = min(step, B - i)
            scores = parse_scores(self._request("/score", body), n, f"RemoteReward {self.name!r}: {self.url}/score")
            out.append(torch.tensor(scores, dtype=torch.float32))
        return torch.cat(out).to(images.device) if out else images.new_zeros(0)  # [B]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, url={self.url!r}, image_dtype={self.image_dtype!r}"


def _close(conn: http.client.HTTPConnection) -> None:
    """The deadline watchdog: shut the connection's socket so a blocked read returns at once."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _error_text(data: bytes) -> str:
    try:
        answer = json.loads(data)
    except ValueError:
        return repr(data[:60])
    return str(answer.get("error", "")) if isinstance(answer, dict) else _short(answer)
