"""PostgreSQL-only behaviour: the idle-session trap, session death, hangs, retention, URLs.

The contract suite proves what every backend shares; these tests poke at what
only advisory locks on a server session can get wrong: a paused holder whose
session (and lock) outlives it, a re-entrant lock that one unlock does not free,
a holder row naming a session that is gone, a server that stops answering
mid-query.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from lock_backends import BackendUnavailable, BackendURLError, Holder, Lease, LockBackend, from_url
from lock_backends.postgres import lock_key
from tests.conftest import OP_TIMEOUT, TTL, ServerPool, eventually, with_timeout

Factory = Callable[[str], LockBackend]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg_url(servers: ServerPool) -> str:
    return with_timeout(servers.get("postgres").url)


async def sql(url: str, query: str, *params: object) -> list[tuple[object, ...]]:
    """A query on a connection of the test's own, outside any backend instance."""
    async with await psycopg.AsyncConnection.connect(url.split("?", 1)[0], autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


def session_pid(lease: Lease) -> int:
    assert lease.handle.startswith("pid:"), lease.handle
    return int(lease.handle.removeprefix("pid:"))


async def test_contender_session_ended_by_idle_timeout_is_reopened(pg_url: str, make_backend: Factory,
                                                                   lock_name: str) -> None:
    a = make_backend(pg_url)
    first = await a.acquire(lock_name, Holder("a"), 1.0)
    assert first is not None
    await a.release(first)
    pid = session_pid(first)

    async def gone() -> bool | None:
        rows = await sql(pg_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid)
        return True if not rows else None

    await eventually("idle session ended by the server", gone, within=10, every=0.1)
    again = await a.acquire(lock_name, Holder("a"), 1.0)
    assert again is not None and again.token > first.token
    assert session_pid(again) != pid


# -- sessions, not rows, decide who holds ---------------------------------------------

async def test_reacquire_does_not_stack_the_advisory_lock(pg_url: str, make_backend: Factory,
                                                          lock_name: str) -> None:
    a, b = make_backend(pg_url), make_backend(pg_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    for _ in range(3):
        assert await a.acquire(lock_name, Holder("a"), TTL) is None
    await a.release(lease)  # one unlock must free it: a stacked lock would stay held
    assert await b.acquire(lock_name, Holder("b"), TTL) is not None


async def test_holder_session_death_is_seen_at_once(pg_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(pg_url), make_backend(pg_url)
    lease = await a.acquire(lock_name, Holder("a"), 30.0)
    assert lease is not None
    assert await a.claim(lease, "before")
    waiter = asyncio.create_task(b.wait_for_change(lock_name, 20.0))
    await asyncio.sleep(0.3)
    killed_at = time.monotonic()
    assert await sql(pg_url, "SELECT pg_terminate_backend(%s)", session_pid(lease)) == [(True,)]
    # the waiter is queued behind the lock inside the server, and let go as the session ends
    await asyncio.wait_for(waiter, 10)
    assert time.monotonic() - killed_at < 1.0
    # the fence row still names a, with a's token, but its session no longer holds the lock
    assert await b.leader(lock_name) is None
    assert await a.claim(lease, "after") is False
    assert await a.renew(lease) is None
    new = await b.acquire(lock_name, Holder("b"), TTL)
    assert new is not None and new.token > lease.token


async def test_waiting_followers_wake_on_release_and_leave_no_lock_behind(pg_url: str, make_backend: Factory,
                                                                          lock_name: str) -> None:
    a, b, c = make_backend(pg_url), make_backend(pg_url), make_backend(pg_url)
    lease = await a.acquire(lock_name, Holder("a"), 30.0)
    assert lease is not None
    waiters = [asyncio.create_task(x.wait_for_change(lock_name, 20.0)) for x in (b, c)]
    await asyncio.sleep(0.3)
    assert not any(w.done() for w in waiters), "a wait returned while the holder lived"
    released_at = time.monotonic()
    await a.release(lease)
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert time.monotonic() - released_at < 1.0
    # the waits' shared locks ended with their statements: a follower can take the lock
    new, _ = await eventually("b acquires", lambda: b.acquire(lock_name, Holder("b"), TTL), within=3.0)
    assert new.token > lease.token
    assert await sql(pg_url, f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock'"
                             f" AND objid::bigint = {lock_key(lock_name) & 0xFFFF_FFFF}") == [(0,)]


async def test_a_wait_ends_at_its_timeout_while_the_holder_lives(pg_url: str, make_backend: Factory,
                                                                lock_name: str) -> None:
    a, b = make_backend(pg_url), make_backend(pg_url)
    assert await a.acquire(lock_name, Holder("a"), 30.0) is not None
    started = time.monotonic()
    await b.wait_for_change(lock_name, 0.5)
    assert 0.45 <= time.monotonic() - started < 3.0
    assert await b.leader(lock_name) == Holder("a")
    assert await b.acquire(lock_name, Holder("b"), TTL) is None


async def test_server_backend_hang_is_bounded_and_drops_the_session(pg_url: str, make_backend: Factory,
                                                                    lock_name: str) -> None:
    a, b = make_backend(pg_url), make_backend(pg_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    pid = session_pid(lease)
    os.kill(pid, signal.SIGSTOP)  # the server process serving a's lock session stops answering
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            await a.renew(lease)
        assert time.monotonic() - start < OP_TIMEOUT + 0.5
        assert "postgres" in str(info.value) and "timed out" in str(info.value)
        # the session was discarded: the lease is gone for good, answered without the server
        start = time.monotonic()
        assert await a.renew(lease) is None
        assert time.monotonic() - start < 0.1
    finally:
        os.kill(pid, signal.SIGCONT)
    # the discarded socket ends the server session, and with it the lock
    new, _ = await eventually("acquire after the hung session was dropped",
                              lambda: b.acquire(lock_name, Holder("b"), TTL), within=TTL * 2)
    assert new.token > lease.token


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_silent_server_fails_within_timeout(black_hole: int, make_backend: Factory, lock_name: str) -> None:
    backend = make_backend(with_timeout(f"postgresql://postgres@127.0.0.1:{black_hole}/postgres"))
    for op in (lambda: backend.acquire(lock_name, Holder("a"), TTL), lambda: backend.leader(lock_name)):
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            await op()
        assert time.monotonic() - start < OP_TIMEOUT + 0.5
        assert f"127.0.0.1:{black_hole}/postgres" in str(info.value)
    start = time.monotonic()
    await backend.wait_for_change(lock_name, 1.0)  # a dead server is waited out, not raised
    assert 0.9 <= time.monotonic() - start < 1.0 + OP_TIMEOUT + 0.5


# -- claims and URLs -------------------------------------------------------------------

async def test_expired_claims_disappear_and_can_be_claimed_again(servers: ServerPool, make_backend: Factory,
                                                                 lock_name: str) -> None:
    url = with_timeout(servers.get("postgres").url + "?claim_retention=0.5")
    a = make_backend(url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    assert await a.claim(lease, "job@1") is True
    assert await a.claim(lease, "job@1") is False

    async def expired() -> bool | None:
        return True if not await a.runs(lock_name) else None

    await eventually("claim expiry", expired, within=5, every=0.1)
    assert await a.claim(lease, "job@1") is True
    assert [r.key for r in await a.runs(lock_name)] == ["job@1"]


def test_url_forms() -> None:
    backend = from_url("postgresql://baton:s3cret@db.internal:6543/locks?timeout=0.3&sslmode=disable")
    assert backend.kind == "postgres"
    assert backend.address == "db.internal:6543/locks"
    assert "s3cret" not in repr(backend)
    assert from_url("postgres://127.0.0.1/postgres").address == "127.0.0.1:5432/postgres"


@pytest.mark.parametrize("url", [
    "postgresql://", "postgresql:///postgres", "postgresql://h:port/db", "postgresql://h/db?bogus=1",
    "postgresql://h/a/b", "postgresql://h/db?timeout=0",
])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(BackendURLError):
        from_url(url)
