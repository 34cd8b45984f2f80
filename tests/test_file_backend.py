"""The file backend's lease log: no process holds a lock its peers need, so a stopped one holds nobody back.

Real files and real processes: the holder is a child process renewing back to
back, stopped with SIGSTOP wherever it happens to be, over and over; and the
compare-and-swap underneath is driven into its two races (a writer that read an
old version, and one whose version name was pruned meanwhile) directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lock_backends import Holder, Lease
from lock_backends.file import KEEP_VERSIONS, FileBackend
from tests.conftest import TTL, eventually
from tests.test_sigstop import read_line

ROOT = os.path.dirname(os.path.dirname(__file__))


def backend(path: Path) -> FileBackend:
    return FileBackend.from_url(f"file://{path}?timeout=2")


async def holder_then_successor(tmp_path: Path, name: str) -> tuple[FileBackend, FileBackend, Lease, Lease,
                                                                     int, dict[str, Any]]:
    """a takes a short lease and reads its version; the lease lapses; b wins. What a stopped a saw, too."""
    a, b = backend(tmp_path), backend(tmp_path)
    lease = await a.acquire(name, Holder("a"), 0.3)
    assert lease is not None
    version, record = a._latest(tmp_path / name)
    await asyncio.sleep(0.4)
    won = await b.acquire(name, Holder("b"), TTL)
    assert won is not None and won.token == lease.token + 1
    return a, b, lease, won, version, record


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
                                                 lambda n=name: contender.acquire(n, Holder("contender"), TTL),
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
        # a wakes with what it read before and tries to renew on top of it
        assert a._swap(directory, version, {**record, "expires": time.monotonic() + TTL}) is False
        assert await a.leader("cas") == Holder("b")
        assert await a.renew(lease) is None
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
        assert a._swap(directory, version, {**record, "expires": time.monotonic() + TTL}) is False
        assert await a.leader("pruned") == Holder("b")
        versions = sorted(a._versions(directory))
        assert len(versions) <= KEEP_VERSIONS + 1, versions  # old versions do not pile up
    finally:
        await a.close()
        await b.close()


async def test_tokens_keep_growing_from_a_directory_of_the_single_file_layout(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lease.json").write_text(json.dumps({"token": 41, "node_id": "x", "nonce": "",
                                                            "expires": 0}))
    b = backend(tmp_path)
    try:
        lease = await b.acquire("old", Holder("b"), TTL)
        assert lease is not None and lease.token == 42
    finally:
        await b.close()


async def test_a_corrupt_lease_file_is_a_backend_error_not_a_traceback(tmp_path: Path) -> None:
    from lock_backends import LockBackendError

    b = backend(tmp_path)
    try:
        assert await b.acquire("bad", Holder("b"), TTL) is not None
        directory = tmp_path / "bad"
        newest = max(b._versions(directory))
        (directory / f"lease.{newest}").write_text("{not json")
        try:
            await b.leader("bad")
        except LockBackendError as exc:
            assert "leader failed" in str(exc)
        else:
            raise AssertionError("a corrupt lease file went unnoticed")
    finally:
        await b.close()
