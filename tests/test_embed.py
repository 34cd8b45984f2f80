"""node.embed.Baton inside a user's FastAPI app, in process on memory://: lifespan, router prefix, signals, factory.

The same with real uvicorn processes (three of them, a SIGTERM mid-request)
is in tests/test_your_jobs.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import node.app
from lock_backends.memory import drop_store
from node.config import Settings
from node.embed import Baton
from node.jobs import JobRegistry, RunContext
from tests.conftest import eventually
from tests.memory_backend import MemoryBackend, Store

TOKEN = "s3cret"
TIMING: dict[str, Any] = {"lease_ttl": 2.0, "renew_deadline": 1.4, "retry_period": 0.2}


@pytest.fixture
def store() -> Iterator[str]:
    name = f"embed-{uuid.uuid4().hex[:8]}"
    yield name
    drop_store(name)


def registry() -> JobRegistry:
    jobs = JobRegistry()

    @jobs.interval("tick", seconds=0.5)
    async def tick(run: RunContext) -> None:
        return None

    return jobs


def baton(store: str, node_id: str, peers: tuple[str, ...] = (), **kw: Any) -> Baton:
    settings = Settings(node_id=node_id, lock_url=f"memory://{store}", admin_token=TOKEN,
                        advertise_url=f"http://{node_id}:8000", demo_jobs=False, peers=peers, **TIMING)
    return Baton(settings, registry(), **kw)


class Hosts(httpx.AsyncBaseTransport):
    """Routes each request to the in-process app of its host (``a:8000`` -> that node's app)."""

    def __init__(self, apps: dict[str, FastAPI]) -> None:
        self.transports = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transports[request.url.netloc.decode()].handle_async_request(request)


def users_app(b: Baton) -> FastAPI:
    """The README's shape: the user's own lifespan around Baton's, the router under /baton."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.mine = "started"
        async with b.lifespan(app):
            yield

    app = FastAPI(lifespan=lifespan)
    app.include_router(b.router, prefix="/baton")

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"hello": "world"}

    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app", timeout=10)


async def leads(b: Baton) -> bool | None:
    return True if b.node.elector.is_leader else None


async def test_the_router_serves_under_the_users_prefix_beside_the_users_routes(store: str) -> None:
    a = baton(store, "a", handle_signals=False)
    b = baton(store, "b", peers=("http://a:8000",), handle_signals=False)
    app_a, app_b = users_app(a), users_app(b)
    b.node.forwarder.transport = Hosts({"a:8000": app_a})
    async with a.lifespan(app_a):
        await eventually("a leads", lambda: leads(a), within=10)
        async with b.lifespan(app_b), client(app_a) as ca, client(app_b) as cb:
            assert (await ca.get("/")).json() == {"hello": "world"}
            status = (await ca.get("/baton/status")).json()
            assert status["node_id"] == "a" and status["role"] == "leader"
            assert [j["id"] for j in (await cb.get("/baton/jobs")).json()] == ["tick"]
            # a follower forwards to the leader under the same prefix: the leader serves the same router there
            r = await cb.post("/baton/admin/jobs/tick/run", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and r.json()["node_id"] == "a" and "location" not in r.headers
            assert r.headers["x-baton-answered-by"] == "a"
            assert (await ca.post("/baton/admin/jobs/tick/run")).status_code == 401
            # every admin path, a trailing slash or an unknown one too, is authenticated before anything else
            for path in ("/baton/admin/jobs/tick/run/", "/baton/admin/nope", "/baton/admin", "/baton/admin/",
                         "/baton/admin/jobs/%0A/run/"):
                r = await cb.post(path, headers={"Host": "evil.example"})
                assert r.status_code == 401 and "location" not in r.headers, path


async def test_a_backend_that_does_not_answer_is_a_503_under_any_app(store: str) -> None:
    b = baton(store, "a", handle_signals=False)
    outage = Store(name=store)
    b.node.backend.inner = MemoryBackend(outage)
    outage.down = True
    async with client(users_app(b)) as c:
        r = await c.get("/baton/runs")
    assert r.status_code == 503 and "lock backend error" in r.json()["detail"]


async def test_sigterm_starts_the_handoff_at_once_and_the_handlers_come_back(store: str) -> None:
    received: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:  # stands in for uvicorn's handler
        received.append(signum)

    old = {sig: signal.signal(sig, previous) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        a, b = baton(store, "a"), baton(store, "b", handle_signals=False)
        app = users_app(a)
        async with a.lifespan(app):
            await eventually("a leads", lambda: leads(a), within=10)
            async with b.lifespan(users_app(b)):
                assert signal.getsignal(signal.SIGTERM) == a._on_signal
                os.kill(os.getpid(), signal.SIGTERM)
                # the lease goes while the app still serves: the handoff did not wait for the shutdown
                await eventually("b leads", lambda: leads(b), within=2, every=0.01)
                assert not a.node.elector.is_leader
                assert received == [signal.SIGTERM]  # the server's own handler still ran
        assert signal.getsignal(signal.SIGTERM) is previous and signal.getsignal(signal.SIGINT) is previous
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


async def test_signals_are_left_alone_when_asked(store: str) -> None:
    a = baton(store, "a", handle_signals=False)
    before = signal.getsignal(signal.SIGTERM)
    async with a.lifespan(None):
        assert signal.getsignal(signal.SIGTERM) == before


def test_the_factory_builds_a_node_from_the_environment(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.logs.setup", lambda *a: None)  # the factory's logging is for a process of its own
    for key in [k for k in os.environ if k.startswith("BATON_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BATON_LOCK_URL", f"memory://{store}")
    monkeypatch.setenv("BATON_NODE_ID", "from-env")
    monkeypatch.setenv("BATON_JOBS", "tests.cluster_jobs:from_env")
    monkeypatch.setenv("JOBS_TEST_T0", "2030-01-01T00:00:00+00:00")
    monkeypatch.setenv("JOBS_TEST_RECORDS", "/dev/null")
    monkeypatch.setenv("BATON_SYNC_WORKERS", "5")
    app = node.app.create_app()
    built = app.state.node
    assert built.settings.node_id == "from-env"
    assert "once-late" in built.scheduler.jobs and "heartbeat" not in built.scheduler.jobs
    assert built.scheduler._sync_pool._max_workers == 5
    monkeypatch.setattr(node.app, "_default_app", None)
    assert node.app.app.state.node.settings.node_id == "from-env"  # uvicorn node.app:app


def test_the_factory_exits_2_with_one_line_for_a_bad_setting(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BATON_JOBS", "nowhere.at_all:registry")
    with pytest.raises(SystemExit) as stop:
        node.app.create_app()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("baton: configuration error: BATON_JOBS: cannot import")


async def test_the_lifespan_stops_the_node_even_when_the_app_fails_to_start(store: str) -> None:
    a = baton(store, "a", handle_signals=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with a.lifespan(app):
            raise RuntimeError("the user's startup failed")
            yield  # pragma: no cover

    with pytest.raises(RuntimeError):
        async with lifespan(FastAPI()):
            pass
    await asyncio.sleep(0)
    assert a.node.elector._task is not None and a.node.elector._task.done()
