"""Fixtures that start real servers on free loopback ports.

Each server kind starts once per test session, lazily, and stops at the end.
Tests that stop or restart a server get their own (``private_server``). A
missing binary fails the test with the command that installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from loadtest.servers import Cluster, start_backend
from lock_backends import BackendUnavailable, LockBackend, from_url
from lock_backends.memory import drop_store
from lock_backends.registry import NAMES, SERVERS, SHARED

T = TypeVar("T")

#: Every backend, the in-memory reference included: the contract holds for all of them.
BACKENDS = list(NAMES)
SERVER_BACKENDS = list(SERVERS)
SHARED_BACKENDS = list(SHARED)

#: Per-operation timeout used in tests; well below the test TTLs.
OP_TIMEOUT = 0.5
#: TTL used by the contract tests. etcd rounds leases up to whole seconds (min 2 s here).
TTL = 2.0


class ServerPool:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clusters: dict[str, Cluster] = {}

    def get(self, kind: str) -> Cluster:
        if kind not in self.clusters:
            self.clusters[kind] = start_backend(kind, self.tmp / kind)
        return self.clusters[kind]

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.close()


def with_timeout(url: str, timeout: float = OP_TIMEOUT) -> str:
    return f"{url}{'&' if '?' in url else '?'}timeout={timeout}"


def _url(kind: str, request: pytest.FixtureRequest, servers: ServerPool, tmp_path: Path) -> str:
    if kind == "file":
        return with_timeout(f"file://{tmp_path / 'baton.lock'}")
    if kind == "memory":
        name = f"contract-{uuid.uuid4().hex[:10]}"
        request.addfinalizer(lambda: drop_store(name))
        return with_timeout(f"memory://{name}")
    return with_timeout(servers.get(kind).url)


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, servers: ServerPool, tmp_path: Path) -> str:
    """Every backend, the in-process reference included."""
    return _url(request.param, request, servers, tmp_path)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_backend_url(request: pytest.FixtureRequest, servers: ServerPool, tmp_path: Path) -> str:
    """Every backend several processes can share: for tests whose holder runs in a child process."""
    return _url(request.param, request, servers, tmp_path)


@pytest.fixture(params=SERVER_BACKENDS)
def private_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A server of its own, for tests that stop, restart or otherwise disturb it."""
    cluster = start_backend(request.param, tmp_path / request.param)
    yield cluster
    cluster.close()


@pytest.fixture
def lock_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[[str], LockBackend]]:
    """Factory of backend instances (each one a separate 'node'), closed after the test."""
    made: list[LockBackend] = []

    def make(url: str) -> LockBackend:
        backend = from_url(url)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        with contextlib.suppress(Exception):
            await backend.close()


async def eventually(what: str, op: Callable[[], Awaitable[T | None]], within: float,
                     every: float = 0.05) -> tuple[T, float]:
    """Retry ``op`` until it returns something other than None; return it and the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            result = await op()
        except BackendUnavailable:
            result = None
        if result is not None:
            return result, time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(every)
