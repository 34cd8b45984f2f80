"""A LockBackend wrapper that feeds ``baton_lock_ops_total`` and ``baton_lock_op_seconds``.

Kept apart from the backends so they stay free of metrics, and so every
operation, from the elector or the scheduler, is counted in one place.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from lock_backends import (
    BackendUnavailable,
    BusyRun,
    Holder,
    Lease,
    LockBackend,
    LockBackendError,
    RunQuery,
    RunRecord,
    Window,
)
from lock_backends.url import BackendOptions
from node.metrics import Metrics

T = TypeVar("T")


class InstrumentedBackend:
    def __init__(self, inner: LockBackend, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.kind = inner.kind
        self.address = inner.address
        self.options: BackendOptions = inner.options

    async def _timed(self, op: str, call: Awaitable[T], *, refusal: bool = False) -> T:
        """Time ``call``; with ``refusal``, a None or False answer counts as refused rather than ok."""
        t0 = time.perf_counter()
        try:
            result = await call
        except BackendUnavailable:
            self.metrics.lock_op(op, "unavailable", time.perf_counter() - t0)
            raise
        except LockBackendError:
            self.metrics.lock_op(op, "error", time.perf_counter() - t0)
            raise
        refused = refusal and (result is None or result is False)
        self.metrics.lock_op(op, "refused" if refused else "ok", time.perf_counter() - t0)
        return result

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        return await self._timed("acquire", self.inner.acquire(name, holder, ttl), refusal=True)

    async def renew(self, lease: Lease) -> Lease | None:
        return await self._timed("renew", self.inner.renew(lease), refusal=True)

    async def release(self, lease: Lease) -> None:
        await self._timed("release", self.inner.release(lease))

    async def leader(self, name: str) -> Holder | None:
        return await self._timed("leader", self.inner.leader(name))

    async def wait_for_change(self, name: str, timeout: float) -> None:
        await self.inner.wait_for_change(name, timeout)  # a wait, not an operation worth timing

    async def server_time(self) -> float | None:
        return await self._timed("server_time", self.inner.server_time())

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        return await self._timed("claim_window", self.inner.claim_window(lease, until_us, start_us, intents),
                                 refusal=True)

    async def claim_mark(self, name: str) -> Window:
        return await self._timed("claim_mark", self.inner.claim_mark(name))

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        return await self._timed("hand_back", self.inner.hand_back(lease, at_us, busy, drop), refusal=True)

    async def claim(self, lease: Lease, key: str) -> bool:
        return await self._timed("claim", self.inner.claim(lease, key), refusal=True)

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        return await self._timed("claim_batch", self.inner.claim_many(lease, keys))

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        await self._timed("record_batch", self.inner.record_many(name, records))

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        return await self._timed("runs", self.inner.runs(name, query))

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        return await self._timed("unfinished", self.inner.unfinished(name, limit))

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        await self._timed("set_setting", self.inner.set_setting(name, key, value))

    async def settings(self, name: str) -> dict[str, str]:
        return await self._timed("settings", self.inner.settings(name))

    async def close(self) -> None:
        await self.inner.close()
