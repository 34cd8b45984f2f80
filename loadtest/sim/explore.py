"""Many seeds on every core, and shrinking one failing schedule to a minimal one."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from loadtest.sim.invariants import INVARIANTS
from loadtest.sim.run import RunResult, run_scenario, run_seed
from loadtest.sim.scenario import Scenario

#: Seeds listed per invariant in a summary.
SEEDS_LISTED = 5


def outcome(result: RunResult) -> dict[str, Any]:
    """What a worker sends back about one run (small: a run's history stays in the worker)."""
    faults = Counter(f["kind"] + (f":{f['effect']}" if f["kind"] == "op" else "")
                     for f in result.history.faults if not f.get("skipped"))
    first: dict[str, dict[str, Any]] = {}
    for v in result.checked.violations:
        first.setdefault(v.invariant, {"t": round(v.t, 3), "detail": v.detail[:300]})
    return {"seed": result.seed, "error": result.error, "violations": first, "faults": dict(faults),
            "skipped": sum(1 for f in result.history.faults if f.get("skipped")),
            "checked": result.checked.counts, "excused": result.checked.excused,
            "virtual_s": result.history.end, "cpu_s": result.cpu_s}


def _one(seed: int) -> dict[str, Any]:
    return outcome(run_seed(seed))


def _init_worker() -> None:
    gc.freeze()  # what the imports built lives as long as the worker: keep it out of every collection


@dataclass
class Summary:
    runs: int = 0
    failed_runs: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    seeds: dict[str, list[int]] = field(default_factory=dict)  # invariant -> failing seeds (first few)
    violating_runs: Counter[str] = field(default_factory=Counter)  # invariant -> runs that violated it
    first_detail: dict[str, tuple[int, str]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    skipped_faults: int = 0
    checked: Counter[str] = field(default_factory=Counter)
    excused: Counter[str] = field(default_factory=Counter)
    virtual_s: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 1

    def add(self, out: dict[str, Any]) -> None:
        self.runs += 1
        seed = out["seed"]
        if out["error"]:
            self.errors.append((seed, out["error"]))
        if out["violations"] or out["error"]:
            self.failed_runs += 1
        for name, v in out["violations"].items():
            self.violating_runs[name] += 1
            listed = self.seeds.setdefault(name, [])
            if len(listed) < SEEDS_LISTED:
                listed.append(seed)
            if name not in self.first_detail or seed < self.first_detail[name][0]:
                self.first_detail[name] = (seed, v["detail"])
        self.faults.update(out["faults"])
        self.skipped_faults += out["skipped"]
        self.checked.update(out["checked"])
        self.excused.update(out["excused"])
        self.virtual_s += out["virtual_s"]
        self.cpu_s += out["cpu_s"]

    @property
    def ok(self) -> bool:
        return self.failed_runs == 0

    def first_failing_seed(self) -> int | None:
        seeds = [s for listed in self.seeds.values() for s in listed] + [s for s, _ in self.errors]
        return min(seeds) if seeds else None

    def lines(self) -> list[str]:
        rate = self.runs / self.wall_s if self.wall_s else 0.0
        out = [f"runs: {self.runs} in {self.wall_s:.1f}s on {self.workers} worker(s): {rate:.1f} runs/s, "
               f"{self.cpu_s / max(1, self.runs) * 1000:.0f} ms CPU and {self.virtual_s / max(1, self.runs):.1f} "
               "virtual s per run",
               "faults injected: " + (", ".join(f"{k} {n}" for k, n in sorted(self.faults.items())) or "none")
               + (f" (and {self.skipped_faults} with no target then)" if self.skipped_faults else ""),
               "invariants checked: " + ", ".join(f"{name} ({self.checked.get(name, 0)} items)"
                                                  for name in INVARIANTS)]
        if self.excused:
            out.append("documented cases excused: " + ", ".join(f"{k} {n}" for k, n in sorted(self.excused.items())))
        if self.ok:
            out.append(f"violations: none in {self.runs} runs")
            return out
        out.append(f"violations: {self.failed_runs} of {self.runs} runs failed")
        for name in INVARIANTS:
            if name in self.violating_runs:
                seed, detail = self.first_detail[name]
                out.append(f"  {name}: {self.violating_runs[name]} runs, seeds {', '.join(map(str, self.seeds[name]))}"
                           f"{' ...' if self.violating_runs[name] > len(self.seeds[name]) else ''}")
                out.append(f"    seed {seed}: {detail[:200]}")
        for seed, error in self.errors[:SEEDS_LISTED]:
            out.append(f"  simulator error, seed {seed}: {error}")
        first = self.first_failing_seed()
        if first is not None:
            out.append(f"replay: python -m loadtest sim --seed {first}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "failed_runs": self.failed_runs, "ok": self.ok, "workers": self.workers,
                "wall_s": round(self.wall_s, 3),
                "runs_per_s": round(self.runs / self.wall_s, 2) if self.wall_s else None,
                "cpu_s": round(self.cpu_s, 3), "virtual_s": round(self.virtual_s, 3),
                "faults": dict(sorted(self.faults.items())), "skipped_faults": self.skipped_faults,
                "checked": {name: self.checked.get(name, 0) for name in INVARIANTS},
                "excused": dict(sorted(self.excused.items())),
                "violations": {name: {"runs": self.violating_runs[name], "seeds": self.seeds[name],
                                      "first": self.first_detail[name][1]} for name in self.violating_runs},
                "errors": [{"seed": s, "error": e} for s, e in self.errors]}


def explore(seeds: Iterable[int], *, workers: int = 1, stop_after: int | None = None,
            progress: Callable[[Summary], None] | None = None) -> Summary:
    """Run every seed (across ``workers`` processes) and summarize. ``progress`` is called after each run.

    ``stop_after``: stop once this many runs failed (the runs still in flight are dropped).
    """
    seeds = list(seeds)
    summary = Summary(workers=workers)
    t0 = time.perf_counter()

    def done() -> bool:
        summary.wall_s = time.perf_counter() - t0
        if progress:
            progress(summary)
        return stop_after is not None and summary.failed_runs >= stop_after

    if workers <= 1:
        for seed in seeds:
            summary.add(_one(seed))
            if done():
                break
    else:
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        chunk = max(1, min(16, len(seeds) // (workers * 8) or 1))
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for out in pool.imap_unordered(_one, seeds, chunksize=chunk):
                summary.add(out)
                if done():
                    pool.terminate()
                    break
    summary.wall_s = time.perf_counter() - t0
    for listed in summary.seeds.values():
        listed.sort()
    return summary


def default_workers() -> int:
    try:
        return max(1, min(2, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(2, os.cpu_count() or 1))


# -- shrinking ---------------------------------------------------------------------------------


def _still(result: RunResult, invariant: str) -> bool:
    return any(v.invariant == invariant for v in result.checked.violations)


def shrink(scenario: Scenario, invariant: str | None = None,
           log: Callable[[str], None] | None = None) -> tuple[Scenario, RunResult]:
    """Drop faults (one at a time, while the violation of ``invariant`` persists), then unneeded jobs.

    ``invariant`` defaults to the first one the scenario violates. Returns the
    minimal scenario found and its run. Raises ValueError if it violates nothing.
    """
    result = run_scenario(scenario)
    if invariant is None:
        if not result.checked.violations:
            raise ValueError("the scenario violates no invariant: nothing to shrink")
        invariant = result.checked.violations[0].invariant
    elif not _still(result, invariant):
        raise ValueError(f"the scenario does not violate {invariant}")
    say = log or (lambda _msg: None)
    current = scenario
    changed = True
    while changed:
        changed = False
        for i in range(len(current.faults)):
            trial = replace(current, faults=current.faults[:i] + current.faults[i + 1:])
            r = run_scenario(trial)
            if _still(r, invariant):
                say(f"dropped {current.faults[i].describe()} at {current.faults[i].at:.3f}: "
                    f"{len(trial.faults)} fault(s) left")
                current, result, changed = trial, r, True
                break
    jobs = {v.job for v in result.checked.violations if v.invariant == invariant and v.job}
    if jobs and len(jobs) < len(current.config.jobs):
        config = replace(current.config, jobs=tuple(j for j in current.config.jobs if j.id in jobs))
        faults = [f for f in current.faults if f.kind != "run_now" or f.job in jobs]
        trial = replace(current, config=config, faults=faults)
        r = run_scenario(trial)
        if _still(r, invariant):
            say(f"kept only job(s) {', '.join(sorted(jobs))}")
            current, result = trial, r
    name = current.name + " (shrunk)" if current.name else "shrunk"
    shrunk = replace(current, name=name, replay="")
    result.scenario = shrunk
    return shrunk, result
