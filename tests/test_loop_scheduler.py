"""``node.loop_scheduler.LoopScheduler``: APScheduler's order of work, without the self-pipe on its own loop."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from node.loop_scheduler import LoopScheduler


class PipeCounter:
    """Counts the loop's writes to its self-pipe (``_write_to_self``), the cost ``LoopScheduler`` saves."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.writes = 0
        self._loop = loop
        self._original = loop._write_to_self  # type: ignore[attr-defined]

    def __enter__(self) -> PipeCounter:
        def counted() -> None:
            self.writes += 1
            self._original()

        self._loop._write_to_self = counted  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop._write_to_self = self._original  # type: ignore[attr-defined]


async def _fire_times(cls: type[AsyncIOScheduler], jobs: int) -> tuple[list[str], int]:
    """Which jobs ran, in order, and the self-pipe writes it took: ``jobs`` date jobs 20 ms apart."""
    ran: list[str] = []
    done = asyncio.Event()

    async def body(name: str) -> None:
        ran.append(name)
        if len(ran) == jobs:
            done.set()

    scheduler = cls(timezone=UTC)
    scheduler.start()
    start = datetime.now(UTC) + timedelta(milliseconds=100)
    try:
        with PipeCounter(asyncio.get_running_loop()) as pipe:
            for i in range(jobs):
                scheduler.add_job(body, "date", run_date=start + timedelta(milliseconds=20 * i), args=(f"j{i}",),
                                  id=f"j{i}")
            await asyncio.wait_for(done.wait(), 10)
        return ran, pipe.writes
    finally:
        scheduler.shutdown(wait=False)


async def test_jobs_run_as_with_apscheduler_and_no_wakeup_on_the_loop_writes_to_the_self_pipe() -> None:
    ran, writes = await _fire_times(LoopScheduler, 20)
    assert ran == [f"j{i}" for i in range(20)]
    assert writes == 0
    # the yardstick: APScheduler's own scheduler writes a byte at every wakeup (each job added, each timer)
    stock_ran, stock_writes = await _fire_times(AsyncIOScheduler, 20)
    assert stock_ran == ran
    assert stock_writes >= 20


async def test_a_job_added_from_another_thread_still_wakes_the_scheduler() -> None:
    """A wakeup from outside the loop goes through the self-pipe, as APScheduler's does: it is not lost."""
    ran = asyncio.Event()

    async def body() -> None:
        ran.set()

    scheduler = LoopScheduler(timezone=UTC)
    scheduler.start()
    try:
        await asyncio.sleep(0.05)  # the scheduler idle, no timer set: only a wakeup makes it look again
        adder = threading.Thread(target=scheduler.add_job, args=(body, "date"),
                                 kwargs={"run_date": datetime.now(UTC), "id": "from-a-thread"})
        adder.start()
        adder.join()
        await asyncio.wait_for(ran.wait(), 5)
    finally:
        scheduler.shutdown(wait=False)
