"""File backend: leases among processes on one host, with no server at all.

A bare ``flock`` held for the whole leadership would never expire: a holder
stopped with SIGSTOP would keep it forever and its peers would wait forever.
So the lock is a lease, as on the server backends, kept without any mutex:

* The lease is a log of versions, ``lease.<version>``, each a whole record
  (token, holder, nonce, expiry, and the claim mark). The newest version is
  the lease. A change is a compare-and-swap: read version v, write the new
  record to a temporary file (fsynced), and ``link`` it to ``lease.<v+1>``,
  which fails if that name exists, so of two writers that read v only one
  wins. The expiry is a ``CLOCK_MONOTONIC`` instant, which all processes on
  one Linux host share.
* No process ever holds a lock the others need: a process stopped (SIGSTOP,
  a frozen container) in the middle of a change holds nobody back, and when
  it runs again its ``link`` fails if anyone moved the lease meanwhile. Old
  versions are pruned; a write that lands on a pruned name is caught by
  looking, after the link, for a newer version.
* The holder keeps an exclusive ``flock`` on ``holder-<token>`` for as long as
  it leads. When its process dies the kernel drops that lock, and peers see at
  once that the lease is free: no wait for the TTL after a crash.
* Tokens only grow: a release writes a version that keeps the token. A newest
  version that does not decode is never read as "no lease": every lease
  operation raises ``CorruptValue`` naming the file until a person repairs or
  removes it (skipping it could hand out a token already used).

Claim windows. The mark ``(token, since, until, sealed)`` lives in the lease
record itself: acquire, renew and release carry it forward unchanged, and
``claim_window`` writes the next lease version, with the mark moved by
``next_window``, by the same compare-and-swap, after checking (on the version
it read) that the token and nonce are the caller's and the lease unexpired.
The swap succeeds only if that version is still the newest, so the check and
the move are one atomic step: no lease change (an acquire by a successor)
can come between them, and a holder stopped in between finds, when it runs
again, that its link fails. ``hand_back`` swaps in the sealed mark the same
way when the mark is the caller's token's, whatever the lease. The changes of
one lease take turns within a process (a renew and a claim of the same holder
never lose their swaps to each other); a swap lost to another process is
tried again on the new version, which is checked afresh. Intents are written
(durably) before the swap that makes their window, and removed again if no
swap made it; busy runs likewise before the sealing swap. A swap that moves
the mark also fsyncs the directory, so the new version's name is on disk
before the answer.

Single-key claims (``claim``) check the lease, then link their files (see
``file_records``): not atomic with the check, so a holder stopped between the
two may, when it runs again, claim under a lease it lost. That is what an
atomic claim followed by a stop before the body gives on the server backends:
the key runs once, late, under the old token. Claims serve only recovery and
manual runs; the schedule's fire times go by windows.

Layout under the URL's directory, per lock name: ``<dir>/<name>/`` with the
lease log and holder files above, ``settings.json`` (changed under a short
``flock``, ``mutex``: pausing a job is rare and not on the failover path) and
the run records of ``file_records``. Lease operations run on a thread pool of
their own, listings on another (one thread), everything else on a third, so
listings, however many, delay neither a renewal nor a claim. Everything is on
one host: for several hosts use a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from lock_backends import file_records as records
from lock_backends._common import ENCODE_SLICE, compact_json, renewed
from lock_backends.base import (
    NO_WINDOW,
    BusyRun,
    Holder,
    Lease,
    RunQuery,
    RunRecord,
    Window,
    handed_back,
    local_deadline,
    next_window,
)
from lock_backends.errors import BackendUnavailable, LockBackendError
from lock_backends.file_records import corrupt, durable_tmp, fsync_dir, replace_durable
from lock_backends.url import BackendOptions, bad_url, parse_options

T = TypeVar("T")

#: Run records are pruned by age at most this often (seconds).
PRUNE_EVERY = 60.0
#: Lease versions kept behind the newest.
KEEP_VERSIONS = 8
LEASE_PREFIX = "lease."
#: Compare-and-swap attempts of one operation, should other processes keep changing the lease under it.
CAS_TRIES = 5
#: Threads for lease operations; for claims, records and settings; for listings. Listings are
#: Python-bound work (decoding JSON): more threads would add no throughput, only contention for the
#: GIL with the lease threads, which is what delays a renewal most under a flood of listings.
LEASE_WORKERS = 2
IO_WORKERS = 2
LISTING_WORKERS = 1


@dataclass(frozen=True)
class LeaseVersion:
    """One version of the lease log: what ``lease.<n>`` holds."""

    token: int
    node_id: str
    url: str
    nonce: str  # empty once released
    expires: float  # CLOCK_MONOTONIC
    pid: int
    mark: Window | None = None

    def encode(self) -> bytes:
        data: dict[str, Any] = {"token": self.token, "node_id": self.node_id, "url": self.url,
                                "nonce": self.nonce, "expires": self.expires, "pid": self.pid}
        if self.mark is not None:
            data["mark"] = self.mark.to_dict()
        return compact_json(data).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LeaseVersion:
        """Raises ValueError on anything but what ``encode`` wrote."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        token, expires, pid = data.get("token"), data.get("expires"), data.get("pid", 0)
        if isinstance(token, bool) or not isinstance(token, int) or token < 1:
            raise ValueError(f"no valid token: {token!r}")
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise ValueError(f"no valid expiry: {expires!r}")
        if not isinstance(pid, int):
            raise ValueError(f"no valid pid: {pid!r}")
        holder = Holder.from_json(raw)
        nonce = data.get("nonce")
        if not isinstance(nonce, str):
            raise ValueError(f"no valid nonce: {nonce!r}")
        mark = None if data.get("mark") is None else Window.from_dict(data["mark"])
        return cls(token, holder.node_id, holder.url, nonce, float(expires), pid, mark)

    def holds(self, lease: Lease) -> bool:
        """The lease is this version's, and unexpired."""
        return (self.token == lease.token and bool(self.nonce) and self.nonce == lease.handle
                and self.expires > time.monotonic())


