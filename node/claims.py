"""Claims ahead of the fire time, and run records written in batches.

A claim at the fire time puts a backend round trip (and, with a durable
store, an fsync) between the fire time and the job body: at a thousand runs
a second that round trip, queued behind the others, is most of the fire lag.
``ClaimAhead`` takes it off that path: the leader claims the fire times about
to come, a batch per round trip, a short *lead* before they are due, and at
the fire time only checks its lease locally.

What is promised, and what it costs:

* No duplicate, whatever the timing. A pre-claim is the same fenced claim as
  one made at the fire time, and the body still runs only if this node's lease
  is locally valid at the fire time. A newer leader sees the fire time as
  claimed and leaves it alone.
* The cost: a leader that dies (or is paused or cut off) holding pre-claims
  for fire times it has not reached leaves them claimed and unreported, as a
  leader that dies between a claim and the body does today. The window grows
  from one round trip to the lead. A newer leader skips them (the next fire
  time of a frequent job stands for them, as the catch-up's coalescing does);
  jobs that opted into recovery are run again. The lead therefore adapts to
  the backend: a small multiple of the recent batch round trips, between
  ``MIN_LEAD`` and the ``claim_ahead`` setting, and never past the lease's own
  local deadline. ``claim_ahead=0`` turns pre-claims off.
* A graceful stop drains: pre-claiming stops and the node keeps leading until
  every pre-claimed fire time has fired, so a planned handoff loses nothing.

``RunRecorder`` groups run records: a batch goes out ``RECORD_LINGER`` after
its first record, with whatever joined it meanwhile. A record only reports an
outcome (nothing waits on it to decide a claim), so a few ms of delay are free,
while a write per run cost the leader a round trip's CPU for every run and,
at a thousand runs a second, showed up in the fire lag of the runs after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.memory import MemoryJobStore

from lock_backends import Lease, LockBackend, LockBackendError
from node.jobs import claim_key

log = logging.getLogger("baton.scheduler")

#: The lead never drops below this, so a claim is ready before an idle loop even wakes.
MIN_LEAD = 0.1
#: Lead = this many times the slowest of the recent batch round trips.
LEAD_FACTOR = 4.0
#: Batch round trips remembered for the lead.
LATENCY_WINDOW = 32
#: The loop looks again at least this often (a resumed or added job is claimed ahead from then on).
MAX_SLEEP = 0.2
MIN_SLEEP = 0.002
#: After a batch the loop waits this share of the lead, so fire times are claimed in groups.
BATCH_SHARE = 0.25
#: Batches sent before the first answers, so one slow round trip does not hold the next back.
MAX_BATCHES_IN_FLIGHT = 4
#: How long past its fire time a drain waits for a pre-claimed run to start.
DRAIN_SLACK = 0.05
#: A run record waits this long for others to share its write.
RECORD_LINGER = 0.02


class UpcomingJobStore(MemoryJobStore):
    """The in-memory job store, plus its jobs in fire-time order without copying them all."""

    def upcoming(self) -> Iterator[Job]:
        # MemoryJobStore keeps ``_jobs`` sorted by next run time, paused jobs (None) last
        for job, _timestamp in self._jobs:
            if job.next_run_time is None:
                return
            yield job


@dataclass
class PreClaim:
    """One fire time claimed ahead: the token it was claimed under and the backend's answer."""

    job_id: str
    fire_time: datetime
    token: int
    answer: asyncio.Future[bool | None] = field(repr=False)  # None: the batch failed, claim again


