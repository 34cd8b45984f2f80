"""Judge a load test from the probe collector's records alone.

The checker reads the collector's JSONL file (and, optionally, the chaos log);
it never asks the nodes anything, because the nodes are what is on trial.

Schedule
    The probe jobs come from a shape spec (``--probes``, ``node.probes``): per
    shape, ``COUNT`` jobs (``probe-000`` .., ``sparse-000`` .., ``long-000`` ..,
    ``recover-000`` ..), each firing every ``INTERVAL`` seconds at ``EPOCH + k *
    INTERVAL`` (the same instants on every node). ``--jobs N --interval S`` is
    ``basic:N@S``. Each job has its own grid; an expected run is a (job, fire
    time) in the job's window.

Records
    A probe record is ``{job, scheduled_at, node, token, started_at}`` plus, from
    newer probes, ``kind`` (scheduled, catch_up, recovery, manual; missing means
    scheduled) and ``shape``; the collector adds ``received_at`` (its own clock).
    Manual runs (``POST /admin/jobs/{id}/run``) are off the schedule: counted,
    never judged.

Window
    Per job, from its first fire time at or after the earliest ``scheduled_at``
    in the records (the first fire time the cluster's first leader ran: what came
    before was cluster start-up; a new cluster does not run fire times from
    before it existed, as APScheduler does not for a job added now) to the last
    fire time at or before ``end``. An explicit ``start`` can only narrow the window (e.g. past an
    earlier run's records in an appended file): records scheduled before it are
    ignored. ``end`` defaults to the latest ``scheduled_at`` (or now). Runs
    scheduled after ``end`` are still evidence, never expected runs.

Duplicate starts
    A (job, scheduled_at) pair with more than one record. Exception, reported
    under *at-least-once recovery*: a recoverable job's second start whose later
    start is a ``recovery`` run, after a crash fault (``kill``, or a ``pause`` or
    ``partition`` past the TTL: the README's guarantees treat them alike; chaos log)
    of the node of the start before it, between the two starts (Quartz's
    ``requestsRecovery``: the body may have run before its node died, or stalled
    before it could say so). Any other double start is a duplicate. ``duplicates``
    counts pairs, not extra starts.

Fenced-sink duplicates
    Per job, records in ``started_at`` order; a sink accepts a record iff its
    token is >= the highest token it has seen for that job. Pairs accepted more
    than once are counted, at-least-once recoveries aside. A stale leader's late
    run is a duplicate start but not a fenced-sink duplicate.

Early runs
    A run that started before its fire time by more than ``--early-tolerance``
    (default 0.05 s): by the node's own ``started_at``, or by the collector's
    ``received_at``, which a node with a clock running ahead cannot fake (a run
    is received after it started). Manual runs aside. Every early run fails.

Missed fire times (strict)
    An expected (job j, fire time t) without a run (of any kind but manual) is
    excused only with evidence, and each excuse names it:

    (a) leaderless: the cluster had no leader for longer than the grace after
        t: the first run of any later fire time started more than
        ``misfire_grace`` after t, under a newer token than every run started
        up to t. The catch-up cannot reach that far back. Names that first run.
    (b) catch_up: j's next run after t is a ``catch_up`` run (the record says so)
        that started within ``misfire_grace`` (+1 s for the claims) of t, under a
        newer token than j's run before t, and no older leader ran any later fire
        time than t (a leader that skips a fire time while it keeps firing has
        missed it). Names that catch-up run.
    (c) lost to a crash, reported apart (``lost_to_crash``), not as excused: t
        lies in ``[fault - crash_slack, fault + claim_ahead + crash_slack]`` of a
        ``kill``, ``pause`` or ``partition`` that hit the leader (the node that
        holds the highest token started before the fault), or of a
        ``restart-backend`` (it ends the leader's lease whatever its target);
        j is not recoverable, and j's next run carries a newer token than that
        leader's. That leader may have claimed t ahead and never started it:
        at-most-once by design (``BATON_CLAIM_AHEAD``). Names the fault and the
        window.
    (d) window_end: j has no run after t at all and ``end - t <= misfire_grace
        + interval``: its run, or the catch-up that covers it, may still come.

    A recoverable job's fire time in such a crash window needs a run of its own
    (a recovery run counts): (a) to (c) do not apply to it. This assumes the
    failover takes less than the job's interval (else a later fire time's
    catch-up would legitimately stand for a fire time nobody claimed).

    Everything else is a miss, listed with the reason no excuse applied.
    (``excused`` also carries ``coalesced``, the catch-up count under its
    pre-#12 name, for readers of older reports.)

Leaderless gaps
    On the finest grid (the jobs with the smallest interval): an instant is
    *run* if one of those jobs has a record for it. A gap is a maximal run of
    instants that are not run, bounded on both sides by run instants; ``start``
    is its first missing instant, ``end`` the closing instant, ``duration_s =
    end - start``, ``wall_s`` the wall time between the last start before it
    and the first start at its closing instant. Percentiles are nearest-rank
    over ``duration_s``. Missing instants after the last run instant form the
    ``open_gap``, reported apart.

Handoffs
    Records in ``started_at`` order; each record whose token exceeds every
    token seen before is a handoff (the first token is not). Records whose
    token is below the highest seen so far are ``stale_records``.

Faults (with ``--chaos-log``)
    For each fault entry whose ``phase`` is not ``end``: the failover time is
    from its ``ts`` to the first record started after it whose token exceeds
    every token started at or before ``ts``, if that record starts before the
    next fault; otherwise none was observed (e.g. a follower was hit). An aimed
    fault's entry carries ``aim`` and the ``fire_time`` it was aimed at.

Verdict
    ``fail`` (exit 1) on a duplicate start, a miss or an early run, or when
    there is no record at all (nothing proven); ``pass`` (exit 0) otherwise,
    with what was lost to a crash and what was recovered at least once listed
    under their own headings. Bad input exits 2 with one line naming the file
    and line. A last line without its newline that does not parse is a torn
    write the collector never acknowledged: it is ignored with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

# The probe schedule (shapes, job ids, intervals), the interval grid and the run kinds a record names are a
# description of the workload and its records, shared with the nodes that run it; nothing of how a node
# behaves is imported.
from node.outcomes import RunKind
from node.probes import SPEC_FORM, ProbeShape, ProbeSpecError, parse_shapes, spec_text
from node.triggers import INTERVAL_EPOCH

#: Interval fire times count from here.
EPOCH = INTERVAL_EPOCH
#: A scheduled_at this close to a grid instant is that instant (float intervals, clock formatting).
GRID_TOLERANCE_US = 1000
#: Lists in the report are cut here; the counts next to them are complete.
LIST_LIMIT = 100
#: The nodes' default ``BATON_CLAIM_AHEAD`` (a test asserts they agree): the longest lead of a claim.
DEFAULT_CLAIM_AHEAD = 0.25
#: Seconds around a crash window: the fault is logged just before it is applied, and runs start a little late.
CRASH_SLACK = 0.1
#: A run may start this much before its fire time (clock reading, formatting) before it is early.
EARLY_TOLERANCE = 0.05
#: A catch-up looks back the grace from the moment its node won; its runs start a little after that.
CATCH_UP_SLACK_US = 1_000_000
#: Run kinds a record may name (``node.outcomes.RunKind``). A record without one is scheduled.
KINDS = tuple(k.value for k in RunKind)
#: Faults after which the leader may hold claims it never starts: the at-most-once window of a crash.
CRASH_FAULTS = ("kill", "pause", "partition")
#: Faults that end the leader's lease at once without a handoff, whatever their target: a lock-store restart
#: (PostgreSQL drops the session that held the advisory lock). Its claims ahead are at-most-once, as in a crash.
LEASE_ENDING_FAULTS = ("restart-backend",)
#: Crash faults that leave the process alive but cut off: its lease may outlast the fault's start.
ISOLATING_FAULTS = ("pause", "partition")

REQUIRED_FIELDS: dict[str, type] = {"job": str, "scheduled_at": str, "node": str, "token": int, "started_at": str}


class InputError(ValueError):
    """Bad input; the message is one line naming the file and line (or record) at fault."""


def parse_time(value: object) -> datetime:
    """An ISO 8601 timestamp with an offset, as UTC. Naive times are refused: nodes' zones may differ."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a timestamp string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return parsed.astimezone(UTC)


