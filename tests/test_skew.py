"""A node whose wall clock is off the lock store's never leads; the skew is measured and exported.

In process, on the in-memory store (whose clock is the host's): the skewed
node runs on a shifted wall clock (``lock_backends.clock.using``), as a host
30 s fast after a failed NTP sync would. The real-process version, with
libfaketime on every backend, is in the harness (``loadtest chaos --fault skew``).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from lock_backends import clock
from node.app import Node, create_app
from node.config import Settings
from node.jobs import JobRegistry
from tests.conftest import eventually


class ShiftedClock:
    def __init__(self, offset: float) -> None:
        self.offset = offset

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def store(backend_url: str) -> str:
    """Every backend: each offers a clock (Redis TIME, PostgreSQL clock_timestamp(), etcd's HTTP Date
    header, the file system's timestamps, the in-memory store's own)."""
    return backend_url


def node(url: str, node_id: str, lock_name: str) -> Node:
    return Node(Settings(node_id=node_id, lock_url=url, lock_name=lock_name, lease_ttl=2, renew_deadline=1.4,
                         retry_period=0.2, demo_jobs=False), JobRegistry())


@pytest.mark.parametrize("offset", [30.0, -30.0])
async def test_a_skewed_node_never_leads_and_says_why(store: str, lock_name: str, offset: float) -> None:
    healthy = node(store, "healthy", lock_name)
    with clock.using(ShiftedClock(offset)):
        skewed = node(store, "skewed", lock_name)
        await skewed.start()  # first, so it would win the lease if nothing stopped it
    try:
        await asyncio.sleep(1.0)
        assert not skewed.elector.is_leader
        await healthy.start()
        await eventually("the healthy node leads", lambda: asyncio.sleep(0, healthy.elector.is_leader or None),
                         within=10)
        for _ in range(10):  # and the skewed one never takes over while the healthy one lives
            assert not skewed.elector.is_leader
            await asyncio.sleep(0.1)
        measured = skewed.metrics.registry.get_sample_value("baton_clock_skew_seconds")
        assert measured is not None and abs(measured - offset) < 0.05
        own = healthy.metrics.registry.get_sample_value("baton_clock_skew_seconds")
        assert own is not None and abs(own) < 0.05  # exactly 0.0 on the in-memory store, which shares our clock
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(skewed)),
                                     base_url="http://n") as client:
            health = await client.get("/healthz")
        assert health.status_code == 503 and "BATON_MAX_CLOCK_SKEW" in health.json()["reason"]
        # the healthy node goes: still the skewed one does not lead
        await healthy.stop()
        await asyncio.sleep(1.5)
        assert not skewed.elector.is_leader
    finally:
        await skewed.stop()


async def test_a_leader_whose_clock_jumps_steps_down(store: str, lock_name: str) -> None:
    jumpy = ShiftedClock(0.0)
    with clock.using(jumpy):
        leader = node(store, "jumpy", lock_name)
        await leader.start()
    try:
        await eventually("it leads", lambda: asyncio.sleep(0, leader.elector.is_leader or None), within=10)
        jumpy.offset = 5.0  # a clock step, as a VM resumed from suspend
        await eventually("it steps down", lambda: asyncio.sleep(0, (not leader.elector.is_leader) or None),
                         within=10)
        jumpy.offset = 0.0
        await eventually("it leads again", lambda: asyncio.sleep(0, leader.elector.is_leader or None), within=10)
    finally:
        await leader.stop()
