"""Text and JSON for people and machines: a run's schedule, its verdict, the events around a violation."""

from __future__ import annotations

from typing import Any

from loadtest.sim.history import WALL0, History
from loadtest.sim.invariants import Violation
from loadtest.sim.run import RunResult
from loadtest.sim.scenario import STORE_KINDS, Scenario

#: Events shown before and after a violation's instant.
BEFORE, AFTER = 14, 8


def fire_label(f_us: int) -> str:
    """A fire time as wall seconds after the run's start (+12.250), which is how the tables show them."""
    return f"{f_us / 1e6 - WALL0:+.3f}"


def schedule_lines(scenario: Scenario) -> list[str]:
    c = scenario.config
    jobs = ", ".join(f"{j.id} every {j.period_ms / 1000:g}s body {j.body_s:g}s"
                     + (" recover" if j.recover else "") + f" max_instances={j.max_instances}" for j in c.jobs)
    hosts = ", ".join(f"{h.name} (clock {h.offset:+.3f}s, rate {h.rate:.4f})" for h in c.hosts)
    lines = [f"config: ttl {c.ttl}s renew {c.renew_deadline}s retry {c.retry_period}s op timeout {c.op_timeout}s "
             f"claim-ahead {c.claim_ahead}s misfire grace {c.misfire_grace}s",
             f"jobs: {jobs}", f"hosts: {hosts}", f"faults ({len(scenario.faults)}):"]
    lines += [f"  {f.at:8.3f}  {f.describe()}" for f in scenario.faults] or ["  (none)"]
    return lines


def events(h: History) -> list[tuple[float, int, str, str, dict[str, Any]]]:
    """Everything in the history as (t, order, host, text, tags), in time order."""
    out: list[tuple[float, int, str, str, dict[str, Any]]] = []

    def add(t: float, host: str, text: str, **tags: Any) -> None:
        out.append((t, len(out), host, text, tags))

    for f in h.faults:
        what = f"FAULT {f['kind']}" + (f" {f['op']} {f['effect']}" if f["kind"] == "op" else "")
        if f.get("duration"):
            what += f" {f['duration']:g}s"
        if f.get("delta"):
            what += f" {f['delta']:+g}s"
        if f.get("job"):
            what += f" {f['job']}"
        if f.get("skipped"):
            what += f" (skipped: {f['skipped']})"
        add(f["t"], f.get("host", "store" if f["kind"] in STORE_KINDS else "-"), what, fault=True)
    for p in h.procs:
        add(p.start, p.host, f"process p{p.pid} starts", proc=True)
        if p.end is not None:
            add(p.end, p.host, f"process p{p.pid} {p.how}", proc=True)
    for host, pid, t0, t1 in h.pauses:
        add(t0, host, f"p{pid} paused", proc=True)
        add(t1, host, f"p{pid} resumed", proc=True)
    for host, t0, t1 in h.cuts:
        add(t0, host or "store", "store down" if not host else "cut off from the store", proc=True)
        add(t1, host or "store", "store back" if not host else "reaches the store again", proc=True)
    for host, at, delta in h.steps:
        add(at, host, f"wall clock stepped {delta:+.3f}s", proc=True)
    for t, token, host in h.grants:
        add(t, host, f"store grants token {token}", lead=True)
    first: set[int] = set()
    for m in h.marks:
        if m.op == "hand_back" and m.at_us is not None:
            busy = f" (busy: {', '.join(m.busy)})" if m.busy else ""
            add(m.t, m.host, f"store: token {m.asked} hands back from {fire_label(m.at_us)}{busy}", lead=True)
        elif m.token == m.asked and m.asked not in first:
            first.add(m.asked)
            add(m.t, m.host, f"store: token {m.asked}'s window starts at {fire_label(m.since_us)}", lead=True)
    for b in h.beliefs:
        add(b.since, b.host, f"p{b.pid} leads (token {b.token})", lead=True)
        if b.until < h.end:
            add(b.until, b.host, f"p{b.pid} no longer leads (token {b.token})", lead=True)
    for r in h.runs:
        add(r.start, r.host, f"START {r.job} {fire_label(r.f_us)} token {r.token} {r.kind} (run {r.rid})",
            job=r.job, rid=r.rid)
        if r.end is not None:
            add(r.end, r.host, f"end {r.job} {fire_label(r.f_us)} {r.status} (run {r.rid})", job=r.job, rid=r.rid)
    for fire in h.fires:
        if fire.exit is not None and fire.outcome not in ("ok", "error"):
            add(fire.exit, fire.host, f"fire {fire.job} {fire.kind} {fire_label(fire.f_us)}: {fire.outcome}",
                job=fire.job)
    for t, host, text, job in h.notes:
        if job:
            add(t, host, f"log: {text}", note=True, job=job)
        else:
            add(t, host, f"log: {text}", note=True)
    out.sort(key=lambda e: (e[0], e[1]))
    return out


