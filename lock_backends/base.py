"""The LockBackend protocol and the values that cross it.

A backend owns only the store's operations: it has no timers, no loops and no
notion of "leader" beyond what the store says. Timing and state live in the
election loop (``node.election``) and the scheduler (``node.scheduler``), in
the manner of client-go's leader elector and its ``resourcelock`` package.

The protocol is four small ones a reader can hold in mind one at a time:

``LeaseStore``
    the lock itself: acquire, renew, release, who leads, wait for a change.
``ClaimStore``
    who may run which fire time. The leader claims *time*, not jobs: one
    fenced operation moves the lock's claim mark ``[since, until)`` forward,
    and every fire time inside a window its token holds is the leader's to
    run (``claim_window``). A leader stepping down hands the part it has not
    started back (``hand_back``). Single keys (``claim``) remain for the rare
    runs that are not fire times of the schedule: recovery and manual runs.
``RunStore``
    what happened: run records written in batches after the runs, the
    *intents* of recoverable runs (claimed, not yet reported) and listings.
``SettingStore``
    small shared values (paused jobs, jobs added at runtime).

Why windows are exclusive (the proof every backend's ``claim_window`` and
``hand_back`` must keep true, and the contract suite checks):

1. The mark ``(token, since, until, sealed)`` is changed only by
   ``claim_window`` (when the caller's token is the lock's current token) and
   by ``hand_back`` (when the mark's token is the caller's and it is not sealed).
2. A token's first ``claim_window`` sets ``since`` to the previous ``until``,
   and ``until`` only grows under one token; so the windows of successive
   tokens are disjoint intervals in token order.
3. ``hand_back(at)`` only shrinks the holder's own window, to ``[since,
   max(since, min(until, at)))``, and seals it: nothing may extend it again.
   The holder promises it has started nothing at or after ``at`` and will
   start nothing more (it has stopped firing before it asks), so the part
   given back runs at most once, under the next token.
4. A node starts a scheduled fire time ``t`` only while ``since <= t < until``
   of the window its own token holds, unsealed, and while its lease is locally
   valid. Two nodes would have to hold overlapping windows to run ``t`` twice.

Values of time crossing this protocol are whole microseconds since the Unix
epoch (``*_us``): exact in JSON, Lua and SQL, so "is ``t`` before ``until``"
has one answer everywhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lock_backends import clock

if TYPE_CHECKING:
    from lock_backends.url import BackendOptions

#: Fraction of the TTL given up to clock drift between this host and the server.
#: A lease is treated as ours only until ``t_sent + ttl * (1 - DRIFT)``.
DRIFT = 0.02

#: How long claims and run records are kept when the URL does not say.
DEFAULT_CLAIM_RETENTION = 7 * 24 * 3600.0

#: Per-operation timeout when the URL does not say. Must stay below any TTL used.
DEFAULT_OP_TIMEOUT = 1.0

#: A listing never returns more than this many runs, whatever it is asked.
MAX_LISTING = 1000


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the node's id and the URL it advertises to its peers."""

    node_id: str
    url: str = ""

    def to_json(self) -> str:
        return json.dumps({"node_id": self.node_id, "url": self.url}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Holder:
        """Raises ValueError (or KeyError/TypeError) on anything but what ``to_json`` wrote."""
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("node_id"), str):
            raise ValueError("not a holder record")
        return cls(node_id=data["node_id"], url=str(data.get("url", "")))


@dataclass(frozen=True)
class Lease:
    """One successful acquire (or renew) of a named lock.

    ``token`` is the fencing token: strictly greater than every token issued
    earlier for the same lock name, on every backend. ``deadline`` is a local
    monotonic instant computed from a clock reading taken *before* the request
    was sent, so the holder stops acting before the server could have expired
    the lease. ``handle`` is backend-private (a nonce, a lease id).
    """

    name: str
    holder: Holder
    token: int
    ttl: float
    deadline: float
    handle: str = field(default="", compare=False)

    def remaining(self, now: float | None = None) -> float:
        """Seconds of local validity left; zero or less means stop acting now."""
        return self.deadline - (clock.monotonic() if now is None else now)

    def valid(self, now: float | None = None) -> bool:
        return self.remaining(now) > 0


