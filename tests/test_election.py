"""The election loop against an in-memory store: timing, stepping down, callbacks, starvation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from lock_backends import Holder
from node.election import ElectionConfig, ElectionConfigError, Elector
from node.jobs import JobRegistry, RunContext
from node.metrics import Metrics
from node.outcomes import RunOutcome
from node.scheduler import GatedScheduler
from tests.memory_backend import MemoryBackend, Store

TTL, RENEW, RETRY = 0.6, 0.4, 0.1


def make(store: Store, node: str, events: list[tuple[str, str]] | None = None) -> Elector:
    log = events if events is not None else []
    return Elector(
        MemoryBackend(store), ElectionConfig("lock", Holder(node, f"http://{node}"), TTL, RENEW, RETRY),
        on_started_leading=lambda lease: log.append((node, "started")),
        on_stopped_leading=lambda: log.append((node, "stopped")))


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not reached"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


@pytest.mark.parametrize(("ttl", "renew", "retry"), [(1, 1, 0.5), (1, 2, 0.5), (2, 1, 1), (2, 1, 0)])
def test_durations_are_checked(ttl: float, renew: float, retry: float) -> None:
    with pytest.raises(ElectionConfigError):
        ElectionConfig("x", Holder("a"), ttl, renew, retry)


async def test_one_leader_and_fast_handoff_on_stop() -> None:
    store, events = Store(), list[tuple[str, str]]()
    a, b = make(store, "a", events), make(store, "b", events)
    a.start()
    await until(lambda: a.is_leader)
    b.start()
    await asyncio.sleep(TTL * 2)  # renews keep a in place through several TTLs
    assert a.is_leader and not b.is_leader
    assert b.observed_leader == Holder("a", "http://a")
    stopped = time.monotonic()
    await a.stop()
    await until(lambda: b.is_leader)
    assert time.monotonic() - stopped < TTL / 2  # through release + wait_for_change, not expiry
    await b.stop()
    assert events == [("a", "started"), ("a", "stopped"), ("b", "started"), ("b", "stopped")]


async def test_unreachable_store_steps_down_before_deadline_then_leads_again() -> None:
    store, events = Store(), list[tuple[str, str]]()
    a = make(store, "a", events)
    a.start()
    await until(lambda: a.is_leader)
    lease = a.current_lease()
    assert lease is not None
    store.down = True
    await until(lambda: not a.is_leader, timeout=TTL * 2)
    # it stopped acting no later than the local deadline, and the callback ran
    assert time.monotonic() <= lease.deadline + 0.05 or ("a", "stopped") in events
    await until(lambda: ("a", "stopped") in events)
    store.down = False
    await until(lambda: a.is_leader, timeout=TTL * 4)  # back in the campaign, no restart
    await a.stop()
    assert events == [("a", "started"), ("a", "stopped"), ("a", "started"), ("a", "stopped")]


async def test_slow_store_cannot_stretch_the_lease() -> None:
    store = Store()
    a = make(store, "a")
    a.start()
    await until(lambda: a.is_leader)
    store.delay = TTL * 3  # every renew now takes longer than the lease
    deadline = a.current_lease().deadline  # type: ignore[union-attr]
    await until(lambda: not a.is_leader, timeout=TTL * 2)
    assert time.monotonic() < deadline + 0.1
    store.delay = 0
    await a.stop()


async def test_a_failing_started_callback_steps_down_and_campaigns_again() -> None:
    """A node whose set-up on winning failed would hold the lease and fire nothing: it steps down instead."""
    store = Store()
    calls: list[str] = []
    failing = [True]

    def started(lease: object) -> None:
        calls.append("started")
        if failing[0]:
            raise RuntimeError("callback bug")

    a = Elector(MemoryBackend(store), ElectionConfig("lock", Holder("a"), TTL, RENEW, RETRY),
                on_started_leading=started, on_stopped_leading=lambda: calls.append("stopped"))
    a.start()
    await until(lambda: calls.count("stopped") >= 2)  # it let go, campaigned again, and let go again
    failing[0] = False
    await until(lambda: a.is_leader and calls[-1] == "started")
    await asyncio.sleep(TTL * 2)
    assert a.is_leader and calls[-1] == "started"  # once set up, it keeps leading
    await a.stop()
    assert calls[-1] == "stopped"


async def test_step_down_hands_over_and_sits_out() -> None:
    store = Store()
    a, b = make(store, "a"), make(store, "b")
    a.start()
    await until(lambda: a.is_leader)
    b.start()
    await asyncio.sleep(RETRY * 2)
    assert a.request_step_down()
    await until(lambda: b.is_leader, timeout=1.0)
    assert not a.is_leader
    assert not a.request_step_down()
    await a.stop()
    await b.stop()


async def test_starved_loop_cannot_produce_an_accepted_duplicate() -> None:
    """A job blocks the event loop past the TTL: the lease is stale the moment the loop returns,
    the other node has taken over, and the starved node starts nothing."""
    store = Store()
    jobs = JobRegistry()
    ran: list[tuple[str, int]] = []

    @jobs.interval("tick", seconds=3600)
    async def tick(run: RunContext) -> None:
        ran.append((run.node_id, run.token))

    def node(name: str) -> tuple[Elector, GatedScheduler]:
        backend = MemoryBackend(store)
        holder: list[GatedScheduler] = []
        elector = Elector(backend, ElectionConfig("lock", Holder(name), TTL, RENEW, RETRY),
                          on_started_leading=lambda lease: holder[0].on_started_leading(lease),
                          on_stopped_leading=lambda: holder[0].on_stopped_leading())
        holder.append(GatedScheduler(jobs=jobs, backend=backend, elector=elector, metrics=Metrics("memory"),
                                     lock_name="lock", node_id=name, timezone=ZoneInfo("UTC"), misfire_grace=60))
        return elector, holder[0]

    a, sched_a = node("a")
    b, sched_b = node("b")
    await sched_a.start()
    await sched_b.start()
    a.start()
    await until(lambda: a.is_leader)
    b.start()
    when = datetime.now(UTC) + timedelta(seconds=0.05)  # inside a's claim window
    # a job blocks the whole event loop for longer than the TTL
    time.sleep(TTL * 1.5)
    assert not a.is_leader  # stale at once, before any renew could run
    assert await sched_a.fire("tick", when) == RunOutcome.FENCED
    await until(lambda: b.is_leader, timeout=TTL * 4)
    later = datetime.now(UTC) + timedelta(seconds=0.05)
    assert await sched_b.fire("tick", later) == RunOutcome.OK
    assert ran == [("b", b.current_lease().token)]  # type: ignore[union-attr]
    await a.stop()
    await b.stop()