def around(h: History, v: Violation) -> list[str]:
    """The events around a violation: faults, processes, leadership, and the runs of its job."""
    rows = [e for e in events(h)
            if not e[4].get("job") or e[4].get("job") == v.job or e[4].get("rid") in v.runs]
    at = next((i for i, e in enumerate(rows) if e[0] > v.t + 1e-9), len(rows))
    keep = set(range(max(0, at - BEFORE), min(len(rows), at + AFTER)))
    keep |= {i for i, e in enumerate(rows) if e[4].get("rid") in v.runs and "START" in e[3]}
    lines = [f"{'':2}{'t (s)':>9}  {'host':5} event"]
    marked = False
    for i in sorted(keep):
        t, _, host, text, _ = rows[i]
        mark = "  "
        if not marked and t >= v.t - 1e-9:
            lines.append(f">>{v.t:9.3f}  {'':5} ** {v.invariant} **")
            marked = True
        lines.append(f"{mark}{t:9.3f}  {host:5} {text[:150]}")
    if not marked:
        lines.append(f">>{v.t:9.3f}  {'':5} ** {v.invariant} **")
    return lines


def result_text(result: RunResult, *, all_violations: bool = False) -> list[str]:
    name = result.scenario.name
    lines = [name if name.startswith(f"seed {result.seed}") else f"{name} (seed {result.seed})" if name
             else f"seed {result.seed}"]
    lines += schedule_lines(result.scenario)
    h = result.history
    lines.append(f"ran {h.end:.1f} virtual seconds: {len(h.runs)} runs, {len(h.grants)} leaderships, "
                 f"{len(h.procs)} processes, {result.iterations} loop iterations, {result.cpu_s * 1000:.0f} ms CPU")
    if result.error:
        lines.append(f"SIMULATOR ERROR: {result.error}")
    violations = result.checked.violations
    if not violations:
        lines.append("OK: every invariant held" + (f" (excused: {_excused(result)})" if result.checked.excused else ""))
        return lines
    by: dict[str, int] = {}
    for v in violations:
        by[v.invariant] = by.get(v.invariant, 0) + 1
    lines.append("VIOLATED: " + ", ".join(f"{k} x{n}" for k, n in by.items()))
    shown = violations if all_violations else violations[:1]
    for v in shown:
        lines.append("")
        lines.append(f"first violation: {v.invariant} at t={v.t:.3f}" if v is violations[0]
                     else f"violation: {v.invariant} at t={v.t:.3f}")
        lines.append(f"  {v.detail}")
        lines += around(h, v)
    if not all_violations and len(violations) > 1:
        lines.append("")
        lines.append("other violations:")
        lines += [f"  {v.invariant} at t={v.t:.3f}: {v.detail[:160]}" for v in violations[1:12]]
        if len(violations) > 12:
            lines.append(f"  ... and {len(violations) - 12} more")
    lines.append("")
    lines.append(f"replay: {result.scenario.replay}" if result.scenario.replay
                 else "replay: save this schedule (--save FILE), then python -m loadtest sim --schedule FILE")
    return lines


def _excused(result: RunResult) -> str:
    return ", ".join(f"{k} x{n}" for k, n in result.checked.excused.items())


def result_json(result: RunResult) -> dict[str, Any]:
    return {
        "seed": result.seed,
        "ok": result.ok,
        "error": result.error,
        "scenario": result.scenario.to_dict(),
        "violations": [v.to_dict() for v in result.checked.violations],
        "checked": result.checked.counts,
        "excused": result.checked.excused,
        "virtual_s": round(result.history.end, 6),
        "runs": len(result.history.runs),
        "iterations": result.iterations,
        "cpu_s": round(result.cpu_s, 4),
    }
