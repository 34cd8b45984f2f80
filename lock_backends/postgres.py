"""PostgreSQL backend: session advisory locks, a fence table, followers waiting in the lock queue.

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

Tables (created idempotently on first use): ``baton_fence`` (token and holder
per lock name), ``baton_claims`` (fenced claims with their results) and
``baton_settings`` (small shared key/values).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from lock_backends.base import Holder, Lease, RunRecord, local_deadline
from lock_backends.errors import BackendUnavailable, LockBackendError
from lock_backends.url import BackendOptions, bad_url, parse_options, redact

Conn = psycopg.AsyncConnection[Any]
T = TypeVar("T")

#: libpq parameters a URL may carry besides the common options.
LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name")
#: A wait that returns sooner than this (nobody holds the lock) is padded to it, so that a
#: follower whose acquire keeps failing for another reason cannot spin against the server.
MIN_WAIT = 0.05
#: Expired claims are deleted at most this often per backend instance.
PURGE_INTERVAL = 300.0
#: Key of the transaction lock that serializes schema creation (two-int form: its own key space).
_SCHEMA_LOCK = (0x6261746F, 1)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS baton_fence (
        name text PRIMARY KEY,
        token bigint NOT NULL,
        node_id text NOT NULL,
        url text NOT NULL DEFAULT '',
        holder_pid integer,
        acquired_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS baton_claims (
        name text NOT NULL,
        key text NOT NULL,
        token bigint NOT NULL,
        node_id text NOT NULL,
        claimed_at timestamptz NOT NULL,
        result jsonb,
        expires_at timestamptz NOT NULL,
        id bigint GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (name, key))""",
    "CREATE INDEX IF NOT EXISTS baton_claims_recent ON baton_claims (name, claimed_at DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS baton_claims_expiry ON baton_claims (expires_at)",
    """CREATE TABLE IF NOT EXISTS baton_settings (
        name text NOT NULL,
        key text NOT NULL,
        value text NOT NULL,
        PRIMARY KEY (name, key))""",
)

# pg_locks shows a bigint advisory key as its high half in classid, low half in objid, objsubid 1.
_GRANTED = """l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid::bigint = %(hi)s AND l.objid::bigint = %(lo)s"""

# One statement, so the lock and the fence bump commit together and leader() never sees one
# without the other. The first CTE is the re-entrancy guard: advisory locks stack per session.
# The session settings are applied only when the lock is taken, so a contender's idle session is
# left alone and a held session's timeout is never changed under its lease.
_ACQUIRE = f"""
WITH mine AS (
    SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED} AND l.pid = pg_backend_pid()) AS held
), got AS (
    SELECT pg_try_advisory_lock(%(key)s) AS ok FROM mine WHERE NOT mine.held
), bumped AS (
    INSERT INTO baton_fence AS f (name, token, node_id, url, holder_pid, acquired_at)
    SELECT %(name)s, 1, %(node_id)s, %(url)s, pg_backend_pid(), now() FROM got WHERE got.ok
    ON CONFLICT (name) DO UPDATE SET token = f.token + 1, node_id = EXCLUDED.node_id,
        url = EXCLUDED.url, holder_pid = EXCLUDED.holder_pid, acquired_at = EXCLUDED.acquired_at
    RETURNING f.token
)
SELECT token, pg_backend_pid(),
    set_config('idle_session_timeout', %(idle_session_timeout)s, false),
    set_config('tcp_keepalives_idle', %(tcp_keepalives_idle)s, false),
    set_config('tcp_keepalives_interval', %(tcp_keepalives_interval)s, false),
    set_config('tcp_keepalives_count', %(tcp_keepalives_count)s, false),
    set_config('tcp_user_timeout', %(tcp_user_timeout)s, false)
FROM bumped
"""

_STILL_MINE = f"""
    EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED} AND l.pid = pg_backend_pid())
    AND EXISTS (SELECT 1 FROM baton_fence f
                WHERE f.name = %(name)s AND f.token = %(token)s AND f.holder_pid = pg_backend_pid())"""

_RENEW = f"SELECT {_STILL_MINE}"

_RELEASE = f"SELECT pg_advisory_unlock(%(key)s) WHERE {_STILL_MINE}"

