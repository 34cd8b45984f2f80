"""Triggers every node computes alike: APScheduler 3's cron, interval and date, checked when a job is registered.

Every node must compute the *same* fire times, or the claims of one fire time
would carry different keys on different nodes. So:

* interval triggers count from a fixed epoch (``INTERVAL_EPOCH``) unless a
  ``start_date`` is given: APScheduler's default anchor is "now", which
  differs per node;
* ``jitter`` is refused: each node would draw its own delay;
* a date trigger is a ``OnceTrigger``: its one fire time exists only at or
  after "now", so a new leader, a restarted node or a resumed job never sees a
  past one-shot as due (the catch-up still finds it, by looking at the gap in
  the claim windows, where it belongs);
* ``crontab="..."`` strings follow cron, where 0 and 7 are Sunday (APScheduler
  3's own ``day_of_week`` field counts 0 as Monday; the field keeps that meaning).

What is promised: ``schedule`` either returns a ``Schedule`` that builds a
trigger on every node alike, or raises ``JobSpecError`` naming the job and the
field at fault. Nothing that passed it fails later at node start.
"""

from __future__ import annotations

import difflib
import math
import re
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

#: Interval triggers without a ``start_date`` count from here, on every node alike.
INTERVAL_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

CRON_FIELDS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")
INTERVAL_FIELDS = ("weeks", "days", "hours", "minutes", "seconds")
#: The fields each trigger kind accepts (besides the job options of ``node.jobs``).
TRIGGER_FIELDS: dict[str, tuple[str, ...]] = {
    "cron": (*CRON_FIELDS, "crontab", "start_date", "end_date", "timezone"),
    "interval": (*INTERVAL_FIELDS, "start_date", "end_date", "timezone"),
    "date": ("run_date", "timezone"),
}
#: Accepted by APScheduler, refused here, and why.
REFUSED = {
    "jitter": "refused: each node would draw its own random delay, so nodes would disagree on fire times "
              "(and on claims); spread jobs with distinct cron fields or interval start_date values instead",
    "next_run_time": "refused: fire times come from the trigger alone, the same on every node",
}
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_TZ = re.compile(r"^\s*(?:CRON_TZ|TZ)=(\S+)\s+")


class JobSpecError(ValueError):
    """A job cannot be registered as given. ``job_id`` and ``field`` name what to fix."""

    def __init__(self, job_id: str, field: str, message: str) -> None:
        self.job_id = job_id
        self.field = field
        self.reason = message
        super().__init__(f"job {job_id!r}: {field}: {message}")


