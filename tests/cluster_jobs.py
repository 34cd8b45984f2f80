"""Jobs of every trigger kind and option, for real node processes (``BATON_JOBS=tests.cluster_jobs:from_env``).

Each body appends one JSON line to ``JOBS_TEST_RECORDS`` when it starts (one
``write`` on an ``O_APPEND`` file: whole lines, even from a process killed
right after): job, fire time, node, token, kind. Times are relative to
``JOBS_TEST_T0``, the same on every node, so every node registers the same
jobs. Also the target of stored jobs in the cluster tests (``record``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from node.jobs import JobRegistry, RunContext, current_run

#: The guide's JOB_DEFAULTS, as a user copies them.
JOB_DEFAULTS = {"max_instances": 1, "coalesce": True, "misfire_grace_time": 300, "replace_existing": True}
#: One-shot jobs, seconds after T0 (the cluster test aims its faults between and just before them).
ONE_SHOTS = {"once-early": 2, "once-after-kill": 7, "once-middle": 12, "once-after-term": 16.5,
             "once-after-step-down": 26.5, "once-late": 31}
#: How long the bodies of the overlapping job run (every second, max_instances=2).
OVERLAP_BODY = 1.2


def _append(path: Path, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _record(path: Path, run: RunContext, **extra: Any) -> None:
    _append(path, {"job": run.job_id, "scheduled_at": run.scheduled_at.astimezone(UTC).isoformat(),
                   "node": run.node_id, "token": run.token, "kind": str(run.kind),
                   "started_at": datetime.now(UTC).isoformat(), **extra})


def record(label: str = "", **kwargs: Any) -> str:
    """A stored job's target: records its run like the code-defined bodies (path from the environment)."""
    _record(Path(os.environ["JOBS_TEST_RECORDS"]), current_run.get(), label=label, **kwargs)
    return label


def build(t0: datetime, records: Path) -> JobRegistry:
    """Every trigger kind and option, around ``t0``."""
    jobs = JobRegistry(job_defaults=JOB_DEFAULTS)

    async def note(run: RunContext) -> None:
        _record(records, run)

    async def overlapping(run: RunContext) -> None:
        _record(records, run)
        await asyncio.sleep(OVERLAP_BODY)

    def blocking(run: RunContext) -> None:  # a plain def: the thread pool
        _record(records, run)
        time.sleep(0.3)

    def with_args(label: str, *, n: int) -> None:
        _record(records, current_run.get(), label=label, n=n)

    jobs.cron("cron-fields", second="*")(note)
    jobs.cron("cron-tz", hour="*", second="*/2", timezone="Asia/Kolkata")(note)
    jobs.cron("crontab", crontab="* * * * *")(note)
    jobs.interval("interval-epoch", seconds=1)(note)
    jobs.interval("interval-start", seconds=2, start_date=t0 + timedelta(seconds=0.5))(note)
    jobs.interval("interval-end", seconds=1, end_date=t0 + timedelta(seconds=12))(note)
    jobs.interval("interval-minutes", minutes=1, timezone="Europe/Berlin")(note)
    jobs.interval("no-coalesce", seconds=1, coalesce=False)(note)
    jobs.interval("own-grace", seconds=1, misfire_grace=45)(note)
    jobs.interval("overlap", seconds=1, max_instances=2)(overlapping)
    jobs.interval("sync-body", seconds=1)(blocking)
    jobs.interval("recoverable", seconds=1, recover=True)(note)
    jobs.add_job(with_args, "interval", id="with-args", seconds=1, args=["x"], kwargs={"n": 3})
    for job_id, after in ONE_SHOTS.items():
        jobs.date(job_id, run_date=t0 + timedelta(seconds=after))(note)
    return jobs


def from_env() -> JobRegistry:
    return build(datetime.fromisoformat(os.environ["JOBS_TEST_T0"]), Path(os.environ["JOBS_TEST_RECORDS"]))