# Granted when the holder's exclusive lock goes; a statement's transaction lock ends with it. The
# timeout is local to the statement's transaction, set before the lock is asked for (FROM first).
_WAIT = """SELECT pg_advisory_xact_lock_shared(%(key)s)
FROM (SELECT set_config('lock_timeout', %(lock_timeout)s, true)) AS settings"""

_HOLDER_LOCKED = f"EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED} AND l.pid = f.holder_pid)"

_LEADER = f"SELECT f.node_id, f.url FROM baton_fence f WHERE f.name = %(name)s AND {_HOLDER_LOCKED}"

# FOR SHARE makes a claim racing an acquire wait for the fence bump and re-check the new token.
_CLAIM = f"""
WITH current AS (
    SELECT f.name FROM baton_fence f
    WHERE f.name = %(name)s AND f.token = %(token)s AND {_HOLDER_LOCKED}
    FOR SHARE OF f
)
INSERT INTO baton_claims AS c (name, key, token, node_id, claimed_at, expires_at)
SELECT %(name)s, k.key, %(token)s, %(node_id)s, clock_timestamp(),
       clock_timestamp() + make_interval(secs => %(retention)s)
FROM current, unnest(%(claim_keys)s::text[]) AS k(key)
ON CONFLICT (name, key) DO UPDATE SET token = EXCLUDED.token, node_id = EXCLUDED.node_id,
    claimed_at = EXCLUDED.claimed_at, result = NULL, expires_at = EXCLUDED.expires_at
    WHERE c.expires_at < clock_timestamp()
RETURNING c.key
"""

_RECORD = """
UPDATE baton_claims c SET result = r.value
FROM jsonb_each(%(results)s::jsonb) AS r(key, value)
WHERE c.name = %(name)s AND c.key = r.key
"""

_RUNS = """
SELECT key, token, node_id, extract(epoch FROM claimed_at)::float8, result FROM baton_claims
WHERE name = %(name)s AND expires_at > clock_timestamp()
ORDER BY claimed_at DESC, id DESC LIMIT %(limit)s
"""


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


