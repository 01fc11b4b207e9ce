"""Serve any ``Reward`` over HTTP, for ``rewards.remote.RemoteReward`` to train against.

    pro-grpo serve-reward --reward <module.Class> [--init_args JSON] [--host 127.0.0.1] [--port 8000] \\
        [--device cuda] [--config server.yaml] [--print_config]

(also ``python -m pro_grpo_lightning serve-reward`` and ``python -m pro_grpo_lightning.reward_server``;
the options are ``serve``'s arguments, ``cli.CommandParser``.)

``--reward`` is an import path: a reward of this package (``pro_grpo_lightning.rewards.pickscore.PickScore``)
or the user's own (``my_pkg.scorers.GenEvalReward``, importable in the server's environment).
``--init_args`` is a mapping of its constructor's arguments (JSON or YAML). The reward loads its weights
(``configure_model``) once, before the server listens; requests are scored one at a time (a lock:
reward models are rarely thread-safe) under ``torch.no_grad()``. The first line printed is
``reward_server: listening on http://HOST:PORT`` (with the bound port, so ``--port 0`` picks a free
one). The wire format is in ``rewards/remote.py``'s docstring; it is plain data (safetensors and
JSON), nothing is unpickled.

Security (``RewardServer``): binding beyond loopback requires a token (``--token`` or, better, the
environment variable ``PRO_GRPO_REWARD_TOKEN``, which ``RemoteReward`` sends); at most
``--max_connections`` connections are served at once (more get 503); a connection must send its
whole request within ``--read_timeout`` seconds and is closed when idle that long; bodies past
``--max_body_bytes`` (default: the largest legitimate request, 8 float32 images of 1024 x 1024 plus
1 MiB) are refused unread; every request is logged in one line (client, request, status, images,
time). A busy port is one line before the reward's weights load.
"""

from __future__ import annotations

import hmac
import importlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from .errors import ConfigError, RewardError
from .rewards.base import Reward
from .rewards.remote import TOKEN_ENV, decode_request, scores_to_json


