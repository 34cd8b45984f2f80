"""File backend: leases among processes on one host, with no server at all.

A bare ``flock`` held for the whole leadership would never expire: a holder
stopped with SIGSTOP would keep it forever and its peers would wait forever.
So the lock is a lease, as on the server backends, kept without any mutex:

* The lease is a log of versions, ``lease.<version>``, each a whole record
  (token, holder, expiry). The newest version is the lease. A change is a
  compare-and-swap: read version v, write the new record to a temporary file,
  and ``link`` it to ``lease.<v+1>``, which fails if that name exists, so of
  two writers that read v only one wins. The expiry is a ``CLOCK_MONOTONIC``
  instant, which all processes on one Linux host share.
* No process ever holds a lock the others need: a process stopped (SIGSTOP,
  a frozen container) in the middle of a change holds nobody back, and when
  it runs again its ``link`` fails if anyone moved the lease meanwhile. Old
  versions are pruned; a write that lands on a pruned name is caught by
  looking, after the link, for a newer version.
* The holder keeps an exclusive ``flock`` on ``holder-<token>`` for as long as
  it leads. When its process dies the kernel drops that lock, and peers see at
  once that the lease is free: no wait for the TTL after a crash.
* Tokens only grow: a release writes a version that keeps the token.

A claim is a file created with ``O_EXCL``, so a fire time is claimed once,
whoever asks. The token check before it is not atomic with the create: a
holder stopped between the two may, when it runs again, create a claim under
a lease it lost. That ends as an atomic claim followed by a stop before the
body does on the server backends: the fire time runs once, late, under the
old token (which a fenced sink refuses). It is always a fire time from before
the new leader's term (claims reach no further than the claimer's local
lease deadline, which passed before anyone else could win), and a claim made
ahead is never run under a lease that lapsed.

Layout under the URL's directory, per lock name: ``<dir>/<name>/`` with the
files above, ``claims/`` (one file per claim) and ``settings.json`` (changed
under a short ``flock``, ``mutex``: pausing a job is rare and not on the
failover path). Everything is on one host: for several hosts use a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from lock_backends.base import Holder, Lease, RunRecord, local_deadline
from lock_backends.errors import BackendUnavailable, LockBackendError
from lock_backends.url import BackendOptions, bad_url, parse_options

T = TypeVar("T")

#: Claims are pruned by age at most this often (seconds).
PRUNE_EVERY = 60.0
#: Lease versions kept behind the newest.
KEEP_VERSIONS = 8
LEASE_PREFIX = "lease."


class FileBackend:
    """Leases kept in a directory on the local file system."""

    kind = "file"

    def __init__(self, root: Path, options: BackendOptions) -> None:
        self.root = root
        self.options = options
        self.address = str(root)
        self._held: dict[str, tuple[int, int]] = {}  # name -> (token, fd of holder-<token>)
        self._last_prune = 0.0

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
        (path / "claims").mkdir(parents=True, exist_ok=True)
        return path

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run blocking file work in a thread, bounded and with errors translated in one place."""
        try:
            async with asyncio.timeout(self.options.op_timeout):
                return await asyncio.to_thread(fn)
        except TimeoutError:
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s",
                                     backend=self.kind, address=self.address) from None
        except BackendUnavailable:
            raise
        except (OSError, ValueError) as exc:  # ValueError: a file that is not the JSON this backend writes
            raise LockBackendError(f"{what} failed: {exc}", backend=self.kind, address=self.address) from None

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

    def _latest(self, directory: Path) -> tuple[int, dict[str, Any]]:
        """The newest lease version and its record; (0, {}) before the first acquire."""
        for _ in range(16):
            versions = self._versions(directory)
            if not versions:
                return 0, self._legacy(directory)
            newest = max(versions)
            try:
                return newest, dict(json.loads((directory / f"{LEASE_PREFIX}{newest}").read_text()))
            except FileNotFoundError:
                continue  # pruned while we looked: a newer version exists, look again
        raise BackendUnavailable("the lease changes faster than it can be read", backend=self.kind,
                                 address=str(directory))

    @staticmethod
    def _legacy(directory: Path) -> dict[str, Any]:
        """A directory from before the lease log (one ``lease.json``): its token, so tokens keep growing."""
        try:
            token = int(json.loads((directory / "lease.json").read_text()).get("token", 0))
        except (FileNotFoundError, ValueError, AttributeError):
            return {}
        return {"token": token, "nonce": "", "expires": 0}

    def _swap(self, directory: Path, version: int, record: dict[str, Any]) -> bool:
        """Make ``record`` the lease if ``version`` still is the newest; False if anyone got there first."""
        new = version + 1
        tmp = self._durable_tmp(directory / f"{LEASE_PREFIX}{new}", record)
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
    def _durable_tmp(path: Path, data: dict[str, Any]) -> Path:
        """``data`` as JSON in a hidden file beside ``path``, on disk, ready to be renamed or linked there."""
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @classmethod
    def _write_json(cls, path: Path, data: dict[str, Any]) -> None:
        os.replace(cls._durable_tmp(path, data), path)

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

    def _live(self, directory: Path, record: dict[str, Any]) -> bool:
        return (bool(record.get("nonce")) and float(record.get("expires", 0)) > time.monotonic()
                and self._holder_alive(directory, int(record["token"])))

    def _drop_held(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            with contextlib.suppress(OSError):
                os.close(held[1])

    # -- protocol ----------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = time.monotonic()

        def work() -> Lease | None:
            directory = self._dir(name)
            version, record = self._latest(directory)
            if record and self._live(directory, record):
                return None  # held, by a peer or (re-entrant ask) by this very instance
            self._drop_held(name)  # a lease of ours that expired unnoticed
            token = int(record.get("token", 0)) + 1
            fd = os.open(directory / f"holder-{token}", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a peer is acquiring the same token right now
                os.close(fd)
                return None
            nonce = secrets.token_hex(8)
            won = False
            try:
                won = self._swap(directory, version, {
                    "token": token, "node_id": holder.node_id, "url": holder.url, "nonce": nonce,
                    "expires": time.monotonic() + ttl, "pid": os.getpid()})
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

        return await self._run("acquire", work)

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = time.monotonic()

        def work() -> Lease | None:
            directory = self._dir(lease.name)
            version, record = self._latest(directory)
            ours = record.get("token") == lease.token and record.get("nonce") == lease.handle
            if not ours or float(record.get("expires", 0)) <= time.monotonic() or not self._swap(
                    directory, version, {**record, "expires": time.monotonic() + lease.ttl}):
                if self._held.get(lease.name, (None,))[0] == lease.token:
                    self._drop_held(lease.name)
                return None
            return Lease(lease.name, lease.holder, lease.token, lease.ttl,
                         local_deadline(t_sent, lease.ttl), handle=lease.handle)

        return await self._run("renew", work)

    async def release(self, lease: Lease) -> None:
        def work() -> None:
            directory = self._dir(lease.name)
            try:
                for _ in range(3):  # only a racing pruner or a stale writer can beat the holder here
                    version, record = self._latest(directory)
                    if record.get("token") != lease.token or record.get("nonce") != lease.handle:
                        break
                    if self._swap(directory, version, {**record, "expires": 0, "nonce": ""}):
                        break
            finally:
                if self._held.get(lease.name, (None,))[0] == lease.token:
                    self._drop_held(lease.name)

        await self._run("release", work)

    async def leader(self, name: str) -> Holder | None:
        def work() -> Holder | None:
            directory = self._dir(name)
            _, record = self._latest(directory)
            if record and self._live(directory, record):
                return Holder(str(record["node_id"]), str(record.get("url", "")))
            return None

        return await self._run("leader", work)

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Poll: a file system offers no portable watch that also sees a process die."""
        directory = self._dir(name)

        def snapshot() -> tuple[Any, bool]:
            _, record = self._latest(directory)
            return record.get("token"), bool(record) and self._live(directory, record)

        deadline = time.monotonic() + timeout
        try:
            before = await self._run("wait_for_change", snapshot)
        except LockBackendError:
            await asyncio.sleep(min(timeout, self.options.op_timeout))
            return
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))
            with contextlib.suppress(LockBackendError):
                if await self._run("wait_for_change", snapshot) != before:
                    return

    async def claim(self, lease: Lease, key: str) -> bool:
        return bool(await self.claim_many(lease, [key]))

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        """The token checked once, then one ``O_EXCL`` file per key (see the module's note on the order)."""

        def work() -> set[str]:
            directory = self._dir(lease.name)
            claimed: set[str] = set()
            _, record = self._latest(directory)
            current = (record.get("token") == lease.token and record.get("nonce") == lease.handle
                       and float(record.get("expires", 0)) > time.monotonic())
            if not current:
                return claimed
            body = json.dumps({"token": lease.token, "node_id": lease.holder.node_id,
                               "claimed_at": time.time(), "result": None}).encode()
            written: list[int] = []
            try:
                for key in dict.fromkeys(keys):
                    try:
                        fd = os.open(directory / "claims" / quote(key, safe=""),
                                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        continue
                    written.append(fd)
                    os.write(fd, body)
                    claimed.add(key)
            except BaseException:
                for fd in written:
                    os.close(fd)
                raise
            # the file's existence is the claim; its content is made durable before the answer
            try:
                for fd in written:
                    os.fsync(fd)
            finally:
                for fd in written:
                    os.close(fd)
            self._maybe_prune(directory)
            return claimed

        return await self._run("claim", work)

    def _maybe_prune(self, directory: Path) -> None:
        now = time.time()
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        horizon = now - self.options.claim_retention
        with os.scandir(directory / "claims") as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < horizon:
                        os.unlink(entry.path)

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        await self.record_many(name, {key: result})

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        def work() -> None:
            for key, result in results.items():
                path = self._dir(name) / "claims" / quote(key, safe="")
                try:
                    data = json.loads(path.read_text())
                except FileNotFoundError:
                    continue
                data["result"] = result
                self._write_json(path, data)

        await self._run("record", work)

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        def work() -> list[RunRecord]:
            claims = self._dir(name) / "claims"
            with os.scandir(claims) as it:
                entries = [e for e in it if not e.name.startswith(".")]
            records = []
            for entry in entries:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    data = json.loads(Path(entry.path).read_text())
                    records.append(RunRecord(key=unquote(entry.name), token=int(data["token"]),
                                             node_id=str(data["node_id"]),
                                             claimed_at=float(data["claimed_at"]), result=data.get("result")))
            records.sort(key=lambda r: r.claimed_at, reverse=True)
            return records[:limit]

        return await self._run("runs", work)

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        def work() -> None:
            directory = self._dir(name)
            with self._mutex(directory):
                path = directory / "settings.json"
                try:
                    current = dict(json.loads(path.read_text()))
                except FileNotFoundError:
                    current = {}
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
                self._write_json(path, current)

        await self._run("set_setting", work)

    async def settings(self, name: str) -> dict[str, str]:
        def work() -> dict[str, str]:
            try:
                raw = json.loads((self._dir(name) / "settings.json").read_text())
            except FileNotFoundError:
                return {}
            return {str(k): str(v) for k, v in raw.items()}

        return await self._run("settings", work)

    async def close(self) -> None:
        for name in list(self._held):
            self._drop_held(name)
