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
import hmac
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.convertors import PathConvertor, register_url_convertor

from lock_backends import Holder, LockBackendError, RunQuery, from_url, redact
from lock_backends import clock as clocks
from lock_backends.base import MAX_LISTING
from lock_backends.clock import from_us
from node import gc_policy
from node.config import ConfigError, Settings
from node.election import ElectionConfig, Elector
from node.forward import Forwarder
from node.imports import ImportStringError, load_jobs
from node.instrumented import InstrumentedBackend
from node.jobs import JobRegistry, demo_registry
from node.jobs_api import add_stored_job_routes
from node.limits import READ_BUDGET, ReadLimiter, ReadsExhausted, ReadTooSlow
from node.metrics import Metrics
from node.naive import NaiveElector, NaiveScheduler
from node.outcomes import RunKind, RunOutcome
from node.probes import add_probe_jobs
from node.scheduler import GatedScheduler
from node.skew import SkewMonitor

JobId = Annotated[str, Path(min_length=1, max_length=200)]

#: How long POST /admin/jobs/{id}/run waits for the run before answering 202.
RUN_NOW_WAIT = 10.0
#: How long a follower waits for the leader's answer to a call it forwards: a manual run's wait and then some.
FORWARD_TIMEOUT = RUN_NOW_WAIT + 10.0
#: The methods the catch-all admin routes answer (authenticated first); any other is a plain 405.
ANY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


class _AnyPath(PathConvertor):
    """Starlette's ``path`` convertor, matching line breaks too: ``.*`` stops at a ``%0A``, which let
    ``/admin/jobs/%0A/run/`` slip past the authenticated catch-all (found by tests/test_api_fuzz.py)."""

    regex = "(?s:.*)"


register_url_convertor("baton_any_path", _AnyPath())


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
        self._gc_held = False  # this node raised the collector's threshold (gc_policy) and owes it back
        #: Store reads the API may start (``GET /runs``, a follower's ``GET /jobs``): never the lease's.
        self.reads = ReadLimiter(budget=raw_backend.options.op_timeout * READ_BUDGET,
                                 on_reject=self.metrics.api_reads_rejected.inc)
        #: Admin calls that must reach the leader go there through this node, to a BATON_PEERS URL only.
        self.forwarder = Forwarder(settings.advertise_url, settings.peers, FORWARD_TIMEOUT)

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
            self.metrics.runs.add_job(spec.id, RunOutcome.OK)
            _ = spec.is_async  # computed now, not at the first fire time of a burst
        # what exists now lives as long as the node
        gc_policy.freeze()
        self.skew.start()
        # a first look at the clock before campaigning, so a skewed node does not win in the meantime
        await self.skew.wait_first(self.backend.options.op_timeout * 4)
        self.elector.start()
        if not self._gc_held:  # last: a start that failed owes the collector nothing (gc_policy)
            gc_policy.acquire()
            self._gc_held = True

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
        try:
            await self.hand_over()
            await self.skew.stop()
            await self.scheduler.shutdown()
            if self._http is not None:
                await self._http.aclose()
            await self.forwarder.aclose()
            await self.backend.close()
        finally:
            if self._gc_held:
                self._gc_held = False
                gc_policy.release()

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

    # redirect_slashes=False: Starlette builds the redirect's Location from the request's Host header
    app = FastAPI(title="Baton node", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="One member of a Baton cluster: leader-gated APScheduler with fenced claims.")
    app.state.node = node
    app.include_router(build_router(node))
    return app


