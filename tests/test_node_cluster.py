"""Three real node processes per backend: one leader, fenced runs, fast and safe failover."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from loadtest.cluster import LocalCluster, NodeProc, Timing
from lock_backends.registry import SHARED
from node.metrics import METRIC_NAMES
from node.outcomes import RunOutcome
from tests.conftest import expiry_bound
from tests.probes import ProbeSink

TIMING = Timing(ttl=2.0, renew_deadline=1.4, retry_period=0.4, op_timeout=0.5, misfire_grace=30.0)


@pytest.fixture
def sink() -> Iterator[ProbeSink]:
    s = ProbeSink()
    yield s
    s.close()


def start_cluster(tmp_path: Path, backend: str, sink: ProbeSink, **kw: object) -> LocalCluster:
    cluster = LocalCluster(tmp_path / "cluster", backend=backend, nodes=3, timing=TIMING, probe_jobs=2,
                           probe_interval=1.0, probe_url=sink.url, **kw)  # type: ignore[arg-type]
    cluster.start()
    return cluster


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_new_leader(cluster: LocalCluster, old: NodeProc, timeout: float) -> tuple[NodeProc, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        leaders = [n for n in cluster.members if n is not old and (s := n.status()) and s["role"] == "leader"]
        if len(leaders) == 1:
            return leaders[0], time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"no new leader within {timeout}s: {cluster.statuses()}")


def assert_no_uncoalesced_misses(sink: ProbeSink, jobs: int, since: datetime, until: datetime,
                                 grace: float) -> None:
    """Every fire time in the window ran, or a later one of the same job ran within the grace (coalesced)."""
    for j in range(jobs):
        ran = set(sink.fire_times(f"probe-{j:03d}"))
        t = since.replace(microsecond=0) + timedelta(seconds=1)
        while t <= until:
            if t not in ran:
                assert any(t < r <= t + timedelta(seconds=grace) for r in ran), f"probe-{j:03d} missed {t}"
            t += timedelta(seconds=1)


@pytest.mark.parametrize("backend", SHARED)
def test_cluster_failover(backend: str, tmp_path: Path, sink: ProbeSink) -> None:
    cluster = start_cluster(tmp_path, backend, sink)
    try:
        began = datetime.now(UTC)
        leader = cluster.wait_for_leader(timeout=30)
        # exactly one leader, seen the same way by every node
        wait_until(lambda: all(s and s["leader"] and s["leader"]["node_id"] == leader.node_id
                               for s in cluster.statuses().values()), 15, "all nodes to agree on the leader")
        assert len(cluster.leaders()) == 1
        wait_until(lambda: len(sink.snapshot()) >= 4, 15, "probe runs")
        # only the leader's jobs run
        assert set(sink.by_node()) == {leader.node_id}

        # SIGSTOP the leader past its TTL: a new leader takes over; the old one, resumed, is fenced
        leader.signal(signal.SIGSTOP)
        new, _ = wait_new_leader(cluster, leader, TIMING.ttl * 3 + 5)
        paused_at_least = time.monotonic() + 1.0
        while time.monotonic() < paused_at_least:
            time.sleep(0.05)
        leader.signal(signal.SIGCONT)
        wait_until(lambda: (s := leader.status()) is not None and s["role"] == "follower", 15,
                   "the resumed leader to step down")
        assert len(cluster.leaders()) == 1
        assert not sink.duplicates()

        # SIGKILL the leader: a new one within TTL + retry (+ slack for a loaded machine)
        victim = new
        victim.kill()
        killed_at = datetime.now(UTC)
        new, took = wait_new_leader(cluster, victim, TIMING.ttl + TIMING.retry_period + 5)
        assert took < TIMING.ttl + TIMING.retry_period + 5
        victim.start()
        victim.wait_healthy()
        # the fire time(s) in the failover gap: the latest runs once, on the new leader
        wait_until(lambda: any(r["node"] == new.node_id for r in sink.snapshot()), 10, "runs on the new leader")
        time.sleep(1.5)
        assert not sink.duplicates()
        assert_no_uncoalesced_misses(sink, 2, killed_at - timedelta(seconds=2),
                                     datetime.now(UTC) - timedelta(seconds=2), TIMING.misfire_grace)

        # SIGTERM hands over at once through release + wait_for_change, before the lease could expire
        victim = new
        expires = expiry_bound(victim.status)
        victim.signal(signal.SIGTERM)
        new, took = wait_new_leader(cluster, victim, 10)
        assert time.monotonic() < expires, f"graceful handoff took {took:.2f}s, no faster than the lease's expiry"
        victim.proc.wait(timeout=15)  # type: ignore[union-attr]
        # uvicorn re-raises the SIGTERM it handled, after a clean shutdown
        assert victim.proc.returncode in (0, -signal.SIGTERM)  # type: ignore[union-attr]
        assert "Application shutdown complete" in victim.log_path.read_text()

        time.sleep(1.5)
        assert not sink.duplicates(), sink.duplicates()
        assert_no_uncoalesced_misses(sink, 2, began + timedelta(seconds=3),
                                     datetime.now(UTC) - timedelta(seconds=2), TIMING.misfire_grace)
    finally:
        cluster.close()


def test_admin_routes_metrics_and_runs(tmp_path: Path, sink: ProbeSink) -> None:
    cluster = start_cluster(tmp_path, "file", sink)
    try:
        leader = cluster.wait_for_leader()
        follower = next(n for n in cluster.members if n is not leader)
        auth = {"Authorization": f"Bearer {cluster.admin_token}"}
        # a follower forwards to the leader (a BATON_PEERS URL) and relays its answer; the leader fires
        r = httpx.post(f"{follower.url}/admin/jobs/probe-000/run", headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["outcome"] == RunOutcome.OK and "location" not in r.headers
        assert r.json()["node_id"] == leader.node_id and r.headers["x-baton-answered-by"] == leader.node_id
        assert any(x["node"] == leader.node_id for x in sink.snapshot())
        # unknown job 404, no token 401, wrong token 401
        assert httpx.post(f"{leader.url}/admin/jobs/nope/run", headers=auth).status_code == 404
        assert httpx.post(f"{leader.url}/admin/jobs/probe-000/run").status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{leader.url}/admin/jobs/probe-000/run", headers=bad).status_code == 401
        # malformed input: 4xx JSON, never 500
        r = httpx.get(f"{leader.url}/runs", params={"limit": "many"})
        assert r.status_code == 422 and "detail" in r.json()
        # recent runs come from the backend and are the same on every node
        wait_until(lambda: len(httpx.get(f"{follower.url}/runs", params={"limit": 5}).json()["runs"]) == 5, 10,
                   "runs")
        runs = httpx.get(f"{follower.url}/runs", params={"limit": 5}).json()["runs"]
        assert [r["claimed_at"] for r in runs] == sorted((r["claimed_at"] for r in runs), reverse=True)
        # pause is held in the backend: it survives a failover
        assert httpx.post(f"{follower.url}/admin/jobs/probe-001/pause", headers=auth).status_code == 200
        leader.kill()
        new = cluster.wait_for_leader(timeout=15, exclude=leader)
        jobs = {j["id"]: j for j in httpx.get(f"{new.url}/jobs").json()}
        assert jobs["probe-001"]["paused"] is True
        paused_from = datetime.now(UTC) + timedelta(seconds=1)
        time.sleep(2.5)
        assert not [r for r in sink.snapshot() if r["job"] == "probe-001"
                    and datetime.fromisoformat(r["scheduled_at"]) > paused_from]
        assert httpx.post(f"{new.url}/admin/jobs/probe-001/resume", headers=auth).status_code == 200
        # step-down: the leader releases and another node leads
        r = httpx.post(f"{new.url}/admin/leader/step-down", headers=auth)
        assert r.status_code == 200
        cluster.wait_for_leader(timeout=10, exclude=new)
        # metrics: every documented name is exported
        text = new.metrics()
        for name in METRIC_NAMES:
            assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert "process_resident_memory_bytes" in text
        # /status has the documented shape
        status = new.status()
        assert status is not None
        assert set(status) >= {"node_id", "role", "leader", "token", "lease_remaining_s", "backend"}
    finally:
        cluster.close()


def test_admin_routes_disabled_without_token(tmp_path: Path, sink: ProbeSink) -> None:
    cluster = start_cluster(tmp_path, "file", sink, admin_token="")
    try:
        leader = cluster.wait_for_leader()
        r = httpx.post(f"{leader.url}/admin/jobs/probe-000/run", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403
        assert "BATON_ADMIN_TOKEN" in r.json()["detail"]
    finally:
        cluster.close()


@pytest.mark.parametrize(("env", "variable"), [
    ({"BATON_LEASE_TTL": "0"}, "BATON_LEASE_TTL"),
    ({"BATON_LEASE_TTL": "3", "BATON_RENEW_DEADLINE": "5"}, "BATON_RENEW_DEADLINE"),
    ({"BATON_TIMEZONE": "Mars/Olympus"}, "BATON_TIMEZONE"),
    ({"BATON_LOCK_URL": "zookeeper://x:2181"}, "BATON_LOCK_URL"),
    ({"BATON_PORT": "http"}, "BATON_PORT"),
    ({"BATON_CLAIMS": "sometimes"}, "BATON_CLAIMS"),
])
def test_bad_config_exits_2_naming_the_variable(env: dict[str, str], variable: str) -> None:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")} | env
    done = subprocess.run([sys.executable, "-m", "node"], env=full, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]
    assert "Traceback" not in done.stderr
