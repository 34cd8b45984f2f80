"""An AsyncIOScheduler that fires only on the leader, through fenced claims.

Every node builds the same scheduler with the same jobs. Followers keep it
started but paused; the elector's callbacks resume it on winning and pause it
on losing. That gate alone is not safe (a paused process wakes up still
believing it leads), so every run also:

1. re-checks the lease's local deadline right before acting, and
2. claims ``(job id, fire time)`` in the backend, atomically with "my token is
   the current one". A refused claim skips the body.

On winning, the node looks back ``misfire_grace`` for each job's latest fire
time and runs it through the same claim (coalesced: once per job), so a fire
time that fell into the failover gap is run exactly once. Jobs that opted into
recovery and whose last run was claimed but never reported are run once more.

``claims=False`` switches 1 and 2 off, leaving only the pause/resume gate, as a
naive leader election would. It exists for the checker's negative control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from lock_backends import BackendUnavailable, Lease, LockBackend, LockBackendError
from node.claims import ClaimAhead, RunRecorder, UpcomingJobStore
from node.election import Elector
from node.jobs import JobRegistry, RunContext, claim_key, current_run, latest_fire_time, parse_claim_key
from node.metrics import Metrics
from node.outcomes import RunKind

log = logging.getLogger("baton.scheduler")

PAUSED_PREFIX = "paused:"
RECOVERY_SUFFIX = "#recovery"
#: Claims looked at for recovery when a node wins.
RECOVERY_SCAN = 500


class FireTimeExecutor(AsyncIOExecutor):
    """Hands each run's scheduled fire time to the gate, which APScheduler 3 does not pass to jobs."""

    def __init__(self, fire: Callable[[str, datetime], Any]) -> None:
        super().__init__()
        self._fire = fire

    def running(self) -> set[asyncio.Future[Any]]:
        """Runs submitted and not finished, so a shutdown can let them end before closing what they use."""
        return set(self._pending_futures)

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        async def run() -> list[Any]:
            for run_time in run_times:
                await self._fire(job.id, run_time)
            return []

        def done(f: asyncio.Future[list[Any]]) -> None:
            self._pending_futures.discard(f)
            try:
                events = f.result()
            except BaseException:
                self._run_job_error(job.id, *sys.exc_info()[1:])
            else:
                self._run_job_success(job.id, events)

        future = self._eventloop.create_task(run())
        future.add_done_callback(done)
        self._pending_futures.add(future)


