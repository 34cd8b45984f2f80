"""The file backend's lease log: no process holds a lock its peers need, so a stopped one holds nobody back.

Real files and real processes: the holder is a child process renewing back to
back, stopped with SIGSTOP wherever it happens to be, over and over; and the
compare-and-swap underneath is driven into its two races (a writer that read an
old version, and one whose version name was pruned meanwhile) directly. Then
what the claim windows, the run records and garbage in the directory do to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from lock_backends import (
    BackendUnavailable,
    BusyRun,
    CorruptValue,
    Holder,
    Lease,
    LockBackendError,
    RunQuery,
    RunRecord,
)
from lock_backends import file_records as records
from lock_backends.file import KEEP_VERSIONS, FileBackend, LeaseVersion
from lock_backends.memory import MemoryBackend, drop_store
from tests.conftest import TTL, eventually
from tests.test_sigstop import read_line

ROOT = os.path.dirname(os.path.dirname(__file__))
#: One worker runs this file (``--dist loadgroup``): the week of runs is written once, for every test that reads it.
pytestmark = pytest.mark.xdist_group("test_file_backend")
T = TypeVar("T")
R = TypeVar("R")
US = 1_000_000


def backend(path: Path, query: str = "timeout=2") -> FileBackend:
    return FileBackend.from_url(f"file://{path}?{query}")


def counting(calls: list[T], real: Callable[[T], R]) -> Callable[[T], R]:
    """``real``, noting each argument it is called with."""

    def call(arg: T) -> R:
        calls.append(arg)
        return real(arg)

    return call


def now_us() -> int:
    return int(time.time() * US)


def run(key: str, lease: Lease | None = None, at: float | None = None, outcome: str = "ok") -> RunRecord:
    return RunRecord(key, lease.token if lease else 1, lease.holder.node_id if lease else "n",
                     time.time() if at is None else at, {"outcome": outcome})


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[Callable[..., FileBackend]]:
    made: list[FileBackend] = []

    def make(query: str = "timeout=2") -> FileBackend:
        made.append(backend(tmp_path, query))
        return made[-1]

    yield make
    for b in made:
        await b.close()


async def holder_then_successor(tmp_path: Path, name: str) -> tuple[FileBackend, FileBackend, Lease, Lease,
                                                                     int, LeaseVersion]:
    """a takes a short lease and reads its version; the lease lapses; b wins. What a stopped a saw, too."""
    a, b = backend(tmp_path), backend(tmp_path)
    lease = await a.acquire(name, Holder("a"), 0.3)
    assert lease is not None
    version, record = a._latest(tmp_path / name)
    assert record is not None
    await asyncio.sleep(0.4)
    won = await b.acquire(name, Holder("b"), TTL)
    assert won is not None and won.token == lease.token + 1
    return a, b, lease, won, version, record


# -- the lease log ------------------------------------------------------------------------------


async def test_a_holder_stopped_mid_change_holds_nobody_back(tmp_path: Path) -> None:
    """With a mutex, a holder stopped inside it stalled every peer until SIGCONT; now a peer waits one TTL."""
    contender = backend(tmp_path)
    waits: list[float] = []
    try:
        for round_ in range(6):
            name = f"stop-{round_}"
            proc = subprocess.Popen([sys.executable, "-m", "tests.holder_child", f"file://{tmp_path}", name,
                                     str(TTL), "busy"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    cwd=ROOT)
            try:
                first = await asyncio.to_thread(read_line, proc, 30)
                assert first.startswith("token "), first
                await asyncio.sleep(0.2 + 0.05 * round_)  # renewing back to back by now
                os.kill(proc.pid, signal.SIGSTOP)
                lease, waited = await eventually(f"round {round_}: the contender acquires",
                                                 functools.partial(contender.acquire, name, Holder("contender"), TTL),
                                                 within=TTL * 1.5 + 1.0, every=0.02)
                assert lease.token > int(first.split()[1])
                waits.append(waited)
                os.kill(proc.pid, signal.SIGCONT)
                await asyncio.sleep(0.2)  # the woken holder renews against a lease it lost
                holder = await contender.leader(name)
                assert holder == Holder("contender"), f"round {round_}: the woken holder took the lease back"
            finally:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
    finally:
        await contender.close()
    assert max(waits) < TTL * 1.5 + 1.0, waits


async def test_a_writer_that_read_an_old_version_loses_the_swap(tmp_path: Path) -> None:
    a, b, lease, won, version, record = await holder_then_successor(tmp_path, "cas")
    directory = tmp_path / "cas"
    try:
        # a wakes with what it read before and tries to renew (or move the mark) on top of it
        assert a._swap(directory, version, dataclasses.replace(record, expires=time.monotonic() + TTL)) is False
        assert await a.leader("cas") == Holder("b")
        assert await a.renew(lease) is None
        assert await a.claim_window(lease, now_us() + US, now_us()) is None
        assert await b.claim(won, "k") is True and await a.claim(lease, "k2") is False
    finally:
        await a.close()
        await b.close()


async def test_a_write_that_lands_on_a_pruned_version_is_not_taken_for_the_lease(tmp_path: Path) -> None:
    a, b, _, won, version, record = await holder_then_successor(tmp_path, "pruned")
    directory = tmp_path / "pruned"
    try:
        for _ in range(KEEP_VERSIONS + 2):  # b renews until a's next version name has been pruned
            renewed = await b.renew(won)
            assert renewed is not None
            won = renewed
        assert not (directory / f"lease.{version + 1}").exists()
        assert a._swap(directory, version, dataclasses.replace(record, expires=time.monotonic() + TTL)) is False
        assert await a.leader("pruned") == Holder("b")
        versions = sorted(a._versions(directory))
        assert len(versions) <= KEEP_VERSIONS + 1, versions  # old versions do not pile up
    finally:
        await a.close()
        await b.close()


# -- claim windows ------------------------------------------------------------------------------


async def test_the_mark_lives_in_the_lease_record_and_survives_renew_release_and_acquire(
        files: Callable[..., FileBackend], tmp_path: Path) -> None:
    a, b = files(), files()
    lease = await a.acquire("m", Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    window = await a.claim_window(lease, start + US, start)
    assert window is not None and window.owned_by(lease.token)
    renewed = await a.renew(lease)
    assert renewed is not None
    assert a._latest(tmp_path / "m")[1].mark == window  # type: ignore[union-attr]
    await a.release(renewed)
    new = await b.acquire("m", Holder("b"), TTL)
    assert new is not None
    _, record = b._latest(tmp_path / "m")
    assert record is not None and record.token == new.token and record.mark == window
    theirs = await b.claim_window(new, start + 2 * US, start)
    assert theirs is not None and theirs.owned_by(new.token) and theirs.since_us == start + US


async def test_renew_and_claim_window_of_one_holder_never_fail_each_other(
        files: Callable[..., FileBackend]) -> None:
    """The elector renews while the scheduler claims, back to back: neither may make the other fail."""
    a = files()
    first = await a.acquire("race", Holder("a"), TTL)
    assert first is not None
    lease: Lease = first
    start = now_us()

    async def renewing() -> None:
        nonlocal lease
        for _ in range(40):
            renewed = await a.renew(lease)
            assert renewed is not None, "a renew lost to a claim_window of the same holder"
            lease = renewed

    async def claiming() -> None:
        for i in range(1, 41):
            window = await a.claim_window(lease, start + i * US, start)
            assert window is not None and window.owned_by(lease.token) and window.until_us == start + i * US

    await asyncio.gather(renewing(), claiming())


async def test_a_swap_lost_to_a_racing_renew_is_tried_again(files: Callable[..., FileBackend], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    a = files()
    lease = await a.acquire("again", Holder("a"), TTL)
    assert lease is not None
    real_swap = FileBackend._swap
    raced: list[int] = []

    def racing_swap(self: FileBackend, directory: Path, version: int, record: LeaseVersion) -> bool:
        if record.mark is not None and not raced:  # a renew of the same lease lands first
            _, current = self._latest(directory)
            assert current is not None
            raced.append(version)
            assert real_swap(self, directory, version, dataclasses.replace(current, expires=time.monotonic() + TTL))
        return real_swap(self, directory, version, record)

    monkeypatch.setattr(FileBackend, "_swap", racing_swap)
    start = now_us()
    window = await a.claim_window(lease, start + US, start, intents=["n@1"])
    assert raced and window is not None and window.owned_by(lease.token)
    assert a._latest(tmp_path / "again")[1].mark == window  # type: ignore[union-attr]
    raced.clear()
    back = await a.hand_back(lease, start + US // 2)
    assert raced and back is not None and back.sealed and back.until_us == start + US // 2
    assert {r.key for r in await a.unfinished("again", 10)} == {"n@1"}


async def test_intents_are_durable_before_the_swap_and_removed_if_no_swap_made_the_window(
        files: Callable[..., FileBackend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = files()
    lease = await a.acquire("i", Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    seen: list[list[str]] = []
    real_swap = FileBackend._swap

    def losing_swap(self: FileBackend, directory: Path, version: int, record: LeaseVersion) -> bool:
        seen.append(sorted(os.listdir(directory / "intents")))  # written before the swap
        return False

    monkeypatch.setattr(FileBackend, "_swap", losing_swap)
    with pytest.raises(BackendUnavailable):
        await a.claim_window(lease, start + US, start, intents=["n@1", "n@2"])
    assert seen and all(names == ["n%401", "n%402"] for names in seen)
    assert os.listdir(tmp_path / "i" / "intents") == []  # no window, no intents
    assert await a.unfinished("i", 10) == []
    monkeypatch.setattr(FileBackend, "_swap", real_swap)
    window = await a.claim_window(lease, start + US, start, intents=["n@1", "n@2"])
    assert window is not None and window.owned_by(lease.token)
    assert {r.key for r in await a.unfinished("i", 10)} == {"n@1", "n@2"}
    # one file for the whole window: every intent is a link to it
    stats = {os.stat(tmp_path / "i" / "intents" / n).st_ino for n in os.listdir(tmp_path / "i" / "intents")}
    assert len(stats) == 1


async def test_hand_back_refused_leaves_no_busy_entry_behind(files: Callable[..., FileBackend],
                                                             tmp_path: Path) -> None:
    a, b = files(), files()
    old = await a.acquire("h", Holder("a"), 0.3)
    assert old is not None
    start = now_us()
    assert await a.claim_window(old, start + US, start) is not None
    await asyncio.sleep(0.4)
    new = await b.acquire("h", Holder("b"), TTL)
    assert new is not None and await b.claim_window(new, start + 2 * US, start) is not None
    busy = [BusyRun("x@1", "x", "a", old.token, now_us() + 60 * US)]
    assert await a.hand_back(old, start, busy=busy) is None
    assert os.listdir(tmp_path / "h" / "busy") == []


# -- claims and records: fast, durable, bounded ---------------------------------------------------


async def test_claim_many_of_150_keys_is_one_file_and_two_fsyncs(files: Callable[..., FileBackend],
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a = files()
    lease = await a.acquire("c", Holder("a"), TTL)
    assert lease is not None
    await a.claim(lease, "warm-up")  # the first call of a name also prunes; not what is counted here
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", counting(fsyncs, real_fsync))
    started = time.monotonic()
    claimed = await a.claim_many(lease, [f"job@{i}" for i in range(150)])
    took = time.monotonic() - started
    assert claimed == {f"job@{i}" for i in range(150)}
    assert len(fsyncs) == 2, fsyncs  # the shared file, then the directory
    assert took < 0.4, took
    names = [n for n in os.listdir(tmp_path / "c" / "claims") if n.startswith("job")]
    assert len(names) == 150 and not [n for n in os.listdir(tmp_path / "c" / "claims") if n.startswith(".")]
    assert await a.claim_many(lease, [f"job@{i}" for i in range(150)]) == claimed  # idempotent


async def test_a_5000_record_batch_is_one_file_and_clears_intents_and_busy_runs(
        files: Callable[..., FileBackend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = files()
    lease = await a.acquire("r", Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    assert await a.claim_window(lease, start + US, start, intents=["job@1", "job@2"]) is not None
    await a.hand_back(lease, start + US, busy=[BusyRun("job@2", "job", "a", lease.token, now_us() + 60 * US)])
    await a.record_many("r", [run("warm-up", lease)])
    base = time.time() - 3600
    batch = [run(f"job@{i}", lease, at=base + i * 0.5) for i in range(5000)]
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", counting(fsyncs, real_fsync))
    started = time.monotonic()
    await a.record_many("r", batch)
    took = time.monotonic() - started
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert took < 1.0, took
    assert len(fsyncs) <= 5, fsyncs  # the batch, its hour's directory, done/ and intents/
    batches = [p for p in (tmp_path / "r" / "records").rglob("*.jsonl")]
    assert len(batches) == 2  # the warm-up's and this one
    assert await a.unfinished("r", 10) == []
    assert os.listdir(tmp_path / "r" / "busy") == []
    page = await a.runs("r", RunQuery(limit=3))
    assert [r.key for r in page] == ["warm-up", "job@4999", "job@4998"]


@pytest.fixture(scope="module")
def a_week_of_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[RunRecord]]]:
    """20,160 runs of one 30 s job under lock name ``w``, each recorded on its own, as the leader writes them.

    Made once for the tests that read them, the last ones by ``record_many`` and the rest, for speed, by
    writing the same files directly, in memory (``/dev/shm``) where there is one: 20,000 file creations
    take half a minute on a busy disk. The lock directory (leases, other names) stays on the disk.
    """
    root = tmp_path_factory.mktemp("week")
    shm = Path("/dev/shm")
    store = Path(tempfile.mkdtemp(prefix="baton-week-", dir=shm)) if os.access(shm, os.W_OK) else root / "w-store"
    (root / "w").symlink_to(store, target_is_directory=True)
    for sub in records.SUBDIRS:
        (root / "w" / sub).mkdir(parents=True, exist_ok=True)
    base = time.time() - 20_160 * 30
    runs = [RunRecord(f"tick@{i}", 1, "n", base + i * 30, {"outcome": "error" if i % 7 == 0 else "ok"})
            for i in range(20_160)]
    for r in runs[:-10]:
        stamp = int(r.claimed_at * US)
        hour = root / "w" / "records" / str(stamp // records.HOUR_US)
        hour.mkdir(exist_ok=True)
        (hour / f"{stamp}-{stamp}-{time.time_ns()}-000000.jsonl").write_bytes(records.encode_records([r]))
    for r in runs[-10:]:
        records.write_records(root / "w", [r], records.encode_records([r]))
    yield root, runs
    shutil.rmtree(store, ignore_errors=True)


async def test_a_listing_over_20000_records_reads_what_the_page_needs(
        a_week_of_runs: tuple[Path, list[RunRecord]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, runs = a_week_of_runs
    a = backend(root)
    opened: list[Path] = []
    real_lines = records._lines
    monkeypatch.setattr(records, "_lines", counting(opened, real_lines))
    started = time.monotonic()
    newest = await a.runs("w", RunQuery(limit=1))
    took = time.monotonic() - started
    assert [r.key for r in newest] == ["tick@20159"]
    assert took < 0.2, took
    assert len(opened) <= 2, opened
    opened.clear()
    page = await a.runs("w", RunQuery(limit=50, before=runs[10_000].claimed_at))
    assert [r.key for r in page] == [f"tick@{i}" for i in range(9_999, 9_949, -1)]
    assert len(opened) <= 51
    errors = await a.runs("w", RunQuery(limit=3, outcome="error"))
    assert [r.key for r in errors] == ["tick@20153", "tick@20146", "tick@20139"]
    # a filter that matches nothing stops at the scan cap, not at the retention
    started = time.monotonic()
    assert await a.runs("w", RunQuery(limit=10, job="nothing")) == []
    assert time.monotonic() - started < 2.0
    await a.close()


async def test_64_listings_at_once_never_delay_a_renewal(a_week_of_runs: tuple[Path, list[RunRecord]]) -> None:
    """Issue #17.1: the listings once ran on the pool the renewals used, and the leader stepped down."""
    node = backend(a_week_of_runs[0], "timeout=1")
    first = await node.acquire("lead", Holder("leader"), 1.0)  # on the disk, beside the listed runs
    assert first is not None
    lease: Lease = first
    delays: list[float] = []
    stop = asyncio.Event()

    async def renewing() -> None:
        nonlocal lease
        while not stop.is_set():
            started = time.monotonic()
            renewed = await node.renew(lease)
            delays.append(time.monotonic() - started)
            assert renewed is not None, "the lease was lost"
            lease = renewed
            await asyncio.sleep(0.1)

    answered: list[object] = []

    async def listing() -> None:
        # the 64 GET /runs?limit=1, and a few listings whose filter makes them scan their cap
        while not stop.is_set():
            queries = [RunQuery(limit=1)] * 64 + [RunQuery(limit=10, job="nothing")] * 8
            answered.extend(await asyncio.gather(*(node.runs("w", q) for q in queries), return_exceptions=True))

    writes: list[float] = []

    async def claiming_and_recording(first: int, count: int, into: list[float]) -> None:
        for i in range(first, first + count):
            started = time.monotonic()
            assert await node.claim(lease, f"manual@{i}") is True
            await node.record_many("lead", [run(f"manual@{i}", lease)])
            into.append(time.monotonic() - started)
            await asyncio.sleep(0.2)

    renewer = asyncio.create_task(renewing())
    # what a claim and a record cost on this machine now, with no listing going on
    alone: list[float] = []
    try:
        await claiming_and_recording(100, 3, alone)
    except BaseException:
        stop.set()
        await asyncio.gather(renewer, return_exceptions=True)
        await node.close()
        raise
    # queued behind a batch of listings they would take as long as the batch; beside them, not much longer
    # than alone (0.5 s and 0.3 s: the bounds on an idle machine, where they take about 20 and 5 ms)
    bound = max(0.5, 10 * max(alone))
    renew_bound = max(0.3, 10 * max(delays))
    lister = asyncio.create_task(listing())
    try:
        await claiming_and_recording(0, 10, writes)  # the leader's other work goes on too
        await asyncio.sleep(max(0.0, 3.0 - sum(writes) - 2.0))
        stop.set()
        await asyncio.gather(renewer, lister)
    finally:
        await node.close()
    assert max(writes) < bound, (sorted(writes), alone)
    listed = sum(isinstance(x, list) for x in answered)
    print(f"renewals: {len(delays)}, slowest {max(delays):.3f}s; listings answered {listed}, "
          f"timed out {len(answered) - listed}")
    assert listed >= 64  # the listings did run, alongside
    assert len(delays) >= 10
    assert max(delays) < renew_bound, sorted(delays)[-5:]


