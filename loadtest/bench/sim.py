"""Section: the deterministic simulator (``loadtest.sim``), seeds per second of wall time, and its verdict.

Runs seeds ``--seed`` onward (10,000; ``--quick``: 300) on up to two cores,
exactly as ``python -m loadtest sim --runs N`` does: three production nodes
(elector, gated scheduler, skew guard) on virtual time against the in-memory
store, seeded faults, every invariant checked on each run's history. Reports
the speed (runs per second of wall time, CPU per run, the machine's load
around the measurement, which shares its cores with whatever else runs), the
faults injected by kind, what each invariant looked at, the documented cases
it excused, and the violations, which must be none. Then each hand-built hole
schedule of ``holes.json`` that names a bug once more with it put back
(``loadtest.sim.broken``): the simulator must report every one.
"""

from __future__ import annotations

import os
import time
from typing import Any

from loadtest.bench.base import BenchContext, SectionResult
from loadtest.sim import broken, explore, holes
from loadtest.sim.invariants import INVARIANTS
from loadtest.sim.run import run_scenario

RUNS = 10_000
QUICK_RUNS = 300
#: The issue's goals: 10,000 runs within 5 minutes, 2,000 (one ``make test``) within 60 s, on 2 cores.
GOAL_RUNS_PER_S = RUNS / 300


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run(ctx: BenchContext) -> SectionResult:
    runs = QUICK_RUNS if ctx.quick else RUNS
    workers = explore.default_workers()
    advance = ctx.step("simulated runs", total=runs)
    done = [0]

    def progress(summary: explore.Summary) -> None:
        advance(summary.runs - done[0])
        done[0] = summary.runs

    load_before = _load()
    summary = explore.explore(range(ctx.seed, ctx.seed + runs), workers=workers, progress=progress)
    load_after = _load()
    proofs = []
    for hole in holes.with_bugs():
        t0 = time.perf_counter()
        with broken.injected(hole.bug):
            result = run_scenario(hole.scenario)
        found = sorted({v.invariant for v in result.checked.violations})
        proofs.append({"hole": hole.hole, "schedule": hole.name, "bug": hole.bug, "expect": hole.expect,
                       "found": hole.expect in found, "violated": found,
                       "wall_s": round(time.perf_counter() - t0, 3)})
    return result_of(ctx, summary, workers, load_before, load_after, proofs)


def result_of(ctx: BenchContext, summary: explore.Summary, workers: int, load_before: list[float] | None,
              load_after: list[float] | None, proofs: list[dict[str, Any]]) -> SectionResult:
    rate = summary.runs / summary.wall_s if summary.wall_s else 0.0
    data: dict[str, Any] = {
        **summary.to_dict(), "first_seed": ctx.seed, "cores": os.cpu_count(), "load_before": load_before,
        "load_after": load_after, "cpu_ms_per_run": round(summary.cpu_s / max(1, summary.runs) * 1000, 1),
        "virtual_s_per_run": round(summary.virtual_s / max(1, summary.runs), 2),
        "goal_runs_per_s": round(GOAL_RUNS_PER_S, 1), "holes_with_their_bug": proofs,
    }
    load = (f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
            if load_before and load_after else "load average unknown")
    faults = ", ".join(f"{kind} {n:,}" for kind, n in sorted(summary.faults.items()))
    checked = "\n".join(f"| `{name}` | {summary.checked.get(name, 0):,} |" for name in INVARIANTS)
    excused = "\n".join(f"| {reason} | {n:,} |" for reason, n in sorted(summary.excused.items()))
    if summary.ok:
        verdict = f"**violations: 0** in {summary.runs:,} runs"
    else:
        found = [f"{name} in {n:,} run(s) (seeds {', '.join(map(str, summary.seeds[name]))})"
                 for name, n in sorted(summary.violating_runs.items())]
        verdict = "**violations: " + ", ".join(found) + "**"
        if summary.errors:
            verdict += f"; simulator errors in {len(summary.errors)} run(s)"
    proof_lines = "\n".join(f"| {p['hole'] or 'finding'} | `{p['schedule']}` | `{p['bug']}` | `{p['expect']}` | "
                            f"{'yes' if p['found'] else '**no**'} |" for p in proofs)
    method = (f"Seeds {ctx.seed:,} to {ctx.seed + summary.runs - 1:,} of `python -m loadtest sim`, on {workers} "
              f"worker process(es) ({os.cpu_count()} cores here, {load}): three production nodes on virtual time "
              "against the in-memory store, 2-4 seeded faults each, every invariant checked on the history. "
              "Replay any seed with `python -m loadtest sim --seed N`.")
    markdown = "\n".join([
        method, "",
        "| runs | wall s | runs/s | CPU ms per run | virtual s per run | goal (10,000 in 5 min) |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {summary.runs:,} | {summary.wall_s:.1f} | {rate:.1f} | {data['cpu_ms_per_run']:.0f} | "
        f"{data['virtual_s_per_run']:.1f} | {'met' if rate >= GOAL_RUNS_PER_S else '**not met**'} "
        f"({GOAL_RUNS_PER_S:.1f} runs/s) |", "",
        f"Faults injected: {faults or 'none'}"
        + (f" (and {summary.skipped_faults:,} with no target at their instant)" if summary.skipped_faults else "")
        + ".", "",
        "| invariant | items checked |", "| --- | ---: |", checked, "",
        "| documented case excused | times |", "| --- | ---: |", excused or "| (none) | 0 |", "",
        verdict, "",
        "The simulator can still fail: each hole of #12, and each finding that names its bug, put back "
        "(`loadtest/sim/broken.py`) on its schedule:", "",
        "| hole | schedule | bug | invariant | reported |", "| ---: | --- | --- | --- | --- |", proof_lines,
    ])
    return SectionResult("sim", "Deterministic simulator", data, markdown, [], [])
