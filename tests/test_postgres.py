"""PostgreSQL-only behaviour: the idle-session trap, session death, hangs, retention, URLs.

The contract suite proves what every backend shares; these tests poke at what
only advisory locks on a server session can get wrong: a paused holder whose
session (and lock) outlives it, a re-entrant lock that one unlock does not free,
a holder row naming a session that is gone, a server that stops answering
mid-query.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from lock_backends import (
    BackendUnavailable,
    BackendURLError,
    BusyRun,
    CorruptValue,
    Holder,
    Lease,
    LockBackend,
    LockBackendError,
    RunQuery,
    RunRecord,
    Window,
    from_url,
    postgres,
    postgres_sql,
)
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
    assert await a.claim(lease, "job@1") is True  # idempotent per lease
    await a.record_many(lock_name, [RunRecord("job@1", lease.token, "a", time.time(), {"outcome": "ok"})])
    assert await a.claim(lease, "job@1") is True  # still ours, and its record stays
    assert [r.result for r in await a.runs(lock_name, RunQuery())] == [{"outcome": "ok"}]

    async def expired() -> bool | None:
        return True if not await a.runs(lock_name, RunQuery()) else None

    await eventually("claim expiry", expired, within=5, every=0.1)
    # an expired claim is free again: taken afresh, without the old result
    assert await a.claim(lease, "job@1") is True
    assert [(r.key, r.result) for r in await a.runs(lock_name, RunQuery())] == [("job@1", None)]
    assert [r.key for r in await a.unfinished(lock_name, 10)] == ["job@1"]


# -- claim windows under concurrency ----------------------------------------------------

US = 1_000_000


def now_us() -> int:
    return int(time.time() * US)


async def test_concurrent_window_claims_of_one_lease_never_shrink_it(pg_url: str, make_backend: Factory,
                                                                     lock_name: str) -> None:
    """Each statement computes the next window from the row it locked, never from an older snapshot."""
    nodes = [make_backend(pg_url) for _ in range(6)]
    lease = await nodes[0].acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    asks = [start + (i + 1) * 1000 for i in range(36)]
    random.shuffle(asks)
    answers = await asyncio.gather(*(nodes[i % 6].claim_window(lease, until, start)
                                     for i, until in enumerate(asks)))
    for asked, window in zip(asks, answers, strict=True):
        assert window is not None and window.owned_by(lease.token)
        assert window.since_us == start and window.until_us >= asked
    assert await nodes[1].claim_window(lease, start, start) == Window(lease.token, start, max(asks))


async def test_hand_back_and_window_statements_touch_only_their_lock(pg_url: str, make_backend: Factory,
                                                                     lock_name: str) -> None:
    a = make_backend(pg_url)
    other = f"{lock_name}-other"
    mine, theirs = await a.acquire(lock_name, Holder("a"), TTL), await a.acquire(other, Holder("a"), TTL)
    assert mine is not None and theirs is not None
    start = now_us()
    expiry = now_us() + 60 * US
    assert await a.claim_window(theirs, start + US, start, intents=["x@1"]) is not None
    assert await a.hand_back(theirs, start, busy=[BusyRun("x@1", "x", "a", theirs.token, expiry)]) is not None
    # the same keys under another lock name: another lock's intents, busy runs and mark
    window = await a.claim_window(mine, start + US, start, intents=["x@1"])
    assert window == Window(mine.token, start, start + US)
    assert [r.key for r in await a.unfinished(other, 10)] == ["x@1"]
    back = await a.hand_back(mine, start + US // 2, drop=["x@1"])
    assert back == Window(mine.token, start, start + US // 2, sealed=True)
    assert [r.key for r in await a.unfinished(other, 10)] == ["x@1"]
    assert await a.unfinished(lock_name, 10) == []


# -- garbage in the store --------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    "mark_since_us = mark_until_us + 1",  # a window that ends before it starts
    "mark_since_us = -5, mark_until_us = -1",
    "mark_token = -1",
])
async def test_a_corrupt_claim_mark_is_a_typed_error_and_the_node_recovers_once_repaired(
        pg_url: str, make_backend: Factory, lock_name: str, garbage: str) -> None:
    a = make_backend(pg_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    assert await a.claim_window(lease, start + US, start) is not None
    await sql(pg_url, f"UPDATE baton_fence SET {garbage} WHERE name = %s", lock_name)
    stored = await sql(pg_url, "SELECT mark_token, mark_since_us, mark_until_us, mark_sealed FROM baton_fence"
                               " WHERE name = %s", lock_name)
    attempts: list[Callable[[], Awaitable[Window | None]]] = [
        lambda: a.claim_window(lease, start + 2 * US, start, intents=["nightly@1"]),
        lambda: a.hand_back(lease, start + US // 2, drop=["nightly@1"]),
        lambda: a.claim_mark(lock_name)]
    for attempt in attempts:
        with pytest.raises(CorruptValue) as info:
            await attempt()
        assert info.value.key == f"baton_fence/{lock_name}"
        assert "postgres backend at 127.0.0.1:" in str(info.value)
    # nothing was acted on: the mark is as it was, no intent was written
    assert await sql(pg_url, "SELECT mark_token, mark_since_us, mark_until_us, mark_sealed FROM baton_fence"
                             " WHERE name = %s", lock_name) == stored
    assert await a.unfinished(lock_name, 10) == []
    # the lease itself is untouched, and once the row is repaired the node goes on by itself
    assert await a.renew(lease) is not None
    await sql(pg_url, "UPDATE baton_fence SET mark_token = %s, mark_since_us = %s, mark_until_us = %s"
                      " WHERE name = %s", lease.token, start, start + US, lock_name)
    window = await a.claim_window(lease, start + 2 * US, start, intents=["nightly@1"])
    assert window == Window(lease.token, start, start + 2 * US)
    assert [r.key for r in await a.unfinished(lock_name, 10)] == ["nightly@1"]


@pytest.mark.parametrize("garbage", ["[]", '"done"', "3", "true", "null"])
async def test_a_result_of_the_wrong_shape_is_skipped_in_listings_until_repaired(
        pg_url: str, make_backend: Factory, lock_name: str, garbage: str) -> None:
    a = make_backend(pg_url)
    base = time.time() - 10
    good = [RunRecord(f"job@{i}", 1, "a", base + i, {"outcome": "ok"}) for i in range(4)]
    await a.record_many(lock_name, good)
    await sql(pg_url, "UPDATE baton_claims SET result = %s::jsonb WHERE name = %s AND key = 'job@2'",
              garbage, lock_name)
    await sql(pg_url, "UPDATE baton_claims SET claimed_at = 'infinity' WHERE name = %s AND key = 'job@3'",
              lock_name)
    for query in (RunQuery(), RunQuery(job="job"), RunQuery(outcome="ok"), RunQuery(since=base - 1),
                  RunQuery(limit=1, before=base + 1.5)):
        runs = await a.runs(lock_name, query)
        assert [r.key for r in runs] == (["job@1", "job@0"] if query.limit > 1 else ["job@1"]), query
    assert await a.unfinished(lock_name, 10) == []  # garbage is not "no result"
    await sql(pg_url, "UPDATE baton_claims SET result = '{\"outcome\": \"ok\"}', claimed_at = to_timestamp(%s)"
                      " WHERE name = %s AND key IN ('job@2', 'job@3')", base + 2.5, lock_name)
    assert [r.key for r in await a.runs(lock_name, RunQuery())][:2] in (["job@2", "job@3"], ["job@3", "job@2"])
    assert len(await a.runs(lock_name, RunQuery(outcome="ok"))) == 4


@pytest.fixture
async def scratch_db(pg_url: str) -> AsyncIterator[str]:
    """A database of the test's own, for schema changes no other test may see; dropped afterwards."""
    dbname = f"baton_{uuid.uuid4().hex[:12]}"
    await sql(pg_url, f"CREATE DATABASE {dbname}")
    base, _, query = pg_url.partition("?")
    yield f"{base.rsplit('/', 1)[0]}/{dbname}?{query}"
    await sql(pg_url, f"DROP DATABASE {dbname} WITH (FORCE)")


