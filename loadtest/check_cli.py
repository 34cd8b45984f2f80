"""``python -m loadtest check``: the checker's command line (the rules are in ``loadtest.checker``).

Exit codes: 0 pass, 1 a duplicate start, a miss or an early run, 2 bad input
(one line naming the file and line, or the flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest.checker import CRASH_SLACK, DEFAULT_CLAIM_AHEAD, EARLY_TOLERANCE, check
from loadtest.probe_log import InputError, load_chaos, load_records, parse_time
from node.probes import SPEC_FORM


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