def probe_problem(obj: object) -> str | None:
    """Why ``obj`` is not a probe record, or None. Shared with the collector, which refuses what this refuses.

    ``kind`` and ``shape`` are optional (older probes do not send them); when present they must be non-empty
    strings. An unknown kind is accepted here (a newer node may know more kinds) and warned about by the check.
    """
    if not isinstance(obj, dict):
        return "a probe record must be a JSON object"
    for key, kind in REQUIRED_FIELDS.items():
        if key not in obj:
            return f"missing field {key!r}"
        value = obj[key]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"field {key!r} must be an integer"
        elif not isinstance(value, str) or not value:
            return f"field {key!r} must be a non-empty string"
    for key in ("kind", "shape"):
        if key in obj and (not isinstance(obj[key], str) or not obj[key]):
            return f"field {key!r} must be a non-empty string when present"
    for key in ("scheduled_at", "started_at", *(("received_at",) if "received_at" in obj else ())):
        try:
            parse_time(obj[key])
        except ValueError as exc:
            return f"field {key!r}: {exc}"
    return None


@dataclass(frozen=True)
class Probe:
    job: str
    scheduled_at: datetime
    node: str
    token: int
    started_at: datetime
    order: int  # position in the input, to keep sorts stable and reproducible
    sched_us: int  # scheduled_at as microseconds since EPOCH: exact, hashable, cheap to compare
    kind: str = RunKind.SCHEDULED
    received_at: datetime | None = None

    @classmethod
    def from_dict(cls, obj: object, order: int, where: str) -> Probe:
        problem = probe_problem(obj)
        if problem is not None:
            raise InputError(f"{where}: {problem}")
        assert isinstance(obj, dict)
        scheduled_at = parse_time(obj["scheduled_at"])
        received = parse_time(obj["received_at"]) if "received_at" in obj else None
        return cls(obj["job"], scheduled_at, obj["node"], obj["token"], parse_time(obj["started_at"]), order,
                   Grid.micros(scheduled_at), str(obj.get("kind", RunKind.SCHEDULED)), received)

    @property
    def early_by(self) -> float:
        """Seconds this run started before its fire time, by the node's clock or by the collector's."""
        starts = [self.started_at] + ([self.received_at] if self.received_at is not None else [])
        return (self.scheduled_at - min(starts)).total_seconds()

    def ref(self) -> dict[str, Any]:
        """The run as evidence: which job, which fire time, which node and token, what kind."""
        return {"job": self.job, "scheduled_at": iso(self.scheduled_at), "node": self.node, "token": self.token,
                "kind": self.kind, "started_at": iso(self.started_at)}


