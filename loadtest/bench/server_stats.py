"""Count the operations a backend server executes, from the server's own counters.

The load benchmark must not trust the nodes' idea of what they sent (the
nodes are what is measured), so every count here comes from the server:

* Redis: ``INFO commandstats``, the sum of ``calls`` over all commands
  (``commands``). That sum includes the commands a Lua script runs inside the
  server, which would charge an atomic script by its body's length, so a
  ``MONITOR`` connection counts those inner calls (lines tagged ``lua``) and
  ``requests`` is commands minus inner calls: what clients sent. Our own
  ``INFO``, ``ECHO`` (a mark in the MONITOR stream) and ``MONITOR`` calls are left out.
* PostgreSQL: ``pg_stat_database`` ``xact_commit + xact_rollback`` of the
  database the nodes use (autocommit statements are one transaction each), read
  from a session on ``template1`` so our own queries count elsewhere.
  (``pg_stat_statements`` would need ``shared_preload_libraries`` and a
  restart of the launcher's server.) The server flushes these counters
  lazily (a busy session about every second, an idle one within ~10 s), so a
  window should be long next to that.
* etcd: the sum of ``grpc_server_handled_total`` on the client URL's
  ``/metrics`` (served there by default): finished RPCs, where a keepalive or a
  watch on a stream of its own is one. Scraping is HTTP, not gRPC: nothing of
  ours to subtract.

``requests`` is the figure the benchmark compares; ``commands`` is shown beside it.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Sample:
    """Cumulative counts at one instant."""

    at: float  # monotonic seconds
    requests: float
    commands: float


@dataclass(frozen=True)
class Rate:
    seconds: float
    requests: float
    commands: float

    @property
    def requests_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def commands_s(self) -> float:
        return self.commands / self.seconds if self.seconds > 0 else 0.0


class OpsCounter(Protocol):
    unit: str  # what one request is, for the report

    def sample(self) -> Sample: ...

    def close(self) -> None: ...


def rate(before: Sample, after: Sample) -> Rate:
    return Rate(after.at - before.at, after.requests - before.requests, after.commands - before.commands)


class _Monitor(threading.Thread):
    """A MONITOR connection that counts the commands Lua scripts run inside the server."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True, name="redis-monitor")
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.lua = 0
        self.ready = threading.Event()
        self.marks: dict[bytes, int] = {}
        self.marked = threading.Condition()
        self._closed = False

    def run(self) -> None:
        buf = b""
        self.sock.settimeout(None)
        with contextlib.suppress(OSError):
            while not self._closed:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    if line == b"+OK":
                        self.ready.set()
                    elif b" lua] " in line:
                        self.lua += 1
                    elif b'"baton-mark-' in line:
                        with self.marked:
                            self.marks[line.rsplit(b'"', 2)[-2]] = self.lua
                            self.marked.notify_all()

    def lua_at(self, mark: bytes, timeout: float = 5.0) -> int:
        """Inner script commands the server ran before it ran ``ECHO mark``."""
        with self.marked:
            if not self.marked.wait_for(lambda: mark in self.marks, timeout):
                raise RuntimeError("redis MONITOR fell behind by more than 5 s")
            return self.marks.pop(mark)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class RedisCounter:
    unit = "requests (commands minus those run inside Lua scripts), from INFO commandstats and MONITOR"

    def __init__(self, url: str) -> None:
        import redis

        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.client = redis.Redis(host=host, port=port, socket_timeout=5)
        self.client.ping()
        self.marks = 0
        self.monitor = _Monitor(host, port)
        self.monitor.start()
        if not self.monitor.ready.wait(5):
            raise RuntimeError(f"redis MONITOR on {host}:{port} did not answer")

    def sample(self) -> Sample:
        # ECHO a mark the MONITOR thread recognises, then read the counters at once: the inner
        # commands counted up to the mark are those the INFO right behind it includes
        self.marks += 1
        mark = f"baton-mark-{self.marks}".encode()
        pipe = self.client.pipeline(transaction=False)
        pipe.echo(mark)
        pipe.info("commandstats")
        _, stats = pipe.execute()
        at = time.monotonic()
        ours = ("cmdstat_info", "cmdstat_monitor", "cmdstat_ping", "cmdstat_echo")
        commands = sum(int(v["calls"]) for k, v in stats.items() if k not in ours)
        return Sample(at, commands - self.monitor.lua_at(mark), commands)

    def close(self) -> None:
        self.monitor.close()
        self.client.close()


class PostgresCounter:
    unit = "transactions (xact_commit + xact_rollback in pg_stat_database)"

    def __init__(self, url: str) -> None:
        import psycopg

        # sample from another database: our own queries then never count in the nodes' database
        parts = urlsplit(url.split("?", 1)[0])
        self.database = parts.path.strip("/") or "postgres"
        self.conn = psycopg.connect(parts._replace(path="/template1").geturl(), autocommit=True)

    def sample(self) -> Sample:
        row = self.conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                                (self.database,)).fetchone()
        total = float(row[0] if row and row[0] is not None else 0)
        return Sample(time.monotonic(), total, total)

    def close(self) -> None:
        self.conn.close()


_HANDLED = re.compile(r"^grpc_server_handled_total\{[^}]*\}\s+([0-9.eE+]+)", re.MULTILINE)


class EtcdCounter:
    unit = "gRPC calls (sum of grpc_server_handled_total on /metrics)"

    def __init__(self, url: str) -> None:
        endpoints = url.removeprefix("etcd://").split("?", 1)[0].split(",")
        self.urls = [f"http://{e}/metrics" for e in endpoints]
        self.sample()  # fails early when /metrics is not served there

    def sample(self) -> Sample:
        total = 0.0
        for url in self.urls:
            with urllib.request.urlopen(url, timeout=5) as resp:
                total += sum(float(v) for v in _HANDLED.findall(resp.read().decode()))
        return Sample(time.monotonic(), total, total)

    def close(self) -> None:
        pass


COUNTERS: dict[str, Callable[[str], OpsCounter]] = {
    "redis": RedisCounter, "postgres": PostgresCounter, "etcd": EtcdCounter}


def counter_for(kind: str, url: str) -> OpsCounter:
    """A server-side counter for ``kind``; KeyError for a backend without a server (file)."""
    return COUNTERS[kind](url)


def measure(counter: OpsCounter, seconds: float, tick: Callable[[float], None] | None = None) -> Rate:
    """Count over a window of ``seconds``, advancing ``tick`` by the seconds slept."""
    before = counter.sample()
    end = before.at + seconds
    ticked = 0.0
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.5, left))
        done = min(seconds, time.monotonic() - before.at)
        if tick is not None:
            tick(done - ticked)
        ticked = done
    if tick is not None and ticked < seconds:
        tick(seconds - ticked)
    return rate(before, counter.sample())
