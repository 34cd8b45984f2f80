"""Job registration, the run context handed to job bodies, and the built-in jobs.

Every node registers the same jobs and must compute the *same* fire times, or
claims of one fire time would carry different keys on different nodes. The
triggers that make sure of that, and the checks done at registration, are in
``node.triggers``; this module holds the job itself (``JobSpec``), the
registry users fill by decorator or by ``add_job`` (``JobRegistry``), and the
context a body gets (``RunContext``).

Promised: a job that registers without ``JobSpecError`` starts on every node;
options not given come from the registry's ``job_defaults`` (APScheduler's
``JOB_DEFAULTS``), then from the node (``BATON_MISFIRE_GRACE``, ``BATON_TIMEZONE``).
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import inspect
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from lock_backends.clock import from_us, to_us
from node.outcomes import RunKind
from node.triggers import INTERVAL_EPOCH as INTERVAL_EPOCH  # part of this module's API
from node.triggers import REFUSED, TRIGGER_FIELDS, JobSpecError, Schedule, schedule

log = logging.getLogger("baton.jobs")

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

#: A job body: called with its ``RunContext``; ``async def`` runs on the loop, a plain ``def`` in a thread.
JobFunc = Callable[[RunContext], Awaitable[object] | object]

#: Job options (besides the trigger's fields), as APScheduler's ``add_job`` names them.
OPTIONS = ("recover", "max_instances", "coalesce", "misfire_grace_time", "misfire_grace", "replace_existing",
           "description", "args", "kwargs")
#: Options a registry's ``job_defaults`` may set (APScheduler's ``JOB_DEFAULTS``, plus ``recover``).
DEFAULTABLE = ("recover", "max_instances", "coalesce", "misfire_grace_time", "replace_existing")
#: A job id is part of claim keys (``id@time``), settings keys and URL paths.
_JOB_ID = re.compile(r"[^\s@#/?%\\]{1,200}")


@dataclass(frozen=True)
class JobSpec:
    """One job, as every node registers it."""

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
    #: How late (seconds) a fire time of this job may still start, and how far back a new leader's
    #: catch-up looks for it; None: the node's ``BATON_MISFIRE_GRACE``.
    misfire_grace: float | None = None
    #: Several due fire times at once (a catch-up, a late loop) run as one, the latest; False runs each.
    coalesce: bool = True
    #: The validated trigger description, when the job came through ``node.triggers``.
    schedule: Schedule | None = None
    #: ``"code"`` (registered by the application) or ``"stored"`` (added at runtime, see node.stored_jobs).
    origin: str = "code"
    #: Fire times before this instant are never caught up (a job added or changed at runtime).
    active_from: datetime | None = None
    #: What ``GET /jobs`` shows besides the schedule (a stored job's target and arguments).
    details: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def is_async(self) -> bool:
        """Whether the body is a coroutine function (a plain ``def`` runs in the job thread pool)."""
        return inspect.iscoroutinefunction(self.func)


@dataclass
class JobRegistry:
    """Jobs every node registers identically, by decorator or ``add_job``.

    ``job_defaults`` are APScheduler's ``JOB_DEFAULTS`` (``max_instances``,
    ``coalesce``, ``misfire_grace_time``, ``replace_existing``, and
    ``recover``), applied to the jobs registered after them.
    """

    specs: dict[str, JobSpec] = field(default_factory=dict)
    job_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        defaults = dict(self.job_defaults)
        for name in defaults:
            if name not in DEFAULTABLE and name != "misfire_grace":
                near = difflib.get_close_matches(name, DEFAULTABLE, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise JobSpecError("(job_defaults)", name, f"not a job default; {hint}job_defaults takes "
                                                           f"{', '.join(DEFAULTABLE)}")
        self.job_defaults = _options("(job_defaults)", defaults)

    def add(self, spec: JobSpec, *, replace_existing: bool = True) -> None:
        """Register ``spec``; an existing id is replaced (APScheduler's ``replace_existing``) unless told not to."""
        check_job_id(spec.id)
        if not replace_existing and spec.id in self.specs:
            raise JobSpecError(spec.id, "id", "already registered (replace_existing=False)")
        if spec.schedule is None and getattr(spec.make_trigger(UTC), "jitter", None):  # hand-built: check it here
            raise JobSpecError(spec.id, "jitter", REFUSED["jitter"])
        self.specs[spec.id] = spec

    def add_job(self, func: Callable[..., Any], trigger: str, *, id: str, **kwargs: Any) -> JobSpec:
        """APScheduler's ``add_job``: ``jobs.add_job(report, "cron", id="report", hour=3, **JOB_DEFAULTS)``.

        ``kwargs`` are the trigger's fields and the job's options. With
        ``args``/``kwargs`` the function is called with them (as APScheduler
        does; ``current_run.get()`` gives the run); without, with the ``RunContext``.
        """
        spec, replace = build_spec(id, func, trigger, kwargs, self.job_defaults)
        self.add(spec, replace_existing=replace)
        return spec

    def cron(self, job_id: str, **kwargs: Any) -> Callable[[JobFunc], JobFunc]:
        """Register a cron job: ``crontab="0 3 * * mon-fri"``, or the fields year, month, day, week,
        day_of_week, hour, minute, second; optional start_date, end_date, timezone, and the job options."""
        return self._decorator(job_id, "cron", kwargs)

    def interval(self, job_id: str, **kwargs: Any) -> Callable[[JobFunc], JobFunc]:
        """Register an interval job: weeks, days, hours, minutes, seconds; optional start_date (else fire
        times count from ``INTERVAL_EPOCH``), end_date, timezone, and the job options."""
        return self._decorator(job_id, "interval", kwargs)

    def date(self, job_id: str, **kwargs: Any) -> Callable[[JobFunc], JobFunc]:
        """Register a one-shot job: ``run_date`` (a datetime or ISO string; naive in ``timezone``, else the
        node's); it runs once in the whole cluster, failovers and restarts included."""
        return self._decorator(job_id, "date", kwargs)

    def _decorator(self, job_id: str, trigger: str, kwargs: dict[str, Any]) -> Callable[[JobFunc], JobFunc]:
        # checked now, at the decorator's line, not when the function is defined
        build_spec(job_id, lambda *a, **k: None, trigger, kwargs, self.job_defaults)

        def register(func: JobFunc) -> JobFunc:
            self.add_job(func, trigger, id=job_id, **kwargs)
            return func
        return register

    def __iter__(self) -> Iterator[JobSpec]:
        return iter(self.specs.values())

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.specs


def check_job_id(job_id: object) -> None:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise JobSpecError(str(job_id), "id", "a job id is 1-200 characters, without spaces or any of @ # / ? % \\")


def build_spec(job_id: str, func: Callable[..., Any], trigger: str, given: Mapping[str, Any],
               defaults: Mapping[str, Any] | None = None, *, origin: str = "code",
               active_from: datetime | None = None, details: Mapping[str, Any] | None = None,
               ) -> tuple[JobSpec, bool]:
    """A ``JobSpec`` from APScheduler-style arguments, and its ``replace_existing``.

    Raises ``JobSpecError`` naming the job and the field for anything that
    would not run the same way on every node, or would not run at all.
    """
    check_job_id(job_id)
    if not callable(func):
        raise JobSpecError(job_id, "func", f"{func!r} is not callable")
    options = {k: v for k, v in given.items() if k in OPTIONS}
    fields = {k: v for k, v in given.items() if k not in OPTIONS}
    known = {n for names in TRIGGER_FIELDS.values() for n in names} | set(REFUSED)
    for name in fields:
        if name not in known:
            near = difflib.get_close_matches(name, [*TRIGGER_FIELDS.get(trigger, ()), *OPTIONS], n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise JobSpecError(job_id, name, f"unknown field; {hint}a {trigger} trigger takes "
                                             f"{', '.join(TRIGGER_FIELDS.get(trigger, ()))}, and the job options "
                                             f"{', '.join(o for o in OPTIONS if o != 'misfire_grace')}")
    sched = schedule(job_id, trigger, fields)
    call_args = options.pop("args", None)
    call_kwargs = options.pop("kwargs", None)
    opts = {**(defaults or {}), **_options(job_id, options)}
    if call_args is not None or call_kwargs is not None:
        func = call_with(job_id, func, call_args, call_kwargs)
    doc = (getattr(func, "__doc__", None) or "").strip()
    spec = JobSpec(job_id, func, sched.build, recover=opts.get("recover", False),
                   description=opts.get("description") or doc,
                   max_instances=opts.get("max_instances", 1), misfire_grace=opts.get("misfire_grace_time"),
                   coalesce=opts.get("coalesce", True), schedule=sched, origin=origin, active_from=active_from,
                   details=dict(details or {}))
    return spec, bool(opts.get("replace_existing", True))


def _options(job_id: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Job options checked and normalized (``misfire_grace`` is an alias of ``misfire_grace_time``)."""
    out = dict(options)
    if "misfire_grace" in out:
        if "misfire_grace_time" in out:
            raise JobSpecError(job_id, "misfire_grace", "given twice: misfire_grace and misfire_grace_time")
        out["misfire_grace_time"] = out.pop("misfire_grace")
    for name in ("recover", "coalesce", "replace_existing"):
        if name in out and not isinstance(out[name], bool):
            raise JobSpecError(job_id, name, f"{out[name]!r} is not true or false")
    if "max_instances" in out:
        n = out["max_instances"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise JobSpecError(job_id, "max_instances", f"{n!r} is not an integer 1 or more")
    if "misfire_grace_time" in out:
        g = out["misfire_grace_time"]
        if g is None:
            raise JobSpecError(job_id, "misfire_grace_time", "None (no limit) is not supported: a new leader's "
                                                             "catch-up looks back this far; give seconds")
        if isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g) or g <= 0:
            raise JobSpecError(job_id, "misfire_grace_time", f"{g!r} is not a positive number of seconds")
        out["misfire_grace_time"] = float(g)
    if "description" in out and not isinstance(out["description"], str):
        raise JobSpecError(job_id, "description", f"{out['description']!r} is not a string")
    return out


def call_with(job_id: str, func: Callable[..., Any], args: Any, kwargs: Any) -> JobFunc:
    """A body that calls ``func(*args, **kwargs)`` (async stays async, a plain def stays plain)."""
    args = [] if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(args, list | tuple):
        raise JobSpecError(job_id, "args", f"{args!r} is not a list")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise JobSpecError(job_id, "kwargs", f"{kwargs!r} is not an object with string keys")
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise JobSpecError(job_id, "args", f"do not fit {getattr(func, '__qualname__', func)!s}: {exc}") from None
    except ValueError:  # no signature to check (a builtin): the call will tell
        pass
    frozen_args, frozen_kwargs = tuple(args), dict(kwargs)
    if inspect.iscoroutinefunction(func):
        async def run_async(run: RunContext) -> object:
            return await func(*frozen_args, **frozen_kwargs)
        body: JobFunc = run_async
    else:
        def run_sync(run: RunContext) -> object:
            return func(*frozen_args, **frozen_kwargs)
        body = run_sync
    body.__doc__ = getattr(func, "__doc__", None)
    return body


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
    if t is not None and t < start:  # APScheduler's DateTrigger answers its date whatever "now" is
        t = trigger.get_next_fire_time(t, start)
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
