"""A lock holder in its own process, for tests that SIGSTOP or kill it.

Usage: python -m tests.holder_child URL NAME TTL [busy]
Prints ``token N`` once it holds the lock, keeps renewing every TTL/4 (with
``busy``: back to back, so a SIGSTOP lands in the middle of a lease change), and
answers ``claim KEY`` lines on stdin with ``claim True|False`` and ``window
SECONDS`` lines (a claim window reaching that far ahead) with ``window None``
or ``window OWNED SINCE_US UNTIL_US``, using the lease it last held, so a stale
token is what gets tested after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from lock_backends import Holder, Lease, LockBackendError, from_url


async def main(url: str, name: str, ttl: float, busy: bool = False) -> None:
    backend = from_url(url)
    first = None
    while first is None:
        first = await backend.acquire(name, Holder("child", "http://child"), ttl)
        if first is None:
            await asyncio.sleep(0.05)
    lease: Lease = first
    print(f"token {lease.token}", flush=True)

    async def renew_forever() -> None:
        nonlocal lease
        while True:
            await asyncio.sleep(0 if busy else ttl / 4)
            with contextlib.suppress(LockBackendError):
                renewed = await backend.renew(lease)
                if renewed is not None:
                    lease = renewed

    renewer = asyncio.create_task(renew_forever())
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd, _, key = line.strip().partition(" ")
        if cmd == "claim":
            try:
                ok = await backend.claim(lease, key)
            except LockBackendError as exc:
                print(f"claim error {exc}", flush=True)
                continue
            print(f"claim {ok}", flush=True)
        elif cmd == "window":
            now_us = int(time.time() * 1_000_000)
            try:
                window = await backend.claim_window(lease, now_us + int(float(key) * 1_000_000), now_us)
            except LockBackendError as exc:
                print(f"window error {exc}", flush=True)
                continue
            print("window None" if window is None else
                  f"window {window.owned_by(lease.token)} {window.since_us} {window.until_us}", flush=True)
    renewer.cancel()
    await backend.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:5] == ["busy"]))
