"""Job registration, the run context handed to job bodies, and the built-in jobs.

Every node must compute the *same* fire times, or claims of one fire time
would carry different keys on different nodes. Cron triggers are deterministic
already; interval triggers are anchored to a fixed epoch (APScheduler's
default anchor is "now", which differs per node).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from lock_backends.clock import from_us, to_us
from node.outcomes import RunKind

log = logging.getLogger("baton.jobs")

#: Interval triggers count from here, on every node alike.
INTERVAL_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class RunContext:
    """What a job body knows about its run. ``token`` lets it fence its own writes."""

    job_id: str
    scheduled_at: datetime
    token: int
    node_id: str
    key: str
    kind: RunKind = RunKind.SCHEDULED

    @property
    def recovery(self) -> bool:
        return self.kind is RunKind.RECOVERY


#: The run being executed, for code deep inside a job body.
current_run: contextvars.ContextVar[RunContext] = contextvars.ContextVar("baton_current_run")

JobFunc = Callable[[RunContext], Awaitable[object]]


@dataclass(frozen=True)
class JobSpec:
    id: str
    func: JobFunc
    make_trigger: Callable[[tzinfo], BaseTrigger]
    #: Run again on the next leader if the leader that claimed it died before finishing
    #: (Quartz's requestsRecovery).
    recover: bool = False
    description: str = ""
    #: Runs of this job allowed at once in the whole cluster; a fire time that finds them all still
    #: going is skipped and counted (APScheduler's ``max_instances``).
    max_instances: int = 1

    @functools.cached_property
    def is_async(self) -> bool:
        """Whether the body is a coroutine function (a plain ``def`` runs in the job thread pool)."""
        return inspect.iscoroutinefunction(self.func)


@dataclass
class JobRegistry:
    """Jobs every node registers identically, by decorator."""

    specs: dict[str, JobSpec] = field(default_factory=dict)

    def add(self, spec: JobSpec) -> None:
        self.specs[spec.id] = spec  # replace_existing, as APScheduler's add_job does

    def interval(self, job_id: str, *, seconds: float, recover: bool = False) -> Callable[[JobFunc], JobFunc]:
        def register(func: JobFunc) -> JobFunc:
            self.add(JobSpec(job_id, func, lambda tz: every(seconds, tz), recover, (func.__doc__ or "").strip()))
            return func
        return register

    def cron(self, job_id: str, *, recover: bool = False, **fields: str | int) -> Callable[[JobFunc], JobFunc]:
        def register(func: JobFunc) -> JobFunc:
            self.add(JobSpec(job_id, func, lambda tz: CronTrigger(timezone=tz, **fields), recover,
                             (func.__doc__ or "").strip()))
            return func
        return register

    def __iter__(self) -> Iterator[JobSpec]:
        return iter(self.specs.values())

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.specs


def every(seconds: float, tz: tzinfo) -> IntervalTrigger:
    """An interval trigger whose fire times are the same on every node."""
    return IntervalTrigger(seconds=seconds, start_date=INTERVAL_EPOCH, timezone=tz)


def claim_key(job_id: str, scheduled_at: datetime) -> str:
    return f"{job_id}@{scheduled_at.astimezone(UTC).isoformat()}"


def parse_claim_key(key: str) -> tuple[str, datetime] | None:
    job_id, sep, when = key.partition("@")
    if not sep:
        return None
    try:
        return job_id, datetime.fromisoformat(when.split("#", 1)[0])
    except ValueError:
        return None


def fire_times(trigger: BaseTrigger, start: datetime, end: datetime, limit: int = 100_000) -> list[datetime]:
    """Fire times of ``trigger`` in [start, end], oldest first."""
    times: list[datetime] = []
    t = trigger.get_next_fire_time(None, start)
    while t is not None and t <= end and len(times) < limit:
        times.append(t)
        t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
    return times


def count_fire_times(trigger: BaseTrigger, start: datetime, end: datetime, limit: int = 1_000_000) -> int:
    """How many fire times ``trigger`` has in [start, end] (at most ``limit``), without listing interval ones."""
    if end < start:
        return 0
    if isinstance(trigger, IntervalTrigger) and trigger.end_date is None:
        step, anchor = _us(trigger.interval), to_us(trigger.start_date)
        first = max(0, -((anchor - to_us(start)) // step))  # ceil((start - anchor) / step), not before the anchor
        last = (to_us(end) - anchor) // step
        return max(0, min(limit, last - first + 1))
    return len(fire_times(trigger, start, end, limit))


def latest_fire_time(trigger: BaseTrigger, start: datetime, end: datetime) -> datetime | None:
    """The last fire time of ``trigger`` in [start, end], or None."""
    if isinstance(trigger, IntervalTrigger) and trigger.end_date is None:  # O(1) instead of walking the window
        step, anchor = _us(trigger.interval), to_us(trigger.start_date)
        n = (to_us(end) - anchor) // step
        if n < 0:
            return None
        t = from_us(anchor + n * step)
        return t if t >= start else None
    times = fire_times(trigger, start, end)
    return times[-1] if times else None


def _us(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# -- the jobs every node ships -------------------------------------------------------

def demo_registry(data_dir: Path | None = None) -> JobRegistry:
    """``daily-aggregate`` and ``heartbeat``, in the usual shape of APScheduler guides."""
    jobs = JobRegistry()
    out = data_dir or Path(tempfile.gettempdir()) / "baton-aggregates"

    @jobs.cron("daily-aggregate", hour=3, minute=0, recover=True)
    async def daily_aggregate(run: RunContext) -> None:
        """Summarize yesterday. Idempotent: one file per day, replaced whole, fenced by token."""
        day: date = run.scheduled_at.date() - timedelta(days=1)
        write_fenced(out / f"{day.isoformat()}.json", run.token,
                     {"day": day.isoformat(), "computed_by": run.node_id, "token": run.token})

    @jobs.interval("heartbeat", seconds=30)
    async def heartbeat(run: RunContext) -> None:
        """Log that the leader is alive and firing."""
        log.info("heartbeat", extra={"job": run.job_id, "scheduled_at": run.scheduled_at.isoformat()})

    return jobs


def write_fenced(path: Path, token: int, payload: dict[str, object]) -> bool:
    """A fenced sink: refuse a write whose token is lower than the one already stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if int(json.loads(path.read_text()).get("token", 0)) > token:
            return False
    except (FileNotFoundError, ValueError):
        pass
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
    return True
