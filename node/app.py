"""A node: the parts wired together, and its HTTP API.

The API reads state; only the admin routes change anything, and only with
``Authorization: Bearer $BATON_ADMIN_TOKEN``. With no token configured they
answer 403: disabled, never open.

Three ways to serve it: ``python -m node`` (``node.__main__``), uvicorn's
factory (``uvicorn --factory node.app:create_app``, settings from the
environment) or ``uvicorn node.app:app`` (the same app, built on first access:
importing this module has no side effects), and inside an application of
one's own (``node.embed.Baton``: its lifespan and ``build_router``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lock_backends import Holder, LockBackendError, RunQuery, from_url
from lock_backends import clock as clocks
from lock_backends.base import MAX_LISTING
from lock_backends.clock import from_us
from node.config import ConfigError, Settings
from node.election import ElectionConfig, Elector
from node.imports import ImportStringError, load_jobs
from node.instrumented import InstrumentedBackend
from node.jobs import JobRegistry, demo_registry
from node.jobs_api import add_stored_job_routes
from node.metrics import Metrics
from node.naive import NaiveElector, NaiveScheduler
from node.outcomes import RunKind, RunOutcome
from node.probes import add_probe_jobs
from node.scheduler import GatedScheduler
from node.skew import SkewMonitor

JobId = Annotated[str, Path(min_length=1, max_length=200)]

#: How long POST /admin/jobs/{id}/run waits for the run before answering 202.
RUN_NOW_WAIT = 10.0


class Node:
    """One cluster member: backend, elector, gated scheduler, metrics."""

    def __init__(self, settings: Settings, jobs: JobRegistry | None = None) -> None:
        self.settings = settings
        raw_backend = from_url(settings.lock_url)
        self.metrics = Metrics(raw_backend.kind)
        self.backend = InstrumentedBackend(raw_backend, self.metrics)
        self.holder = Holder(settings.node_id, settings.advertise_url)
        self.started_at = time.monotonic()
        self.skew = SkewMonitor(self.backend, self.metrics, max_skew=settings.max_clock_skew,
                                period=max(1.0, settings.retry_period * 5))
        naive = settings.claims == "off"  # the checker's negative control: see node.naive
        elector_cls = NaiveElector if naive else Elector
        self.elector: Elector = elector_cls(
            self.backend,
            ElectionConfig(settings.lock_name, self.holder, settings.lease_ttl, settings.renew_deadline,
                           settings.retry_period),
            on_started_leading=self._started_leading, on_stopped_leading=self._stopped_leading,
            eligible=self.skew.refusal)
        if jobs is None and settings.jobs:
            try:
                jobs = load_jobs(settings.jobs)
            except ImportStringError as exc:
                raise ConfigError("BATON_JOBS", str(exc)) from None
        registry = jobs if jobs is not None else (demo_registry() if settings.demo_jobs else JobRegistry())
        self._http: httpx.AsyncClient | None = None
        if (settings.probe_jobs or settings.probe_shapes) and settings.probe_url:
            add_probe_jobs(registry, settings.probe_jobs, settings.probe_interval, settings.probe_url,
                           self.http, settings.probe_shapes)
        scheduler_cls = NaiveScheduler if naive else GatedScheduler
        self.scheduler: GatedScheduler = scheduler_cls(
            jobs=registry, backend=self.backend, elector=self.elector, metrics=self.metrics,
            lock_name=settings.lock_name, node_id=settings.node_id, timezone=ZoneInfo(settings.timezone),
            misfire_grace=settings.misfire_grace, sync_period=settings.retry_period,
            claim_ahead=settings.claim_ahead, shutdown_grace=settings.shutdown_grace,
            sync_workers=settings.sync_workers)
        self._handing_over: asyncio.Task[None] | None = None

    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))
        return self._http

    async def _started_leading(self, lease: Any) -> None:
        await self.scheduler.on_started_leading(lease)

    async def _stopped_leading(self) -> None:
        await self.scheduler.on_stopped_leading()

    async def start(self) -> None:
        if (self.settings.probe_jobs or self.settings.probe_shapes) and self.settings.probe_url:
            # built now, not by the first probe run: building a client blocks the loop for tens of ms
            # (it loads the CA bundle), which would land right after winning and delay the first runs
            self.http()
        await self.scheduler.start()
        for spec in self.scheduler.jobs:  # every job's series exists from the start, at zero
            self.metrics.duration_of(spec.id)
            self.metrics.runs_of(spec.id, RunOutcome.OK)
            _ = spec.is_async  # computed now, not at the first fire time of a burst
        # What exists now lives as long as the node. Left in the collector, it makes every full
        # pass walk it: with thousands of jobs that is a stall of tens of ms, straight into fire lag.
        gc.freeze()
        self.skew.start()
        # a first look at the clock before campaigning, so a skewed node does not win in the meantime
        await self.skew.wait_first(self.backend.options.op_timeout * 4)
        self.elector.start()

    def hand_over(self) -> asyncio.Task[None]:
        """Begin the graceful handoff of a stopping node (idempotent): hand back, then let the lease go.

        The fire times this node owns are run or handed back before the lease is
        released, so a follower that takes over at once misses nothing and runs
        nothing twice. Running bodies keep going (``stop`` waits for them).
        """
        if self._handing_over is None:
            async def hand_over() -> None:
                await self.scheduler.hand_over()
                await self.elector.stop()

            self._handing_over = asyncio.ensure_future(hand_over())
        return self._handing_over

    async def step_down(self) -> bool:
        """Planned maintenance: hand back, release, sit out one retry period, then campaign again."""
        if not self.elector.is_leader:
            return False
        await self.scheduler.hand_over()
        return self.elector.request_step_down()

    async def stop(self) -> None:
        await self.hand_over()
        await self.skew.stop()
        await self.scheduler.shutdown()
        if self._http is not None:
            await self._http.aclose()
        await self.backend.close()

    def context(self) -> dict[str, Any]:
        lease = self.elector.current_lease()
        return {"node": self.settings.node_id, "role": "leader" if lease else "follower",
                "token": lease.token if lease else None}

    def status(self) -> dict[str, Any]:
        lease = self.elector.current_lease()
        leader = self.holder if lease else self.elector.observed_leader
        window = self.scheduler.keeper.window if lease else None
        return {
            "node_id": self.settings.node_id,
            "role": "leader" if lease else "follower",
            "leader": {"node_id": leader.node_id, "url": leader.url} if leader else None,
            "token": lease.token if lease else None,
            "lease_remaining_s": round(self.elector.lease_remaining(), 3),
            "claim_window_until": from_us(window.until_us).isoformat() if window and window.until_us else None,
            "running": len(self.scheduler.running),
            "clock_skew_s": round(self.skew.skew.seconds, 4) if self.skew.skew else None,
            "may_lead": self.elector.ineligible() is None,
            "backend": self.backend.kind,
            "claims": self.settings.claims,
        }


def create_app(node: Node | None = None) -> FastAPI:
    """The node's FastAPI app. Without ``node``: uvicorn's factory, a node built from the environment.

    ``uvicorn --factory node.app:create_app`` reads ``BATON_*`` (``BATON_JOBS``
    names the jobs), logs as ``python -m node`` does, and hands the lease over
    the moment SIGTERM or SIGINT arrives (``node.embed.Baton``). A bad setting
    stops the process with exit code 2 and one line naming the variable.
    """
    if node is None:
        from node.embed import Baton  # node.embed builds on this module

        return Baton.from_environment().app()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await node.start()
        try:
            yield
        finally:
            await node.stop()

    app = FastAPI(title="Baton node", version="0.1.0", lifespan=lifespan,
                  description="One member of a Baton cluster: leader-gated APScheduler with fenced claims.")
    app.state.node = node
    app.include_router(build_router(node))
    return app


class _BackendErrorsAre503(APIRoute):
    """A lock backend that does not answer is a 503 to the caller, whatever app the router is mounted in."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except LockBackendError as exc:
                return JSONResponse({"detail": f"lock backend error: {exc}"}, status_code=503,
                                    headers={"Retry-After": "1"})
        return handle


