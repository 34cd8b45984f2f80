"""The probe workload as the peers run it: Baton's fire-time grid and the collector's record shape.

Standard library only: both peer workers import this inside ``.venv-peers``.
The grid and the record must match the checker's (``loadtest.probe_log``, ``loadtest.checker``) exactly (EPOCH, job
names, field names), or the checker would judge the peers by other rules than
Baton; ``tests/test_bench_peers.py`` asserts they agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

#: Interval fire times count from here, as ``node.jobs.INTERVAL_EPOCH`` and ``loadtest.probe_log.EPOCH``.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
#: The line a worker prints once it is set up, so the harness can stagger starts (schema creation races).
READY = "PEER-READY"
#: Probe runs of one job at once, as Baton's probe jobs allow (``node.jobs.PROBE_MAX_INSTANCES``):
#: a slow collector then never makes a scheduler skip a fire time.
PROBE_MAX_INSTANCES = 4


def job_names(jobs: int) -> list[str]:
    """``probe-000`` .. as the checker expects them."""
    return [f"probe-{i:03d}" for i in range(jobs)]


def next_instant(interval: float, after: datetime) -> datetime:
    """The first grid instant ``EPOCH + k * interval`` strictly after ``after``, exact to the microsecond."""
    step = round(interval * 1_000_000)
    since = after - EPOCH
    us = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
    return EPOCH + timedelta(microseconds=(us // step + 1) * step)


def post_probe(url: str, job: str, scheduled_at: datetime, node: str, token: int, timeout: float = 5.0) -> None:
    """Report one run to the collector; ``started_at`` is read here, at the start of the job body.

    Raises on failure: a run the collector did not store must not look like a run that happened.
    """
    record = {"job": job, "scheduled_at": scheduled_at.astimezone(UTC).isoformat(), "node": node,
              "token": token, "started_at": datetime.now(UTC).isoformat()}
    request = urllib.request.Request(url, data=json.dumps(record).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def parser(prog: str, url_help: str) -> argparse.ArgumentParser:
    """Arguments both workers take, so the harness starts them alike."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--node", required=True, help="this worker's name in probe records")
    p.add_argument("--url", required=True, help=url_help)
    p.add_argument("--collector", required=True, help="the probe collector's POST URL")
    p.add_argument("--jobs", type=int, default=3, help="probe jobs probe-000..")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between fire times")
    p.add_argument("--ttl", type=float, default=2.0, help="lease/lock time-to-live, seconds")
    p.add_argument("--misfire-grace", type=float, default=5.0, help="how late a run may still start, seconds")
    return p


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line and exit code 2 on a value the workers cannot use."""
    if args.jobs < 1 or not args.interval > 0 or not args.ttl > 0 or args.misfire_grace < 0:
        p.error("--jobs must be >= 1, --interval and --ttl > 0, --misfire-grace >= 0")


def ready() -> None:
    print(READY, flush=True)


def fail(prog: str, message: str) -> int:
    """A worker's fatal error as one line on stderr; the harness shows the log tail."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return 1


#: What a failed POST raises, for callers that log and continue.
POST_ERRORS = (urllib.error.URLError, OSError, TimeoutError)
