"""etcd backend: a lease plus a ``create_revision == 0`` transaction, as etcd's own election does.

The lock key is attached to an etcd lease, so the server deletes it when the
holder stops renewing. The fencing token is the key's create revision: etcd's
revision counter is cluster-wide and never goes back, so every new incarnation
of the key gets a larger one, with no separate counter to keep in step.

Key layout, for a lock named N (quoted, so a ``/`` in N cannot reach another
lock's keys; ``<key>`` is a claim key such as ``job@2026-01-01T00:00:00``)::

    /baton/N/lock               holder JSON, on the holder's etcd lease; token = its create revision
    /baton/N/window             the claim mark, Window.to_dict() JSON; no lease: it never expires
    /baton/N/busy/<key>         BusyRun JSON, on a lease of its own that ends after the run's until_us
    /baton/N/runs/<key>         the run record of <key>: a claim or intent (result null) or an outcome
    /baton/N/time/<inv>/<key>   the same record, indexed by time for ``runs()``
    /baton/N/open/<inv>/<key>   the same record once more while it has no result, for ``unfinished()``
    /baton/N/settings/<key>     a setting's value (UTF-8); no lease

``<inv>`` is ``9999999999999999 - floor(claimed_at * 10**6)`` in 16 digits, so
etcd's natural ascending key order is newest first: etcd 3.4 walks the whole
requested key range for every Range (and fetches all of it to sort it), so
listings ask only for ascending ranges with a limit, narrowed to time slices
(see ``runs``). The three record keys of one run are always written and deleted
together in one transaction, on one shared *retention lease*, so they expire
together after ``claim_retention``.

Why a claim window is atomic with the fence: ``claim_window`` is one ``Txn``
whose compares are ``create_revision(lock) == token`` (the lease's token is
the lock's current one: the lock key exists, so its lease is alive) and
``mod_revision(window) == m``, where ``m`` is the mark's revision this instance
saw last. The success branch puts ``next_window(mark_seen_at_m, ...)`` (plus
the intents, plus a range read of the busy runs). If either compare fails,
nothing is written and the failure branch reads the lock, the mark and the
intents' records; the backend answers None if the token is no longer the
lock's, or else recomputes from the mark it just read and tries again (a few
times). So the mark written is always ``next_window`` of the mark it replaces,
under the lock's current token: point 1 of the proof in ``base``. With a cached
``m`` the whole operation is one round trip; asking for what is granted already
writes nothing. ``hand_back`` compares only the mark's revision (after reading
it), not the lock: it must work after the lease lapsed, until a successor moves
the mark, and ``handed_back`` refuses a mark that is not the caller's.

etcd refuses a transaction of more than 128 operations (``--max-txn-ops``) or
1.5 MiB, so big batches are split: ``claim_many`` 42 keys per transaction,
``record_many`` as many records as fit (64 new ones: two puts each, four
transactions in flight), ``claim_window`` 25 intents with the window. Intents beyond
those 25 follow in transactions of their own *after* the window's, each fenced
by the lock again: a crash between them can lose an intent (a recoverable fire
time not recovered), never leave one for a window that was not granted (which a
successor would run twice). ``hand_back`` deletes the overflow of ``drop``
*before* sealing, fenced by the mark's revision, for the same reason: a crash
between them can leave given-back fire times without their intents (not
recovered), never intents for fire times the successor's window runs anyway.

The server's clock: etcd's v3 API has none, but its client port also answers
HTTP (``GET /version``), whose ``Date`` header is the server's wall clock to
the second. ``server_time`` polls it on a keep-alive connection until the
second ticks over and takes the instant of the edge (within a few ms here:
half the polling interval plus a round trip), keeps the offset from this host's
*monotonic* clock (so a step of this host's wall clock, which is what callers
look for, is never hidden by the cache) and measures again every few minutes
in the background. Finding an edge takes up to a second, longer than an
operation may: the first call waits for it within the operation timeout and
answers None ("no clock to offer yet") if the edge has not come by then; later
calls answer at once.

aetcd's ``Client`` talks to one endpoint, so this module keeps one client at a
time and moves to the next endpoint of the URL when a call fails for want of a
connection. Every call goes through ``_call``, which bounds it by the operation
timeout and is the only place client and gRPC errors are translated. Values
that do not decode raise ``CorruptValue`` (naming the etcd key) from the body,
except in listings, which skip them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aetcd  # type: ignore[import-untyped, unused-ignore]
import grpc  # type: ignore[import-untyped, unused-ignore]
from aetcd import rpc  # type: ignore[import-untyped, unused-ignore]
from aetcd.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    ClientError,
    ConnectionFailedError,
    ConnectionTimeoutError,
    WatchTimeoutError,
)
from aetcd.utils import prefix_range_end  # type: ignore[import-untyped, unused-ignore]

from lock_backends import clock
from lock_backends.base import (
    MAX_LISTING,
    BusyRun,
    Holder,
    Lease,
    RunQuery,
    RunRecord,
    Window,
    handed_back,
    local_deadline,
    next_window,
)
from lock_backends.errors import BackendUnavailable, CorruptValue, LockBackendError
from lock_backends.url import BackendOptions, bad_url, parse_options, redact

T = TypeVar("T")

#: gRPC retries a lost connection with exponential backoff (up to two minutes by
#: default); keep it short so a restarted member is used again within a second.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}

#: Status codes that say "this member could not answer", not "the request is wrong". INTERNAL is
#: gRPC's own (etcd never answers it): "Internal error from Core" / 'Failed "execute_batch"' is what
#: a call gets when the channel's transport died under it (a member killed mid-stream, say).
_UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL})

#: UNKNOWN is what gRPC says for a stream the transport dropped, and what etcd says when a member
#: forwarding a request to the Raft leader (a lease keepalive, say) timed out because the leader
#: died: both are worth another member. etcd's other UNKNOWNs are real errors.
_TRANSPORT_DETAILS = ("stream removed", "socket closed", "connection reset", "broken pipe", "goaway",
                      "transport is closing", "connection refused", "failed to connect", "end of tcp stream",
                      "context deadline exceeded", "context canceled")

#: A retention lease is reused for this fraction of the retention, then replaced.
_RETENTION_ROTATE = 0.1

#: etcd's default ``--max-txn-ops``: compares, success ops and failure ops each stay within it.
_TXN_OPS = 128
#: Keys per ``claim_many`` transaction: one compare and three puts each (record, time and open index).
_CLAIM_CHUNK = (_TXN_OPS - 2) // 3
#: Intents in the window's own transaction: at most five ops each (three puts, two stale index deletes),
#: next to the mark's put and the busy runs' read.
_WINDOW_INTENTS = (_TXN_OPS - 2) // 5
#: Records per ``record_many`` transaction at most (one compare each, next to the busy-runs compare).
_RECORD_CHUNK = _TXN_OPS - 2
#: Bytes of values per ``record_many`` transaction at most: etcd refuses a request over 1.5 MiB by default.
_TXN_BYTES = 1_000_000
#: ``record_many`` transactions in flight at once.
_RECORD_PARALLEL = 4
#: Tries of an optimistic transaction whose compare failed, with what its failure branch read.
_TRIES = 8

#: Time index keys: ``_INV - microseconds`` in ``_DIGITS`` digits, so ascending key order is newest first.
_DIGITS = 16
_INV: int = 10**_DIGITS - 1
#: A listing examines at most this many records (filters apply to the newest ones), whatever it asks.
_SCAN_CAP = 2 * MAX_LISTING
#: Records per listing request at most.
_PAGE = 500
#: Width of a listing's first time slice; an empty slice makes the next one four times wider.
_FIRST_SLICE_US = 1_000_000

#: ``server_time``: the offset is measured again after this many seconds.
_CLOCK_REFRESH = 300.0
#: Pause between two reads of the ``Date`` header while waiting for its second to tick over.
_CLOCK_POLL = 0.004
#: A measurement gives up after this long (an edge comes once a second).
_CLOCK_BUDGET = 2.5


class _ChannelClosed(Exception):
    """A call ended because its channel went away (failover or close), not through a real cancel."""


#: Everything aetcd or gRPC may raise for a failed call; programming errors are left alone.
_CLIENT_ERRORS = (ClientError, grpc.RpcError, grpc.aio.BaseError, OSError, _ChannelClosed)


def _is_connection_error(exc: BaseException) -> bool:
    """True when another member (or a later retry) might succeed where this call failed.

    That includes every status that means the channel died under the call (INTERNAL from gRPC's
    core, UNKNOWN "Stream removed") or that the member could not reach the Raft leader (UNKNOWN
    "context deadline exceeded"), not only UNAVAILABLE: an etcd member that is killed leaves its
    streams, and the members that forwarded to it, in exactly those states, and the next member
    (or the same one, once a new leader is elected) can answer.
    """
    if isinstance(exc, ConnectionFailedError | ConnectionTimeoutError | WatchTimeoutError | OSError
                  | grpc.aio.UsageError | grpc.aio.InternalError | _ChannelClosed):
        return True
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError):
            if err.code() in _UNAVAILABLE_CODES:
                return True
            details = f"{err.details()} {err.debug_error_string()}".lower()
            return err.code() == grpc.StatusCode.UNKNOWN and any(d in details for d in _TRANSPORT_DETAILS)
    return False


def _lease_not_found(exc: BaseException) -> bool:
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError) and "lease not found" in str(err.details()):
            return True
    return isinstance(exc, ClientError) and "lease not found" in str(exc)


def _cancelled_by_channel() -> bool:
    """gRPC raises CancelledError for calls its channel cancelled; tell those from a real cancel."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _whole_seconds(ttl: float) -> int:
    """etcd leases are whole seconds: round up, so the server never ends a lease before we do."""
    return max(1, math.ceil(ttl))


