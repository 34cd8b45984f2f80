"""An AsyncIOScheduler that fires only on the leader, inside the leader's claim window.

Every node builds the same scheduler with the same jobs. Followers keep it
started but paused; the elector's callbacks resume it on winning and pause it
on losing. That gate alone is not safe (a paused process wakes up still
believing it leads), so a fire time starts only when, at that instant and with
no await in between:

1. this node's lease is locally valid (its deadline, on the monotonic clock), and
2. the fire time lies inside the claim window its token holds in the store
   (``node.claims.WindowKeeper``; the windows of two tokens never overlap).

Promises, per event (the README's guarantees section says the same to users):

* No fault: every fire time runs once, on the leader.
* Graceful handoff (``hand_over``: SIGTERM, step-down, ``Node.stop``): exactly
  once. The leader stops firing, runs what it owns up to the last fire time it
  started, hands back the rest of its window (the next leader runs it), lists
  its runs still going so the next leader holds ``max_instances`` across nodes,
  and only then lets the lease go. Running bodies get ``shutdown_grace`` to end.
* Crash or stall: at most once for an ordinary job (fire times inside the dead
  leader's window that it had not started are lost: ``RunOutcome.LOST``, at
  most the claim-ahead lead, or the catch-up of a leader that dies between
  winning and starting it); at least once for ``recover=True`` jobs, whose
  fire times are written as intents with each window (a catch-up's with the
  claim that grants it) and run again by the next leader when no result came
  back.
* A new leader runs, per job, the latest fire time between the end of the
  last window and now that is within the job's misfire grace (a catch-up run),
  folding the earlier ones into it (``COALESCED``); older ones are ``MISSED``.
  A job with ``coalesce=False`` gets every such fire time instead, oldest first.
* Jobs can be added, replaced and removed while the node runs (``add_spec``,
  ``remove_spec``: the runtime job store, ``node.stored_jobs``). A leader that
  learns of a job late catches up its fire times since the change, inside its
  own window only, so nothing runs twice.

Every fire time a node handles ends as one ``RunOutcome``, counted in
``baton_job_runs_total`` and, when the node owned it, recorded in the store.

Here: the gate (the run, its record), the elector's callbacks, runtime jobs and
the shared job state. Whether a fire time may start is ``node.admission``;
what a new leadership owes (catch-up, recovery, intents) is in
``node.succession``; the graceful handoff in ``node.handoff``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any, cast

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger

from lock_backends import Lease, LockBackend, LockBackendError, RunRecord
from lock_backends import clock as clocks
from lock_backends.clock import from_us, to_us
from lock_backends.registry import BY_NAME
from node.admission import Admission, Refusal
from node.claims import RECORD_SPACING, RunRecorder, WindowKeeper
from node.election import Elector
from node.handoff import Handoff
from node.jobs import (
    JobRegistry,
    JobSpec,
    RunContext,
    claim_key,
    current_run,
)
from node.jobstore import BatonJobStore
from node.loop_scheduler import LoopScheduler
from node.metrics import Metrics
from node.outcomes import RunKind, RunOutcome
from node.stored_jobs import StoredJobs
from node.succession import Succession
from node.triggers import OnceTrigger

log = logging.getLogger("baton.scheduler")

PAUSED_PREFIX = "paused:"
#: APScheduler's own ``max_instances``: never reached, so every fire time reaches the gate,
#: which holds the job's limit across the cluster and counts what it skips.
APSCHEDULER_INSTANCES = 1_000_000
#: A returned value is stored with the run record up to this many bytes of JSON.
RESULT_MAX_BYTES = 16 * 1024


#: Outcomes of a healthy cluster's ordinary life, logged at info; the others are warnings.
_ROUTINE = (RunOutcome.COALESCED, RunOutcome.HANDED_BACK, RunOutcome.SKIPPED)


class UnknownJob(KeyError):
    """No job with this id."""


@dataclass(slots=True)
class Running:
    job_id: str
    key: str
    t_us: int
    kind: RunKind
    token: int
    task: asyncio.Future[Any] | None = field(default=None, repr=False)


class FireTimeExecutor(AsyncIOExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped: its classes are Any
    """Hands each run's scheduled fire time to the gate, which APScheduler 3 does not pass to jobs.

    The submission is announced synchronously (``on_submit``, which answers the
    fire times to run: a job that coalesces keeps only the latest), so a
    graceful handoff knows every fire time APScheduler has already handed over.
    """

    def __init__(self, fire: Callable[[str, datetime], Any],
                 on_submit: Callable[[str, list[datetime]], list[datetime]]) -> None:
        super().__init__()
        self._fire = fire
        self._on_submit = on_submit

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        run_times = self._on_submit(job.id, run_times)
        job_id = job.id

        def done(f: asyncio.Future[Any]) -> None:
            self._pending_futures.discard(f)
            # a stop cancels fire times not started (handed back) or bodies past the grace (counted by the
            # gate): not one error traceback per fire time
            error = None if f.cancelled() else f.exception()
            if error is not None:
                self._run_job_error(job_id, error, error.__traceback__)
            else:
                self._run_job_success(job_id, [])  # the gate counts outcomes; no APScheduler events to send

        # the one fire time of nearly every submission is its own task: no coroutine around it, per run
        coro = self._fire(job_id, run_times[0]) if len(run_times) == 1 else self._fire_each(job_id, run_times)
        future = self._eventloop.create_task(coro)
        future.add_done_callback(done)
        self._pending_futures.add(future)

    async def _fire_each(self, job_id: str, run_times: list[datetime]) -> None:
        for run_time in run_times:
            await self._fire(job_id, run_time)


class GatedScheduler(Admission, Handoff, Succession):
    def __init__(self, *, jobs: JobRegistry, backend: LockBackend, elector: Elector, metrics: Metrics,
                 lock_name: str, node_id: str, timezone: tzinfo, misfire_grace: float,
                 sync_period: float = 2.0, claim_ahead: float = 0.25, shutdown_grace: float = 30.0,
                 sync_workers: int = 8) -> None:
        #: The jobs this node runs: the application's, and those of the runtime job store.
        self.jobs = JobRegistry(specs=dict(jobs.specs))
        self.backend = backend
        self.elector = elector
        self.metrics = metrics
        self.lock_name = lock_name
        self.node_id = node_id
        self.timezone = timezone
        self.misfire_grace = misfire_grace
        self.sync_period = sync_period
        self.shutdown_grace = shutdown_grace
        self.paused_jobs: set[str] = set()
        #: Bodies running on this node, whatever leadership started them (by key, and keys by job).
        self.running: dict[str, Running] = {}
        self._running_keys: dict[str, set[str]] = {}
        #: Recoveries waiting for a run of a job to end (job id -> their futures): answered as a run ends.
        self._run_end_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._recoverable = [spec for spec in jobs if spec.recover]
        #: Each job's trigger, kept after APScheduler drops a one-shot it fired (a catch-up may need it).
        self._triggers: dict[str, BaseTrigger] = {}
        #: Per job, the latest fire time started under the current token (us): a replaced job's
        #: catch-up starts after it.
        self._started_by_job: dict[str, int] = {}
        #: Set once this leadership's catch-up has taken its list of jobs: a job added later catches up alone.
        self._caught_up = False
        self.stored = StoredJobs(self, backend, lock_name, jobs.job_defaults)
        #: The token of the current leadership, None while following.
        self.token: int | None = None
        self._lease: Lease | None = None
        #: Fire times handed to ``fire`` and not yet started or refused: (job id, fire time in us) -> fire time.
        self._pending: dict[tuple[str, int], int] = {}
        #: Set each time a pending fire time is settled (started or refused).
        self._settled = asyncio.Event()
        #: The latest fire time started under the current token (us; 0 before the first).
        self._started_max_us = 0
        #: Set when this leadership stopped firing: fire times from here on are not started here.
        self._hand_back_at_us: int | None = None
        self._handed_back = False
        #: The graceful handoff under way, if any, and the token of the leadership it hands over.
        self._handing_over: tuple[int, asyncio.Task[None]] | None = None
        #: Intents this leadership wrote: recoverable fire times claimed with its windows (key -> us).
        self._intents: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_pool = ThreadPoolExecutor(max_workers=sync_workers, thread_name_prefix="baton-job")
        op_timeout = backend.options.op_timeout
        self.keeper = WindowKeeper(backend, max_lead=claim_ahead, current_lease=self._current_lease,
                                   intents=self._intents_between, next_fire=self._next_fire_us)
        kind = BY_NAME.get(backend.kind)
        self.recorder = RunRecorder(backend, lock_name, op_timeout=op_timeout, on_dropped=metrics.records_dropped.inc,
                                    spacing=RECORD_SPACING if kind is None or kind.batched_records else 0.0,
                                    # the next leader waits on a handing-over leadership's records to run what it
                                    # was handed as busy
                                    prompt=lambda: self._hand_back_at_us is not None,
                                    # a claim can queue behind a record write at the store: the lead covers both
                                    on_round_trip=self.keeper.observe)
        # ``fire`` looked up at each call, not bound now: a wrapper set on the instance later (the simulator's
        # history) sees every fire time; a function returning the coroutine, not one more coroutine per run
        self.executor = FireTimeExecutor(lambda job_id, at: self.fire(job_id, at), self._submitted)
        self.store = BatonJobStore()
        self.scheduler = LoopScheduler(
            timezone=timezone,
            jobstores={"default": self.store},
            executors={"default": self.executor},
            # coalescing is the gate's (``_submitted``), per job and counted; the misfire check too
            job_defaults={"max_instances": APSCHEDULER_INSTANCES, "coalesce": False,
                          "misfire_grace_time": int(max(1, misfire_grace))},
        )
        for spec in jobs:
            self._schedule(spec)

    def _schedule(self, spec: JobSpec) -> None:
        """Hand ``spec`` to APScheduler (replacing a job of the same id), paused if the cluster paused it."""
        trigger = spec.make_trigger(self.timezone)
        if isinstance(trigger, DateTrigger) and not isinstance(trigger, OnceTrigger):
            trigger = OnceTrigger(run_date=trigger.run_date)  # a hand-built one-shot: see node.triggers
        self._triggers[spec.id] = trigger
        # made with the job, not at its first run: built before the node starts, it is frozen with the jobs
        # (node.gc_policy), not ten thousand young objects for the collector's first pass after a leader starts
        self._running_keys.setdefault(spec.id, set())
        paused: dict[str, Any] = {"next_run_time": None} if spec.id in self.paused_jobs else {}
        # args=(None,) only satisfies APScheduler's signature check: FireTimeExecutor calls
        # the gate with the fire time, never job.func directly
        self.scheduler.add_job(spec.func, trigger=trigger, args=(None,), id=spec.id, name=spec.id,
                               replace_existing=True, **paused)

    def grace(self, spec: JobSpec) -> float:
        """How late a fire time of ``spec`` may start: its own misfire grace, else the node's."""
        return spec.misfire_grace if spec.misfire_grace is not None else self.misfire_grace

    # -- jobs added, changed and removed at runtime ------------------------------------------

    def add_spec(self, spec: JobSpec) -> None:
        """Add ``spec``, or replace the job of its id, while the node runs.

        A leader then runs what it owes since ``spec.active_from``: fire times
        between the change and now (it may learn of a change made through
        another node one settings sync later), within the job's grace, inside
        its own claim window only, and after any fire time it already started
        for the job (a replaced job's old schedule may share fire times).
        """
        now = clocks.utcnow() - timedelta(microseconds=1)  # before APScheduler computes its next fire time
        self.jobs.specs[spec.id] = spec
        self._recoverable = [s for s in self.jobs if s.recover]
        self._schedule(spec)
        self.metrics.runs.add_job(spec.id, RunOutcome.OK)
        lease = self._current_lease()
        if lease is not None and spec.active_from is not None and self._caught_up and self._hand_back_at_us is None:
            self.spawn(self._catch_up_changed(spec, lease, now))

    def remove_spec(self, job_id: str) -> None:
        """Stop scheduling ``job_id``; runs already going end as they would."""
        self.jobs.specs.pop(job_id, None)
        self._triggers.pop(job_id, None)
        self._recoverable = [s for s in self.jobs if s.recover]
        with contextlib.suppress(JobLookupError):
            self.scheduler.remove_job(job_id)

    async def _catch_up_changed(self, spec: JobSpec, lease: Lease, now: datetime) -> None:
        window = self.keeper.window
        if window is None or not window.owned_by(lease.token) or spec.active_from is None:
            return
        after_us = max([window.since_us, to_us(spec.active_from), self._started_by_job.get(spec.id, -1) + 1,
                        *(t + 1 for (job_id, _), t in self._pending.items() if job_id == spec.id)])
        times = self._owed(spec, from_us(after_us), now)
        if times:
            await self._fire_series(spec.id, times)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.scheduler.start(paused=True)
        with contextlib.suppress(LockBackendError, TimeoutError):  # the stored jobs, for GET /jobs and metrics
            await self.refresh_settings()
        self._sync_task = asyncio.create_task(self._sync_settings_forever(), name="settings-sync")

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop firing, give running bodies ``grace`` seconds to end, cancel the rest, flush the records."""
        grace = self.shutdown_grace if grace is None else grace
        self.scheduler.pause()
        await self.keeper.stop()
        if self._sync_task is not None:
            self._sync_task.cancel()
        bodies = {r.task for r in self.running.values() if r.task is not None}
        if bodies:
            log.info("waiting for %d running job(s), up to %.0fs", len(bodies), grace)
            _, late = await asyncio.wait(bodies, timeout=grace)
            for task in late:
                task.cancel()  # its fire() records it as cancelled
        others = {*self._tasks, *self.executor._pending_futures}
        if others:
            await asyncio.wait(others, timeout=1.0)
        if not await self.recorder.flush(max(1.0, self.backend.options.op_timeout * 3)):
            log.warning("stopping with %d run record(s) the store has not confirmed: it did not answer in time",
                        len(self.recorder.unwritten()))
        self.scheduler.shutdown(wait=False)
        self._sync_pool.shutdown(wait=False, cancel_futures=True)

    # -- elector callbacks -----------------------------------------------------------------

    def _next_fire_us(self) -> int | None:
        nxt = self.store.get_next_run_time()
        return None if nxt is None else to_us(nxt)

    def _current_lease(self) -> Lease | None:
        lease = self.elector.current_lease()
        return lease if lease is not None and lease.token == self.token else None

    async def on_started_leading(self, lease: Lease) -> None:
        """Claim the first window, align the jobs on the future, resume, catch up, recover."""
        self.token = lease.token
        self._lease = lease
        self._started_max_us = 0
        self._started_by_job.clear()
        self._caught_up = False
        self._hand_back_at_us = None
        self._handed_back = False
        self._intents.clear()
        self.keeper.reset()
        try:
            await self.refresh_settings()
        except Exception as exc:  # whatever it is, a leader that cannot read the pause list still fires
            # (escaping, it would leave this leadership renewing its lease and firing nothing; simulator)
            log.warning("reading the settings on winning failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.keeper.open(lease), timeout=max(0.05, lease.ttl / 4))
        # fire times at or before now belong to the catch-up, not to APScheduler's own misfire logic; now is
        # read after the first claim, which may take a while: APScheduler would fold what came due meanwhile
        # into one run, uncounted (found by the simulator)
        now = clocks.utcnow()
        await self.store.realign(now + timedelta(microseconds=1))
        if self._hand_back_at_us is not None:
            # a handoff began while the first window was being claimed: give that window back too
            await self._hand_back(lease, self._hand_back_at_us, retry_until=0.0)
            return
        self.scheduler.resume()
        self.keeper.start()
        self.metrics.is_leader.set(1)
        self.metrics.lease_token.set(lease.token)
        self.metrics.transitions.inc()
        self.spawn(self._catch_up_and_recover(lease, now))

    async def on_stopped_leading(self) -> None:
        """Stop firing; hand back, if it was not done gracefully already, what this leadership never started."""
        if self.token is None:
            return
        lease = self._lease
        if self._hand_back_at_us is None:
            at = self._close_gate()
            await self.keeper.stop()
            if lease is not None and not self._handed_back:
                # the lease is gone, but until a successor claims, the store takes back what we never ran
                # a flush of the records, then hand-back attempts for a while (a node that steps down, its clock
                # skewed say, must not give up after one failed attempt: the window's fire times and the busy runs
                # would be lost; found by the simulator). Safe after the lease lapsed: the store refuses a hand-back
                # once a successor moved the mark.
                op_timeout = self.backend.options.op_timeout
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hand_back(lease, at, retry_until=clocks.monotonic() + op_timeout * 2),
                                           op_timeout * 3)
        await self.keeper.stop()
        self.token = None
        self.metrics.is_leader.set(0)
        self.metrics.lease_token.set(0)
        self.metrics.transitions.inc()

    # -- firing --------------------------------------------------------------------------

    def _submitted(self, job_id: str, run_times: list[datetime]) -> list[datetime]:
        """APScheduler hands over the due fire times of a job: the ones to run (the latest, if it coalesces)."""
        spec = self.jobs.specs.get(job_id)
        if spec is not None and spec.coalesce and len(run_times) > 1:
            self._count(job_id, RunOutcome.COALESCED, claim_key(job_id, run_times[-1]),
                        "folded into a later fire time due at once (the loop was late)", n=len(run_times) - 1)
            run_times = run_times[-1:]
        for t in run_times:
            t_us = to_us(t)
            self._pending[(job_id, t_us)] = t_us
        return run_times

    async def fire(self, job_id: str, scheduled_at: datetime, kind: RunKind = RunKind.SCHEDULED, *,
                   force: bool = False) -> RunOutcome:
        """Run one fire time of a job if, and only if, this node may. Returns its outcome here.

        ``force`` (manual runs only) runs a paused job.
        """
        spec = self.jobs.specs.get(job_id)
        t_us = to_us(scheduled_at)
        pending_key = (job_id, t_us)
        if spec is None:
            if self._pending.pop(pending_key, None) is not None:
                self._settled.set()
            if kind is RunKind.SCHEDULED or kind is RunKind.CATCH_UP:  # removed at runtime meanwhile
                return self._count(job_id, RunOutcome.SKIPPED, claim_key(job_id, scheduled_at), "the job was removed")
            raise UnknownJob(job_id)
        if kind is RunKind.SCHEDULED or kind is RunKind.CATCH_UP:
            self._pending.setdefault(pending_key, t_us)
        try:
            admitted: Refusal | tuple[Lease, str] | None = (
                self._admit_now(spec, t_us) if kind is RunKind.SCHEDULED else None)
            if admitted is None:
                admitted = await self._admit(spec, scheduled_at, kind, force)
            if isinstance(admitted, Refusal):
                return self._count(spec.id, admitted.outcome, claim_key(job_id, scheduled_at), admitted.detail)
            lease, suffix = admitted
            return await self._run(spec, scheduled_at, t_us, kind, suffix, lease)
        finally:
            if self._pending.pop(pending_key, None) is not None:
                self._settled.set()

    async def _run(self, spec: JobSpec, scheduled_at: datetime, t_us: int, kind: RunKind, suffix: str,
                   lease: Lease) -> RunOutcome:
        """Run the body and queue its record. Only a manual run waits for the record (its caller reads runs next).

        On the path of every run (fifty thousand in a burst): nothing here that a record or a log line
        could do later, or that the record's reader can derive (times as text, milliseconds).
        """
        started = clocks.time()
        plain_key = claim_key(spec.id, scheduled_at)
        key = plain_key + suffix
        if kind is RunKind.SCHEDULED or kind is RunKind.CATCH_UP:
            if t_us > self._started_max_us:
                self._started_max_us = t_us
            if t_us > self._started_by_job.get(spec.id, 0):
                self._started_by_job[spec.id] = t_us
            if self._pending.pop((spec.id, t_us), None) is not None:
                self._settled.set()
        if spec.recover:
            self._intents.pop(plain_key, None)
        self.running[key] = Running(spec.id, key, t_us, kind, lease.token, asyncio.current_task())
        keys = self._running_keys.get(spec.id)
        if keys is None:
            keys = self._running_keys[spec.id] = set()
        keys.add(key)
        self.metrics.runs.started(max(0.0, started - t_us / 1e6))
        t0 = clocks.monotonic()
        error: str | None = None
        value: Any = None
        cancelled = False
        ctx = RunContext(spec.id, scheduled_at, lease.token, self.node_id, key, kind)
        reset = current_run.set(ctx)
        try:
            # an async body is awaited here, not through one more coroutine per run; a plain def runs in a
            # thread, so it cannot block the loop the lease is renewed on
            value = await (cast(Awaitable[object], spec.func(ctx)) if spec.is_async else self._in_thread(spec, ctx))
            outcome = RunOutcome.OK
        except asyncio.CancelledError:
            outcome, error, cancelled = RunOutcome.CANCELLED, "cancelled at shutdown, after the shutdown grace", True
        except Exception as exc:
            outcome, error = RunOutcome.ERROR, f"{type(exc).__name__}: {exc}"
        finally:
            current_run.reset(reset)
            del self.running[key]
            keys.discard(key)
            if self._run_end_waiters:  # a recovery waits for a slot of a job: a dict's truth per run otherwise
                for waiter in self._run_end_waiters.pop(spec.id, ()):
                    if not waiter.done():
                        waiter.set_result(None)
        duration = clocks.monotonic() - t0
        self.metrics.runs.took(spec.id, duration)
        if outcome is RunOutcome.OK:
            self.metrics.runs.ran(spec.id, outcome)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("run ok", extra={"job": spec.id, "key": key, "token": lease.token, "duration": duration})
        else:
            self._count(spec.id, outcome, key, error or "", token=lease.token, duration=round(duration, 6))
        # ``_value_``: the member's value as a plain str (``.value`` is a descriptor, a few times slower per run)
        result: dict[str, Any] = {"outcome": outcome._value_, "kind": kind._value_, "duration_s": round(duration, 6)}
        if error:
            result["error"] = error
        if value is not None:
            result.update(_stored_value(value))
        stored = self.recorder.add(RunRecord(key, lease.token, self.node_id, started, result),
                                   wait=kind is RunKind.MANUAL)
        if kind is RunKind.RECOVERY:  # the recovered run is done: no later leader recovers it again
            self.recorder.add(RunRecord(plain_key, lease.token, self.node_id, started,
                                        {**result, "recovered_by": key}))
        if stored is not None and not cancelled:
            await stored
        if cancelled:
            raise asyncio.CancelledError
        return outcome

    def _in_thread(self, spec: JobSpec, ctx: RunContext) -> asyncio.Future[Any]:
        """A plain def's run in the node's pool of threads, with the run's context (``current_run``) set."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._sync_pool, contextvars.copy_context().run, spec.func, ctx)

    def _count(self, job_id: str, outcome: RunOutcome, key: str, detail: str, n: int = 1, **extra: Any) -> RunOutcome:
        self.metrics.runs.ran(job_id, outcome, n)
        # a line per successful run would cost more than the run at thousands a second: those are debug
        level = logging.DEBUG if outcome is RunOutcome.OK else logging.INFO if outcome in _ROUTINE else logging.WARNING
        if log.isEnabledFor(level):
            log.log(level, "run %s", outcome, extra={"job": job_id, "key": key, "detail": detail, "count": n,
                                                     **extra})
        return outcome

    # -- shared job state (pause/resume survive failover) ---------------------------------------

    async def set_paused(self, job_id: str, paused: bool) -> None:
        await self.backend.set_setting(self.lock_name, PAUSED_PREFIX + job_id, "1" if paused else None)
        self._apply_paused({*self.paused_jobs, job_id} if paused else self.paused_jobs - {job_id})

    async def refresh_settings(self) -> None:
        """Read the shared settings: the runtime job store's jobs, then the paused set."""
        settings = await asyncio.wait_for(self.backend.settings(self.lock_name), timeout=self.sync_period * 2)
        self.stored.apply(settings)
        self._apply_paused({k.removeprefix(PAUSED_PREFIX) for k in settings if k.startswith(PAUSED_PREFIX)})

    def _apply_paused(self, paused: set[str]) -> None:
        for job_id in paused - self.paused_jobs:
            if self.scheduler.get_job(job_id):
                self.scheduler.pause_job(job_id)
        for job_id in self.paused_jobs - paused:
            if self.scheduler.get_job(job_id):
                self.scheduler.resume_job(job_id)
        self.paused_jobs = paused

    async def _sync_settings_forever(self) -> None:
        """Keep the leader's jobs and paused set current (a change may arrive through any node), close stale intents.

        Followers do not poll: they read the settings when they win and when
        asked for their job list, so an idle follower costs the backend nothing here.
        Nothing that goes wrong here ends the loop: a store value that does not
        decode is logged (once) and read again next time.
        """
        complaint = ""
        while True:
            await asyncio.sleep(self.sync_period)
            if self._current_lease() is None:
                continue
            self._close_stale_intents()
            try:
                await self.refresh_settings()
                complaint = ""
            except Exception as exc:  # the loop must live: log, and look again next period
                text = f"{type(exc).__name__}: {exc}"
                if text != complaint:
                    complaint = text
                    log.warning("settings sync failed (will retry): %s", text)

    def _close_stale_intents(self) -> None:
        """Record intents APScheduler never fired (paused, removed, rescheduled), so nobody recovers them later."""
        now = clocks.time()

        def grace_of(key: str) -> float:
            spec = self.jobs.specs.get(key.partition("@")[0])
            return self.grace(spec) if spec is not None else self.misfire_grace

        stale = [(k, t) for k, t in self._intents.items()
                 if t < int((now - grace_of(k) - 1.0) * 1_000_000) and k not in self.running]
        for key, _ in stale:
            del self._intents[key]
            token = self.token or 0
            self.recorder.add(RunRecord(key, token, self.node_id, clocks.time(),
                                        {"outcome": str(RunOutcome.SKIPPED), "node_id": self.node_id,
                                         "token": token, "detail": "claimed, never fired (paused, removed or "
                                                                   "rescheduled)"}))

    def describe_jobs(self) -> list[dict[str, Any]]:
        now = clocks.utcnow()
        return [self.describe(spec, now) for spec in self.jobs]

    def describe(self, spec: JobSpec, now: datetime | None = None) -> dict[str, Any]:
        """One job as ``GET /jobs`` shows it: where it comes from, its schedule, options and state."""
        now = now or clocks.utcnow()
        trigger = self._triggers.get(spec.id)
        job = self.scheduler.get_job(spec.id)
        paused = spec.id in self.paused_jobs
        nxt = job.next_run_time if job is not None else None
        if not paused and trigger is not None and (nxt is None or nxt < now):  # a follower's are not kept current
            nxt = trigger.get_next_fire_time(None, now)
        return {"id": spec.id, "origin": spec.origin, "trigger": str(trigger) if trigger is not None else None,
                "schedule": spec.schedule.describe() if spec.schedule is not None else None,
                "next_fire_time": None if paused or nxt is None else nxt.isoformat(),
                "paused": paused, "recover": spec.recover, "max_instances": spec.max_instances,
                "coalesce": spec.coalesce, "misfire_grace_time": self.grace(spec),
                "running": len(self._running_keys.get(spec.id, ())), "description": spec.description,
                **spec.details}


def _stored_value(value: Any) -> dict[str, Any]:
    """A body's return value as stored beside its record: JSON up to ``RESULT_MAX_BYTES``, else why not."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return {"value_error": f"return value not stored: not JSON-serializable ({exc})"}
    if len(text.encode()) > RESULT_MAX_BYTES:
        return {"value_error": f"return value not stored: {len(text.encode())} bytes of JSON, "
                               f"more than {RESULT_MAX_BYTES}"}
    return {"value": value}

