"""The etcd backend's plumbing: one client at a time, failover between endpoints, errors, raw requests.

Apart from ``etcd`` so that the backend's other modules (``etcd`` for the
lease, ``etcd_claims`` for windows and claims, ``etcd_runs`` for run records)
read as etcd transactions, with what gRPC and aetcd need in this one place.
``EtcdPlumbing`` is the base class of ``etcd.EtcdBackend``: the other modules'
classes derive from it and reach the cluster only through its methods.

aetcd's ``Client`` talks to one endpoint, so this keeps one client at a time
and moves to the next endpoint of the URL when a call fails for want of a
connection. Every call goes through ``_call``, which bounds it by the
operation timeout and is the only place client and gRPC errors are
translated (``BackendUnavailable`` when another member or a later retry might
answer, ``LockBackendError`` otherwise). ``_txn`` and ``_range`` are the raw
requests: aetcd's helpers hide the transaction header, range limits and
compares on key ranges, which the backend needs.

Run records share *retention leases* (``_retention_lease``): one lease for
all the records written within a tenth of the retention, so they expire
without one lease each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aetcd
import grpc
from aetcd import rpc
from aetcd.exceptions import (
    ClientError,
    ConnectionFailedError,
    ConnectionTimeoutError,
    WatchTimeoutError,
)

from lock_backends import clock
from lock_backends._common import compact_json
from lock_backends.errors import BackendUnavailable, CorruptValue, LockBackendError
from lock_backends.url import BackendOptions

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
TXN_OPS = 128
#: Tries of an optimistic transaction whose compare failed, with what its failure branch read.
TRIES = 8


class ChannelClosed(Exception):
    """A call ended because its channel went away (failover or close), not through a real cancel."""


#: Everything aetcd or gRPC may raise for a failed call; programming errors are left alone.
CLIENT_ERRORS = (ClientError, grpc.RpcError, grpc.aio.BaseError, OSError, ChannelClosed)


def is_connection_error(exc: BaseException) -> bool:
    """True when another member (or a later retry) might succeed where this call failed.

    That includes every status that means the channel died under the call (INTERNAL from gRPC's
    core, UNKNOWN "Stream removed") or that the member could not reach the Raft leader (UNKNOWN
    "context deadline exceeded"), not only UNAVAILABLE: an etcd member that is killed leaves its
    streams, and the members that forwarded to it, in exactly those states, and the next member
    (or the same one, once a new leader is elected) can answer.
    """
    if isinstance(exc, ConnectionFailedError | ConnectionTimeoutError | WatchTimeoutError | OSError
                  | grpc.aio.UsageError | grpc.aio.InternalError | ChannelClosed):
        return True
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError):
            if err.code() in _UNAVAILABLE_CODES:
                return True
            details = f"{err.details()} {err.debug_error_string()}".lower()
            return err.code() == grpc.StatusCode.UNKNOWN and any(d in details for d in _TRANSPORT_DETAILS)
    return False


def lease_not_found(exc: BaseException) -> bool:
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError) and "lease not found" in str(err.details()):
            return True
    return isinstance(exc, ClientError) and "lease not found" in str(exc)


def cancelled_by_channel() -> bool:
    """gRPC raises CancelledError for calls its channel cancelled; tell those from a real cancel."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _describe(exc: BaseException) -> str:
    """An error as a log line: a gRPC status with its code, not the status object's repr."""
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError):
            return f"{err.code()} {err.details()!r}"
    return str(exc) or type(exc).__name__


def whole_seconds(ttl: float) -> int:
    """etcd leases are whole seconds: round up, so the server never ends a lease before we do."""
    return max(1, math.ceil(ttl))


def json_value(data: Any) -> bytes:
    """A value as the backend stores it: compact JSON, UTF-8.

    Through text, not orjson's bytes as they come: a batch keeps thousands of values alive until written, and
    kept, orjson's own bytes cost about seven times as much per value as its text encoded again (3.1 µs
    against 0.48 µs a record of 184 bytes, measured: 500 kept in a list)."""
    return compact_json(data).encode()


@functools.lru_cache(maxsize=64)
def _root(name: str) -> str:
    return f"/baton/{quote(name, safe='')}/"


def etcd_key(name: str, *parts: str) -> bytes:
    """The key ``/baton/<name, quoted>/<parts joined by />`` (the layout is in ``etcd``'s docstring)."""
    return (_root(name) + "/".join(parts)).encode()


#: Time index keys (run records, segments): ``INV - microseconds`` in ``DIGITS`` digits, so ascending key
#: order is newest first.
DIGITS = 16
INV: int = 10**DIGITS - 1