def _parse_endpoint(url: str, item: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep or not host or "]" in port:
        raise bad_url(url, f"etcd endpoint {item.strip()!r} needs host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise bad_url(url, f"etcd endpoint {item.strip()!r} has a bad port")
    return host, int(port)


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _us(seconds: float) -> int:
    """Unix seconds as whole microseconds, clamped to what a time index key can hold."""
    return min(_INV, max(0, math.floor(seconds * 1_000_000)))


def _inv(us: int) -> bytes:
    return f"{_INV - us:0{_DIGITS}d}".encode()


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# -- raw etcd requests: aetcd's helpers hide the txn header, range limits and compares on ranges ------


def _cmp(key: bytes, target: str, value: int, result: str = "EQUAL", range_end: bytes = b"") -> Any:
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version"}[target]
    return rpc.Compare(key=key, range_end=range_end, target=getattr(rpc.Compare, target),
                       result=getattr(rpc.Compare, result), **{field: value})


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def _get(key: bytes, range_end: bytes = b"", keys_only: bool = False) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end, keys_only=keys_only))


def _delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def _kvs(response_op: Any) -> list[Any]:
    return list(response_op.response_range.kvs)


def _first(response_op: Any) -> Any | None:
    kvs = response_op.response_range.kvs
    return kvs[0] if kvs else None


@dataclass(frozen=True)
class _Prev:
    """What a record key held when last read: its mod revision (0: absent) and its record (None: garbage)."""

    mod: int = 0
    record: RunRecord | None = None
    corrupt: bool = False


_ABSENT = _Prev()


