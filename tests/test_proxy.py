"""The fault proxy (loadtest/proxy.py): it forwards, a partition holds traffic, and closing it is quiet.

The quiet close was found by the bench's quick run under a loaded suite: closing the hub cancelled
connection handlers, and Python 3.11's stream server logged each as "Exception in callback" with a
traceback (it asks a cancelled task for its exception).
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.proxy import ProxyHub


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield "127.0.0.1", int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_holds_during_a_partition_and_closes_without_a_traceback(echo: tuple[str, int]) -> None:
    hub = ProxyHub()
    errors: list[dict[str, Any]] = []
    hub.loop.call_soon_threadsafe(hub.loop.set_exception_handler, lambda _loop, ctx: errors.append(ctx))
    link = hub.add("node-1", *echo)
    pumping = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    assert roundtrip(pumping, b"hello") == b"hello"
    hub.partition("node-1")
    deadline = time.monotonic() + 10
    while not link.partitioned:  # set on the hub's loop
        assert time.monotonic() < deadline, "the link never partitioned"
        time.sleep(0.01)
    held = socket.create_connection(("127.0.0.1", link.port), timeout=5)  # waits for the flow, unanswered
    pumping.sendall(b"lost?")
    pumping.settimeout(0.3)
    with pytest.raises(TimeoutError):
        pumping.recv(16)
    hub.heal("node-1")
    pumping.settimeout(5)
    assert pumping.recv(16) == b"lost?"  # held, not dropped: a cut cable, then the flow resumes
    hub.partition("node-1")  # close with one connection pumping and one held by a partition
    time.sleep(0.05)
    hub.close()
    pumping.close()
    held.close()
    assert errors == [], [str(e.get("message")) for e in errors]