@dataclass(frozen=True)
class Grid:
    """Fire instants as integers k: ``EPOCH + k * interval``, in whole microseconds to stay exact."""

    interval_us: int

    @classmethod
    def of(cls, interval: float) -> Grid:
        return cls(round(interval * 1_000_000))

    @staticmethod
    def micros(t: datetime) -> int:
        d = t - EPOCH
        return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds

    def index(self, us: int) -> int | None:
        """The instant at ``us`` microseconds since EPOCH, or None if that lies off the grid."""
        k, rem = divmod(us, self.interval_us)
        if rem <= GRID_TOLERANCE_US:
            return k
        if self.interval_us - rem <= GRID_TOLERANCE_US:
            return k + 1
        return None

    def first_at_or_after(self, t: datetime) -> int:
        return -(-(self.micros(t) - GRID_TOLERANCE_US) // self.interval_us)

    def last_at_or_before(self, t: datetime) -> int:
        return (self.micros(t) + GRID_TOLERANCE_US) // self.interval_us

    def time(self, k: int) -> datetime:
        return EPOCH + timedelta(microseconds=k * self.interval_us)


def job_names(jobs: int) -> list[str]:
    """The basic probe job ids, as ``node.probes`` names them."""
    return [f"probe-{i:03d}" for i in range(jobs)]


def schedule_of(probes: str | list[ProbeShape] | None, jobs: int | None, interval: float | None) -> list[ProbeShape]:
    """The probe shapes to judge: a spec (or parsed shapes), else ``jobs`` basic probes every ``interval``."""
    if isinstance(probes, str):
        try:
            shapes = parse_shapes(probes, count=jobs if jobs is not None else 1,
                                  interval=interval if interval is not None else 1.0)
        except ProbeSpecError as exc:
            raise InputError(f"--probes: {exc}; expected {SPEC_FORM}") from None
    elif probes is not None:
        shapes = list(probes)
    else:
        if jobs is None or interval is None:
            raise InputError("no probe schedule: give --probes, or --jobs and --interval")
        if jobs < 1:
            raise InputError("--jobs must be at least 1")
        if not interval > 0:
            raise InputError("--interval must be positive")
        shapes = [ProbeShape("basic", jobs, interval)]
    shapes = [s for s in shapes if s.count > 0]
    if not shapes:
        raise InputError("--probes: no probe jobs in the spec")
    return shapes


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: always a value that was observed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def stats(values: list[float], prefix: str = "") -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)
    return {f"{prefix}p50_s": r(percentile(values, 50)), f"{prefix}p99_s": r(percentile(values, 99)),
            f"{prefix}max_s": r(max(values) if values else None)}


@dataclass(frozen=True)
class CrashWindow:
    """Fire times a leader hit by a crash-like fault may have claimed ahead and never started."""

    fault: str
    target: str
    ts: datetime
    leader_token: int
    start_us: int
    end_us: int

    def describe(self) -> dict[str, Any]:
        return {"fault": {"fault": self.fault, "target": self.target, "ts": iso(self.ts),
                          "leader_token": self.leader_token},
                "window": {"start": iso(EPOCH + timedelta(microseconds=self.start_us)),
                           "end": iso(EPOCH + timedelta(microseconds=self.end_us))}}


def fault_starts(chaos: list[dict[str, Any]]) -> list[tuple[datetime, dict[str, Any]]]:
    """The fault entries that start a fault, in time order; a bad entry is an :class:`InputError`."""
    starts: list[tuple[datetime, dict[str, Any]]] = []
    for i, entry in enumerate(chaos):
        problem = chaos_problem(entry)
        if problem is not None:
            raise InputError(f"chaos entry {i + 1}: {problem}")
        if entry.get("phase", "start") != "end":
            starts.append((parse_time(entry["ts"]), entry))
    starts.sort(key=lambda s: s[0])
    return starts


def fault_ends(chaos: list[dict[str, Any]]) -> list[tuple[datetime, dict[str, Any]]]:
    """The fault entries that end a fault, in time order (``fault_starts`` has checked every entry)."""
    return sorted(((parse_time(e["ts"]), e) for e in chaos if e.get("phase") == "end"), key=lambda s: s[0])


class Evidence:
    """Questions about who ran what when, answered from all judged records (including those after ``end``)."""

    def __init__(self, probes: list[Probe]) -> None:
        self.by_sched = sorted(probes, key=lambda p: (p.sched_us, p.started_at, p.order))
        self.sched_keys = [p.sched_us for p in self.by_sched]
        n = len(self.by_sched)
        # suffix minima over fire time order: the first start, and the oldest token, of any later fire time
        self.first_start_after: list[Probe | None] = [None] * (n + 1)
        self.min_token_after: list[int | None] = [None] * (n + 1)
        for i in range(n - 1, -1, -1):
            p, best = self.by_sched[i], self.first_start_after[i + 1]
            self.first_start_after[i] = p if best is None or (p.started_at, p.order) < (best.started_at,
                                                                                         best.order) else best
            low = self.min_token_after[i + 1]
            self.min_token_after[i] = p.token if low is None else min(low, p.token)
        self.by_started = sorted(probes, key=lambda p: (p.started_at, p.order))
        self.started_keys = [p.started_at for p in self.by_started]
        self.top_token_until: list[int | None] = []
        top: int | None = None
        for p in self.by_started:
            top = p.token if top is None else max(top, p.token)
            self.top_token_until.append(top)

    def _after(self, us: int) -> int:
        return bisect_right(self.sched_keys, us + GRID_TOLERANCE_US)

    def first_run_of_a_later_fire_time(self, us: int) -> Probe | None:
        return self.first_start_after[self._after(us)]

    def older_leader_fired_later(self, us: int, token: int) -> bool:
        """Did a token older than ``token`` start a run of any fire time later than ``us``?"""
        low = self.min_token_after[self._after(us)]
        return low is not None and low < token

    def top_token_started_by(self, t: datetime) -> int | None:
        i = bisect_right(self.started_keys, t)
        return self.top_token_until[i - 1] if i else None

    def leader_at(self, t: datetime) -> Probe | None:
        """The run that shows who led at ``t``: the highest token started by then (latest of them)."""
        i = bisect_right(self.started_keys, t)
        before = self.by_started[:i]
        return max(before, key=lambda p: (p.token, p.started_at, p.order)) if before else None