def load_reward(class_path: str, init_args: dict[str, Any] | None = None) -> Reward:
    """Import ``module.Class`` and build it; a one-line ``ConfigError`` when that is not a ``Reward``."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ConfigError(f"--reward {class_path!r}: expected an import path module.Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--reward {class_path!r}: cannot import it ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ConfigError(f"--reward {class_path!r} is not a subclass of pro_grpo_lightning.rewards.Reward")
    return cls(**(init_args or {}))


#: the largest legitimate request by default: 8 float32 images of 1024 x 1024 (the client splits
#: bigger batches to fit the limit ``/health`` announces) plus 1 MiB of prompts and metadata
DEFAULT_MAX_IMAGES, DEFAULT_MAX_SIDE = 8, 1024
DEFAULT_MAX_BODY_BYTES = DEFAULT_MAX_IMAGES * 3 * DEFAULT_MAX_SIDE ** 2 * 4 + (1 << 20)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_binding(host: str, token: str | None) -> None:
    """Refuse (one line) to bind beyond loopback without a token: the reward would be open to anyone
    on the network (and its model to anyone's images)."""
    if host not in LOOPBACK and not host.startswith("127.") and not token:
        raise ConfigError(f"--host {host}: binding beyond loopback needs a token (--token, or the environment "
                         f"variable {TOKEN_ENV}); clients send it with RemoteReward(token=...) or the same variable")


class RewardServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` around one reward (``/score``, ``/health``), hardened for a network.

    Args:
        reward: the reward to serve (``configure_model`` already called).
        host, port: where to listen (port 0: a free one).
        device: where the reward scores.
        max_body_bytes: the largest request body accepted (``DEFAULT_MAX_BODY_BYTES``: why that size).
        read_timeout: seconds a connection may take to send a whole request, and may stay idle
            between requests; slower connections are closed.
        max_connections: connections served at once; more are answered 503 and closed at once.
        token: required as ``Authorization: Bearer <token>`` on every request when set
            (``check_binding``: mandatory beyond loopback).
    """

    daemon_threads = True

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout: float = 30.0,
                 max_connections: int = 16, token: str | None = None) -> None:
        check_binding(host, token)
        self.reward = reward
        self.device = torch.device(device)
        self.max_body_bytes = int(max_body_bytes)
        self.read_timeout = float(read_timeout)
        self.token = token
        self.max_connections = int(max_connections)
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self.class_path = f"{type(reward).__module__}.{type(reward).__qualname__}"
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection while fewer than ``max_connections`` are open; past that, a 503."""
        if not self.slots.acquire(blocking=False):
            body = json.dumps({"error": "too many connections; retry later"}).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            sys.stderr.write(f"reward_server: {client_address[0]} refused: all {self.max_connections} connection "
                             f"slots busy (503)\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def score(self, body: bytes) -> tuple[list[float | None], int]:
        """(JSON-safe scores, number of images) of a request body."""
        images, prompts, metadata = decode_request(body)  # ValueError: the client's fault
        with self.lock, torch.no_grad():
            scores = self.reward(images.to(self.device), prompts, metadata)  # [B]
        return scores_to_json(scores), images.shape[0]


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # idle keep-alive and header reads: closed past it
        self.started = time.monotonic()
        self.note = ""
        super().setup()

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self._send(401, {"error": "missing or wrong token (Authorization: Bearer ...)"})
        return False

    def _read_body(self, length: int) -> bytes | None:
        """The body, if the whole of it arrives within ``read_timeout`` (a client dripping bytes
        cannot hold a thread longer); None (connection closed) otherwise."""
        until = time.monotonic() + self.server.read_timeout
        parts, left = [], length
        while left:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            self.connection.settimeout(remaining)
            try:
                chunk = self.rfile.read1(min(left, 1 << 20))
            except (TimeoutError, OSError):
                return None
            if not chunk:
                return None
            parts.append(chunk)
            left -= len(chunk)
        self.connection.settimeout(self.server.read_timeout)
        return b"".join(parts)

    def handle_one_request(self) -> None:
        self.started, self.note = time.monotonic(), ""
        super().handle_one_request()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._authorised():
            return
        if self.path != "/health":
            self._send(404, {"error": f"no such endpoint {self.path!r}: GET /health, POST /score"})
            return
        self._send(200, {"status": "ok", "name": self.server.reward.name, "reward": self.server.class_path,
                         "max_body_bytes": self.server.max_body_bytes})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        if self.path != "/score":
            self._send(404, {"error": f"no such endpoint {self.path!r}: GET /health, POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        limit = self.server.max_body_bytes
        if not 0 < length <= limit:
            self.close_connection = True  # the announced body is not read: the connection cannot go on
            self._send(413 if length else 411, {"error": f"Content-Length {length}: expected 1..{limit}"})
            return
        body = self._read_body(length)
        if body is None:
            self.close_connection = True
            self.note = f"closed: the body did not arrive within {self.server.read_timeout:g} s"
            self.log_request(408, 0)
            return
        try:
            scores, n = self.server.score(body)
        except ValueError as err:  # a malformed request
            self._send(400, {"error": str(err).splitlines()[0] if str(err) else type(err).__name__})
            return
        except RewardError as err:  # the reward refusing its inputs (its ValueError) or failing
            refused = isinstance(err.__cause__, ValueError)
            text = str(err.__cause__ if refused else err)
            self._send(400 if refused else 500, {"error": text.splitlines()[0] if text else type(err).__name__})
            return
        except Exception as err:  # the reward failed: report it, keep serving
            self._send(500, {"error": f"{type(err).__name__}: {err}".splitlines()[0]})
            return
        self.note = f"{n} images"
        self._send(200, {"scores": scores, "name": self.server.reward.name})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One line per request: client, request, status, what was scored, time taken."""
        took = (time.monotonic() - self.started) * 1000
        note = f" {self.note}" if self.note else ""
        self.log_message('"%s" %s%s %.0f ms', getattr(self, "requestline", "-"), str(code), note, took)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        sys.stderr.write(f"reward_server: {self.address_string()} {format % args}\n")


def serve(reward: str, init_args: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 8000,
          device: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout: float = 30.0,
          max_connections: int = 16, token: str | None = None) -> None:
    """Build ``reward`` with ``init_args``, load its weights, then serve it until interrupted; prints
    ``reward_server: listening on <url> ...`` first. Every check that needs no weights (the
    binding's token, the port) comes before the reward loads.

    Args:
        reward: import path of a Reward subclass, e.g. pro_grpo_lightning.rewards.pickscore.PickScore
            or my_pkg.scorers.MyReward (importable where the server runs).
        init_args: the reward's constructor arguments, a mapping (on the command line: JSON or YAML,
            --init_args '{"device": "cuda"}').
        host: interface to bind; beyond loopback (127.0.0.1, ::1, localhost) a token is required.
        port: where to listen; 0 picks a free port (printed on the first line).
        device: where the reward scores (default: cuda when available, else cpu).
        max_body_bytes: the largest request body accepted (default: 8 float32 images of 1024 x 1024
            plus 1 MiB); larger ones are refused unread.
        read_timeout: seconds a connection may take to send a whole request, or stay idle.
        max_connections: connections served at once; more are answered 503.
        token: required from clients as a bearer token (default: the environment variable
            PRO_GRPO_REWARD_TOKEN); mandatory beyond loopback. Prefer the environment variable:
            a command line is visible in ps.
    """
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_binding(host, token)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected 0 (a free port) to 65535")
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:  # a busy port: one line before the reward's weights load
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as err:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    finally:
        probe.close()
    built = load_reward(reward, init_args)
    built.configure_model()
    built.to(device).eval()
    server = RewardServer(built, host, port, device, max_body_bytes, read_timeout, max_connections, token)
    print(f"reward_server: listening on {server.url} ({built.name}: {server.class_path})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    """``pro-grpo serve-reward`` / ``python -m pro_grpo_lightning serve-reward`` /
    ``python -m pro_grpo_lightning.reward_server``: ``serve``'s arguments as options
    (``cli.CommandParser``: ``--config`` files of them, ``--print_config``, one-line errors)."""
    from .cli import CommandParser

    parser = CommandParser(serve, "pro-grpo serve-reward", "Serve a Reward over HTTP for RemoteReward to train "
                           "against (safetensors and JSON, nothing unpickled). Loopback only unless a token is "
                           "set. --config takes these settings as YAML (as --print_config writes them).")
    args = parser.parse(argv)
    serve(**{k: v for k, v in vars(args).items() if k != "config"})


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