async def test_listings_and_pages_agree_with_the_reference_backend(files: Callable[..., FileBackend]) -> None:
    rng = random.Random(17)
    mem = MemoryBackend.from_url("memory://file-listing-reference")
    try:
        a = files()
        now = time.time()
        keys = [f"{rng.choice(['a', 'b', 'c'])}@{i}" for i in range(600)]
        all_runs = [RunRecord(k, 1, "n", now - rng.uniform(0, 4 * 86400),
                              {"outcome": rng.choice(["ok", "ok", "error"])}) for k in keys]
        for i in range(0, len(all_runs), 37):  # batches spanning days: their hours overlap
            chunk = all_runs[i:i + 37]
            for backend_ in (mem, a):
                await backend_.record_many("ref", chunk)
        await a.record_many("ref", all_runs[100:110])  # a retry: the same records again, in another batch
        for query in (RunQuery(limit=7), RunQuery(limit=20, job="b"), RunQuery(limit=15, outcome="error"),
                      RunQuery(limit=9, job="c", outcome="ok", since=now - 2 * 86400)):
            cursor: float | None = None
            for _ in range(200):
                q = dataclasses.replace(query, before=cursor)
                mine, theirs = await a.runs("ref", q), await mem.runs("ref", q)
                assert mine == theirs, q
                if not mine:
                    break
                cursor = mine[-1].claimed_at
    finally:
        await mem.close()
        drop_store("file-listing-reference")


