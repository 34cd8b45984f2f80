"""etcd backend: a lease plus a ``create_revision == 0`` transaction, as etcd's own election does.

The lock key is attached to an etcd lease, so the server deletes it when the
holder stops renewing. The fencing token is the key's create revision: etcd's
revision counter is cluster-wide and never goes back, so every new incarnation
of the key gets a larger one, with no separate counter to keep in step.

Keys, for a lock named N (quoted, so a ``/`` in N cannot reach another lock's
keys): ``/baton/N/lock`` (holder JSON, on the holder's lease),
``/baton/N/claims/<key>`` (claim JSON, later with its result, on a shared
retention lease) and ``/baton/N/settings/<key>`` (no lease).

aetcd's ``Client`` talks to one endpoint, so this module keeps one client at a
time and moves to the next endpoint of the URL when a call fails for want of a
connection. Every call goes through ``_call``, which bounds it by the operation
timeout and is the only place client and gRPC errors are translated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aetcd
import grpc
from aetcd import rpc
from aetcd.exceptions import ClientError, ConnectionFailedError, ConnectionTimeoutError, WatchTimeoutError
from aetcd.utils import prefix_range_end

from lock_backends.base import Holder, Lease, RunRecord, claim_each, local_deadline, record_each
from lock_backends.errors import BackendUnavailable, LockBackendError
from lock_backends.url import BackendOptions, bad_url, parse_options, redact

T = TypeVar("T")

#: gRPC retries a lost connection with exponential backoff (up to two minutes by
#: default); keep it short so a restarted member is used again within a second.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}

#: Status codes that say "this member could not answer", not "the request is wrong".
_UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED})

#: A retention lease is reused for this fraction of the retention, then replaced.
_RETENTION_ROTATE = 0.1


class _ChannelClosed(Exception):
    """A call ended because its channel went away (failover or close), not through a real cancel."""


#: Everything aetcd or gRPC may raise for a failed call; programming errors are left alone.
_CLIENT_ERRORS = (ClientError, grpc.RpcError, grpc.aio.BaseError, OSError, _ChannelClosed)


def _is_connection_error(exc: BaseException) -> bool:
    """True when another member (or a later retry) might succeed where this call failed."""
    if isinstance(exc, ConnectionFailedError | ConnectionTimeoutError | WatchTimeoutError | OSError
                  | grpc.aio.UsageError | _ChannelClosed):
        return True
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError):
            return err.code() in _UNAVAILABLE_CODES
    return False


def _cancelled_by_channel() -> bool:
    """gRPC raises CancelledError for calls its channel cancelled; tell those from a real cancel."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _lease_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and "lease not found" in str(exc)


def _first_kv(range_result: Any) -> Any | None:
    """The one KeyValue of a Get inside a transaction (aetcd gives [(value, Get)]), or None."""
    if isinstance(range_result, list) and range_result:
        return range_result[0][1]
    return None


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


