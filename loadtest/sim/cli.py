"""``python -m loadtest sim``: replay one seed, explore many, run the hand-built hole schedules, shrink.

    python -m loadtest sim --seed 1234              # its fault schedule, then OK or the first violation
    python -m loadtest sim --seed 1234 --all        # every violation, each with the events around it
    python -m loadtest sim --seed 1234 --shrink     # drop faults while the violation persists (--invariant NAME)
    python -m loadtest sim --runs 10000             # explore seeds 0..9999 on 2 cores
    python -m loadtest sim --hole all               # the schedules of holes.json: each passes, and fails with its bug
    python -m loadtest sim --schedule FILE          # a saved schedule (from --save, or written by hand)
    python -m loadtest sim --seed 4 --inject no-hand-back   # with a hole of #12 put back (loadtest/sim/broken.py)

Exit codes: 0 every invariant held, 1 a violation (or a simulator error),
2 bad input (one line on stderr).

The same seed gives the same schedule and the same history, byte for byte.
Iteration order of sets of strings depends on ``PYTHONHASHSEED``, so the
command runs itself again with ``PYTHONHASHSEED=0`` when it is unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

USAGE_ERROR = 2


class InputError(ValueError):
    """Bad input: the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m loadtest sim", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--seed", type=int, help="replay one seed")
    what.add_argument("--runs", type=int, help="explore this many seeds, from --start-seed")
    what.add_argument("--hole", help="run a hand-built schedule of holes.json by name (or hole number), or 'all'")
    what.add_argument("--schedule", help="run a schedule saved as JSON ({config, faults})")
    parser.add_argument("--start-seed", type=int, default=0, help="first seed of --runs (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes for --runs (default: up to 2 cores)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--all", action="store_true", help="show every violation with its events, not the first")
    parser.add_argument("--shrink", action="store_true", help="shrink a failing schedule to a minimal one")
    parser.add_argument("--invariant", help="--shrink: keep this invariant violated (default: the first violated)")
    parser.add_argument("--save", help="write the schedule run (shrunk, with --shrink) to this JSON file")
    parser.add_argument("--dump-history", metavar="FILE",
                        help="write the run's whole history (JSON lines; equal runs give equal bytes)")
    parser.add_argument("--stop-after", type=int, help="--runs: stop after this many failed runs")
    parser.add_argument("--quiet", action="store_true", help="--runs: no progress line")
    parser.add_argument("--inject", metavar="BUG",
                        help="run with a hole of #12 put back, to see the simulator fail: one of "
                             "no-hand-back, claims-not-idempotent, claim-error-escapes, hand-back-without-busy, "
                             "max-instances-per-node, no-shutdown-grace (loadtest/sim/broken.py)")
    return parser


def _should_reexec() -> bool:
    if os.environ.get("PYTHONHASHSEED") is not None:
        return False
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", "") == "loadtest.__main__" or Path(sys.argv[0]).name == "baton-loadtest"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    if _should_reexec():
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, "-m", "loadtest", "sim", *argv], env)
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as exc:  # argparse: it printed its message
        return USAGE_ERROR if exc.code not in (0, None) else 0


