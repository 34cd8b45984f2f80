"""``report.md`` and ``report.json`` from the sections' results.

The verdict table comes first because it is what a reader compares: one row
per (system, backend), merged from every section's ``VerdictRow``s, so a
system measured by several sections (Baton by all of them) gets one row.
Sections that failed still appear, with their one error line, so a missing
number is never silently missing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.bench.base import SectionResult, VerdictRow
from lock_backends.registry import KINDS, SHARED

#: Row order in the verdict table; unknown systems and backends sort after these, by name.
SYSTEM_ORDER = ("baton", "apscheduler3 (single process)", "per-run lock", "tooz", "apscheduler4")
BACKEND_ORDER = (*SHARED, "-")

COLUMNS = (  # (VerdictRow field, heading, format)
    ("duplicates", "duplicates", "{:d}"),
    ("misses", "misses", "{:d}"),
    ("failover_p99_ttl", "failover p99 (x TTL)", "{:.2f}"),
    ("fire_lag_ratio", "fire-lag ratio", "{:.2f}"),
    ("backend_ops_s", "backend ops/s", "{:,.0f}"),
)

VERDICT_NOTE = (
    "Duplicates and misses: the strict checker (`loadtest.checker`) over each section's runs; for Baton, the "
    "failover section's plain faults (its aimed faults have rows of their own there). "
    "Failover p99: the crash (kill) fault, from the fault to the first run the new leader started, as a "
    "multiple of the lease TTL (every fault in its section). Fire-lag ratio: p99 of scheduled-to-start lag "
    "at 1,000 runs/s divided by plain single-process APScheduler 3's p99, same machine, same run. "
    "n/a: not measured for that row (or the section failed).")


@dataclass
class SectionOutcome:
    """A section as the runner saw it: its result, or the one line saying why there is none."""

    name: str
    result: SectionResult | None
    error: str | None
    seconds: float


def merge_verdict(outcomes: list[SectionOutcome]) -> list[VerdictRow]:
    """One row per (system, backend); later sections' non-None values win."""
    merged: dict[tuple[str, str], VerdictRow] = {}
    for outcome in outcomes:
        for row in outcome.result.verdict if outcome.result else []:
            key = (row.system, row.backend)
            into = merged.setdefault(key, VerdictRow(row.system, row.backend))
            for f in fields(VerdictRow):
                value = getattr(row, f.name)
                if value is not None and f.name not in ("system", "backend"):
                    setattr(into, f.name, value)

    def rank(value: str, order: tuple[str, ...]) -> tuple[int, str]:
        return (order.index(value), "") if value in order else (len(order), value)

    return sorted(merged.values(), key=lambda r: (rank(r.system, SYSTEM_ORDER), rank(r.backend, BACKEND_ORDER)))


def cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(int(value) if fmt == "{:d}" else value)


def verdict_markdown(rows: list[VerdictRow]) -> str:
    head = "| system | backend | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |"
    body = [f"| {r.system} | {r.backend} | " + " | ".join(cell(getattr(r, f), fmt) for f, _, fmt in COLUMNS)
            + " |" for r in rows]
    if not body:
        body = ["| (no section produced a verdict row) | | " + " | ".join("" for _ in COLUMNS) + " |"]
    return "\n".join([head, rule, *body])


def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, Python, the servers' versions (cheap to ask)."""
    facts: dict[str, Any] = {
        "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    versions = {k.name: _version([k.binary, "--version"]) for k in KINDS if k.binary}
    facts["servers"] = versions
    libs: dict[str, str | None] = {}
    for lib in ("apscheduler", "redis", "psycopg", "aetcd", "fastapi"):
        try:
            from importlib.metadata import version

            libs[lib] = version(lib)
        except Exception:  # not installed: say so rather than fail the report
            libs[lib] = None
    facts["libraries"] = libs
    return facts


def _version(argv: list[str]) -> str | None:
    binary = shutil.which(argv[0])
    if binary is None and argv[0] == "postgres":
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        binary = str(found[-1]) if found else None
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def write_report(out: Path, outcomes: list[SectionOutcome], *, args: dict[str, Any], started: datetime,
                 seconds: float) -> tuple[Path, Path]:
    """Write report.md and report.json into ``out``; return their paths."""
    rows = merge_verdict(outcomes)
    facts = machine_facts()
    failed = [o for o in outcomes if o.error is not None]
    md = ["# Baton benchmark report", "", verdict_markdown(rows), "", VERDICT_NOTE, ""]
    mode = "quick (CI)" if args.get("quick") else "full"
    md.append(f"Run {started.strftime('%Y-%m-%d %H:%M UTC')}, {mode} mode, {seconds:.0f} s, on "
              f"{facts['cores']} cores, Python {facts['python']}; sections: "
              f"{', '.join(o.name for o in outcomes)}; backends: {', '.join(args.get('backends', []))}. "
              "Reproduce: `" + args.get("command", "python -m loadtest bench") + "`.")
    md.append("")
    if failed:
        md.append("**Failed sections:** " + "; ".join(f"`{o.name}`: {o.error}" for o in failed))
        md.append("")
    for o in outcomes:
        title = o.result.title if o.result else o.name
        md.append(f"## {title}")
        md.append("")
        if o.result is None:
            md.append(f"**Failed** after {o.seconds:.0f} s: {o.error}")
            md.append("")
            continue
        md.append(o.result.markdown.strip())
        md.append("")
        for plot in o.result.plots:
            rel = os.path.relpath(plot, out) if Path(plot).is_absolute() else str(plot)
            md.append(f"![{Path(plot).stem}]({rel})")
            md.append("")
    report_md = out / "report.md"
    report_md.write_text("\n".join(md).rstrip() + "\n")

    doc = {
        "date": started.astimezone(UTC).isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "args": args,
        "machine": facts,
        "verdict": [asdict(r) for r in rows],
        "sections": {o.name: {
            "status": "ok" if o.error is None else "failed", "error": o.error, "seconds": round(o.seconds, 1),
            "title": o.result.title if o.result else None, "data": o.result.data if o.result else None,
            "plots": [os.path.relpath(p, out) if Path(p).is_absolute() else str(p)
                      for p in (o.result.plots if o.result else [])],
        } for o in outcomes},
    }
    report_json = out / "report.json"
    report_json.write_text(json.dumps(_finite(doc), indent=2, default=str, allow_nan=False) + "\n")
    return report_md, report_json


def _finite(value: Any) -> Any:
    """NaN and infinities as null: report.json must be strict JSON; other odd values become text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)