def check(records: list[dict[str, Any]], *, start: datetime | None, end: datetime | None, misfire_grace: float,
          jobs: int | None = None, interval: float | None = None, probes: str | list[ProbeShape] | None = None,
          chaos: list[dict[str, Any]] | None = None, strict: bool = True,
          claim_ahead: float = DEFAULT_CLAIM_AHEAD, crash_slack: float = CRASH_SLACK,
          early_tolerance: float = EARLY_TOLERANCE) -> dict[str, Any]:
    """Everything the checker reports, as one JSON-ready dict, by the rules of this module's docstring.

    ``records`` are probe objects as the collector stores them (extra keys are ignored). The schedule is
    ``probes`` (a spec or shapes), else ``jobs`` basic probes every ``interval``. ``strict`` is accepted for
    old callers and ignored: the rules are strict. Raises :class:`InputError` on a bad record or schedule,
    so callers in-process get the same one-line errors.
    """
    del strict
    shapes = schedule_of(probes, jobs, interval)
    if misfire_grace < 0:
        raise InputError("--misfire-grace must not be negative")
    if claim_ahead < 0 or crash_slack < 0 or early_tolerance < 0:
        raise InputError("--claim-ahead, --crash-slack and --early-tolerance must not be negative")
    shape_of = {job: s for s in shapes for job in s.job_ids()}
    grids = {job: Grid.of(s.interval) for job, s in shape_of.items()}
    finest = min(s.interval for s in shapes)
    fine_grid = Grid.of(finest)
    fine_jobs = {job for job, s in shape_of.items() if s.interval == finest}
    starts = fault_starts(chaos) if chaos is not None else []

    everything = [Probe.from_dict(r, i, f"record {i + 1}") for i, r in enumerate(records)]
    if start is not None:
        everything = [p for p in everything if p.scheduled_at >= start - timedelta(microseconds=GRID_TOLERANCE_US)]
    warnings: list[str] = []
    manual = [p for p in everything if p.kind == RunKind.MANUAL]
    probes_ = [p for p in everything if p.kind != RunKind.MANUAL]
    unknown_kinds = sorted({p.kind for p in probes_} - set(KINDS))
    if unknown_kinds:
        warnings.append(f"record kind(s) {', '.join(unknown_kinds)} unknown: judged as scheduled runs")

    # -- window --------------------------------------------------------------------------
    first_fire = min((p.scheduled_at for p in probes_), default=None)
    win_end = end or max((p.scheduled_at for p in probes_), default=None) or datetime.now(UTC)
    end_us = Grid.micros(win_end)
    bounds: dict[str, tuple[int, int]] = {}
    for job, grid in grids.items():
        lows = ([grid.first_at_or_after(start)] if start is not None else []) + (
            [grid.first_at_or_after(first_fire)] if first_fire is not None else [])
        k_last = grid.last_at_or_before(win_end)
        bounds[job] = (max(lows) if lows else k_last + 1, k_last)
    win_start = min((grids[j].time(lo) for j, (lo, hi) in bounds.items() if lo <= hi), default=None)
    if start is not None and end is not None and end < start:
        raise InputError(f"--end {iso(end)} is before the window start {iso(start)}")
    in_window = [p for p in probes_ if p.sched_us <= end_us + GRID_TOLERANCE_US]
    evidence = Evidence(probes_)

    # -- faults: crash windows, crashes ----------------------------------------------------
    crash_windows: list[CrashWindow] = []
    # (ts, target, fault, until): until the fault's end entry for a pause or a partition (a node cut off
    # still holds a lease it believes in, and may start a run whose record it can no longer write); the
    # crash slack after the logged moment for a kill (logged just before it is applied), or for a fault
    # whose end the log does not show
    ends = fault_ends(chaos) if chaos is not None else []
    crashes: list[tuple[datetime, str, str, datetime]] = []
    for ts, entry in starts:
        if entry["fault"] in CRASH_FAULTS:
            target, fault = str(entry.get("target")), str(entry["fault"])
            until = ts + timedelta(seconds=crash_slack)
            if fault in ISOLATING_FAULTS:
                until = next((end for end, e in ends if end >= ts and e["fault"] == fault
                              and str(e.get("target")) == target), until)
            crashes.append((ts, target, fault, until))
        ends_lease = entry["fault"] in LEASE_ENDING_FAULTS  # whatever its target
        if entry["fault"] in CRASH_FAULTS or ends_lease:
            leader = evidence.leader_at(ts)
            if leader is not None and (ends_lease or entry.get("target") == leader.node):
                ts_us = Grid.micros(ts)
                crash_windows.append(CrashWindow(
                    entry["fault"], leader.node, ts, leader.token, ts_us - round(crash_slack * 1e6),
                    ts_us + round((claim_ahead + crash_slack) * 1e6)))

    # -- duplicate starts, at-least-once recoveries, fenced sink -------------------------------
    by_pair: dict[tuple[str, int], list[Probe]] = defaultdict(list)
    for p in in_window:
        by_pair[(p.job, p.sched_us)].append(p)

    def recovered_after_crash(first: Probe, later: Probe) -> tuple[datetime, str, str] | None:
        if later.kind != RunKind.RECOVERY:
            return None
        for ts, target, fault, until in crashes:
            if target == first.node and first.started_at <= until and ts <= later.started_at:
                return ts, target, fault
        return None

    duplicate_starts: list[dict[str, Any]] = []
    at_least_once: list[dict[str, Any]] = []
    recovered_pairs: set[tuple[str, int]] = set()
    for (job, us), runs in sorted(((k, v) for k, v in by_pair.items() if len(v) > 1),
                                  key=lambda kv: (kv[0][1], kv[0][0])):
        runs = sorted(runs, key=lambda p: (p.started_at, p.order))
        shape = shape_of.get(job)
        kills_seen = [recovered_after_crash(a, b) for a, b in pairwise(runs)] if shape and shape.recover else [None]
        entry = {"job": job, "shape": shape.shape if shape else None, "scheduled_at": iso(runs[0].scheduled_at),
                 "starts": len(runs), "runs": [{"node": p.node, "token": p.token, "started_at": iso(p.started_at),
                                                "kind": p.kind} for p in runs]}
        if all(kills_seen):
            recovered_pairs.add((job, us))
            at_least_once.append({**entry, "kills": [{"fault": seen[2], "target": seen[1], "ts": iso(seen[0])}
                                                     for seen in kills_seen if seen is not None]})
        else:
            duplicate_starts.append(entry)

    by_started = sorted(in_window, key=lambda p: (p.started_at, p.order))
    highest: dict[str, int] = {}
    accepted: dict[tuple[str, int], int] = defaultdict(int)
    for p in by_started:
        if p.token >= highest.get(p.job, p.token):
            highest[p.job] = p.token
            accepted[(p.job, p.sched_us)] += 1
    fenced_sink_duplicates = sum(1 for pair, n in accepted.items() if n > 1 and pair not in recovered_pairs)

    # -- early runs ----------------------------------------------------------------------------
    early = sorted((p for p in probes_ if p.early_by > early_tolerance), key=lambda p: (p.started_at, p.order))
    early_runs = [{**p.ref(), "received_at": iso(p.received_at), "early_by_s": round(p.early_by, 3)}
                  for p in early]

    # -- which fire times ran ----------------------------------------------------------------
    recs_at: dict[tuple[str, int], list[Probe]] = defaultdict(list)
    runs_of: dict[str, set[int]] = defaultdict(set)
    off_schedule: list[Probe] = []
    unexpected_jobs: set[str] = set()
    for p in probes_:
        if p.job not in shape_of:
            unexpected_jobs.add(p.job)
            continue
        k = grids[p.job].index(p.sched_us)
        if k is None:
            off_schedule.append(p)
            continue
        runs_of[p.job].add(k)
        recs_at[(p.job, k)].append(p)
    if unexpected_jobs:
        warnings.append(f"{len(unexpected_jobs)} job id(s) outside the probe schedule ({spec_text(shapes)}) "
                        "ignored for misses: " + ", ".join(sorted(unexpected_jobs)[:5]))
    if off_schedule:
        warnings.append(f"{len(off_schedule)} record(s) scheduled off their job's grid, e.g. "
                        f"{off_schedule[0].job}@{iso(off_schedule[0].scheduled_at)}")

    # -- gaps (finest grid) ---------------------------------------------------------------------
    at_instant: dict[int, list[Probe]] = defaultdict(list)
    for job in fine_jobs:
        for k in runs_of.get(job, ()):
            at_instant[k].extend(recs_at[(job, k)])
    fine_bounds = [bounds[j] for j in fine_jobs]
    k_first = min(lo for lo, _ in fine_bounds)
    k_last = max(hi for _, hi in fine_bounds)
    instants = max(0, k_last - k_first + 1)
    window_runs = sorted(k for k in at_instant if k_first <= k <= k_last)
    gaps: list[dict[str, Any]] = []
    for before, after in pairwise(window_runs):
        if after - before <= 1:
            continue
        last = max(at_instant[before], key=lambda p: (p.started_at, p.order))
        first = min(at_instant[after], key=lambda p: (p.started_at, p.order))
        gaps.append({
            "start": iso(fine_grid.time(before + 1)), "end": iso(fine_grid.time(after)),
            "missing_fire_times": after - before - 1,
            "duration_s": round((after - before - 1) * fine_grid.interval_us / 1e6, 6),
            "wall_s": round((first.started_at - last.started_at).total_seconds(), 3),
            "before": {"node": last.node, "token": last.token, "started_at": iso(last.started_at)},
            "after": {"node": first.node, "token": first.token, "started_at": iso(first.started_at)},
            "handoff": max(p.token for p in at_instant[after]) > max(p.token for p in at_instant[before]),
        })
    open_gap = None
    if window_runs and window_runs[-1] < k_last:
        open_gap = {"start": iso(fine_grid.time(window_runs[-1] + 1)), "missing_fire_times": k_last - window_runs[-1]}

    # -- misses, strictly ----------------------------------------------------------------------
    grace_us = round(misfire_grace * 1_000_000)
    excused = {"catch_up": 0, "leaderless": 0, "window_end": 0}
    excuses: list[tuple[str, int, str, dict[str, Any]]] = []  # (job, k, excuse, evidence)
    crashed: list[tuple[str, int, CrashWindow]] = []
    missed: list[tuple[int, str, str]] = []  # (fire time us, job, reason)
    for job, (lo, hi) in bounds.items():
        shape, grid = shape_of[job], grids[job]
        ran = sorted(runs_of.get(job, ()))
        for k in range(lo, hi + 1):
            if k in runs_of.get(job, ()):
                continue
            t_us = k * grid.interval_us
            t = grid.time(k)
            i = bisect_right(ran, k)
            nxt = ran[i] if i < len(ran) else None
            prev = ran[i - 1] if i > 0 else None
            prev_token = max(p.token for p in recs_at[(job, prev)]) if prev is not None else None
            windows = [w for w in crash_windows if w.start_us <= t_us <= w.end_us]
            at_end = nxt is None and end_us - t_us <= grace_us + grid.interval_us
            if at_end:
                excused["window_end"] += 1
                excuses.append((job, k, "window_end", {}))
                continue
            if nxt is None:
                missed.append((t_us, job, "no later run of the job"))
                continue
            following = recs_at[(job, nxt)]
            next_token = max(p.token for p in following)
            if shape.recover and windows:
                w = windows[0]
                missed.append((t_us, job, f"recoverable, in the crash window of {w.fault} {w.target} at "
                                          f"{iso(w.ts)}: a claimed fire time must run again (recovery)"))
                continue
            later_run = evidence.first_run_of_a_later_fire_time(t_us)
            top_token = evidence.top_token_started_by(t)
            if (later_run is not None and Grid.micros(later_run.started_at) - t_us > grace_us
                    and (top_token is None or later_run.token > top_token)):
                excused["leaderless"] += 1
                excuses.append((job, k, "leaderless", later_run.ref()))
                continue
            catch_ups = sorted((p for p in following if p.kind == RunKind.CATCH_UP),
                               key=lambda p: (p.started_at, p.order))
            reason = None
            if catch_ups:
                cu = catch_ups[0]
                if Grid.micros(cu.started_at) - t_us > grace_us + CATCH_UP_SLACK_US:
                    reason = f"the catch-up {cu.job}@{iso(cu.scheduled_at)} came more than the grace later"
                elif prev_token is not None and cu.token <= prev_token:
                    reason = f"the catch-up {cu.job}@{iso(cu.scheduled_at)} is not a newer leader's"
                elif evidence.older_leader_fired_later(t_us, cu.token):
                    reason = "an older leader still ran later fire times: it skipped this one"
                else:
                    excused["catch_up"] += 1
                    excuses.append((job, k, "catch_up", cu.ref()))
                    continue
            crash = next((w for w in windows if next_token > w.leader_token), None)
            if crash is not None:
                crashed.append((job, k, crash))
                continue
            if reason is None:
                if prev_token is not None and next_token <= prev_token:
                    reason = "the leader that ran the job before and after it skipped it"
                else:
                    next_run = min(following, key=lambda p: (p.started_at, p.order))
                    reason = (f"the job's next run ({next_run.job}@{iso(next_run.scheduled_at)}, {next_run.kind}) is "
                              "not a catch-up")
            missed.append((t_us, job, reason))
    missed.sort()

    # -- handoffs ------------------------------------------------------------------------
    handoffs: list[dict[str, Any]] = []
    stale = 0
    top: Probe | None = None
    for p in by_started:
        if top is None or p.token > top.token:
            if top is not None:
                handoffs.append({"at": iso(p.started_at), "from_token": top.token, "to_token": p.token,
                                 "from_node": top.node, "to_node": p.node})
            top = p
        elif p.token < top.token:
            stale += 1

    expected = sum(max(0, hi - lo + 1) for lo, hi in bounds.values())
    gap_durations = [g["duration_s"] for g in gaps]
    result: dict[str, Any] = {
        "window": {"start": iso(win_start), "end": iso(win_end), "fire_times": instants},
        "schedule": {"probes": spec_text(shapes), "jobs": len(shape_of), "interval_s": finest,
                     "shapes": [{"shape": s.shape, "count": s.count, "interval_s": s.interval, "body_s": s.body,
                                 "recover": s.recover} for s in shapes],
                     "misfire_grace_s": misfire_grace, "claim_ahead_s": claim_ahead, "crash_slack_s": crash_slack,
                     "early_tolerance_s": early_tolerance},
        "records": len(in_window),
        "manual_runs": len(manual),
        "expected": expected,
        "duplicates": len(duplicate_starts),
        "duplicate_starts": duplicate_starts[:LIST_LIMIT],
        "at_least_once": {"count": len(at_least_once), "list": at_least_once[:LIST_LIMIT]},
        "fenced_sink_duplicates": fenced_sink_duplicates,
        "early": len(early_runs),
        "early_runs": early_runs[:LIST_LIMIT],
        "missed": len(missed),
        "missed_fire_times": [{"job": job, "scheduled_at": iso(EPOCH + timedelta(microseconds=us)), "reason": why}
                              for us, job, why in missed[:LIST_LIMIT]],
        # "coalesced": the catch-up count under its pre-#12 name, for readers of older reports (bench/peers)
        "excused": {**excused, "coalesced": excused["catch_up"]},
        "excused_gaps": group_excuses(excuses, grids)[:LIST_LIMIT],
        "lost_to_crash": {"count": len(crashed), "list": group_crashes(crashed, grids)[:LIST_LIMIT]},
        "gaps": {"count": len(gaps), **stats(gap_durations),
                 **stats([g["wall_s"] for g in gaps], "wall_"), "list": gaps[:LIST_LIMIT]},
        "open_gap": open_gap,
        "handoffs": len(handoffs),
        "handoff_list": handoffs[:LIST_LIMIT],
        "stale_records": stale,
        "warnings": warnings,
    }
    if chaos is not None:
        result["faults"] = failovers(starts, by_started)
    if not in_window:
        warnings.append("no probe records in the window: nothing was proven")
    result["verdict"] = "fail" if (duplicate_starts or missed or early_runs or not in_window) else "pass"
    return result


