"""The runtime job store, in process on memory://: routes through httpx.ASGITransport, real nodes underneath.

Every backend, with real processes (a leader kill, a full restart), is in
tests/test_stored_jobs_cluster.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from lock_backends.memory import MemoryBackend
from node.app import Node, create_app
from node.jobs import JobRegistry, JobSpec, RunContext
from node.outcomes import RunKind, RunOutcome
from node.stored_jobs import JOB_PREFIX
from tests import stored_targets
from tests.conftest import eventually
from tests.memory_cluster import Cluster
from tests.stored_targets import calls_of

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def code_job(run: RunContext) -> None:
    return None


def code_jobs() -> list[JobSpec]:
    registry = JobRegistry()
    registry.interval("code-job", hours=1)(code_job)
    return list(registry)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    stored_targets.CALLS.clear()
    made = Cluster(code_jobs, admin_token=TOKEN)
    yield made
    await made.close()


@asynccontextmanager
async def api(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://node", timeout=10) as client:
        yield client


async def leader_and_follower(cluster: Cluster) -> tuple[Node, Node]:
    a = await cluster.start("a")
    await cluster.leader()
    b = await cluster.start("b")
    return a, b


def tenant_job(job_id: str = "tenant-42", **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "func": "tests.stored_targets:sync_tenant", "args": [42], "kwargs": {"full": True},
            "trigger": "interval", "seconds": 0.4, **extra}


async def settings_of(cluster: Cluster) -> dict[str, str]:
    return await MemoryBackend.from_url(f"memory://{cluster.store}").settings("baton")


async def until(what: str, check: Callable[[], bool], within: float = 10.0) -> None:
    async def op() -> bool | None:
        return True if check() else None
    await eventually(what, op, within=within)


# -- add, list, run -------------------------------------------------------------------------------


async def test_a_job_added_through_a_follower_runs_on_the_leader_and_is_listed_everywhere(cluster: Cluster) -> None:
    a, b = await leader_and_follower(cluster)
    async with api(b) as follower, api(a) as leader_api:
        r = await follower.post("/admin/jobs", json=tenant_job(), headers=AUTH)
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["origin"] == "stored" and created["func"] == "tests.stored_targets:sync_tenant"
        assert created["schedule"] == {"type": "interval", "seconds": 0.4} and created["args"] == [42]
        # the leader learns it within one retry period, and runs it
        await until("the leader runs the stored job", lambda: len(calls_of("tenant-42")) >= 2)
        assert {c[4] for c in calls_of("tenant-42")} == {"a"}
        assert calls_of("tenant-42")[0][1:3] == ((42,), {"full": True})
        for client in (follower, leader_api):
            listed = {j["id"]: j for j in (await client.get("/jobs")).json()}
            assert listed["code-job"]["origin"] == "code" and listed["tenant-42"]["origin"] == "stored"
            one = (await client.get("/jobs/tenant-42")).json()
            assert one["spec"]["func"] == "tests.stored_targets:sync_tenant"
        # results, as for any job: outcome, duration, the returned value
        runs = (await follower.get("/runs", params={"job": "tenant-42", "outcome": RunOutcome.OK})).json()["runs"]
        assert runs and runs[0]["job"] == "tenant-42"
        assert runs[0]["result"]["value"] == {"tenant": 42, "rows": 3} and "duration_ms" in runs[0]["result"]
        # the admin routes of any job work on stored jobs
        assert (await follower.post("/admin/jobs/tenant-42/pause", headers=AUTH)).status_code == 200
        r = await leader_api.post("/admin/jobs/tenant-42/run", params={"force": "true"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["outcome"] == RunOutcome.OK


async def test_a_one_shot_added_late_through_a_follower_still_runs_once(cluster: Cluster) -> None:
    """The leader learns of a change one sync later; a one-shot due meanwhile is caught up, not lost."""
    a, b = await leader_and_follower(cluster)
    a.scheduler.sync_period = 1.5  # the leader looks only every 1.5 s from its next look on
    await asyncio.sleep(0.3)
    at = datetime.now(UTC) + timedelta(seconds=0.4)
    async with api(b) as follower:
        body = {"id": "soon", "func": "tests.stored_targets:ping", "kwargs": {"label": "x"}, "trigger": "date",
                "run_date": at.isoformat()}
        assert (await follower.post("/admin/jobs", json=body, headers=AUTH)).status_code == 201
    await until("the one-shot ran", lambda: bool(calls_of("soon")), within=10)
    await asyncio.sleep(2.0)
    assert [(c[4], c[5], c[6]) for c in calls_of("soon")] == [("a", at, RunKind.CATCH_UP)]


# -- validation: nothing invalid is stored --------------------------------------------------------


INVALID = [
    ({**tenant_job(), "func": "no_such_module.tasks:f"}, "func", "no module named"),
    ({**tenant_job(), "func": "tests.stored_targets:missing"}, "func", "has no attribute"),
    ({**tenant_job(), "func": "tests.stored_targets:NOT_CALLABLE"}, "func", "not a function"),
    ({**tenant_job(), "func": "not an import string"}, "func", "import string"),
    ({**tenant_job(), "args": [1, 2, 3]}, "args", "sync_tenant"),
    ({**tenant_job(), "kwargs": {"nope": 1}}, "args", "nope"),
    ({**tenant_job(), "jitter": 5}, "jitter", "disagree"),
    ({**tenant_job(), "hour": 3}, "hour", "belongs to cron"),
    ({**tenant_job(), "trigger": "weekly"}, "trigger", "not a trigger"),
    ({**tenant_job(), "seconds": 0}, "seconds", "positive"),
    ({**tenant_job(), "max_instances": 0}, "max_instances", "1 or more"),
    ({**tenant_job(), "replace_existing": True}, "replace_existing", "PUT"),
    ({"id": "d", "func": "tests.stored_targets:ping", "trigger": "date",
      "run_date": "2020-01-01T00:00:00+00:00"}, "run_date", "past"),
    ({**tenant_job(), "id": "bad id"}, "id", "without spaces"),
    ({"func": "tests.stored_targets:ping", "trigger": "interval", "seconds": 1}, "id", "needs an id"),
]


@pytest.mark.parametrize(("body", "field", "words"), INVALID, ids=[f"{f}-{w}" for _, f, w in INVALID])
async def test_an_invalid_job_is_refused_with_422_and_not_stored(cluster: Cluster, body: dict[str, Any],
                                                                 field: str, words: str) -> None:
    a = await cluster.start("a")
    async with api(a) as client:
        r = await client.post("/admin/jobs", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert f": {field}: " in detail and words in detail
    assert not [k for k in await settings_of(cluster) if k.startswith(JOB_PREFIX)]


async def test_malformed_bodies_and_missing_tokens_are_4xx_never_500(cluster: Cluster) -> None:
    a = await cluster.start("a")
    async with api(a) as client:
        assert (await client.post("/admin/jobs", json=tenant_job())).status_code == 401
        assert (await client.post("/admin/jobs", content=b"{", headers={**AUTH, "content-type": "application/json"})
                ).status_code == 422
        assert (await client.post("/admin/jobs", json=[1, 2], headers=AUTH)).status_code == 422
        assert (await client.put("/admin/jobs/x", json=tenant_job("y"), headers=AUTH)).status_code == 422


# -- ids: no silent shadowing -------------------------------------------------------------------------


async def test_ids_of_code_jobs_and_existing_stored_jobs_are_refused_409(cluster: Cluster) -> None:
    a = await cluster.start("a")
    async with api(a) as client:
        r = await client.post("/admin/jobs", json=tenant_job("code-job"), headers=AUTH)
        assert r.status_code == 409 and "defined in the application's code" in r.json()["detail"]
        assert (await client.put("/admin/jobs/code-job", json=tenant_job("code-job"), headers=AUTH)).status_code == 409
        assert (await client.delete("/admin/jobs/code-job", headers=AUTH)).status_code == 409
        assert (await client.post("/admin/jobs", json=tenant_job(), headers=AUTH)).status_code == 201
        r = await client.post("/admin/jobs", json=tenant_job(), headers=AUTH)
        assert r.status_code == 409 and "PUT" in r.json()["detail"]
        assert (await client.delete("/admin/jobs/nothing-here", headers=AUTH)).status_code == 404


async def test_a_stored_value_that_collides_with_a_code_job_is_skipped_not_shadowing(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    a = await cluster.start("a")
    await cluster.leader()
    await a.backend.set_setting("baton", JOB_PREFIX + "code-job",
                                '{"id":"code-job","func":"tests.stored_targets:ping","trigger":"interval",'
                                '"seconds":0.2}')
    with caplog.at_level(logging.WARNING, logger="baton.stored_jobs"):
        await a.scheduler.refresh_settings()
        await a.scheduler.refresh_settings()
    assert a.scheduler.jobs.specs["code-job"].origin == "code"
    assert len([r for r in caplog.records if "code-job" in r.getMessage()]) == 1
    await asyncio.sleep(0.6)
    assert not calls_of("code-job")


# -- change, reschedule, remove --------------------------------------------------------------------------


async def test_put_reschedules_and_delete_removes_it_from_every_node(cluster: Cluster) -> None:
    a, b = await leader_and_follower(cluster)
    async with api(b) as follower, api(a) as leader_api:
        r = await follower.put("/admin/jobs/tenant-42", json=tenant_job(), headers=AUTH)
        assert r.status_code == 201
        await until("runs", lambda: len(calls_of("tenant-42")) >= 2)
        created_at = r.json()["created_at"]
        # reschedule: a new trigger, same function; the leader follows within a retry period
        body = {**tenant_job(), "seconds": None, "trigger": "cron", "second": "*/1", "args": [7]}
        del body["seconds"]
        r = await follower.put("/admin/jobs/tenant-42", json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["created_at"] == created_at
        assert r.json()["schedule"]["type"] == "cron"
        await until("runs with the new arguments", lambda: any(c[1] == (7,) for c in calls_of("tenant-42")))
        changed = next(c[5] for c in calls_of("tenant-42") if c[1] == (7,))
        assert all(c[5].microsecond == 0 for c in calls_of("tenant-42") if c[5] >= changed)
        assert (await follower.post("/admin/jobs/tenant-42/pause", headers=AUTH)).status_code == 200
        # remove: gone everywhere, and no more runs on the leader
        r = await follower.delete("/admin/jobs/tenant-42", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"id": "tenant-42", "removed": True}
        await asyncio.sleep(0.5)  # > one retry period (0.2 s)
        count = len(calls_of("tenant-42"))
        await asyncio.sleep(1.2)
        assert len(calls_of("tenant-42")) == count
        for client in (follower, leader_api):
            assert "tenant-42" not in {j["id"] for j in (await client.get("/jobs")).json()}
            assert (await client.get("/jobs/tenant-42")).status_code == 404
    assert not [k for k in await settings_of(cluster) if k.endswith("tenant-42")]  # the paused flag too


# -- durability -------------------------------------------------------------------------------------------


async def test_stored_jobs_survive_a_handoff_and_a_full_restart(cluster: Cluster) -> None:
    a, _ = await leader_and_follower(cluster)
    async with api(a) as client:
        assert (await client.post("/admin/jobs", json=tenant_job(), headers=AUTH)).status_code == 201
    await until("runs on a", lambda: any(c[4] == "a" for c in calls_of("tenant-42")))
    await a.stop()
    del cluster.nodes["a"]
    await cluster.leader()
    await until("runs on b", lambda: any(c[4] == "b" for c in calls_of("tenant-42")))
    for node in list(cluster.nodes.values()):
        await node.stop()
    cluster.nodes.clear()
    c = await cluster.start("c")  # a fresh node: it knows the job from the store alone
    assert "tenant-42" in c.scheduler.jobs
    await cluster.leader()
    await until("runs on c", lambda: any(c[4] == "c" for c in calls_of("tenant-42")))
    duplicates = [t for t in {c[5] for c in calls_of("tenant-42")}
                  if len([c for c in calls_of("tenant-42") if c[5] == t]) > 1]
    assert duplicates == []


# -- values that do not decode ---------------------------------------------------------------------------


async def test_a_stored_value_that_does_not_decode_is_logged_once_and_skipped(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    a = await cluster.start("a")
    await cluster.leader()
    await a.backend.set_setting("baton", JOB_PREFIX + "garbled", "{not json")
    await a.backend.set_setting("baton", JOB_PREFIX + "gone",
                                '{"id":"gone","func":"removed_in_a_deploy:f","trigger":"interval","seconds":1}')
    await a.backend.set_setting("baton", JOB_PREFIX + "fine",
                                '{"id":"fine","func":"tests.stored_targets:ping","trigger":"interval","seconds":1}')
    with caplog.at_level(logging.WARNING, logger="baton.stored_jobs"):
        await asyncio.sleep(1.0)  # several settings syncs of the leader
        async with api(a) as client:
            r = await client.get("/jobs")
            assert r.status_code == 200
            assert {j["id"] for j in r.json()} == {"code-job", "fine"}
            assert (await client.get("/jobs/garbled")).status_code == 404
    complaints = [r.getMessage() for r in caplog.records if r.name == "baton.stored_jobs"]
    assert len([m for m in complaints if "garbled" in m]) == 1
    assert len([m for m in complaints if "gone" in m and "removed_in_a_deploy" in m]) == 1
