"""APScheduler 3's asyncio scheduler, woken on its own loop without a trip through the loop's self-pipe.

``AsyncIOScheduler.wakeup`` may be called from any thread, so it always goes
through ``call_soon_threadsafe``: a byte written to the event loop's self-pipe,
a pass of the loop to read it back, two system calls. It is called at every
timer the scheduler sets, that is at nearly every fire time of a steady
schedule (10,000 jobs spread over a second wake it thousands of times a
second), and the timer already runs on the loop. Here a timer processes the due
jobs at once, and a wakeup asked for on the loop (a job added or changed by the
node) goes through ``call_soon``; only one from another thread takes the pipe.
What runs, and in what order, is APScheduler's.

Measured at 10,000 runs/s on one core: the self-pipe's reads and writes took
about a tenth of the event loop's time, and with the file backend (whose work
runs on a pool of threads) each such system call was also a point where a pool
thread took the interpreter lock from the loop.
"""

from __future__ import annotations

import asyncio

from apscheduler.schedulers.asyncio import AsyncIOScheduler


class LoopScheduler(AsyncIOScheduler):  # type: ignore[misc]  # APScheduler 3 is untyped: its classes are Any
    def wakeup(self) -> None:
        loop = asyncio.events._get_running_loop()
        if loop is not None and loop is self._eventloop:
            loop.call_soon(self._process_due)
        else:
            super().wakeup()  # another thread's: through the self-pipe, as APScheduler does

    def _start_timer(self, wait_seconds: float | None) -> None:
        self._stop_timer()
        if wait_seconds is not None:
            self._timeout = self._eventloop.call_later(wait_seconds, self._process_due)

    def _process_due(self) -> None:
        """``AsyncIOScheduler.wakeup``'s body: submit what is due, set the timer for what comes next."""
        self._stop_timer()
        self._start_timer(self._process_jobs())
