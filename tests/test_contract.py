"""One contract, every backend: each LockBackend behaves the same, against a real server (or the
in-memory reference the simulator runs on)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from loadtest.servers import Cluster
from lock_backends import (
    NO_WINDOW,
    BackendUnavailable,
    BusyRun,
    Holder,
    Lease,
    LockBackend,
    RunQuery,
    RunRecord,
    Window,
)
from tests.conftest import OP_TIMEOUT, TTL, with_timeout

Factory = Callable[[str], LockBackend]

US = 1_000_000


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


def now_us() -> int:
    return int(time.time() * US)


def record(key: str, lease: Lease, outcome: str = "ok", at: float | None = None, **extra: object) -> RunRecord:
    return RunRecord(key, lease.token, lease.holder.node_id, time.time() if at is None else at,
                     {"outcome": outcome, **extra})


# -- the lease ----------------------------------------------------------------------------------


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


async def test_server_time_is_the_stores_wall_clock(backend_url: str, make_backend: Factory) -> None:
    backend = make_backend(backend_url)
    before = time.time()
    told = await backend.server_time()
    after = time.time()
    if told is None:  # a store with no clock says so; every one that has a clock must tell it
        assert backend.kind == "etcd", f"{backend.kind} has a clock and must report it"
        return
    # the same host's clock: within the round trip, and a little for the store's own resolution
    assert before - 0.05 <= told <= after + 0.05, (before, told, after)


# -- single-key claims ----------------------------------------------------------------------------


async def test_claim_is_fenced_and_idempotent_per_lease(backend_url: str, make_backend: Factory,
                                                        lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    assert await a.claim(old, "job-1@t1") is True
    # the same token asking again (its answer was lost, say) is told yes again, from any instance
    assert await a.claim(old, "job-1@t1") is True
    assert await b.claim(old, "job-1@t1") is True
    new, _ = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    # the old holder wakes up with its old token: refused, for new and old keys alike
    assert await a.claim(old, "job-1@t2") is False
    assert await a.claim(old, "job-1@t1") is False
    # another token's claim stays another token's
    assert await b.claim(new, "job-1@t1") is False
    assert await b.claim(new, "job-1@t2") is True
    # after a handoff through release, the next holder claims new keys
    await b.release(new)
    third = await a.acquire(lock_name, Holder("a"), TTL)
    assert third is not None and third.token > new.token
    assert await a.claim(third, "job-1@t3") is True
    assert await a.claim(new, "job-1@t4") is False


async def test_a_claim_whose_answer_was_lost_is_granted_on_retry_and_runs_once(
        backend_url: str, make_backend: Factory, lock_name: str) -> None:
    """Write, lose the answer, retry: the retry is granted, and the run is recorded once."""
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    lost = asyncio.create_task(a.claim_many(lease, ["job@1", "job@2"]))
    await lost  # applied on the store; the caller never reads the answer
    assert await a.claim_many(lease, ["job@1", "job@2", "job@3"]) == {"job@1", "job@2", "job@3"}
    await a.record_many(lock_name, [record("job@1", lease)])
    runs = await b.runs(lock_name, RunQuery(limit=10))
    assert [r.key for r in runs].count("job@1") == 1


async def test_claim_many_claims_each_key_on_its_own_and_is_fenced(backend_url: str, make_backend: Factory,
                                                                    lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    assert await a.claim(old, "job@2") is True
    # a batch meeting one of its own keys claims them all again (and a key given twice once)
    keys = [f"job@{i}" for i in range(150)] + ["job@7"]
    assert await a.claim_many(old, keys) == {f"job@{i}" for i in range(150)}
    assert await a.claim_many(old, []) == set()
    await a.record_many(lock_name, [record("job@3", old), record("job@4", old, "error", error="x"),
                                    record("never-claimed", old)])
    runs = await b.runs(lock_name, RunQuery(limit=200))
    results = {r.key: r.result for r in runs}
    assert results["job@3"] == {"outcome": "ok"}
    assert results["job@4"] == {"outcome": "error", "error": "x"}
    assert {r.token for r in runs} == {old.token}  # a record leaves the claim's token intact
    assert results["job@5"] is None and results["never-claimed"] == {"outcome": "ok"}
    new, _ = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    # the old token is refused for the whole batch; the new one claims what is still free
    assert await a.claim_many(old, ["job@200", "job@201"]) == set()
    assert await b.claim_many(new, ["job@200", "job@1"]) == {"job@200"}


# -- claim windows ------------------------------------------------------------------------------


async def test_claim_window_grows_under_one_token_and_is_idempotent(backend_url: str, make_backend: Factory,
                                                                    lock_name: str) -> None:
    a = make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    first = await a.claim_window(lease, start + US, start)
    assert first is not None and first.owned_by(lease.token)
    assert (first.since_us, first.until_us) == (start, start + US)  # the lock's very first window
    grown = await a.claim_window(lease, start + 2 * US, start + 5)
    assert grown == Window(lease.token, start, start + 2 * US)
    # asking again for what is granted (a retry after a lost answer) answers the same window
    assert await a.claim_window(lease, start + 2 * US, start + 9) == grown
    # a smaller ask never shrinks it
    assert await a.claim_window(lease, start + US, start + 9) == grown


async def test_claim_window_is_fenced_and_windows_of_tokens_never_overlap(
        backend_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    start = now_us()
    mine = await a.claim_window(old, start + US // 2, start)
    assert mine is not None
    new, _ = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    # the old holder wakes up and tries to claim further: refused, nothing changes
    assert await a.claim_window(old, start + 60 * US, start) is None
    theirs = await b.claim_window(new, now_us() + US // 2, now_us())
    assert theirs is not None and theirs.owned_by(new.token)
    assert theirs.since_us == mine.until_us  # picks up exactly where the dead holder's window ended
    assert not theirs.owned_by(old.token)


async def test_a_successor_waits_out_a_window_claimed_further_ahead(backend_url: str, make_backend: Factory,
                                                                    lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    start = now_us()
    far = start + 3600 * US  # the predecessor claimed an hour ahead and died
    assert await a.claim_window(old, far, start) is not None
    await a.release(old)
    new = await b.acquire(lock_name, Holder("b"), TTL)
    assert new is not None
    seen = await b.claim_window(new, start + US, start)
    assert seen is not None and not seen.owned_by(new.token)
    assert (seen.token, seen.until_us) == (old.token, far)
    after = await b.claim_window(new, far + US, start)
    assert after is not None and after.owned_by(new.token) and after.since_us == far


async def test_claim_mark_reads_the_mark_and_changes_nothing(backend_url: str, make_backend: Factory,
                                                              lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    assert await b.claim_mark(lock_name) == NO_WINDOW  # never claimed
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    assert await b.claim_mark(lock_name) == NO_WINDOW  # a lease alone is no window
    start = now_us()
    mine = await a.claim_window(lease, start + US, start)
    assert mine is not None
    assert await b.claim_mark(lock_name) == Window(lease.token, start, start + US)
    # a read by anybody (no lease) changes nothing: the holder grows its window as before
    assert await b.claim_mark(lock_name) == await a.claim_mark(lock_name)
    assert await a.claim_window(lease, start + 2 * US, start) == Window(lease.token, start, start + 2 * US)
    back = await a.hand_back(lease, start + US // 2, [BusyRun("job@1", "job", "a", lease.token, start + 60 * US)])
    assert back is not None and back.busy
    # sealed, and without the busy runs (a new leader learns those with its first claim)
    assert await b.claim_mark(lock_name) == Window(lease.token, start, start + US // 2, True)


async def test_hand_back_gives_back_the_rest_and_seals(backend_url: str, make_backend: Factory,
                                                       lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    assert await a.claim_window(lease, start + 2 * US, start) is not None
    back = await a.hand_back(lease, start + US // 2)
    assert back is not None and back.sealed and (back.since_us, back.until_us) == (start, start + US // 2)
    assert not back.owned_by(lease.token)
    assert await a.hand_back(lease, start + US // 2) == back  # idempotent
    # sealed: the same token can no longer extend it
    again = await a.claim_window(lease, start + 5 * US, start)
    assert again is not None and again.sealed and again.until_us == start + US // 2
    await a.release(lease)
    new = await b.acquire(lock_name, Holder("b"), TTL)
    assert new is not None
    theirs = await b.claim_window(new, start + US, start)
    assert theirs is not None and theirs.owned_by(new.token) and theirs.since_us == start + US // 2


async def test_hand_back_after_the_lease_lapsed_until_a_successor_claims(
        backend_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    old = await a.acquire(lock_name, Holder("a"), TTL)
    assert old is not None
    start = now_us()
    assert await a.claim_window(old, start + 10 * US, start) is not None
    new, _ = await wait_for_acquire(b, lock_name, Holder("b"), TTL, within=TTL * 4)
    # the lease lapsed, but nobody moved the mark yet: what the old holder never ran goes back
    back = await a.hand_back(old, start + US)
    assert back is not None and back.until_us == start + US
    theirs = await b.claim_window(new, start + 20 * US, start)
    assert theirs is not None and theirs.owned_by(new.token) and theirs.since_us == start + US
    # once the successor claimed, a stale hand-back changes nothing
    assert await a.hand_back(old, start) is None
    after = await b.claim_window(new, start + 20 * US, start)
    assert after == Window(new.token, start + US, start + 20 * US)


async def test_intents_are_unfinished_until_recorded_and_busy_runs_until_their_record(
        backend_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    window = await a.claim_window(lease, start + US, start, intents=["nightly@1", "nightly@2", "nightly@3"])
    assert window is not None and window.busy == ()
    open_runs = await b.unfinished(lock_name, 10)
    assert {r.key for r in open_runs} == {"nightly@1", "nightly@2", "nightly@3"}
    assert all(r.token == lease.token and r.node_id == "a" and r.result is None for r in open_runs)
    await a.record_many(lock_name, [record("nightly@1", lease)])
    # an intent never overwrites a result
    assert await a.claim_window(lease, start + 2 * US, start, intents=["nightly@1"]) is not None
    assert {r.key for r in await b.unfinished(lock_name, 10)} == {"nightly@2", "nightly@3"}
    expiry = now_us() + 60 * US
    busy = [BusyRun("nightly@2", "nightly", "a", lease.token, expiry),
            BusyRun("long@9", "long", "a", lease.token, expiry),
            BusyRun("gone@1", "gone", "a", lease.token, now_us() - US)]  # expired already
    # a dropped key with its result stored keeps it: a hand-back drops the intents of the runs whose records it
    # could not confirm, and a record may have landed with its answer lost
    back = await a.hand_back(lease, start + 2 * US, busy=busy, drop=["nightly@3", "nightly@1"])
    assert back is not None
    assert {r.key for r in await b.unfinished(lock_name, 10)} == {"nightly@2"}
    # and a record that lands after its intent was dropped is stored, not refused for the missing intent
    await a.record_many(lock_name, [record("nightly@3", lease)])
    stored = {r.key: r.result for r in await b.runs(lock_name, RunQuery(limit=10, job="nightly"))}
    assert stored == {"nightly@1": {"outcome": "ok"}, "nightly@2": None, "nightly@3": {"outcome": "ok"}}
    assert {r.key for r in await b.unfinished(lock_name, 10)} == {"nightly@2"}
    await a.release(lease)
    new = await b.acquire(lock_name, Holder("b"), TTL)
    assert new is not None
    seen = await b.claim_window(new, start + 3 * US, start)
    assert seen is not None and {r.key for r in seen.busy} == {"nightly@2", "long@9"}
    assert {r.to_dict()["job_id"] for r in seen.busy} == {"nightly", "long"}
    await a.record_many(lock_name, [record("long@9", lease)])  # the old node's run ended: its record frees it
    later = await b.claim_window(new, start + 3 * US, start)
    assert later is not None and {r.key for r in later.busy} == {"nightly@2"}


# -- records, listings, settings ------------------------------------------------------------------


async def test_runs_listing_filters_and_pages(backend_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    base = time.time() - 100
    batch = [record(f"{'tick' if i % 2 else 'tock'}@{i}", lease, "error" if i % 3 == 0 else "ok", at=base + i)
             for i in range(30)]
    await a.record_many(lock_name, batch[:10])
    await a.record_many(lock_name, batch[10:])
    newest = await b.runs(lock_name, RunQuery(limit=5))
    assert [r.key for r in newest] == [f"{'tick' if i % 2 else 'tock'}@{i}" for i in range(29, 24, -1)]
    assert newest[0].result == {"outcome": "ok"} and newest[0].claimed_at == pytest.approx(base + 29)
    ticks = await b.runs(lock_name, RunQuery(limit=100, job="tick"))
    assert [r.key for r in ticks] == [f"tick@{i}" for i in range(29, 0, -2)]
    errors = await b.runs(lock_name, RunQuery(limit=100, outcome="error"))
    assert [r.key for r in errors] == [k for k in (f"{'tick' if i % 2 else 'tock'}@{i}"
                                                   for i in range(29, -1, -1)) if int(k.split("@")[1]) % 3 == 0]
    recent = await b.runs(lock_name, RunQuery(limit=100, since=base + 25))
    assert len(recent) == 5
    # cursor: the next page starts before the last one shown
    page = await b.runs(lock_name, RunQuery(limit=5, before=newest[-1].claimed_at))
    assert [r.key for r in page] == [f"{'tick' if i % 2 else 'tock'}@{i}" for i in range(24, 19, -1)]


async def test_a_result_replaces_its_intent_or_claim_once_and_a_retry_changes_nothing(
        backend_url: str, make_backend: Factory, lock_name: str) -> None:
    """A result recorded for a key that has an intent or a claim replaces it: listed once, with the result,
    and no longer unfinished (recovery would run it again), from an instance that has read nothing yet,
    recorded again (a retry whose first answer was lost) and again from another instance."""
    a, b, c = make_backend(backend_url), make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    window = await a.claim_window(lease, start + US, start, intents=["nightly@1", "nightly@2"])
    assert window is not None and window.owned_by(lease.token)
    assert await a.claim_many(lease, ["recovery@1"]) == {"recovery@1"}
    await a.record_many(lock_name, [record(f"plain@{i}", lease, at=time.time() - 60 + i) for i in range(5)])
    started = time.time() + 1  # not the intent's instant: the record's time index entry is another
    batch = [record("nightly@1", lease, at=started), record("recovery@1", lease, "error", at=started, error="x"),
             record("plain@9", lease, at=started)]
    for writer in (b, b, a):
        await writer.record_many(lock_name, batch)
        runs = await c.runs(lock_name, RunQuery(limit=100))
        keys = [r.key for r in runs]
        assert sorted(keys) == sorted({*keys}), keys
        assert set(keys) == {"nightly@1", "nightly@2", "recovery@1", "plain@9", *(f"plain@{i}" for i in range(5))}
        shown = {r.key: (r.claimed_at, r.result) for r in runs}
        assert shown["nightly@1"] == (pytest.approx(started), {"outcome": "ok"})
        assert shown["recovery@1"] == (pytest.approx(started), {"outcome": "error", "error": "x"})
        assert shown["nightly@2"][1] is None
        assert [r.key for r in await c.unfinished(lock_name, 10)] == ["nightly@2"]
        assert [r.key for r in await c.runs(lock_name, RunQuery(limit=100, outcome="error"))] == ["recovery@1"]


async def test_a_record_written_again_replaces_the_first(backend_url: str, make_backend: Factory,
                                                         lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    first = time.time() - 20
    await a.record_many(lock_name, [record("job@1", lease, "error", at=first), record("job@2", lease, at=first)])
    await b.record_many(lock_name, [record("job@1", lease, "ok", at=first + 1)])
    runs = await a.runs(lock_name, RunQuery(limit=100))
    assert [(r.key, r.result) for r in runs] == [("job@1", {"outcome": "ok"}), ("job@2", {"outcome": "ok"})]
    assert await a.runs(lock_name, RunQuery(limit=100, outcome="error")) == []


async def test_a_key_given_twice_in_one_batch_keeps_its_last_record(backend_url: str, make_backend: Factory,
                                                                    lock_name: str) -> None:
    """Out of key order, with a key twice (the last record wins, as written one at a time) and text that
    JSON escapes or that reads like a JSON null."""
    a = make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    at = time.time() - 20
    await a.record_many(lock_name, [record("zeta@1", lease, "error", at=at, note="null"),
                                    record("nœud@1", lease, at=at + 1, note='"quoted"\n'),
                                    record("alpha@1", lease, at=at + 2),
                                    record("zeta@1", lease, "ok", at=at + 3, value=None)])
    runs = {r.key: (r.claimed_at, r.result) for r in await a.runs(lock_name, RunQuery(limit=100))}
    assert runs == {"zeta@1": (pytest.approx(at + 3), {"outcome": "ok", "value": None}),
                    "nœud@1": (pytest.approx(at + 1), {"outcome": "ok", "note": '"quoted"\n'}),
                    "alpha@1": (pytest.approx(at + 2), {"outcome": "ok"})}


async def test_settings_are_shared(backend_url: str, make_backend: Factory, lock_name: str) -> None:
    a, b = make_backend(backend_url), make_backend(backend_url)
    await a.set_setting(lock_name, "paused:job", "1")
    assert await b.settings(lock_name) == {"paused:job": "1"}
    await b.set_setting(lock_name, "paused:job", None)
    assert await a.settings(lock_name) == {}


# -- outages ------------------------------------------------------------------------------------


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
    window = await b.claim_window(got, now_us() + US, now_us())
    assert window is not None and window.owned_by(got.token)


async def test_a_page_never_splits_an_instant_so_the_cursor_skips_nothing(backend_url: str, make_backend: Factory,
                                                                          lock_name: str) -> None:
    a = make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    base = time.time() - 50
    # five runs at one instant (the intents of one window share theirs), between older and newer ones
    batch = [record(f"old@{i}", lease, at=base + i) for i in range(3)]
    batch += [record(f"tie@{i}", lease, at=base + 10) for i in range(5)]
    batch += [record(f"new@{i}", lease, at=base + 20 + i) for i in range(2)]
    await a.record_many(lock_name, batch)
    seen: list[str] = []
    before: float | None = None
    for _ in range(10):
        page = await a.runs(lock_name, RunQuery(limit=3, before=before))
        if not page:
            break
        seen += [r.key for r in page]
        before = page[-1].claimed_at
    assert sorted(seen) == sorted(r.key for r in batch)  # every run once, none skipped at the tie
    assert len(seen) == len(set(seen))


async def test_a_claim_and_its_later_result_are_one_run_on_every_page(backend_url: str, make_backend: Factory,
                                                                      lock_name: str) -> None:
    """A claimed key whose result is stamped at another instant (older here) is one run in a paged listing,
    at its result's instant, whatever the page size: a page that ends between the claim's instant and the
    result's must not list the claim (the file backend did, then the result on a later page)."""
    a, b = make_backend(backend_url), make_backend(backend_url)
    lease = await a.acquire(lock_name, Holder("a"), TTL)
    assert lease is not None
    claimed = [f"claimed@{i}" for i in range(4)]
    assert await a.claim_many(lease, [*claimed, "open@1"]) == {*claimed, "open@1"}
    t = time.time() - 30
    tie = [record(k, lease, at=t) for k in claimed] + [record(f"tie@{i}", lease, at=t) for i in range(6)]
    others = [record(f"old@{i}", lease, at=t - 5 - i) for i in range(2)]
    others += [record(f"new@{i}", lease, at=t + 1 + i) for i in range(2)]
    await a.record_many(lock_name, [*tie[2:], *others[:2]])
    await b.record_many(lock_name, [*tie[:2], *others[2:]])  # an instance that claimed nothing
    expected = [*(r.key for r in [*tie, *others]), "open@1"]
    for limit in (1, 2, 5, 50):
        seen: list[tuple[str, float]] = []
        before: float | None = None
        for _ in range(50):
            page = await b.runs(lock_name, RunQuery(limit=limit, before=before))
            if not page:
                break
            seen += [(r.key, r.claimed_at) for r in page]
            before = page[-1].claimed_at
        assert sorted(key for key, _ in seen) == sorted(expected), f"limit {limit}: {seen}"
        assert all(abs(at - t) < 1e-5 for key, at in seen if key in claimed), f"limit {limit}: listed at its claim"
