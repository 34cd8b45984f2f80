"""Judge a load test from the probe collector's records alone.

The checker reads the collector's JSONL file (and, optionally, the chaos log);
it never asks the nodes anything, because the nodes are what is on trial.

Schedule
    Jobs ``probe-000`` .. ``probe-{N-1}`` fire every ``interval`` seconds at
    ``EPOCH + k * interval`` (the same instants on every node, see
    ``node.jobs.every``). An *instant* is one such fire time; the *expected*
    runs are every (job, instant) with ``start <= instant <= end``.

Window
    ``start`` defaults to the earliest ``scheduled_at`` in the records. Fire
    times before the earliest record are cluster start-up (no leader elected
    yet) and never count, so an explicit ``start`` can only narrow the window
    (e.g. past an earlier run's records in an appended file); records
    scheduled before it are ignored. ``end`` defaults to the latest
    ``scheduled_at`` in the records (or now, when there are none). Runs
    scheduled after ``end`` still count as evidence that an earlier fire time
    was coalesced, never as expected runs.

Duplicate starts
    A (job, scheduled_at) pair (timestamps compared in UTC) with more than one
    record. ``duplicates`` counts pairs, not extra starts.

Fenced-sink duplicates
    Per job, records in ``started_at`` order; a sink accepts a record iff its
    token is >= the highest token it has seen for that job. Pairs accepted more
    than once are counted. A stale leader's late run is a duplicate start but
    not a fenced-sink duplicate.

Leaderless gaps
    An instant is *run* if at least one job has a record for it. A gap is a
    maximal run of instants that are not run, bounded on both sides by run
    instants. Its ``start`` is its first missing instant, its ``end`` the
    closing instant (the first run one after it, normally the new leader's
    catch-up), ``duration_s = end - start`` (= missing instants x interval),
    and ``wall_s`` is the wall time from the last ``started_at`` at the
    instant before the gap to the first ``started_at`` at the closing instant.
    Percentiles are nearest-rank over ``duration_s``. Missing instants after
    the last run instant form the ``open_gap`` (no successor yet), reported
    apart and not in the statistics.

Missed fire times
    An expected (job j, instant t) without a record is excused, in this order:

    Both (a) and (b) apply only across a handoff: j's next run after t carries a
    higher token than j's last run before t (or j had not run yet). Coalescing
    is what the new leader's catch-up does; a leader that skips a fire time
    while it keeps its lease has missed it.

    (a) coalesced: j has a run scheduled in ``(t, t + misfire_grace]``
        (APScheduler's coalesce: a later run within the grace stands for it);
    (b) leaderless: j has a later run at instant n, no job at all has a run at
        any instant strictly between t and n, and either no job ran at t
        either or at least one such empty instant lies between them. That is:
        t fell inside a leaderless gap (or into the dying leader's last,
        partly fired instant just before one), and j resumed at the gap's
        closing instant, as the catch-up makes it. A job that the catch-up
        left out, or a fire time a live leader skipped while firing other
        jobs, is not excused by (b);
    (c) window end: ``end - t <= misfire_grace + interval`` (the run, or the
        run it will be coalesced into, may still be in flight).

    Everything else is a miss. ``--strict`` drops (b), so a gap longer than
    the grace yields misses (what the catch-up, which looks back only
    ``misfire_grace``, cannot run).

Handoffs
    Records in ``started_at`` order; each record whose token exceeds every
    token seen before is a handoff (the first token is not). Records whose
    token is below the highest seen so far are ``stale_records``.

Faults (with ``--chaos-log``)
    For each fault entry whose ``phase`` is not ``end``: the failover time is
    from its ``ts`` to the first record started after it whose token exceeds
    every token started at or before ``ts``, if that record starts before the
    next fault; otherwise none was observed (e.g. a follower was hit).

Verdict
    ``fail`` (exit 1) when there is a duplicate start or a miss, or when there
    is no record at all (nothing proven); ``pass`` (exit 0) otherwise. Bad
    input exits 2 with one line naming the file and line. A last line without
    its newline that does not parse is a torn write the collector never
    acknowledged: it is ignored with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

#: Interval fire times count from here. Must equal ``node.jobs.INTERVAL_EPOCH``; kept apart so the
#: checker depends on no node code (a test asserts they agree).
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
#: A scheduled_at this close to a grid instant is that instant (float intervals, clock formatting).
GRID_TOLERANCE_US = 1000
#: Lists in the report are cut here; the counts next to them are complete.
LIST_LIMIT = 100

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
    """Why ``obj`` is not a probe record, or None. Shared with the collector, which refuses what this refuses."""
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
    for key in ("scheduled_at", "started_at"):
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

    @classmethod
    def from_dict(cls, obj: object, order: int, where: str) -> Probe:
        problem = probe_problem(obj)
        if problem is not None:
            raise InputError(f"{where}: {problem}")
        assert isinstance(obj, dict)
        scheduled_at = parse_time(obj["scheduled_at"])
        return cls(obj["job"], scheduled_at, obj["node"], obj["token"], parse_time(obj["started_at"]), order,
                   Grid.micros(scheduled_at))


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
    """The probe job ids, as ``node.jobs.add_probe_jobs`` names them."""
    return [f"probe-{i:03d}" for i in range(jobs)]


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


def check(records: list[dict[str, Any]], *, jobs: int, interval: float, start: datetime | None,
          end: datetime | None, misfire_grace: float, chaos: list[dict[str, Any]] | None = None,
          strict: bool = False) -> dict[str, Any]:
    """Everything the checker reports, as one JSON-ready dict, by the rules of this module's docstring.

    ``records`` are probe objects as the collector stores them (extra keys are ignored). Raises
    :class:`InputError` on a bad record or schedule, so callers in-process get the same one-line errors.
    """
    if jobs < 1:
        raise InputError("--jobs must be at least 1")
    if not interval > 0:
        raise InputError("--interval must be positive")
    if misfire_grace < 0:
        raise InputError("--misfire-grace must not be negative")
    grid = Grid.of(interval)
    probes = [Probe.from_dict(r, i, f"record {i + 1}") for i, r in enumerate(records)]
    if start is not None:
        probes = [p for p in probes if p.scheduled_at >= start - timedelta(microseconds=GRID_TOLERANCE_US)]
    warnings: list[str] = []

    # -- window --------------------------------------------------------------------------
    earliest = min((p.scheduled_at for p in probes), default=None)
    win_start = max(t for t in (start, earliest) if t is not None) if (start or earliest) else None
    win_end = end or max((p.scheduled_at for p in probes), default=None) or datetime.now(UTC)
    if win_start is not None and win_end < win_start:
        raise InputError(f"--end {iso(win_end)} is before the window start {iso(win_start)}")
    end_us = grid.micros(win_end)
    in_window = [p for p in probes if p.sched_us <= end_us + GRID_TOLERANCE_US]
    k_first = grid.first_at_or_after(win_start) if win_start is not None else 0
    k_last = grid.last_at_or_before(win_end) if win_start is not None else -1
    instants = max(0, k_last - k_first + 1)
    names = job_names(jobs)
    known = set(names)

    # -- duplicate starts, fenced sink ---------------------------------------------------
    by_pair: dict[tuple[str, int], list[Probe]] = defaultdict(list)
    for p in in_window:
        by_pair[(p.job, p.sched_us)].append(p)
    duplicate_pairs = {pair: runs for pair, runs in by_pair.items() if len(runs) > 1}
    duplicate_starts = [
        {"job": job, "scheduled_at": iso(runs[0].scheduled_at), "starts": len(runs),
         "runs": [{"node": p.node, "token": p.token, "started_at": iso(p.started_at)}
                  for p in sorted(runs, key=lambda p: (p.started_at, p.order))]}
        for (job, _), runs in sorted(duplicate_pairs.items(), key=lambda kv: (kv[0][1], kv[0][0]))]

    by_started = sorted(in_window, key=lambda p: (p.started_at, p.order))
    highest: dict[str, int] = {}
    accepted: dict[tuple[str, int], int] = defaultdict(int)
    for p in by_started:
        if p.token >= highest.get(p.job, p.token):
            highest[p.job] = p.token
            accepted[(p.job, p.sched_us)] += 1
    fenced_sink_duplicates = sum(1 for n in accepted.values() if n > 1)

    # -- which instants ran --------------------------------------------------------------
    runs_of: dict[str, set[int]] = defaultdict(set)  # all records from start on, for look-ahead
    token_of: dict[tuple[str, int], int] = {}  # (job, instant) -> highest token that ran it
    at_instant: dict[int, list[Probe]] = defaultdict(list)
    off_schedule: list[Probe] = []
    unexpected_jobs: set[str] = set()
    for p in probes:
        k = grid.index(p.sched_us)
        if p.job not in known:
            unexpected_jobs.add(p.job)
        elif k is None:
            off_schedule.append(p)
        else:
            runs_of[p.job].add(k)
            token_of[(p.job, k)] = max(p.token, token_of.get((p.job, k), p.token))
            at_instant[k].append(p)
    run_instants = sorted(at_instant)
    if unexpected_jobs:
        warnings.append(f"{len(unexpected_jobs)} job id(s) outside probe-000..{names[-1]} ignored for misses: "
                        + ", ".join(sorted(unexpected_jobs)[:5]))
    if off_schedule:
        warnings.append(f"{len(off_schedule)} record(s) scheduled off the {interval:g}s grid, e.g. "
                        f"{off_schedule[0].job}@{iso(off_schedule[0].scheduled_at)}")

    # -- gaps ----------------------------------------------------------------------------
    window_runs = [k for k in run_instants if k_first <= k <= k_last]
    gaps: list[dict[str, Any]] = []
    for before, after in pairwise(window_runs):
        if after - before <= 1:
            continue
        last = max(at_instant[before], key=lambda p: (p.started_at, p.order))
        first = min(at_instant[after], key=lambda p: (p.started_at, p.order))
        gaps.append({
            "start": iso(grid.time(before + 1)), "end": iso(grid.time(after)),
            "missing_fire_times": after - before - 1,
            "duration_s": round((after - before - 1) * grid.interval_us / 1e6, 6),
            "wall_s": round((first.started_at - last.started_at).total_seconds(), 3),
            "before": {"node": last.node, "token": last.token, "started_at": iso(last.started_at)},
            "after": {"node": first.node, "token": first.token, "started_at": iso(first.started_at)},
            "handoff": max(p.token for p in at_instant[after]) > max(p.token for p in at_instant[before]),
        })
    open_gap = None
    if window_runs and window_runs[-1] < k_last:
        open_gap = {"start": iso(grid.time(window_runs[-1] + 1)), "missing_fire_times": k_last - window_runs[-1]}

    # -- misses --------------------------------------------------------------------------
    grace_us = round(misfire_grace * 1_000_000)
    tail_us = grace_us + grid.interval_us
    excused = {"coalesced": 0, "leaderless": 0, "window_end": 0}
    missed: list[tuple[int, str]] = []
    for job in names:
        ran = runs_of.get(job, set())
        ran_sorted = sorted(ran)
        for k in range(k_first, k_last + 1):
            if k in ran:
                continue
            i = bisect_right(ran_sorted, k)
            nxt = ran_sorted[i] if i < len(ran_sorted) else None
            prev = ran_sorted[i - 1] if i > 0 else None
            # Skipping a fire time is the catch-up's coalescing only across a handoff: the job's next
            # run carries a newer token than its previous one. A leader that skips while it lives misses.
            handed_over = nxt is not None and (prev is None or token_of[(job, nxt)] > token_of[(job, prev)])
            if handed_over and nxt is not None and (nxt - k) * grid.interval_us <= grace_us:
                excused["coalesced"] += 1
            elif (handed_over and nxt is not None and not strict
                  and bisect_left(run_instants, nxt) == bisect_right(run_instants, k)  # nothing ran in (k, nxt)
                  and (nxt - k > 1 or k not in at_instant)):
                excused["leaderless"] += 1
            elif end_us - k * grid.interval_us <= tail_us:
                excused["window_end"] += 1
            else:
                missed.append((k, job))
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

    gap_durations = [g["duration_s"] for g in gaps]
    result: dict[str, Any] = {
        "window": {"start": iso(win_start), "end": iso(win_end), "fire_times": instants},
        "schedule": {"jobs": jobs, "interval_s": interval, "misfire_grace_s": misfire_grace, "strict": strict},
        "records": len(in_window),
        "expected": jobs * instants,
        "duplicates": len(duplicate_pairs),
        "duplicate_starts": duplicate_starts[:LIST_LIMIT],
        "fenced_sink_duplicates": fenced_sink_duplicates,
        "missed": len(missed),
        "missed_fire_times": [{"job": job, "scheduled_at": iso(grid.time(k))} for k, job in missed[:LIST_LIMIT]],
        "excused": excused,
        "gaps": {"count": len(gaps), **stats(gap_durations),
                 **stats([g["wall_s"] for g in gaps], "wall_"), "list": gaps[:LIST_LIMIT]},
        "open_gap": open_gap,
        "handoffs": len(handoffs),
        "handoff_list": handoffs[:LIST_LIMIT],
        "stale_records": stale,
        "warnings": warnings,
    }
    if chaos is not None:
        result["faults"] = failovers(chaos, by_started)
    if not in_window:
        warnings.append("no probe records in the window: nothing was proven")
    result["verdict"] = "fail" if (duplicate_pairs or missed or not in_window) else "pass"
    return result


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


def failovers(chaos: list[dict[str, Any]], by_started: list[Probe]) -> dict[str, Any]:
    """Per fault start: seconds until a record with a token newer than any before the fault."""
    starts: list[tuple[datetime, dict[str, Any]]] = []
    for i, entry in enumerate(chaos):
        problem = chaos_problem(entry)
        if problem is not None:
            raise InputError(f"chaos entry {i + 1}: {problem}")
        if entry.get("phase", "start") != "end":
            starts.append((parse_time(entry["ts"]), entry))
    starts.sort(key=lambda s: s[0])
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
        out.append({"ts": iso(ts), "fault": kind, "target": entry.get("target"),
                    "leader": leader.node if leader else None, "hit_leader": bool(leader)
                    and entry.get("target") == leader.node,
                    "failover_s": seconds, "new_leader": newer.node if newer else None,
                    "new_token": newer.token if newer else None})
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
    p.add_argument("--state", type=Path, help="harness state JSON: probe_jobs, probe_interval, misfire_grace, "
                   "started_at, collector_file, chaos_log, optionally ended_at (explicit flags win)")
    p.add_argument("--records", type=Path, help="the collector's JSONL file")
    p.add_argument("--chaos-log", type=Path, help="JSONL of injected faults")
    p.add_argument("--jobs", type=int, help="number of probe jobs (probe-000..)")
    p.add_argument("--interval", type=float, help="probe interval, seconds")
    p.add_argument("--misfire-grace", type=float, help="the nodes' misfire grace, seconds")
    p.add_argument("--start", help="ISO 8601 start of the window (default: earliest record)")
    p.add_argument("--end", help="ISO 8601 end of the window (default: latest record, or now)")
    p.add_argument("--strict", action="store_true", help="do not excuse fire times in gaps longer than the grace")
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
    inputs = {"records": records, "chaos": chaos, "jobs": pick(args.jobs, "probe_jobs", int),
              "interval": pick(args.interval, "probe_interval", float),
              "misfire_grace": pick(args.misfire_grace, "misfire_grace", float),
              "start": when(args.start, "started_at", "--start"), "end": when(args.end, "ended_at", "--end")}
    flags = {"records": "--records", "jobs": "--jobs", "interval": "--interval", "misfire_grace": "--misfire-grace"}
    for key, flag in flags.items():
        if inputs[key] is None:
            raise InputError(f"missing {flag} (or a --state file that has it)")
    return inputs


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
    table.add_row("records / expected", f"{result['records']} / {result['expected']}")
    table.add_row("duplicate starts", str(result["duplicates"]))
    table.add_row("fenced-sink duplicates", str(result["fenced_sink_duplicates"]))
    excused = ", ".join(f"{k} {v}" for k, v in result["excused"].items())
    table.add_row("missed fire times", f"{result['missed']} (excused: {excused})")
    if gaps["count"]:
        table.add_row("leaderless gaps", f"{gaps['count']}; p50 {gaps['p50_s']}s, p99 {gaps['p99_s']}s, "
                      f"max {gaps['max_s']}s (wall max {gaps['wall_max_s']}s)")
    else:
        table.add_row("leaderless gaps", "0")
    table.add_row("handoffs / stale records", f"{result['handoffs']} / {result['stale_records']}")
    console.print(table)
    for dup in result["duplicate_starts"][:5]:
        runs = ", ".join(f"{r['node']} (token {r['token']})" for r in dup["runs"])
        console.print(f"[red]duplicate[/red] {dup['job']} @ {dup['scheduled_at']}: {runs}")
    for miss in result["missed_fire_times"][:5]:
        console.print(f"[red]missed[/red] {miss['job']} @ {miss['scheduled_at']}")
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
    """``python -m loadtest check``: 0 pass, 1 duplicate or miss, 2 bad input."""
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
        result = check(records, jobs=inputs["jobs"], interval=inputs["interval"], start=inputs["start"],
                       end=inputs["end"], misfire_grace=inputs["misfire_grace"], chaos=chaos, strict=args.strict)
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
