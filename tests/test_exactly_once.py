"""Exactly once through every handoff, in process: real nodes (elector, gated scheduler) on the in-memory store.

One test per hole of the exactly-once issue, each aimed at the worst moment.
The real-process failover suite (tests/test_failover.py) repeats the handoffs
on every real backend; the simulator (loadtest.sim) explores them by the
thousand on virtual time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from lock_backends import BackendUnavailable, Holder, Lease, RunQuery, RunRecord, Window
from lock_backends.memory import MemoryBackend
from node.app import create_app
from node.outcomes import RunKind, RunOutcome
from node.scheduler import FireTimeExecutor
from tests.conftest import eventually
from tests.memory_cluster import Cluster, History, fire_grid, next_fire, runs_of, sleep_until, spec

# -- hole 1: a graceful stop (or step-down) just before a fire time lost the run ------------------


@pytest.mark.parametrize("aim", [0.08, 0.03])
@pytest.mark.parametrize("how", ["stop", "step-down"])
async def test_a_handoff_just_before_a_fire_time_loses_nothing_and_runs_nothing_twice(
        make_cluster: Callable[..., Cluster], how: str, aim: float) -> None:
    """The handoff lands ``aim`` seconds before a fire time: inside the leader's claim window."""
    history = History()
    interval = 0.6
    cluster = make_cluster(lambda: [spec("sparse", interval, history.body()),
                                    spec("long", 1.2, history.body(0.9)),
                                    spec("recover", interval, history.body(0.1), recover=True)])
    await cluster.start("a")
    await cluster.leader()
    await cluster.start("b")
    first = next_fire(interval, datetime.now(UTC))
    for _ in range(4):
        leader = await cluster.leader()
        target = next_fire(interval, datetime.now(UTC) + timedelta(seconds=0.2))
        await sleep_until(target - timedelta(seconds=aim))
        if how == "stop":
            await leader.stop()
            await cluster.start(leader.settings.node_id)
        else:
            assert await leader.step_down()
        await cluster.leader(exclude=leader if how == "stop" else None)
        await sleep_until(target + timedelta(seconds=0.3))
    last = datetime.now(UTC) - timedelta(seconds=1.5)
    assert history.duplicates() == []
    for job, every_s in (("sparse", interval), ("recover", interval), ("long", 1.2)):
        expected = fire_grid(every_s, first, last)
        ran = set(history.fire_times(job))
        assert [t for t in expected if t not in ran] == [], job


# -- hole 2: a claim applied whose answer was lost was skipped and counted "duplicate" -------------


class LosesAnswers(MemoryBackend):
    """Applies every few claims, then raises as if the answer had been lost on the way back."""

    def __init__(self, store: str, every_nth: int = 3) -> None:
        from lock_backends.memory import store as named

        super().__init__(named(store), MemoryBackend.from_url(f"memory://{store}").options)
        self.every_nth = every_nth
        self.calls = 0
        self.lost = 0

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        window = await super().claim_window(lease, until_us, start_us, intents)
        self.calls += 1
        if self.calls % self.every_nth == 0:
            self.lost += 1
            raise BackendUnavailable("answer lost after the write applied", backend="memory", address="lossy")
        return window


