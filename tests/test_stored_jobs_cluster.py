"""A job added at runtime through one node: runs on the leader, survives a leader kill and a full cluster
restart, follows a reschedule, and is gone everywhere after DELETE. Real processes, the Python client.

The job's target (tests.cluster_jobs:record) writes one line per start; the
verdict comes from those lines.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.cluster import LocalCluster, NodeProc, Timing
from lock_backends.registry import SHARED
from node.client import BatonClient, InvalidJob, JobConflict
from tests.app_procs import wait_until

TIMING = Timing(ttl=2.0, renew_deadline=1.4, retry_period=0.4, op_timeout=0.5, misfire_grace=10.0)


def starts(records: Path) -> list[dict[str, Any]]:
    if not records.exists():
        return []
    return [json.loads(line) for line in records.read_text().splitlines()]


def jobs_on(node: NodeProc) -> set[str]:
    return {j["id"] for j in httpx.get(f"{node.url}/jobs", timeout=10).json()}


# Runs on every backend; file, redis and postgres pass once their claim-window ports are merged
# (on the jobs branch only memory:// and etcd have them).
@pytest.mark.parametrize("backend", SHARED)
def test_a_stored_job_survives_a_leader_kill_and_a_full_restart_and_delete_removes_it(
        backend: str, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    cluster = LocalCluster(tmp_path / "cluster", backend=backend, nodes=3, timing=TIMING,
                           extra_env={"JOBS_TEST_RECORDS": str(records)})
    try:
        cluster.start()
        leader = cluster.wait_for_leader(timeout=60)
        follower = next(n for n in cluster.members if n is not leader)
        with BatonClient(follower.url, token=cluster.admin_token) as client:
            with pytest.raises(InvalidJob, match="func"):
                client.add_job("tenant", "tests.cluster_jobs:nope", "interval", seconds=1)
            created = client.add_job("tenant", "tests.cluster_jobs:record", "interval", seconds=1,
                                     kwargs={"label": "v1"})
            assert created["origin"] == "stored"
            with pytest.raises(JobConflict):
                client.add_job("tenant", "tests.cluster_jobs:record", "interval", seconds=1)
        wait_until("runs on the leader", lambda: len(starts(records)) >= 3, 20)
        assert {s["node"] for s in starts(records)} == {leader.node_id}
        assert all(jobs_on(n) == {"tenant"} for n in cluster.members)

        # the leader dies: the next one runs the job (it knows it from the store)
        leader.kill()
        new = cluster.wait_for_leader(timeout=20, exclude=leader)
        wait_until("runs on the new leader", lambda: any(s["node"] == new.node_id for s in starts(records)), 20)
        leader.start()
        leader.wait_healthy()

        # every node stops; a fresh cluster finds the job in the store
        for node in cluster.members:
            node.terminate()
        stopped = datetime.now(UTC)
        for node in cluster.members:
            node.start()
        for node in cluster.members:
            node.wait_healthy()
        cluster.wait_for_leader(timeout=30)
        wait_until("runs after the full restart", lambda: any(
            datetime.fromisoformat(s["started_at"]) > stopped for s in starts(records)), 20)

        # change and reschedule through a node, not necessarily the leader
        some = cluster.members[-1]
        with BatonClient(some.url, token=cluster.admin_token) as client:
            client.modify_job("tenant", kwargs={"label": "v2"})
            wait_until("the change reaches the leader", lambda: any(
                s.get("label") == "v2" for s in starts(records)), 10)
            client.reschedule_job("tenant", "cron", second="*/2")
            changed = datetime.now(UTC)
            time.sleep(1.0)  # more than one retry period: the leader has the new schedule
            wait_until("runs on the new schedule", lambda: len(
                [s for s in starts(records) if datetime.fromisoformat(s["started_at"]) > changed]) >= 3, 15)
            after = [datetime.fromisoformat(s["scheduled_at"]) for s in starts(records)
                     if datetime.fromisoformat(s["started_at"]) > changed]
            assert all(t.second % 2 == 0 and t.microsecond == 0 for t in after), after
            assert client.get_job("tenant")["schedule"] == {"type": "cron", "second": "*/2"}

            # remove it: no run after one retry period, on any node, and no node lists it
            client.remove_job("tenant")
        time.sleep(TIMING.retry_period * 2 + 0.3)
        count = len(starts(records))
        time.sleep(3.0)
        assert len(starts(records)) == count
        assert all(jobs_on(n) == set() for n in cluster.members)
    finally:
        cluster.close()
    counts = Counter(s["scheduled_at"] for s in starts(records))
    assert [t for t, n in counts.items() if n > 1] == []
