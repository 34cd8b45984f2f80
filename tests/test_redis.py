"""Redis-only behaviour: how a waiting follower notices an expiry, and what waiting costs the server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from lock_backends import Holder, LockBackend
from tests.conftest import ServerPool, with_timeout

Factory = Callable[[str], LockBackend]


async def commands_served(url: str) -> int:
    """Commands the server has run, from INFO commandstats (its own count, not the client's)."""
    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(int(v["calls"]) for v in stats.values())


async def test_waiter_wakes_when_an_abandoned_lease_expires(servers: ServerPool, make_backend: Factory,
                                                            lock_name: str) -> None:
    url = with_timeout(servers.get("redis").url)
    a, b = make_backend(url), make_backend(url)
    assert await a.acquire(lock_name, Holder("a"), 2.0) is not None  # and never renewed: a crashed holder
    start = time.monotonic()
    await b.wait_for_change(lock_name, 20.0)
    waited = time.monotonic() - start
    assert 1.0 <= waited < 5.0, waited
    assert await b.acquire(lock_name, Holder("b"), 2.0) is not None


async def test_a_waiting_follower_costs_the_server_a_handful_of_commands(
        servers: ServerPool, make_backend: Factory, lock_name: str) -> None:
    """Waiting out a live leader must not poll: followers should cost the backend next to nothing."""
    server_url = servers.get("redis").url
    a, b = make_backend(with_timeout(server_url)), make_backend(with_timeout(server_url))
    lease = await a.acquire(lock_name, Holder("a"), 30.0)
    assert lease is not None
    await b.leader(lock_name)  # connect first, so the count below is the wait alone
    before = await commands_served(server_url)
    start = time.monotonic()
    await b.wait_for_change(lock_name, 3.0)
    assert time.monotonic() - start >= 2.9  # nothing changed: it waited the whole time
    spent = await commands_served(server_url) - before - 1  # minus our own INFO
    # subscribe, one GET + PTTL, unsubscribe, and a new connection's CLIENT SETINFO;
    # polling every 0.25 s, as this backend once did, came to 17
    assert spent <= 10, f"{spent} commands to wait 3 s"
    # and the wait still ends at once on a release
    waiter = asyncio.create_task(b.wait_for_change(lock_name, 20.0))
    await asyncio.sleep(0.3)
    released_at = time.monotonic()
    await a.release(lease)
    await asyncio.wait_for(waiter, 10.0)
    assert time.monotonic() - released_at < 1.0
