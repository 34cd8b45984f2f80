"""Claims ahead of the fire time (node.claims), on every backend, through a real in-process node."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from lock_backends import from_url
from node.app import Node
from node.config import Settings
from node.jobs import JobRegistry, JobSpec, RunContext, claim_key
from tests.conftest import eventually

INTERVAL = 0.3
RUNS = 6


def ops(node: Node, op: str) -> float:
    labels = {"backend": node.metrics.backend, "op": op, "result": "ok"}
    return node.metrics.registry.get_sample_value("baton_lock_ops_total", labels) or 0.0


@pytest.mark.parametrize("claim_ahead", [0.25, 0.0])
async def test_every_claim_is_run_and_recorded_through_a_stop(backend_url: str, lock_name: str,
                                                              claim_ahead: float) -> None:
    """Each claim the leader made, ahead or at the fire time, ends as a run with its record.

    The node stops while a fire time is claimed ahead: the stop drains it
    (runs it) before handing over, so no claim is left without a result.
    """
    ran: list[RunContext] = []

    async def body(run: RunContext) -> None:
        ran.append(run)

    registry = JobRegistry()
    start = datetime(2020, 1, 1, tzinfo=UTC)
    registry.add(JobSpec("tick", body, lambda tz: IntervalTrigger(seconds=INTERVAL, start_date=start, timezone=UTC)))
    node = Node(Settings(node_id="n1", lock_url=backend_url, lock_name=lock_name, lease_ttl=3, renew_deadline=2,
                         retry_period=0.5, misfire_grace=5, demo_jobs=False, claim_ahead=claim_ahead), registry)
    await node.start()
    try:
        async def enough() -> bool | None:
            return True if len(ran) >= RUNS else None

        await eventually(f"{RUNS} runs", enough, within=30)
        if claim_ahead:
            async def pending() -> bool | None:
                return True if node.scheduler.ahead.pending else None

            await eventually("a fire time claimed ahead", pending, within=10, every=0.01)
    finally:
        await node.stop()
    if claim_ahead:
        assert ops(node, "claim_batch") > 0
    else:
        assert ops(node, "claim_batch") == 0 and ops(node, "claim") >= RUNS

    tokens = {run.token for run in ran}
    assert len(tokens) == 1
    reader = from_url(backend_url)
    try:
        records = [r for r in await reader.runs(lock_name, limit=500) if r.key.startswith("tick@")]
    finally:
        await reader.close()
    by_key = {r.key: r for r in records}
    ran_keys = {claim_key(run.job_id, run.scheduled_at) for run in ran}
    # nothing claimed without a run, nothing run without a claim, every run reported
    assert set(by_key) == ran_keys
    assert all(r.result is not None and r.result["outcome"] == "ok" for r in records), records
    assert {r.token for r in records} == tokens


async def test_a_lost_lease_fences_what_was_claimed_ahead(backend_url: str, lock_name: str) -> None:
    """A pre-claim under a token the node no longer holds is not run at its fire time."""
    ran: list[RunContext] = []

    async def body(run: RunContext) -> None:
        ran.append(run)

    registry = JobRegistry()
    start = datetime(2020, 1, 1, tzinfo=UTC)
    registry.add(JobSpec("tick", body, lambda tz: IntervalTrigger(seconds=INTERVAL, start_date=start, timezone=UTC)))
    node = Node(Settings(node_id="n1", lock_url=backend_url, lock_name=lock_name, lease_ttl=3, renew_deadline=2,
                         retry_period=0.5, misfire_grace=5, demo_jobs=False, claim_ahead=0.25), registry)
    await node.start()
    try:
        async def answered() -> list[str] | None:
            done = [k for k, p in node.scheduler.ahead.pending.items() if p.answer.done() and p.answer.result()]
            return done or None

        keys, _ = await eventually("a fire time claimed ahead", answered, within=30, every=0.005)
        pre = node.scheduler.ahead.pending[keys[0]]
        job_id, fire_time = pre.job_id, pre.fire_time
        # the lease changes hands under the node (as after a pause): same node, newer token
        node.scheduler.ahead.pending[keys[0]] = type(pre)(job_id, fire_time, pre.token - 1, pre.answer)
        outcome = await node.scheduler.fire(job_id, fire_time)
    finally:
        await node.stop()
    assert outcome == "fenced"
    assert claim_key(job_id, fire_time) not in {claim_key(r.job_id, r.scheduled_at) for r in ran}