class FileBackend:
    """Leases kept in a directory on the local file system."""

    kind = "file"

    def __init__(self, root: Path, options: BackendOptions) -> None:
        self.root = root
        self.options = options
        self.address = str(root)
        self._held: dict[str, tuple[int, int]] = {}  # name -> (token, fd of holder-<token>)
        self._made: set[str] = set()
        self._last_prune: dict[str, float] = {}
        self._closed = False
        self._writers: dict[str, threading.Lock] = {}
        self._lease_pool = ThreadPoolExecutor(LEASE_WORKERS, thread_name_prefix="baton-file-lease")
        self._io_pool = ThreadPoolExecutor(IO_WORKERS, thread_name_prefix="baton-file-io")
        self._listing_pool = ThreadPoolExecutor(LISTING_WORKERS, thread_name_prefix="baton-file-runs")
        self._pools = {"lease": self._lease_pool, "io": self._io_pool, "listing": self._listing_pool}

    @classmethod
    def from_url(cls, url: str) -> FileBackend:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_url(url, "a file URL names a local path: file:///absolute/path (three slashes)")
        if not parts.path or not parts.path.startswith("/"):
            raise bad_url(url, "a file URL needs an absolute path")
        options, _ = parse_options(url)
        return cls(Path(unquote(parts.path)), options)

    # -- plumbing ----------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        path = self.root / quote(name, safe="")
        if name not in self._made:
            for sub in records.SUBDIRS:
                (path / sub).mkdir(parents=True, exist_ok=True)
            self._made.add(name)
        return path

    async def _run(self, what: str, fn: Callable[[], T], *, pool: str = "io", writes: str = "") -> T:
        """Run blocking file work on a pool thread, bounded, with errors translated in one place.

        Lease operations have a pool of their own, and listings (the one read
        a client can ask for in bulk) another: however many listings are queued
        or still running (a timed-out call's thread finishes its work), neither
        a renewal nor a claim or a record waits behind them. Those that change
        the lease of ``writes`` take turns within this instance, so a renew and
        a claim of the same holder never lose their swaps to each other (the
        swap still settles races with other processes).
        """
        if self._closed:
            raise BackendUnavailable("backend closed", backend=self.kind, address=self.address)
        if writes:
            fn = self._in_turn(self._turn(writes), fn)
        try:
            async with asyncio.timeout(self.options.op_timeout):
                return await asyncio.get_running_loop().run_in_executor(self._pools[pool], fn)
        except TimeoutError:
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s",
                                     backend=self.kind, address=self.address) from None
        except LockBackendError:
            raise
        except (OSError, ValueError) as exc:
            raise LockBackendError(f"{what} failed: {exc}", backend=self.kind, address=self.address) from None

    def _turn(self, name: str) -> threading.Lock:
        return self._writers.setdefault(name, threading.Lock())

    @staticmethod
    def _in_turn(turn: threading.Lock, fn: Callable[[], T]) -> Callable[[], T]:
        def call() -> T:
            with turn:
                return fn()

        return call

    @contextlib.contextmanager
    def _mutex(self, directory: Path) -> Iterator[None]:
        """A short exclusive section, for settings only. Never blocks past the operation timeout."""
        fd = os.open(directory / "mutex", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            give_up = time.monotonic() + self.options.op_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > give_up:
                        raise BackendUnavailable("settings mutex busy (a peer is stuck inside it?)",
                                                 backend=self.kind, address=str(directory)) from None
                    time.sleep(0.001)
            yield
        finally:
            os.close(fd)  # also drops the flock

    @staticmethod
    def _versions(directory: Path) -> list[int]:
        return [int(entry[len(LEASE_PREFIX):]) for entry in os.listdir(directory)
                if entry.startswith(LEASE_PREFIX) and entry[len(LEASE_PREFIX):].isdigit()]

    def _latest(self, directory: Path) -> tuple[int, LeaseVersion | None]:
        """The newest lease version and its record; (0, None) before the first acquire.

        A newest version that does not decode raises ``CorruptValue``: it is never "no lease".
        """
        for _ in range(16):
            versions = self._versions(directory)
            if not versions:
                return 0, None
            newest = max(versions)
            path = directory / f"{LEASE_PREFIX}{newest}"
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue  # pruned while we looked: a newer version exists, look again
            try:
                return newest, LeaseVersion.decode(raw)
            except (ValueError, KeyError, TypeError) as exc:
                raise corrupt(directory, path, f"lease version does not decode ({exc}); repair or remove it"
                              ) from None
        raise BackendUnavailable("the lease changes faster than it can be read", backend=self.kind,
                                 address=str(directory))

    def _swap(self, directory: Path, version: int, record: LeaseVersion) -> bool:
        """Make ``record`` the lease if ``version`` still is the newest; False if anyone got there first."""
        new = version + 1
        tmp = durable_tmp(directory, record.encode(), f"{LEASE_PREFIX}{new}")
        try:
            os.link(tmp, directory / f"{LEASE_PREFIX}{new}")
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        versions = self._versions(directory)
        if max(versions) != new:
            # The name was free only because it had been pruned: the lease moved on while this
            # process was stopped. The file is old news to every reader (they take the newest).
            return False
        for old in versions:
            if old <= new - KEEP_VERSIONS:
                with contextlib.suppress(OSError):
                    os.unlink(directory / f"{LEASE_PREFIX}{old}")
        return True

    @staticmethod
    def _holder_alive(directory: Path, token: int) -> bool:
        try:
            fd = os.open(directory / f"holder-{token}", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # somebody holds it exclusively: the holder lives
        finally:
            os.close(fd)
        return False

    def _live(self, directory: Path, record: LeaseVersion | None) -> bool:
        return (record is not None and bool(record.nonce) and record.expires > time.monotonic()
                and self._holder_alive(directory, record.token))

    def _drop_held(self, name: str, token: int | None = None) -> None:
        """Close our holder file of ``name`` (only if it is ``token``'s, when given)."""
        held = self._held.get(name)
        if held is not None and (token is None or held[0] == token):
            self._held.pop(name, None)
            with contextlib.suppress(OSError):
                os.close(held[1])

    def _lease_changed(self, what: str) -> BackendUnavailable:
        return BackendUnavailable(f"{what}: the lease changed {CAS_TRIES} times under it", backend=self.kind,
                                  address=self.address)

    # -- LeaseStore --------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = time.monotonic()

        def work() -> Lease | None:
            directory = self._dir(name)
            version, record = self._latest(directory)
            if self._live(directory, record):
                return None  # held, by a peer or (re-entrant ask) by this very instance
            self._drop_held(name)  # a lease of ours that expired unnoticed
            token = (record.token if record else 0) + 1
            fd = os.open(directory / f"holder-{token}", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a peer is acquiring the same token right now
                os.close(fd)
                return None
            nonce = secrets.token_hex(8)
            won = False
            try:
                won = self._swap(directory, version, LeaseVersion(
                    token, holder.node_id, holder.url, nonce, time.monotonic() + ttl, os.getpid(),
                    record.mark if record else None))
            finally:
                if not won:
                    os.close(fd)
            if not won:
                return None
            self._held[name] = (token, fd)
            for stale in directory.glob("holder-*"):
                suffix = stale.name.removeprefix("holder-")
                if suffix.isdigit() and int(suffix) < token:
                    with contextlib.suppress(OSError):
                        stale.unlink()
            return Lease(name, holder, token, ttl, local_deadline(t_sent, ttl), handle=nonce)

        return await self._run("acquire", work, pool="lease", writes=name)

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = time.monotonic()

        def work() -> Lease | None:
            directory = self._dir(lease.name)
            for _ in range(CAS_TRIES):
                version, record = self._latest(directory)
                if record is None or not record.holds(lease):
                    self._drop_held(lease.name, lease.token)
                    return None
                extended = dataclasses.replace(record, expires=time.monotonic() + lease.ttl)
                if self._swap(directory, version, extended):
                    return renewed(lease, t_sent)
            raise self._lease_changed("renew")

        return await self._run("renew", work, pool="lease", writes=lease.name)

    async def release(self, lease: Lease) -> None:
        def work() -> None:
            directory = self._dir(lease.name)
            try:
                for _ in range(CAS_TRIES):
                    version, record = self._latest(directory)
                    if record is None or record.token != lease.token or record.nonce != lease.handle:
                        break
                    if self._swap(directory, version, dataclasses.replace(record, expires=0.0, nonce="")):
                        break
            finally:
                self._drop_held(lease.name, lease.token)

        await self._run("release", work, pool="lease", writes=lease.name)

    async def leader(self, name: str) -> Holder | None:
        def work() -> Holder | None:
            directory = self._dir(name)
            _, record = self._latest(directory)
            if record is not None and self._live(directory, record):
                return Holder(record.node_id, record.url)
            return None

        return await self._run("leader", work, pool="lease")

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Poll: a file system offers no portable watch that also sees a process die."""

        def snapshot() -> tuple[int, bool]:
            directory = self._dir(name)
            _, record = self._latest(directory)
            return (record.token if record else 0), self._live(directory, record)

        deadline = time.monotonic() + timeout
        try:
            before = await self._run("wait_for_change", snapshot, pool="lease")
        except LockBackendError:
            await asyncio.sleep(max(0.0, min(timeout, self.options.op_timeout)))
            return
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))
            with contextlib.suppress(LockBackendError):
                if await self._run("wait_for_change", snapshot, pool="lease") != before:
                    return

    async def server_time(self) -> float | None:
        """The mtime the kernel gives a file written now: the host's wall clock as the file system keeps it.

        The kernel stamps files from its coarse clock, so the answer may lag
        ``time.time()`` by up to one timer tick (1-10 ms, ``CONFIG_HZ``); the
        file system's own granularity is 1 ns on ext4, xfs, btrfs and tmpfs.
        """

        def work() -> float:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / f".tmp-clock.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"t")
                return os.fstat(fd).st_mtime_ns / 1e9
            finally:
                os.close(fd)
                os.unlink(path)

        return await self._run("server_time", work)

    async def close(self) -> None:
        self._closed = True
        for name in list(self._held):
            self._drop_held(name)
        for executor in self._pools.values():
            executor.shutdown(wait=False, cancel_futures=True)

    # -- ClaimStore ---------------------------------------------------------------

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        def write_intents(directory: Path) -> list[Path]:
            return records.write_intents(directory, intents, lease.token, lease.holder.node_id)

        def work() -> Window | None:
            directory = self._dir(lease.name)
            made: list[Path] = []
            written = done = False
            try:
                if intents:  # first, outside the turn: many intents must not hold a renew up
                    _, record = self._latest(directory)
                    if record is None or not record.holds(lease):
                        return None
                    if next_window(record.mark, lease.token, until_us, start_us).owned_by(lease.token):
                        made, written = write_intents(directory), True
                with self._turn(lease.name):
                    for _ in range(CAS_TRIES):
                        version, record = self._latest(directory)
                        if record is None or not record.holds(lease):
                            return None
                        mark = next_window(record.mark, lease.token, until_us, start_us)
                        if intents and not written and mark.owned_by(lease.token):
                            made, written = write_intents(directory), True
                        moved = mark != record.mark
                        if moved and not self._swap(directory, version, dataclasses.replace(record, mark=mark)):
                            continue  # another process changed the lease: look again
                        done = True
                        if moved:
                            fsync_dir(directory)
                        return self._with_busy(directory, mark)
                    raise self._lease_changed("claim_window")
            finally:
                if not done:
                    records.forget(made)  # intents of a window that was not made

        return await self._run("claim_window", work, pool="lease")

    async def claim_mark(self, name: str) -> Window:
        def work() -> Window:
            _, record = self._latest(self._dir(name))
            return (record.mark if record is not None else None) or NO_WINDOW  # busy runs are kept apart

        return await self._run("claim_mark", work, pool="lease")

    @staticmethod
    def _with_busy(directory: Path, mark: Window) -> Window:
        busy = records.read_busy(directory, int(time.time() * 1_000_000))
        return dataclasses.replace(mark, busy=busy)

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        def work() -> Window | None:
            directory = self._dir(lease.name)
            made: list[Path] = []
            written = done = False
            try:
                for _ in range(CAS_TRIES):
                    version, record = self._latest(directory)
                    mark = handed_back(record.mark if record else None, lease.token, at_us)
                    if record is None or mark is None:
                        return None  # the mark is not this token's: nothing to give back
                    if not written:
                        made = records.write_busy(directory, busy)
                        written = True
                    moved = mark != record.mark
                    if moved and not self._swap(directory, version, dataclasses.replace(record, mark=mark)):
                        continue
                    done = True
                    if moved:
                        fsync_dir(directory)
                    records.drop_intents(directory, drop, lease.token)
                    return self._with_busy(directory, mark)
                raise self._lease_changed("hand_back")
            finally:
                if not done:
                    records.forget(made)

        return await self._run("hand_back", work, pool="lease", writes=lease.name)

    async def claim(self, lease: Lease, key: str) -> bool:
        return bool(await self.claim_many(lease, [key]))

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        """The lease checked once, then the keys linked (see ``file_records``): fast and durable."""

        def work() -> set[str]:
            directory = self._dir(lease.name)
            _, record = self._latest(directory)
            if record is None or not record.holds(lease) or not keys:
                return set()
            claimed = records.claim_keys(directory, keys, lease.token, lease.holder.node_id)
            self._maybe_prune(lease.name, directory)
            return claimed

        return await self._run("claim", work)

    # -- RunStore -------------------------------------------------------------------

    def _maybe_prune(self, name: str, directory: Path) -> None:
        now = time.time()
        if now - self._last_prune.get(name, 0.0) < PRUNE_EVERY:
            return
        self._last_prune[name] = now
        records.prune(directory, now, self.options.claim_retention)

    async def record_many(self, name: str, runs: Sequence[RunRecord]) -> None:
        # Encoded here, a slice at a time, not on the pool thread: a thread encoding a batch holds the
        # GIL for all of it, and the loop, woken for a fire time, waits for it (up to the interpreter's
        # switch interval, 5 ms, at each turn). Everything is encoded (or refused) before any change.
        lines: list[bytes] = []
        try:
            for i, run in enumerate(records.newest_first(runs), 1):
                if i % ENCODE_SLICE == 0:
                    await asyncio.sleep(0)
                lines.append(records.encode_line(run))
        except (TypeError, ValueError) as exc:
            raise LockBackendError(f"a run record is not plain JSON: {exc}", backend=self.kind,
                                   address=self.address) from None
        data = b"".join(lines)

        def work() -> None:
            directory = self._dir(name)
            records.write_records(directory, runs, data)
            self._maybe_prune(name, directory)

        await self._run("record_many", work)

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        def work() -> list[RunRecord]:
            return records.list_runs(self._dir(name), query, time.time() - self.options.claim_retention)

        return await self._run("runs", work, pool="listing")

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        def work() -> list[RunRecord]:
            return records.unfinished(self._dir(name), limit, time.time() - self.options.claim_retention)

        return await self._run("unfinished", work)

    # -- SettingStore -------------------------------------------------------------------

    def _read_settings(self, directory: Path) -> dict[str, str]:
        path = directory / "settings.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise corrupt(directory, path, f"settings do not decode ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise corrupt(directory, path, "settings are not an object of strings")
        return data

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        def work() -> None:
            directory = self._dir(name)
            with self._mutex(directory):
                current = self._read_settings(directory)  # garbage is refused, never overwritten as empty
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
                replace_durable(directory / "settings.json", json.dumps(current).encode())

        await self._run("set_setting", work)

    async def settings(self, name: str) -> dict[str, str]:
        return await self._run("settings", lambda: self._read_settings(self._dir(name)))

    def __repr__(self) -> str:
        return f"FileBackend({self.address!r})"

