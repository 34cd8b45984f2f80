"""One contract, four backends: every LockBackend behaves the same against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from loadtest.servers import Cluster
from lock_backends import BackendUnavailable, Holder, Lease, LockBackend
from tests.conftest import OP_TIMEOUT, TTL, with_timeout

Factory = Callable[[str], LockBackend]


async def wait_for_acquire(backend: LockBackend, name: str, holder: Holder, ttl: float,
                           within: float) -> tuple[Lease, float]:
    """Poll acquire until it succeeds; return the lease and the seconds it took."""
    start = time.monotonic()
    while True:
        lease = await backend.acquire(name, holder, ttl)
        if lease is not None:
            return lease, time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"no acquire within {within}s")
        await asyncio.sleep(0.05)


async def test_acquire_names_holder_and_refuses_others(backend_url: str, make_backend: Factory,
                                                       lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    assert await a.leader(lock_name) is None
    lease = await a.acquire(lock_name, Holder("a", "http://a:1"), TTL)
    assert lease is not None and lease.token > 0
    assert 0 < lease.remaining() <= TTL
    assert await a.leader(lock_name) == Holder("a", "http://a:1")
    assert await b.leader(lock_name) == Holder("a", "http://a:1")
    assert await b.acquire(lock_name, Holder("b"), TTL) is None
    # re-entrancy guard: the same instance asking again does not get a second lease
    assert await a.acquire(lock_name, Holder("a", "http://a:1"), TTL) is None
    renewed = await a.renew(lease)
    assert renewed is not None and renewed.token == lease.token
    assert renewed.deadline >= lease.deadline
    await a.release(renewed)
    assert await b.leader(lock_name) is None
    assert await b.acquire(lock_name, Holder("b"), TTL) is not None


async def test_sixteen_contenders_exactly_one_each_round(backend_url: str, make_backend: Factory,
                                                         lock_name: str) -> None:
    contenders = [make_backend(backend_url) for _ in range(16)]
    tokens: list[int] = []
    for _round in range(8):
        leases = await asyncio.gather(*(
            c.acquire(lock_name, Holder(f"n{i}"), TTL) for i, c in enumerate(contenders)))
        winners = [(i, lease) for i, lease in enumerate(leases) if lease is not None]
        assert len(winners) == 1, f"round {_round}: {len(winners)} winners"
        index, lease = winners[0]
        assert lease is not None
        assert await contenders[(index + 1) % 16].leader(lock_name) == Holder(f"n{index}")
        # while one holds, a second wave of every other contender still loses
        again = await asyncio.gather(*(
            c.acquire(lock_name, Holder(f"n{i}"), TTL) for i, c in enumerate(contenders) if i != index))
        assert all(x is None for x in again)
        tokens.append(lease.token)
        await contenders[index].release(lease)
    assert tokens == sorted(set(tokens))


async def test_holder_that_stops_renewing_loses_after_ttl(backend_url: str, make_backend: Factory,
                                                          lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    assert await b.acquire(lock_name, Holder("b"), TTL) is None
    new, waited = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    # not before the old lease could have ended on the server (etcd may round up, never down)
    assert waited >= TTL * 0.5
    assert new.token > old.token
    assert await a.renew(old) is None
    assert await b.leader(lock_name) == Holder("b")


async def test_tokens_strictly_increase_over_50_handoffs(backend_url: str, make_backend: Factory,
                                                         lock_name: str) -> None:
    nodes = [make_backend(backend_url) for _ in range(3)]
    last = 0
    for i in range(50):
        node = nodes[i % 3]
        lease = await node.acquire(lock_name, Holder(f"n{i % 3}"), TTL)
        assert lease is not None, f"handoff {i}"
        assert lease.token > last
        last = lease.token
        await node.release(lease)


async def test_stale_release_leaves_new_holder_alone(backend_url: str, make_backend: Factory,
                                                     lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    new, _ = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    await a.release(old)
    assert await a.leader(lock_name) == Holder("b")
    assert await b.renew(new) is not None


async def test_claim_is_fenced_and_idempotent(backend_url: str, make_backend: Factory,
                                              lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    assert await a.claim(old, "job-1@t1") is True
    assert await a.claim(old, "job-1@t1") is False
    assert await b.claim(old, "job-1@t1") is False
    new, _ = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    # the old holder wakes up with its old token: refused, for new and old keys alike
    assert await a.claim(old, "job-1@t2") is False
    assert await b.claim(new, "job-1@t1") is False
    assert await b.claim(new, "job-1@t2") is True
    # after a handoff through release, the next holder claims new keys
    await b.release(new)
    third = await a.acquire(lock_name, Holder("a"), TTL)
    assert third is not None and third.token > new.token
    assert await a.claim(third, "job-1@t3") is True
    assert await a.claim(new, "job-1@t4") is False


async def test_claim_many_claims_each_key_on_its_own_and_is_fenced(backend_url: str, make_backend: Factory,
                                                                    lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    assert await a.claim(old, "job@2") is True
    # a batch meeting one claimed key still claims the others (and a key given twice once)
    keys = [f"job@{i}" for i in range(150)] + ["job@7"]
    assert await a.claim_many(old, keys) == {f"job@{i}" for i in range(150)} - {"job@2"}
    assert await a.claim_many(old, ["job@3", "job@4"]) == set()
    assert await a.claim_many(old, []) == set()
    await a.record_many(lock_name, {"job@3": {"outcome": "ok"}, "job@4": {"outcome": "error", "error": "x"},
                                    "never-claimed": {"outcome": "ok"}})
    runs = await b.runs(lock_name, limit=200)
    results = {r.key: r.result for r in runs}
    assert results["job@3"] == {"outcome": "ok"} and results["job@4"] == {"outcome": "error", "error": "x"}
    assert {r.token for r in runs} == {old.token}  # a record leaves the claim's token intact
    assert results["job@5"] is None and "never-claimed" not in results
    new, _ = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    # the old token is refused for the whole batch; the new one claims what is still free
    assert await a.claim_many(old, ["job@200", "job@201"]) == set()
    assert await b.claim_many(new, ["job@200", "job@1"]) == {"job@200"}


async def test_runs_and_settings_are_shared(backend_url: str, make_backend: Factory,
                                            lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    for i in range(3):
        assert await a.claim(lease, f"job@{i}")
        await asyncio.sleep(0.01)
    await a.record(lock_name, "job@1", {"outcome": "ok", "duration_s": 0.5})
    runs = await b.runs(lock_name, limit=10)
    assert [r.key for r in runs] == ["job@2", "job@1", "job@0"]
    assert runs[1].result == {"outcome": "ok", "duration_s": 0.5}
    assert runs[0].result is None and runs[0].token == lease.token and runs[0].node_id == "a"
    assert [r.key for r in await b.runs(lock_name, limit=2)] == ["job@2", "job@1"]
    await a.set_setting(lock_name, "paused:job", "1")
    assert await b.settings(lock_name) == {"paused:job": "1"}
    await b.set_setting(lock_name, "paused:job", None)
    assert await a.settings(lock_name) == {}


async def test_wait_for_change_returns_soon_after_release(backend_url: str, make_backend: Factory,
                                                          lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    # with nothing happening it waits the whole timeout
    start = time.monotonic()
    await b.wait_for_change(lock_name, 0.6)
    assert time.monotonic() - start >= 0.5
    waiter = asyncio.create_task(b.wait_for_change(lock_name, 10.0))
    await asyncio.sleep(0.3)  # let the watcher subscribe
    released_at = time.monotonic()
    await a.release(lease)
    await asyncio.wait_for(waiter, 10.0)
    assert time.monotonic() - released_at < 1.0
    assert await b.acquire(lock_name, Holder("b"), TTL) is not None


async def test_unreachable_server_fails_fast(make_backend: Factory, lock_name: str,
                                             backend_kind_url_closed: str) -> None:
    backend = make_backend(backend_kind_url_closed)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await backend.acquire(lock_name, Holder("a"), TTL)
    assert time.monotonic() - start < TTL
    assert "127.0.0.1" in str(info.value)


@pytest.fixture(params=["redis://127.0.0.1:{p}/0", "postgresql://postgres@127.0.0.1:{p}/postgres",
                        "etcd://127.0.0.1:{p}"])
def backend_kind_url_closed(request: pytest.FixtureRequest) -> str:
    from loadtest.servers import free_port

    return with_timeout(request.param.format(p=free_port()))


async def test_server_restart_mid_lease(private_server: Cluster, make_backend: Factory,
                                        lock_name: str) -> None:
    url = with_timeout(private_server.url)
    a = make_backend(url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    private_server.stop()
    start = time.monotonic()
    try:
        renewed = await a.renew(lease)
    except BackendUnavailable:
        renewed = None
    assert renewed is None
    assert time.monotonic() - start < OP_TIMEOUT * 3 + 0.5
    private_server.start()
    # once the server is back the lock is usable again (a fresh lease, a higher or equal epoch)
    b = make_backend(url)
    deadline = time.monotonic() + 30
    got: Lease | None = None
    while got is None and time.monotonic() < deadline:
        with contextlib.suppress(BackendUnavailable):
            got = await b.acquire(lock_name, Holder("b"), TTL)
        if got is None:
            await asyncio.sleep(0.2)
    assert got is not None, "no lease after the server came back"
    assert await b.claim(got, "after-restart") is True
