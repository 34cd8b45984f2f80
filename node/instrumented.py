"""A LockBackend wrapper that feeds ``baton_lock_ops_total`` and ``baton_lock_op_seconds``.

Kept apart from the backends so they stay free of metrics, and so every
operation, from the elector or the scheduler, is counted in one place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from lock_backends import BackendUnavailable, Holder, Lease, LockBackend, LockBackendError, RunRecord
from node.metrics import Metrics


class InstrumentedBackend:
    def __init__(self, inner: LockBackend, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.kind = inner.kind
        self.address = inner.address

    async def _timed(self, op: str, coro: Any) -> Any:
        t0 = time.perf_counter()
        try:
            result = await coro
        except BackendUnavailable:
            self.metrics.lock_op(op, "unavailable", time.perf_counter() - t0)
            raise
        except LockBackendError:
            self.metrics.lock_op(op, "error", time.perf_counter() - t0)
            raise
        refused = result is None or result is False
        if op in ("leader", "release", "record", "record_batch", "claim_batch", "set_setting", "settings", "runs"):
            refused = False
        self.metrics.lock_op(op, "refused" if refused else "ok", time.perf_counter() - t0)
        return result

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        return await self._timed("acquire", self.inner.acquire(name, holder, ttl))  # type: ignore[no-any-return]

    async def renew(self, lease: Lease) -> Lease | None:
        return await self._timed("renew", self.inner.renew(lease))  # type: ignore[no-any-return]

    async def release(self, lease: Lease) -> None:
        await self._timed("release", self.inner.release(lease))

    async def leader(self, name: str) -> Holder | None:
        return await self._timed("leader", self.inner.leader(name))  # type: ignore[no-any-return]

    async def wait_for_change(self, name: str, timeout: float) -> None:
        await self.inner.wait_for_change(name, timeout)  # a wait, not an operation worth timing

    async def claim(self, lease: Lease, key: str) -> bool:
        return await self._timed("claim", self.inner.claim(lease, key))  # type: ignore[no-any-return]

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        return await self._timed("claim_batch", self.inner.claim_many(lease, keys))  # type: ignore[no-any-return]

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        await self._timed("record", self.inner.record(name, key, result))

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        await self._timed("record_batch", self.inner.record_many(name, results))

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        return await self._timed("runs", self.inner.runs(name, limit))  # type: ignore[no-any-return]

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        await self._timed("set_setting", self.inner.set_setting(name, key, value))

    async def settings(self, name: str) -> dict[str, str]:
        return await self._timed("settings", self.inner.settings(name))  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.inner.close()