class OnceTrigger(DateTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped: its classes are Any
    """A date trigger whose fire time is due only once, and never again once it lies in the past.

    APScheduler's ``DateTrigger`` answers its run date to any "next fire time
    after now" question, even long after it: a new leader realigning its jobs,
    a resumed job, or a catch-up listing a gap would each see an old one-shot
    as due again (and the gate would then count it lost or a duplicate).
    """

    run_date: datetime  # set by DateTrigger

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        if previous_fire_time is not None or self.run_date < now:
            return None
        return self.run_date

    def __str__(self) -> str:
        return f"date[{self.run_date.isoformat()}]"


@dataclass(frozen=True, eq=False)
class Schedule:
    """A validated trigger description: builds the same trigger on every node.

    ``fields`` are the trigger's fields, normalized (datetimes parsed, numbers
    checked). ``timezone`` is the job's own zone, or None for the node's
    (``BATON_TIMEZONE``).
    """

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    timezone: str | tzinfo | None = None

    def build(self, default_tz: tzinfo) -> BaseTrigger:
        tz = _zone(self.timezone) if self.timezone is not None else default_tz
        f = dict(self.fields)
        if self.kind == "date":
            return OnceTrigger(run_date=f["run_date"], timezone=tz)
        if self.kind == "interval":
            amounts = {k: f[k] for k in INTERVAL_FIELDS if k in f}
            return IntervalTrigger(**amounts, start_date=f.get("start_date") or INTERVAL_EPOCH,
                                   end_date=f.get("end_date"), timezone=tz)
        if "crontab" in f:
            minute, hour, day, month, day_of_week = f.pop("crontab").split()
            f.update(minute=minute, hour=hour, day=day, month=month, day_of_week=_crontab_days(day_of_week))
        return CronTrigger(timezone=tz, **f)

    @property
    def one_shot(self) -> bool:
        return self.kind == "date"

    def describe(self) -> dict[str, Any]:
        """The schedule as JSON (for GET /jobs)."""
        out: dict[str, Any] = {"type": self.kind}
        for k, v in self.fields.items():
            out[k] = v.isoformat() if isinstance(v, datetime) else v
        if self.timezone is not None:
            out["timezone"] = str(self.timezone)
        return out


def schedule(job_id: str, kind: str, given: dict[str, Any]) -> Schedule:
    """Validate ``given`` trigger fields for a ``kind`` trigger; raises ``JobSpecError`` naming the field."""
    if kind not in TRIGGER_FIELDS:
        raise JobSpecError(job_id, "trigger", f"{kind!r} is not a trigger; use one of {', '.join(TRIGGER_FIELDS)}")
    accepted = TRIGGER_FIELDS[kind]
    for name in given:
        if name not in accepted:
            raise JobSpecError(job_id, name, _unknown(name, kind, accepted))
    fields = dict(given)
    timezone = fields.pop("timezone", None)
    if timezone is not None:
        _check_zone(job_id, "timezone", timezone)
    if kind == "cron":
        timezone = _cron_fields(job_id, fields, timezone)
    elif kind == "interval":
        _interval_fields(job_id, fields)
    elif "run_date" not in fields or fields["run_date"] is None:
        raise JobSpecError(job_id, "run_date", "a date trigger needs run_date (a datetime or an ISO 8601 string)")
    for name in ("start_date", "end_date", "run_date"):
        if fields.get(name) is not None:
            fields[name] = _datetime(job_id, name, fields[name])
        else:
            fields.pop(name, None)
    start, end = fields.get("start_date"), fields.get("end_date")
    if start is not None and end is not None and _comparable(end) <= _comparable(start):
        raise JobSpecError(job_id, "end_date", f"{end.isoformat()} is not after start_date {start.isoformat()}")
    result = Schedule(kind, fields, timezone)
    try:
        result.build(UTC)
    except (ValueError, TypeError) as exc:
        raise JobSpecError(job_id, _culprit(job_id, kind, fields) or kind, str(exc)) from None
    return result


def _cron_fields(job_id: str, fields: dict[str, Any], timezone: Any) -> Any:
    for name in CRON_FIELDS:
        value = fields.get(name)
        if value is None:
            fields.pop(name, None)
        elif isinstance(value, bool) or not isinstance(value, int | str):
            raise JobSpecError(job_id, name, f"{value!r} is not a cron expression (an int or a string)")
    crontab = fields.get("crontab")
    if crontab is None:
        fields.pop("crontab", None)
        if not any(name in fields for name in CRON_FIELDS):
            raise JobSpecError(job_id, "cron", "give crontab='m h dom mon dow' or at least one cron field "
                                               f"({', '.join(CRON_FIELDS)})")
        return timezone
    if not isinstance(crontab, str):
        raise JobSpecError(job_id, "crontab", f"{crontab!r} is not a string like '0 3 * * mon-fri'")
    clash = [name for name in CRON_FIELDS if name in fields]
    if clash:
        raise JobSpecError(job_id, clash[0], "give either crontab or the cron fields, not both")
    zone = _CRON_TZ.match(crontab)
    if zone is not None:
        if timezone is not None and str(timezone) != zone.group(1):
            raise JobSpecError(job_id, "timezone", f"given twice: timezone={timezone!s} and "
                                                   f"{zone.group(0).strip()} in the crontab")
        _check_zone(job_id, "crontab", zone.group(1))
        timezone, crontab = zone.group(1), crontab[zone.end():]
    if len(crontab.split()) != 5:
        raise JobSpecError(job_id, "crontab", f"{crontab!r} has {len(crontab.split())} fields; a crontab has 5: "
                                              "minute hour day-of-month month day-of-week")
    try:
        _crontab_days(crontab.split()[4])
    except ValueError as exc:
        raise JobSpecError(job_id, "crontab", str(exc)) from None
    fields["crontab"] = " ".join(crontab.split())
    return timezone


def _interval_fields(job_id: str, fields: dict[str, Any]) -> None:
    total = 0.0
    for name in INTERVAL_FIELDS:
        value = fields.get(name)
        if value is None:
            fields.pop(name, None)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise JobSpecError(job_id, name, f"{value!r} is not a number of {name}, 0 or more")
        total += value * {"weeks": 604_800, "days": 86_400, "hours": 3_600, "minutes": 60, "seconds": 1}[name]
    if total < 0.001:
        raise JobSpecError(job_id, "seconds", "an interval needs a positive length (weeks, days, hours, minutes "
                                              "or seconds; 1 ms at least)")


def _crontab_days(expr: str) -> str:
    """A crontab day-of-week field (0 or 7 is Sunday) in names APScheduler 3 reads the same way."""
    if expr == "*" or re.search(r"[a-zA-Z]", expr):
        return expr
    days: set[int] = set()
    for part in expr.split(","):
        match = re.fullmatch(r"(\*|\d+)(?:-(\d+))?(?:/(\d+))?", part)
        if match is None:
            raise ValueError(f"{expr!r} is not a day-of-week field (0-7, ranges, lists, steps or names)")
        lo_s, hi_s, step_s = match.groups()
        lo, hi = (0, 6) if lo_s == "*" else (int(lo_s), int(hi_s if hi_s is not None else lo_s))
        if step_s is not None and hi_s is None and lo_s != "*":
            hi = 7
        step = int(step_s or 1)
        if not (0 <= lo <= hi <= 7) or step < 1:
            raise ValueError(f"{part!r} is not a day of week in 0-7 (0 and 7 are Sunday)")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def _datetime(job_id: str, name: str, value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise JobSpecError(job_id, name, f"{value!r} is not a datetime or an ISO 8601 string such as "
                                     "2026-12-01T03:00:00+00:00")


def _comparable(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _zone(value: str | tzinfo) -> tzinfo:
    return zoneinfo.ZoneInfo(value) if isinstance(value, str) else value


def _check_zone(job_id: str, name: str, value: Any) -> None:
    if isinstance(value, tzinfo):
        return
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise JobSpecError(job_id, name, f"{value!r} is not an IANA time zone such as UTC or Europe/Berlin") from None


def _culprit(job_id: str, kind: str, fields: dict[str, Any]) -> str | None:
    """Which single field makes the trigger fail to build, if one alone does."""
    for name, value in fields.items():
        try:
            if kind == "cron" and name in CRON_FIELDS:
                CronTrigger(timezone=UTC, **{name: value})
            elif kind == "cron" and name == "crontab":
                Schedule("cron", {"crontab": value}).build(UTC)
        except (ValueError, TypeError):
            return name
    return None


def _unknown(name: str, kind: str, accepted: tuple[str, ...]) -> str:
    if name in REFUSED:
        return REFUSED[name]
    other = [k for k, names in TRIGGER_FIELDS.items() if name in names]
    if other:
        return f"not a field of a {kind} trigger (it belongs to {' and '.join(other)}); a {kind} trigger takes " \
               f"{', '.join(accepted)}"
    near = difflib.get_close_matches(name, accepted, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown field; {hint}a {kind} trigger takes {', '.join(accepted)}"
