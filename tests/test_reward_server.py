"""The reward server and its client against what a network hands them (the real ``RewardServer`` on
loopback, in a thread; raw sockets play the misbehaving peers): slow and idle connections, a
connection cap, a body limit, a token beyond loopback, one log line per request, a busy port, and
a client that refuses every unusable answer with one ``RemoteRewardError`` naming the URL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from pro_grpo_lightning.reward_server import DEFAULT_MAX_BODY_BYTES, RewardServer, check_binding
from pro_grpo_lightning.rewards.image_stats import Brightness
from pro_grpo_lightning.rewards.remote import RemoteReward, RemoteRewardError
from tests.cli_runs import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@contextmanager
def served(**kwargs):
    """A ``RewardServer`` of ``Brightness`` on a free loopback port, serving in a thread."""
    server = RewardServer(Brightness(), "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def raw(server, data: bytes) -> socket.socket:
    s = socket.create_connection(server.server_address[:2], timeout=10)
    s.sendall(data)
    return s


def answer(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_slow_clients_are_cut_off_and_connections_are_capped(capfd):
    with served(read_timeout=0.5, max_connections=2) as server:
        announce = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n" + b"0123456789"
        slow = [raw(server, announce) for _ in range(2)]  # each announces 1 MiB and sends 10 bytes
        time.sleep(0.1)
        t0 = time.monotonic()
        third = answer(raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert third.startswith(b"HTTP/1.1 503") and b"too many connections" in third
        assert time.monotonic() - t0 < 0.4  # refused at once, not queued behind the slow ones
        for s in slow:  # closed by the server once read_timeout passed, without an answer
            assert answer(s) == b""
        time.sleep(0.1)
        images = torch.rand(3, 3, 8, 8)
        assert torch.equal(RemoteReward(server.url)(images, ["a"] * 3), Brightness()(images, ["a"] * 3))
    log = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("reward_server: ")]
    assert sum("refused: all 2 connection slots busy (503)" in ln for ln in log) == 1
    assert sum('"POST /score HTTP/1.1" 408 closed: the body did not arrive within 0.5 s' in ln for ln in log) == 2
    assert sum('"POST /score HTTP/1.1" 200 3 images' in ln for ln in log) == 1  # one line per request, 200s too


def test_the_body_limit_is_announced_and_the_client_splits_to_fit(capfd):
    per_image = 3 * 8 * 8 * 4
    with served(max_body_bytes=(1 << 20) + 2 * per_image + 512) as server:
        s = raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        assert answer(s).startswith(b"HTTP/1.1 413")  # refused unread
        remote = RemoteReward(server.url)
        remote.configure_model()
        assert remote.max_body_bytes == server.max_body_bytes
        images = torch.rand(5, 3, 8, 8)
        # other batch shapes than in-process: a float32 mean reduced in another order (last-bit differences)
        torch.testing.assert_close(remote(images, ["a"] * 5), Brightness()(images, ["a"] * 5), rtol=1e-6, atol=0)
    log = capfd.readouterr().err
    assert log.count('"POST /score HTTP/1.1" 200 2 images') == 2 and log.count('200 1 images') == 1
    assert DEFAULT_MAX_BODY_BYTES == 8 * 3 * 1024 * 1024 * 4 + (1 << 20)  # 8 float32 images of 1024 px


def test_a_token_is_required_beyond_loopback_and_checked(monkeypatch):
    with pytest.raises(ValueError, match="--host 0.0.0.0: binding beyond loopback needs a token"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", "s3cret")
    out = subprocess.run([sys.executable, "-m", "pro_grpo_lightning.reward_server", "--reward",
                          "pro_grpo_lightning.rewards.image_stats.Brightness", "--host", "0.0.0.0", "--port", "0"],
                         cwd=ROOT, env={k: v for k, v in ENV.items() if k != "PRO_GRPO_REWARD_TOKEN"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0: binding beyond loopback needs a token (--token, or the environment variable "
        "PRO_GRPO_REWARD_TOKEN); clients send it with RemoteReward(token=...) or the same variable"]
    monkeypatch.delenv("PRO_GRPO_REWARD_TOKEN", raising=False)
    with served(token="s3cret") as server:
        with pytest.raises(RemoteRewardError, match=rf"{server.url}/health answered HTTP 401: missing or wrong token"):
            RemoteReward(server.url, retries=0).configure_model()
        with pytest.raises(RemoteRewardError, match="HTTP 401"):
            RemoteReward(server.url, token="wrong", retries=0)(torch.rand(1, 3, 4, 4), ["a"])
        assert RemoteReward(server.url, token="s3cret")(torch.ones(1, 3, 4, 4), ["a"]).tolist() == [1.0]
        monkeypatch.setenv("PRO_GRPO_REWARD_TOKEN", "s3cret")  # the client reads it too
        assert RemoteReward(server.url)(torch.ones(1, 3, 4, 4), ["a"]).tolist() == [1.0]


def test_a_busy_port_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pro_grpo_lightning.reward_server", "--reward",
                              "pro_grpo_lightning.rewards.image_stats.Brightness", "--port", str(port)],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"]


def test_the_client_deadline_bounds_a_dripping_server():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()

        def drip():  # answers one byte every 0.3 s, forever: never a socket timeout
            conn, _ = listener.accept()
            with conn:
                for b in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000:
                    if stop.is_set():
                        return
                    try:
                        conn.sendall(bytes([b]))
                    except OSError:
                        return
                    time.sleep(0.3)
        threading.Thread(target=drip, daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(RemoteRewardError) as err:
            RemoteReward(url, timeout=1, retries=0, deadline=1.5)(torch.rand(1, 3, 4, 4), ["a"])
        took = time.monotonic() - t0
        stop.set()
    assert took < 3 and f"no answer from {url}/score after 1 attempt(s)" in str(err.value)
    assert "deadline of 1.5 s passed" in str(err.value)


class Scripted(BaseHTTPRequestHandler):
    """Answers every request with the class's ``body`` (200)."""

    body = b""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("body, expected", [
    (b"<html>oops</html>", "answered b'<html>oops</html>', not JSON"),
    (b'"a string"', "answered 'a string': expected an object with a list 'scores'"),
    (b'{"scores": "1, 2"}', "answered {'scores': '1, 2'}: expected an object with a list 'scores'"),
    (b'{"scores": [0.5, [1]]}', "returned a non-numeric score [1] (list): expected numbers or null"),
    (b'{"scores": [0.5, "0.7"]}', "returned a non-numeric score '0.7' (str): expected numbers or null"),
    (b'{"scores": [true, false]}', "returned a non-numeric score True (bool): expected numbers or null"),
    (b'{"scores": [1, 2, 3]}', "returned 3 scores for 2 images"),
])
def test_every_unusable_answer_is_a_remote_reward_error_naming_the_url(body, expected):
    handler = type("Answer", (Scripted,), {"body": body})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(RemoteRewardError) as err:
            RemoteReward(url, retries=0)(torch.rand(2, 3, 4, 4), ["a", "b"])
    finally:
        server.shutdown()
        server.server_close()
    assert str(err.value) == f"RemoteReward 'remote': {url}/score {expected}"
    assert json  # the answers above are what json.loads makes of them
