"""Real nodes (elector, gated scheduler) sharing one in-memory store, for the in-process tests of exactly-once
and of job options: the cluster, what the job bodies saw, the fire-time grid, and the ``make_cluster`` fixture
(registered for every test module by ``tests/conftest.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lock_backends.memory import drop_store
from node.app import Node
from node.config import Settings
from node.jobs import INTERVAL_EPOCH, JobRegistry, JobSpec, RunContext, every
from node.outcomes import RunKind, RunOutcome

TIMING = {"lease_ttl": 2.0, "renew_deadline": 1.4, "retry_period": 0.2, "misfire_grace": 10.0}


class History:
    """What the job bodies saw: every start, with its token and kind."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, datetime, str, int, RunKind]] = []
        self.running: Counter[str] = Counter()
        self.most_at_once: Counter[str] = Counter()

    def body(self, seconds: float = 0.0, value: Any = None) -> Callable[[RunContext], Any]:
        async def run(ctx: RunContext) -> Any:
            self.starts.append((ctx.job_id, ctx.scheduled_at, ctx.node_id, ctx.token, ctx.kind))
            self.running[ctx.job_id] += 1
            self.most_at_once[ctx.job_id] = max(self.most_at_once[ctx.job_id], self.running[ctx.job_id])
            try:
                await asyncio.sleep(seconds)
            finally:
                self.running[ctx.job_id] -= 1
            return value
        return run

    def fire_times(self, job: str) -> list[datetime]:
        return sorted(t for j, t, *_ in self.starts if j == job)

    def duplicates(self) -> list[tuple[str, datetime]]:
        seen = Counter((j, t) for j, t, *_ in self.starts)
        return [pair for pair, n in seen.items() if n > 1]


def spec(job_id: str, interval: float, body: Callable[[RunContext], Any], **kw: Any) -> JobSpec:
    return JobSpec(job_id, body, functools.partial(every, interval), **kw)


def fire_grid(interval: float, start: datetime, end: datetime) -> list[datetime]:
    step = timedelta(seconds=interval)
    n = -(-(start - INTERVAL_EPOCH) // step)
    out = []
    t = INTERVAL_EPOCH + n * step
    while t <= end:
        out.append(t)
        t += step
    return out


def next_fire(interval: float, after: datetime) -> datetime:
    step = timedelta(seconds=interval)
    return INTERVAL_EPOCH + ((after - INTERVAL_EPOCH) // step + 1) * step


class Cluster:
    """Nodes sharing one in-memory store; a stopped node can be started again under its id."""

    def __init__(self, jobs: Callable[[], Sequence[JobSpec]], backend: Callable[[str], Any] | None = None,
                 **settings: Any) -> None:
        self.store = f"once-{uuid.uuid4().hex[:8]}"
        self.jobs = jobs
        self.backend = backend
        self.settings = {**TIMING, **settings}
        self.nodes: dict[str, Node] = {}

    async def start(self, node_id: str) -> Node:
        registry = JobRegistry()
        for s in self.jobs():
            registry.add(s)
        node = Node(Settings(node_id=node_id, lock_url=f"memory://{self.store}", demo_jobs=False,
                             **self.settings), registry)
        if self.backend is not None:
            node.backend.inner = self.backend(self.store)
        self.nodes[node_id] = node
        await node.start()
        return node

    async def leader(self, within: float = 10.0, exclude: Node | None = None) -> Node:
        from tests.conftest import eventually  # here: the conftest imports this module for its fixture

        async def one() -> Node | None:
            leaders = [n for n in self.nodes.values() if n is not exclude and n.elector.is_leader]
            return leaders[0] if len(leaders) == 1 else None
        found, _ = await eventually("a single leader", one, within=within, every=0.01)
        return found

    async def close(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                await node.stop()
        drop_store(self.store)


@pytest.fixture
async def make_cluster() -> AsyncIterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(*args: Any, **kw: Any) -> Cluster:
        made.append(Cluster(*args, **kw))
        return made[-1]

    yield make
    for cluster in made:
        await cluster.close()


async def sleep_until(t: datetime) -> None:
    await asyncio.sleep(max(0.0, (t - datetime.now(UTC)).total_seconds()))


def runs_of(node: Node, outcome: RunOutcome, job: str) -> float:
    return node.metrics.registry.get_sample_value("baton_job_runs_total", {"job": job, "outcome": str(outcome)}) or 0
