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
    /baton/N/runs/<key>         a record of its own: a claim or intent (result null), or the outcome replacing it
    /baton/N/time/<inv>/<key>   the same record, indexed by time for ``runs()``
    /baton/N/open/<inv>/<key>   the same record once more while it has no result, for ``unfinished()``
    /baton/N/seg/<inv>/<digest> a segment: the outcomes of a batch's runs that had no record of their own
    /baton/N/settings/<key>     a setting's value (UTF-8); no lease

The backend is seven modules, each a part a reader can take on its own:

``etcd`` (this one)
    ``EtcdBackend``: the URL, the lease (acquire, renew, release, leader,
    the watch that waits for a change) and settings.
``etcd_client``
    the plumbing under everything: one client at a time, failover between the
    URL's endpoints, the one place errors are translated, raw requests.
``etcd_claims``
    claim windows, hand-back and claims: fenced transactions, and why they are atomic.
``etcd_runs``
    run records: the keys of a record of its own, batched writes, ``unfinished``.
``etcd_segments``
    segments: a batch of outcomes as a few values, and why a key is in one place.
``etcd_listing``
    ``runs()``: newest first across records of their own and segments.
``etcd_clock``
    ``server_time``: the server's clock from its HTTP ``Date`` header.

Values that do not decode raise ``CorruptValue`` (naming the etcd key), except
in listings, which skip them.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from lock_backends import clock
from lock_backends._common import renewed
from lock_backends.base import Holder, Lease, local_deadline
from lock_backends.errors import LockBackendError
from lock_backends.etcd_claims import EtcdClaims
from lock_backends.etcd_client import (
    CLIENT_ERRORS,
    ChannelClosed,
    cancelled_by_channel,
    cmp,
    delete,
    etcd_key,
    first_kv,
    get,
    put,
    whole_seconds,
)
from lock_backends.etcd_clock import ServerClock
from lock_backends.etcd_runs import EtcdRuns
from lock_backends.url import BackendOptions, bad_url, parse_options, redact


def _parse_endpoint(url: str, item: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep or not host or "]" in port:
        raise bad_url(url, f"etcd endpoint {item.strip()!r} needs host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise bad_url(url, f"etcd endpoint {item.strip()!r} has a bad port")
    return host, int(port)


class EtcdBackend(EtcdClaims, EtcdRuns):
    """Leases in an etcd v3 cluster, reached through any of the URL's endpoints."""

    def __init__(self, url: str, endpoints: list[tuple[str, int]], options: BackendOptions) -> None:
        super().__init__(url, endpoints, options)
        #: Last revision at which this instance saw each lock; a watch resumes after it.
        self._seen: dict[str, int] = {}
        self._clock = ServerClock(self._endpoint_in_turn, len(endpoints), options.op_timeout, self.kind,
                                  self.address)

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

    def _holder(self, kv: Any) -> Holder:
        try:
            return Holder.from_json(kv.value)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise self._corrupt(kv.key, "the lock's holder", exc) from None

    def _note_revision(self, name: str, revision: int) -> None:
        self._seen[name] = max(revision, self._seen.get(name, 0))

    # -- LeaseStore ------------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        lock = etcd_key(name, "lock")
        value = holder.to_json().encode()
        granted: list[int] = []

        async def attempt(client: Any) -> Any:
            # Repeatable: a retry grants another lease; if an earlier attempt's put
            # did land, the failure branch shows the key on a lease in ``granted``.
            grant = await client.lease(whole_seconds(ttl))
            granted.append(int(grant.id))
            response = await self._txn(client, [cmp(lock, "CREATE", 0)],
                                       [put(lock, value, int(grant.id)), get(lock)], [get(lock)])
            return first_kv(response.responses[-1]), int(response.header.revision)

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

    async def renew(self, lease: Lease) -> Lease | None:
        lock = etcd_key(lease.name, "lock")
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
        return renewed(lease, t_sent)

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
            raise ChannelClosed(f"keepalive stream already finished: {exc}") from None
        finally:
            call.cancel()
        if reply is grpc.aio.EOF:
            raise ChannelClosed("keepalive stream ended without a reply")
        return reply

    async def release(self, lease: Lease) -> None:
        lock = etcd_key(lease.name, "lock")
        lease_id = int(lease.handle or 0)

        async def attempt(client: Any) -> None:
            # Repeatable: the compare fails once the key is gone; revoke ignores "not found".
            await self._txn(client, [cmp(lock, "CREATE", lease.token)], [delete(lock)])
            if lease_id:
                await self._revoke(client, lease_id)

        await self._call("release", attempt)

    async def leader(self, name: str) -> Holder | None:
        kv, revision = await self._call("leader", lambda c: self._get_one(c, etcd_key(name, "lock")))
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
        lock = etcd_key(name, "lock")
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
        except (*CLIENT_ERRORS, asyncio.InvalidStateError):
            return  # the stream broke: the lock may well have changed
        except asyncio.CancelledError:
            if not cancelled_by_channel():
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
            raise ChannelClosed(f"watch stream already finished: {exc}") from None
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
        """The server's wall clock, from the edge of its HTTP ``Date`` second (see ``etcd_clock``)."""
        return await self._clock.read()

    async def close(self) -> None:
        """Close every channel, the retiring ones too, without waiting out their grace."""
        await self._clock.close()
        await self._close_channels()

    # -- SettingStore -------------------------------------------------------------------

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        setting = etcd_key(name, "settings", key)
        if value is None:
            await self._call("set_setting", lambda c: self._txn(c, [], [delete(setting)]))
        else:
            await self._call("set_setting", lambda c: self._txn(c, [], [put(setting, value.encode())]))

    async def settings(self, name: str) -> dict[str, str]:
        prefix = etcd_key(name, "settings", "")
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