async def test_a_claim_whose_answer_was_lost_still_runs_once(make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    lossy: list[LosesAnswers] = []

    def backend(store: str) -> LosesAnswers:
        lossy.append(LosesAnswers(store))
        return lossy[-1]

    cluster = make_cluster(lambda: [spec(f"j{i}", 0.2, history.body()) for i in range(3)], backend=backend)
    node = await cluster.start("a")
    start = datetime.now(UTC) + timedelta(seconds=0.5)
    await asyncio.sleep(3.0)
    end = datetime.now(UTC) - timedelta(seconds=0.5)
    assert lossy[0].lost >= 3
    assert history.duplicates() == []
    for i in range(3):
        assert [t for t in fire_grid(0.2, start, end) if t not in set(history.fire_times(f"j{i}"))] == []
        assert runs_of(node, RunOutcome.DUPLICATE, f"j{i}") == 0


# -- hole 3: an unexpected exception in the claim path left runs waiting forever --------------------


class RaisesForAWhile(MemoryBackend):
    def __init__(self, store: str, error: Exception) -> None:
        from lock_backends.memory import store as named

        super().__init__(named(store), MemoryBackend.from_url(f"memory://{store}").options)
        self.error = error
        self.broken = False

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        if self.broken:
            await asyncio.sleep(0)
            raise self.error
        return await super().claim_window(lease, until_us, start_us, intents)


async def test_an_unexpected_error_in_the_claim_path_leaves_no_run_waiting(
        make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    broken: list[RaisesForAWhile] = []

    def backend(store: str) -> RaisesForAWhile:
        broken.append(RaisesForAWhile(store, ValueError("undecodable record")))
        return broken[-1]

    cluster = make_cluster(lambda: [spec("tick", 0.2, history.body())], backend=backend, misfire_grace=1.0)
    node = await cluster.start("a")
    await cluster.leader()
    await asyncio.sleep(0.5)
    broken[0].broken = True
    await asyncio.sleep(2.0)
    # every fire time of the outage older than the misfire grace ended with an outcome: none waits on a
    # claim that cannot come (younger ones may still wait, within the grace)
    horizon = int((datetime.now(UTC).timestamp() - 1.0 - 0.3) * 1_000_000)
    assert [t for t in node.scheduler._pending.values() if t < horizon] == []
    assert runs_of(node, RunOutcome.MISSED, "tick") + runs_of(node, RunOutcome.FENCED, "tick") > 0
    broken[0].broken = False
    before = len(history.fire_times("tick"))

    async def resumed() -> bool | None:
        return True if len(history.fire_times("tick")) >= before + 3 else None

    await eventually("runs after the store healed", resumed, within=10)
    assert history.duplicates() == []


class MarkReadRaises(MemoryBackend):
    """A store whose claim-mark read raises what no backend should (a bug, a surprise)."""

    def __init__(self, store: str) -> None:
        from lock_backends.memory import store as named

        super().__init__(named(store), MemoryBackend.from_url(f"memory://{store}").options)
        self.reads = 0

    async def claim_mark(self, name: str) -> Window:
        self.reads += 1
        raise RuntimeError("surprise in claim_mark")


async def test_a_claim_mark_read_that_raises_on_winning_costs_only_the_shortcut(
        make_cluster: Callable[..., Cluster]) -> None:
    """The read before the first claim is a shortcut (the catch-up's intents in the first claim): whatever it
    raises, the leader claims, fires, and keeps its lease."""
    history = History()
    made: list[MarkReadRaises] = []

    def backend(store: str) -> MarkReadRaises:
        made.append(MarkReadRaises(store))
        return made[-1]

    cluster = make_cluster(lambda: [spec("tick", 0.2, history.body())], backend=backend)
    node = await cluster.start("a")
    await cluster.leader()
    lease = node.elector.current_lease()
    assert lease is not None
    start = datetime.now(UTC) + timedelta(seconds=0.3)
    await asyncio.sleep(1.5)
    end = datetime.now(UTC) - timedelta(seconds=0.3)
    assert made[0].reads == 1
    assert node.elector.current_lease() is not None and node.elector.current_lease().token == lease.token  # type: ignore[union-attr]
    assert [t for t in fire_grid(0.2, start, end) if t not in set(history.fire_times("tick"))] == []
    assert history.duplicates() == []


# -- hole 4: a recoverable run still going at a step-down was recovered beside itself ----------------


async def test_a_recoverable_run_still_going_at_a_step_down_is_not_run_again(
        make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    cluster = make_cluster(lambda: [spec("nightly", 4.0, history.body(2.5), recover=True)])
    a = await cluster.start("a")
    await cluster.leader()
    b = await cluster.start("b")

    async def started() -> bool | None:
        return True if history.running["nightly"] else None

    await eventually("the recoverable body runs", started, within=10, every=0.01)
    assert await a.step_down()
    await cluster.leader(exclude=a)
    await asyncio.sleep(3.0)  # the body ends on a; b must not have started it again meanwhile
    assert history.duplicates() == []
    assert [k for *_, k in history.starts].count(RunKind.RECOVERY) == 0
    assert runs_of(b, RunOutcome.OK, "nightly") + runs_of(a, RunOutcome.OK, "nightly") >= 1


async def test_a_crashed_leaders_recoverable_run_is_run_again(make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    cluster = make_cluster(lambda: [spec("nightly", 3.0, history.body(5.0), recover=True)])
    a = await cluster.start("a")
    await cluster.leader()
    await cluster.start("b")

    async def started() -> bool | None:
        return True if history.running["nightly"] else None

    await eventually("the recoverable body runs", started, within=10, every=0.01)
    crashed = history.starts[-1]
    # a crash: the node's tasks stop, its lease is never released, its store client is gone
    a.elector._task.cancel()  # type: ignore[union-attr]
    a.scheduler.scheduler.shutdown(wait=False)
    for run in list(a.scheduler.running.values()):
        assert run.task is not None
        run.task.cancel()
    await a.backend.close()
    del cluster.nodes["a"]

    async def recovered() -> bool | None:
        return True if any(k is RunKind.RECOVERY and t == crashed[1] for _, t, _, _, k in history.starts) else None

    await eventually("the next leader recovers the run", recovered, within=15)


class RestartsUnderItsLeader(MemoryBackend):
    """A store restarted under its leader, as the failover suite's PostgreSQL restart does: the lease ends
    without a handoff (one renewal answered "not yours"), and record writes fail until the node has won the
    lease again (the restart's outage), so a run it finished is still in its recorder when it leads anew;
    and for ``refuse_after_win`` seconds more, so that its recovery's flush cannot write them either."""

    def __init__(self, store: str, refuse_after_win: float = 0.0) -> None:
        from lock_backends.memory import store as named

        super().__init__(named(store), MemoryBackend.from_url(f"memory://{store}").options)
        self.restart = False
        self.wins = 0
        self.refuse_after_win = refuse_after_win
        self.won_again_at = math.inf

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        lease = await super().acquire(name, holder, ttl)
        self.wins += lease is not None
        if lease is not None and self.wins == 2:
            self.won_again_at = time.monotonic()
        return lease

    async def renew(self, lease: Lease) -> Lease | None:
        if self.restart:
            self.restart = False
            return None
        return await super().renew(lease)

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        if self.restart or time.monotonic() < self.won_again_at + self.refuse_after_win:
            raise BackendUnavailable("restarting", backend="memory", address="restarting")
        await super().record_many(name, records)


@pytest.mark.parametrize("refused_after_win", [0.0, 3.0], ids=["records-written-on-winning",
                                                                  "records-still-refused"])
async def test_a_leader_that_wins_again_does_not_recover_its_own_finished_run(
        make_cluster: Callable[..., Cluster], refused_after_win: float) -> None:
    """Found by the failover suite on PostgreSQL: a recoverable run finished, the store restarted before its
    record was written, and the same node, leading again under a new token, listed the run's intent without a
    result and ran it again. A recovery reads the store after the node's own records are in it; and when the
    store still refuses them (longer than the flush waits), it skips the runs whose records it holds."""
    history = History()
    stores: list[RestartsUnderItsLeader] = []

    def backend(store: str) -> RestartsUnderItsLeader:
        stores.append(RestartsUnderItsLeader(store, refused_after_win))
        return stores[-1]

    cluster = make_cluster(lambda: [spec("nightly", 1.0, history.body(), recover=True)], backend=backend)
    a = await cluster.start("a")
    await cluster.leader()

    async def ran() -> bool | None:
        return True if history.starts and not history.running["nightly"] else None

    await eventually("a recoverable run ends, its record unwritten", ran, within=10, every=0.01)
    first = history.starts[0]
    stores[0].restart = True

    async def leads_again() -> bool | None:
        lease = a.elector.current_lease()
        return True if lease is not None and lease.token > first[3] else None

    await eventually("the node leads again under a new token", leads_again, within=15)
    await asyncio.sleep(1.5)  # its catch-up and recovery done

    async def written() -> bool | None:
        return True if not a.scheduler.recorder.unwritten() else None

    await eventually("its records are written once the store takes them", written, within=15)
    assert [s for s in history.starts if s[:2] == first[:2]] == [first], history.starts
    assert RunKind.RECOVERY not in [k for *_, k in history.starts]


# -- hole 5: max_instances was per process, not per cluster -------------------------------------------


async def test_max_instances_holds_across_a_step_down(make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    cluster = make_cluster(lambda: [spec("long", 0.5, history.body(2.0))])
    a = await cluster.start("a")
    await cluster.leader()
    b = await cluster.start("b")

    async def started() -> bool | None:
        return True if history.running["long"] else None

    await eventually("the long body runs", started, within=10, every=0.01)
    assert await a.step_down()
    await asyncio.sleep(4.5)
    assert history.most_at_once["long"] == 1
    skipped = runs_of(a, RunOutcome.SKIPPED, "long") + runs_of(b, RunOutcome.SKIPPED, "long")
    assert skipped >= 2  # each skip is counted, never silent


async def test_a_catch_up_run_and_the_first_scheduled_run_do_not_overlap(
        make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    cluster = make_cluster(lambda: [spec("long", 0.3, history.body(1.0))])
    a = await cluster.start("a")
    await cluster.leader()
    await a.stop()  # the window ends here; fire times pile up until the next leader
    await asyncio.sleep(1.0)
    b = await cluster.start("b")
    await cluster.leader()
    await asyncio.sleep(2.0)
    kinds = [k for j, *_, k in history.starts if j == "long"]
    assert RunKind.CATCH_UP in kinds
    assert history.most_at_once["long"] == 1
    assert runs_of(b, RunOutcome.COALESCED, "long") >= 1


async def test_a_manual_run_respects_pause_and_max_instances(make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    cluster = make_cluster(lambda: [spec("report", 3600.0, history.body(0.3, {"rows": 42}))],
                           admin_token="s3cret")
    node = await cluster.start("a")
    await cluster.leader()
    app = create_app(node)
    auth = {"Authorization": "Bearer s3cret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
        assert (await client.post("/admin/jobs/report/pause", headers=auth)).status_code == 200
        refused = await client.post("/admin/jobs/report/run", headers=auth)
        assert refused.status_code == 409 and "force" in refused.json()["detail"]
        forced = await client.post("/admin/jobs/report/run?force=true", headers=auth)
        assert forced.status_code == 200 and forced.json()["outcome"] == "ok"
        # two at once: the second finds the first still running (max_instances=1 across the cluster)
        first, second = await asyncio.gather(client.post("/admin/jobs/report/run?force=true", headers=auth),
                                             client.post("/admin/jobs/report/run?force=true", headers=auth))
        assert sorted([first.status_code, second.status_code]) == [200, 409]
        runs = (await client.get("/runs", params={"job": "report", "outcome": RunOutcome.OK})).json()["runs"]
        assert len(runs) == 2 and runs[0]["result"]["value"] == {"rows": 42}
        assert runs[0]["result"]["kind"] == RunKind.MANUAL


# -- hole 6: shutdown cut running bodies after 5 s and lost their outcome -----------------------------


async def test_shutdown_waits_for_bodies_up_to_the_grace_and_records_what_it_cut(
        make_cluster: Callable[..., Cluster]) -> None:
    history = History()
    cluster = make_cluster(lambda: [spec("short", 3600.0, history.body(1.0)),
                                    spec("endless", 3600.0, history.body(60.0))])
    node = await cluster.start("a")
    node.scheduler.shutdown_grace = 1.5  # BATON_SHUTDOWN_GRACE
    await cluster.leader()
    now = datetime.now(UTC)
    node.scheduler.spawn(node.scheduler.fire("short", now, RunKind.MANUAL))
    node.scheduler.spawn(node.scheduler.fire("endless", now, RunKind.MANUAL))

    async def both() -> bool | None:
        return True if history.running["short"] and history.running["endless"] else None

    await eventually("both bodies run", both, within=5, every=0.01)
    t0 = asyncio.get_running_loop().time()
    await node.stop()
    took = asyncio.get_running_loop().time() - t0
    assert 1.4 <= took < 10
    reader = MemoryBackend.from_url(f"memory://{cluster.store}")
    outcomes = {r.job_id: r.outcome for r in await reader.runs("baton", RunQuery(limit=10))}
    assert outcomes == {"short": RunOutcome.OK, "endless": RunOutcome.CANCELLED}
    del cluster.nodes["a"]


async def test_fire_times_cancelled_by_a_stop_are_not_logged_as_job_errors(caplog: pytest.LogCaptureFixture) -> None:
    """A stop with a backlog (a node behind at 10,000 fire times a second) cancels the fire times it never started:
    they are handed back, not failures. Before, each one logged an ERROR with a traceback (10,000 of them)."""
    entered = asyncio.Event()

    async def fire(job_id: str, scheduled_at: datetime) -> None:
        entered.set()
        await asyncio.Event().wait()

    executor = FireTimeExecutor(fire, lambda job_id, times: times)
    scheduler = AsyncIOScheduler(timezone=UTC, executors={"default": executor})
    scheduler.start(paused=True)
    try:
        job = scheduler.add_job(print, "interval", seconds=3600, id="backlogged")
        executor.submit_job(job, [datetime.now(UTC)])
        await asyncio.wait_for(entered.wait(), 5)
        for future in list(executor._pending_futures):
            future.cancel()
        async def drained() -> bool | None:
            return True if not executor._pending_futures else None

        await eventually("the cancelled fire time's callback", drained, within=5)
        assert executor._instances.get("backlogged", 0) == 0  # the instance is released: the job can fire again
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        scheduler.shutdown(wait=False)