#: Claim keys per transaction: etcd refuses a transaction of more than 128 operations by default.
_TXN_KEYS = 100


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
    def _key(name: str, *parts: str) -> bytes:
        return "/".join(("/baton", quote(name, safe=""), *parts)).encode()

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
                raise BackendUnavailable(f"{what} failed on {endpoint}: {exc}", backend=self.kind,
                                         address=self.address) from None
            raise LockBackendError(f"{what} failed on {endpoint}: {exc}", backend=self.kind,
                                   address=self.address) from None

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

    # -- protocol ----------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        lock = self._key(name, "lock")
        value = holder.to_json().encode()
        granted: list[int] = []

        async def attempt(client: Any) -> Any:
            # Repeatable: a retry grants another lease; if an earlier attempt's put
            # did land, the failure branch shows the key on a lease in ``granted``.
            grant = await client.lease(_whole_seconds(ttl))
            granted.append(grant.id)
            tx = client.transactions
            _, responses = await client.transaction(
                compare=[tx.create(lock) == 0],
                success=[tx.put(lock, value, lease=grant.id), tx.get(lock)],
                failure=[tx.get(lock)])
            return _first_kv(responses[-1])

        t_sent = time.monotonic()
        # A follower asks while the lock is held almost every time: a plain read answers that without
        # granting a lease and revoking it again (three calls to the cluster instead of one).
        held = await self._call("acquire", lambda c: c.get(lock))
        if held is not None:
            self._note_revision(name, held.header.revision)
            return None
        kv = await self._call("acquire", attempt)
        if kv is not None:
            self._note_revision(name, kv.header.revision)
        if kv is None or kv.lease not in granted:
            await self._revoke_quietly(granted)
            return None
        await self._revoke_quietly([i for i in granted if i != kv.lease])
        return Lease(name, holder, int(kv.create_revision), ttl, local_deadline(t_sent, ttl),
                     handle=str(kv.lease))

    async def renew(self, lease: Lease) -> Lease | None:
        lock = self._key(lease.name, "lock")
        lease_id = int(lease.handle or 0)

        async def attempt(client: Any) -> bool:
            # Repeatable: a keepalive only pushes the expiry forward.
            reply = await self._keepalive(client, lease_id)
            if reply.TTL <= 0:
                return False
            kv = await client.get(lock)
            return kv is not None and kv.create_revision == lease.token and kv.lease == lease_id

        t_sent = time.monotonic()
        if not lease_id or not await self._call("renew", attempt):
            return None
        return Lease(lease.name, lease.holder, lease.token, lease.ttl,
                     local_deadline(t_sent, lease.ttl), handle=lease.handle)

    async def _keepalive(self, client: Any, lease_id: int) -> Any:
        """One keepalive on a stream of its own, closed here rather than left to the GC."""
        await client.connect()
        call = client.leasestub.LeaseKeepAlive(timeout=self.options.op_timeout, metadata=client.metadata)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            reply = await call.read()
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
            tx = client.transactions
            await client.transaction(compare=[tx.create(lock) == lease.token],
                                     success=[tx.delete(lock)], failure=[])
            if lease_id:
                await self._revoke(client, lease_id)

        await self._call("release", attempt)

    async def leader(self, name: str) -> Holder | None:
        kv = await self._call("leader", lambda c: c.get(self._key(name, "lock")))
        if kv is None:
            return None
        self._note_revision(name, kv.header.revision)
        return Holder.from_json(kv.value)

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
        except _CLIENT_ERRORS:
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

    async def claim(self, lease: Lease, key: str) -> bool:
        lock = self._key(lease.name, "lock")
        claim_key = self._key(lease.name, "claims", key)
        nonce = secrets.token_hex(8)
        value = json.dumps({"token": lease.token, "node_id": lease.holder.node_id,
                            "claimed_at": time.time(), "nonce": nonce}, separators=(",", ":")).encode()

        async def txn(client: Any, retention: int) -> tuple[bool, Any]:
            tx = client.transactions
            ok, responses = await client.transaction(
                compare=[tx.create(lock) == lease.token, tx.create(claim_key) == 0],
                success=[tx.put(claim_key, value, lease=retention)],
                failure=[tx.get(claim_key)])
            return ok, (None if ok else _first_kv(responses[-1]))

        async def attempt(client: Any) -> bool:
            # Repeatable: if an earlier attempt's put landed, the claim carries our nonce.
            try:
                ok, kv = await txn(client, await self._retention_lease(client))
            except ClientError as exc:
                if not _lease_not_found(exc):
                    raise
                self._retention = None  # revoked or lost with the data: grant another
                ok, kv = await txn(client, await self._retention_lease(client))
            return ok or (kv is not None and json.loads(kv.value).get("nonce") == nonce)

        return await self._call("claim", attempt)

    async def _retention_lease(self, client: Any) -> int:
        """A lease shared by recent claims, so claims expire without one lease each.

        It lives for the retention plus its reuse period, so every claim is kept
        for at least ``claim_retention`` (and at most 10% longer).
        """
        period = self.options.claim_retention * _RETENTION_ROTATE
        async with self._retention_lock:
            now = time.monotonic()
            if self._retention is None or now - self._retention[1] >= period:
                grant = await client.lease(math.ceil(self.options.claim_retention + period))
                self._retention = (int(grant.id), now)
            return self._retention[0]

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        """One transaction per chunk of keys; a chunk that meets a claimed key goes key by key."""
        unique = list(dict.fromkeys(keys))
        claimed: set[str] = set()
        for i in range(0, len(unique), _TXN_KEYS):
            chunk = unique[i:i + _TXN_KEYS]
            mine, free = await self._claim_chunk(lease, chunk)
            claimed |= mine
            if free:
                claimed |= await claim_each(self.claim, lease, free)
        return claimed

    async def _claim_chunk(self, lease: Lease, chunk: list[str]) -> tuple[set[str], list[str]]:
        """All of ``chunk`` in one transaction: (keys claimed, keys still free to claim one by one)."""
        lock = self._key(lease.name, "lock")
        names = {key: self._key(lease.name, "claims", key) for key in chunk}
        nonce = secrets.token_hex(8)
        value = json.dumps({"token": lease.token, "node_id": lease.holder.node_id,
                            "claimed_at": time.time(), "nonce": nonce}, separators=(",", ":")).encode()

        async def txn(client: Any, retention: int) -> tuple[bool, list[Any]]:
            tx = client.transactions
            ok, responses = await client.transaction(
                compare=[tx.create(lock) == lease.token, *(tx.create(n) == 0 for n in names.values())],
                success=[tx.put(n, value, lease=retention) for n in names.values()],
                failure=[tx.get(n) for n in names.values()])
            return ok, ([] if ok else [_first_kv(r) for r in responses])

        async def attempt(client: Any) -> tuple[set[str], list[str]]:
            # Repeatable: keys an earlier attempt's put claimed carry our nonce.
            try:
                ok, kvs = await txn(client, await self._retention_lease(client))
            except ClientError as exc:
                if not _lease_not_found(exc):
                    raise
                self._retention = None
                ok, kvs = await txn(client, await self._retention_lease(client))
            if ok:
                return set(chunk), []
            mine = {key for key, kv in zip(chunk, kvs, strict=True)
                    if kv is not None and json.loads(kv.value).get("nonce") == nonce}
            free = [key for key, kv in zip(chunk, kvs, strict=True) if kv is None]
            return mine, free

        return await self._call("claim", attempt)

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        await record_each(self.record, name, results)

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        claim_key = self._key(name, "claims", key)
        json.dumps(result)  # fail here, not half-way, on a result that is not JSON

        async def attempt(client: Any) -> None:
            # Repeatable: writing the same result twice leaves the same value.
            tx = client.transactions
            for _ in range(5):  # compare-and-swap, in case two writers race
                kv = await client.get(claim_key)
                if kv is None:
                    return  # never claimed, or expired
                data = json.loads(kv.value)
                data["result"] = result
                ok, _ = await client.transaction(
                    compare=[tx.mod(claim_key) == kv.mod_revision],
                    success=[tx.put(claim_key, json.dumps(data, separators=(",", ":")).encode(),
                                    lease=kv.lease)],
                    failure=[])
                if ok:
                    return

        await self._call("record", attempt)

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        if limit <= 0:
            return []
        prefix = self._key(name, "claims", "")

        async def attempt(client: Any) -> list[Any]:
            # aetcd's get_prefix has no limit; ask the server for only what is shown.
            await client.connect()
            request = rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), limit=limit,
                                       sort_order=rpc.RangeRequest.DESCEND,
                                       sort_target=rpc.RangeRequest.CREATE)
            response = await client.kvstub.Range(request, timeout=self.options.op_timeout,
                                                 metadata=client.metadata)
            return list(response.kvs)

        records = []
        for kv in await self._call("runs", attempt):
            data = json.loads(kv.value)
            records.append(RunRecord(key=kv.key[len(prefix):].decode(), token=int(data["token"]),
                                     node_id=str(data["node_id"]), claimed_at=float(data["claimed_at"]),
                                     result=data.get("result")))
        return records

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        setting = self._key(name, "settings", key)
        if value is None:
            await self._call("set_setting", lambda c: c.delete(setting))
        else:
            await self._call("set_setting", lambda c: c.put(setting, value.encode()))

    async def settings(self, name: str) -> dict[str, str]:
        prefix = self._key(name, "settings", "")
        found = await self._call("settings", lambda c: c.get_prefix(prefix))
        return {kv.key[len(prefix):].decode(): kv.value.decode() for kv in found}

    async def close(self) -> None:
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

    def __repr__(self) -> str:
        return f"EtcdBackend({redact(self.url)!r})"
