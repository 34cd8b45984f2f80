"""RunRecorder's retries, on the simulator's virtual-time loop (deterministic, no waiting).

Both behaviours were found by the simulator (``loadtest/sim/README.md``,
findings ``finding-record-batch-raises`` and ``finding-flush-behind-backoff``):
a record lost, or still waiting when a leader hands its window over, makes
the next leader run a finished recoverable run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest.sim.cluster import HostTime
from loadtest.sim.history import WALL0
from loadtest.sim.loop import HostClock, SimLoop
from lock_backends import BackendUnavailable, Holder, Lease, RunRecord, Window
from lock_backends import clock as clocks
from node.app import Node
from node.claims import RECORD_SPACING, SURPRISE_ATTEMPTS, RunRecorder, WindowKeeper
from node.config import Settings
from node.jobs import JobRegistry


class Store:
    """``record_many`` that fails with the given exceptions first, then stores."""

    def __init__(self, failures: Sequence[BaseException]) -> None:
        self.failures = list(failures)
        self.stored: list[str] = []
        self.calls = 0
        self.sizes: list[int] = []

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        self.calls += 1
        self.sizes.append(len(records))
        await asyncio.sleep(0.001)
        if self.failures:
            raise self.failures.pop(0)
        self.stored.extend(r.key for r in records)


def on_virtual_time(main: Callable[[SimLoop], Awaitable[Any]]) -> Any:
    loop = SimLoop()
    try:
        with clocks.using(HostTime(loop, HostClock(WALL0))):
            return loop.run_until_complete(main(loop))
    finally:
        loop.close()


def record(key: str) -> RunRecord:
    return RunRecord(key, 1, "n0", WALL0, {"outcome": "ok"})


def test_a_passing_surprise_is_tried_again_and_a_lasting_one_dropped_and_counted() -> None:
    async def main(loop: SimLoop) -> tuple[list[str], list[int], list[str], list[int]]:
        passing = Store([RuntimeError("a client library hiccup")])
        dropped: list[int] = []
        recorder = RunRecorder(passing, "baton", op_timeout=0.5, on_dropped=dropped.append)  # type: ignore[arg-type]
        recorder.add(record("job@1"))
        await recorder.flush(5.0)
        lasting = Store([RuntimeError("refused")] * SURPRISE_ATTEMPTS)
        dropped_too: list[int] = []
        other = RunRecorder(lasting, "baton", op_timeout=0.5, on_dropped=dropped_too.append)  # type: ignore[arg-type]
        other.add(record("job@2"))
        await other.flush(5.0)
        other.add(record("job@3"))  # the queue goes on after a drop
        await other.flush(5.0)
        return passing.stored, dropped, lasting.stored, dropped_too

    stored, dropped, stored_too, dropped_too = on_virtual_time(main)
    assert stored == ["job@1"] and dropped == []
    assert stored_too == ["job@3"] and dropped_too == [1]


def test_a_backlog_goes_oldest_first_a_batch_at_a_time_and_a_waiter_learns_once_its_record_is_stored() -> None:
    """A queue longer than the batch is taken a batch at a time (a queue that fits is handed over whole), in
    order through a failed write put back; whoever waits for a record is answered after it is stored, not
    before, and whoever waits for one the store refuses for good, when it is dropped."""
    async def main(loop: SimLoop) -> tuple[Store, list[str], dict[str, bool], list[int], list[str]]:
        store = Store([BackendUnavailable("down")])
        recorder = RunRecorder(store, "baton", op_timeout=0.5)  # type: ignore[arg-type]
        recorder.batch = 300
        keys = [f"job-{i:04d}@1" for i in range(1000)]
        answered: dict[str, bool] = {}

        def note_answer(key: str, _: object) -> None:
            answered[key] = key in store.stored

        waits = []
        for i, key in enumerate(keys):
            if (waited := recorder.add(record(key), wait=i % 199 == 0)) is not None:
                waited.add_done_callback(functools.partial(note_answer, key))
                waits.append(waited)
        await asyncio.gather(*waits)
        assert await recorder.flush(5.0)
        refusing = Store([RuntimeError("refused")] * SURPRISE_ATTEMPTS)
        dropped: list[int] = []
        other = RunRecorder(refusing, "baton", op_timeout=0.5, on_dropped=dropped.append)  # type: ignore[arg-type]
        lost = other.add(record("refused@1"), wait=True)
        assert lost is not None
        await asyncio.wait_for(lost, 5.0)
        return store, keys, answered, dropped, refusing.stored

    store, keys, answered, dropped, refused_stored = on_virtual_time(main)
    assert store.stored == keys  # each once, oldest first
    assert store.sizes[:3] == [300, 150, 300]  # the failed batch put back, half of it, then the batch regrown
    assert answered == {key: True for key in keys[::199]}
    assert dropped == [1] and refused_stored == []


def test_unwritten_names_every_record_not_known_stored_queued_in_a_write_or_put_back() -> None:
    """What a recovery skips (``GatedScheduler._recover``): a record is unwritten from ``add`` until its write
    is answered, including while the write is on its way and after a failed write put it back."""
    class Peeking(Store):
        """Notes what the recorder calls unwritten while each write is on its way."""

        peek: Callable[[], set[str]]
        during: list[set[str]] = []

        async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
            self.during.append(self.peek())
            await super().record_many(name, records)

    async def main(loop: SimLoop) -> tuple[set[str], list[set[str]], set[str]]:
        store = Peeking([BackendUnavailable("down")])
        recorder = RunRecorder(store, "baton", op_timeout=0.5)  # type: ignore[arg-type]
        store.peek = recorder.unwritten
        recorder.add(record("a@1"))
        recorder.add(record("b@1"))
        queued = recorder.unwritten()
        assert await recorder.flush(5.0)
        return queued, store.during, recorder.unwritten()

    queued, during, after = on_virtual_time(main)
    assert queued == {"a@1", "b@1"}
    assert during == [{"a@1", "b@1"}] * 2  # in the failed write, then put back and in the next one
    assert after == set()


def test_a_flush_wakes_a_writer_waiting_out_its_backoff() -> None:
    async def main(loop: SimLoop) -> tuple[bool, float, list[str]]:
        store = Store([BackendUnavailable("down")] * 7)  # backoff 0.02, 0.04 ... 1.28 s after the 7th failure
        recorder = RunRecorder(store, "baton", op_timeout=0.5)  # type: ignore[arg-type]
        recorder.add(record("job@1"))
        await asyncio.sleep(1.6)  # 7 failures (each after a 20 ms linger), backoffs of 0.02 to 0.64 s in between
        assert store.calls == 7  # the writer now sleeps out a backoff of 1.28 s
        t0 = loop.now
        done = await recorder.flush(0.3)
        return done, loop.now - t0, store.stored

    done, took, stored = on_virtual_time(main)
    assert done and stored == ["job@1"] and took < 0.1


def test_records_cost_a_bounded_number_of_writes_however_many_runs_finish() -> None:
    """A thousand runs finishing over two seconds share a write per spacing, not one per linger (ops per second
    independent of the job count, issue #14); a record someone waits for, or one written while the leadership
    hands over, goes after the linger alone."""
    async def main(loop: SimLoop) -> tuple[int, int, float]:
        store = Store([])
        handing_over = False
        recorder = RunRecorder(store, "baton", op_timeout=0.5, prompt=lambda: handing_over)  # type: ignore[arg-type]
        for i in range(1000):
            recorder.add(record(f"job-{i}@1"))
            await asyncio.sleep(0.002)
        await recorder.flush(5.0)
        writes = store.calls
        recorder.add(record("job-a@2"))
        await asyncio.sleep(0.05)  # that record's write has started: the next one is at least a spacing away
        t0 = loop.now
        waited = recorder.add(record("manual@3"), wait=True)
        assert waited is not None
        await waited
        manual_took = loop.now - t0
        handing_over = True  # a leadership handing over: the next leader waits on these records
        recorder.add(record("handed-over@4"))
        await asyncio.sleep(RECORD_SPACING / 2)
        assert "handed-over@4" in store.stored
        return writes, len(store.stored), manual_took

    writes, stored, manual_took = on_virtual_time(main)
    assert stored == 1003
    assert writes <= 2.0 / RECORD_SPACING + 2, writes
    assert manual_took < RECORD_SPACING / 2


async def test_record_writes_are_spaced_on_the_stores_that_batch_them(tmp_path: Path) -> None:
    """Where one operation carries a batch of records (Redis, PostgreSQL, etcd's segments, and the in-memory store
    that stands for them) record writes are spaced; the file backend has no server to spare, so spacing would only
    lengthen its writer thread's hold on the GIL (registry: batched_records). No server is needed to build a
    node."""
    spacing = {}
    for kind, url in (("file", f"file://{tmp_path}"), ("memory", "memory://spacing"), ("etcd", "etcd://127.0.0.1:9")):
        node = Node(Settings(node_id="n", lock_url=url, demo_jobs=False), JobRegistry())
        spacing[kind] = node.scheduler.recorder.spacing
        await node.backend.close()
    assert spacing == {"file": 0.0, "memory": RECORD_SPACING, "etcd": RECORD_SPACING}


class SerialStore:
    """A store that applies one operation after another, as etcd's log does: a claim sent while a record write is
    being applied waits for it. A write spends 70 ms on the way in (a megabyte sent and parsed, nothing held), then
    is applied in 10 ms; every 16th is applied in 90 ms (a slow fsync). A claim alone takes 2 ms."""

    def __init__(self) -> None:
        self.applying = asyncio.Lock()
        self.writes = 0

    async def claim_mark(self, name: str) -> Window:
        return Window(0, 0, 0)

    async def claim_window(self, lease: Lease, until_us: int, start_us: int, intents: Sequence[str]) -> Window:
        async with self.applying:
            await asyncio.sleep(0.002)
            return Window(lease.token, start_us, until_us)

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        self.writes += 1
        await asyncio.sleep(0.07)
        async with self.applying:
            await asyncio.sleep(0.09 if self.writes % 16 == 0 else 0.01)


def test_the_claim_window_does_not_run_out_behind_a_record_write() -> None:
    """The lead covers the node's own record writes, not only its claims. Sized to the claims alone, it fell back
    to 0.1 s (a refill 50 ms before the end) between the rare claims that queued behind a slow write, and the
    window ran out behind the next one: fire times waited for it (etcd at 10,000 runs a second: p99 lag 13 ms,
    one run in a hundred 93 ms late)."""
    async def main(loop: SimLoop) -> tuple[int, int, int]:
        store = SerialStore()
        lease = Lease("baton", Holder("n0"), 1, 60.0, clocks.monotonic() + 60.0)
        keeper = WindowKeeper(store, max_lead=0.25, current_lease=lambda: lease,  # type: ignore[arg-type]
                              intents=lambda lo, hi: [], next_fire=lambda: int(clocks.time() * 1e6) + 1_000)
        recorder = RunRecorder(store, "baton", op_timeout=5.0, on_round_trip=keeper.observe)  # type: ignore[arg-type]
        await keeper.open(lease)
        keeper.start()
        looks = uncovered = 0
        for i in range(6_000):  # a fire time every 5 ms for 30 s, each finished run recorded
            await asyncio.sleep(0.005)
            recorder.add(record(f"job-{i}@1"))
            if i >= 100:  # after the first write: the lead learns it from the recorder
                looks += 1
                window = keeper.window
                uncovered += window is None or window.until_us <= int(clocks.time() * 1e6)
        await keeper.stop()
        await recorder.flush(5.0)
        return looks, uncovered, store.writes

    looks, uncovered, writes = on_virtual_time(main)
    assert looks == 5_900 and writes >= 64  # four slow applies at least
    assert uncovered == 0, f"{uncovered} of {looks} fire times found the window run out"


async def test_a_node_tells_its_claim_window_how_long_its_record_writes_take() -> None:
    node = Node(Settings(node_id="n", lock_url="memory://round-trips", demo_jobs=False), JobRegistry())
    assert node.scheduler.recorder.on_round_trip == node.scheduler.keeper.observe
    await node.backend.close()


class SlowStore(Store):
    """``record_many`` whose answer takes ``delay`` seconds: the batch is in flight all that while."""

    def __init__(self, delay: float) -> None:
        super().__init__([])
        self.delay = delay

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        await asyncio.sleep(self.delay)
        await super().record_many(name, records)


def test_a_flush_says_records_are_left_while_their_write_is_unanswered() -> None:
    """The queue is empty once a batch is taken, but the batch is not stored until its write is answered: a flush
    that times out in between must not report every record written (its callers hand a leadership over on it)."""
    async def main(loop: SimLoop) -> tuple[bool, list[str], bool, list[str]]:
        store = SlowStore(delay=2.0)
        recorder = RunRecorder(store, "baton", op_timeout=0.5)  # type: ignore[arg-type]
        recorder.add(record("job@1"))
        early = await recorder.flush(0.5)  # the write has started and waits on its answer
        stored_early = list(store.stored)
        late = await recorder.flush(5.0)
        return early, stored_early, late, store.stored

    early, stored_early, late, stored = on_virtual_time(main)
    assert (early, stored_early) == (False, [])
    assert (late, stored) == (True, ["job@1"])


class RecordsDown:
    """The in-memory store, its record writes refused until ``up_at`` (monotonic); operations noted in order."""

    def __init__(self, inner: Any, up_at: float) -> None:
        self.inner = inner
        self.up_at = up_at
        self.ops: list[str] = []

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        if clocks.monotonic() < self.up_at:
            raise BackendUnavailable("restarting")
        await self.inner.record_many(name, records)
        self.ops.append("record_many")

    async def hand_back(self, *args: Any) -> Window | None:
        self.ops.append("hand_back")
        window: Window | None = await self.inner.hand_back(*args)
        return window

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_hand_back_waits_out_a_store_restart_for_the_records_of_runs_that_ended() -> None:
    """A leader steps down while its store restarts, with a finished run's record still queued: the window goes
    back only once that record is stored. Before, one flush was tried and the hand-back went on without it, so
    the next leader found the run's intent without a result and recovered it: a recoverable run started twice
    (failover suite, etcd, a store restart just after a fire time)."""
    async def main(loop: SimLoop) -> list[str]:
        node = Node(Settings(node_id="n0", lock_url="memory://hand-back-restart", demo_jobs=False), JobRegistry())
        scheduler = node.scheduler
        lease = await node.backend.acquire(scheduler.recorder.lock_name, Holder("n0"), 10.0)
        assert lease is not None
        await node.backend.claim_window(lease, int((clocks.time() + 5) * 1e6), int(clocks.time() * 1e6), [])
        store = RecordsDown(node.backend, up_at=clocks.monotonic() + 2.0)  # longer than a flush's timeout
        scheduler.backend = scheduler.recorder.backend = store
        scheduler.recorder.add(record("recover-000@1"))
        await scheduler._hand_back(lease, int(clocks.time() * 1e6), retry_until=clocks.monotonic() + 10.0)
        return store.ops

    assert on_virtual_time(main) == ["record_many", "hand_back"]


def test_a_hand_back_past_its_attempts_takes_the_intents_of_runs_that_ended_with_it() -> None:
    """The store refuses records for longer than the hand-back's attempts, and the window goes without the record
    of a run that ended: the run's intent goes with it, so the next leader does not find it unfinished and run it
    again. Before, the intent stayed, and a recoverable run started twice (the simulator's strict recovery rule)."""
    async def main(loop: SimLoop) -> tuple[list[str], list[str], list[str]]:
        node = Node(Settings(node_id="n0", lock_url="memory://hand-back-past-attempts", demo_jobs=False),
                    JobRegistry())
        scheduler = node.scheduler
        name = scheduler.recorder.lock_name
        lease = await node.backend.acquire(name, Holder("n0"), 10.0)
        assert lease is not None and lease.token == record("x").token
        now_us = int(clocks.time() * 1e6)
        ended, going = "recover-000@1", "recover-000@2"
        await node.backend.claim_window(lease, now_us + 5_000_000, now_us, [ended, going])
        store = RecordsDown(node.backend, up_at=clocks.monotonic() + 30.0)
        scheduler.backend = scheduler.recorder.backend = store
        scheduler.recorder.add(record(ended))
        await scheduler._hand_back(lease, now_us + 5_000_000, retry_until=clocks.monotonic() + 3.0)
        open_keys = sorted(r.key for r in await node.backend.unfinished(name, 10))
        written_before = [op for op in store.ops if op == "record_many"]
        await scheduler.recorder.flush(60.0)  # the store back: the record lands after all
        return open_keys, written_before, [r.key for r in await node.backend.unfinished(name, 10)]

    open_keys, written_before, open_after = on_virtual_time(main)
    assert written_before == []
    assert open_keys == ["recover-000@2"]  # the run not ended stays the next leader's to recover
    assert open_after == ["recover-000@2"]


def test_a_flush_starts_a_writer_when_the_one_it_finds_has_ended_with_records_queued() -> None:
    """Nothing in the node cancels the writer, but a flush must not depend on that: with records queued and the
    writer gone, it starts one and the records are written. Before, it awaited the ended writer (a cancelled
    one raised its CancelledError into the hand-back) and left the records queued."""
    async def main(loop: SimLoop) -> tuple[bool, list[str]]:
        store = Store([])
        recorder = RunRecorder(store, "baton", op_timeout=0.5)  # type: ignore[arg-type]
        recorder.add(record("job@1"))
        writer = recorder._writer
        assert writer is not None
        writer.cancel()  # in its linger, before it took the record
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        return await recorder.flush(5.0), store.stored

    assert on_virtual_time(main) == (True, ["job@1"])


def test_a_writer_cancelled_in_the_middle_of_a_write_leaves_its_batch_to_the_next() -> None:
    """A writer cancelled while its batch is in the store's hands does not know it stored: the batch goes back to
    the queue, and the next writer (a flush starts one) writes it; a waiter is answered once it is stored. Before,
    the batch was forgotten and a flush answered that nothing was left: records lost without a count."""
    async def main(loop: SimLoop) -> tuple[set[str], bool, list[str], bool]:
        store = SlowStore(1.0)
        recorder = RunRecorder(store, "baton", op_timeout=5.0, spacing=0.0)  # type: ignore[arg-type]
        recorder.add(record("job@1"))
        waited = recorder.add(record("job@2"), wait=True)
        assert waited is not None
        await asyncio.sleep(0.5)  # past the linger: both records are in the write
        assert recorder._in_flight and not store.stored
        writer = recorder._writer
        assert writer is not None
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        unwritten = recorder.unwritten()
        left = await recorder.flush(5.0)
        return unwritten, left, sorted(store.stored), waited.done()

    unwritten, left, stored, answered = on_virtual_time(main)
    assert unwritten == {"job@1", "job@2"}
    assert left and stored == ["job@1", "job@2"] and answered


async def _cancel_writer_when(loop: SimLoop, recorder: RunRecorder, moment: Callable[[], bool]) -> None:
    """Look after every callback the writer runs until ``moment()``, then cancel the writer and let it end.

    The moments looked for last one round of the loop (the writer yields with
    ``sleep(0)`` between slices), so this waits with ``sleep(0)`` while
    callbacks are ready at this instant, and moves to the next timer only
    when none is: its own wake-up then comes after that timer's callback.
    """
    for _ in range(100_000):
        if moment():
            break
        ready, timers = loop._ready, loop._scheduled  # type: ignore[attr-defined]  # the loop's queues, peeked
        await asyncio.sleep(0 if ready or not timers else timers[0][0] - loop.now)
    else:
        raise AssertionError("the writer never reached the moment to cancel it at")
    writer = recorder._writer
    assert writer is not None and not writer.done()
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer


def test_a_writer_cancelled_while_taking_a_batch_puts_what_it_took_back_in_order() -> None:
    """A batch bigger than a slice is taken a slice at a time, yielding in between: a writer cancelled there holds
    records that are in neither the queue nor a write. They go back to the head of the queue, in their order, and
    the next writer stores every record once, oldest first."""
    keys = [f"job@{i}" for i in range(1200)]  # over the batch (500), so the take yields after each slice

    async def main(loop: SimLoop) -> tuple[int, set[str], bool, list[str], int]:
        store = Store([])
        recorder = RunRecorder(store, "baton", op_timeout=5.0, spacing=0.0)  # type: ignore[arg-type]
        for key in keys:
            recorder.add(record(key))
        await _cancel_writer_when(loop, recorder, lambda: 0 < len(recorder._in_flight) < recorder.batch)
        taken_when_cancelled = len(store.stored)
        unwritten = recorder.unwritten()
        left = await recorder.flush(5.0)
        return taken_when_cancelled, unwritten, left, store.stored, len(recorder._in_flight)

    stored_before, unwritten, left, stored, in_flight = on_virtual_time(main)
    assert stored_before == 0 and unwritten == set(keys)
    assert left and stored == keys and in_flight == 0


def test_a_writer_cancelled_while_letting_go_of_a_stored_batch_answers_its_waiters() -> None:
    """Letting go of a stored batch yields between slices; a writer cancelled there has stored the records its
    waiters wait for. They are answered at once, and nothing is written again. Before, a waiter on the batch's
    tail was never answered: a manual run waiting on its record would wait out its own timeout."""
    keys = [f"job@{i}" for i in range(400)]  # two slices of the batch to let go of

    async def main(loop: SimLoop) -> tuple[bool, bool, int, list[str], set[str]]:
        store = Store([])
        recorder = RunRecorder(store, "baton", op_timeout=5.0, spacing=0.0)  # type: ignore[arg-type]
        for key in keys[:-1]:
            recorder.add(record(key))
        waited = recorder.add(record(keys[-1]), wait=True)
        assert waited is not None
        await _cancel_writer_when(loop, recorder, lambda: len(store.stored) == len(keys) and not waited.done())
        answered = waited.done()
        left = await recorder.flush(5.0)
        return answered, left, store.calls, store.stored, recorder.unwritten()

    answered, left, calls, stored, unwritten = on_virtual_time(main)
    assert answered, "the waiter on a stored record was left waiting"
    assert left and calls == 1 and stored == keys and unwritten == set()
