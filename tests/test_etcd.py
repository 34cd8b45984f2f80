"""etcd-only behaviour: several endpoints, watches, claim retention, URL forms."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import grpc
import pytest

from loadtest.servers import Cluster, Server, free_port, owned_popen, start_backend
from lock_backends import (
    BackendUnavailable,
    BackendURLError,
    BusyRun,
    CorruptValue,
    Holder,
    LockBackend,
    RunQuery,
    RunRecord,
    Window,
    from_url,
)
from lock_backends import clock as clocks
from lock_backends.etcd import EtcdBackend
from lock_backends.etcd_client import is_connection_error
from tests.conftest import OP_TIMEOUT, ServerPool, eventually, with_timeout

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

    # Until the other two elect a leader any call may fail, but only as BackendUnavailable
    # (``eventually`` retries that and nothing else), never as another error.
    renewed, took = await eventually("renew", lambda: a.renew(lease), within=10.0)
    print(f"renew through the other members after {took:.2f}s")
    assert renewed.token == lease.token
    claimed, _ = await eventually("claim", lambda: _true_or_none(a.claim(renewed, "after")), within=10.0)
    assert claimed is True
    holder, _ = await eventually("leader", lambda: b.leader(lock_name), within=10.0)
    assert holder == Holder("a")
    await eventually("release", lambda: _done(a.release(renewed)), within=10.0)
    new, _ = await eventually("acquire", lambda: b.acquire(lock_name, Holder("b"), 5.0), within=10.0)
    assert new.token > lease.token
    runs, _ = await eventually("runs", lambda: b.runs(lock_name, RunQuery()), within=10.0)
    assert [r.key for r in runs] == ["after", "before"]

    # a backend made now, whose first endpoint is already dead, works from its first call
    c = make_backend(url)
    holder, _ = await eventually("leader", lambda: c.leader(lock_name), within=10.0)
    assert holder == Holder("b")


async def _true_or_none(op: Awaitable[bool]) -> bool | None:
    return True if await op else None


async def _done(op: Awaitable[None]) -> bool:
    await op
    return True


async def test_killing_the_raft_leader_under_a_renew_loop(etcd_three: Cluster, make_backend: Factory,
                                                          lock_name: str) -> None:
    """A member killed under a stream (INTERNAL "Failed execute_batch") fails over, never a plain error."""
    url, first = raft_leader_first(etcd_three)
    a = make_backend(with_timeout(url, OP_TIMEOUT))
    lease = await a.acquire(lock_name, Holder("a"), 6.0)
    assert lease is not None
    outcomes: list[tuple[float, float, str]] = []  # (start, seconds, what)
    current = lease

    async def renew_loop(until: float) -> None:
        nonlocal current
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                renewed = await a.renew(current)
                what = "renewed" if renewed is not None else "lost"
                current = renewed or current
            except BackendUnavailable:
                what = "unavailable"
            except Exception as exc:  # anything else is the bug this test is about
                what = f"error: {exc!r}"
            outcomes.append((start, time.monotonic() - start, what))
            await asyncio.sleep(0.05)

    loop = asyncio.create_task(renew_loop(time.monotonic() + 9.0))
    await asyncio.sleep(1.0)
    killed_at = time.monotonic()
    first.stop(signal.SIGKILL)
    await loop
    errors = [o for o in outcomes if o[2].startswith("error")]
    assert errors == [], errors
    # bounded by the op timeout, not by gRPC's reconnect backoff or a hang; the bound leaves room for a loop that
    # a loaded machine stalls (one call took 1.01 s of a 0.5 s timeout under CI's four workers, once)
    slow = [o for o in outcomes if o[1] > OP_TIMEOUT * 3]
    assert slow == [], f"calls far beyond the op timeout: {slow}"
    after = [o[2] for o in outcomes if o[0] > killed_at]
    print(f"after the kill: {after.count('unavailable')} unavailable, {after.count('renewed')} renewed, "
          f"{after.count('lost')} lost")
    assert "renewed" in after or "lost" in after, "no renew through the other members"
    if after[-1] == "renewed":
        assert await a.leader(lock_name) == Holder("a")  # it kept its lease
    else:  # it lost the lease meanwhile (TTL ran out during the election): it takes it again
        again, _ = await eventually("acquire", lambda: a.acquire(lock_name, Holder("a"), 6.0), within=10.0)
        assert again.token > lease.token


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
               lambda: backend.settings(lock_name), backend.server_time):
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


# -- claims and run records -------------------------------------------------------------

US = 1_000_000


def now_us() -> int:
    return int(time.time() * US)


def record(key: str, token: int, outcome: str = "ok", at: float | None = None) -> RunRecord:
    return RunRecord(key, token, "a", time.time() if at is None else at, {"outcome": outcome})


@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Any]:
    """A plain aetcd client on the URL's first endpoint, to look at or spoil the backend's keys."""
    host, port = urlsplit(url).netloc.split(",")[0].rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port), timeout=5)
    try:
        yield client
    finally:
        await client.close()


async def raw_keys(url: str, lock_name: str) -> list[str]:
    async with raw_client(url) as client:
        return sorted(kv.key.decode() for kv in await client.get_prefix(f"/baton/{lock_name}/".encode()))


def count_calls(backend: LockBackend, method: str) -> list[int]:
    """Count (and, for ranges, the records returned by) the backend's raw etcd requests."""
    calls = [0, 0]
    inner = getattr(backend, method)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        response = await inner(*args, **kwargs)
        calls[1] += len(getattr(response, "kvs", ()))
        return response

    setattr(backend, method, counted)
    return calls


