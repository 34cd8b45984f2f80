"""etcd-only behaviour: several endpoints, watches, claim retention, URL forms."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.servers import Cluster, Server, free_port, start_backend
from lock_backends import BackendUnavailable, BackendURLError, Holder, LockBackend, from_url
from tests.conftest import ServerPool, eventually, with_timeout

Factory = Callable[[str], LockBackend]


@pytest.fixture
def etcd_url(servers: ServerPool) -> str:
    return with_timeout(servers.get("etcd").url)


@pytest.fixture
def etcd_three(tmp_path: Path) -> Iterator[Cluster]:
    cluster = start_backend("etcd", tmp_path / "etcd3", etcd_members=3)
    yield cluster
    cluster.close()


@pytest.fixture
def etcd_private(tmp_path: Path) -> Iterator[Cluster]:
    cluster = start_backend("etcd", tmp_path / "etcd1")
    yield cluster
    cluster.close()


# -- URLs ------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "etcd://", "etcd://127.0.0.1", "etcd://127.0.0.1:abc", "etcd://127.0.0.1:0",
    "etcd://127.0.0.1:2379,,127.0.0.1:2380", "etcd://:2379", "etcd://user:pw@127.0.0.1:2379",
    "etcd://127.0.0.1:2379/prefix", "etcd://127.0.0.1:2379?bogus=1",
])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(BackendURLError):
        from_url(url)


def test_url_keeps_the_endpoint_list() -> None:
    backend = from_url("etcd://10.0.0.1:2379,10.0.0.2:2379,[::1]:2379?timeout=0.3")
    assert backend.kind == "etcd"
    assert backend.address == "10.0.0.1:2379,10.0.0.2:2379,[::1]:2379"


# -- endpoints and failover -----------------------------------------------------------

def raft_leader_first(cluster: Cluster) -> tuple[str, Server]:
    """The cluster's URL with the Raft leader's endpoint first, and that member.

    Stopping the leader is the hard case: until the others elect a new one,
    even the members still up refuse writes.
    """
    def status(port: int) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v3/maintenance/status", data=b"{}",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            data: dict[str, Any] = json.load(response)
            return data

    for member in cluster.members:
        info = status(member.port)
        if info["leader"] == info["header"]["member_id"]:
            others = [m for m in cluster.members if m is not member]
            endpoints = ",".join(f"127.0.0.1:{m.port}" for m in [member, *others])
            return f"etcd://{endpoints}", member
    raise AssertionError("no etcd member says it leads")


async def test_three_members_first_one_down(etcd_three: Cluster, make_backend: Factory,
                                            lock_name: str) -> None:
    url, first = raft_leader_first(etcd_three)
    url = with_timeout(url)
    a, b = make_backend(url), make_backend(url)
    lease = await a.acquire(lock_name, Holder("a"), 8.0)
    assert lease is not None
    assert await a.claim(lease, "before")
    # the first endpoint, the one both clients talk to, and the Raft leader; killed, so it
    # cannot hand leadership over as a graceful stop does
    first.stop(signal.SIGKILL)

    renewed, took = await eventually("renew", lambda: a.renew(lease), within=6.0)
    print(f"renew through the other members after {took:.2f}s")
    assert renewed.token == lease.token
    claimed, _ = await eventually("claim", lambda: a.claim(renewed, "after"), within=10.0)
    assert claimed is True
    holder, _ = await eventually("leader", lambda: b.leader(lock_name), within=10.0)
    assert holder == Holder("a")
    await a.release(renewed)
    new, _ = await eventually("acquire", lambda: b.acquire(lock_name, Holder("b"), 5.0), within=10.0)
    assert new.token > lease.token
    assert [r.key for r in await b.runs(lock_name)] == ["after", "before"]

    # a backend made now, whose first endpoint is already dead, works from its first call
    c = make_backend(url)
    assert await c.leader(lock_name) == Holder("b")


async def test_dead_first_endpoint_fails_over_at_once(etcd_url: str, make_backend: Factory,
                                                      lock_name: str) -> None:
    url = etcd_url.replace("etcd://", f"etcd://127.0.0.1:{free_port()},", 1)
    backend = make_backend(url)
    start = time.monotonic()
    lease = await backend.acquire(lock_name, Holder("a"), 2.0)
    assert lease is not None
    assert time.monotonic() - start < 0.5
    assert await backend.claim(lease, "k")


async def test_all_endpoints_down_fails_fast(make_backend: Factory, lock_name: str) -> None:
    url = with_timeout(f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    backend = make_backend(url)
    for op in (lambda: backend.acquire(lock_name, Holder("a"), 2.0), lambda: backend.leader(lock_name),
               lambda: backend.settings(lock_name)):
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            await op()
        assert time.monotonic() - start < 1.0
        assert "etcd" in str(info.value) and "127.0.0.1" in str(info.value)
    start = time.monotonic()
    await backend.wait_for_change(lock_name, 5.0)  # returns early rather than hanging or raising
    assert time.monotonic() - start < 1.0
    await backend.close()


async def test_same_instance_reconnects_after_restart(etcd_private: Cluster, make_backend: Factory,
                                                      lock_name: str) -> None:
    backend = make_backend(with_timeout(etcd_private.url))
    lease = await backend.acquire(lock_name, Holder("a"), 2.0)
    assert lease is not None
    etcd_private.stop()
    with pytest.raises(BackendUnavailable):
        await backend.leader(lock_name)
    etcd_private.start()
    # the old lease survives the restart (etcd extends leases on recovery), then expires
    new, _ = await eventually("acquire", lambda: backend.acquire(lock_name, Holder("a"), 2.0), within=30.0)
    assert new.token > lease.token
    assert await backend.claim(new, "k")


# -- watches ----------------------------------------------------------------------

async def test_wait_for_change_wakes_on_expiry(etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(etcd_url), make_backend(etcd_url)
    assert await a.acquire(lock_name, Holder("a"), 2.0) is not None
    start = time.monotonic()
    await b.wait_for_change(lock_name, 20.0)
    waited = time.monotonic() - start
    assert 1.0 <= waited < 5.0
    assert await b.acquire(lock_name, Holder("b"), 2.0) is not None


async def test_change_between_failed_acquire_and_wait_is_not_missed(etcd_url: str, make_backend: Factory,
                                                                    lock_name: str) -> None:
    a, b = make_backend(etcd_url), make_backend(etcd_url)
    lease = await a.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    assert await b.acquire(lock_name, Holder("b"), 10.0) is None
    await a.release(lease)  # before b starts waiting
    start = time.monotonic()
    await b.wait_for_change(lock_name, 10.0)
    assert time.monotonic() - start < 0.5
    # and the event, once seen, does not wake the next wait
    start = time.monotonic()
    await b.wait_for_change(lock_name, 0.5)
    assert time.monotonic() - start >= 0.4


async def test_cancelled_wait_cleans_up(etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    backend = make_backend(etcd_url)
    before = asyncio.all_tasks()
    waiter = asyncio.create_task(backend.wait_for_change(lock_name, 30.0))
    await asyncio.sleep(0.3)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # gRPC finishes the cancelled call's bookkeeping in a task of its own, within a moment
    for _ in range(20):
        if asyncio.all_tasks() <= before:
            break
        await asyncio.sleep(0.05)
    assert asyncio.all_tasks() <= before
    assert await backend.acquire(lock_name, Holder("a"), 2.0) is not None


# -- claims -----------------------------------------------------------------------

async def test_claims_expire_after_retention(etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    backend = make_backend(f"{etcd_url}&claim_retention=2")
    lease = await backend.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    assert await backend.claim(lease, "job@1")
    await backend.record(lock_name, "job@1", {"outcome": "ok"})
    assert [r.result for r in await backend.runs(lock_name)] == [{"outcome": "ok"}]
    await asyncio.sleep(1.5)
    assert len(await backend.runs(lock_name)) == 1  # kept for at least the retention
    _, waited = await eventually("expiry", lambda: _none_if_any(backend.runs(lock_name)), within=10.0)
    assert waited < 8.0
    assert await backend.claim(lease, "job@1")  # gone, so claimable again


async def _none_if_any(runs: Awaitable[list[object]]) -> bool | None:
    return True if not await runs else None


async def test_record_without_claim_is_a_no_op(etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    backend = make_backend(etcd_url)
    await backend.record(lock_name, "never-claimed", {"outcome": "ok"})
    assert await backend.runs(lock_name) == []
