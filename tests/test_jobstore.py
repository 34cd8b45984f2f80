"""``node.jobstore.BatonJobStore`` against APScheduler's own ``MemoryJobStore``, on generated operations.

The stores differ in cost, never in what they answer: the same jobs, in the
same order (next run time, then id; paused last), the same next wake-up, and
due jobs in the same order (Baton's a chunk of them at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from hypothesis import given, settings
from hypothesis import strategies as st

from node.jobstore import DUE_CHUNK, BatonJobStore

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class FakeJob:
    """What a job store reads of a job: its id and next run time (None: paused)."""

    id: str
    next_run_time: datetime | None


ids = st.sampled_from([f"j{i}" for i in range(12)])
times = st.one_of(st.none(), st.integers(0, 5).map(lambda s: EPOCH + timedelta(seconds=s)))
operations = st.lists(st.tuples(st.sampled_from(["add", "update", "remove"]), ids, times), max_size=60)


def _apply(store: Any, op: str, job_id: str, at: datetime | None) -> str:
    """The operation on ``store``; what it raised, by name, or "ok"."""
    try:
        if op == "add":
            store.add_job(FakeJob(job_id, at))
        elif op == "update":
            store.update_job(FakeJob(job_id, at))
        else:
            store.remove_job(job_id)
    except (ConflictingIdError, JobLookupError) as exc:
        return type(exc).__name__
    return "ok"


def _view(store: Any, now: datetime) -> tuple[list[tuple[str, datetime | None]], datetime | None, list[str]]:
    jobs = [(job.id, job.next_run_time) for job in store.get_all_jobs()]
    return jobs, store.get_next_run_time(), [job.id for job in store.get_due_jobs(now)]


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(0, 6))
def test_answers_as_apscheduler_memory_store_does(ops: list[tuple[str, str, datetime | None]], now_s: int) -> None:
    ours, theirs = BatonJobStore(), MemoryJobStore()
    now = EPOCH + timedelta(seconds=now_s)
    for op, job_id, at in ops:
        assert _apply(ours, op, job_id, at) == _apply(theirs, op, job_id, at)
        assert _view(ours, now) == _view(theirs, now)
        assert (ours.lookup_job(job_id) is None) == (theirs.lookup_job(job_id) is None)


def test_due_jobs_come_a_chunk_at_a_time_oldest_first() -> None:
    store = BatonJobStore()
    for i in range(DUE_CHUNK * 2 + 5):
        store.add_job(FakeJob(f"j{i:04d}", EPOCH + timedelta(milliseconds=i)))
    due = store.get_due_jobs(EPOCH + timedelta(seconds=10))
    assert [job.id for job in due] == [f"j{i:04d}" for i in range(DUE_CHUNK)]
    for job in due:  # as the scheduler does: run, then move each to its next fire time
        job.next_run_time = EPOCH + timedelta(hours=1)
        store.update_job(job)
    assert [job.id for job in store.get_due_jobs(EPOCH + timedelta(seconds=10))][:1] == [f"j{DUE_CHUNK:04d}"]


def test_removing_an_unknown_job_says_so() -> None:
    with pytest.raises(JobLookupError):
        BatonJobStore().remove_job("nobody")
