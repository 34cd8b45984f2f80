"""APScheduler's in-memory job store, made fit for a leader that must keep renewing its lease.

Two things the stock ``MemoryJobStore`` does that a leader cannot afford at
tens of thousands of jobs:

* ``get_due_jobs`` returns every due job at once, and the scheduler submits
  them all in one pass of the event loop. Fifty thousand jobs due in the same
  second keep the loop busy for seconds, long enough for the lease to lapse
  unrenewed in the middle of the burst. Here due jobs come out in chunks of
  ``DUE_CHUNK``; the scheduler then finds the next job already due and wakes
  again at once, after the loop has run whatever else waited (a renewal, the
  first bodies of the burst). Same work, same order, no stall.
* Moving every job's next fire time (as a new leader must: its scheduler was
  paused while it followed) costs a list insertion per job, quadratic in the
  job count. ``realign`` recomputes them all and sorts once.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.util import datetime_to_utc_timestamp

#: Due jobs handed to the scheduler per pass of the event loop.
DUE_CHUNK = 256
#: Jobs realigned between two yields to the loop.
REALIGN_CHUNK = 2_000


class BatonJobStore(MemoryJobStore):
    def get_due_jobs(self, now: datetime) -> list:  # type: ignore[type-arg]
        now_timestamp = datetime_to_utc_timestamp(now)
        due = []
        for job, timestamp in self._jobs:
            if timestamp is None or timestamp > now_timestamp or len(due) >= DUE_CHUNK:
                break
            due.append(job)
        return due

    async def realign(self, after: datetime) -> None:
        """Set every scheduled job's next fire time to its first one after ``after``; paused jobs stay paused."""
        jobs = [job for job, _ in self._jobs]
        for i, job in enumerate(jobs):
            if job.next_run_time is not None:
                job.next_run_time = job.trigger.get_next_fire_time(None, after)
            if i % REALIGN_CHUNK == REALIGN_CHUNK - 1:
                await asyncio.sleep(0)
        entries = [(job, datetime_to_utc_timestamp(job.next_run_time)) for job in jobs]
        entries.sort(key=lambda e: (float("inf") if e[1] is None else e[1], e[0].id))
        self._jobs = entries
        self._jobs_index = {job.id: (job, timestamp) for job, timestamp in entries}