class GatedScheduler:
    def __init__(self, *, jobs: JobRegistry, backend: LockBackend, elector: Elector, metrics: Metrics,
                 lock_name: str, node_id: str, timezone: tzinfo, misfire_grace: float,
                 claims: bool = True, sync_period: float = 2.0, claim_ahead: float = 0.0) -> None:
        self.jobs = jobs
        self.backend = backend
        self.elector = elector
        self.metrics = metrics
        self.lock_name = lock_name
        self.node_id = node_id
        self.timezone = timezone
        self.misfire_grace = misfire_grace
        self.claims = claims
        self.sync_period = sync_period
        self.paused_jobs: set[str] = set()
        self.inflight: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        store = UpcomingJobStore()
        self.ahead = ClaimAhead(backend, store, max_lead=claim_ahead if claims else 0.0,
                                current_lease=elector.current_lease, skip=lambda job_id: job_id in self.paused_jobs,
                                stale_after=misfire_grace + 1.0)
        self.recorder = RunRecorder(backend, lock_name)
        self.executor = FireTimeExecutor(self._fire_scheduled)
        self.scheduler = AsyncIOScheduler(
            timezone=timezone,
            jobstores={"default": store},
            executors={"default": self.executor},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": int(max(1, misfire_grace))},
        )
        for spec in jobs:
            # args=(None,) only satisfies APScheduler's signature check: FireTimeExecutor calls
            # the gate with the fire time, never job.func directly
            self.scheduler.add_job(spec.func, trigger=spec.make_trigger(timezone), args=(None,), id=spec.id,
                                   name=spec.id, replace_existing=True, max_instances=spec.max_instances)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.scheduler.start(paused=True)
        self._sync_task = asyncio.create_task(self._sync_settings_forever(), name="settings-sync")

    async def drain(self) -> None:
        """Before a planned handoff: stop claiming ahead and fire what was claimed ahead."""
        await self.ahead.drain(self.ahead.lead + 0.5)

    async def shutdown(self, grace: float = 5.0) -> None:
        self.scheduler.pause()
        self.ahead.forget()
        if self._sync_task is not None:
            self._sync_task.cancel()
        running = {*self._tasks, *self.executor.running()}  # catch-up, and APScheduler's runs
        if running:
            await asyncio.wait(running, timeout=grace)
        await self.recorder.flush(grace)
        self.scheduler.shutdown(wait=False)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- elector callbacks -----------------------------------------------------------------

    async def on_started_leading(self, lease: Lease) -> None:
        """Align the jobs on the future, resume, and catch up on the window behind us."""
        with contextlib.suppress(LockBackendError, TimeoutError):
            await self.refresh_settings()
        now = datetime.now(UTC)
        for job in self.scheduler.get_jobs():
            if job.id in self.paused_jobs:
                continue
            # fire times at or before now belong to the catch-up, not to APScheduler's own misfire logic
            upcoming = job.trigger.get_next_fire_time(None, now + timedelta(microseconds=1))
            job.modify(next_run_time=upcoming)
        self.scheduler.resume()
        if self.claims:
            self.ahead.start()
        self.metrics.is_leader.set(1)
        self.metrics.lease_token.set(lease.token)
        self.metrics.transitions.inc()
        self.spawn(self._catch_up(now))

    def on_stopped_leading(self) -> None:
        self.scheduler.pause()
        self.ahead.forget()
        self.metrics.is_leader.set(0)
        self.metrics.lease_token.set(0)
        self.metrics.transitions.inc()

    # -- firing --------------------------------------------------------------------------

    async def _fire_scheduled(self, job_id: str, scheduled_at: datetime) -> None:
        await self.fire(job_id, scheduled_at)

    async def fire(self, job_id: str, scheduled_at: datetime, *, catch_up: bool = False,
                   recovery: bool = False, manual: bool = False) -> str:
        """Run one fire time of a job if, and only if, this node may. Returns the outcome."""
        spec = self.jobs.specs.get(job_id)
        if spec is None:
            return "unknown"
        key = claim_key(job_id, scheduled_at) + (RECOVERY_SUFFIX if recovery else "")
        if manual:
            key += "#manual"
        lateness = (datetime.now(UTC) - scheduled_at).total_seconds()
        if not manual and not recovery and lateness > self.misfire_grace:
            return self._count(job_id, "missed", key, f"{lateness:.1f}s late, past the misfire grace")
        if job_id in self.paused_jobs and not manual:
            return "paused"
        lease = self.elector.current_lease() if self.claims else self.elector.believed_lease()
        if lease is None:
            return self._count(job_id, "fenced", key, "no valid lease")
        pre = self.ahead.take(key) if self.claims and not (catch_up or recovery or manual) else None
        answer = None if pre is None else await pre.answer
        if answer is not None and pre is not None:
            # claimed ahead: what is left to check is the lease, locally, now at the fire time
            now_lease = self.elector.current_lease()
            if now_lease is None or now_lease.token != pre.token:
                return self._count(job_id, "fenced", key, "lease lost after the claim ahead")
            if not answer:
                return self._count(job_id, "duplicate", key, "claim refused")
            return await self._run(spec.id, spec.func, scheduled_at, now_lease, key, recovery)
        if self.claims:
            claimed, lease = await self._claim_while_leading(key, scheduled_at, lease)
            if lease is None:
                return self._count(job_id, "fenced", key, "lease lost while the backend was unreachable")
            if claimed is None:
                return self._count(job_id, "error", key, "claim failed: backend unreachable past the grace")
            if not claimed:
                if catch_up or recovery:
                    return "already-claimed"  # the normal case after a failover
                outcome = "duplicate" if self.elector.current_lease() is not None else "fenced"
                return self._count(job_id, outcome, key, "claim refused")
        return await self._run(spec.id, spec.func, scheduled_at, lease, key, recovery, wait_record=manual)

    async def _claim_while_leading(self, key: str, scheduled_at: datetime,
                                   lease: Lease) -> tuple[bool | None, Lease | None]:
        """Claim, retrying a backend that does not answer for as long as the lease and the grace allow.

        A backend restart shorter than the TTL then delays a run instead of losing it.
        """
        delay = 0.05
        while True:
            try:
                return await self.backend.claim(lease, key), lease
            except BackendUnavailable as exc:
                log.warning("claim of %s failed, retrying: %s", key, exc)
            except LockBackendError as exc:
                log.warning("claim of %s failed: %s", key, exc)
                return None, lease
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            current = self.elector.current_lease()
            if current is None or current.token != lease.token:
                return None, None
            lease = current
            if (datetime.now(UTC) - scheduled_at).total_seconds() > self.misfire_grace:
                return None, lease

    async def _run(self, job_id: str, func: Any, scheduled_at: datetime, lease: Lease, key: str,
                   recovery: bool, wait_record: bool = False) -> str:
        """Run the body and queue its record; a scheduled run does not wait for the write, a manual one does
        (whoever asked for it may read the runs next)."""
        started = datetime.now(UTC)
        self.metrics.fire_lag.observe(max(0.0, (started - scheduled_at).total_seconds()))
        ctx = RunContext(job_id, scheduled_at, lease.token, self.node_id, key,
                         RunKind.RECOVERY if recovery else RunKind.SCHEDULED)
        reset = current_run.set(ctx)
        self.inflight.add(key)
        t0 = time.perf_counter()
        error = None
        try:
            await func(ctx)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            current_run.reset(reset)
            self.inflight.discard(key)
        duration = time.perf_counter() - t0
        outcome = "ok" if error is None else "error"
        self.metrics.duration.labels(job_id).observe(duration)
        self._count(job_id, outcome, key, error or "", token=lease.token, duration=duration)
        if self.claims:
            result = {"outcome": outcome, "node_id": self.node_id, "token": lease.token,
                      "started_at": started.isoformat(), "duration_s": round(duration, 6)}
            if error:
                result["error"] = error
            stored = self.recorder.add(key, result)
            if wait_record:
                await stored
        return outcome

    def _count(self, job_id: str, outcome: str, key: str, detail: str, **extra: Any) -> str:
        self.metrics.job_runs.labels(job_id, outcome).inc()
        level = logging.INFO if outcome == "ok" else logging.WARNING
        log.log(level, "run %s", outcome, extra={"job": job_id, "key": key, "detail": detail, **extra})
        return outcome

    async def _catch_up(self, since: datetime) -> None:
        """Fire each job's latest fire time in the last misfire grace that nobody claimed."""
        start = since - timedelta(seconds=self.misfire_grace)
        pending = []
        for job in self.scheduler.get_jobs():
            if job.id in self.paused_jobs:
                continue
            latest = latest_fire_time(job.trigger, start, since)
            if latest is not None:
                pending.append(self.fire(job.id, latest, catch_up=True))
        for i in range(0, len(pending), 64):
            await asyncio.gather(*pending[i:i + 64])
        await self._recover()

    async def _recover(self) -> None:
        """Run again, once, the recoverable runs a dead leader claimed but never reported."""
        lease = self.elector.current_lease()
        if lease is None or not self.claims:
            return
        recoverable = {spec.id for spec in self.jobs if spec.recover}
        if not recoverable:
            return
        try:
            runs = await self.backend.runs(self.lock_name, RECOVERY_SCAN)
        except LockBackendError as exc:
            log.warning("could not list runs for recovery: %s", exc)
            return
        reported = {r.key for r in runs if r.result is not None}
        for run in runs:
            parsed = parse_claim_key(run.key)
            if (parsed is None or run.result is not None or run.token >= lease.token or "#" in run.key
                    or run.key in self.inflight or run.key + RECOVERY_SUFFIX in reported):
                continue
            job_id, scheduled_at = parsed
            if job_id in recoverable and job_id not in self.paused_jobs:
                log.warning("recovering an unfinished run", extra={"key": run.key, "node": run.node_id})
                await self.fire(job_id, scheduled_at, recovery=True)

    # -- shared job state (pause/resume survive failover) ---------------------------------------

    async def set_paused(self, job_id: str, paused: bool) -> None:
        await self.backend.set_setting(self.lock_name, PAUSED_PREFIX + job_id, "1" if paused else None)
        self._apply_paused({*self.paused_jobs, job_id} if paused else self.paused_jobs - {job_id})

    async def refresh_settings(self) -> None:
        settings = await asyncio.wait_for(self.backend.settings(self.lock_name), timeout=self.sync_period * 2)
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
        """Keep the leader's paused set current (a pause may arrive through any node).

        Followers do not poll: they read the settings when they win and when
        asked for their job list, so an idle follower costs the backend nothing here.
        """
        while True:
            await asyncio.sleep(self.sync_period)
            if not self.elector.is_leader:
                continue
            self._report_unfired()
            try:
                await self.refresh_settings()
            except (LockBackendError, TimeoutError) as exc:
                log.debug("settings sync failed: %s", exc)

    def _report_unfired(self) -> None:
        """Record pre-claims APScheduler never fired, so no later leader mistakes them for a crash."""
        for key, pre in self.ahead.drop_stale().items():
            if pre.answer.done() and pre.answer.result():
                log.info("claimed ahead, never fired", extra={"job": pre.job_id, "key": key, "detail":
                         "paused, removed or rescheduled, or its previous run was still going"})
                self.recorder.add(key, {"outcome": "not fired", "node_id": self.node_id, "token": pre.token})

    def describe_jobs(self) -> list[dict[str, Any]]:
        out = []
        for job in self.scheduler.get_jobs():
            nxt = job.next_run_time
            if nxt is None and job.id not in self.paused_jobs:
                nxt = job.trigger.get_next_fire_time(None, datetime.now(UTC))
            spec = self.jobs.specs.get(job.id)
            out.append({"id": job.id, "trigger": str(job.trigger),
                        "next_fire_time": nxt.isoformat() if nxt else None,
                        "paused": job.id in self.paused_jobs, "recover": bool(spec and spec.recover),
                        "description": spec.description if spec else ""})
        return out
