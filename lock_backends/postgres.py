"""PostgreSQL backend: session advisory locks, a fence row per lock, claim windows, followers in the lock queue.

The lock is ``pg_try_advisory_lock(key)`` taken on a connection dedicated to
one lock name, so the lock lives exactly as long as that server session. The
fencing token is a row in ``baton_fence`` bumped in the same statement that
takes the lock, together with the holder's backend pid: "who leads" is then
"the fence row whose pid is granted the advisory lock right now", which no
crash can leave stale.

A follower waits for a change inside the server, on its own lock session:
``pg_advisory_xact_lock_shared(key)`` queues behind the holder's exclusive
lock and is granted the moment that lock goes, by release or by the end of
the holder's session (a crash, or the idle timeout below), and, taken in a
statement of its own, lets go again as the statement ends. So a waiting
follower costs the server one statement per wait and sees a crash at once,
with no polling (an earlier version polled twice a second beside LISTEN).

The trap: a paused (SIGSTOP) or cut-off holder keeps its session, and with it
the lock, for as long as the server sees a healthy TCP peer, which for a
stopped process is forever. So the lock connection sets
``idle_session_timeout`` to the TTL (and TCP keepalives): a holder that stops
renewing loses its session, and the lock, about one TTL after its last renew.
Renews therefore must come more often than the TTL, which the election loop
guarantees. A contender's connection killed the same way is reopened on the
next acquire.

The URL must reach PostgreSQL directly or through a session-pooling proxy: a
transaction-pooling PgBouncer would hand the session, and its lock, to others.

The backend is three modules: this one (the URL, the lease and the protocol
methods), ``postgres_sessions`` (opening, bounding and dropping sessions, and
translating errors) and ``postgres_sql`` (the tables, their migration and
every statement, with why each is written as it is: how ``claim_window`` is
atomic, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo

from lock_backends import clock
from lock_backends import postgres_sql as sql
from lock_backends._common import ENCODE_SLICE, compact_json, listing_limit, renewed
from lock_backends.base import NO_WINDOW, BusyRun, Holder, Lease, RunQuery, RunRecord, Window, local_deadline
from lock_backends.errors import LockBackendError
from lock_backends.postgres_sessions import PostgresSessions
from lock_backends.postgres_sql import Conn, Row
from lock_backends.url import BackendOptions, bad_url, parse_options, redact

#: libpq parameters a URL may carry besides the common options.
LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name")
#: A wait that returns sooner than this (nobody holds the lock) is padded to it, so that a
#: follower whose acquire keeps failing for another reason cannot spin against the server.
MIN_WAIT = 0.05
#: Expired run records are deleted at most this often per backend instance (after a record batch) ...
PURGE_INTERVAL = 300.0
#: ... at most this many per statement (a backlog is worked off batch by batch, never in one long delete).
PURGE_BATCH = 5_000


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key: Python's hash() changes between processes."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def _key_params(name: str) -> dict[str, Any]:
    key = lock_key(name)
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return {"name": name, "key": key, "hi": unsigned >> 32, "lo": unsigned & 0xFFFF_FFFF}


def _session_settings(ttl: float) -> dict[str, str]:
    """What makes the server end a silent holder's session, and so its lock, about one TTL later."""
    ttl_ms = max(1, int(ttl * 1000))
    return {
        "idle_session_timeout": str(ttl_ms),
        "tcp_keepalives_idle": str(max(1, int(ttl / 2))),
        "tcp_keepalives_interval": str(max(1, int(ttl / 4))),
        "tcp_keepalives_count": "2",
        "tcp_user_timeout": str(ttl_ms),
    }


