"""The LockBackend protocol and the values that cross it.

A backend owns only the store's operations: it has no timers, no loops and no
notion of "leader" beyond what the store says. Timing and state live in the
election loop (``node.election``), in the manner of client-go's leader elector
and its ``resourcelock`` package.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: Fraction of the TTL given up to clock drift between this host and the server.
#: A lease is treated as ours only until ``t_sent + ttl * (1 - DRIFT)``.
DRIFT = 0.02

#: How long claims and run records are kept when the URL does not say.
DEFAULT_CLAIM_RETENTION = 7 * 24 * 3600.0

#: Per-operation timeout when the URL does not say. Must stay below any TTL used.
DEFAULT_OP_TIMEOUT = 1.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the node's id and the URL it advertises to its peers."""

    node_id: str
    url: str = ""

    def to_json(self) -> str:
        return json.dumps({"node_id": self.node_id, "url": self.url}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Holder:
        data = json.loads(raw)
        return cls(node_id=str(data["node_id"]), url=str(data.get("url", "")))


@dataclass(frozen=True)
class Lease:
    """One successful acquire (or renew) of a named lock.

    ``token`` is the fencing token: strictly greater than every token issued
    earlier for the same lock name, on every backend. ``deadline`` is a local
    ``time.monotonic()`` instant computed from a clock reading taken *before*
    the request was sent, so the holder stops acting before the server could
    have expired the lease. ``handle`` is backend-private (a nonce, a lease id).
    """

    name: str
    holder: Holder
    token: int
    ttl: float
    deadline: float
    handle: str = field(default="", compare=False)

    def remaining(self, now: float | None = None) -> float:
        """Seconds of local validity left; zero or less means stop acting now."""
        return self.deadline - (time.monotonic() if now is None else now)

    def valid(self, now: float | None = None) -> bool:
        return self.remaining(now) > 0


def local_deadline(t_sent: float, ttl: float) -> float:
    """The instant until which a lease granted for ``ttl`` may be trusted locally."""
    return t_sent + ttl * (1.0 - DRIFT)


@dataclass(frozen=True)
class RunRecord:
    """A claim and, once the run ended, its outcome, as the backend stores them."""

    key: str
    token: int
    node_id: str
    claimed_at: float  # unix seconds
    result: dict[str, Any] | None = None  # None while the run has not reported back

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "token": self.token,
            "node_id": self.node_id,
            "claimed_at": self.claimed_at,
            "result": self.result,
        }


@runtime_checkable
class LockBackend(Protocol):
    """What the election loop and the scheduler need from a coordination store.

    Every call either completes within the backend's operation timeout (which
    is shorter than any TTL it is used with) or raises ``BackendUnavailable``.
    """

    #: Short name used in metrics and errors: "redis", "postgres", "etcd", "file".
    kind: str
    #: Where the server is, without credentials.
    address: str

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        """Take the lock if nobody holds it. None when somebody (even this instance) does."""
        ...

    async def renew(self, lease: Lease) -> Lease | None:
        """Extend a lease still held. None when it was lost; the caller must stop acting."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lock up, only if this lease still holds it; otherwise do nothing."""
        ...

    async def leader(self, name: str) -> Holder | None:
        """The current holder according to the store, or None."""
        ...

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Return when the lock may have changed hands, or after ``timeout`` seconds."""
        ...

    async def claim(self, lease: Lease, key: str) -> bool:
        """Atomically: this lease's token is the current one AND ``key`` was never claimed.

        True means the caller, and only the caller, may run the work named by
        ``key``. Claims are kept for the backend's retention period.
        """
        ...

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        """``claim`` for several keys in one round trip where the store allows: the keys claimed.

        Each key is claimed or refused on its own, as ``claim`` would; the
        token is checked once for all of them. The scheduler claims a tick's
        upcoming fire times this way, ahead of time (``node.claims``).
        """
        ...

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        """Store the outcome of the run claimed under ``key``, beside its claim."""
        ...

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        """``record`` for several runs (claim key to outcome) in one round trip where the store allows."""
        ...

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        """Recent claims with their outcomes, newest claim first."""
        ...

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        """Store (or, with None, delete) a small shared setting such as a paused job."""
        ...

    async def settings(self, name: str) -> dict[str, str]:
        """All shared settings under ``name``."""
        ...

    async def close(self) -> None:
        """Close connections. Does not release leases: call ``release`` first."""
        ...


async def claim_each(claim: Callable[[Lease, str], Awaitable[bool]], lease: Lease, keys: Sequence[str]) -> set[str]:
    """``claim_many`` for a store with no batch operation: the single claims, concurrently.

    The first failure is raised after the others have finished, so no claim is
    left running unobserved; keys claimed before it stay claimed (the caller
    falls back to claiming one at a time, and a second claim is refused).
    """
    outcomes = await asyncio.gather(*(claim(lease, key) for key in keys), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return {key for key, ok in zip(keys, outcomes, strict=True) if ok is True}


async def record_each(record: Callable[[str, str, dict[str, Any]], Awaitable[None]], name: str,
                      results: Mapping[str, dict[str, Any]]) -> None:
    """``record_many`` for a store with no batch operation: the single records, concurrently."""
    outcomes = await asyncio.gather(*(record(name, key, result) for key, result in results.items()),
                                    return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
