"""The election loop: owns timing and state; the backend owns only the store.

Modelled on client-go's ``leaderelection.LeaderElector``. Three durations,
checked at construction: ``ttl`` (how long a lease lasts on the server) >
``renew_deadline`` (how long the leader keeps failing to renew before it steps
down) > ``retry_period`` (the pause between attempts, with jitter).

Promises:

* ``is_leader`` and ``current_lease()`` are true only before the lease's local
  deadline, whatever the network or the event loop did meanwhile. Callers
  re-check right before acting (the scheduler does, before every claim).
* The stopped-leading callback runs after every started-leading callback: on
  loss, on error, on ``stop()``, on cancellation.
* A node that lost the lease campaigns again at once; it never needs a restart.
* ``stop()`` releases the lease so a follower waiting in ``wait_for_change``
  takes over without waiting out the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lock_backends import Holder, Lease, LeaseStore, LockBackendError
from lock_backends import clock as clocks

log = logging.getLogger("baton.election")

Callback = Callable[..., Awaitable[None] | None]


class ElectionConfigError(ValueError):
    """The durations do not satisfy ttl > renew_deadline > retry_period > 0."""


@dataclass(frozen=True)
class ElectionConfig:
    name: str
    holder: Holder
    ttl: float
    renew_deadline: float
    retry_period: float
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not (self.ttl > self.renew_deadline > self.retry_period > 0):
            raise ElectionConfigError(
                f"need ttl > renew_deadline > retry_period > 0, got ttl={self.ttl}, "
                f"renew_deadline={self.renew_deadline}, retry_period={self.retry_period}")


class Elector:
    """Campaigns for one lock name and keeps the lease while it can."""

    def __init__(self, backend: LeaseStore, config: ElectionConfig, *,
                 on_started_leading: Callback | None = None,
                 on_stopped_leading: Callback | None = None,
                 clock: Callable[[], float] = clocks.monotonic,
                 rng: random.Random | None = None,
                 eligible: Callable[[], str | None] | None = None) -> None:
        self.backend = backend
        self.config = config
        #: Asked before every campaign and every renew: a reason not to lead now (a skewed clock), or None.
        self._eligible = eligible or (lambda: None)
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._clock = clock
        self._rng = rng or random.Random()
        self._lease: Lease | None = None
        self._last_renew_ok = 0.0
        self._stopping = asyncio.Event()
        self._step_down = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The holder the store named last time we looked; None when nobody leads.
        self.observed_leader: Holder | None = None
        #: True while a renew has failed and the lease is riding on its remaining time.
        self.renew_failing = False
        #: Set while this node leads (from winning until the stopped-leading callback), for waiters.
        self.leading = asyncio.Event()

    # -- what callers read ----------------------------------------------------------

    def current_lease(self) -> Lease | None:
        """The lease, only while its local deadline has not passed."""
        lease = self._lease
        if lease is None or lease.deadline <= self._clock():
            return None
        return lease

    def believed_lease(self) -> Lease | None:
        """The lease the loop holds, deadline or not (health checks compare it with ``current_lease``)."""
        return self._lease

    @property
    def is_leader(self) -> bool:
        return self.current_lease() is not None

    def lease_remaining(self) -> float:
        lease = self.current_lease()
        return max(0.0, lease.deadline - self._clock()) if lease else 0.0

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"elector-{self.config.name}")
        return self._task

    async def stop(self) -> None:
        """Release the lease (if held) and end the loop. Safe to call twice."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def request_step_down(self) -> bool:
        """Release now and sit out one retry period (planned maintenance). False if not leading."""
        if not self.is_leader:
            return False
        self._step_down.set()
        return True

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                lease = await self._campaign()
                if lease is None:
                    return
                await self._lead(lease)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a callback must not end the campaign
                log.exception("election loop error; campaigning again")
                await self._sleep(self._jittered(self.config.retry_period))
            if self._step_down.is_set():
                self._step_down.clear()
                await self._sleep(self._jittered(self.config.retry_period))

    # -- internals ------------------------------------------------------------------

    def _jittered(self, period: float) -> float:
        return period * (1.0 + self._rng.random() * self.config.jitter)

    def _give_up_at(self, lease: Lease) -> float:
        """When to stop trusting the lease if no renew succeeds: the local deadline or the renew deadline."""
        return min(lease.deadline, self._last_renew_ok + self.config.renew_deadline)

    def _renew_budget(self, lease: Lease) -> float:
        """How long one renew may take: never past the lease's local deadline."""
        return max(0.001, lease.deadline - self._clock())

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early on stop. True if stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=max(0.0, seconds))
        return self._stopping.is_set()

    def ineligible(self) -> str | None:
        """Why this node may not lead right now (it neither campaigns nor keeps a lease), or None."""
        return self._eligible()

    async def _campaign(self) -> Lease | None:
        cfg = self.config
        while not self._stopping.is_set():
            if self._eligible() is not None:
                if await self._sleep(self._jittered(cfg.retry_period)):
                    return None
                continue
            try:
                lease = await self.backend.acquire(cfg.name, cfg.holder, cfg.ttl)
                if lease is not None:
                    return lease
                self.observed_leader = await self.backend.leader(cfg.name)
            except LockBackendError as exc:
                log.warning("acquire failed: %s", exc)
                self.observed_leader = None
                if await self._sleep(self._jittered(cfg.retry_period)):
                    return None
                continue
            # a follower: wake on handoff, else retry after the period
            period = self._jittered(cfg.retry_period)
            waiter = asyncio.ensure_future(self.backend.wait_for_change(cfg.name, period))
            stopper = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (waiter, stopper):
                    fut.cancel()
                with contextlib.suppress(asyncio.CancelledError, LockBackendError):
                    await waiter
        return None

    async def _lead(self, lease: Lease) -> None:
        cfg = self.config
        self._lease = lease
        self._last_renew_ok = self._clock()
        self.renew_failing = False
        self.observed_leader = cfg.holder
        log.info("started leading", extra={"token": lease.token})
        self.leading.set()
        try:
            if await _call(self._on_started, lease):
                await self._renew_until_lost()
            else:
                # leading without what the callback sets up (a scheduler resumed, a window claimed) would hold
                # the lease and fire nothing: step down, and sit out a retry period before campaigning again
                log.error("stepping down: the started-leading callback failed")
                self._step_down.set()
        finally:
            lost = self._lease
            self._lease = None
            self.leading.clear()
            self.renew_failing = False
            if self.observed_leader == cfg.holder:
                self.observed_leader = None
            try:
                await _call(self._on_stopped)
            finally:
                log.info("stopped leading", extra={"token": lost.token if lost else None})
                # a no-op when the lease is no longer ours; a fast handoff when it still is
                if lost is not None:
                    with contextlib.suppress(LockBackendError):
                        await self.backend.release(lost)

    async def _renew_until_lost(self) -> None:
        cfg = self.config
        while True:
            lease = self._lease
            assert lease is not None
            now = self._clock()
            give_up = self._give_up_at(lease)
            if now >= give_up:
                log.warning("lease could not be renewed in time; stepping down")
                return
            wait = min(self._jittered(cfg.retry_period) if not self.renew_failing else cfg.retry_period / 4,
                       give_up - now)
            step = asyncio.ensure_future(self._step_down.wait())
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                done, _ = await asyncio.wait({step, stop}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                step.cancel()
                stop.cancel()
            if done:
                return  # stepping down or stopping: the caller releases
            if (why := self._eligible()) is not None:
                log.warning("stepping down: %s", why)
                return
            if self._clock() >= give_up:
                log.warning("lease deadline passed before a renew could run (starved loop?); stepping down")
                return
            try:
                renewed = await asyncio.wait_for(self.backend.renew(lease), timeout=self._renew_budget(lease))
            except (LockBackendError, TimeoutError) as exc:
                self.renew_failing = True
                log.warning("renew failed: %s", exc or "timed out before the lease deadline")
                continue
            if renewed is None:
                log.warning("lease lost (renew refused)")
                return
            self._lease = renewed
            self._last_renew_ok = self._clock()
            self.renew_failing = False


async def _call(callback: Callback | None, *args: object) -> bool:
    """Run a leader callback; False (and logged) if it raised."""
    if callback is None:
        return True
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("leader callback %s failed", getattr(callback, "__name__", callback))
        return False
    return True
