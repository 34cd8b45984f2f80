"""A holder stopped with SIGSTOP loses the lock within about one TTL, and is fenced after SIGCONT
(its claims and its claim windows alike).

This is the trap docs/design.md warns of: a paused process keeps its TCP
connection (and, on PostgreSQL, its session and advisory lock) alive unless the
backend ends idle sessions. The holder runs in a real subprocess.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from lock_backends import Holder, LockBackend
from tests.conftest import TTL

Factory = Callable[[str], LockBackend]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.1):
                return proc.stdout.readline().strip()
    raise AssertionError(f"child said nothing within {timeout}s")


async def test_sigstopped_holder_loses_lock_and_is_fenced(shared_backend_url: str, make_backend: Factory,
                                                          lock_name: str) -> None:
    backend_url = shared_backend_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.holder_child", backend_url, lock_name, str(TTL)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        first = await asyncio.to_thread(read_line, proc, 30)
        assert first.startswith("token ")
        old_token = int(first.split()[1])
        contender = make_backend(backend_url)
        assert await contender.acquire(lock_name, Holder("c"), TTL) is None
        assert proc.stdin is not None
        proc.stdin.write("window 0.5\n")
        proc.stdin.flush()
        owned, _, mine_until = (await asyncio.to_thread(read_line, proc, 30)).split()[1:]
        assert owned == "True"

        os.kill(proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        lease = None
        while lease is None:
            lease = await contender.acquire(lock_name, Holder("c"), TTL)
            if lease is None:
                assert time.monotonic() - stopped_at < TTL * 2 + 5, "paused holder kept the lock"
                await asyncio.sleep(0.05)
        waited = time.monotonic() - stopped_at
        assert lease.token > old_token
        assert waited < TTL * 2 + 5

        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("claim after-wakeup\n")
        proc.stdin.flush()
        answer = await asyncio.to_thread(read_line, proc, 30)
        assert answer == "claim False" or answer.startswith("claim error"), answer
        proc.stdin.write("window 60\n")
        proc.stdin.flush()
        answer = await asyncio.to_thread(read_line, proc, 30)
        assert answer == "window None" or answer.startswith("window error"), answer
        assert await contender.claim(lease, "after-wakeup") is True
        now_us = int(time.time() * 1_000_000)
        theirs = await contender.claim_window(lease, now_us + 1_000_000, now_us)
        assert theirs is not None and theirs.owned_by(lease.token) and theirs.since_us == int(mine_until)
        assert await contender.leader(lock_name) == Holder("c")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