def build_router(node: Node) -> APIRouter:
    """Every route of the node's API, to mount under any prefix (paths in redirects keep it)."""
    app = APIRouter(route_class=_BackendErrorsAre503)

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = node.settings.admin_token
        if expected is None:
            raise HTTPException(403, "admin routes are disabled: set BATON_ADMIN_TOKEN to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(),
                                                                  expected.get_secret_value().encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    Admin = Depends(require_admin)

    async def known_job(job_id: str) -> None:
        if job_id not in node.scheduler.jobs and not node.elector.is_leader:
            # followers do not poll the shared settings: a job just stored elsewhere may be new here
            with contextlib.suppress(LockBackendError, TimeoutError):
                await node.scheduler.refresh_settings()
        if job_id not in node.scheduler.jobs:
            raise HTTPException(404, f"no job with id {job_id!r}")

    def to_leader(request: Request) -> Response | None:
        """None on the leader; a 307 to the leader elsewhere, or 503 when none is known."""
        if node.elector.is_leader:
            return None
        leader = node.elector.observed_leader
        if leader is None or not leader.url:
            return JSONResponse({"detail": "no leader right now; retry shortly"}, status_code=503,
                                headers={"Retry-After": "1"})
        return RedirectResponse(leader.url + request.url.path, status_code=307)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        believed = node.elector.believed_lease()
        if believed is not None and (node.elector.renew_failing or not node.elector.is_leader):
            return JSONResponse({"status": "unhealthy", "reason": "leading but the lease could not be renewed"},
                                status_code=503)
        skew = node.skew.skew
        if skew is not None and skew.exceeds(node.skew.max_skew):
            return JSONResponse({"status": "unhealthy", "reason": node.skew.refusal(),
                                 "clock_skew_s": round(skew.seconds, 3)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if node.elector.is_leader or node.elector.observed_leader is not None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": "no leader known yet"}, status_code=503)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return node.status()

    @app.get("/jobs")
    async def jobs() -> list[dict[str, Any]]:
        if not node.elector.is_leader:  # followers do not poll the shared pause list; read it now
            with contextlib.suppress(LockBackendError, TimeoutError):
                await node.scheduler.refresh_settings()
        return node.scheduler.describe_jobs()

    @app.get("/runs")
    async def runs(limit: Annotated[int, Query(ge=1, le=MAX_LISTING)] = 50,
                   job: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
                   outcome: RunOutcome | None = None,
                   since: Annotated[datetime | None, Query(description="ISO 8601, with an offset")] = None,
                   before: Annotated[float | None, Query(description="cursor: next_before of the previous page",
                                                         ge=0, le=1e11)] = None) -> dict[str, Any]:
        if since is not None and since.tzinfo is None:
            raise HTTPException(422, "since needs a UTC offset, e.g. 2026-12-01T03:00:00+00:00")
        query = RunQuery(limit=limit, job=job, outcome=str(outcome) if outcome else None,
                         since=since.timestamp() if since else None, before=before)
        found = await node.backend.runs(node.settings.lock_name, query)
        next_before = found[-1].claimed_at if len(found) == limit else None
        return {"runs": [r.describe() for r in found], "next_before": next_before}

    @app.post("/admin/jobs/{job_id}/run", dependencies=[Admin])
    async def run_now(job_id: JobId, request: Request,
                      force: Annotated[bool, Query(description="run even if the job is paused")] = False) -> Response:
        await known_job(job_id)
        if (redirect := to_leader(request)) is not None:
            return redirect
        now = clocks.utcnow()
        task = node.scheduler.spawn(node.scheduler.fire(job_id, now, RunKind.MANUAL, force=force))
        done, _ = await asyncio.wait({task}, timeout=RUN_NOW_WAIT)
        body = {"job": job_id, "scheduled_at": now.isoformat(), "node_id": node.settings.node_id}
        if not done:
            return JSONResponse({**body, "outcome": "running"}, status_code=202)
        outcome = task.result()
        if outcome is RunOutcome.SKIPPED:
            paused = job_id in node.scheduler.paused_jobs
            detail = ("the job is paused; add ?force=true to run it anyway" if paused
                      else "the job already runs max_instances times in the cluster")
            return JSONResponse({**body, "outcome": str(outcome), "detail": detail}, status_code=409)
        if outcome is RunOutcome.FENCED:
            return JSONResponse({**body, "outcome": str(outcome), "detail": "this node stopped leading; retry"},
                                status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({**body, "outcome": str(outcome)})

    @app.post("/admin/jobs/{job_id}/pause", dependencies=[Admin])
    async def pause(job_id: JobId) -> dict[str, Any]:
        await known_job(job_id)
        await node.scheduler.set_paused(job_id, True)
        return {"job": job_id, "paused": True}

    @app.post("/admin/jobs/{job_id}/resume", dependencies=[Admin])
    async def resume(job_id: JobId) -> dict[str, Any]:
        await known_job(job_id)
        await node.scheduler.set_paused(job_id, False)
        return {"job": job_id, "paused": False}

    @app.post("/admin/leader/step-down", dependencies=[Admin])
    async def step_down(request: Request) -> Response:
        if (redirect := to_leader(request)) is not None:
            return redirect
        stepped = await node.step_down()
        return JSONResponse({"node_id": node.settings.node_id, "stepped_down": stepped})

    add_stored_job_routes(app, node, Admin, known_job)

    @app.get("/metrics")
    async def metrics() -> Response:
        # rendered off the loop: with thousands of jobs it takes tens of ms, which would delay fire times
        body = await asyncio.to_thread(generate_latest, node.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


_default_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    """``uvicorn node.app:app``: the factory's app, built on first access (never at import)."""
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = create_app()
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