def _run(args: argparse.Namespace) -> int:
    from loadtest.sim import broken, explore, holes, report
    from loadtest.sim.invariants import INVARIANTS
    from loadtest.sim.run import run_scenario, scenario_for_seed
    from loadtest.sim.scenario import Scenario

    if args.inject is not None:
        if args.inject not in broken.BUGS:
            raise InputError(f"no bug named {args.inject!r}; known: {', '.join(broken.BUGS)}")
        if args.hole == "all":
            raise InputError("--hole all runs each hole with its own bug already; --inject goes with one run")
        broken.inject(args.inject)  # for the rest of this process (and the exploring workers it forks)

    if args.runs is not None:
        if args.runs <= 0:
            raise InputError(f"--runs must be positive, got {args.runs}")
        if args.shrink or args.save or args.dump_history:
            raise InputError("--shrink, --save and --dump-history take one run: --seed, --hole or --schedule")
        return _explore(args)
    if args.workers is not None or args.stop_after is not None:
        raise InputError("--workers and --stop-after go with --runs")
    if args.invariant is not None and (not args.shrink or args.invariant not in INVARIANTS):
        raise InputError(f"--invariant goes with --shrink and is one of {', '.join(INVARIANTS)}")
    if args.hole is not None:
        known = holes.load(findings=True)
        chosen = known if args.hole == "all" else [h for h in known if h.name == args.hole
                                                   or (h.hole and str(h.hole) == args.hole)]
        if not chosen:
            raise InputError(f"no hole named {args.hole!r}; known: {', '.join(h.name for h in known)}, or all")
        if len(chosen) > 1 or args.hole == "all":
            return _holes(args, chosen)
        scenario = chosen[0].scenario
    elif args.schedule is not None:
        path = Path(args.schedule)
        try:
            scenario = Scenario.from_dict(json.loads(path.read_text()))
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"{path}: not a schedule: {exc}") from None
        scenario.replay = f"python -m loadtest sim --schedule {path}"
    else:
        if args.seed is None:
            raise InputError("say what to run: --seed N, --runs K, --hole NAME|all or --schedule FILE")
        scenario = scenario_for_seed(args.seed)
    if args.inject is not None and scenario.replay:
        scenario.replay += f" --inject {args.inject}"

    if args.shrink:
        lines: list[str] = []
        try:
            scenario, result = explore.shrink(scenario, args.invariant,
                                              log=lambda msg: lines.append(f"shrink: {msg}"))
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if args.save:
            scenario.replay = f"python -m loadtest sim --schedule {args.save}"
            result.scenario.replay = scenario.replay
    else:
        result = run_scenario(scenario)
        lines = []
    if args.save:
        Path(args.save).write_text(json.dumps(scenario.to_dict(), indent=2) + "\n")
    if args.dump_history:
        Path(args.dump_history).write_text(result.history.dump())
    if args.json:
        print(json.dumps(report.result_json(result), indent=2))
    else:
        for line in [*lines, *report.result_text(result, all_violations=args.all)]:
            print(line)
        if args.shrink:
            print("minimal schedule (JSON, for --schedule):")
            print(json.dumps(scenario.to_dict()))
    return 0 if result.ok else 1


def _holes(args: argparse.Namespace, chosen: list[Any]) -> int:
    """Each schedule must pass; each hole's schedule must also fail, with its invariant, once its bug is back."""
    from loadtest.sim import broken
    from loadtest.sim.run import run_scenario

    rows = []
    for hole in chosen:
        result = run_scenario(hole.scenario)
        row: dict[str, Any] = {"name": hole.name, "hole": hole.hole, "passes": result.ok,
                               "violations": sorted({v.invariant for v in result.checked.violations}),
                               "error": result.error}
        if hole.bug:
            with broken.injected(hole.bug):
                bugged = run_scenario(hole.scenario)
            found = [v for v in bugged.checked.violations if v.invariant == hole.expect]
            row.update({"bug": hole.bug, "expect": hole.expect, "found": bool(found),
                        "first": found[0].to_dict() if found else None})
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            label = f"hole {row['hole']}" if row["hole"] else "finding"
            verdict = "passes" if row["passes"] else f"FAILS ({', '.join(row['violations']) or row['error']})"
            line = f"{label} {row['name']}: {verdict}"
            if "bug" in row:
                line += f"; with --inject {row['bug']}: {row['expect']} {'found' if row['found'] else 'NOT FOUND'}"
            print(line)
            if row.get("first"):
                print(f"    t={row['first']['t']:.3f} {row['first']['detail'][:180]}")
        print("replay one: python -m loadtest sim --hole NAME [--inject BUG]")
    return 0 if all(row["passes"] and row.get("found", True) for row in rows) else 1


def _explore(args: argparse.Namespace) -> int:
    from loadtest.sim import explore

    workers = args.workers if args.workers is not None else explore.default_workers()
    if workers <= 0:
        raise InputError(f"--workers must be positive, got {workers}")
    total = args.runs
    last = [0.0]

    def progress(summary: explore.Summary) -> None:
        now = time.perf_counter()
        if args.quiet or args.json or now - last[0] < 2.0:
            return
        last[0] = now
        rate = summary.runs / summary.wall_s if summary.wall_s else 0.0
        print(f"{summary.runs}/{total} runs, {summary.failed_runs} failed, {rate:.1f} runs/s", file=sys.stderr,
              flush=True)

    if args.stop_after is not None and args.stop_after <= 0:
        raise InputError(f"--stop-after must be positive, got {args.stop_after}")
    summary = explore.explore(range(args.start_seed, args.start_seed + total), workers=workers,
                              stop_after=args.stop_after, progress=progress)
    if args.json:
        print(json.dumps({**summary.to_dict(), "inject": args.inject}, indent=2))
    else:
        for line in summary.lines():
            if args.inject is not None and line.startswith("replay: "):
                line += f" --inject {args.inject}"
            print(line)
    return 0 if summary.ok else 1