class EtcdBackend:
    """Leases in an etcd v3 cluster, reached through any of the URL's endpoints."""

    kind = "etcd"

    def __init__(self, url: str, endpoints: list[tuple[str, int]], options: BackendOptions) -> None:
        self.url = url
        self.options = options
        self.address = urlsplit(url).netloc
        self._endpoints = endpoints
        self._index = 0
        self._client: Any = None  # aetcd.Client for self._endpoints[self._index], made lazily
        self._disposals: dict[asyncio.Task[None], Any] = {}  # retired clients still closing
        self._retention: tuple[int, float] | None = None  # (lease id, monotonic time granted)
        self._retention_lock = asyncio.Lock()
        #: Last revision at which this instance saw each lock; a watch resumes after it.
        self._seen: dict[str, int] = {}
        #: The claim mark of each lock as last seen: (its mod revision, 0 when absent; the mark).
        self._marks: dict[str, tuple[int, Window | None]] = {}
        #: Busy-run keys of each lock as last seen: (the revision they were read at, their keys).
        self._busy: dict[str, tuple[int, frozenset[str]]] = {}
        #: server_time: (server wall clock minus local monotonic clock, monotonic time measured).
        self._clock_offset: tuple[float, float] | None = None
        self._clock_task: asyncio.Task[float] | None = None

    @classmethod
    def from_url(cls, url: str) -> EtcdBackend:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            raise bad_url(url, "etcd URLs take no credentials")
        if parts.path not in ("", "/"):
            raise bad_url(url, "etcd URLs take no path")
        if not parts.netloc.strip(","):
            raise bad_url(url, "expected at least one host:port")
        endpoints = [_parse_endpoint(url, item) for item in parts.netloc.split(",")]
        options, _ = parse_options(url)
        return cls(url, endpoints, options)

    # -- plumbing ----------------------------------------------------------------

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _root(name: str) -> str:
        return f"/baton/{quote(name, safe='')}/"

    @classmethod
    def _key(cls, name: str, *parts: str) -> bytes:
        return (cls._root(name) + "/".join(parts)).encode()

    def _corrupt(self, key: bytes, what: str, exc: BaseException | str) -> CorruptValue:
        return CorruptValue(f"{what} does not decode: {exc}", key=key.decode(errors="replace"),
                            backend=self.kind, address=self.address)

    def _holder(self, kv: Any) -> Holder:
        try:
            return Holder.from_json(kv.value)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise self._corrupt(kv.key, "the lock's holder", exc) from None

    def _mark(self, kv: Any | None) -> Window | None:
        if kv is None:
            return None
        try:
            return Window.from_dict(json.loads(kv.value))
        except (ValueError, RecursionError) as exc:
            raise self._corrupt(kv.key, "the claim mark", exc) from None

    def _busy_runs(self, kvs: Iterable[Any]) -> tuple[BusyRun, ...]:
        """Busy runs not yet expired on this host's clock, in key order."""
        now_us = _us(clock.time())
        found = []
        for kv in kvs:
            try:
                run = BusyRun.from_dict(json.loads(kv.value))
            except (ValueError, RecursionError) as exc:
                raise self._corrupt(kv.key, "a busy run", exc) from None
            if run.until_us > now_us:
                found.append(run)
        return tuple(found)

    @staticmethod
    def _record(key: str, value: bytes) -> RunRecord:
        """Raises ValueError (or RecursionError) for a value that is not a run record."""
        return RunRecord.from_dict(key, json.loads(value))

    def _prev(self, kv: Any | None, key: str) -> _Prev:
        if kv is None:
            return _ABSENT
        try:
            return _Prev(int(kv.mod_revision), self._record(key, kv.value))
        except (ValueError, RecursionError):
            return _Prev(int(kv.mod_revision), None, corrupt=True)

    def _current(self) -> tuple[Any, str]:
        """The client for the current endpoint; aetcd opens its channel on the first call."""
        host, port = self._endpoints[self._index]
        if self._client is None:
            self._client = aetcd.Client(host=host, port=port, timeout=self.options.op_timeout,
                                        options=dict(_CHANNEL_OPTIONS))
        return self._client, f"{host}:{port}"

    def _failover(self, client: Any) -> None:
        """Retire a client that failed and move on to the next endpoint (or a fresh channel).

        A fresh channel also sidesteps gRPC's reconnect backoff after a restart.
        The old channel gets a grace period, since other operations may still be
        using it, and they are bounded by the same timeout.
        """
        if client is None or client is not self._client:
            return  # another operation already moved on
        self._client = None
        self._index = (self._index + 1) % len(self._endpoints)
        task = asyncio.get_running_loop().create_task(
            self._dispose(client, grace=self.options.op_timeout + 0.1))
        self._disposals[task] = client
        task.add_done_callback(lambda t: self._disposals.pop(t, None))

    @staticmethod
    async def _dispose(client: Any, grace: float | None) -> None:
        with contextlib.suppress(Exception):
            if client.channel is not None:
                await client.channel.close(grace)
            await client.close()

    async def _call(self, what: str, body: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``body(client)`` bounded by the op timeout, failing over between endpoints.

        ``body`` may run again on another member after a connection error, so
        every body must be safe to repeat (each says how it is).
        """
        client: Any = None
        endpoint = ""
        try:
            async with asyncio.timeout(self.options.op_timeout):
                attempts = 0
                while True:
                    client, endpoint = self._current()
                    attempts += 1
                    try:
                        try:
                            return await body(client)
                        except asyncio.CancelledError:
                            if not _cancelled_by_channel():
                                raise
                            raise _ChannelClosed("the channel was closed under the call") from None
                    except _CLIENT_ERRORS as exc:
                        if not _is_connection_error(exc) or attempts >= len(self._endpoints):
                            raise
                        self._failover(client)
        except TimeoutError:
            self._failover(client)
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s (last tried {endpoint})",
                                     backend=self.kind, address=self.address) from None
        except _CLIENT_ERRORS as exc:
            if _is_connection_error(exc):
                self._failover(client)
                raise BackendUnavailable(f"{what} failed on {endpoint}: {_describe(exc)}", backend=self.kind,
                                         address=self.address) from None
            raise LockBackendError(f"{what} failed on {endpoint}: {_describe(exc)}", backend=self.kind,
                                   address=self.address) from None

    async def _txn(self, client: Any, compare: Sequence[Any], success: Sequence[Any],
                   failure: Sequence[Any] = ()) -> Any:
        """One etcd ``Txn``; the raw response (its header's revision is the revision it wrote at)."""
        await client.connect()
        request = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await client.kvstub.Txn(request, timeout=self.options.op_timeout, metadata=client.metadata)

    async def _range(self, client: Any, key: bytes, range_end: bytes = b"", limit: int = 0) -> Any:
        await client.connect()
        request = rpc.RangeRequest(key=key, range_end=range_end, limit=limit)
        return await client.kvstub.Range(request, timeout=self.options.op_timeout, metadata=client.metadata)

    async def _revoke(self, client: Any, lease_id: int) -> None:
        """Revoke a lease; one that already expired (or was revoked by a retry) is fine."""
        try:
            await client.revoke_lease(lease_id)
        except ClientError as exc:
            if not _lease_not_found(exc):
                raise

    async def _revoke_quietly(self, lease_ids: list[int]) -> None:
        """Best effort: a lease we fail to revoke still ends after its TTL."""
        if lease_ids:
            with contextlib.suppress(LockBackendError):
                await self._call("revoke", lambda c: asyncio.gather(*(self._revoke(c, i) for i in lease_ids)))

    def _note_revision(self, name: str, revision: int) -> None:
        self._seen[name] = max(revision, self._seen.get(name, 0))

    async def _retention_lease(self, client: Any) -> int:
        """A lease shared by recent run records, so they expire without one lease each.

        It lives for the retention plus its reuse period, so every record is kept
        for at least ``claim_retention`` (and at most 10% longer).
        """
        period = self.options.claim_retention * _RETENTION_ROTATE
        async with self._retention_lock:
            now = clock.monotonic()
            if self._retention is None or now - self._retention[1] >= period:
                grant = await client.lease(math.ceil(self.options.claim_retention + period))
                self._retention = (int(grant.id), now)
            return self._retention[0]

    async def _with_retention(self, client: Any, txn: Callable[[int], Awaitable[T]]) -> T:
        """Run ``txn(retention lease id)``, granting a new lease once if the one in use is gone."""
        try:
            return await txn(await self._retention_lease(client))
        except _CLIENT_ERRORS as exc:
            if not _lease_not_found(exc):
                raise
            self._retention = None  # revoked, or lost with the data: grant another
            return await txn(await self._retention_lease(client))

    # -- run record keys ------------------------------------------------------------

    def _record_keys(self, name: str, key: str, claimed_at: float) -> tuple[bytes, bytes, bytes]:
        """(by key, time index, open index) keys of ``key``'s record claimed at ``claimed_at``."""
        inv = _inv(_us(claimed_at)).decode()
        return (self._key(name, "runs", key), self._key(name, "time", inv, key),
                self._key(name, "open", inv, key))

    def _record_ops(self, name: str, run: RunRecord, prev: _Prev, lease_id: int,
                    value: bytes | None = None) -> list[Any]:
        """The ops that replace ``prev`` (the key's record as last read) with ``run``, indexes included."""
        value = _json(run.to_dict()) if value is None else value
        by_key, by_time, by_open = self._record_keys(name, run.key, run.claimed_at)
        ops = [_put(by_key, value, lease_id), _put(by_time, value, lease_id)]
        if run.result is None:
            ops.append(_put(by_open, value, lease_id))
        if prev.record is not None:
            _, old_time, old_open = self._record_keys(name, run.key, prev.record.claimed_at)
            if old_time != by_time:
                ops.append(_delete(old_time))
            if prev.record.result is None and (old_open != by_open or run.result is not None):
                ops.append(_delete(old_open))
        # a record whose old value did not decode leaves its old index entries (unknown) to expire
        return ops

    @staticmethod
    def _record_op_count(run: RunRecord, prev: _Prev) -> int:
        """``len(_record_ops(...))`` without building them."""
        count = 3 if run.result is None else 2
        if prev.record is not None:
            moved = _us(prev.record.claimed_at) != _us(run.claimed_at)
            count += moved + (prev.record.result is None and (moved or run.result is not None))
        return count

    def _delete_record_ops(self, name: str, record: RunRecord) -> list[Any]:
        by_key, by_time, by_open = self._record_keys(name, record.key, record.claimed_at)
        return [_delete(by_key), _delete(by_time), *([_delete(by_open)] if record.result is None else [])]

    # -- LeaseStore ------------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        lock = self._key(name, "lock")
        value = holder.to_json().encode()
        granted: list[int] = []

        async def attempt(client: Any) -> Any:
            # Repeatable: a retry grants another lease; if an earlier attempt's put
            # did land, the failure branch shows the key on a lease in ``granted``.
            grant = await client.lease(_whole_seconds(ttl))
            granted.append(int(grant.id))
            response = await self._txn(client, [_cmp(lock, "CREATE", 0)],
                                       [_put(lock, value, int(grant.id)), _get(lock)], [_get(lock)])
            return _first(response.responses[-1]), int(response.header.revision)

        t_sent = clock.monotonic()
        # A follower asks while the lock is held almost every time: a plain read answers that without
        # granting a lease and revoking it again (three calls to the cluster instead of one).
        held, revision = await self._call("acquire", lambda c: self._get_one(c, lock))
        self._note_revision(name, revision)
        if held is not None:
            self._holder(held)  # garbage in the lock key is an error to see, not "somebody holds it"
            return None
        kv, revision = await self._call("acquire", attempt)
        self._note_revision(name, revision)
        if kv is None or kv.lease not in granted:
            await self._revoke_quietly(granted)
            if kv is not None:
                self._holder(kv)
            return None
        await self._revoke_quietly([i for i in granted if i != kv.lease])
        return Lease(name, holder, int(kv.create_revision), ttl, local_deadline(t_sent, ttl),
                     handle=str(kv.lease))

    async def _get_one(self, client: Any, key: bytes) -> tuple[Any | None, int]:
        response = await self._range(client, key)
        return (response.kvs[0] if response.kvs else None), int(response.header.revision)

    async def renew(self, lease: Lease) -> Lease | None:
        lock = self._key(lease.name, "lock")
        lease_id = int(lease.handle or 0)

        async def attempt(client: Any) -> bool:
            # Repeatable: a keepalive only pushes the expiry forward.
            reply = await self._keepalive(client, lease_id)
            if reply.TTL <= 0:
                return False
            kv, _ = await self._get_one(client, lock)
            if kv is None or kv.create_revision != lease.token or kv.lease != lease_id:
                return False
            self._holder(kv)
            return True

        t_sent = clock.monotonic()
        if not lease_id or not await self._call("renew", attempt):
            return None
        return Lease(lease.name, lease.holder, lease.token, lease.ttl,
                     local_deadline(t_sent, lease.ttl), handle=lease.handle)

    async def _keepalive(self, client: Any, lease_id: int) -> Any:
        """One keepalive on a stream of its own, closed here rather than left to the GC.

        A stream whose channel died answers its write with INTERNAL ("Failed execute_batch"), or
        refuses it outright once finished: both are connection errors, so ``_call`` fails over.
        """
        await client.connect()
        call = client.leasestub.LeaseKeepAlive(timeout=self.options.op_timeout, metadata=client.metadata)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            reply = await call.read()
        except asyncio.InvalidStateError as exc:
            raise _ChannelClosed(f"keepalive stream already finished: {exc}") from None
        finally:
            call.cancel()
        if reply is grpc.aio.EOF:
            raise _ChannelClosed("keepalive stream ended without a reply")
        return reply

    async def release(self, lease: Lease) -> None:
        lock = self._key(lease.name, "lock")
        lease_id = int(lease.handle or 0)

        async def attempt(client: Any) -> None:
            # Repeatable: the compare fails once the key is gone; revoke ignores "not found".
            await self._txn(client, [_cmp(lock, "CREATE", lease.token)], [_delete(lock)])
            if lease_id:
                await self._revoke(client, lease_id)

        await self._call("release", attempt)

    async def leader(self, name: str) -> Holder | None:
        kv, revision = await self._call("leader", lambda c: self._get_one(c, self._key(name, "lock")))
        self._note_revision(name, revision)
        return None if kv is None else self._holder(kv)

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Watch the lock key from the last revision seen, so a change just before the call counts.

        Each wait opens a watch stream of its own and cancels it on the way out.
        aetcd's watcher multiplexes every watch over one stream behind a lock and
        a bounded queue, and its cancel is itself an await, which makes cleanup on
        cancellation unreliable; ``call.cancel()`` here is synchronous. An expiry
        deletes the key, so it wakes the watch too: no polling needed.
        """
        if timeout <= 0:
            return
        lock = self._key(name, "lock")
        start = self._seen.get(name)
        call: Any = None
        try:
            async with asyncio.timeout(timeout):
                try:
                    call, response = await self._call("wait_for_change",
                                                      lambda c: self._open_watch(c, lock, start))
                except LockBackendError:
                    # The caller's next operation reports the outage; do not spin meanwhile.
                    await asyncio.sleep(min(timeout, self.options.op_timeout))
                    return
                while not self._watch_done(name, response):
                    response = await call.read()
        except TimeoutError:
            return
        except (*_CLIENT_ERRORS, asyncio.InvalidStateError):
            return  # the stream broke: the lock may well have changed
        except asyncio.CancelledError:
            if not _cancelled_by_channel():
                raise
        finally:
            if call is not None:
                call.cancel()

    async def _open_watch(self, client: Any, key: bytes, after: int | None) -> tuple[Any, Any]:
        """Start a watch and wait for the server to confirm it (so a dead member fails over)."""
        await client.connect()
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        try:
            create = rpc.WatchCreateRequest(key=key, start_revision=after + 1 if after else 0)
            await call.write(rpc.WatchRequest(create_request=create))
            return call, await call.read()
        except asyncio.InvalidStateError as exc:
            call.cancel()
            raise _ChannelClosed(f"watch stream already finished: {exc}") from None
        except BaseException:
            call.cancel()
            raise

    def _watch_done(self, name: str, response: Any) -> bool:
        if response is grpc.aio.EOF:
            return True
        if response.compact_revision:
            self._seen.pop(name, None)  # history is gone; the next watch starts from now
            return True
        if response.events:
            self._note_revision(name, max(ev.kv.mod_revision for ev in response.events))
            return True
        if response.created and name not in self._seen:
            self._note_revision(name, response.header.revision)
        return bool(response.canceled)

    async def server_time(self) -> float | None:
        """The server's wall clock, from the edge of its HTTP ``Date`` second (see the module docstring)."""
        cached = self._clock_offset
        if cached is not None and clock.monotonic() - cached[1] < _CLOCK_REFRESH:
            return clock.monotonic() + cached[0]
        task = self._clock_task
        if task is None or task.done():
            task = self._clock_task = asyncio.get_running_loop().create_task(self._measure_clock())
        try:
            async with asyncio.timeout(self.options.op_timeout):
                offset = await asyncio.shield(task)
        except TimeoutError:
            # no edge yet: a stale offset is still good (it follows the monotonic clock), none is none
            return None if cached is None else clock.monotonic() + cached[0]
        return clock.monotonic() + offset

    async def _measure_clock(self) -> float:
        """Server wall clock minus local monotonic clock, from the first endpoint that answers HTTP."""
        errors: list[str] = []
        for i in range(len(self._endpoints)):
            host, port = self._endpoints[(self._index + i) % len(self._endpoints)]
            try:
                async with asyncio.timeout(_CLOCK_BUDGET):
                    offset = await self._date_edge(host.strip("[]"), port)
            except (OSError, ValueError, TypeError, EOFError, TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:
                errors.append(f"{host}:{port}: {exc!r}")
                continue
            self._clock_offset = (offset, clock.monotonic())
            return offset
        raise BackendUnavailable(f"server_time: no endpoint's HTTP Date header could be read ({'; '.join(errors)})",
                                 backend=self.kind, address=self.address)

    async def _date_edge(self, host: str, port: int) -> float:
        """Poll ``GET /version`` until the ``Date`` second ticks over; the offset at that edge."""
        async with asyncio.timeout(self.options.op_timeout):
            reader, writer = await asyncio.open_connection(host, port)
        request = f"GET /version HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: baton\r\n\r\n".encode()
        try:
            previous: tuple[float, float, int] | None = None  # (sent, answered, second)
            while True:
                sent = clock.monotonic()
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.split(":", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ":" in line)
                headers = {k.strip().lower(): v.strip() for k, v in fields.items()}
                await reader.readexactly(int(headers.get("content-length", "0")))
                answered = clock.monotonic()
                second = int(email.utils.parsedate_to_datetime(headers["date"]).timestamp())
                if previous is not None and second == previous[2] + 1:
                    # the server read S at some instant of the previous request and S+1 during this one
                    edge = ((previous[0] + previous[1]) / 2 + (sent + answered) / 2) / 2
                    return second - edge
                previous = (sent, answered, second)
                await asyncio.sleep(_CLOCK_POLL)
        except KeyError:
            raise ValueError("no Date header in the answer to GET /version") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        """Close every channel, the retiring ones too, without waiting out their grace."""
        if self._clock_task is not None:
            self._clock_task.cancel()
            await asyncio.gather(self._clock_task, return_exceptions=True)
        client, self._client = self._client, None
        retiring = list(self._disposals.items())
        for task, _ in retiring:
            task.cancel()
        clients = [c for _, c in retiring] + ([client] if client is not None else [])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.op_timeout):
                await asyncio.gather(*(t for t, _ in retiring), return_exceptions=True)
                await asyncio.gather(*(self._dispose(c, grace=None) for c in clients))

    # -- ClaimStore --------------------------------------------------------------------

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        keys = list(dict.fromkeys(intents))
        first, rest = keys[:_WINDOW_INTENTS], keys[_WINDOW_INTENTS:]
        window = await self._call("claim_window",
                                  lambda c: self._window_txn(c, lease, until_us, start_us, first))
        if window is None or not window.owned_by(lease.token):
            return window
        for chunk in _chunks(rest, _WINDOW_INTENTS):
            # after the window's own transaction, each fenced again (see the module docstring)
            if not await self._call("claim_window", functools.partial(self._intents_txn, lease=lease, keys=chunk)):
                return None  # the lock moved on meanwhile: act as fenced
        return window

    async def _window_txn(self, client: Any, lease: Lease, until_us: int, start_us: int,
                          intents: Sequence[str]) -> Window | None:
        """The window's transaction (see the module docstring). Repeatable: it is ``next_window`` of
        the mark it reads, and intents are rewritten only over records without a result."""
        name, token = lease.name, lease.token
        lock, mark_key = self._key(name, "lock"), self._key(name, "window")
        busy = self._key(name, "busy", "")
        prevs = dict.fromkeys(intents, _ABSENT)  # optimistic: intents are new keys, as a rule
        for _ in range(_TRIES):
            mod, mark = self._marks.get(name, (0, None))
            new = next_window(mark, token, until_us, start_us)
            changed = mark is None or new.to_dict() != mark.to_dict()
            compare = [_cmp(lock, "CREATE", token), _cmp(mark_key, "MOD", mod)]
            success = [_put(mark_key, _json(new.to_dict()))] if changed else []
            retention = 0
            if new.owned_by(token) and intents:
                retention = await self._retention_lease(client)
                compare += [_cmp(self._key(name, "runs", k), "MOD", p.mod) for k, p in prevs.items()]
                success += self._intent_ops(lease, prevs, retention)
            success.append(_get(busy, prefix_range_end(busy)))
            failure = [_get(lock), _get(mark_key), *(_get(self._key(name, "runs", k)) for k in intents)]
            try:
                response = await self._txn(client, compare, success, failure)
            except _CLIENT_ERRORS as exc:
                if not (retention and _lease_not_found(exc)):
                    raise
                self._retention = None
                continue
            if response.succeeded:
                self._marks[name] = (int(response.header.revision) if changed else mod, new)
                return Window(new.token, new.since_us, new.until_us, new.sealed,
                              self._busy_runs(_kvs(response.responses[-1])))
            lock_kv, mark_kv = _first(response.responses[0]), _first(response.responses[1])
            self._marks[name] = (int(mark_kv.mod_revision) if mark_kv is not None else 0, self._mark(mark_kv))
            if lock_kv is None or lock_kv.create_revision != token:
                return None
            for key, op in zip(intents, response.responses[2:], strict=True):
                prevs[key] = self._prev(_first(op), key)
        raise LockBackendError(f"claim_window: the claim mark of {name!r} kept changing under {_TRIES} tries",
                               backend=self.kind, address=self.address)

    def _intent_ops(self, lease: Lease, prevs: dict[str, _Prev], retention: int) -> list[Any]:
        """Puts of intents over keys that hold nothing or a record without a result."""
        now = clock.time()
        ops: list[Any] = []
        for key, prev in prevs.items():
            if prev.corrupt:
                raise self._corrupt(self._key(lease.name, "runs", key), "a run record", "not a run record")
            if prev.record is not None and prev.record.result is not None:
                continue  # an intent never overwrites a result
            run = RunRecord(key, lease.token, lease.holder.node_id, now)
            ops += self._record_ops(lease.name, run, prev, retention)
        return ops

    async def _intents_txn(self, client: Any, lease: Lease, keys: Sequence[str]) -> bool:
        """Intents beyond the window's transaction, fenced by the lock. Repeatable, as the window's."""
        lock = self._key(lease.name, "lock")
        prevs = dict.fromkeys(keys, _ABSENT)
        for _ in range(_TRIES):
            async def txn(retention: int) -> Any:
                compare = [_cmp(lock, "CREATE", lease.token),
                           *(_cmp(self._key(lease.name, "runs", k), "MOD", p.mod) for k, p in prevs.items())]
                return await self._txn(client, compare, self._intent_ops(lease, prevs, retention),
                                       [_get(lock), *(_get(self._key(lease.name, "runs", k)) for k in keys)])

            response = await self._with_retention(client, txn)
            if response.succeeded:
                return True
            lock_kv = _first(response.responses[0])
            if lock_kv is None or lock_kv.create_revision != lease.token:
                return False
            for key, op in zip(keys, response.responses[1:], strict=True):
                prevs[key] = self._prev(_first(op), key)
        raise LockBackendError(f"claim_window: intents of {lease.name!r} kept changing under {_TRIES} tries",
                               backend=self.kind, address=self.address)

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        unique = list(dict.fromkeys(drop))
        return await self._call("hand_back", lambda c: self._hand_back(c, lease, at_us, busy, unique))

    async def _hand_back(self, client: Any, lease: Lease, at_us: int, busy: Sequence[BusyRun],
                         drop: list[str]) -> Window | None:
        """Read the mark (and the records to drop), then seal it under a compare of its revision.

        Repeatable: ``handed_back`` of a mark sealed already is the same mark, and a drop
        deletes only records still holding an intent of this token.
        """
        name, token = lease.name, lease.token
        mark_key, busy_prefix = self._key(name, "window"), self._key(name, "busy", "")
        now_us = _us(clock.time())
        live = list({run.key: run for run in busy if run.until_us > now_us}.values())  # one put per key
        busy_lease = 0
        if live:  # a lease of their own, so they vanish soon after the last one's until_us
            longest = max(run.until_us for run in live) / 1_000_000 - clock.time()
            busy_lease = int((await client.lease(_whole_seconds(longest + 1.0))).id)
        busy_ops = [_put(self._key(name, "busy", run.key), _json(run.to_dict()), busy_lease) for run in live]
        # an expired one replaces the key's entry too (with nothing a reader would count)
        busy_ops += [_delete(self._key(name, "busy", key)) for key in {r.key for r in busy} - {r.key for r in live}]
        for _ in range(_TRIES):
            reads = [_get(mark_key), *(_get(self._key(name, "runs", k)) for k in drop[:_TXN_OPS - 1])]
            response = await self._txn(client, [], reads)
            mark_kv = _first(response.responses[0])
            mod = int(mark_kv.mod_revision) if mark_kv is not None else 0
            mark = self._mark(mark_kv)
            prevs = {k: self._prev(_first(op), k) for k, op in zip(drop, response.responses[1:], strict=False)}
            for chunk in _chunks(drop[_TXN_OPS - 1:], _TXN_OPS):
                more = await self._txn(client, [], [_get(self._key(name, "runs", k)) for k in chunk])
                prevs.update({k: self._prev(_first(op), k) for k, op in zip(chunk, more.responses, strict=True)})
            new = handed_back(mark, token, at_us)
            if new is None:
                return None
            # (compare, ops) per dropped intent: deleted only while it is still this token's, unreported
            dropping = [([_cmp(self._key(name, "runs", k), "MOD", p.mod)], self._delete_record_ops(name, p.record))
                        for k, p in prevs.items()
                        if p.record is not None and p.record.result is None and p.record.token == token]
            items = dropping + [([], [op]) for op in busy_ops]
            changed = mark is None or new.to_dict() != mark.to_dict()
            head = [_put(mark_key, _json(new.to_dict()))] if changed else []
            fence = _cmp(mark_key, "MOD", mod)
            batches = self._pack(items, compare_room=_TXN_OPS - 1, op_room=_TXN_OPS - len(head) - 1)
            # every batch but the last goes first, fenced by the mark's revision; the last seals the mark
            moved = False
            for compare, ops in batches[:-1]:
                if not (await self._txn(client, [fence, *compare], ops)).succeeded:
                    moved = True
                    break
            if moved:
                continue
            compare, ops = batches[-1] if batches else ([], [])
            final = await self._txn(client, [fence, *compare],
                                    [*head, *ops, _get(busy_prefix, prefix_range_end(busy_prefix))])
            if final.succeeded:
                self._marks[name] = (int(final.header.revision) if changed else mod, new)
                return Window(new.token, new.since_us, new.until_us, new.sealed,
                              self._busy_runs(_kvs(final.responses[-1])))
        raise LockBackendError(f"hand_back: the claim mark of {name!r} kept changing under {_TRIES} tries",
                               backend=self.kind, address=self.address)

    @staticmethod
    def _pack(items: Sequence[tuple[list[Any], list[Any]]], compare_room: int,
              op_room: int) -> list[tuple[list[Any], list[Any]]]:
        """Group (compares, ops) items into transactions within etcd's limits, in order."""
        batches: list[tuple[list[Any], list[Any]]] = []
        for compare, ops in items:
            if not batches or len(batches[-1][0]) + len(compare) > compare_room \
                    or len(batches[-1][1]) + len(ops) > op_room:
                batches.append(([], []))
            batches[-1][0].extend(compare)
            batches[-1][1].extend(ops)
        return batches

    async def claim(self, lease: Lease, key: str) -> bool:
        return key in await self.claim_many(lease, [key])

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        """One transaction per chunk of keys: each absent key claimed, each of this token's claimed again.

        A claim is a run record without a result (token, node, now), with its time and open
        index entries. A chunk meeting a claimed key learns who holds it from its failure branch
        and claims the rest again.
        """
        claimed: set[str] = set()
        for chunk in _chunks(list(dict.fromkeys(keys)), _CLAIM_CHUNK):
            mine = await self._call("claim", functools.partial(self._claim_chunk, lease=lease, chunk=chunk))
            if mine is None:
                return claimed  # fenced: the token is not the lock's any more
            claimed |= mine
        return claimed

    async def _claim_chunk(self, client: Any, lease: Lease, chunk: Sequence[str]) -> set[str] | None:
        """Repeatable: a retry finds what an earlier attempt claimed under this token, and counts it."""
        lock = self._key(lease.name, "lock")
        free, mine = list(chunk), set[str]()
        for _ in range(_TRIES):
            if not free:
                return mine
            now = clock.time()
            runs = [RunRecord(k, lease.token, lease.holder.node_id, now) for k in free]

            async def txn(retention: int, free: list[str] = free, runs: list[RunRecord] = runs) -> Any:
                by_key = [self._key(lease.name, "runs", k) for k in free]
                return await self._txn(
                    client, [_cmp(lock, "CREATE", lease.token), *(_cmp(k, "MOD", 0) for k in by_key)],
                    [op for run in runs for op in self._record_ops(lease.name, run, _ABSENT, retention)],
                    [_get(lock), *(_get(k) for k in by_key)])

            response = await self._with_retention(client, txn)
            if response.succeeded:
                return mine | set(free)
            lock_kv = _first(response.responses[0])
            if lock_kv is None or lock_kv.create_revision != lease.token:
                return None
            still_free = []
            for key, op in zip(free, response.responses[1:], strict=True):
                kv = _first(op)
                if kv is None:
                    still_free.append(key)
                    continue
                prev = self._prev(kv, key)
                if prev.record is None:
                    raise self._corrupt(kv.key, "a claim", "not a run record")
                if prev.record.token == lease.token:
                    mine.add(key)  # ours already: a retry after a lost answer
            free = still_free
        raise LockBackendError(f"claim: keys of {lease.name!r} kept changing under {_TRIES} tries",
                               backend=self.kind, address=self.address)

    # -- RunStore ----------------------------------------------------------------------

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        """Each record replaces the key's record (and its index entries, its intent, its busy entry).

        Transactions of as many records as fit in 128 ops (64 new keys: two puts each),
        ``_RECORD_PARALLEL`` in flight, each optimistic: it compares that each key is as last
        seen (absent, at first: fire times that were never claimed, as a rule) and that no busy
        run appeared since they were read. A transaction whose compare fails reads those keys
        and the busy runs in its failure branch and goes again. Each transaction is bounded by
        the operation timeout on its own: a batch is as many round trips as it has transactions.

        Cost of a batch of 5,000 new records (``tests/test_etcd.py::test_record_many_batch_of_5000``,
        etcd 3.4, one member, loopback, 2 cores shared with other work): 79 transactions, 0.45-0.5 s
        on a quiet machine (1-1.2 s under load), about 0.3 s of it this process's CPU (JSON and
        protobuf). The same 5,000 again (every key present: each transaction fails its compares
        once) about 1.2 s. The get-then-compare-and-swap per record it replaces took about 15 s.
        A typical RunRecorder batch of 20 records is one transaction, 1-2 ms.
        """
        latest: dict[str, RunRecord] = {}
        values: dict[str, bytes] = {}
        for run in records:
            values[run.key] = _json(run.to_dict())  # refuse what cannot be stored, before any change
            latest.pop(run.key, None)
            latest[run.key] = run  # the last record of a key wins, as it would written one by one
        if not latest:
            return
        prevs: dict[str, _Prev] = {}
        queue = asyncio.Queue[tuple[list[RunRecord], int]]()
        for group in self._split_records(name, list(latest.values()), prevs, values):
            queue.put_nowait((group, 1))

        async def worker() -> None:
            while not queue.empty():
                chunk, tries = queue.get_nowait()
                if tries > _TRIES:
                    raise LockBackendError(f"record_many: records of {name!r} kept changing under {_TRIES} tries",
                                           backend=self.kind, address=self.address)
                body = functools.partial(self._record_chunk, name=name, chunk=chunk, prevs=prevs, values=values)
                if await self._call("record_many", body):
                    continue
                for group in self._split_records(name, chunk, prevs, values):
                    queue.put_nowait((group, tries + 1))

        await _all_or_first_error([worker() for _ in range(min(_RECORD_PARALLEL, queue.qsize()))])

    def _split_records(self, name: str, runs: Sequence[RunRecord], prevs: dict[str, _Prev],
                       values: dict[str, bytes]) -> list[list[RunRecord]]:
        """Records grouped so that each group's ops (and bytes) fit one transaction, as far as known."""
        busy = self._busy.get(name, (0, frozenset()))[1]
        groups: list[list[RunRecord]] = []
        ops = size = 0
        for run in runs:
            more = self._record_op_count(run, prevs.get(run.key, _ABSENT)) + (run.key in busy)
            weight = len(values[run.key]) * (3 if run.result is None else 2)
            if not groups or ops + more > _TXN_OPS or size + weight > _TXN_BYTES or len(groups[-1]) >= _RECORD_CHUNK:
                groups.append([])
                ops = size = 0
            groups[-1].append(run)
            ops += more
            size += weight
        return groups

    async def _record_chunk(self, client: Any, name: str, chunk: Sequence[RunRecord],
                            prevs: dict[str, _Prev], values: dict[str, bytes]) -> bool:
        """One transaction of records: True when written; False when a compare failed (``prevs`` and
        the busy runs then refreshed from the failure branch) or when the chunk, as now known, takes
        more ops than one transaction. Repeatable: a record written twice is the same."""
        busy_prefix = self._key(name, "busy", "")
        busy_end = prefix_range_end(busy_prefix)
        seen_at, busy = self._busy.get(name, (0, frozenset()))
        by_key = [self._key(name, "runs", run.key) for run in chunk]

        async def txn(retention: int) -> Any:
            ops = []
            for run in chunk:
                ops += self._record_ops(name, run, prevs.get(run.key, _ABSENT), retention, values[run.key])
                if run.key in busy:
                    ops.append(_delete(self._key(name, "busy", run.key)))
            if len(ops) > _TXN_OPS:
                return None
            compare = [_cmp(busy_prefix, "MOD", seen_at + 1, "LESS", busy_end),
                       *(_cmp(k, "MOD", prevs.get(run.key, _ABSENT).mod) for k, run in zip(by_key, chunk, strict=True))]
            return await self._txn(client, compare, ops,
                                   [_get(busy_prefix, busy_end, keys_only=True), *(_get(k) for k in by_key)])

        response = await self._with_retention(client, txn)
        if response is None:
            return False  # more ops than one transaction takes: split it
        if response.succeeded:
            return True
        self._busy[name] = (int(response.header.revision),
                            frozenset(kv.key[len(busy_prefix):].decode(errors="replace")
                                      for kv in _kvs(response.responses[0])))
        for run, op in zip(chunk, response.responses[1:], strict=True):
            prevs[run.key] = self._prev(_first(op), run.key)
        return False

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        """Newest first from the time index, in time slices, bounded by the limit and ``_SCAN_CAP``.

        etcd 3.4 walks the whole key range of a Range request in its index (even with a limit), so
        no request here spans more than a slice of time: the first covers the last second (and the
        future), an empty one makes the next four times wider, and one that holds more than a page
        makes the next as wide as a full page at the density just seen. (One wide slice may still
        walk many keys in the server's in-memory index once; values are read only up to the page.)
        A page ends with every run at its last instant (``RunQuery``), so the next page's cursor
        skips none.
        """
        limit = max(0, min(query.limit, MAX_LISTING))
        if limit == 0:
            return []
        return await self._call("runs", lambda c: self._scan(c, name, query, limit))

    async def _scan(self, client: Any, name: str, query: RunQuery, limit: int) -> list[RunRecord]:
        prefix = self._key(name, "time", "")
        floor_us = _us(query.since) if query.since is not None else 0
        top_us = _us(query.before) if query.before is not None else None
        start = prefix + _inv(top_us) if top_us is not None else prefix
        lo = (top_us if top_us is not None else _us(clock.time())) - _FIRST_SLICE_US
        width = _FIRST_SLICE_US
        filtered = query.job is not None or query.outcome is not None  # then expect to read more than shown
        found: list[RunRecord] = []
        tie_us: int | None = None  # once ``limit`` runs are found: the microsecond of the last one
        scanned = 0
        while scanned < _SCAN_CAP and len(found) < MAX_LISTING:
            lo = max(lo, floor_us)
            end = prefix + _inv(lo - 1) if lo > 0 else prefix_range_end(prefix)
            if start < end:
                page = min(_PAGE, _SCAN_CAP - scanned, _PAGE if filtered else max(50, 2 * (limit - len(found))))
                response = await self._range(client, start, end, page)
                kvs = list(response.kvs)
                scanned += len(kvs)
                for kv in kvs:
                    run = self._listed(kv, prefix)
                    if run is None or not query.matches(run):
                        continue
                    if tie_us is not None and _us(run.claimed_at) != tie_us:
                        continue  # older than the page's last instant (the next ranges end there)
                    found.append(run)
                    if tie_us is None and len(found) >= limit:
                        tie_us = _us(run.claimed_at)
                        floor_us = lo = max(floor_us, tie_us)
                if response.more and kvs:
                    start = kvs[-1].key + b"\0"
                    newest, oldest = self._slice_times(kvs, prefix)
                    width = max(1, (newest - oldest) * _PAGE // len(kvs))  # about a full page at this density
                    lo = max(floor_us, oldest - width)
                    continue
            start = end
            if lo <= floor_us:
                break
            width *= 4
            lo -= width
        # within one microsecond the index orders by key, the protocol by claimed_at: sort, then
        # keep the first ``limit`` and every other run at the instant of the last of them
        found.sort(key=lambda run: run.claimed_at, reverse=True)
        if len(found) > limit:
            last = found[limit - 1].claimed_at
            found = found[:limit] + [run for run in found[limit:] if run.claimed_at == last]
        return found[:MAX_LISTING]

    @staticmethod
    def _slice_times(kvs: Sequence[Any], prefix: bytes) -> tuple[int, int]:
        """The microseconds of the first (newest) and last (oldest) time index keys of a page."""
        def at(kv: Any) -> int:
            digits = kv.key[len(prefix):len(prefix) + _DIGITS]
            return _INV - int(digits) if digits.isdigit() else 0
        return at(kvs[0]), at(kvs[-1])

    def _listed(self, kv: Any, prefix: bytes) -> RunRecord | None:
        """A listed index entry as a run, or None for one that does not decode (listings skip those)."""
        try:
            key = kv.key[len(prefix) + _DIGITS + 1:].decode()
            return self._record(key, kv.value)
        except (ValueError, RecursionError):
            return None

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        """Records without a result, newest first: the open index holds nothing else, so this is cheap."""
        if limit <= 0:
            return []
        prefix = self._key(name, "open", "")

        async def scan(client: Any) -> list[RunRecord]:
            found: list[RunRecord] = []
            start, end = prefix, prefix_range_end(prefix)
            scanned = 0
            while len(found) < limit and scanned < _SCAN_CAP:
                response = await self._range(client, start, end, min(_PAGE, limit - len(found) + 10))
                kvs = list(response.kvs)
                scanned += len(kvs)
                found += [run for run in (self._listed(kv, prefix) for kv in kvs)
                          if run is not None and run.result is None]
                if not response.more or not kvs:
                    break
                start = kvs[-1].key + b"\0"
            return found[:limit]

        return await self._call("unfinished", scan)

    # -- SettingStore -------------------------------------------------------------------

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        setting = self._key(name, "settings", key)
        if value is None:
            await self._call("set_setting", lambda c: self._txn(c, [], [_delete(setting)]))
        else:
            await self._call("set_setting", lambda c: self._txn(c, [], [_put(setting, value.encode())]))

    async def settings(self, name: str) -> dict[str, str]:
        prefix = self._key(name, "settings", "")
        response = await self._call("settings", lambda c: self._range(c, prefix, prefix_range_end(prefix)))
        found = {}
        for kv in response.kvs:
            try:
                found[kv.key[len(prefix):].decode()] = kv.value.decode()
            except UnicodeDecodeError as exc:
                raise self._corrupt(kv.key, "a setting", exc) from None
        return found

    def __repr__(self) -> str:
        return f"EtcdBackend({redact(self.url)!r})"


def _describe(exc: BaseException) -> str:
    """An error as a log line: a gRPC status with its code, not the status object's repr."""
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError):
            return f"{err.code()} {err.details()!r}"
    return str(exc) or type(exc).__name__


async def _all_or_first_error(coros: Sequence[Awaitable[None]]) -> None:
    """Run ``coros`` concurrently; on the first failure cancel the others, wait for them, raise it.

    Unlike ``asyncio.gather`` nothing is left running unobserved, and unlike a TaskGroup the
    error comes out as itself (``_call``'s typed errors), not in an ExceptionGroup.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
