"""A graceful handoff, exactly once: the leader stops firing, runs what it owns, hands the rest of its window
back with the runs still going, and only then lets the lease go.

The part of ``node.scheduler.GatedScheduler`` that ends a leadership on
purpose (SIGTERM, step-down, ``Node.stop``), apart so that it reads in one
place; ``on_stopped_leading`` uses ``_hand_back`` too, for what a leadership
that ended otherwise never started. What it promises the next leader:

* every fire time before the hand-back point started here, or is started here
  before the window goes (``STRAGGLER_WAIT`` at most); none at or after it ever
  starts here, and the store gives that part of the window to the next token;
* the runs still going are listed with the hand-back (``BusyRun``), so the next
  leader holds ``max_instances`` across nodes and does not recover them while
  their entries last;
* the records of the runs that ended are stored first, at each attempt; past
  the last attempt the window goes without them, and the intents of those
  runs are deleted with the hand-back, so nobody recovers a run that ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.base import BaseScheduler

from lock_backends import BackendUnavailable, BusyRun, Lease, LockBackend
from lock_backends import clock as clocks
from lock_backends.clock import from_us, to_us
from node.claims import RunRecorder, WindowKeeper
from node.outcomes import RunKind, RunOutcome

if TYPE_CHECKING:
    from node.scheduler import Running

log = logging.getLogger("baton.scheduler")

#: At a graceful handoff, how long fire times the leader still owns get to start.
STRAGGLER_WAIT = 2.0
#: Busy entries outlive the shutdown grace by this much, so the next leader never undercounts.
BUSY_SLACK = 5.0


class Handoff:
    """The graceful handoff, mixed into ``GatedScheduler``: its state, read and written here."""

    if TYPE_CHECKING:  # what the scheduler provides
        backend: LockBackend
        keeper: WindowKeeper
        recorder: RunRecorder
        scheduler: BaseScheduler
        node_id: str
        shutdown_grace: float
        token: int | None
        running: dict[str, Running]
        _pending: dict[tuple[str, int], int]
        _settled: asyncio.Event
        _intents: dict[str, int]
        _started_max_us: int
        _hand_back_at_us: int | None
        _handed_back: bool
        _handing_over: tuple[int, asyncio.Task[None]] | None

        def spawn(self, coro: Any) -> asyncio.Task[Any]: ...
        async def fire(self, job_id: str, scheduled_at: datetime, kind: RunKind = RunKind.SCHEDULED, *,
                       force: bool = False) -> RunOutcome: ...
        def _current_lease(self) -> Lease | None: ...

    async def hand_over(self) -> None:
        """A graceful handoff while the lease is still held: run what we own, give back the rest.

        The caller lets the lease go afterwards (stop, or step down). Idempotent: a call while this
        leadership's handoff is under way waits for it to end. (Returning at once, a SIGTERM during a
        step-down's handoff, whose flush of the run records waited on a slow store, let the lease go before
        the window and its busy runs were handed back: the next leader recovered a run still going; found
        by the simulator.) The handoff goes on if its caller is cancelled.
        """
        lease = self._current_lease()
        under_way = self._handing_over
        if under_way is not None and not under_way[1].done() and (lease is None or lease.token == under_way[0]):
            await asyncio.shield(under_way[1])
            return
        if lease is None or self._hand_back_at_us is not None:
            return
        at = self._close_gate()
        task = asyncio.ensure_future(self._hand_over(lease, at))
        self._handing_over = (lease.token, task)
        await asyncio.shield(task)

    async def _hand_over(self, lease: Lease, at: int) -> None:
        await self.keeper.stop()
        # fire times before the hand-back point are ours: let those already handed to us start
        for job in self.scheduler.get_jobs():
            nxt = job.next_run_time
            if nxt is not None and to_us(nxt) < at and (job.id, to_us(nxt)) not in self._pending:
                self.spawn(self.fire(job.id, nxt))
        give_up = clocks.monotonic() + min(STRAGGLER_WAIT, max(0.0, lease.remaining() - lease.ttl * 0.1))
        while any(t < at for t in self._pending.values()) and (left := give_up - clocks.monotonic()) > 0:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), left)
        await self._hand_back(lease, at, retry_until=lease.deadline)

    def _close_gate(self) -> int:
        """Stop firing now; fire times from the returned instant (us) on are handed back, never started here.

        The instant is just past the latest fire time this leadership started, so
        nothing at or after it ever started here; fire times before it that have
        not started yet are still ours to run (a graceful handoff runs them).
        """
        self.scheduler.pause()
        window = self.keeper.window
        since = window.since_us if window is not None and window.token == self.token else 0
        at = max(since, self._started_max_us + 1 if self._started_max_us else 0)
        self._hand_back_at_us = at
        return at

    async def _hand_back(self, lease: Lease, at_us: int, *, retry_until: float) -> None:
        """Hand back the window from ``at_us``, listing the runs going; attempts until ``retry_until`` (monotonic)."""
        drop = [key for key, t_us in self._intents.items() if t_us >= at_us]
        while True:
            # Records of runs that ended reach the store before the window goes: otherwise the next leader finds
            # a finished recoverable run's intent without a result and runs it again (found by the simulator).
            # Waited for at each attempt, as the hand-back is: a store restarting under a leader outlasts one
            # flush, and the hand-back that follows it would pass them by (failover suite, etcd). Past
            # ``retry_until`` the window goes anyway, its fire times not yet run being worth more than a record
            # on time; the intents of the runs whose records are still unwritten go with it (below).
            if not await self.recorder.flush(self.backend.options.op_timeout) and clocks.monotonic() < retry_until:
                continue
            # A run that ended is not the next leader's to recover, written or not: its intent is dropped with the
            # window (the store keeps an intent that has its result, or another token's). Its record, when it
            # lands, is the run's only trace.
            ended = sorted(self.recorder.unwritten())
            # the runs going now, at each attempt: a run listed that ended meanwhile (and was recorded) would
            # hold its job back in the cluster until its entry expires (found by the simulator)
            now_us = int(clocks.time() * 1_000_000)
            until_us = now_us + int((self.shutdown_grace + BUSY_SLACK) * 1_000_000)
            busy = [BusyRun(r.key, r.job_id, self.node_id, r.token, until_us) for r in self.running.values()]
            try:
                window = await self.backend.hand_back(lease, at_us, busy, drop + ended)
            except Exception as exc:  # not handed back, or not known to be: hand_back is idempotent, so try again
                # (a surprise too: given up, it would lose the window's fire times and the busy runs; simulator)
                if clocks.monotonic() < retry_until:
                    log.warning("handing back failed, retrying: %s", exc)
                    await asyncio.sleep(0.05)
                    continue
                if isinstance(exc, BackendUnavailable):
                    log.warning("could not hand back the claim window from %s: %s", from_us(at_us).isoformat(), exc)
                else:
                    log.error("handing back the claim window failed: %s", exc, exc_info=exc)
                return
            break
        if self.token == lease.token:  # a hand-over that outlived its leadership says nothing of a newer one's
            self._handed_back = True  # (which then skipped its own hand-back: found by the simulator)
        if window is None:
            log.info("nothing to hand back: a newer leader holds the claim window")
        else:
            log.info("handed back the claim window", extra={"at": from_us(window.until_us).isoformat(),
                                                            "running": len(busy)})
