"""An in-memory job store for APScheduler, fit for a leader that must keep renewing its lease.

Three things the stock ``MemoryJobStore`` does that a leader cannot afford at
tens of thousands of jobs:

* ``get_due_jobs`` returns every due job at once, and the scheduler submits
  them all in one pass of the event loop. Fifty thousand jobs due in the same
  second keep the loop busy for seconds, long enough for the lease to lapse
  unrenewed in the middle of the burst. Here due jobs come out in chunks of
  ``DUE_CHUNK``; the scheduler then finds the next job already due and wakes
  again at once, after the loop has run whatever else waited (a renewal, the
  first bodies of the burst). Same work, same order, no stall.
* Every job it fires is moved inside one sorted Python list, a memory move of
  the whole list per job: at 50,000 jobs that is tens of microseconds per job,
  seconds per burst. Here the order is a ``SortedList`` (sortedcontainers):
  logarithmic moves.
* Moving every job's next fire time (as a new leader must: its scheduler was
  paused while it followed) costs a move per job. ``realign`` recomputes them
  all and sorts once.

Ordering is APScheduler's: next run time, then job id; paused jobs (no next
run time) last.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.util import datetime_to_utc_timestamp
from sortedcontainers import SortedList

#: Due jobs handed to the scheduler per pass of the event loop.
DUE_CHUNK = 256
#: Jobs realigned between two yields to the loop.
REALIGN_CHUNK = 2_000

_PAUSED = float("inf")


def _slot(job: Job) -> tuple[float, str]:
    timestamp = datetime_to_utc_timestamp(job.next_run_time)
    return (_PAUSED if timestamp is None else timestamp, job.id)


class BatonJobStore(BaseJobStore):  # type: ignore[misc]  # APScheduler 3 is untyped: its classes are Any
    def __init__(self) -> None:
        super().__init__()
        self._order: SortedList = SortedList()
        # a job and its place in the order, in two dicts: a pair per job would be a new tuple at every fire
        # time, one more object for the collector's young pass to walk (ten thousand a second at the top rate)
        self._jobs: dict[str, Job] = {}
        self._slots: dict[str, tuple[float, str]] = {}

    def lookup_job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def get_due_jobs(self, now: datetime) -> list[Job]:
        now_timestamp = datetime_to_utc_timestamp(now)
        due: list[Job] = []
        for timestamp, job_id in self._order:
            if timestamp > now_timestamp or len(due) >= DUE_CHUNK:
                break
            due.append(self._jobs[job_id])
        return due

    def get_next_run_time(self) -> datetime | None:
        if not self._order:
            return None
        timestamp, job_id = self._order[0]
        return None if timestamp == _PAUSED else self._jobs[job_id].next_run_time

    def get_all_jobs(self) -> list[Job]:
        return [self._jobs[job_id] for _, job_id in self._order]

    def add_job(self, job: Job) -> None:
        if job.id in self._jobs:
            raise ConflictingIdError(job.id)
        slot = _slot(job)
        self._order.add(slot)
        self._jobs[job.id] = job
        self._slots[job.id] = slot

    def update_job(self, job: Job) -> None:
        old = self._slots.get(job.id)
        if old is None:
            raise JobLookupError(job.id)
        slot = _slot(job)
        if slot != old:
            self._order.remove(old)
            self._order.add(slot)
            self._slots[job.id] = slot
        self._jobs[job.id] = job

    def remove_job(self, job_id: str) -> None:
        slot = self._slots.pop(job_id, None)
        if slot is None:
            raise JobLookupError(job_id)
        del self._jobs[job_id]
        self._order.remove(slot)

    def remove_all_jobs(self) -> None:
        self._order = SortedList()
        self._jobs = {}
        self._slots = {}

    def shutdown(self) -> None:
        self.remove_all_jobs()

    async def realign(self, after: datetime) -> None:
        """Set every scheduled job's next fire time to its first one after ``after``; paused jobs stay paused."""
        jobs = [self._jobs[job_id] for _, job_id in self._order]
        for i, job in enumerate(jobs):
            if job.next_run_time is not None:
                job.next_run_time = job.trigger.get_next_fire_time(None, after)
            if i % REALIGN_CHUNK == REALIGN_CHUNK - 1:
                await asyncio.sleep(0)
        self._slots = {job.id: _slot(job) for job in jobs}
        self._order = SortedList(self._slots.values())
        self._jobs = {job.id: job for job in jobs}

    def __repr__(self) -> str:
        return f"<BatonJobStore ({len(self._jobs)} jobs)>"

