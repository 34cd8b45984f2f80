"""The two Redis traps docs/design.md names, shown on real servers.

1. redis-py's ``Lock`` has no fencing token: a holder whose lock expired while
   it was stalled still runs its critical section, and nothing downstream can
   tell its write from the new holder's. The same stall with a Baton lease ends
   in a refused claim.
2. A replica promotion can lose a lock. Replication is asynchronous: an acquire
   the old primary acknowledged but never shipped is gone on the promoted
   replica, so a second holder gets the lock while the first one's lease is
   still valid, and with the *same* fencing token. No client-side rule repairs
   that; it is why the README asks for one Redis primary with AOF (or etcd,
   which replicates by consensus) and never a failover pair under the lock.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from loadtest.proxy import ProxyHub
from loadtest.servers import Cluster, Server, redis_cluster
from lock_backends import Holder, LockBackend
from tests.conftest import ServerPool, with_timeout

Factory = Callable[[str], LockBackend]


async def test_redis_py_lock_lets_a_stalled_holder_write_baton_claim_refuses_it(
        servers: ServerPool, make_backend: Factory, lock_name: str) -> None:
    url = servers.get("redis").url
    client = aioredis.Redis.from_url(url)
    sink: list[str] = []  # what a downstream store accepted, for one piece of work
    try:
        stalled = client.lock(f"trap:{uuid.uuid4().hex}", timeout=0.5)
        assert await stalled.acquire(blocking=False)
        # the holder stalls (GC pause, SIGSTOP, slow disk) past the lock's timeout ...
        while await client.exists(stalled.name):  # noqa: ASYNC110 - polling the server, not a local flag
            await asyncio.sleep(0.05)
        successor = client.lock(stalled.name, timeout=5)
        assert await successor.acquire(blocking=False)
        sink.append("successor")
        # ... and wakes up inside its critical section: it has no token to present, so its write lands
        sink.append("stalled holder")
        assert sink == ["successor", "stalled holder"], "redis-py's Lock should have no way to stop the stale write"
    finally:
        await client.aclose()

    # the same story with a Baton lease: the stalled holder's claim is refused
    first, second = make_backend(with_timeout(url)), make_backend(with_timeout(url))
    old = await first.acquire(lock_name, Holder("stalled"), 1.0)
    assert old is not None
    new = None
    while new is None:
        new = await second.acquire(lock_name, Holder("successor"), 5.0)
        await asyncio.sleep(0.05)
    assert new.token > old.token
    assert await second.claim(new, "work-1") is True
    assert await first.claim(old, "work-1") is False
    assert await first.claim(old, "work-2") is False  # a stale token claims nothing at all


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[Cluster, Server, ProxyHub]]:
    """A primary and a replica that replicates through a proxy, so replication can be cut."""
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = redis_cluster(tmp_path / "primary")
    primary.start()
    hub = ProxyHub()
    link = hub.add("replica", "127.0.0.1", primary.members[0].port)
    template = redis_cluster(tmp_path / "replica").members[0]
    replica = Server("redis", template.port, template.workdir,
                     [*template.argv, "--replicaof", "127.0.0.1", str(link.port)], template.ready)
    replica.start()
    try:
        yield primary, replica, hub
    finally:
        replica.close()
        primary.close()
        hub.close()


async def replication_up(port: int) -> bool:
    client = aioredis.Redis(port=port)
    try:
        info = await client.info("replication")
        return bool(info.get("master_link_status") == "up")
    finally:
        await client.aclose()


async def test_replica_promotion_loses_the_lock_and_reuses_the_token(
        primary_and_replica: tuple[Cluster, Server, ProxyHub], make_backend: Factory, lock_name: str) -> None:
    primary, replica, hub = primary_and_replica
    replica_url = f"redis://127.0.0.1:{replica.port}/0"
    on_primary = make_backend(with_timeout(primary.url))
    # one handoff first, so the fence counter exists and reaches the replica
    warm = await on_primary.acquire(lock_name, Holder("warm-up"), 10.0)
    assert warm is not None
    await on_primary.release(warm)
    for _ in range(200):
        if await replication_up(replica.port):
            break
        await asyncio.sleep(0.05)
    replica_client = aioredis.Redis(port=replica.port)
    try:
        for _ in range(200):  # the warm-up reached the replica
            if int(await replica_client.get(f"baton:{{{lock_name}}}:fence") or 0) == warm.token:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the replica never caught up with the primary")

        # replication stalls (a network cut) while a node takes the lock on the primary
        hub.partition("replica")
        lease = await on_primary.acquire(lock_name, Holder("node-a"), 30.0)
        assert lease is not None and lease.token == warm.token + 1
        # the primary dies before shipping that write; the replica is promoted
        primary.members[0].stop(signal.SIGKILL)
        await replica_client.execute_command("REPLICAOF", "NO", "ONE")

        on_replica = make_backend(with_timeout(replica_url))
        stolen = await on_replica.acquire(lock_name, Holder("node-b"), 30.0)
        assert stolen is not None, "the promoted replica should not know about node-a's lease"
        assert lease.valid(), "node-a still holds a lease it may trust"
        assert stolen.token == lease.token, "the fence counter went back with the lost write"
    finally:
        await replica_client.aclose()