async def test_claims_expire_after_retention(etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    backend = make_backend(f"{etcd_url}&claim_retention=2")
    lease = await backend.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    assert await backend.claim(lease, "job@1")
    # job@1's result replaces its claim (records of its own); plain@1's goes into a segment
    await backend.record_many(lock_name, [record("job@1", lease.token), record("plain@1", lease.token)])
    assert [r.result for r in await backend.runs(lock_name, RunQuery())] == [{"outcome": "ok"}] * 2
    assert any("/seg/" in k for k in await raw_keys(etcd_url, lock_name))
    await asyncio.sleep(1.5)
    assert len(await backend.runs(lock_name, RunQuery())) == 2  # kept for at least the retention
    _, waited = await eventually("expiry", lambda: _none_if_any(backend.runs(lock_name, RunQuery())), within=10.0)
    assert waited < 8.0
    assert await raw_keys(etcd_url, lock_name) == [f"/baton/{lock_name}/lock"]  # every index expired with it
    assert await backend.claim(lease, "job@1")  # gone, so claimable again


async def _none_if_any(runs: Awaitable[list[RunRecord]]) -> bool | None:
    return True if not await runs else None


async def test_a_record_replaces_its_claim_in_every_index(etcd_url: str, make_backend: Factory,
                                                          lock_name: str) -> None:
    backend = make_backend(etcd_url)
    lease = await backend.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    assert await backend.claim(lease, "job@1")
    assert [r.key for r in await backend.unfinished(lock_name, 10)] == ["job@1"]
    started = time.time() + 5  # not the claim's instant: its time index entry moves
    await backend.record_many(lock_name, [record("job@1", lease.token, at=started)])
    assert await backend.unfinished(lock_name, 10) == []
    runs = await backend.runs(lock_name, RunQuery())
    assert [(r.key, r.claimed_at, r.result) for r in runs] == [("job@1", started, {"outcome": "ok"})]
    kinds = [k.split("/")[3] for k in await raw_keys(etcd_url, lock_name)]
    assert sorted(kinds) == ["lock", "runs", "time"]  # no stale index entry left behind
    # recording it again (a retry) changes nothing
    await backend.record_many(lock_name, [record("job@1", lease.token, at=started)])
    assert [k.split("/")[3] for k in await raw_keys(etcd_url, lock_name)] == kinds


async def test_claim_window_is_one_round_trip(etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(etcd_url), make_backend(etcd_url)
    lease = await a.acquire(lock_name, Holder("a"), 30.0)
    assert lease is not None
    txns = count_calls(a, "_txn")
    start = now_us()
    t0 = time.perf_counter()
    first = await a.claim_window(lease, start + US, start)
    once = time.perf_counter() - t0
    assert first is not None and first.owned_by(lease.token) and txns[0] == 1
    t0 = time.perf_counter()
    for i in range(1000):  # a leader's loop: each call moves the mark a little further
        window = await a.claim_window(lease, start + US + (i + 1) * 1000, start)
        assert window is not None and window.until_us == start + US + (i + 1) * 1000
    grown = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    for _ in range(100):  # asking for what is granted writes nothing
        assert await a.claim_window(lease, start + US, start) == window
    same = (time.perf_counter() - t0) / 100
    assert txns[0] == 1101, "claim_window is one transaction when the cached mark is current"
    print(f"claim_window: first {once * 1000:.2f} ms, growing {grown * 1000:.2f} ms each (1000), "
          f"unchanged {same * 1000:.2f} ms each")
    # another instance moved the mark (same token): one failed compare, then the retry
    assert await b.claim_window(lease, start + 3 * US, start) is not None
    again = await a.claim_window(lease, start + 4 * US, start)
    assert again is not None and again.until_us == start + 4 * US and txns[0] == 1103


async def test_claim_window_intents_beyond_one_transaction_and_hand_back_drops(
        etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(etcd_url), make_backend(etcd_url)
    lease = await a.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    start = now_us()
    intents = [f"nightly@{i:03d}" for i in range(200)]
    window = await a.claim_window(lease, start + US, start, intents=intents)
    assert window is not None and window.owned_by(lease.token)
    assert {r.key for r in await b.unfinished(lock_name, 1000)} == set(intents)
    await a.record_many(lock_name, [record("nightly@000", lease.token)])
    busy = [BusyRun("nightly@000", "nightly", "a", lease.token, now_us() + 60 * US)]
    back = await a.hand_back(lease, start + US // 2, busy=busy, drop=intents[:190])
    assert back is not None and back.sealed and [r.key for r in back.busy] == ["nightly@000"]
    assert {r.key for r in await b.unfinished(lock_name, 1000)} == set(intents[190:])
    assert await a.hand_back(lease, start + US // 2, drop=intents[:190]) == back  # idempotent


async def page_through(backend: LockBackend, lock_name: str, limit: int, before: float | None = None,
                       **query: Any) -> list[RunRecord]:
    """Every run (before ``before``), page after page, each page's cursor the last one shown before."""
    seen: list[RunRecord] = []
    for _ in range(10_000):
        page = await backend.runs(lock_name, RunQuery(limit=limit, before=before, **query))
        if not page:
            return seen
        assert all(a.claimed_at >= b.claimed_at for a, b in itertools.pairwise(page))
        seen += page
        before = page[-1].claimed_at
    raise AssertionError("no end of the pages")


async def test_record_many_batch_of_5000(servers: ServerPool, make_backend: Factory, lock_name: str) -> None:
    # batching and paging are the point here, not latency: pages of 1,000 get the time a busy machine needs
    backend = make_backend(with_timeout(servers.get("etcd").url, 5.0))
    lease = await backend.acquire(lock_name, Holder("a"), 30.0)
    assert lease is not None
    base = time.time() - 10_000
    # finished within five seconds, as a leader's batch is: ten segments (500 records, half a second each)
    batch = [record(f"job{i % 7}@{i}", lease.token, "error" if i % 100 == 0 else "ok", at=base + i / 1000)
             for i in range(5000)]
    txns = count_calls(backend, "_txn")
    t0 = time.perf_counter()
    await backend.record_many(lock_name, batch)
    took = time.perf_counter() - t0
    print(f"record_many of 5000 new records: {took:.3f}s in {txns[0]} transactions")
    assert txns[0] == 1  # ten segments, one transaction (written a key each: 79)
    segments = [k for k in await raw_keys(servers.get("etcd").url, lock_name) if "/seg/" in k]
    assert len(segments) == 10
    t0 = time.perf_counter()
    await backend.record_many(lock_name, batch)  # a retry: the same segments under the same keys
    print(f"record_many of the same 5000 again: {time.perf_counter() - t0:.3f}s")
    assert txns[0] == 2
    await backend.record_many(lock_name, batch[250:2750])  # a retry split otherwise: other segments, same records
    expected = [f"job{i % 7}@{i}" for i in range(4999, -1, -1)]
    assert [r.key for r in await page_through(backend, lock_name, 1000)] == expected
    assert [r.key for r in await page_through(backend, lock_name, 333)] == expected
    errors = await backend.runs(lock_name, RunQuery(limit=10, outcome="error"))
    assert [r.key for r in errors] == [f"job{i % 7}@{i}" for i in range(4900, -1, -100)][:10]
    # spread a second apart: a segment each, 127 to a transaction
    spread = [record(f"late{i % 7}@{i}", lease.token, at=base - 10_000 + i) for i in range(5000)]
    txns[0] = 0
    await backend.record_many(lock_name, spread)
    assert txns[0] == 40
    late = await page_through(backend, lock_name, 1000, before=base)
    assert [r.key for r in late] == [f"late{i % 7}@{i}" for i in range(4999, -1, -1)]


async def test_pages_through_ties_of_claims_intents_and_batches(etcd_url: str, make_backend: Factory,
                                                                lock_name: str) -> None:
    """Runs at one microsecond recorded both ways (results of claims: records of their own; results of
    nothing claimed: segments, from two batches), between runs a fraction of a second apart in the same
    segments: every cursor reaches each run once, and a page holds the whole instant. (A cursor below a
    segment's newest run must still read that segment.)"""
    a, b = make_backend(etcd_url), make_backend(etcd_url)
    lease = await a.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    claimed = [f"claimed@{i}" for i in range(4)]
    assert await a.claim_many(lease, [*claimed, "open@1"]) == {*claimed, "open@1"}
    t = time.time() - 30
    tie = [record(k, lease.token, at=t) for k in claimed] + [record(f"tie@{i}", lease.token, at=t) for i in range(10)]
    near = [record(f"near@{i}", lease.token, at=t - 0.1 * i) for i in range(1, 5)]
    far = [record(f"old@{i}", lease.token, at=t - 5 - i) for i in range(3)]
    far += [record(f"new@{i}", lease.token, at=t + 1 + i) for i in range(3)]
    await a.record_many(lock_name, [*tie[2:9], *near[:2], *far[:2]])
    await b.record_many(lock_name, [*tie[:2], *tie[9:], *near[2:], *far[2:]])
    everything = {r.key for r in [*tie, *near, *far]} | {"open@1"}
    for limit in (1, 2, 3, 5, 50):
        seen: list[str] = []
        before: float | None = None
        for _ in range(100):
            page = await b.runs(lock_name, RunQuery(limit=limit, before=before))
            if not page:
                break
            assert all(x.claimed_at >= y.claimed_at for x, y in itertools.pairwise(page))
            if any(r.claimed_at == t for r in page):
                assert {r.key for r in tie} <= {r.key for r in page}, f"limit {limit}: the instant split"
            seen += [r.key for r in page]
            before = page[-1].claimed_at
        assert sorted(seen) == sorted(everything), f"limit {limit}"


async def test_results_go_into_segments_unless_their_key_is_open_even_opened_since_last_read(
        etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    """A segment write compares that no open index entry appeared since its writer last read them: an intent
    written by another instance after that read sends the result to the intent's own key, not a segment."""
    a, b = make_backend(etcd_url), make_backend(etcd_url)
    lease = await a.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    assert await a.claim_many(lease, ["seen@1"]) == {"seen@1"}
    txns = count_calls(a, "_txn")
    await a.record_many(lock_name, [record("first@1", lease.token)])  # a reads the open index: {seen@1}
    assert txns[0] == 2  # the compare on the open index failed once (a had never read it), then the segment
    start = now_us()
    window = await b.claim_window(lease, start + US, start, intents=["late@1"])  # after a's read
    assert window is not None and window.owned_by(lease.token)
    txns[0] = 0
    await a.record_many(lock_name, [record("late@1", lease.token), record("plain@1", lease.token)])
    assert [r.key for r in await b.unfinished(lock_name, 10)] == ["seen@1"]
    # the segment's compare fails (late@1 is new); late@1 goes a key each (its compare learns the intent, then
    # replaces it), plain@1 into a segment
    assert txns[0] == 4
    runs = await b.runs(lock_name, RunQuery())
    assert sorted((r.key, r.result is not None) for r in runs) == [
        ("first@1", True), ("late@1", True), ("plain@1", True), ("seen@1", False)]
    kinds = sorted(k.split("/")[3] + ("/" + k.split("/")[-1] if "/runs/" in k else "")
                   for k in await raw_keys(etcd_url, lock_name))
    assert kinds == ["lock", "open", "runs/late@1", "runs/seen@1", "seg", "seg", "time", "time", "window"]
    txns[0] = 0
    await a.record_many(lock_name, [record("plain@2", lease.token)])  # the open index as read: one transaction
    assert txns[0] == 1


async def test_listings_read_a_bounded_number_of_records(etcd_url: str, make_backend: Factory,
                                                         lock_name: str) -> None:
    from lock_backends.etcd_listing import SCAN_CAP

    backend = make_backend(etcd_url)
    lease = await backend.acquire(lock_name, Holder("a"), 30.0)
    assert lease is not None
    base = time.time() - 3 * 86400
    runs = [record(f"tick@{i}", lease.token, at=base + i * 10) for i in range(6000)]
    runs.append(record("rare@0", lease.token, at=base - 1))  # the oldest of all
    await backend.record_many(lock_name, runs)
    ranges = count_calls(backend, "_range")
    newest = await backend.runs(lock_name, RunQuery(limit=10))
    assert [r.key for r in newest] == [f"tick@{i}" for i in range(5999, 5989, -1)]
    assert ranges[1] <= 60, f"{ranges[1]} records read for a page of 10"
    ranges[:] = [0, 0]
    # a filter matching nothing recent reads up to the scan cap, not the whole retention
    assert await backend.runs(lock_name, RunQuery(limit=10, job="rare")) == []
    assert ranges[1] <= SCAN_CAP
    # ... and a cursor past the recent runs reaches it
    rare = await backend.runs(lock_name, RunQuery(limit=10, job="rare", before=base))
    assert [r.key for r in rare] == ["rare@0"]
    # since bounds the other end
    since = await backend.runs(lock_name, RunQuery(limit=100, since=base + 59_950))
    assert [r.key for r in since] == [f"tick@{i}" for i in range(5999, 5994, -1)]


async def test_a_page_ends_with_every_run_at_its_last_instant(etcd_url: str, make_backend: Factory,
                                                              lock_name: str) -> None:
    backend = make_backend(etcd_url)
    lease = await backend.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    t = time.time() - 10
    await backend.record_many(lock_name, [record("x@0", lease.token, at=t - 1), record("y@1", lease.token, at=t),
                                          record("y@2", lease.token, at=t), record("y@3", lease.token, at=t)])
    page = await backend.runs(lock_name, RunQuery(limit=2))
    assert sorted(r.key for r in page) == ["y@1", "y@2", "y@3"]  # RunQuery: never skipped by the cursor
    assert [r.key for r in await backend.runs(lock_name, RunQuery(limit=2, before=page[-1].claimed_at))] == ["x@0"]


# -- values that do not decode -------------------------------------------------------------

async def test_garbage_in_the_lock_key_is_a_typed_error_until_repaired(etcd_url: str, make_backend: Factory,
                                                                       lock_name: str) -> None:
    backend = make_backend(etcd_url)
    lease = await backend.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    await backend.release(lease)
    lock = f"/baton/{lock_name}/lock"
    for garbage in (b"not json", b'{"url": "x"}', b"\xff\xfe"):
        async with raw_client(etcd_url) as raw:
            await raw.put(lock.encode(), garbage)
        with pytest.raises(CorruptValue) as info:
            await backend.leader(lock_name)
        assert info.value.key == lock and info.value.backend == "etcd"
        with pytest.raises(CorruptValue):  # never read as "nobody holds it", nor as "somebody does"
            await backend.acquire(lock_name, Holder("b"), 10.0)
    async with raw_client(etcd_url) as raw:
        await raw.delete(lock.encode())  # the repair
    assert await backend.leader(lock_name) is None
    again = await backend.acquire(lock_name, Holder("b"), 10.0)
    assert again is not None and again.token > lease.token


async def test_garbage_mark_busy_run_setting_or_claim_is_a_typed_error_until_repaired(
        etcd_url: str, make_backend: Factory, lock_name: str) -> None:
    backend = make_backend(etcd_url)
    lease = await backend.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    start = now_us()
    window = await backend.claim_window(lease, start + US, start)
    assert window is not None
    root = f"/baton/{lock_name}/"

    async def spoil(key: str, value: bytes | None) -> None:
        async with raw_client(etcd_url) as raw:
            if value is None:
                await raw.delete((root + key).encode())
            else:
                await raw.put((root + key).encode(), value)

    # the claim mark
    await spoil("window", b'{"token": "x"}')
    with pytest.raises(CorruptValue) as info:
        await backend.claim_window(lease, start + 2 * US, start)
    assert info.value.key == root + "window"
    with pytest.raises(CorruptValue) as info:
        await backend.hand_back(lease, start)
    assert info.value.key == root + "window"
    with pytest.raises(CorruptValue) as info:
        await backend.claim_mark(lock_name)
    assert info.value.key == root + "window"
    await spoil("window", json.dumps(window.to_dict()).encode())  # repaired as it was
    assert await backend.claim_mark(lock_name) == Window(lease.token, window.since_us, window.until_us)
    grown = await backend.claim_window(lease, start + 2 * US, start)
    assert grown is not None and grown.owned_by(lease.token) and grown.since_us == window.since_us
    # a busy run
    await spoil("busy/job@1", b"[1, 2]")
    with pytest.raises(CorruptValue) as info:
        await backend.claim_window(lease, start + 2 * US, start)
    assert info.value.key == root + "busy/job@1"
    await spoil("busy/job@1", None)
    assert await backend.claim_window(lease, start + 2 * US, start) == grown
    # a setting
    await spoil("settings/paused:job", b"\xff\xfe")
    with pytest.raises(CorruptValue) as info:
        await backend.settings(lock_name)
    assert info.value.key == root + "settings/paused:job"
    await spoil("settings/paused:job", b"1")
    assert await backend.settings(lock_name) == {"paused:job": "1"}
    # a claim (a run record by key)
    await spoil("runs/job@1", b"garbage")
    with pytest.raises(CorruptValue) as info:
        await backend.claim(lease, "job@1")
    assert info.value.key == root + "runs/job@1"
    with pytest.raises(CorruptValue):
        await backend.claim_window(lease, start + 2 * US, start, intents=["job@1"])
    await spoil("runs/job@1", None)
    assert await backend.claim(lease, "job@1") is True


async def test_listings_skip_records_that_do_not_decode(etcd_url: str, make_backend: Factory,
                                                        lock_name: str) -> None:
    backend = make_backend(etcd_url)
    lease = await backend.acquire(lock_name, Holder("a"), 10.0)
    assert lease is not None
    assert await backend.claim(lease, "good@1")
    await backend.record_many(lock_name, [record("good@2", lease.token)])
    inv = f"{10**16 - 1 - now_us():016d}"
    async with raw_client(etcd_url) as raw:
        for index in ("time", "open"):
            await raw.put(f"/baton/{lock_name}/{index}/{inv}/bad@1".encode(), b"{not json")
            await raw.put(f"/baton/{lock_name}/{index}/{inv}/bad@2".encode(), b'{"token": 1}')
    assert {r.key for r in await backend.runs(lock_name, RunQuery())} == {"good@1", "good@2"}
    assert [r.key for r in await backend.unfinished(lock_name, 10)] == ["good@1"]
    # segments: one that does not decode at all, one with an entry that does not (its others are listed)
    good = {"key": "in-segment@1", "token": 1, "node_id": "a", "claimed_at": time.time(), "result": {"outcome": "ok"}}
    async with raw_client(etcd_url) as raw:
        await raw.put(f"/baton/{lock_name}/seg/{inv}/bad1".encode(), b"[{not json")
        await raw.put(f"/baton/{lock_name}/seg/{inv}/bad2".encode(), b'{"key": "x"}')
        await raw.put(f"/baton/{lock_name}/seg/{inv}/mixed".encode(),
                      json.dumps([{"token": 1}, 5, {**good, "claimed_at": "x"}, good]).encode())
    assert {r.key for r in await backend.runs(lock_name, RunQuery())} == {"good@1", "good@2", "in-segment@1"}
    assert {r.key for r in await backend.runs(lock_name, RunQuery(limit=1, before=time.time() + 1))} <= {
        "good@1", "good@2", "in-segment@1"}
    assert [r.key for r in await backend.unfinished(lock_name, 10)] == ["good@1"]


# -- the server's clock, errors ------------------------------------------------------------------

async def test_server_time_from_the_date_header(etcd_url: str, make_backend: Factory) -> None:
    backend = make_backend(etcd_url)
    _, took = await eventually("server_time", backend.server_time, within=5.0)
    print(f"first server_time after {took:.2f}s")
    # measured once, it answers at once, within a few ms of this host's clock (the same host)
    before = time.time()
    told = await backend.server_time()
    after = time.time()
    assert told is not None and after - before < 0.05
    assert before - 0.02 <= told <= after + 0.02, (before, told, after)


class PausedHost:
    """This host's clocks after its virtual machine was paused for ``stopped`` seconds: the monotonic clock lost
    them, the wall clock was set right on resume."""

    def __init__(self) -> None:
        self.stopped = 0.0

    def monotonic(self) -> float:
        return time.monotonic() - self.stopped

    def time(self) -> float:
        return time.time()


async def test_server_time_is_measured_again_when_this_hosts_clocks_moved_apart(etcd_url: str,
                                                                                make_backend: Factory) -> None:
    """The offset is cached against the monotonic clock. After a VM pause that clock is behind: the cache would
    put the server 20 s behind, and every node on the host would take itself for skewed and refuse to lead
    (the CI machine, once: +19.8 s on all three nodes). The clocks moved apart, so it is measured again."""
    backend = make_backend(etcd_url)
    host = PausedHost()
    with clocks.using(host):
        await eventually("server_time", backend.server_time, within=5.0)
        host.stopped = 20.0
        told, _ = await eventually("server_time after the pause", backend.server_time, within=5.0)
    now = time.time()
    assert now - 0.1 <= told <= now + 0.05, (told, now)


def test_channel_death_is_a_connection_error() -> None:
    from aetcd.exceptions import InternalError
    from grpc.aio import AioRpcError, Metadata

    def status(code: grpc.StatusCode, details: str, debug: str = "") -> AioRpcError:
        return AioRpcError(code, Metadata(), Metadata(), details=details, debug_error_string=debug)

    died = status(grpc.StatusCode.INTERNAL, "Internal error from Core", 'Failed "execute_batch": (6)')
    assert is_connection_error(died)
    wrapped = InternalError("Internal error from Core")
    wrapped.__cause__ = died  # as aetcd raises it
    assert is_connection_error(wrapped)
    assert is_connection_error(status(grpc.StatusCode.UNKNOWN, "Stream removed"))
    # a follower whose keepalive forwarded to the killed leader timed out (seen in the kill test)
    assert is_connection_error(status(grpc.StatusCode.UNKNOWN, "context deadline exceeded"))
    assert is_connection_error(status(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed"))
    assert not is_connection_error(status(grpc.StatusCode.INVALID_ARGUMENT,
                                          "etcdserver: too many operations in txn request"))
    assert not is_connection_error(status(grpc.StatusCode.UNKNOWN, "etcdserver: something else"))
    assert not is_connection_error(ValueError("a bug"))


def test_module_is_a_lock_backend() -> None:
    backend = from_url("etcd://127.0.0.1:2379")
    assert isinstance(backend, EtcdBackend) and isinstance(backend, LockBackend)


async def test_the_harness_forks_children_while_a_grpc_call_is_under_way(etcd_url: str,
                                                                         make_backend: Factory) -> None:
    """With gRPC's fork handlers on (grpcio's default), about one child in ten forked while an etcd call was under
    way died before its exec (SIGABRT or SIGSEGV): a PostgreSQL restart in the contract suite, once in CI. The
    harness turns them off (``loadtest/__init__.py``); a hundred children, all of them must exec."""
    backend = make_backend(etcd_url)
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            await backend.leader("fork-test")

    callers = [asyncio.create_task(busy()) for _ in range(4)]

    def fork_many(n: int) -> list[int]:
        codes = []
        for _ in range(n):
            child = owned_popen(["/bin/true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            codes.append(child.wait())
        return codes

    try:
        codes = await asyncio.to_thread(fork_many, 100)
    finally:
        stop.set()
        await asyncio.gather(*callers)
    assert codes == [0] * 100, sorted(set(codes))

