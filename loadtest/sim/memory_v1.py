"""An in-memory store for today's (pre-window) LockBackend protocol, for the simulator only.

Phase A of the simulator runs the node core of the old main, whose protocol
has per-key claims (``claim``, ``claim_many``) and ``record``/``runs``. This
backend gives it the semantics of the server backends of that code (the
Redis Lua scripts, the PostgreSQL transactions): a claim is refused if its
token is not the lock's current one or if the key was ever claimed, by any
token, this one included (claims are not idempotent there); ``release`` and
``renew`` check the lease's token and nonce. Once the core moves to claim
windows, ``lock_backends.memory`` (the reference backend of the new protocol,
held to the contract suite) replaces this module.

Every operation yields to the event loop once and then applies atomically,
as a server-side script or transaction does. The store keeps time on its own
clocks (``server_monotonic``, ``server_time``), never on the caller's; the
caller's monotonic clock is read only for ``t_sent`` of a lease deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lock_backends import Holder, Lease, RunRecord
from lock_backends.base import local_deadline


@dataclass
class LockState:
    holder: Holder | None = None
    token: int = 0
    nonce: int = 0
    expires: float = 0.0  # server monotonic
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


@dataclass
class Store:
    server_monotonic: Callable[[], float]
    server_time: Callable[[], float]
    locks: dict[str, LockState] = field(default_factory=dict)
    claims: dict[str, dict[str, RunRecord]] = field(default_factory=dict)
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    nonces: int = 0

    def lock(self, name: str) -> LockState:
        state = self.locks.get(name)
        if state is None:
            state = self.locks[name] = LockState()
        return state

    def live(self, state: LockState) -> bool:
        return state.holder is not None and state.expires > self.server_monotonic()

    def notify(self, state: LockState) -> None:
        waiters, state.waiters = state.waiters, []
        for woken in waiters:
            _wake(woken)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


class MemoryBackendV1:
    """One client of a ``Store``. ``caller_monotonic`` reads the calling host's monotonic clock."""

    kind = "memory"
    address = "memory://sim"

    def __init__(self, store: Store, caller_monotonic: Callable[[], float]) -> None:
        self.store = store
        self._caller_monotonic = caller_monotonic

    def _current(self, state: LockState, lease: Lease) -> bool:
        return self.store.live(state) and state.token == lease.token and str(state.nonce) == lease.handle

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = self._caller_monotonic()
        await asyncio.sleep(0)
        store = self.store
        state = store.lock(name)
        if store.live(state):
            return None
        store.nonces += 1
        state.holder, state.token, state.nonce = holder, state.token + 1, store.nonces
        state.expires = store.server_monotonic() + ttl
        store.notify(state)
        return Lease(name, holder, state.token, ttl, local_deadline(t_sent, ttl), handle=str(state.nonce))

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = self._caller_monotonic()
        await asyncio.sleep(0)
        state = self.store.lock(lease.name)
        if not self._current(state, lease):
            return None
        state.expires = self.store.server_monotonic() + lease.ttl
        return Lease(lease.name, lease.holder, lease.token, lease.ttl, local_deadline(t_sent, lease.ttl),
                     handle=lease.handle)

    async def release(self, lease: Lease) -> None:
        await asyncio.sleep(0)
        state = self.store.lock(lease.name)
        if self._current(state, lease):
            state.holder = None
            state.expires = 0.0
            self.store.notify(state)

    async def leader(self, name: str) -> Holder | None:
        await asyncio.sleep(0)
        state = self.store.lock(name)
        return state.holder if self.store.live(state) else None

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Wake on acquire or release, or when the holder's lease would run out (one look then).

        (A future and a timer rather than ``wait_for(event.wait())``: the same wake-ups without a task
        per wait; followers wait all the time, and the simulator pays for every step.)
        """
        state = self.store.lock(name)
        wait = timeout
        if self.store.live(state):
            wait = min(timeout, state.expires - self.store.server_monotonic())
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        state.waiters.append(woken)
        timer = loop.call_later(max(0.0, wait), _wake, woken)
        try:
            await woken
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                state.waiters.remove(woken)

    async def claim(self, lease: Lease, key: str) -> bool:
        return key in await self.claim_many(lease, [key])

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        await asyncio.sleep(0)
        state = self.store.lock(lease.name)
        if not self._current(state, lease):
            return set()
        claims = self.store.claims.setdefault(lease.name, {})
        now = self.store.server_time()
        claimed: set[str] = set()
        for key in dict.fromkeys(keys):
            if key not in claims:
                claims[key] = RunRecord(key, lease.token, lease.holder.node_id, now)
                claimed.add(key)
        return claimed

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        await self.record_many(name, {key: result})

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        await asyncio.sleep(0)
        claims = self.store.claims.setdefault(name, {})
        for key, result in results.items():
            found = claims.get(key)
            if found is not None:
                claims[key] = RunRecord(found.key, found.token, found.node_id, found.claimed_at, dict(result))

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        await asyncio.sleep(0)
        claims = self.store.claims.get(name, {})
        ordered = sorted(claims.values(), key=lambda r: r.claimed_at, reverse=True)
        return ordered[:limit]

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        await asyncio.sleep(0)
        settings = self.store.settings.setdefault(name, {})
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value

    async def settings(self, name: str) -> dict[str, str]:
        await asyncio.sleep(0)
        return dict(self.store.settings.get(name, {}))

    async def close(self) -> None:
        return None
