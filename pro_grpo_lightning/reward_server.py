"""Serve any ``Reward`` over HTTP, for ``rewards.remote.RemoteReward`` to train against.

    python -m pro_grpo_lightning.reward_server --reward <module.Class> [--init_args JSON] \\
        [--host 127.0.0.1] [--port 8000] [--device cuda]

``--reward`` is an import path: a reward of this package (``pro_grpo_lightning.rewards.pickscore.PickScore``)
or the user's own (``my_pkg.scorers.GenEvalReward``, importable in the server's environment).
``--init_args`` is a JSON object of its constructor's arguments. The reward loads its weights
(``configure_model``) once, before the server listens; requests are scored one at a time (a lock:
reward models are rarely thread-safe) under ``torch.no_grad()``. The first line printed is
``reward_server: listening on http://HOST:PORT`` (with the bound port, so ``--port 0`` picks a free
one). The wire format is in ``rewards/remote.py``'s docstring; it is plain data (safetensors and
JSON), nothing is unpickled. Bind to 127.0.0.1 (the default) unless the cluster's network is trusted:
the server has no authentication.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from .errors import OneLineParser
from .rewards.base import Reward
from .rewards.remote import decode_request, scores_to_json


def load_reward(class_path: str, init_args: dict[str, Any] | None = None) -> Reward:
    """Import ``module.Class`` and build it; a one-line ValueError when that is not a ``Reward``."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"--reward {class_path!r}: expected an import path module.Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--reward {class_path!r}: cannot import it ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ValueError(f"--reward {class_path!r} is not a subclass of pro_grpo_lightning.rewards.Reward")
    return cls(**(init_args or {}))


class RewardServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` around one reward (``/score``, ``/health``)."""

    daemon_threads = True

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
                 max_bytes: int = 1 << 30) -> None:
        self.reward = reward
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.class_path = f"{type(reward).__module__}.{type(reward).__qualname__}"
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body: bytes) -> list[float | None]:
        images, prompts, metadata = decode_request(body)  # ValueError: the client's fault
        with self.lock, torch.no_grad():
            scores = self.reward(images.to(self.device), prompts, metadata)  # [B]
        return scores_to_json(scores)


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/health":
            self._send(404, {"error": f"no such endpoint {self.path!r}: GET /health, POST /score"})
            return
        self._send(200, {"status": "ok", "name": self.server.reward.name, "reward": self.server.class_path})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._send(404, {"error": f"no such endpoint {self.path!r}: GET /health, POST /score"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= self.server.max_bytes:
            self._send(413 if length else 411, {"error": f"Content-Length {length}: expected 1..{self.server.max_bytes}"})
            return
        body = self.rfile.read(length)
        try:
            scores = self.server.score(body)
        except ValueError as err:  # a malformed request, or the reward refusing its inputs
            self._send(400, {"error": str(err).splitlines()[0] if str(err) else type(err).__name__})
            return
        except Exception as err:  # the reward failed: report it, keep serving
            self._send(500, {"error": f"{type(err).__name__}: {err}".splitlines()[0]})
            return
        self._send(200, {"scores": scores, "name": self.server.reward.name})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not str(code).startswith("2"):  # successful requests are the steady state: not logged
            super().log_request(code, size)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        sys.stderr.write(f"reward_server: {self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="pro-grpo serve-reward",
                                description="Serve a Reward over HTTP for RemoteReward.")
    p.add_argument("--reward", required=True, help="import path of a Reward subclass, e.g. "
                   "pro_grpo_lightning.rewards.pickscore.PickScore or my_pkg.scorers.MyReward")
    p.add_argument("--init_args", default="{}", help="JSON object of the reward's constructor arguments")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on the first line)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max_bytes", type=int, default=1 << 30, help="largest request body accepted")
    args = p.parse_args(argv)
    try:
        init_args = json.loads(args.init_args)
        if not isinstance(init_args, dict):
            raise ValueError("not an object")
    except ValueError as err:
        p.exit(2, f"reward_server: --init_args {args.init_args!r} must be a JSON object ({err})\n")
    try:
        reward = load_reward(args.reward, init_args)
        reward.configure_model()
    except (ValueError, TypeError, FileNotFoundError) as err:
        p.exit(2, f"reward_server: {err}\n")
    reward.to(args.device).eval()
    server = RewardServer(reward, args.host, args.port, args.device, args.max_bytes)
    print(f"reward_server: listening on {server.url} ({reward.name}: {server.class_path})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
