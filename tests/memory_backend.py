"""An in-memory LockBackend for unit tests of the elector: shared store, switchable outages.

Not a backend of Baton (the contract tests run real servers); it lets a test
cut the store off, slow it down, or watch handoffs without timing noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lock_backends import BackendUnavailable, Holder, Lease, RunRecord
from lock_backends.base import claim_each, local_deadline, record_each


@dataclass
class Store:
    holder: Holder | None = None
    token: int = 0
    expires: float = 0.0
    claims: dict[str, RunRecord] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    down: bool = False
    delay: float = 0.0

    def live(self) -> bool:
        return self.holder is not None and self.expires > time.monotonic()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class MemoryBackend:
    kind = "memory"
    address = "memory"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _gate(self) -> None:
        if self.store.delay:
            await asyncio.sleep(self.store.delay)
        if self.store.down:
            raise BackendUnavailable("store is down", backend="memory", address="memory")

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = time.monotonic()
        await self._gate()
        if self.store.live():
            return None
        self.store.holder, self.store.token = holder, self.store.token + 1
        self.store.expires = time.monotonic() + ttl
        self.store.notify()
        return Lease(name, holder, self.store.token, ttl, local_deadline(t_sent, ttl))

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = time.monotonic()
        await self._gate()
        if not self.store.live() or self.store.token != lease.token:
            return None
        self.store.expires = time.monotonic() + lease.ttl
        return Lease(lease.name, lease.holder, lease.token, lease.ttl, local_deadline(t_sent, lease.ttl))

    async def release(self, lease: Lease) -> None:
        await self._gate()
        if self.store.token == lease.token and self.store.live():
            self.store.holder = None
            self.store.notify()

    async def leader(self, name: str) -> Holder | None:
        await self._gate()
        return self.store.holder if self.store.live() else None

    async def wait_for_change(self, name: str, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.store.changed.wait(), timeout)

    async def claim(self, lease: Lease, key: str) -> bool:
        await self._gate()
        if not self.store.live() or self.store.token != lease.token or key in self.store.claims:
            return False
        self.store.claims[key] = RunRecord(key, lease.token, lease.holder.node_id, time.time())
        return True

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        return await claim_each(self.claim, lease, keys)

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        await record_each(self.record, name, results)

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        await self._gate()
        if key in self.store.claims:
            r = self.store.claims[key]
            self.store.claims[key] = RunRecord(r.key, r.token, r.node_id, r.claimed_at, result)

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        await self._gate()
        return sorted(self.store.claims.values(), key=lambda r: r.claimed_at, reverse=True)[:limit]

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        await self._gate()
        if value is None:
            self.store.settings.pop(key, None)
        else:
            self.store.settings[key] = value

    async def settings(self, name: str) -> dict[str, str]:
        await self._gate()
        return dict(self.store.settings)

    async def close(self) -> None:
        return None
