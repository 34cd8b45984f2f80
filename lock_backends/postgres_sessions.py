"""The PostgreSQL backend's sessions: opening them, bounding every statement, dropping them safely.

Apart from ``postgres`` because how a session is used is a subject of its own,
and the backend's correctness hangs on it: a session that holds an advisory
lock *is* the lease, so a session whose state is unknown (a statement that
overran, a cancel) is never reused or waited on, but dropped at once, which
ends the server session and any lock in it. ``PostgresSessions`` is the base
class of ``postgres.PostgresBackend``.

Sessions, per backend instance:

* one per lock name, dedicated to it: the lock lives in it, and a follower's
  wait for a change runs in it too (``_lock_conn``);
* two shared ones, by slot: ``claims`` (claims and windows only, so they never
  queue behind a batch of records) and ``shared`` (everything else), reopened
  once if the server had dropped them (``_shared_call``).

Every operation runs inside ``_op``, which gives it its deadline and is the
one place client errors are translated: ``BackendUnavailable`` for timeouts
and lost connections, ``LockBackendError`` for the rest. A statement is never
cancelled through psycopg (which waits for the server): ``_run`` abandons the
session instead. The first statement of a new session makes sure the tables
are current (``_ensure_schema``, with ``postgres_sql.migrate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from lock_backends.errors import BackendUnavailable, CorruptValue, LockBackendError
from lock_backends.postgres_sql import MIGRATION_TIMEOUT, Conn, migrate, schema_current
from lock_backends.url import BackendOptions

T = TypeVar("T")


class PostgresSessions:
    """The server sessions of one backend instance, and the one place their errors are translated."""

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
            if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
                self._schema_ready = False  # somebody dropped (or restored old) tables: redo them on next use
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

    async def _connect(self, deadline: float) -> tuple[Conn, float]:
        """A new session with the tables ready, and the operation's deadline (see ``_ensure_schema``)."""
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            deadline = await self._ensure_schema(conn, deadline)
        except BaseException:
            self._abandon(conn)
            raise
        return conn, deadline

    async def _ensure_schema(self, conn: Conn, deadline: float, *, shared: bool = False) -> float:
        """Create or upgrade the tables if this instance has not seen them current yet.

        The check takes the operation's deadline; an upgrade (which may build indexes over a
        large ``baton_claims``) takes up to MIGRATION_TIMEOUT, once, and the deadline returned for
        the rest of the operation is moved on by the time it took.
        """
        if self._schema_ready:
            return deadline
        if not await self._run(conn, schema_current, deadline, abandon_on_cancel=not shared):
            started = time.monotonic()
            await self._run(conn, migrate, max(deadline, started + MIGRATION_TIMEOUT), abandon_on_cancel=not shared)
            deadline += time.monotonic() - started
        self._schema_ready = True
        return deadline

    async def _shared_call(self, fn: Callable[[Conn], Awaitable[T]], deadline: float, slot: str = "shared") -> T:
        """Run on a shared connection, reopening it once if the server had dropped it."""
        for attempt in (0, 1):
            fresh = False
            async with self._guard(slot, deadline):
                conn = self._shared.get(slot)
                if conn is None or conn.closed:
                    conn, deadline = await self._connect(deadline)
                    self._shared[slot] = conn
                    fresh = True
                else:
                    deadline = await self._ensure_schema(conn, deadline, shared=True)
            try:
                return await self._run(conn, fn, deadline, abandon_on_cancel=False)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _lock_conn(self, name: str, deadline: float) -> tuple[Conn, bool, float]:
        """The session dedicated to ``name`` (opened if need be), whether it is new, and the deadline."""
        conn = self._locks.get(name)
        if conn is not None and not conn.closed:
            return conn, False, deadline
        if conn is not None:
            self._abandon(conn)
        conn, deadline = await self._connect(deadline)
        self._locks[name] = conn
        return conn, True, deadline

    def _drop_sessions(self) -> None:
        """Drop every session; the server frees their advisory locks."""
        conns = [*self._shared.values(), *self._locks.values()]
        for conn in conns:
            self._abandon(conn)
        self._guards.clear()

    def _corrupt(self, message: str, key: str) -> CorruptValue:
        return CorruptValue(message, key=key, backend=self.kind, address=self.address)


def _finish(conn: Conn) -> None:
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned query's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
