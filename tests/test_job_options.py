"""The scheduler honours each job's options: one-shots, misfire grace, coalesce, sync bodies (in process, memory://).

Real nodes (elector, gated scheduler) on the in-memory store, as in
tests/test_exactly_once.py; the failover faults over every trigger kind on
real processes are in tests/test_triggers_cluster.py.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.date import DateTrigger

from node.app import Node
from node.config import Settings
from node.jobs import JobRegistry, JobSpec, RunContext
from node.outcomes import RunKind, RunOutcome
from tests.conftest import eventually
from tests.memory_cluster import Cluster, History, fire_grid, runs_of, sleep_until

#: Outcomes that would be false alarms for a one-shot that ran once.
FALSE_ALARMS = (RunOutcome.DUPLICATE, RunOutcome.LOST, RunOutcome.MISSED, RunOutcome.COALESCED, RunOutcome.FENCED)


def alarms(nodes: list[Node], job: str) -> dict[str, float]:
    found = {str(o): sum(runs_of(n, o, job) for n in nodes) for o in FALSE_ALARMS}
    return {k: v for k, v in found.items() if v}


def one_shots(history: History, at: datetime) -> Callable[[], list[JobSpec]]:
    """A registry one-shot, a hand-built DateTrigger one-shot (the issue's case), and a ticking job."""
    def jobs() -> list[JobSpec]:
        registry = JobRegistry()
        registry.date("once", run_date=at)(history.body())
        registry.add(JobSpec("once-by-hand", history.body(), lambda tz: DateTrigger(run_date=at, timezone=tz)))
        registry.interval("tick", seconds=0.5)(history.body())
        return list(registry)
    return jobs


# -- one-shot jobs --------------------------------------------------------------------------------


async def test_a_one_shot_runs_once_through_handoffs_and_restarts_with_no_false_counts(
        make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    at = (datetime.now(UTC) + timedelta(seconds=2.5)).replace(microsecond=0)
    cluster = make_cluster(one_shots(history, at))
    a = await cluster.start("a")
    await cluster.leader()
    b = await cluster.start("b")
    await sleep_until(at + timedelta(seconds=0.8))
    nodes = [a, b]
    # handoffs after it ran: the new leader realigns, catches up and must see nothing owed
    for _ in range(2):
        leader = await cluster.leader()
        await leader.stop()
        restarted = await cluster.start(leader.settings.node_id)
        nodes.append(restarted)
        await cluster.leader(exclude=leader)
        await asyncio.sleep(0.6)
    assert await (await cluster.leader()).step_down()
    await asyncio.sleep(1.0)
    for job in ("once", "once-by-hand"):
        assert [t for j, t, *_ in history.starts if j == job] == [at], job
        assert alarms(nodes, job) == {}, job
    assert history.duplicates() == []


async def test_a_one_shot_due_while_no_node_ran_is_caught_up_once(make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    at = (datetime.now(UTC) + timedelta(seconds=2.5)).replace(microsecond=0)
    cluster = make_cluster(one_shots(history, at))
    a = await cluster.start("a")
    await cluster.leader()
    await a.stop()  # the whole cluster is down when the date comes
    del cluster.nodes["a"]
    await sleep_until(at + timedelta(seconds=1.0))
    b = await cluster.start("b")
    await cluster.leader()
    await eventually("the one-shots caught up", lambda: _ran(history, ("once", "once-by-hand")), within=10)
    kinds = {j: k for j, _, _, _, k in history.starts}
    assert kinds["once"] is RunKind.CATCH_UP and kinds["once-by-hand"] is RunKind.CATCH_UP
    await b.stop()  # a full restart after it ran: nothing owed, nothing counted
    del cluster.nodes["b"]
    c = await cluster.start("c")
    await cluster.leader()
    await asyncio.sleep(1.0)
    for job in ("once", "once-by-hand"):
        assert [t for j, t, *_ in history.starts if j == job] == [at]
        assert alarms([b, c], job) == {}, job


async def _ran(history: History, jobs: tuple[str, ...]) -> bool | None:
    return True if all(any(j == job for j, *_ in history.starts) for job in jobs) else None


# -- misfire grace per job --------------------------------------------------------------------------


async def test_lateness_is_judged_against_the_jobs_own_grace(make_cluster: Callable[..., Cluster]) -> None:
    history = History()

    def jobs() -> list[JobSpec]:
        registry = JobRegistry()
        registry.interval("tight", hours=1, misfire_grace_time=1)(history.body())
        registry.interval("loose", hours=1, misfire_grace_time=30)(history.body())
        return list(registry)

    cluster = make_cluster(jobs, misfire_grace=10.0)
    node = await cluster.start("a")
    await cluster.leader()
    await asyncio.sleep(3.0)  # the leader's window now reaches back past the instant below
    late = datetime.now(UTC) - timedelta(seconds=2)  # 2 s late: past tight's grace, within loose's
    assert await node.scheduler.fire("tight", late) is RunOutcome.MISSED
    assert await node.scheduler.fire("loose", late) is RunOutcome.OK
    assert [j for j, *_ in history.starts] == ["loose"]


async def test_a_catch_up_looks_back_as_far_as_each_jobs_grace(make_cluster: Callable[..., Cluster]) -> None:
    history = History()

    def jobs() -> list[JobSpec]:
        registry = JobRegistry()
        registry.interval("tight", seconds=0.5, misfire_grace_time=1)(history.body())
        registry.interval("loose", seconds=0.5, misfire_grace_time=30)(history.body())
        return list(registry)

    cluster = make_cluster(jobs, misfire_grace=10.0)
    a = await cluster.start("a")
    await cluster.leader()
    await a.stop()
    del cluster.nodes["a"]
    await asyncio.sleep(3.0)
    b = await cluster.start("b")
    await cluster.leader()
    await asyncio.sleep(0.5)
    assert runs_of(b, RunOutcome.MISSED, "tight") >= 2  # older than 1 s: missed
    assert runs_of(b, RunOutcome.MISSED, "loose") == 0  # within 30 s: coalesced into the catch-up run
    assert runs_of(b, RunOutcome.COALESCED, "loose") >= 4
    assert history.duplicates() == []


# -- coalesce ------------------------------------------------------------------------------------------


async def test_a_catch_up_of_a_job_without_coalesce_runs_every_missed_fire_time_oldest_first(
        make_cluster: Callable[..., Cluster]) -> None:
    history = History()

    def jobs() -> list[JobSpec]:
        registry = JobRegistry()
        registry.interval("each", seconds=0.5, coalesce=False)(history.body(0.05))
        registry.interval("latest", seconds=0.5)(history.body(0.05))
        return list(registry)

    cluster = make_cluster(jobs)
    a = await cluster.start("a")
    await cluster.leader()
    await asyncio.sleep(1.0)
    await a.stop()
    stopped = datetime.now(UTC)
    del cluster.nodes["a"]
    await asyncio.sleep(2.0)
    b = await cluster.start("b")
    await cluster.leader()
    await asyncio.sleep(1.5)
    gap = fire_grid(0.5, stopped + timedelta(seconds=0.3), stopped + timedelta(seconds=1.9))
    each = [(t, k) for j, t, _, _, k in history.starts if j == "each"]
    caught = [t for t, k in each if k is RunKind.CATCH_UP]
    assert len(caught) >= 3 and caught == sorted(caught)  # every one, oldest first, one after another
    assert [t for t in gap if t not in {t for t, _ in each}] == []
    latest = [t for j, t, _, _, k in history.starts if j == "latest" and k is RunKind.CATCH_UP]
    assert len(latest) == 1
    assert runs_of(b, RunOutcome.COALESCED, "latest") >= 2 and runs_of(b, RunOutcome.COALESCED, "each") == 0
    assert history.duplicates() == []


async def test_fire_times_due_at_once_after_a_stalled_loop_coalesce_only_where_asked(
        make_cluster: Callable[..., Cluster]) -> None:
    history = History()

    def jobs() -> list[JobSpec]:
        registry = JobRegistry()
        registry.interval("each", seconds=0.3, coalesce=False)(history.body())
        registry.interval("latest", seconds=0.3)(history.body())
        return list(registry)

    cluster = make_cluster(jobs)
    node = await cluster.start("a")
    await cluster.leader()
    await asyncio.sleep(1.0)
    before = datetime.now(UTC)
    time.sleep(1.0)  # the event loop stalls: three or four fire times of each job come due at once
    await asyncio.sleep(1.0)
    stalled = fire_grid(0.3, before + timedelta(seconds=0.05), before + timedelta(seconds=0.95))
    ran = {j: {t for jj, t, *_ in history.starts if jj == j} for j in ("each", "latest")}
    assert [t for t in stalled if t not in ran["each"]] == []
    assert runs_of(node, RunOutcome.COALESCED, "latest") >= 2  # counted, not dropped silently
    assert len([t for t in stalled if t in ran["latest"]]) <= 2
    assert history.duplicates() == []


# -- sync bodies -------------------------------------------------------------------------------------------


async def _fire_lags(cluster_factory: Callable[..., Cluster], with_sleeper: bool, seconds: float) -> list[float]:
    lags: list[float] = []

    async def tick(run: RunContext) -> None:
        lags.append((datetime.now(UTC) - run.scheduled_at).total_seconds())

    def sleeper(run: RunContext) -> None:
        time.sleep(2.0)  # a plain def that blocks: it must not block the loop

    def jobs() -> list[JobSpec]:
        registry = JobRegistry()
        for i in range(3):
            registry.interval(f"tick-{i}", seconds=1)(tick)
        if with_sleeper:
            registry.interval("sleeper", seconds=1, max_instances=3)(sleeper)
        return list(registry)

    cluster = cluster_factory(jobs)
    await cluster.start("a")
    await cluster.leader()
    await asyncio.sleep(1.5)
    lags.clear()
    await asyncio.sleep(seconds)
    await cluster.close()
    return lags


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


async def test_a_sync_body_that_sleeps_does_not_delay_other_jobs(make_cluster: Callable[..., Cluster]) -> None:
    usual = await _fire_lags(make_cluster, with_sleeper=False, seconds=6)
    loaded = await _fire_lags(make_cluster, with_sleeper=True, seconds=6)
    assert len(loaded) >= 12
    # the usual p99 is milliseconds; blocking the loop would make it seconds
    assert p99(loaded) <= max(0.25, p99(usual) * 2 + 0.1), (p99(usual), p99(loaded))


async def test_the_sync_pool_size_is_a_setting() -> None:
    node = Node(Settings(node_id="a", lock_url="memory://pool-size", demo_jobs=False, sync_workers=3), JobRegistry())
    assert node.scheduler._sync_pool._max_workers == 3
    assert Settings(node_id="a", lock_url="memory://x").sync_workers == 8
