"""A real HTTP server on 127.0.0.1 for tests (uvicorn in a thread), stopped after use."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run an ASGI ``app`` on a free loopback port; yields its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    """A port nothing listens on (for 'the server is down')."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc, url: str, *, timeout: float = 120) -> None:
    """Wait for a server started as the subprocess ``proc`` to answer ``GET url/health`` with
    200; fail with its stderr if it exits first, or after ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            if isinstance(err, bytes):
                err = err.decode(errors="replace")
            raise AssertionError(f"the server exited {proc.returncode}: {err}")
        assert time.monotonic() < deadline, f"the server at {url} did not start"
        time.sleep(0.2)
