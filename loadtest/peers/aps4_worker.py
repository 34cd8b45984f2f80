"""An APScheduler 4 scheduler sharing a PostgreSQL data store, running Baton's probe workload.

Runs inside ``.venv-peers``::

    python -m loadtest.peers.aps4_worker --node aps4-0 --url postgresql://postgres@127.0.0.1:5432/postgres \\
        --collector URL

Every worker runs an ``AsyncScheduler`` (role "both": it processes schedules
and runs jobs) on one ``SQLAlchemyDataStore`` (asyncpg) with the
``AsyncpgEventBroker`` (LISTEN/NOTIFY), the multi-node setup APScheduler 4
documents. There is no leader: any scheduler may acquire due schedules, and
any may acquire the jobs they create.

Settings, as close to Baton's bench timing as APScheduler 4 allows:

* ``lease_duration`` = TTL: how long a scheduler holds acquired schedules and
  jobs before another may take them (extended every half lease while it lives);
* ``cleanup_interval`` = TTL: how often each scheduler marks jobs whose lease
  expired as abandoned (which also frees the task's running-job slot);
* one task per probe job with ``max_running_jobs`` as Baton's probes' ``max_instances``,
  ``misfire_grace_time`` = the harness's grace, coalesce ``latest``;
* ``IntervalTrigger(start_time=...)`` on the next instant of Baton's epoch grid,
  so fire times are the checker's; ``ConflictPolicy.do_nothing``, so a worker
  that (re)starts keeps the schedules the others already advance;
* the scheduler identity is ``NODE-PID``, like APScheduler's own default
  (host-pid-object): a restarted worker is a new scheduler.

Token: APScheduler 4 has no fencing token, so every record carries 0. A sink
cannot tell a stale run from a current one: the checker's fenced-sink column
then equals its duplicates.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

from loadtest.peers.probe import (
    POST_ERRORS,
    PROBE_MAX_INSTANCES,
    fail,
    job_names,
    next_instant,
    parser,
    post_probe,
    ready,
    validate,
)

log = logging.getLogger("aps4-worker")


@dataclass
class Reporting:
    """Where the probe task reports; set once by ``main`` before the scheduler starts."""

    collector: str = ""
    node: str = ""


REPORTING = Reporting()


async def probe() -> None:
    """The task body of every probe job: report (job, scheduled fire time, node, token 0)."""
    import anyio
    from apscheduler import current_job

    job = current_job.get()
    try:
        await anyio.to_thread.run_sync(post_probe, REPORTING.collector, job.task_id, job.scheduled_fire_time,
                                       REPORTING.node, 0)
    except POST_ERRORS as exc:
        log.warning("probe %s@%s not stored: %s", job.task_id, job.scheduled_fire_time.isoformat(), exc)
        raise


def asyncpg_url(url: str) -> str:
    """SQLAlchemy's asyncpg dialect URL for a plain ``postgresql://`` one."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"--url must be postgresql://..., not {url!r}")
    return urlunsplit(("postgresql+asyncpg", *parts[1:]))


async def run(node: str, url: str, jobs: int, interval: float, ttl: float, grace: float) -> None:
    from apscheduler import AsyncScheduler, CoalescePolicy, ConflictPolicy
    from apscheduler.datastores.sqlalchemy import SQLAlchemyDataStore
    from apscheduler.eventbrokers.asyncpg import AsyncpgEventBroker
    from apscheduler.triggers.interval import IntervalTrigger
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(asyncpg_url(url))
    store = SQLAlchemyDataStore(engine)
    broker = AsyncpgEventBroker.from_async_sqla_engine(engine)
    lease = timedelta(seconds=ttl)
    async with AsyncScheduler(store, broker, identity=f"{node}-{os.getpid()}", lease_duration=lease,
                              cleanup_interval=lease) as scheduler:
        # a second ahead: the instant must still be in the future once the schedule is stored
        start = next_instant(interval, datetime.now(UTC) + timedelta(seconds=1))
        for job in job_names(jobs):
            await scheduler.configure_task(job, func=probe, max_running_jobs=PROBE_MAX_INSTANCES,
                                           misfire_grace_time=grace)
            await scheduler.add_schedule(job, IntervalTrigger(seconds=interval, start_time=start), id=job,
                                         coalesce=CoalescePolicy.latest, misfire_grace_time=grace,
                                         conflict_policy=ConflictPolicy.do_nothing)
        ready()
        await scheduler.run_until_stopped()


def main(argv: list[str] | None = None) -> int:
    p = parser("aps4_worker", "PostgreSQL URL, postgresql://user@host:port/db")
    args = p.parse_args(argv)
    validate(p, args)
    try:
        asyncpg_url(args.url)
    except ValueError as exc:
        p.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {args.node} %(name)s %(message)s")
    REPORTING.collector, REPORTING.node = args.collector, args.node
    import anyio

    try:
        anyio.run(run, args.node, args.url, args.jobs, args.interval, args.ttl, args.misfire_grace)
    except OSError as exc:
        return fail("aps4_worker", f"cannot reach PostgreSQL at {args.url}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