class PostgresBackend(PostgresSessions):
    """Leases as session advisory locks on one PostgreSQL server."""

    def __init__(self, url: str, options: BackendOptions, conninfo: str, address: str) -> None:
        super().__init__(url, options, conninfo, address)
        self._last_purge = 0.0

    @classmethod
    def from_url(cls, url: str) -> PostgresBackend:
        parts = urlsplit(url)
        try:
            port = parts.port or 5432
        except ValueError:
            raise bad_url(url, "port must be a number") from None
        if not parts.hostname:
            raise bad_url(url, "postgres URL needs a host, as in postgresql://user@host:5432/dbname")
        options, extra = parse_options(url, extra=LIBPQ_OPTIONS)
        dbname = unquote(parts.path.lstrip("/"))
        if "/" in dbname:
            raise bad_url(url, "the path must be one database name")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        address = f"{host}:{port}/{dbname or parts.username or 'postgres'}"
        # statement and lock timeouts free the server's side too when the client gave up
        server_ms = max(1, int(options.op_timeout * 1000))
        keepalive = max(1, math.ceil(options.op_timeout))
        try:
            conninfo = make_conninfo(
                urlunsplit(parts._replace(query="", fragment="")),
                **{"application_name": "baton", **extra},
                connect_timeout=max(2, math.ceil(options.op_timeout)),
                keepalives=1, keepalives_idle=keepalive, keepalives_interval=keepalive, keepalives_count=3,
                tcp_user_timeout=keepalive * 3000,
                options=f"-c statement_timeout={server_ms} -c lock_timeout={server_ms}",
            )
        except psycopg.Error as exc:
            raise bad_url(url, str(exc)) from None
        return cls(url, options, conninfo, address)

    # -- the lease ---------------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = clock.monotonic()
        params = {**_key_params(name), **_session_settings(ttl), "node_id": holder.node_id, "url": holder.url}
        row: Row | None = None
        async with self._op("acquire") as deadline, self._guard(f"lock:{name}", deadline):
            for attempt in (0, 1):
                conn, fresh, deadline = await self._lock_conn(name, deadline)
                try:
                    row = await self._run(conn, lambda c: _fetchone(c, sql.ACQUIRE, params), deadline)
                    break
                except psycopg.Error as exc:
                    # the session may hold the lock without a fence bump: only its end is safe
                    self._abandon(conn)
                    # a contender's idle session is ended by idle_session_timeout: reopen once
                    if fresh or attempt or not isinstance(exc, psycopg.OperationalError):
                        raise
            if row is not None and (not isinstance(row[0], int) or row[0] < 1):
                self._abandon(conn)  # the lock was taken under no valid token: give it up with the session
                raise self._corrupt(f"the fencing token is {row[0]!r}", f"baton_fence/{name}")
        if row is None:
            return None
        return Lease(name, holder, row[0], ttl, local_deadline(t_sent, ttl), handle=f"pid:{row[1]}")

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = clock.monotonic()
        params = {**_key_params(lease.name), "token": lease.token}
        async with self._op("renew") as deadline, self._guard(f"lock:{lease.name}", deadline):
            conn = self._locks.get(lease.name)
            if conn is None:
                return None  # no session, no lock: a new session could never hold the old one
            try:
                row = await self._run(conn, lambda c: _fetchone(c, sql.RENEW, params), deadline)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)  # the session ended, and the lock with it
                return None
        if row is None or not row[0]:
            # whatever this session still holds is no lease: drop it, so that no lock outlives the lease
            # (and a wait on this session, which would be granted its own lock at once, cannot spin)
            self._abandon(conn)
            return None
        return renewed(lease, t_sent)

    async def release(self, lease: Lease) -> None:
        params = {**_key_params(lease.name), "token": lease.token}
        async with self._op("release") as deadline, self._guard(f"lock:{lease.name}", deadline):
            conn = self._locks.get(lease.name)
            if conn is None:
                return
            try:
                await self._run(conn, lambda c: _fetchone(c, sql.RELEASE, params), deadline)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)  # nothing left to release

    async def leader(self, name: str) -> Holder | None:
        params = _key_params(name)
        async with self._op("leader") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, sql.LEADER, params), deadline)
        return None if row is None else self._holder(name, row)

    def _holder(self, name: str, row: Row) -> Holder:
        node_id, url = row
        if not isinstance(node_id, str) or not isinstance(url, str):
            raise self._corrupt(f"the holder (node_id {node_id!r}, url {url!r}) is no holder", f"baton_fence/{name}")
        return Holder(node_id=node_id, url=url)

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Wait in the lock's queue, on this node's lock session, until the holder's lock goes."""
        started = time.monotonic()
        params = {**_key_params(name), "lock_timeout": str(max(1, int(timeout * 1000)))}

        async def wait(conn: Conn) -> None:
            with contextlib.suppress(psycopg.errors.LockNotAvailable):  # the timeout: nothing changed
                await conn.execute(sql.WAIT, params)

        try:
            async with (self._op("wait_for_change", extra=timeout) as deadline,
                        self._guard(f"lock:{name}", deadline)):
                conn, _, deadline = await self._lock_conn(name, deadline)
                await self._run(conn, wait, deadline)
        except LockBackendError:  # an unreachable server is waited out, not raised: the loop retries
            await asyncio.sleep(max(0.0, started + timeout - time.monotonic()))
            return
        await asyncio.sleep(max(0.0, started + MIN_WAIT - time.monotonic()))

    async def server_time(self) -> float | None:
        async with self._op("server_time") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, sql.SERVER_TIME, {}), deadline)
        return float(row[0]) if row else None

    # -- claims ------------------------------------------------------------------------

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        params = {**_key_params(lease.name), "token": lease.token, "until_us": until_us, "start_us": start_us,
                  "node_id": lease.holder.node_id, "intents": sorted(set(intents)),
                  "retention": self.options.claim_retention}
        async with self._op("claim_window") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, sql.CLAIM_WINDOW, params), deadline, slot="claims")
        return None if row is None else self._window(lease.name, row)

    async def claim_mark(self, name: str) -> Window:
        async with self._op("claim_mark") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, sql.CLAIM_MARK, {"name": name}), deadline)
        if row is None:
            return NO_WINDOW
        sound, token, since_us, until_us, sealed = row
        if not sound:
            raise self._corrupt(f"the claim mark (token {token}, since {since_us}, until {until_us}, "
                                f"sealed {sealed}) is no window", f"baton_fence/{name}")
        return Window(int(token), int(since_us), int(until_us), bool(sealed))

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        given = {run.key: run.to_dict() for run in busy}  # one row per key, the last one given wins
        params = {"name": lease.name, "token": lease.token, "at_us": at_us,
                  "busy": sql.jsonb_text(list(given.values())), "drop": sorted(set(drop))}
        async with self._op("hand_back") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, sql.HAND_BACK, params), deadline, slot="claims")
        return None if row is None else self._window(lease.name, row)

    def _window(self, name: str, row: Row) -> Window:
        """The mark and busy runs a window statement answered, or CorruptValue naming what is wrong."""
        step, token, since_us, until_us, sealed, busy = row
        if step == "corrupt":
            raise self._corrupt(f"the claim mark (token {token}, since {since_us}, until {until_us}, "
                                f"sealed {sealed}) is no window: nothing was changed", f"baton_fence/{name}")
        try:
            if not isinstance(busy, list):
                raise ValueError("busy runs are not a list")
            runs = tuple(BusyRun.from_dict(entry) for entry in busy)
        except ValueError as exc:
            raise self._corrupt(f"a busy run does not decode: {exc}", f"baton_busy/{name}") from None
        return Window(int(token), int(since_us), int(until_us), bool(sealed), runs)

    async def claim(self, lease: Lease, key: str) -> bool:
        return bool(await self.claim_many(lease, [key]))

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        # ON CONFLICT cannot touch one row twice in a statement; sorted, two batches lock rows in one order
        unique = sorted(set(keys))
        if not unique:
            return set()
        params = {**_key_params(lease.name), "token": lease.token, "claim_keys": unique,
                  "node_id": lease.holder.node_id, "retention": self.options.claim_retention}

        async def insert(conn: Conn) -> list[Row]:
            cur = await conn.execute(sql.CLAIM, params)
            return await cur.fetchall()

        async with self._op("claim") as deadline:
            rows = await self._shared_call(insert, deadline, slot="claims")
        return {str(row[0]) for row in rows}

    # -- runs ----------------------------------------------------------------------------

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        """One statement for the whole batch (``sql.RECORD``): one round trip, whatever its size.

        Measured cost of 5,000 records with small results (PostgreSQL 15 on loopback, on a 2-core
        test machine shared with other work): about 35 ms of client CPU (less since orjson writes the
        JSON texts) and 200-250 ms of server CPU (about 40% for the heap, the parsing of the results
        and the primary key, the rest for the five other indexes), so 0.3-0.5 s from call to answer
        at a quiet moment, and close to the 1 s default operation timeout under heavy contention
        (load 6 on 2 cores). A caller with a larger backlog should send it in batches of a few
        thousand.
        """
        # one pass, a slice at a time, each record encoded (or refused, before any change) as it comes: the
        # batch's records are long out of the processor's caches, and each pass over them all (a dict, a
        # sort, a column) held the loop for about a millisecond at 2,500 records, where fire times wait
        at: dict[str, int] = {}  # a key given twice: the last record wins (the statement sorts by key)
        keys: list[str] = []
        tokens: list[int] = []
        node_ids: list[str] = []
        claimed_at: list[float] = []
        results: list[str] = []
        for i, run in enumerate(records, 1):
            if i % ENCODE_SLICE == 0:
                await asyncio.sleep(0)
            result = sql.jsonb_text(run.result)
            j = at.setdefault(run.key, len(keys))
            if j == len(keys):
                keys.append(run.key)
                tokens.append(run.token)
                node_ids.append(run.node_id)
                claimed_at.append(float(run.claimed_at))
                results.append(result)
            else:
                tokens[j], node_ids[j] = run.token, run.node_id
                claimed_at[j], results[j] = float(run.claimed_at), result
        if not keys:
            return
        params = {"name": name, "keys": compact_json(keys), "tokens": compact_json(tokens),
                  "node_ids": compact_json(node_ids), "claimed_at": compact_json(claimed_at, allow_nan=False),
                  "results": "[" + ",".join(results) + "]", "retention": self.options.claim_retention}
        async with self._op("record") as deadline:
            await self._shared_call(lambda c: c.execute(sql.RECORD, params), deadline)
        if time.monotonic() - self._last_purge > PURGE_INTERVAL:
            await self._purge()

    async def _purge(self) -> None:
        """Delete one batch of expired runs; never fails the caller (a failed purge is retried later)."""
        self._last_purge = time.monotonic()

        async def delete(conn: Conn) -> int:
            cur = await conn.execute(sql.PURGE, {"batch": PURGE_BATCH})
            return cur.rowcount

        with contextlib.suppress(LockBackendError):
            async with self._op("purge expired runs") as deadline:
                if await self._shared_call(delete, deadline) >= PURGE_BATCH:
                    self._last_purge = 0.0  # a backlog: the next batch after the next record

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        limit = listing_limit(query)
        if limit == 0:
            return []
        params = {"name": name, "limit": limit, "job": query.job, "outcome": query.outcome,
                  "since": query.since, "before": query.before}
        statement = sql.listing(query)
        async with self._op("runs") as deadline:
            # never a prepared, generic plan: the index to walk depends on the values (a job, a limit)
            rows = await self._shared_call(lambda c: _fetchall(c, statement, params, prepare=False), deadline)
        return sql.decode_runs(rows)

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        if limit <= 0:
            return []
        params = {"name": name, "limit": limit}
        async with self._op("unfinished") as deadline:
            rows = await self._shared_call(lambda c: _fetchall(c, sql.UNFINISHED, params, prepare=False), deadline)
        return sql.decode_runs(rows)

    # -- settings ----------------------------------------------------------------------------

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        params = {"name": name, "key": key, "value": value}
        query = sql.DELETE_SETTING if value is None else sql.PUT_SETTING
        async with self._op("set_setting") as deadline:
            await self._shared_call(lambda c: c.execute(query, params), deadline)

    async def settings(self, name: str) -> dict[str, str]:
        async with self._op("settings") as deadline:
            rows = await self._shared_call(lambda c: _fetchall(c, sql.SETTINGS, {"name": name}), deadline)
        for key, value in rows:
            if not isinstance(value, str):
                raise self._corrupt(f"setting {key!r} is {value!r}", f"baton_settings/{name}")
        return {str(k): v for k, v in rows}

    async def close(self) -> None:
        """Drop every session; the server frees their advisory locks, so call ``release`` first."""
        self._drop_sessions()

    def __repr__(self) -> str:
        return f"PostgresBackend({redact(self.url)!r})"


async def _fetchone(conn: Conn, query: str, params: dict[str, Any]) -> Row | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def _fetchall(conn: Conn, query: str, params: dict[str, Any], *, prepare: bool | None = None) -> list[Row]:
    cur = await conn.execute(query, params, prepare=prepare)
    return await cur.fetchall()

