"""What a new leader owes: the fire times since its predecessor's window ended (the catch-up) and the recoverable
runs a predecessor claimed and never reported (the recovery); and the intents that make a leader's own fire times
recoverable by the next one.

The part of ``node.scheduler.GatedScheduler`` that runs when a leadership begins,
apart so that it reads in one place. Promises:

* Catch-up: per job, the latest fire time between the last window's end and
  now within the job's misfire grace runs (the earlier ones ``COALESCED``,
  older ones ``MISSED``), or each of them, oldest first, for a job that does
  not coalesce. Only inside this leader's own window, so nothing runs twice.
* Recovery (``recover=True`` jobs, at least once): every intent a leader before
  this one wrote and never closed with a result runs again, as a ``recovery``
  run, while this leadership lasts. Not the runs this node knows of (going, or
  finished with a record not yet written), nor the runs a predecessor handed
  over as still going, until their busy entries expire without a record: then
  their node died within its shutdown grace, and they are recovered. A
  recovery a run of its job holds back (``max_instances``) waits for a slot.
* Intents: a window's recoverable fire times, the ones come due while the node
  stalled or before it won included, are written with the claim that grants
  it, so a crash right after leaves them to the next leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from lock_backends import Lease, LockBackend, LockBackendError, Window
from lock_backends import clock as clocks
from lock_backends.clock import from_us, to_us
from node.claims import RunRecorder, WindowKeeper
from node.jobs import JobRegistry, JobSpec, claim_key, count_fire_times, fire_times, latest_fire_time, parse_claim_key
from node.outcomes import RunKind, RunOutcome

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

    from node.admission import Refusal
    from node.scheduler import Running

log = logging.getLogger("baton.scheduler")

#: Unfinished runs looked at for recovery when a node wins.
RECOVERY_SCAN = 500
#: How often a recovery waiting for a handed-over run's busy entry to expire looks at its leadership, and how
#: long after that expiry (by this node's clock) it lists the unfinished runs again.
RECOVERY_RECHECK = 0.5
#: How long a recovery skipped for ``max_instances`` waits for a run of its job to end here before it looks again
#: (a handed-over run's busy entry frees its slot by expiring, not by ending here; no store operation).
RECOVERY_SLOT_POLL = 0.05


class Succession:
    """Catch-up, recovery and intents, mixed into ``GatedScheduler``: its state, read and written here."""

    if TYPE_CHECKING:  # what the scheduler provides
        jobs: JobRegistry
        backend: LockBackend
        keeper: WindowKeeper
        recorder: RunRecorder
        lock_name: str
        running: dict[str, Running]
        paused_jobs: set[str]
        _recoverable: list[JobSpec]
        _triggers: dict[str, BaseTrigger]
        _pending: dict[tuple[str, int], int]
        _intents: dict[str, int]
        _run_end_waiters: dict[str, list[asyncio.Future[None]]]
        _caught_up: bool
        _hand_back_at_us: int | None

        def spawn(self, coro: Any) -> asyncio.Task[Any]: ...
        async def fire(self, job_id: str, scheduled_at: datetime, kind: RunKind = RunKind.SCHEDULED, *,
                       force: bool = False) -> RunOutcome: ...
        def grace(self, spec: JobSpec) -> float: ...
        def _current_lease(self) -> Lease | None: ...
        def _over_limit(self, spec: JobSpec) -> Refusal | None: ...
        def _count(self, job_id: str, outcome: RunOutcome, key: str, detail: str, n: int = 1,
                   **extra: Any) -> RunOutcome: ...

    async def _catch_up_and_recover(self, lease: Lease, now: datetime) -> None:
        window = await self._first_window(lease, now)
        if window is None:
            return  # this leadership ended (or was fenced) before it owned a window
        # a first claim made without the predecessor's mark (unread) wrote intents from this clock's now: those
        # before the window are the predecessor's fire times, never this leadership's to run, nor to close as
        # never fired (that record would hide them from every recovery)
        for key in [key for key, t_us in self._intents.items() if t_us < window.since_us]:
            del self._intents[key]
        # the recovery does not wait for the catch-up's bodies: a long one would hold a dead leader's recoverable
        # runs back for as long (found by the simulator); the two never touch the same fire time (the catch-up's
        # are at or after this window's start, the recovery's before it)
        recovering = self.spawn(self._recover(lease))
        if window.since_us > to_us(now):
            log.warning("the previous leader's claim window reached %s: its fire times until then are lost "
                        "(at most once), recoverable ones are recovered", from_us(window.since_us).isoformat())
        await self._catch_up(lease, window, now)
        await recovering

    async def _first_window(self, lease: Lease, now: datetime) -> Window | None:
        """This leadership's first window, waited for while it lasts (None: it ended, or was fenced, first).

        The claim made on winning may have failed or come back late, or the
        predecessor's window may reach past ``now`` (its clock ahead): the
        keeper is asked for a window past both, so the catch-up and the recovery
        a new leader owes are late rather than skipped (found by the simulator).
        """
        now_us = to_us(now)
        while True:
            window = self.keeper.window
            if window is not None and window.owned_by(lease.token):
                return window
            current = self._still_leading(lease)
            if current is None or (window is not None and window.token >= lease.token):
                return None
            target = max(now_us, window.until_us if window is not None else 0)
            t0 = clocks.monotonic()
            await self.keeper.cover(target, current, min(current.deadline, t0 + 0.5))
            if self.keeper.window is window and clocks.monotonic() - t0 < 0.001:
                await asyncio.sleep(0.05)  # the keeper could not even try (it is stopping): look again later

    async def _catch_up(self, lease: Lease, window: Window, now: datetime) -> None:
        """Per job, run what the gap since the last window owes: the latest fire time within the job's grace
        (the earlier ones counted coalesced), or every one of them for a job that does not coalesce."""
        since = from_us(window.since_us)
        if since > now:
            self._caught_up = True
            return
        owed = {spec.id: times for spec in list(self.jobs) if (times := self._owed(spec, since, now))}
        for job_id, times in owed.items():  # pending from now on: a job replaced meanwhile starts after them
            for t in times:
                self._pending.setdefault((job_id, to_us(t)), to_us(t))
        self._caught_up = True
        intents = {claim_key(job_id, t): to_us(t) for job_id, times in owed.items()
                   if self.jobs.specs[job_id].recover for t in times}
        if intents:
            self._intents.update(intents)
            with contextlib.suppress(LockBackendError):  # without the intents a crash now runs these at most once
                # its answer lists the busy runs as they are now: a predecessor's run that ended meanwhile no
                # longer holds the catch-up back (found by the simulator, seed 3146)
                self.keeper.offer(await self.backend.claim_window(lease, window.until_us, window.since_us,
                                                                  list(intents)))
        singles = [(job_id, times[0]) for job_id, times in owed.items() if len(times) == 1]
        series = [self._fire_series(job_id, times) for job_id, times in owed.items() if len(times) > 1]
        for i in range(0, len(singles), 256):
            await asyncio.gather(*(self.fire(job_id, t, RunKind.CATCH_UP) for job_id, t in singles[i:i + 256]))
        if series:
            await asyncio.wait(series)

    def _owed(self, spec: JobSpec, since: datetime, now: datetime) -> list[datetime]:
        """The fire times of ``spec`` in ``[since, now]`` a catch-up runs, oldest first; the rest are counted."""
        trigger = self._triggers.get(spec.id)
        if trigger is None or spec.id in self.paused_jobs:
            return []
        if spec.active_from is not None and spec.active_from > since:
            since = spec.active_from  # a job added or changed at runtime owes nothing from before
        look_from = max(since, now - timedelta(seconds=self.grace(spec)))
        if since < look_from:
            missed = count_fire_times(trigger, since, look_from - timedelta(microseconds=1))
            if missed:
                self._count(spec.id, RunOutcome.MISSED, spec.id, "fell between the last leader's window and "
                            "the misfire grace", n=missed)
        if not spec.coalesce:
            return fire_times(trigger, look_from, now)
        latest = latest_fire_time(trigger, look_from, now)
        if latest is None:
            return []
        coalesced = count_fire_times(trigger, look_from, latest - timedelta(microseconds=1))
        if coalesced:
            self._count(spec.id, RunOutcome.COALESCED, claim_key(spec.id, latest), "folded into the catch-up run",
                        n=coalesced)
        return [latest]

    def _fire_series(self, job_id: str, times: list[datetime]) -> asyncio.Task[None]:
        """Catch-up runs of one job one after another, oldest first (so ``max_instances`` does not skip them).

        All are pending from now on: a graceful handoff meanwhile waits for them before it hands back.
        """
        for t in times:
            self._pending.setdefault((job_id, to_us(t)), to_us(t))

        async def run() -> None:
            for t in times:
                await self.fire(job_id, t, RunKind.CATCH_UP)
        return self.spawn(run())

    async def _recover(self, lease: Lease) -> None:
        """Run again the recoverable runs a leader before this one claimed and never reported, while this
        leadership lasts.

        A run handed over as still going is left to its node until its busy entry expires (the node's shutdown
        grace and a slack). No record by then means its node died within that grace (a rolling deploy's kill after
        its own grace, say): the recovery looks again then, or nobody would run it before the next leader.
        """
        tries: dict[str, asyncio.Task[RunOutcome]] = {}
        while (look_at := await self._recover_once(lease, tries)) is not None:
            look_at = max(look_at, clocks.time() + RECOVERY_RECHECK)  # an entry the store still lists: not at once
            while (rest := look_at - clocks.time()) > 0:
                if self._still_leading(lease) is None:
                    return  # the next leader's recovery takes over
                await asyncio.sleep(min(rest, RECOVERY_RECHECK))

    def _still_leading(self, lease: Lease) -> Lease | None:
        """The current lease, if the leadership ``lease`` began still lasts and has not begun handing back."""
        current = self._current_lease()
        if current is None or current.token != lease.token or self._hand_back_at_us is not None:
            return None
        return current

    async def _recover_run(self, lease: Lease, job_id: str, scheduled_at: datetime) -> RunOutcome:
        """One recovery, run as soon as ``max_instances`` lets it while this leadership lasts: it is owed, not
        optional, and a run of its job going (a catch-up, the next fire time) would otherwise skip it for good."""
        await self._until_due(scheduled_at)
        while (outcome := await self.fire(job_id, scheduled_at, RunKind.RECOVERY)) is RunOutcome.SKIPPED:
            while (spec := self.jobs.specs.get(job_id)) is not None and self._over_limit(spec) is not None:
                if self._still_leading(lease) is None:
                    return outcome
                await self._a_run_ends(job_id, RECOVERY_SLOT_POLL)
            if spec is None or self._still_leading(lease) is None:
                return outcome
            if not await self._still_unfinished(claim_key(job_id, scheduled_at)):
                return outcome
        return outcome

    async def _until_due(self, scheduled_at: datetime) -> None:
        """Until ``scheduled_at`` by this clock. A predecessor killed just before a fire time had claimed it ahead
        (its intent is in the store), and a new leader can win before it comes due (the file lock and a
        PostgreSQL session lock are let go with the process): recovered at once, it started early (found by the
        benchmark's aimed kills, up to 72 ms before its fire time)."""
        early = to_us(scheduled_at) / 1_000_000 - clocks.time()
        if early > 0:  # slept on the monotonic clock, which the wall clock keeps pace with: a margin for rounding
            await asyncio.sleep(early + 0.001)

    async def _still_unfinished(self, key: str) -> bool:
        """Whether the intent ``key`` is still without a result, looked up again before a recovery that had to wait:
        the run's own node may have stored its record meanwhile (its writes held up by a store restart, then made
        before its hand-back), and a recovery then would run a finished run again (found by the simulator, seed
        21067). Unsure (the store not answering, or more unfinished runs than one listing holds): still owed."""
        try:
            open_runs = await self.backend.unfinished(self.lock_name, RECOVERY_SCAN)
        except Exception as exc:
            log.warning("could not look again at an unfinished run before recovering it: %s", exc)
            return True
        return len(open_runs) >= RECOVERY_SCAN or any(run.key == key for run in open_runs)

    async def _a_run_ends(self, job_id: str, timeout: float) -> None:
        """Until a run of ``job_id`` ends here, or ``timeout``. Woken as the run ends, a recovery takes the slot
        before the job's next fire time does: a job whose runs fill its period leaves gaps of milliseconds, which
        a poll misses every time (found by the simulator: a recovery skipped for as long as its leader led)."""
        waiter = asyncio.get_running_loop().create_future()
        waiting = self._run_end_waiters.setdefault(job_id, [])
        waiting.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout)
        finally:
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting and self._run_end_waiters.get(job_id) is waiting:
                del self._run_end_waiters[job_id]

    async def _recover_once(self, lease: Lease, tries: dict[str, asyncio.Task[RunOutcome]]) -> float | None:
        """One pass of ``_recover`` (``tries``: its recoveries so far, by intent): when to look again (wall
        seconds: a busy entry that held an unreported run back expires), or None."""
        recoverable = {spec.id for spec in self.jobs if spec.recover}
        window = self.keeper.window
        if not recoverable or window is None or not window.owned_by(lease.token):
            return None
        # this node's own records first, as at a hand-back: a run it finished under an earlier token whose record
        # is still queued (the store restarted under it) would read as a dead leader's (failover suite, PostgreSQL)
        await self.recorder.flush(self.backend.options.op_timeout)
        # the listing is retried while this leadership lasts: given up, a dead leader's recoverable runs would
        # wait for the next leader (found by the simulator)
        delay, complaint = 0.05, ""
        # and what this node knows of that the listing may not: records the flush could not write (the store
        # still refusing them), runs going; taken before each request, so a record stored after it is here
        known: set[str] = set()
        while True:
            known |= self.recorder.unwritten()
            known.update(key.partition("#")[0] for key in self.running)
            try:
                open_runs = await self.backend.unfinished(self.lock_name, RECOVERY_SCAN)
                break
            except Exception as exc:
                if self._current_lease() is None or self._hand_back_at_us is not None:
                    log.warning("could not list unfinished runs for recovery: %s", exc)
                    return None
                if str(exc) != complaint:
                    complaint = str(exc)
                    log.warning("listing unfinished runs for recovery failed, retrying: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        window = self.keeper.window
        if window is None or not window.owned_by(lease.token):
            return None
        # runs still going (handed over by a predecessor, or here) are not run again, whatever their kind:
        # a recovery run's key carries a suffix, its intent's does not (found by the simulator)
        handed = {b.key.partition("#")[0]: b.until_us / 1_000_000 for b in window.busy}
        going = {key.partition("#")[0] for key in self.running} | known
        looks: list[float] = []
        for run in open_runs:
            parsed = parse_claim_key(run.key)
            if parsed is None or "#" in run.key:
                continue
            job_id, scheduled_at = parsed
            if (job_id not in recoverable or job_id in self.paused_jobs or run.key in going
                    or not self._a_predecessors(run.token, to_us(scheduled_at), lease, window)):
                continue
            if run.key in handed:  # past its expiry by this clock, the store's may still list it: a look later
                looks.append(handed[run.key] + RECOVERY_RECHECK)
                continue
            if run.key in tries:  # recovered, or being recovered, by this leadership already
                continue
            log.warning("recovering an unfinished run", extra={"key": run.key, "node": run.node_id,
                                                               "token": run.token})
            tries[run.key] = self.spawn(self._recover_run(lease, job_id, scheduled_at))
        return min(looks, default=None)

    def _a_predecessors(self, token: int, fire_us: int, lease: Lease, window: Window) -> bool:
        """Whether an unfinished intent is a predecessor's fire time, for the recovery to run again: one before
        this leadership's window, under an older token, or under this one: a first claim made without the
        predecessor's mark (unread) wrote its intents from this clock's now, and took the predecessor's over."""
        return token <= lease.token and fire_us < window.since_us

    def _intents_between(self, lo_us: int, hi_us: int) -> list[str]:
        """Keys of the recoverable fire times in ``[lo_us, hi_us)`` this leader will run (for a new window)."""
        keys: list[str] = []
        now_us = int(clocks.time() * 1_000_000)
        lo = from_us(max(lo_us, now_us))
        hi = from_us(hi_us) - timedelta(microseconds=1)
        # Fire times before now that the window covers came due while this node stalled (paused, or its clock
        # jumped forward), or before it won (a new leader's catch-up, from where its predecessor's window ended):
        # the latest of them runs (coalesce), or each one within the misfire grace, and each must be an intent
        # too, or a crash before that run would lose it for good (found by the simulator). So must those of a
        # window wholly in the past: a claim answered only after its fire times came due (a cut-off, a slow
        # store; claims are retried with the same target), whose runs start once it is granted (seed 16714).
        past = from_us(now_us) - timedelta(microseconds=1)
        for spec in self._recoverable:
            trigger = self._triggers.get(spec.id)
            if spec.id in self.paused_jobs or trigger is None:
                continue
            if lo_us < now_us:
                since = max(from_us(lo_us), from_us(now_us) - timedelta(seconds=self.grace(spec)),
                            spec.active_from or from_us(lo_us))
                owed = [] if since > past else fire_times(trigger, since, past) if not spec.coalesce else [
                    t for t in [latest_fire_time(trigger, since, past)] if t is not None]
                for t in owed:
                    key = claim_key(spec.id, t)
                    self._intents[key] = to_us(t)
                    keys.append(key)
            t = trigger.get_next_fire_time(None, lo)
            while t is not None and t <= hi:
                key = claim_key(spec.id, t)
                self._intents[key] = to_us(t)
                keys.append(key)
                t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
        return keys