class _BackendErrorsAre503(APIRoute):
    """A lock backend that does not answer, or holds garbage, is a 503 to the caller, under any app.

    The message names the backend and, for ``CorruptValue``, the key to repair;
    it never carries a secret (``public_message``). A store read the node's
    ``ReadLimiter`` refused is a 429 with ``Retry-After``; one it abandoned over
    its budget a 503.
    """

    #: The node's settings, for the secrets no message may show (``build_router`` sets them on a subclass).
    settings: Settings | None = None
    #: Why a request may not use an admin route (None: it may), from its Authorization header; set with settings.
    admin_refusal: Callable[[str | None], HTTPException | None] | None = None
    #: The dependency that marks a route as an admin route.
    admin_dependency: Callable[..., None] | None = None

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()
        settings = self.settings
        # The token is asked for here, before FastAPI reads the body: a dependency runs after that, so JSON
        # that did not parse was a 422 to a caller without the token (found by tests/test_api_fuzz.py). The
        # admin dependency, not the path, says which routes are admin ones: a router prefix changes the path.
        admin = any(getattr(d, "dependency", None) is self.admin_dependency for d in self.dependencies)
        refusal = self.admin_refusal if admin and self.admin_dependency is not None else None

        async def handle(request: Request) -> Response:
            if refusal is not None and (refused := refusal(request.headers.get("authorization"))) is not None:
                raise refused
            try:
                return await handler(request)
            except LockBackendError as exc:
                return JSONResponse({"detail": f"lock backend error: {public_message(exc, settings)}"},
                                    status_code=503, headers={"Retry-After": "1"})
            except ReadsExhausted as exc:
                return JSONResponse({"detail": str(exc)}, status_code=429,
                                    headers={"Retry-After": str(exc.retry_after)})
            except ReadTooSlow as exc:
                return JSONResponse({"detail": str(exc)}, status_code=503,
                                    headers={"Retry-After": str(exc.retry_after)})
            except RequestValidationError as exc:
                # FastAPI's own handler echoes the input and decodes bytes as UTF-8: a body of bytes that are
                # neither JSON nor UTF-8 made it a 500, and so did a body of ``Infinity`` (Python's JSON reads it,
                # no JSON may carry it back): both found by tests/test_api_fuzz.py
                errors = _finite(jsonable_encoder(exc.errors(), custom_encoder={bytes: _printable}))
                return JSONResponse({"detail": errors}, status_code=422)
        return handle