async def test_values_the_schema_would_refuse_are_typed_errors_and_recovered_from(
        scratch_db: str, make_backend: Factory, lock_name: str) -> None:
    """Should the constraints ever be dropped (by hand, a restore), garbage is still no holder, no busy run,
    no token, no setting: a typed error naming the table and lock, until the row is repaired."""
    a = make_backend(scratch_db)
    lease = await a.acquire(lock_name, Holder("a", "http://a:1"), TTL)
    assert lease is not None
    start = now_us()
    assert await a.claim_window(lease, start + US, start) is not None
    assert await a.hand_back(lease, start + US // 2, busy=[BusyRun("j@1", "j", "a", lease.token, now_us() + 60 * US)])
    await sql(scratch_db, "ALTER TABLE baton_fence ALTER node_id DROP NOT NULL")
    await sql(scratch_db, "ALTER TABLE baton_busy ALTER token DROP NOT NULL")
    await sql(scratch_db, "UPDATE baton_fence SET node_id = NULL WHERE name = %s", lock_name)
    await sql(scratch_db, "UPDATE baton_busy SET token = NULL WHERE name = %s", lock_name)
    with pytest.raises(CorruptValue) as holder:
        await a.leader(lock_name)
    assert holder.value.key == f"baton_fence/{lock_name}"
    await a.release(lease)
    b = make_backend(scratch_db)
    new = await b.acquire(lock_name, Holder("b"), TTL)
    assert new is not None and new.token > lease.token
    with pytest.raises(CorruptValue) as busy:
        await b.claim_window(new, start + 2 * US, start)
    assert busy.value.key == f"baton_busy/{lock_name}"
    await sql(scratch_db, "UPDATE baton_busy SET token = %s WHERE name = %s", lease.token, lock_name)
    window = await b.claim_window(new, start + 2 * US, start)
    assert window is not None and window.owned_by(new.token) and [r.key for r in window.busy] == ["j@1"]
    assert await b.leader(lock_name) == Holder("b")
    # a fencing token that is none: no lease under it, and the lock is left free
    await b.release(new)
    await sql(scratch_db, "ALTER TABLE baton_fence ALTER token DROP NOT NULL")

    async def free() -> bool | None:
        return True if await a.leader(lock_name) is None else None

    for garbage in (None, -3):
        await sql(scratch_db, "UPDATE baton_fence SET token = %s WHERE name = %s", garbage, lock_name)
        with pytest.raises(CorruptValue, match="fencing token"):
            await b.acquire(lock_name, Holder("b"), TTL)
        await eventually("the lock given up with its session", free, within=3)
    await sql(scratch_db, "UPDATE baton_fence SET token = %s WHERE name = %s", new.token, lock_name)
    again = await a.acquire(lock_name, Holder("a"), TTL)
    assert again is not None and again.token == new.token + 1
    # a setting that is none
    await sql(scratch_db, "ALTER TABLE baton_settings ALTER value DROP NOT NULL")
    await b.set_setting(lock_name, "paused:x", "1")
    await sql(scratch_db, "UPDATE baton_settings SET value = NULL WHERE name = %s", lock_name)
    with pytest.raises(CorruptValue) as setting:
        await b.settings(lock_name)
    assert setting.value.key == f"baton_settings/{lock_name}"
    await b.set_setting(lock_name, "paused:x", "1")
    assert await b.settings(lock_name) == {"paused:x": "1"}


# -- the schema --------------------------------------------------------------------------------

# What the first release created (lock_backends/postgres.py before claim windows), verbatim.
FIRST_RELEASE_SCHEMA = (
    """CREATE TABLE baton_fence (name text PRIMARY KEY, token bigint NOT NULL, node_id text NOT NULL,
        url text NOT NULL DEFAULT '', holder_pid integer, acquired_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE baton_claims (name text NOT NULL, key text NOT NULL, token bigint NOT NULL,
        node_id text NOT NULL, claimed_at timestamptz NOT NULL, result jsonb, expires_at timestamptz NOT NULL,
        id bigint GENERATED ALWAYS AS IDENTITY, PRIMARY KEY (name, key))""",
    "CREATE INDEX baton_claims_recent ON baton_claims (name, claimed_at DESC, id DESC)",
    "CREATE INDEX baton_claims_expiry ON baton_claims (expires_at)",
    "CREATE TABLE baton_settings (name text NOT NULL, key text NOT NULL, value text NOT NULL, PRIMARY KEY (name, key))",
)


async def test_a_database_with_the_first_release_schema_is_upgraded_on_first_use(
        scratch_db: str, make_backend: Factory, lock_name: str) -> None:
    for statement in FIRST_RELEASE_SCHEMA:
        await sql(scratch_db, statement)
    await sql(scratch_db, "INSERT INTO baton_fence (name, token, node_id) VALUES (%s, 7, 'old')", lock_name)
    base = time.time() - 60
    for i, (key, result) in enumerate([("a_b@1", '{"outcome": "ok"}'), ("axb@2", '{"outcome": "error"}'),
                                       ("a%b@3", None)]):
        await sql(scratch_db, "INSERT INTO baton_claims (name, key, token, node_id, claimed_at, result, expires_at)"
                              " VALUES (%s, %s, 7, 'old', to_timestamp(%s), %s::jsonb, now() + interval '1 day')",
                  lock_name, key, base + i, result)
    # two nodes start at once on the old schema: one upgrades it, the other waits for it
    a, b = make_backend(scratch_db), make_backend(scratch_db)
    assert list(await asyncio.gather(a.leader(lock_name), b.leader(lock_name))) == [None, None]
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None and lease.token == 8  # the old fence row's token goes on
    start = now_us()
    window = await a.claim_window(lease, start + US, start, intents=["a_b@9"])
    assert window == Window(8, start, start + US)
    assert [r.key for r in await b.runs(lock_name, RunQuery(job="a_b"))] == ["a_b@9", "a_b@1"]
    assert [r.key for r in await b.runs(lock_name, RunQuery(job="a%b"))] == ["a%b@3"]
    assert [r.key for r in await b.runs(lock_name, RunQuery(outcome="error"))] == ["axb@2"]
    assert [r.key for r in await b.unfinished(lock_name, 10)] == ["a_b@9", "a%b@3"]
    columns = await sql(scratch_db, "SELECT column_name FROM information_schema.columns"
                                    " WHERE table_name = 'baton_fence' AND column_name LIKE 'mark%%'")
    assert sorted(str(c) for (c,) in columns) == ["mark_sealed", "mark_since_us", "mark_token", "mark_until_us"]


async def test_an_upgrade_is_not_bounded_by_the_operation_timeout(scratch_db: str, make_backend: Factory,
                                                                   lock_name: str) -> None:
    """Index builds over a large table take what they take: the operation waiting for them gets its own
    timeout after them (here another node holds the schema lock, as while it upgrades a large table)."""
    for statement in FIRST_RELEASE_SCHEMA:
        await sql(scratch_db, statement)
    a = make_backend(scratch_db)
    url = scratch_db.split("?", 1)[0]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(%s, %s)", postgres_sql._SCHEMA_LOCK)
        first = asyncio.create_task(a.leader(lock_name))
        await asyncio.sleep(OP_TIMEOUT * 3)
        assert not first.done()
    assert await asyncio.wait_for(first, 30) is None  # the other gave up: this one upgraded, then answered
    assert await sql(scratch_db, "SELECT to_regclass('baton_busy') IS NOT NULL") == [(True,)]


async def test_tables_dropped_under_a_running_node_are_recreated_by_its_next_operation(
        scratch_db: str, make_backend: Factory, lock_name: str) -> None:
    a = make_backend(scratch_db)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    assert await a.claim_window(lease, start + US, start) is not None
    await sql(scratch_db, "DROP TABLE baton_busy")
    with pytest.raises(LockBackendError, match="baton_busy"):
        await a.claim_window(lease, start + 2 * US, start)
    assert await a.claim_window(lease, start + 2 * US, start) == Window(lease.token, start, start + 2 * US)
    await sql(scratch_db, "ALTER TABLE baton_fence DROP COLUMN mark_sealed")
    with pytest.raises(LockBackendError, match="mark_sealed"):
        await a.hand_back(lease, start + US)
    assert await a.claim_window(lease, start + 3 * US, start + US) == Window(lease.token, start, start + 3 * US)


async def test_a_page_ends_with_every_run_at_its_last_instant(pg_url: str, make_backend: Factory,
                                                              lock_name: str) -> None:
    """RunQuery: runs at the cursor's instant are never skipped by the next page (``before`` excludes it)."""
    a = make_backend(pg_url)
    at = time.time() - 10
    await a.record_many(lock_name, [RunRecord(f"job@{i}", 1, "a", at + i // 4, {"outcome": "ok"}) for i in range(12)])
    seen: list[str] = []
    before: float | None = None
    pages = []
    while True:
        page = await a.runs(lock_name, RunQuery(limit=5, before=before))
        if not page:
            break
        pages.append(len(page))
        seen += [r.key for r in page]
        before = page[-1].claimed_at
    assert pages == [8, 4]  # three instants of four runs: a page of five ends with all of the second
    assert sorted(seen) == sorted(f"job@{i}" for i in range(12))


async def test_listings_walk_an_index_whatever_the_retention(pg_url: str, make_backend: Factory,
                                                             lock_name: str) -> None:
    """Every listing is an ordered index scan that stops at its page: many finished runs cost nothing."""
    a = make_backend(pg_url)
    await a.record_many(lock_name, [RunRecord("warm@1", 1, "a", time.time(), {"outcome": "ok"})])
    await sql(pg_url, """
        INSERT INTO baton_claims (name, key, token, node_id, claimed_at, result, expires_at)
        SELECT %s, 'job' || (i %% 20) || '@' || i, 1, 'a', now() - i * interval '1 second',
            jsonb_build_object('outcome', CASE WHEN i %% 500 = 0 THEN 'error' ELSE 'ok' END),
            now() + interval '1 hour'
        FROM generate_series(1, 30000) AS i""", lock_name)
    await sql(pg_url, "ANALYZE baton_claims")
    expected = {RunQuery(): "baton_claims_recent", RunQuery(job="job7"): "baton_claims_job",
                RunQuery(outcome="error"): "baton_claims_outcome",
                RunQuery(since=time.time() - 600, before=time.time() - 60): "baton_claims_recent"}
    for query, index in expected.items():
        params = {"name": lock_name, "limit": 50, "job": query.job, "outcome": query.outcome,
                  "since": query.since, "before": query.before}
        plan = await explain(pg_url, postgres_sql.listing(query), params)
        assert f"Index Scan using {index}" in plan and "Seq Scan" not in plan and "Bitmap" not in plan, plan
        assert len(await a.runs(lock_name, RunQuery(limit=50, job=query.job, outcome=query.outcome,
                                                      since=query.since, before=query.before))) == 50
    plan = await explain(pg_url, postgres_sql.UNFINISHED, {"name": lock_name, "limit": 50})
    assert "Index Scan using baton_claims_open" in plan, plan
    await sql(pg_url, "DELETE FROM baton_claims WHERE name = %s", lock_name)


async def explain(url: str, query: str, params: dict[str, object]) -> str:
    async with await psycopg.AsyncConnection.connect(url.split("?", 1)[0], autocommit=True) as conn:
        cur = await conn.execute("EXPLAIN " + query, params, prepare=False)
        return "\n".join(str(row[0]) for row in await cur.fetchall())


# -- run records --------------------------------------------------------------------------------

async def test_record_batches_keep_the_last_of_a_key_and_store_what_jsonb_refuses(
        pg_url: str, make_backend: Factory, lock_name: str) -> None:
    a = make_backend(pg_url)
    at = time.time()
    await a.record_many(lock_name, [
        RunRecord("job@1", 3, "a", at, {"outcome": "error", "error": "first"}),
        RunRecord("job@1", 3, "a", at, {"outcome": "ok"}),  # the same key again: the last one wins
        RunRecord("job@2", 3, "a", at - 1, {"outcome": "error", "error": "bad \x00 byte \ud800 half"}),
        RunRecord("job@3", 3, "a", at - 2, None),  # no result: an intent
    ])
    runs = {r.key: r for r in await a.runs(lock_name, RunQuery())}
    assert runs["job@1"].result == {"outcome": "ok"}
    assert runs["job@2"].result == {"outcome": "error", "error": "bad \ufffd byte ? half"}
    assert runs["job@3"].result is None and [r.key for r in await a.unfinished(lock_name, 5)] == ["job@3"]
    with pytest.raises(ValueError):  # refused before anything is written
        await a.record_many(lock_name, [RunRecord("job@4", 3, "a", at, {"outcome": "ok", "x": math.nan})])


async def test_a_batch_of_five_thousand_records_goes_in_one_statement(servers: ServerPool, make_backend: Factory,
                                                                     lock_name: str) -> None:
    """Half of them over claims, one a busy run. What it costs is measured in ``record_many``'s docstring:
    the timeout here is generous, as on a shared test machine a bound on the wall clock measures the neighbours."""
    a = make_backend(with_timeout(servers.get("postgres").url, 5.0))
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    keys = [f"job{i % 50}@{i}" for i in range(5000)]
    assert len(await a.claim_many(lease, keys[::2])) == 2500
    start = now_us()
    assert await a.claim_window(lease, start + US, start) is not None
    busy = [BusyRun(keys[7], "job7", "a", lease.token, now_us() + 60 * US)]
    assert await a.hand_back(lease, start, busy=busy) is not None
    base = time.time() - 5000
    await a.record_many(lock_name, [RunRecord(key, lease.token, "a", base + i,
                                              {"outcome": "ok", "duration": 0.25, "error": None, "note": "x" * 40})
                                    for i, key in enumerate(keys)])
    assert await a.unfinished(lock_name, 10) == []
    job7 = await a.runs(lock_name, RunQuery(limit=1000, job="job7"))
    assert [r.key for r in job7] == [f"job7@{i}" for i in range(4957, 0, -50)]
    assert all(r.result is not None and r.result["duration"] == 0.25 for r in job7)
    await a.release(lease)
    successor = make_backend(with_timeout(servers.get("postgres").url, 5.0))
    new = await successor.acquire(lock_name, Holder("b"), TTL)
    assert new is not None
    window = await successor.claim_window(new, start + US, start)
    assert window is not None and window.busy == ()  # the record ended the busy run


async def test_expired_runs_are_purged_in_bounded_batches(servers: ServerPool, make_backend: Factory,
                                                          lock_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = with_timeout(servers.get("postgres").url + "?claim_retention=0.5")
    monkeypatch.setattr(postgres, "PURGE_BATCH", 10)
    a = make_backend(url)
    old = time.time() - 5  # already past the retention
    await a.record_many(lock_name, [RunRecord(f"old@{i}", 1, "a", old, {"outcome": "ok"}) for i in range(25)])

    async def count(prefix: str) -> int:
        [(found,)] = await sql(url, "SELECT count(*) FROM baton_claims WHERE name = %s AND key LIKE %s",
                               lock_name, prefix + "@%")
        assert isinstance(found, int)
        return found

    async def purged() -> bool | None:
        # each batch written also deletes up to PURGE_BATCH expired rows (of any lock), a full one calls for more
        await a.record_many(lock_name, [RunRecord("new@1", 1, "a", time.time(), {"outcome": "ok"})])
        return True if await count("old") == 0 else None

    await eventually("expired rows purged", purged, within=10, every=0.05)
    assert await count("new") == 1


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