def local_deadline(t_sent: float, ttl: float) -> float:
    """The instant until which a lease granted for ``ttl`` may be trusted locally."""
    return t_sent + ttl * (1.0 - DRIFT)


@dataclass(frozen=True)
class BusyRun:
    """A run still going on a node that handed its window over (for cluster-wide ``max_instances``).

    Written by ``hand_back``; removed when the run's record is written; ignored
    by readers once ``until_us`` (the handing-over node's wall clock plus its
    shutdown grace) has passed, so a node that died meanwhile holds nothing back
    for long.
    """

    key: str
    job_id: str
    node_id: str
    token: int
    until_us: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "job_id": self.job_id, "node_id": self.node_id, "token": self.token,
                "until_us": self.until_us}

    @classmethod
    def from_dict(cls, data: Any) -> BusyRun:
        """Raises ValueError on anything but what ``to_dict`` wrote."""
        try:
            return cls(str(data["key"]), str(data["job_id"]), str(data["node_id"]), _int(data["token"]),
                       _int(data["until_us"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a busy-run record: {exc}") from None


@dataclass(frozen=True)
class Window:
    """The lock's claim mark: fire times in ``[since_us, until_us)`` belong to ``token``.

    ``token`` 0 means nobody ever claimed. ``sealed`` means the holder handed
    the rest back: the window will not grow again, and the next token's window
    starts at ``until_us``. ``busy`` lists runs a previous holder handed over
    while they were still going (unexpired ones only).
    """

    token: int
    since_us: int
    until_us: int
    sealed: bool = False
    busy: tuple[BusyRun, ...] = ()

    def owned_by(self, token: int) -> bool:
        """True when ``token`` may start fire times inside this window."""
        return self.token == token and not self.sealed

    def covers(self, t_us: int) -> bool:
        return self.since_us <= t_us < self.until_us

    def to_dict(self) -> dict[str, Any]:
        """The mark alone (busy runs are stored apart), as backends store it."""
        return {"token": self.token, "since_us": self.since_us, "until_us": self.until_us, "sealed": self.sealed}

    @classmethod
    def from_dict(cls, data: Any, busy: tuple[BusyRun, ...] = ()) -> Window:
        """Raises ValueError on anything but what ``to_dict`` wrote."""
        try:
            sealed = data["sealed"]
            if not isinstance(sealed, bool):
                raise TypeError("sealed is not a boolean")
            return cls(_int(data["token"]), _int(data["since_us"]), _int(data["until_us"]), sealed, busy)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a claim-window record: {exc}") from None


NO_WINDOW = Window(token=0, since_us=0, until_us=0)


def next_window(mark: Window | None, token: int, until_us: int, start_us: int) -> Window:
    """What ``claim_window`` makes of ``mark`` for the lock's current ``token``: the rule in one place.

    Backends whose store runs code next to the data (Lua, SQL) write the same
    rule there; the contract suite holds them to this one.
    """
    if mark is None or mark.token == 0:
        since = min(start_us, until_us)
        return Window(token, since, until_us)
    if mark.token == token:
        if mark.sealed or until_us <= mark.until_us:
            return Window(mark.token, mark.since_us, mark.until_us, mark.sealed)
        return Window(token, mark.since_us, until_us)
    if mark.token > token:  # a newer token moved it: ours is stale (the lock check should have said so)
        return Window(mark.token, mark.since_us, mark.until_us, mark.sealed)
    if until_us <= mark.until_us:  # the predecessor claimed further ahead than we ask: wait for it
        return Window(mark.token, mark.since_us, mark.until_us, mark.sealed)
    return Window(token, mark.until_us, until_us)


def handed_back(mark: Window | None, token: int, at_us: int) -> Window | None:
    """What ``hand_back`` makes of ``mark``: None when the mark is not ``token``'s (nothing to give back)."""
    if mark is None or mark.token != token:
        return None
    if mark.sealed:
        return Window(mark.token, mark.since_us, mark.until_us, True)
    return Window(token, mark.since_us, max(mark.since_us, min(mark.until_us, at_us)), True)


@dataclass(frozen=True)
class RunRecord:
    """A run's record: an intent (``result`` None: claimed, not yet reported) or its outcome."""

    key: str
    token: int
    node_id: str
    claimed_at: float  # unix seconds: when it was claimed (an intent) or started (a record)
    result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "token": self.token, "node_id": self.node_id, "claimed_at": self.claimed_at,
                "result": self.result}

    def describe(self) -> dict[str, Any]:
        """For people (the API): ``to_dict`` plus what derives from it, the job, times as text, milliseconds."""
        out = self.to_dict()
        job, _, rest = self.key.partition("@")
        out["job"] = job
        out["scheduled_at"] = rest.split("#", 1)[0] or None
        out["claimed_at_iso"] = datetime.fromtimestamp(self.claimed_at, UTC).isoformat()
        if self.result is not None and isinstance(self.result.get("duration_s"), int | float):
            out["result"] = {**self.result, "duration_ms": round(self.result["duration_s"] * 1000, 3)}
        return out

    @classmethod
    def from_dict(cls, key: str, data: Any) -> RunRecord:
        """Raises ValueError on anything but what ``to_dict`` wrote (the key may be stored apart)."""
        try:
            result = data.get("result")
            if result is not None and not isinstance(result, dict):
                raise TypeError("result is not an object")
            claimed_at = data["claimed_at"]
            if isinstance(claimed_at, bool) or not isinstance(claimed_at, int | float):
                raise TypeError("claimed_at is not a number")
            return cls(key, _int(data["token"]), str(data["node_id"]), float(claimed_at), result)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a run record: {exc}") from None

    @property
    def outcome(self) -> str | None:
        return None if self.result is None else str(self.result.get("outcome"))

    @property
    def job_id(self) -> str:
        return self.key.partition("@")[0]


@dataclass(frozen=True)
class RunQuery:
    """Which runs a listing returns: newest ``claimed_at`` first, at most ``limit``.

    ``before`` is the cursor: the ``claimed_at`` of the last run of the
    previous page (runs at exactly that instant on both pages are possible
    but never skipped: a page ends with every run at its last instant).
    A listing's cost is bounded by ``limit`` and a scan cap, never by the
    retention: filters are applied to a bounded window of the newest runs.
    """

    limit: int = 50
    job: str | None = None
    outcome: str | None = None
    since: float | None = None
    before: float | None = None

    def matches(self, run: RunRecord) -> bool:
        if self.job is not None and run.job_id != self.job:
            return False
        if self.outcome is not None and run.outcome != self.outcome:
            return False
        if self.since is not None and run.claimed_at < self.since:
            return False
        return not (self.before is not None and run.claimed_at >= self.before)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


# -- the protocols -------------------------------------------------------------------------------


class LeaseStore(Protocol):
    """The lock: who leads, for how long, under which fencing token."""

    #: Short name used in metrics and errors: one of ``lock_backends.registry.NAMES``.
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
        """Return when the lock may have changed hands, or after ``timeout`` seconds. Never raises
        for an unreachable store: it waits the timeout (or the op timeout) out instead."""
        ...

    async def server_time(self) -> float | None:
        """The store's own wall clock (unix seconds), for measuring this host's clock skew.

        None when the store has no clock to offer. The caller measures the round
        trip around the call: the answer is known within half of it.
        """
        ...

    async def close(self) -> None:
        """Close connections. Does not release leases: call ``release`` first."""
        ...


class ClaimStore(Protocol):
    """Who may run what: claim windows for the schedule, single keys for everything else."""

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        """Move the lock's claim mark forward to ``until_us`` for ``lease``'s token, atomically.

        None when ``lease``'s token is not the lock's current token (fenced:
        nothing changed). Otherwise the mark after the operation, which is
        ``next_window(mark, token, until_us, start_us)`` plus the unexpired busy
        runs: the caller owns ``[since_us, until_us)`` exactly when
        ``window.owned_by(lease.token)``. ``start_us`` is the caller's now, the
        start of the very first window when the lock never had a mark.

        ``intents`` are the claim keys of recoverable fire times inside the new
        window; they are stored as run records without a result (token, node,
        now), in the same atomic step, so a leader that dies before reporting
        them leaves them for the next one to recover. An intent overwrites an
        earlier record of the same key only when it has no result.

        Idempotent: asking again for what is already granted answers the same
        window, so a retry after a lost answer is safe.
        """
        ...

    async def claim_mark(self, name: str) -> Window:
        """The lock's claim mark as the store holds it (``NO_WINDOW`` if never claimed), busy runs left out.

        A read that changes nothing, fenced by nothing: a new leader reads where
        its predecessor's window ends before it claims its first window, so the
        intents of the catch-up it will owe go into that very claim (a leader
        that dies right after winning would otherwise take its catch-up with it).
        """
        ...

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        """Give back the part of ``lease``'s window from ``at_us`` on, and seal it, atomically.

        The caller has stopped firing and started nothing at or after
        ``at_us``. Allowed while the mark is ``lease``'s token's, even if the
        lease itself has lapsed meanwhile (what it gives back, it will never
        run). None when the mark is not this token's (a newer leader moved it:
        nothing is given back). Otherwise the mark after: ``handed_back(...)``.
        ``busy`` are the caller's runs still going, stored for the next leader;
        ``drop`` are intents deleted when they carry this token and no result:
        fire times given back, and runs that ended whose records the caller
        could not store yet (a record that lands later is stored all the same).
        Idempotent.
        """
        ...

    async def claim(self, lease: Lease, key: str) -> bool:
        """Atomically: this lease's token is the current one AND ``key`` is not claimed by another token.

        True means the caller, and only the caller, may run the work named by
        ``key``. Idempotent per lease: a key this very token claimed already
        answers True again (a retry after a lost answer), a key claimed under
        any other token False. Claims are kept for the backend's retention.
        """
        ...

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        """``claim`` for several keys in one round trip where the store allows: the keys claimed.

        Each key is claimed or refused on its own, as ``claim`` would; the
        token is checked once for all of them.
        """
        ...


class RunStore(Protocol):
    """Run records: outcomes written in batches after the runs, and intents of recoverable runs."""

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        """Store each run's outcome under its key (creating or replacing the record), in one round trip
        where the store allows. Writing a record also deletes the key's busy entry. Idempotent."""
        ...

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        """Recent runs (records and intents) matching ``query``, newest ``claimed_at`` first."""
        ...

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        """Intents without a result (claimed, never reported), newest first, at most ``limit``."""
        ...


class SettingStore(Protocol):
    """Small shared values: paused jobs, jobs added at runtime."""

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        """Store (or, with None, delete) a small shared setting."""
        ...

    async def settings(self, name: str) -> dict[str, str]:
        """All shared settings under ``name``."""
        ...


@runtime_checkable
class LockBackend(LeaseStore, ClaimStore, RunStore, SettingStore, Protocol):
    """What the election loop and the scheduler need from a coordination store.

    Every call either completes within the backend's operation timeout (which
    is shorter than any TTL it is used with) or raises ``BackendUnavailable``
    (its outcome unknown: it may have been applied). A value in the store that
    does not decode raises ``CorruptValue`` naming its key. Nothing else
    escapes: client-library errors are translated into ``LockBackendError``.
    """

    #: Options parsed from the URL's query (operation timeout, retention): what configuration checks.
    options: BackendOptions


async def claim_each(claim: Callable[[Lease, str], Awaitable[bool]], lease: Lease, keys: Sequence[str]) -> set[str]:
    """``claim_many`` for a store with no batch operation: the single claims, concurrently.

    The first failure is raised after the others have finished, so no claim is
    left running unobserved; keys claimed before it stay claimed (and a retry
    by the same lease claims them again: claims are idempotent per lease).
    """
    outcomes = await asyncio.gather(*(claim(lease, key) for key in keys), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return {key for key, ok in zip(keys, outcomes, strict=True) if ok is True}