def to_us(seconds: float) -> int:
    """Unix seconds as whole microseconds, clamped to what a time index key can hold."""
    return min(INV, max(0, math.floor(seconds * 1_000_000)))


def inv(us: int) -> bytes:
    """The time index component of microsecond ``us``."""
    return f"{INV - us:0{DIGITS}d}".encode()


# -- raw etcd requests: aetcd's helpers hide the txn header, range limits and compares on ranges ------


def cmp(key: bytes, target: str, value: int, result: str = "EQUAL", range_end: bytes = b"") -> Any:
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version"}[target]
    return rpc.Compare(key=key, range_end=range_end, target=getattr(rpc.Compare, target),
                       result=getattr(rpc.Compare, result), **{field: value})


def put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def get(key: bytes, range_end: bytes = b"", keys_only: bool = False) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end, keys_only=keys_only))


def delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def range_kvs(response_op: Any) -> list[Any]:
    """The key-values a ``get`` inside a transaction answered."""
    return list(response_op.response_range.kvs)


def first_kv(response_op: Any) -> Any | None:
    """The first key-value a ``get`` inside a transaction answered, or None."""
    kvs = response_op.response_range.kvs
    return kvs[0] if kvs else None


class EtcdPlumbing:
    """The connection to an etcd cluster: the current client, failover, ``_call``, raw requests."""

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

    def _corrupt(self, key: bytes, what: str, exc: BaseException | str) -> CorruptValue:
        return CorruptValue(f"{what} does not decode: {exc}", key=key.decode(errors="replace"),
                            backend=self.kind, address=self.address)

    def _endpoint_in_turn(self, i: int) -> tuple[str, int]:
        """The ``i``-th endpoint counting from the current one (for what tries them in turn)."""
        return self._endpoints[(self._index + i) % len(self._endpoints)]

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

    async def _close_channels(self) -> None:
        """Close every channel, the retiring ones too, without waiting out their grace."""
        client, self._client = self._client, None
        retiring = list(self._disposals.items())
        for task, _ in retiring:
            task.cancel()
        clients = [c for _, c in retiring] + ([client] if client is not None else [])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.op_timeout):
                await asyncio.gather(*(t for t, _ in retiring), return_exceptions=True)
                await asyncio.gather(*(self._dispose(c, grace=None) for c in clients))

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
                            if not cancelled_by_channel():
                                raise
                            raise ChannelClosed("the channel was closed under the call") from None
                    except CLIENT_ERRORS as exc:
                        if not is_connection_error(exc) or attempts >= len(self._endpoints):
                            raise
                        self._failover(client)
        except TimeoutError:
            self._failover(client)
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s (last tried {endpoint})",
                                     backend=self.kind, address=self.address) from None
        except CLIENT_ERRORS as exc:
            if is_connection_error(exc):
                self._failover(client)
                raise BackendUnavailable(f"{what} failed on {endpoint}: {_describe(exc)}", backend=self.kind,
                                         address=self.address) from None
            raise LockBackendError(f"{what} failed on {endpoint}: {_describe(exc)}", backend=self.kind,
                                   address=self.address) from None

    def _gave_up(self, what: str, changing: str) -> LockBackendError:
        """The error of an optimistic transaction whose compares kept failing for ``TRIES`` tries."""
        return LockBackendError(f"{what}: {changing} kept changing under {TRIES} tries",
                                backend=self.kind, address=self.address)

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

    async def _get_one(self, client: Any, key: bytes) -> tuple[Any | None, int]:
        """The key-value at ``key`` (or None) and the revision the cluster answered at."""
        response = await self._range(client, key)
        return (response.kvs[0] if response.kvs else None), int(response.header.revision)

    async def _revoke(self, client: Any, lease_id: int) -> None:
        """Revoke a lease; one that already expired (or was revoked by a retry) is fine."""
        try:
            await client.revoke_lease(lease_id)
        except ClientError as exc:
            if not lease_not_found(exc):
                raise

    async def _revoke_quietly(self, lease_ids: list[int]) -> None:
        """Best effort: a lease we fail to revoke still ends after its TTL."""
        if lease_ids:
            with contextlib.suppress(LockBackendError):
                await self._call("revoke", lambda c: asyncio.gather(*(self._revoke(c, i) for i in lease_ids)))

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
        except CLIENT_ERRORS as exc:
            if not lease_not_found(exc):
                raise
            self._retention = None  # revoked, or lost with the data: grant another
            return await txn(await self._retention_lease(client))