class PostgresBackend:
    """Leases as session advisory locks on one PostgreSQL server."""

    kind = "postgres"

    def __init__(self, url: str, options: BackendOptions, conninfo: str, address: str) -> None:
        self.url = url
        self.options = options
        self.address = address
        self._conninfo = conninfo
        # slot -> session: "claims" (claims only, so they never queue behind records), "shared" (the rest)
        self._shared: dict[str, Conn] = {}
        self._locks: dict[str, Conn] = {}  # lock name -> its dedicated session
        self._guards: dict[str, asyncio.Lock] = {}
        self._schema_ready = False
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

    # -- plumbing --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _op(self, what: str, extra: float = 0.0) -> AsyncIterator[float]:
        """Give the operation its deadline and translate every client error, in one place."""
        deadline = time.monotonic() + self.options.op_timeout + extra
        try:
            yield deadline
        except TimeoutError:
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s",
                                     backend=self.kind, address=self.address) from None
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise BackendUnavailable(f"{what} failed: {_brief(exc)}", backend=self.kind,
                                     address=self.address) from None
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.UndefinedTable):
                self._schema_ready = False  # somebody dropped our tables: recreate on next connect
            raise LockBackendError(f"{what} failed: {_brief(exc)}", backend=self.kind,
                                   address=self.address) from None

    async def _run(self, conn: Conn, fn: Callable[[Conn], Awaitable[T]], deadline: float,
                   *, abandon_on_cancel: bool = True) -> T:
        """Run ``fn`` on ``conn`` by ``deadline``, or discard the connection and raise TimeoutError.

        Not asyncio.wait_for: cancelling a psycopg query sends a cancel request and
        waits for the server, which is exactly what hangs when the server is unreachable.
        """
        task = asyncio.ensure_future(fn(conn))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            if abandon_on_cancel:
                self._abandon(conn, task)
            else:  # others share this connection: drop it only if the query overruns
                handle = asyncio.get_running_loop().call_later(
                    max(0.0, deadline - time.monotonic()), self._abandon, conn, task)
                task.add_done_callback(lambda _t: handle.cancel())
                task.add_done_callback(_consume)
            raise
        if not done:
            self._abandon(conn, task)
            raise TimeoutError
        return task.result()

    def _abandon(self, conn: Conn, task: asyncio.Future[Any] | None = None) -> None:
        """Drop a connection whose state is unknown, never waiting on the server.

        Shutting the socket down ends the server session (and any advisory lock in it)
        and makes a query still in flight fail at once; the connection is closed when
        that query has let go of the socket, so no half-closed fd stays in the event loop.
        """
        self._forget(conn)
        with contextlib.suppress(Exception):
            dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
            try:
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()
        if task is None or task.done():
            _finish(conn)
        else:
            task.add_done_callback(_consume)
            task.add_done_callback(lambda _t: _finish(conn))

    def _forget(self, conn: Conn) -> None:
        for slot in [s for s, c in self._shared.items() if c is conn]:
            del self._shared[slot]
        for name in [n for n, c in self._locks.items() if c is conn]:
            del self._locks[name]

    @contextlib.asynccontextmanager
    async def _guard(self, slot: str, deadline: float) -> AsyncIterator[None]:
        """Serialize opening (and, per lock name, using) one connection slot within the deadline."""
        lock = self._guards.setdefault(slot, asyncio.Lock())
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await lock.acquire()
        try:
            yield
        finally:
            lock.release()

    async def _connect(self, deadline: float) -> Conn:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            if not self._schema_ready:
                await self._run(conn, _ensure_schema, deadline)
                self._schema_ready = True
        except BaseException:
            self._abandon(conn)
            raise
        return conn

    async def _shared_call(self, fn: Callable[[Conn], Awaitable[T]], deadline: float, slot: str = "shared") -> T:
        """Run on a shared connection, reopening it once if the server had dropped it."""
        for attempt in (0, 1):
            fresh = False
            async with self._guard(slot, deadline):
                conn = self._shared.get(slot)
                if conn is None or conn.closed:
                    conn = self._shared[slot] = await self._connect(deadline)
                    fresh = True
            try:
                return await self._run(conn, fn, deadline, abandon_on_cancel=False)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _lock_conn(self, name: str, deadline: float) -> tuple[Conn, bool]:
        """The session dedicated to ``name`` (opened if need be) and whether it is new."""
        conn = self._locks.get(name)
        if conn is not None and not conn.closed:
            return conn, False
        if conn is not None:
            self._abandon(conn)
        conn = self._locks[name] = await self._connect(deadline)
        return conn, True

    # -- protocol --------------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = time.monotonic()
        params = {**_key_params(name), **_session_settings(ttl), "node_id": holder.node_id, "url": holder.url}
        row: tuple[Any, ...] | None = None
        async with self._op("acquire") as deadline, self._guard(f"lock:{name}", deadline):
            for attempt in (0, 1):
                conn, fresh = await self._lock_conn(name, deadline)
                try:
                    row = await self._run(conn, lambda c: _fetchone(c, _ACQUIRE, params), deadline)
                    break
                except psycopg.Error as exc:
                    # the session may hold the lock without a fence bump: only its end is safe
                    self._abandon(conn)
                    # a contender's idle session is ended by idle_session_timeout: reopen once
                    if fresh or attempt or not isinstance(exc, psycopg.OperationalError):
                        raise
        if row is None:
            return None
        return Lease(name, holder, int(row[0]), ttl, local_deadline(t_sent, ttl), handle=f"pid:{row[1]}")

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = time.monotonic()
        params = {**_key_params(lease.name), "token": lease.token}
        async with self._op("renew") as deadline, self._guard(f"lock:{lease.name}", deadline):
            conn = self._locks.get(lease.name)
            if conn is None:
                return None  # no session, no lock: a new session could never hold the old one
            try:
                row = await self._run(conn, lambda c: _fetchone(c, _RENEW, params), deadline)
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
        return Lease(lease.name, lease.holder, lease.token, lease.ttl,
                     local_deadline(t_sent, lease.ttl), handle=lease.handle)

    async def release(self, lease: Lease) -> None:
        params = {**_key_params(lease.name), "token": lease.token}
        async with self._op("release") as deadline, self._guard(f"lock:{lease.name}", deadline):
            conn = self._locks.get(lease.name)
            if conn is None:
                return
            try:
                await self._run(conn, lambda c: _fetchone(c, _RELEASE, params), deadline)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)  # nothing left to release

    async def leader(self, name: str) -> Holder | None:
        params = _key_params(name)
        async with self._op("leader") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, _LEADER, params), deadline)
        return Holder(node_id=row[0], url=row[1]) if row else None

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Wait in the lock's queue, on this node's lock session, until the holder's lock goes."""
        started = time.monotonic()
        params = {**_key_params(name), "lock_timeout": str(max(1, int(timeout * 1000)))}

        async def wait(conn: Conn) -> None:
            with contextlib.suppress(psycopg.errors.LockNotAvailable):  # the timeout: nothing changed
                await conn.execute(_WAIT, params)

        try:
            async with (self._op("wait_for_change", extra=timeout) as deadline,
                        self._guard(f"lock:{name}", deadline)):
                conn, _ = await self._lock_conn(name, deadline)
                await self._run(conn, wait, deadline)
        except LockBackendError:  # an unreachable server is waited out, not raised: the loop retries
            await asyncio.sleep(max(0.0, started + timeout - time.monotonic()))
            return
        await asyncio.sleep(max(0.0, started + MIN_WAIT - time.monotonic()))

    async def claim(self, lease: Lease, key: str) -> bool:
        return bool(await self.claim_many(lease, [key]))

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(keys))  # ON CONFLICT cannot touch one row twice in a statement
        if not unique:
            return set()
        params = {**_key_params(lease.name), "token": lease.token, "claim_keys": unique,
                  "node_id": lease.holder.node_id, "retention": self.options.claim_retention}

        async def insert(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(_CLAIM, params)
            return await cur.fetchall()

        async with self._op("claim") as deadline:
            rows = await self._shared_call(insert, deadline, slot="claims")
        if time.monotonic() - self._last_purge > PURGE_INTERVAL:
            self._last_purge = time.monotonic()
            # after the claim, and never failing it: a purge that fails is retried next interval
            with contextlib.suppress(LockBackendError):
                async with self._op("purge expired claims") as deadline:
                    await self._shared_call(
                        lambda c: c.execute("DELETE FROM baton_claims WHERE expires_at < clock_timestamp()"),
                        deadline)
        return {row[0] for row in rows}

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        await self.record_many(name, {key: result})

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        if not results:
            return
        # one JSON object of key -> result: an array of jsonb would be escaped element by element in Python
        params = {"name": name, "results": Jsonb(dict(results))}
        async with self._op("record") as deadline:
            await self._shared_call(lambda c: c.execute(_RECORD, params), deadline)

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        params = {"name": name, "limit": max(limit, 0)}

        async def fetch(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(_RUNS, params)
            return await cur.fetchall()

        async with self._op("runs") as deadline:
            rows = await self._shared_call(fetch, deadline)
        return [RunRecord(key=r[0], token=int(r[1]), node_id=r[2], claimed_at=float(r[3]), result=r[4])
                for r in rows]

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        params = {"name": name, "key": key, "value": value}
        query = ("DELETE FROM baton_settings WHERE name = %(name)s AND key = %(key)s" if value is None else
                 "INSERT INTO baton_settings (name, key, value) VALUES (%(name)s, %(key)s, %(value)s) "
                 "ON CONFLICT (name, key) DO UPDATE SET value = EXCLUDED.value")
        async with self._op("set_setting") as deadline:
            await self._shared_call(lambda c: c.execute(query, params), deadline)

    async def settings(self, name: str) -> dict[str, str]:
        async def fetch(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute("SELECT key, value FROM baton_settings WHERE name = %(name)s",
                                     {"name": name})
            return await cur.fetchall()

        async with self._op("settings") as deadline:
            rows = await self._shared_call(fetch, deadline)
        return {str(k): str(v) for k, v in rows}

    async def close(self) -> None:
        """Drop every session; the server frees their advisory locks, so call ``release`` first."""
        conns = [*self._shared.values(), *self._locks.values()]
        for conn in conns:
            self._abandon(conn)
        self._guards.clear()

    def __repr__(self) -> str:
        return f"PostgresBackend({redact(self.url)!r})"


async def _ensure_schema(conn: Conn) -> None:
    cur = await conn.execute("SELECT to_regclass('baton_settings') IS NOT NULL")
    row = await cur.fetchone()
    if row and row[0]:
        return
    async with conn.transaction():  # concurrent first users would race on the catalog
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _SCHEMA_LOCK)
        for statement in _SCHEMA:
            await conn.execute(statement)


async def _fetchone(conn: Conn, query: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


def _finish(conn: Conn) -> None:
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned query's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
