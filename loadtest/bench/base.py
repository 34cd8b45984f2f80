"""What every benchmark section hands the report: the contract between sections and the runner.

A section is a module in ``loadtest.bench`` with one entry point::

    def run(ctx: BenchContext) -> SectionResult

It starts what it needs (servers, clusters, peers) under ``ctx.work``, reports
progress through ``ctx.step``, writes its plots into ``ctx.out`` and returns
its numbers. The runner (``loadtest.bench.runner``) calls the sections in
order, merges their verdict rows into the report's first table and writes
``report.md`` and ``report.json``.

Every headline figure is a ratio to a baseline measured in the same run, with
the absolute numbers beside it: absolute times on a shared machine are noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import Progress


class Advance(Protocol):
    """Moves a progress bar on by ``amount`` steps; ``more`` adds steps to do (work found on the way)."""

    def __call__(self, amount: float = 1, *, more: float = 0) -> None: ...


@dataclass
class VerdictRow:
    """One system on one backend, as the report's first table shows it.

    Sections fill in what they measured; the runner merges rows with the same
    (system, backend), later non-None values winning. None prints as "n/a".
    """

    system: str  # "baton", "per-run lock", "tooz", "apscheduler4", "apscheduler3 (single process)"
    backend: str  # "file", "redis", "postgres", "etcd", or "-"
    duplicates: int | None = None
    misses: int | None = None
    failover_p99_ttl: float | None = None  # failover gap p99 as a multiple of the TTL
    fire_lag_ratio: float | None = None  # p99 fire lag / plain APScheduler's p99, same run
    backend_ops_s: float | None = None  # ops/s the whole cluster sends to the backend, under load


@dataclass
class SectionResult:
    name: str  # key in report.json: "failover", "fire_lag", "load", "scale", "peers"
    title: str  # heading in report.md
    data: dict[str, Any]  # JSON-able numbers, absolute values beside the ratios
    markdown: str  # the section's body in report.md (tables, a sentence on method)
    plots: list[Path] = field(default_factory=list)  # PNGs written into ctx.out
    verdict: list[VerdictRow] = field(default_factory=list)


@dataclass
class BenchContext:
    out: Path  # output folder: report.md, report.json, PNGs
    work: Path  # scratch space: server data dirs, collector files, logs
    quick: bool  # CI mode: few rounds, small sizes; the whole run within a couple of minutes
    backends: list[str]  # subset of file, redis, postgres, etcd
    seed: int
    console: Console
    progress: Progress
    #: --rounds: fault rounds per (backend, fault) where a section has rounds; None: the section's own default
    rounds: int | None = None

    def step(self, description: str, total: float) -> Advance:
        """A progress bar for one part of a section; call the returned function to advance it."""
        task = self.progress.add_task(description, total=total)
        totals = [total]

        def advance(amount: float = 1, *, more: float = 0) -> None:
            if more:
                totals[0] += more
                self.progress.update(task, total=totals[0])
            self.progress.advance(task, amount)

        return advance