async def test_records_older_than_the_retention_are_pruned_by_the_hour(files: Callable[..., FileBackend],
                                                                      tmp_path: Path) -> None:
    a = files("timeout=2&claim_retention=3600")
    old, recent = time.time() - 3 * 3600, time.time() - 60
    await a.record_many("p", [run("old@1", at=old)])
    stale_tmp = tmp_path / "p" / "claims" / ".tmp-left-by-a-killed-process"
    stale_tmp.write_text("{")
    os.utime(stale_tmp, (old, old))
    assert [r.key for r in await a.runs("p", RunQuery())] == []  # hidden at once
    a._last_prune.clear()
    await a.record_many("p", [run("new@1", at=recent)])
    assert [r.key for r in await a.runs("p", RunQuery())] == ["new@1"]
    hours = os.listdir(tmp_path / "p" / "records")
    assert hours == [str(int(recent * US) // records.HOUR_US)]
    assert not stale_tmp.exists()


async def test_keys_that_make_awkward_file_names(files: Callable[..., FileBackend]) -> None:
    a = files()
    lease = await a.acquire("k", Holder("a"), TTL)
    assert lease is not None
    keys = [".hidden@1", "x" * 400 + "@1", "y" * 400 + "@1", "a/b@c d", "é@ü"]
    assert await a.claim_many(lease, keys) == set(keys)
    assert {r.key for r in await a.unfinished("k", 10)} == set(keys)
    await a.record_many("k", [run(k, lease) for k in keys])
    assert await a.unfinished("k", 10) == []
    assert {r.key for r in await a.runs("k", RunQuery())} == set(keys)


# -- garbage in the lock directory (issue #17.3) --------------------------------------------------


@pytest.mark.parametrize("garbage", ["[1]", '{"paused:x": 1}', "{not json", ""])
async def test_settings_that_do_not_decode_are_a_corrupt_value_until_repaired(
        files: Callable[..., FileBackend], tmp_path: Path, garbage: str) -> None:
    a = files()
    await a.set_setting("s", "paused:x", "1")
    path = tmp_path / "s" / "settings.json"
    path.write_text(garbage)
    for attempt in (a.settings("s"), a.set_setting("s", "paused:y", "1")):
        with pytest.raises(CorruptValue) as info:
            await attempt
        assert info.value.key == str(path) and info.value.backend == "file"
    assert path.read_text() == garbage  # never overwritten as if empty
    path.write_text('{"paused:x": "1"}')
    await a.set_setting("s", "paused:y", "1")
    assert await a.settings("s") == {"paused:x": "1", "paused:y": "1"}


@pytest.mark.parametrize("garbage", ["{}", "{not json", '{"token": "8", "node_id": "a", "nonce": "", "expires": 0}',
                                     '{"token": 9, "node_id": "a", "nonce": "", "expires": 0, "mark": []}'])
async def test_a_lease_version_that_does_not_decode_is_never_no_lease(
        files: Callable[..., FileBackend], tmp_path: Path, garbage: str) -> None:
    a, b = files(), files()
    for _ in range(7):
        lease = await a.acquire("l", Holder("a"), TTL)
        assert lease is not None
        await a.release(lease)
    lease = await a.acquire("l", Holder("a"), TTL)
    assert lease is not None and lease.token == 8
    directory = tmp_path / "l"
    bad = directory / f"lease.{max(a._versions(directory)) + 1}"
    bad.write_text(garbage)
    for attempt in (b.acquire("l", Holder("b"), TTL), b.leader("l"), a.renew(lease),
                    a.claim_window(lease, now_us() + US, now_us()), a.hand_back(lease, now_us()),
                    a.claim(lease, "k"), b.claim_mark("l")):
        with pytest.raises(CorruptValue) as info:
            await attempt
        assert info.value.key == str(bad)
    await b.wait_for_change("l", 0.1)  # waits, never raises
    bad.unlink()  # repaired: everything works again, with no restart, and tokens never went back
    renewed = await a.renew(lease)
    assert renewed is not None
    await a.release(renewed)
    after = await b.acquire("l", Holder("b"), TTL)
    assert after is not None and after.token == 9


@pytest.mark.parametrize("garbage", ["[]", '{"token": 1, "node_id": "a", "claimed_at": null, "result": null}', "\x00"])
async def test_claim_and_record_files_that_do_not_decode_are_skipped_in_listings(
        files: Callable[..., FileBackend], tmp_path: Path, garbage: str) -> None:
    a = files()
    lease = await a.acquire("g", Holder("a"), TTL)
    assert lease is not None
    assert await a.claim_many(lease, ["bad@1", "good@1"]) == {"bad@1", "good@1"}
    start = now_us()
    assert await a.claim_window(lease, start + US, start, intents=["bad@2", "good@2"]) is not None
    await a.record_many("g", [run("good@3", lease)])
    directory = tmp_path / "g"
    for path in (directory / "claims" / "bad%401", directory / "intents" / "bad%402"):
        path.unlink()  # a new file: the keys of one claim (or window) share one, as hard links
        path.write_text(garbage)
    (directory / "busy" / "bad%404").write_text(garbage)
    batches = list((directory / "records").rglob("*.jsonl"))  # the claims' (listings read them there), the record's
    assert len(batches) == 2
    for batch in batches:
        batch.write_text(garbage + "\n" + batch.read_text() + '[1]\n{"key": "x@1", "claimed_at": null}\n')
    # listings never read claim files: a claim is listed from its batch line
    assert {r.key for r in await a.runs("g", RunQuery())} == {"bad@1", "good@1", "good@2", "good@3"}
    assert {r.key for r in await a.unfinished("g", 10)} == {"good@1", "good@2"}
    with pytest.raises(CorruptValue) as info:
        await a.claim(lease, "bad@1")
    assert info.value.key == str(directory / "claims" / "bad%401")
    window = await a.claim_window(lease, start + 2 * US, start)
    assert window is not None and window.busy == ()
    (directory / "claims" / "bad%401").unlink()  # repaired
    assert await a.claim(lease, "bad@1") is True


def enospc_half_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every write to a file under ``tmp_path`` writes half of its bytes, then fails: the disk is full."""
    real_write, failed = os.write, []

    def write(fd: int, data: bytes | memoryview) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(str(tmp_path)):
            return real_write(fd, data)
        real_write(fd, bytes(data[:len(data) // 2]))
        failed.append(target)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    return failed


async def test_a_full_disk_leaves_no_temporary_file_behind(files: Callable[..., FileBackend], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a = files()
    lease = await a.acquire("d", Holder("a"), TTL)
    assert lease is not None
    start = now_us()
    assert await a.claim_window(lease, start + US, start) is not None
    failed = enospc_half_way(tmp_path, monkeypatch)
    attempts = [a.acquire("d2", Holder("a"), TTL), a.renew(lease),
                a.claim_window(lease, start + 2 * US, start, intents=["n@1"]),
                a.hand_back(lease, start + US, busy=[BusyRun("n@0", "n", "a", lease.token, now_us() + US)]),
                a.claim_many(lease, ["k@1", "k@2"]), a.record_many("d", [run("k@1", lease)]),
                a.set_setting("d", "paused:x", "1"), a.server_time()]
    for attempt in attempts:
        with pytest.raises(LockBackendError, match="No space left"):
            await attempt
    assert len(failed) == len(attempts)
    monkeypatch.undo()
    assert [p for p in tmp_path.rglob("*") if p.name.startswith(".")] == []  # noqa: ASYNC240
    # the disk has room again: the lease was never lost, and everything works
    renewed = await a.renew(lease)
    assert renewed is not None
    window = await a.claim_window(renewed, start + 2 * US, start, intents=["n@1"])
    assert window is not None and window.until_us == start + 2 * US
    assert await a.claim_many(renewed, ["k@1"]) == {"k@1"}
