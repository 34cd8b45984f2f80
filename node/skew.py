"""How far this host's wall clock is from the lock store's, and whether that still allows leading.

Leases are timed on the monotonic clock, which no clock step can fool, but
fire times come from the wall clock: a leader whose clock is 30 s fast runs
every job 30 s early (and a slow one runs them late, or past the grace). So a
node measures its skew against the store's own clock (``server_time``) and,
while it is off by more than ``BATON_MAX_CLOCK_SKEW``, neither campaigns nor
keeps leading.

The measurement: read the local wall clock, ask the store its time, read the
monotonic clock around the call. The store answered somewhere inside the round
trip, so the skew is ``local_at_midpoint - server`` within half the round trip.
A node judges itself skewed only when even the most favourable reading within
that uncertainty exceeds the bound, keeps the best (shortest round trip) of a
few samples per measurement, and measures again every ``period``.

A store may answer None for "no reading yet" (etcd's clock comes from the
edge of its HTTP ``Date`` second, which takes up to a second to find): the
monitor asks again shortly. A store that never answers (``NO_CLOCK_AFTER``
tries in a row, before any reading) has no clock to offer: the gauge stays
absent and nothing is refused, and the README says to run NTP there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from lock_backends import LeaseStore, LockBackendError
from lock_backends import clock as clocks
from node.metrics import Metrics

log = logging.getLogger("baton.skew")

#: Readings per measurement; the one with the shortest round trip counts.
SAMPLES = 3
#: Answers of None in a row, before any reading, after which the store is taken to have no clock.
NO_CLOCK_AFTER = 10
#: Seconds between asks while the store has no reading yet.
NO_READING_RETRY = 0.5


@dataclass(frozen=True)
class Skew:
    """Local wall clock minus the store's, and the half round trip it is known within."""

    seconds: float
    uncertainty: float

    def exceeds(self, bound: float) -> bool:
        return abs(self.seconds) - self.uncertainty > bound


class SkewMonitor:
    def __init__(self, backend: LeaseStore, metrics: Metrics, *, max_skew: float, period: float) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_skew = max_skew
        self.period = period
        #: The last measurement; None before the first, or when the store has no clock.
        self.skew: Skew | None = None
        #: False once the store showed it has no clock: then nothing is ever refused.
        self.supported = True
        self._no_reading = 0
        self._measured = asyncio.Event()
        self._warned = False
        self._task: asyncio.Task[None] | None = None

    def refusal(self) -> str | None:
        """Why this node may not lead now, or None. Before the first measurement, it may not."""
        if not self.supported:
            return None
        if self.skew is None:
            return "clock skew not measured yet"
        if self.skew.exceeds(self.max_skew):
            return (f"wall clock {self.skew.seconds:+.3f}s (+-{self.skew.uncertainty:.3f}s) off the lock store's, "
                    f"more than BATON_MAX_CLOCK_SKEW={self.max_skew:g}s")
        return None

    async def measure(self) -> Skew | None:
        best: Skew | None = None
        for _ in range(SAMPLES):
            local = clocks.time()
            t0 = clocks.monotonic()
            server = await self.backend.server_time()
            rtt = clocks.monotonic() - t0
            if server is None:
                return None  # no reading now
            sample = Skew(local + rtt / 2 - server, rtt / 2)
            if best is None or sample.uncertainty < best.uncertainty:
                best = sample
        return best

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="clock-skew")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_first(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._measured.wait(), timeout)

    async def _loop(self) -> None:
        while True:
            try:
                skew = await self.measure()
            except LockBackendError as exc:
                log.debug("clock skew not measured: %s", exc)
                await asyncio.sleep(min(self.period, 1.0))
                continue
            except Exception as exc:  # a bug must not end the measuring: the node could then never lead
                log.error("measuring the clock skew failed: %s", exc, exc_info=exc)
                await asyncio.sleep(self.period)
                continue
            if skew is None:
                self._no_reading += 1
                if self.skew is None and self._no_reading >= NO_CLOCK_AFTER:
                    self.supported = False
                    log.warning("the lock store offers no clock: clock skew is not checked (keep NTP running)")
                    self._measured.set()
                    return
                await asyncio.sleep(NO_READING_RETRY)
                continue
            self._no_reading = 0
            self.skew = skew
            self.metrics.clock_skew.set(skew.seconds)
            self._measured.set()
            if skew.exceeds(self.max_skew) and not self._warned:
                self._warned = True
                log.warning("clock skew: %s; this node will not lead until it is back within the bound",
                            self.refusal())
            elif self._warned and not skew.exceeds(self.max_skew):
                self._warned = False
                log.warning("clock skew back within the bound (%+.3fs); this node may lead again", skew.seconds)
            await asyncio.sleep(self.period)