def group_excuses(excuses: list[tuple[str, int, str, dict[str, Any]]], grids: dict[str, Grid]) -> list[dict[str, Any]]:
    """Consecutive excused fire times of one job with the same excuse and evidence, as one gap each."""
    out: list[dict[str, Any]] = []
    last: tuple[str, int, str, str] | None = None
    for job, k, excuse, evidence in sorted(excuses, key=lambda e: (e[0], e[1])):
        key = json.dumps(evidence, sort_keys=True)
        if out and last is not None and last[0] == job and last[1] == k - 1 and last[2:] == (excuse, key):
            out[-1]["last"] = iso(grids[job].time(k))
            out[-1]["fire_times"] += 1
        else:
            out.append({"job": job, "excuse": excuse, "first": iso(grids[job].time(k)),
                        "last": iso(grids[job].time(k)), "fire_times": 1, "covered_by": evidence or None})
            if excuse == "leaderless":  # from the first fire time of the gap to the first run after it
                out[-1]["no_leader_s"] = round((parse_time(evidence["started_at"]) - grids[job].time(k))
                                               .total_seconds(), 3)
        last = (job, k, excuse, key)
    out.sort(key=lambda g: (g["first"], g["job"]))
    return out


def group_crashes(crashed: list[tuple[str, int, CrashWindow]], grids: dict[str, Grid]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for job, k, window in sorted(crashed, key=lambda c: (c[2].ts, c[0], c[1])):
        out.append({"job": job, "scheduled_at": iso(grids[job].time(k)), **window.describe()})
    return out


def chaos_problem(entry: object) -> str | None:
    """Why ``entry`` is not a fault entry, or None."""
    if not isinstance(entry, dict):
        return "a chaos entry must be a JSON object"
    if not isinstance(entry.get("fault"), str) or not entry["fault"]:
        return "field 'fault' must be a non-empty string"
    try:
        parse_time(entry.get("ts"))
    except ValueError as exc:
        return f"field 'ts': {exc}"
    return None


def failovers(starts: list[tuple[datetime, dict[str, Any]]], by_started: list[Probe]) -> dict[str, Any]:
    """Per fault start: seconds until a record with a token newer than any before the fault."""
    started = [p.started_at for p in by_started]
    out: list[dict[str, Any]] = []
    per_kind: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for n, (ts, entry) in enumerate(starts):
        horizon = starts[n + 1][0] if n + 1 < len(starts) else None
        cut = bisect_right(started, ts)
        before = by_started[:cut]
        leader = max(before, key=lambda p: (p.token, p.started_at, p.order)) if before else None
        newer = None
        for p in by_started[cut:]:
            if horizon is not None and p.started_at >= horizon:
                break
            if leader is None or p.token > leader.token:
                newer = p
                break
        kind = str(entry["fault"])
        counts[kind] += 1
        seconds = None if newer is None else round((newer.started_at - ts).total_seconds(), 3)
        if seconds is not None:
            per_kind[kind].append(seconds)
        row = {"ts": iso(ts), "fault": kind, "target": entry.get("target"),
               "leader": leader.node if leader else None, "hit_leader": leader is not None
               and entry.get("target") == leader.node,
               "failover_s": seconds, "new_leader": newer.node if newer else None,
               "new_token": newer.token if newer else None}
        for key in ("aim", "fire_time", "skew_s"):
            if key in entry:
                row[key] = entry[key]
        out.append(row)
    by_kind = {kind: {"faults": counts[kind], "failovers": len(per_kind[kind]), **stats(per_kind[kind])}
               for kind in sorted(counts)}
    return {"list": out[:LIST_LIMIT], "by_kind": by_kind}


# -- files -----------------------------------------------------------------------------------

def read_jsonl(path: Path, what: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, object) of each line of a JSONL file, and warnings. A bad line is an :class:`InputError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n") and bool(lines[-1].strip())
    out: list[tuple[int, dict[str, Any]]] = []
    warnings: list[str] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if torn_tail and number == len(lines):
                warnings.append(f"{path}:{number}: ignored a torn last line (no newline, not JSON)")
                continue
            raise InputError(f"{path}:{number}: not a JSON object: {exc}") from None
        out.append((number, obj))
    return out, warnings


def _load_checked(path: Path, what: str, problem_of: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Every line checked here, so an error can name its line."""
    lines, warnings = read_jsonl(path, what)
    for number, obj in lines:
        problem = problem_of(obj)
        if problem is not None:
            raise InputError(f"{path}:{number}: {problem}")
    return [obj for _, obj in lines], warnings


def load_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Probe records of the collector's file."""
    return _load_checked(path, "records file", probe_problem)


def load_chaos(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Fault entries of the chaos log."""
    return _load_checked(path, "chaos log", chaos_problem)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest check",
                                description="Judge a load test from the probe collector's records alone.")
    p.add_argument("--state", type=Path, help="harness state JSON: probe_shapes (or probe_jobs, probe_interval), "
                   "misfire_grace, claim_ahead, started_at, collector_file, chaos_log, optionally ended_at "
                   "(explicit flags win)")
    p.add_argument("--records", type=Path, help="the collector's JSONL file")
    p.add_argument("--chaos-log", type=Path, help="JSONL of injected faults")
    p.add_argument("--probes", metavar="SPEC", help=f"the probe jobs: {SPEC_FORM} (COUNT defaults to --jobs, "
                   "INTERVAL to --interval)")
    p.add_argument("--jobs", type=int, help="number of basic probe jobs (probe-000..), or COUNT's default")
    p.add_argument("--interval", type=float, help="basic probe interval, seconds, or INTERVAL's default")
    p.add_argument("--misfire-grace", type=float, help="the nodes' misfire grace, seconds")
    p.add_argument("--claim-ahead", type=float, help="the nodes' BATON_CLAIM_AHEAD: how far after a crash a "
                   f"claimed fire time may be lost (default {DEFAULT_CLAIM_AHEAD})")
    p.add_argument("--crash-slack", type=float, default=CRASH_SLACK,
                   help=f"seconds around a crash window (default {CRASH_SLACK})")
    p.add_argument("--early-tolerance", type=float, default=EARLY_TOLERANCE,
                   help=f"seconds a run may start before its fire time before it is early (default {EARLY_TOLERANCE})")
    p.add_argument("--start", help="ISO 8601 start of the window (default: the first run)")
    p.add_argument("--end", help="ISO 8601 end of the window (default: latest record, or now)")
    p.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # the rules are strict; kept for scripts
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _state_path(value: object, state: Path) -> Path | None:
    """A path from the state file: as given if it exists from here, else relative to the state file."""
    if not value:
        return None
    path = Path(str(value))
    if path.is_absolute() or path.exists():
        return path
    return state.parent / path


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Merge --state and explicit flags (flags win) into check()'s inputs."""
    state: dict[str, Any] = {}
    if args.state is not None:
        try:
            state = json.loads(args.state.read_text())
        except OSError as exc:
            raise InputError(f"state file {args.state}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise InputError(f"state file {args.state}: not JSON: {exc}") from None
        if not isinstance(state, dict):
            raise InputError(f"state file {args.state}: not a JSON object")

    def pick(flag: object, key: str, kind: type) -> Any:
        if flag is not None:
            return flag
        if key not in state or state[key] is None:
            return None
        try:
            return kind(state[key])
        except (TypeError, ValueError):
            raise InputError(f"state file {args.state}: {key!r} is not a {kind.__name__}") from None

    def when(flag: str | None, key: str, name: str) -> datetime | None:
        value = flag if flag is not None else state.get(key)
        if value is None:
            return None
        try:
            return parse_time(value)
        except ValueError as exc:
            raise InputError(f"{name}: {exc}") from None

    records = args.records or (_state_path(state.get("collector_file"), args.state) if args.state else None)
    chaos = args.chaos_log or (_state_path(state.get("chaos_log"), args.state) if args.state else None)
    if not args.chaos_log and chaos is not None and not chaos.exists():
        chaos = None  # the cluster's log is written on its first fault: none yet means no faults
    jobs = pick(args.jobs, "probe_jobs", int)
    interval = pick(args.interval, "probe_interval", float)
    # --probes wins; --jobs/--interval alone mean basic probes; else the state's spec, else its basic probes
    spec = args.probes
    if spec is None and args.jobs is None and args.interval is None:
        spec = pick(None, "probe_shapes", str) or None
    if spec is None:
        for value, flag in ((jobs, "--jobs"), (interval, "--interval")):
            if value is None:
                raise InputError(f"missing --probes, or {flag} (or a --state file that has them)")
    inputs = {"records": records, "chaos": chaos, "probes": spec, "jobs": jobs, "interval": interval,
              "misfire_grace": pick(args.misfire_grace, "misfire_grace", float),
              "claim_ahead": pick(args.claim_ahead, "claim_ahead", float),
              "start": when(args.start, "started_at", "--start"), "end": when(args.end, "ended_at", "--end")}
    if inputs["claim_ahead"] is None:
        inputs["claim_ahead"] = DEFAULT_CLAIM_AHEAD
    for key, flag in {"records": "--records", "misfire_grace": "--misfire-grace"}.items():
        if inputs[key] is None:
            raise InputError(f"missing {flag} (or a --state file that has it)")
    return inputs


#: Excused gaps and crash losses printed under the table; --json lists them all (up to LIST_LIMIT).
TABLE_LINES = 12


def _run_ref(run: dict[str, Any] | None) -> str:
    if not run:
        return "no later run yet"
    return f"{run['job']}@{run['scheduled_at']} on {run['node']} (token {run['token']}, {run['kind']})"


def render(result: dict[str, Any]) -> None:
    """A short table for people; --json is for machines."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    gaps = result["gaps"]
    table = Table(title=f"probe check: {result['verdict'].upper()}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    window = result["window"]
    table.add_row("window", f"{window['start']} .. {window['end']} ({window['fire_times']} fire times)")
    table.add_row("probes", result["schedule"]["probes"])
    table.add_row("records / expected", f"{result['records']} / {result['expected']}"
                  + (f" (+{result['manual_runs']} manual)" if result["manual_runs"] else ""))
    table.add_row("duplicate starts", str(result["duplicates"]))
    table.add_row("at-least-once recovery", f"{result['at_least_once']['count']} (a recovery run after a kill)")
    table.add_row("fenced-sink duplicates", str(result["fenced_sink_duplicates"]))
    table.add_row("early runs", str(result["early"]))
    excused = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in result["excused"].items() if k != "coalesced")
    table.add_row("missed fire times", f"{result['missed']} (excused: {excused})")
    table.add_row("lost to a crash", f"{result['lost_to_crash']['count']} (claimed, never started: at-most-once)")
    if gaps["count"]:
        table.add_row("leaderless gaps", f"{gaps['count']}; p50 {gaps['p50_s']}s, p99 {gaps['p99_s']}s, "
                      f"max {gaps['max_s']}s (wall max {gaps['wall_max_s']}s)")
    else:
        table.add_row("leaderless gaps", "0")
    table.add_row("handoffs / stale records", f"{result['handoffs']} / {result['stale_records']}")
    console.print(table)
    for dup in result["duplicate_starts"][:5]:
        runs = ", ".join(f"{r['node']} (token {r['token']}, {r['kind']})" for r in dup["runs"])
        console.print(f"[red]duplicate[/red] {dup['job']} @ {dup['scheduled_at']}: {runs}", soft_wrap=True)
    for miss in result["missed_fire_times"][:5]:
        console.print(f"[red]missed[/red] {miss['job']} @ {miss['scheduled_at']}: {miss['reason']}", soft_wrap=True)
    for run in result["early_runs"][:5]:
        console.print(f"[red]early[/red] {run['job']} @ {run['scheduled_at']} on {run['node']} "
                      f"(token {run['token']}): {run['early_by_s']}s before its fire time", soft_wrap=True)
    for rec in result["at_least_once"]["list"][:5]:
        kills = ", ".join(f"{k['fault']} {k['target']} at {k['ts']}" for k in rec["kills"])
        console.print(f"[cyan]at-least-once[/cyan] {rec['job']} @ {rec['scheduled_at']}: "
                      f"{rec['starts']} starts, recovered after {kills}", soft_wrap=True)
    for gap in result["excused_gaps"][:TABLE_LINES]:
        span = gap["first"] if gap["fire_times"] == 1 else f"{gap['first']} .. {gap['last']} ({gap['fire_times']})"
        console.print(f"[dim]excused {gap['excuse'].replace('_', '-')}[/dim] {gap['job']} @ {span}: "
                      f"{_run_ref(gap['covered_by'])}", soft_wrap=True)
    for lost in result["lost_to_crash"]["list"][:TABLE_LINES]:
        fault, window = lost["fault"], lost["window"]
        console.print(f"[yellow]lost to a crash[/yellow] {lost['job']} @ {lost['scheduled_at']}: {fault['fault']} "
                      f"{fault['target']} at {fault['ts']}, window {window['start']} .. {window['end']}",
                      soft_wrap=True)
    more = max(0, len(result["excused_gaps"]) - TABLE_LINES) + max(0, result["lost_to_crash"]["count"] - TABLE_LINES)
    if more:
        console.print(f"[dim]... {more} more excused or lost; --json lists them[/dim]")
    if "faults" in result:
        faults = Table(title="failover after faults")
        for column in ("fault", "faults", "failovers", "p50_s", "p99_s", "max_s"):
            faults.add_column(column)
        for kind, row in result["faults"]["by_kind"].items():
            faults.add_row(kind, *(str(row[c]) for c in ("faults", "failovers", "p50_s", "p99_s", "max_s")))
        console.print(faults)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning[/yellow] {warning}")


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest check``: 0 pass, 1 duplicate, miss or early run, 2 bad input."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one line; in-process callers get the code back
        return exc.code if isinstance(exc.code, int) else 2
    try:
        inputs = resolve(args)
        records, warnings = load_records(inputs["records"])
        chaos = None
        if inputs["chaos"] is not None:
            chaos, chaos_warnings = load_chaos(inputs["chaos"])
            warnings += chaos_warnings
        result = check(records, probes=inputs["probes"], jobs=inputs["jobs"], interval=inputs["interval"],
                       start=inputs["start"], end=inputs["end"], misfire_grace=inputs["misfire_grace"], chaos=chaos,
                       claim_ahead=inputs["claim_ahead"], crash_slack=args.crash_slack,
                       early_tolerance=args.early_tolerance)
    except InputError as exc:
        print(f"check: {exc}", file=sys.stderr)
        return 2
    result["warnings"] = warnings + result["warnings"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return 0 if result["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
