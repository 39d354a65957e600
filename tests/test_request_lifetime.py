"""A served request's lifetime (issue 16): a client that disconnects frees the engine at the next token
(streamed or not), every request has a deadline, and `runtime serve` stops gracefully on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from runtime.engines import StreamResult
from runtime.server_file import read_server_file
from runtime.store import Store
from server import create_app
from server.serving import Deadline
from tests.test_server import serve_in_thread, tiny_config


class _HeldEngine:
    """The tiny engine whose streamed generation pauses after its first delta until `release` is set, and
    records whether the generation was stopped early (closed before it ended)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.first = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()
        self.stopped_early = False
        self.deltas = 0

    def stream_chat(self, *args: Any, **kwargs: Any) -> StreamResult:
        inner = self._engine.stream_chat(*args, **kwargs)

        def deltas() -> Iterator[str]:
            finished = False
            try:
                for delta in inner:
                    self.deltas += 1
                    yield delta
                    if not self.first.is_set():
                        self.first.set()
                        self.release.wait()
                finished = True
                return inner.generation
            finally:
                self.stopped_early = not finished
                inner.close()
                self.ended.set()

        return StreamResult(deltas())  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _status_count(url: str, status: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("runtime_http_requests_total{") and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_non_streamed_request_stops_generating_when_its_client_leaves(tiny_engine, tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    engine = _HeldEngine(tiny_engine)
    config = tiny_config(tmp_path, tiny_model_dir)
    config.engine.max_new_tokens = 400
    with Store(config.store_path) as store:
        app = create_app(config, engine=engine, store=store, background_learning=False)  # type: ignore[arg-type]
        with serve_in_thread(app) as url:
            host, port = url.removeprefix("http://").split(":")
            body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                               "max_tokens": 400}).encode()
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert engine.first.wait(120), "the generation never started"
            sock.close()  # the client gives up while its answer is being generated
            guard = time.monotonic() + 120
            while _status_count(url, "499") < 1:  # the server noticed (a guard, not a timing assertion)
                assert time.monotonic() < guard, "the server never noticed the client left"
                time.sleep(0.05)
            engine.release.set()
            assert engine.ended.wait(120)
    assert engine.stopped_early and engine.deltas < 400


def test_a_request_past_its_deadline_ends_with_504_and_its_generation_stops(tiny_engine, tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    engine = _HeldEngine(tiny_engine)
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        app = create_app(config, engine=engine, store=store, background_learning=False)  # type: ignore[arg-type]
        with serve_in_thread(app) as url:
            request = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 64}
            # The OpenAI SDK sends its timeout; here it is shorter than the server's engine.request_timeout_s.
            answer = httpx.post(url + "/v1/chat/completions", json=request,
                                headers={"X-Stainless-Timeout": "0.5"}, timeout=120)
            assert engine.first.is_set()  # it was generating (held) when the deadline passed
            engine.release.set()
            assert engine.ended.wait(120)
    assert answer.status_code == 504, answer.text
    error = answer.json()["error"]
    assert error["code"] == "deadline_exceeded" and "0.5 s" in error["message"]
    assert engine.stopped_early


def test_the_deadline_is_the_shorter_of_the_servers_and_the_clients() -> None:
    assert Deadline.for_request(600, "30").timeout_s == 30
    assert Deadline.for_request(10, "30").timeout_s == 10
    assert Deadline.for_request(10, "soon").timeout_s == 10  # unreadable: the server's
    assert Deadline.for_request(10, None).timeout_s == 10
    assert Deadline.for_request(10, "-1").timeout_s == 10


def test_a_second_signal_stops_at_once() -> None:
    from server.http_protocol import graceful_server, uvicorn_config

    server = graceful_server(uvicorn_config(object(), grace_s=5))
    assert server.config.timeout_graceful_shutdown == 5
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and not server.force_exit  # the first: graceful
    server.handle_exit(signal.SIGTERM, None)
    assert server.force_exit  # the second, of either kind: at once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_lets_a_running_answer_finish_flushes_the_log_and_exits(tmp_path: Path,
                                                                        tiny_model_dir: Path) -> None:
    config = tmp_path / "runtime.yaml"
    data = tmp_path / "data"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "model": {"name": str(tiny_model_dir)},
                                      "engine": {"device": "cpu", "num_threads": 1}}))
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(port), "--grace-s", "60",
         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        guard = time.monotonic() + 300
        while True:  # wait for start-up (a guard, not a timing assertion)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < guard, "the server did not start"
            time.sleep(0.2)
        assert read_server_file(data / "runtime.duckdb") is not None
        chunks: list[str] = []
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 200,
                "stream": True}) as response:
            lines = response.iter_lines()
            for line in lines:
                chunks.append(line)
                if line.startswith("data: ") and '"content"' in line:
                    proc.send_signal(signal.SIGTERM)  # mid-answer
                    break
            chunks.extend(lines)
        assert "data: [DONE]" in chunks  # the answer in flight finished within the grace period
        # uvicorn ends a graceful stop by re-raising the signal, so a service manager sees it (or exits 0).
        assert proc.wait(300) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert read_server_file(data / "runtime.duckdb") is None  # the address file is gone
    with Store(data / "runtime.duckdb", read_only=True) as store:
        assert any("Tell me a story." in json.dumps(i.messages) for i in store.recent_interactions(10))
