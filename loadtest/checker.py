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

import json
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from loadtest.percentile import stats
from loadtest.probe_log import (
    EPOCH,
    GRID_TOLERANCE_US,
    Grid,
    InputError,
    Probe,
    fault_ends,
    fault_starts,
    iso,
    parse_time,
)

# The probe schedule (shapes, job ids, intervals) and the run kinds a record names are a description of the
# workload and its records, shared with the nodes that run it; nothing of how a node behaves is imported.
from node.outcomes import RunKind
from node.probes import SPEC_FORM, ProbeShape, ProbeSpecError, parse_shapes, spec_text

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


#: A crash fault as the rules read it: (logged at, target, fault, until when the node may still have started runs).
Crash = tuple[datetime, str, str, datetime]


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

    bounds, win_start, win_end = _window(probes_, grids, start, end)
    end_us = Grid.micros(win_end)
    in_window = [p for p in probes_ if p.sched_us <= end_us + GRID_TOLERANCE_US]
    evidence = Evidence(probes_)
    crashes, crash_windows = _crashes(starts, fault_ends(chaos) if chaos is not None else [], evidence,
                                      claim_ahead=claim_ahead, crash_slack=crash_slack)
    duplicate_starts, at_least_once, recovered_pairs = _duplicate_starts(in_window, shape_of, crashes)
    by_started = sorted(in_window, key=lambda p: (p.started_at, p.order))
    early = sorted((p for p in probes_ if p.early_by > early_tolerance), key=lambda p: (p.started_at, p.order))
    early_runs = [{**p.ref(), "received_at": iso(p.received_at), "early_by_s": round(p.early_by, 3)}
                  for p in early]
    ran = _runs_on_the_grid(probes_, shape_of, grids, spec_text(shapes), warnings)
    fine_jobs = {job for job, s in shape_of.items() if s.interval == finest}
    gaps, open_gap, instants = _gaps(ran, fine_jobs, bounds, Grid.of(finest))
    misses = _Misses(ran, shape_of, grids, crash_windows, evidence, end_us, round(misfire_grace * 1_000_000))
    for job, (lo, hi) in bounds.items():
        for k in range(lo, hi + 1):
            misses.judge(job, k)
    misses.missed.sort()
    handoffs, stale = _handoffs(by_started)

    expected = sum(max(0, hi - lo + 1) for lo, hi in bounds.values())
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
        "fenced_sink_duplicates": _fenced_sink_duplicates(by_started, recovered_pairs),
        "early": len(early_runs),
        "early_runs": early_runs[:LIST_LIMIT],
        "missed": len(misses.missed),
        "missed_fire_times": [{"job": job, "scheduled_at": iso(EPOCH + timedelta(microseconds=us)), "reason": why}
                              for us, job, why in misses.missed[:LIST_LIMIT]],
        # "coalesced": the catch-up count under its pre-#12 name, for readers of older reports (bench/peers)
        "excused": {**misses.excused, "coalesced": misses.excused["catch_up"]},
        "excused_gaps": group_excuses(misses.excuses, grids)[:LIST_LIMIT],
        "lost_to_crash": {"count": len(misses.crashed), "list": group_crashes(misses.crashed, grids)[:LIST_LIMIT]},
        "gaps": {"count": len(gaps), **stats([g["duration_s"] for g in gaps]),
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
    result["verdict"] = "fail" if (duplicate_starts or misses.missed or early_runs or not in_window) else "pass"
    return result


def _window(probes: list[Probe], grids: dict[str, Grid], start: datetime | None,
            end: datetime | None) -> tuple[dict[str, tuple[int, int]], datetime | None, datetime]:
    """Per job, the first and last index of the fire times expected (first > last: none); the window's start
    and end."""
    first_fire = min((p.scheduled_at for p in probes), default=None)
    win_end = end or max((p.scheduled_at for p in probes), default=None) or datetime.now(UTC)
    bounds: dict[str, tuple[int, int]] = {}
    for job, grid in grids.items():
        lows = ([grid.first_at_or_after(start)] if start is not None else []) + (
            [grid.first_at_or_after(first_fire)] if first_fire is not None else [])
        k_last = grid.last_at_or_before(win_end)
        bounds[job] = (max(lows) if lows else k_last + 1, k_last)
    win_start = min((grids[j].time(lo) for j, (lo, hi) in bounds.items() if lo <= hi), default=None)
    if start is not None and end is not None and end < start:
        raise InputError(f"--end {iso(end)} is before the window start {iso(start)}")
    return bounds, win_start, win_end


def _crashes(starts: list[tuple[datetime, dict[str, Any]]], ends: list[tuple[datetime, dict[str, Any]]],
             evidence: Evidence, *, claim_ahead: float, crash_slack: float) -> tuple[list[Crash], list[CrashWindow]]:
    """The crash faults, as (ts, target, fault, until), and the crash windows of the leaders they hit.

    ``until``: the fault's end entry for a pause or a partition (a node cut off still holds a lease it
    believes in, and may start a run whose record it can no longer write); the crash slack after the logged
    moment for a kill (logged just before it is applied), or for a fault whose end the log does not show.
    """
    crashes: list[Crash] = []
    windows: list[CrashWindow] = []
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
                windows.append(CrashWindow(
                    entry["fault"], leader.node, ts, leader.token, ts_us - round(crash_slack * 1e6),
                    ts_us + round((claim_ahead + crash_slack) * 1e6)))
    return crashes, windows


def _duplicate_starts(in_window: list[Probe], shape_of: dict[str, ProbeShape], crashes: list[Crash]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[tuple[str, int]]]:
    """Fire times started more than once: the duplicates, the at-least-once recoveries, and the latter's
    (job, fire time) pairs."""
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
    return duplicate_starts, at_least_once, recovered_pairs


def _fenced_sink_duplicates(by_started: list[Probe], recovered_pairs: set[tuple[str, int]]) -> int:
    """Fire times a sink that keeps each job's highest token accepts twice, at-least-once recoveries aside."""
    highest: dict[str, int] = {}
    accepted: dict[tuple[str, int], int] = defaultdict(int)
    for p in by_started:
        if p.token >= highest.get(p.job, p.token):
            highest[p.job] = p.token
            accepted[(p.job, p.sched_us)] += 1
    return sum(1 for pair, n in accepted.items() if n > 1 and pair not in recovered_pairs)


@dataclass
class _Ran:
    """Which fire times ran, by their index on their job's grid."""

    runs_of: dict[str, set[int]]
    recs_at: dict[tuple[str, int], list[Probe]]


def _runs_on_the_grid(probes: list[Probe], shape_of: dict[str, ProbeShape], grids: dict[str, Grid], spec: str,
                      warnings: list[str]) -> _Ran:
    ran = _Ran(defaultdict(set), defaultdict(list))
    off_schedule: list[Probe] = []
    unexpected_jobs: set[str] = set()
    for p in probes:
        if p.job not in shape_of:
            unexpected_jobs.add(p.job)
            continue
        k = grids[p.job].index(p.sched_us)
        if k is None:
            off_schedule.append(p)
            continue
        ran.runs_of[p.job].add(k)
        ran.recs_at[(p.job, k)].append(p)
    if unexpected_jobs:
        warnings.append(f"{len(unexpected_jobs)} job id(s) outside the probe schedule ({spec}) "
                        "ignored for misses: " + ", ".join(sorted(unexpected_jobs)[:5]))
    if off_schedule:
        warnings.append(f"{len(off_schedule)} record(s) scheduled off their job's grid, e.g. "
                        f"{off_schedule[0].job}@{iso(off_schedule[0].scheduled_at)}")
    return ran


def _gaps(ran: _Ran, fine_jobs: set[str], bounds: dict[str, tuple[int, int]], fine_grid: Grid
          ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, int]:
    """The leaderless gaps on the finest grid, the open gap at its end, and how many instants it has."""
    at_instant: dict[int, list[Probe]] = defaultdict(list)
    for job in fine_jobs:
        for k in ran.runs_of.get(job, ()):
            at_instant[k].extend(ran.recs_at[(job, k)])
    fine_bounds = [bounds[j] for j in fine_jobs]
    k_first = min(lo for lo, _ in fine_bounds)
    k_last = max(hi for _, hi in fine_bounds)
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
    return gaps, open_gap, max(0, k_last - k_first + 1)


class _Misses:
    """The strict rules for a fire time that did not run: excused (naming the evidence), lost to a crash, or
    missed (naming why no excuse applied)."""

    def __init__(self, ran: _Ran, shape_of: dict[str, ProbeShape], grids: dict[str, Grid],
                 crash_windows: list[CrashWindow], evidence: Evidence, end_us: int, grace_us: int) -> None:
        self.ran, self.shape_of, self.grids = ran, shape_of, grids
        self.crash_windows, self.evidence = crash_windows, evidence
        self.end_us, self.grace_us = end_us, grace_us
        self.ran_sorted = {job: sorted(ks) for job, ks in ran.runs_of.items()}
        self.excused = {"catch_up": 0, "leaderless": 0, "window_end": 0}
        self.excuses: list[tuple[str, int, str, dict[str, Any]]] = []  # (job, k, excuse, evidence)
        self.crashed: list[tuple[str, int, CrashWindow]] = []
        self.missed: list[tuple[int, str, str]] = []  # (fire time us, job, reason)

    def _excuse(self, job: str, k: int, excuse: str, evidence: dict[str, Any]) -> None:
        self.excused[excuse] += 1
        self.excuses.append((job, k, excuse, evidence))

    def judge(self, job: str, k: int) -> None:
        if k in self.ran.runs_of.get(job, ()):
            return
        shape, grid, recs_at, grace_us = self.shape_of[job], self.grids[job], self.ran.recs_at, self.grace_us
        ran = self.ran_sorted.get(job, [])
        t_us = k * grid.interval_us
        t = grid.time(k)
        i = bisect_right(ran, k)
        nxt = ran[i] if i < len(ran) else None
        prev = ran[i - 1] if i > 0 else None
        prev_token = max(p.token for p in recs_at[(job, prev)]) if prev is not None else None
        windows = [w for w in self.crash_windows if w.start_us <= t_us <= w.end_us]
        if nxt is None and self.end_us - t_us <= grace_us + grid.interval_us:
            self._excuse(job, k, "window_end", {})
            return
        if nxt is None:
            self.missed.append((t_us, job, "no later run of the job"))
            return
        following = recs_at[(job, nxt)]
        next_token = max(p.token for p in following)
        if shape.recover and windows:
            w = windows[0]
            self.missed.append((t_us, job, f"recoverable, in the crash window of {w.fault} {w.target} at "
                                           f"{iso(w.ts)}: a claimed fire time must run again (recovery)"))
            return
        later_run = self.evidence.first_run_of_a_later_fire_time(t_us)
        top_token = self.evidence.top_token_started_by(t)
        if (later_run is not None and Grid.micros(later_run.started_at) - t_us > grace_us
                and (top_token is None or later_run.token > top_token)):
            self._excuse(job, k, "leaderless", later_run.ref())
            return
        catch_ups = sorted((p for p in following if p.kind == RunKind.CATCH_UP), key=lambda p: (p.started_at, p.order))
        reason = None
        if catch_ups:
            cu = catch_ups[0]
            if Grid.micros(cu.started_at) - t_us > grace_us + CATCH_UP_SLACK_US:
                reason = f"the catch-up {cu.job}@{iso(cu.scheduled_at)} came more than the grace later"
            elif prev_token is not None and cu.token <= prev_token:
                reason = f"the catch-up {cu.job}@{iso(cu.scheduled_at)} is not a newer leader's"
            elif self.evidence.older_leader_fired_later(t_us, cu.token):
                reason = "an older leader still ran later fire times: it skipped this one"
            else:
                self._excuse(job, k, "catch_up", cu.ref())
                return
        crash = next((w for w in windows if next_token > w.leader_token), None)
        if crash is not None:
            self.crashed.append((job, k, crash))
            return
        if reason is None:
            if prev_token is not None and next_token <= prev_token:
                reason = "the leader that ran the job before and after it skipped it"
            else:
                next_run = min(following, key=lambda p: (p.started_at, p.order))
                reason = (f"the job's next run ({next_run.job}@{iso(next_run.scheduled_at)}, {next_run.kind}) is "
                          "not a catch-up")
        self.missed.append((t_us, job, reason))


def _handoffs(by_started: list[Probe]) -> tuple[list[dict[str, Any]], int]:
    """Each record whose token is above every token before it, and how many records are below the highest."""
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
    return handoffs, stale


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