class ClaimAhead:
    """Claims the leader's fire times that fall within the lead, one batch per round trip."""

    def __init__(self, backend: LockBackend, store: UpcomingJobStore, *, max_lead: float,
                 current_lease: Callable[[], Lease | None], skip: Callable[[str], bool],
                 stale_after: float) -> None:
        self.backend = backend
        self.store = store
        self.max_lead = max_lead
        self.current_lease = current_lease
        self.skip = skip
        self.stale_after = stale_after
        self.pending: dict[str, PreClaim] = {}
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._emptied = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.max_lead > 0

    @property
    def lead(self) -> float:
        slowest = max(self._latencies, default=0.0)
        return min(self.max_lead, max(MIN_LEAD, LEAD_FACTOR * slowest))

    def start(self) -> None:
        if self.enabled and (self._task is None or self._task.done()):
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="claim-ahead")

    def stop(self) -> None:
        """Stop claiming ahead after the batch in flight; claims made stay pending until fired."""
        self._stopping.set()

    def forget(self) -> None:
        """Leadership is gone: pre-claims under the old token can no longer be used."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in self._batches:
            task.cancel()
        self.pending.clear()

    def take(self, key: str) -> PreClaim | None:
        pre = self.pending.pop(key, None)
        if not self.pending:
            self._emptied.set()
        return pre

    def drop_stale(self) -> dict[str, PreClaim]:
        """Pre-claims the scheduler never fired (paused, removed, rescheduled), to be reported."""
        horizon = datetime.now(UTC) - timedelta(seconds=self.stale_after)
        stale = {k: p for k, p in self.pending.items() if p.fire_time < horizon}
        for key in stale:
            del self.pending[key]
        return stale

    async def drain(self, timeout: float) -> None:
        """Stop claiming ahead and wait until every pending fire time has fired.

        Waits at most ``timeout``, and no longer than just past the last pending
        fire time: a pre-claim of a job paused meanwhile will not fire at all.
        """
        self.stop()
        if not self.pending:
            return
        last = max(pre.fire_time for pre in self.pending.values())
        wait = min(timeout, (last - datetime.now(UTC)).total_seconds() + DRAIN_SLACK)
        self._emptied.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._emptied.wait(), max(0.0, wait))

    def _due(self, lease: Lease) -> tuple[list[tuple[str, str, datetime]], float]:
        """Fire times within the lead (and the lease) not yet claimed, and how long to sleep."""
        now = datetime.now(UTC)
        reach = min(self.lead, lease.remaining())
        horizon = now + timedelta(seconds=reach)
        due: list[tuple[str, str, datetime]] = []
        sleep = MAX_SLEEP
        for job in self.store.upcoming():
            fire_time: datetime = job.next_run_time
            if fire_time > horizon:
                sleep = (fire_time - now).total_seconds() - self.lead
                break
            key = claim_key(job.id, fire_time)
            if key in self.pending or self.skip(job.id) or fire_time <= now:
                continue  # claimed already, paused, or due now: APScheduler claims it at the fire time
            due.append((key, job.id, fire_time))
        return due, min(MAX_SLEEP, max(MIN_SLEEP, sleep))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            lease = self.current_lease()
            if lease is None:
                return
            due, sleep = self._due(lease)
            if due:
                batch = {key: PreClaim(job_id, fire_time, lease.token, loop.create_future())
                         for key, job_id, fire_time in due}
                self.pending.update(batch)
                if len(self._batches) >= MAX_BATCHES_IN_FLIGHT:
                    await asyncio.wait(self._batches, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(self._claim(lease, batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)
                # what enters the horizon meanwhile goes out together, still most of a lead ahead
                sleep = self.lead * BATCH_SHARE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), sleep)

    async def _claim(self, lease: Lease, batch: dict[str, PreClaim]) -> None:
        t0 = time.perf_counter()
        claimed: set[str] | None = None
        try:
            claimed = await self.backend.claim_many(lease, list(batch))
        except LockBackendError as exc:
            log.warning("claiming %d fire times ahead failed, claiming them at their fire time: %s",
                        len(batch), exc)
            for key in batch:  # the fire time claims for itself, with the usual retries
                self.pending.pop(key, None)
        except asyncio.CancelledError:
            for pre in batch.values():
                if not pre.answer.done():
                    pre.answer.set_result(None)
            raise
        finally:
            self._latencies.append(time.perf_counter() - t0)
        for key, pre in batch.items():
            if not pre.answer.done():
                pre.answer.set_result(None if claimed is None else key in claimed)


class RunRecorder:
    """Writes run records in batches: whatever queued within ``linger`` of the first, or during a write."""

    def __init__(self, backend: LockBackend, lock_name: str, linger: float = RECORD_LINGER) -> None:
        self.backend = backend
        self.lock_name = lock_name
        self.linger = linger
        self._queue: dict[str, tuple[dict[str, Any], asyncio.Future[None]]] = {}
        self._writer: asyncio.Task[None] | None = None

    def add(self, key: str, result: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a record; the future resolves once it is stored (or its write failed, logged)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue[key] = (result, done)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="run-recorder")
        return done

    async def _write(self) -> None:
        while self._queue:
            if self.linger > 0:
                await asyncio.sleep(self.linger)
            batch, self._queue = self._queue, {}
            try:
                await self.backend.record_many(self.lock_name, {k: r for k, (r, _) in batch.items()})
            except LockBackendError as exc:
                log.warning("could not record the outcome of %d run(s) (%s...): %s",
                            len(batch), next(iter(batch)), exc)
            finally:
                for _, done in batch.values():
                    if not done.done():
                        done.set_result(None)

    async def flush(self, timeout: float) -> None:
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), timeout)
