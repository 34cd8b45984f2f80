"""The scale baseline: plain APScheduler 3 holding the same jobs a Baton node registers, and nothing else.

    python -m loadtest.bench.plain_jobs --jobs 10000 [--interval 10000000]

Registers ``--jobs`` no-op interval jobs (anchored at 2000-01-01, as Baton's
probes are, so none is due), starts an ``AsyncIOScheduler``, prints ``ready``
and runs until stdin closes. Its resident memory and start-up time are what
Baton's are divided by: the cost of APScheduler itself, without election,
HTTP or a lock backend. Imports nothing of Baton.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


async def noop() -> None:
    """The job body; never due within a benchmark."""


async def serve(jobs: int, interval: float) -> None:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = AsyncIOScheduler(timezone=UTC, job_defaults={"max_instances": 1, "coalesce": True,
                                                             "misfire_grace_time": 60})
    for i in range(jobs):
        scheduler.add_job(noop, IntervalTrigger(seconds=interval, start_date=EPOCH, timezone=UTC),
                          id=f"probe-{i:03d}", name=f"probe-{i:03d}")
    scheduler.start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    scheduler.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.plain_jobs", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=10_000_000.0)
    args = parser.parse_args(argv)
    if args.jobs < 0 or not args.interval > 0:
        print("plain_jobs: --jobs must be >= 0 and --interval positive", file=sys.stderr)
        return 2
    asyncio.run(serve(args.jobs, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