def _printable(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float as its text: what strict JSON can carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def public_message(exc: BaseException, settings: Settings | None = None) -> str:
    """``exc`` as text a client may see: one line, the lock URL's password and the admin token never in it.

    Backends already keep credentials out of their messages (their ``address``
    has none); this is the second line of defence, for a client library that
    quotes a URL or a server that echoes what it was sent.
    """
    text = " ".join(str(exc).split())
    secrets: list[str] = []
    if settings is not None:
        if settings.admin_token is not None:
            secrets.append(settings.admin_token.get_secret_value())
        with contextlib.suppress(ValueError):
            password = urlsplit(settings.lock_url).password
            if password:
                secrets.append(password)
                secrets.append(quote(password, safe=""))
        text = text.replace(settings.lock_url, redact(settings.lock_url))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def build_router(node: Node) -> APIRouter:
    """Every route of the node's API, to mount under any prefix (forwarded calls keep it).

    No route redirects. Every path under ``/admin`` (an unknown one, one with a
    trailing slash, a known one with another method) is authenticated before
    anything else answers, so no app it is mounted in turns one into a
    redirect built from the request's ``Host`` (Starlette's ``redirect_slashes``).
    """
    def refuse_admin(authorization: str | None) -> HTTPException | None:
        """Why a caller with this Authorization header may not use an admin route; None when it may."""
        expected = node.settings.admin_token
        if expected is None:
            return HTTPException(403, "admin routes are disabled: set BATON_ADMIN_TOKEN to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(),
                                                                  expected.get_secret_value().encode()):
            return HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        return None

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if (refusal := refuse_admin(authorization)) is not None:
            raise refusal

    Admin = Depends(require_admin)

    class NodeRoute(_BackendErrorsAre503):
        settings = node.settings
        admin_refusal = staticmethod(refuse_admin)
        admin_dependency = staticmethod(require_admin)

    app = APIRouter(route_class=NodeRoute, redirect_slashes=False)

    async def refresh_settings(*, limited: bool) -> str | None:
        """A follower's read of the shared settings (it does not poll them); None, or why it could not read.

        ``limited``: the read is for an unauthenticated request and takes a
        slot of the node's ``ReadLimiter`` (``ReadsExhausted``: a 429). What
        the store could not give (unreachable, a value that does not decode)
        leaves the last good settings in place, and the reason is returned.
        """
        try:
            if limited:
                await node.reads.read(node.scheduler.refresh_settings)
            else:
                await node.scheduler.refresh_settings()
        except LockBackendError as exc:
            return public_message(exc, node.settings)
        except (TimeoutError, ReadTooSlow):
            return "the lock backend did not answer in time"
        return None

    async def known_job(job_id: str, *, limited: bool = False) -> None:
        if job_id not in node.scheduler.jobs and not node.elector.is_leader:
            # followers do not poll the shared settings: a job just stored elsewhere may be new here
            await refresh_settings(limited=limited)
        if job_id not in node.scheduler.jobs:
            raise HTTPException(404, f"no job with id {job_id!r}")

    async def known_job_read(job_id: str) -> None:
        await known_job(job_id, limited=True)

    async def to_leader(request: Request) -> Response | None:
        """None on the leader; elsewhere the leader's own answer, forwarded (``node.forward``), or a 503."""
        if node.elector.is_leader:
            return None
        return await node.forwarder.to_leader(request, node.elector.observed_leader, node.settings.node_id)

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
    async def jobs(response: Response) -> list[dict[str, Any]]:
        """Every job. A follower reads the shared settings first; when it cannot, it answers from the last
        good ones and says so in ``X-Baton-Stale``."""
        if not node.elector.is_leader:  # followers do not poll the shared pause list; read it now
            stale = await refresh_settings(limited=True)
            if stale is not None:
                response.headers[STALE_HEADER] = header_safe(f"settings not read, showing the last good ones: "
                                                             f"{stale}")
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
        found = await node.reads.read(lambda: node.backend.runs(node.settings.lock_name, query))
        next_before = found[-1].claimed_at if len(found) == limit else None
        return {"runs": [r.describe() for r in found], "next_before": next_before}

    @app.post("/admin/jobs/{job_id}/run", dependencies=[Admin])
    async def run_now(job_id: JobId, request: Request,
                      force: Annotated[bool, Query(description="run even if the job is paused")] = False) -> Response:
        await known_job(job_id)
        if (forwarded := await to_leader(request)) is not None:
            return forwarded
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
        if (forwarded := await to_leader(request)) is not None:
            return forwarded
        stepped = await node.step_down()
        return JSONResponse({"node_id": node.settings.node_id, "stepped_down": stepped})

    add_stored_job_routes(app, node, Admin, known_job_read)

    async def no_such_admin_route(request: Request) -> Response:
        """Any other path (or method) under /admin: authenticated first, then 404, never a redirect."""
        if (refusal := refuse_admin(request.headers.get("authorization"))) is not None:
            raise refusal
        raise HTTPException(404, "no such admin route (admin paths take no trailing slash)")

    # last, so every real route matches first (a method those lack matches here, authenticated, too)
    for path in ("/admin", "/admin/{rest:baton_any_path}"):
        app.add_route(path, no_such_admin_route, methods=ANY_METHOD, include_in_schema=False)

    @app.get("/metrics")
    async def metrics() -> Response:
        # rendered off the loop: with thousands of jobs it takes tens of ms, which would delay fire times
        body = await asyncio.to_thread(generate_latest, node.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


#: Set on ``GET /jobs`` when a follower could not read the shared settings and shows the last good ones.
STALE_HEADER = "X-Baton-Stale"


def header_safe(text: str, limit: int = 400) -> str:
    """``text`` as a header value: printable ASCII on one line, at most ``limit`` characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in " ".join(text.split()))[:limit]


_default_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    """``uvicorn node.app:app``: the factory's app, built on first access (never at import)."""
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = create_app()
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
