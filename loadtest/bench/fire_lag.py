"""Section 2: fire lag, scheduled time to job body start, Baton's leader against plain APScheduler 3.

Measured in-process, not through HTTP probes (those would time the
collector): a ``node.app.Node`` (elector, gated scheduler, claims, run records,
metrics, JSON logs to a file, as shipped) holding the lease alone, with N
interval jobs whose body appends ``now - scheduled_at`` to a list; and a plain
``AsyncIOScheduler`` with the same N jobs, the same triggers and job defaults,
no Baton. Runs per second = N / interval, interval 1 s. The jobs' anchors are
spread evenly over the interval, so the load is a steady rate, not one burst a
second. Plain APScheduler 3 does not hand the fire time to the job; its body
derives it from the job's grid (exact while the lag stays under the interval).

Per rate, the measurements alternate in rounds (plain, Baton on each backend,
plain again; the backends' order turns by one each round), each system's
windows pooled over the rounds, so a slow spell of the machine lands on every
system rather than on whichever ran then. Ratio = Baton p99 / plain p99. A p99
of a few thousand fire times moves by a fifth or more between runs of the same
code on a shared two-core VM (plain against itself, reported), at the target
rate by half between two 20-second runs; the rounds, the 60 s per system at
the target rate, and each ratio's interval over resampled seconds
(``resample``) are what keeps a verdict from resting on one such spell, or
says so when it does.

On a machine with two or more cores the backend servers run on the last core
and the measuring process on the others, for plain and Baton alike: in a
deployment the lock server is another host, and on a shared core the server's
own work on Baton's claims (a PostgreSQL commit, a Lua script) would preempt
the scheduler and be counted as Baton's lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from loadtest.bench.base import Advance, BenchContext, SectionResult, VerdictRow
from loadtest.bench.resample import DRAWS, LEVEL, p99_ratio_interval, seconds
from loadtest.bench.steal import share, stolen
from loadtest.percentile import percentile
from loadtest.servers import Cluster, start_backend
from node.app import Node
from node.config import Settings
from node.jobs import INTERVAL_EPOCH, JobRegistry, JobSpec, RunContext
from node.logs import StructuredFormatter

INTERVAL = 1.0
RATES = (100, 1_000, 10_000)
QUICK_RATES = (100, 1_000)
TARGET_RATE = 1_000
TARGET_RATIO = 1.5
#: At the steady top rate no backend may collapse: this share of the fire times run, p99 within this ratio.
STEADY_RATE, STEADY_SHARE, STEADY_RATIO = 10_000, 0.99, 2.0
#: Alternating rounds per rate below the target rate, at it, and at the steady top rate (each verdict then rests
#: on several spells of the machine, not one); past the target otherwise one (those rates only show saturation).
ROUNDS = 5
TARGET_ROUNDS = 10
STEADY_ROUNDS = 4
QUICK_ROUNDS = 1
#: Seconds of fire times per system and rate, pooled over the rounds; more at the target rate, whose p99 (a
#: few milliseconds, set by the machine's stalls) moved by half between 20-second runs of the same code.
DURATION, TARGET_DURATION, QUICK_DURATION = 20.0, 60.0, 2.0
PLAIN = "apscheduler3 (single process)"
#: Store operations whose mean cost the section reports: the claim window's refills and the record batches.
COST_OPS = ("claim_window", "record_batch")
#: Bounds on one measurement, so an overloaded backend shows up as a note, not as a hung benchmark.
STOP_TIMEOUT = 15.0
SLACK = 60.0
#: A round in which the host took more than this share of the measuring cores' time during any of its windows
#: (steal, ``loadtest/bench/steal.py``) is measured again, plain and Baton alike, up to half the rate's rounds
#: more, and the rounds with the least steal are kept (``quiet_rounds``); the report lists those put aside with
#: their steal and their ratios. Quiet rounds here saw 0-0.5%; in busy hours most rounds saw 1-10%, some 24%.
STEAL_LIMIT = 0.01


def anchor(i: int, n: int) -> datetime:
    """Job i of n fires at EPOCH + i/n of the interval: n jobs make a steady n runs per interval."""
    return INTERVAL_EPOCH + timedelta(microseconds=round(INTERVAL * 1_000_000 * i / n))


def trigger(i: int, n: int) -> IntervalTrigger:
    return IntervalTrigger(seconds=INTERVAL, start_date=anchor(i, n), timezone=UTC)


def _lag_trigger(i: int, n: int, tz: tzinfo) -> IntervalTrigger:
    """``trigger(i, n)`` as a node builds it: per time zone (the probe's is UTC whatever the node's)."""
    return trigger(i, n)


def fire_time(now: datetime, start: datetime) -> datetime:
    """The latest grid instant of a job anchored at ``start`` at or before ``now``."""
    step = timedelta(seconds=INTERVAL)
    return start + ((now - start) // step) * step


class Window:
    """Collects lags only for fire times in [start, end): warm-up (start-up, catch-up) stays out.

    ``steal`` is the share of the measuring cores' time the host took while the
    window's fire times ran (None where the kernel does not count it).
    """

    def __init__(self) -> None:
        self.start: datetime | None = None
        self.end: datetime | None = None
        self.lags: list[float] = []
        self.notes: list[str] = []
        self.steal: float | None = None

    def add(self, scheduled_at: datetime, now: datetime) -> None:
        if self.start is not None and self.start <= scheduled_at and (self.end is None or scheduled_at < self.end):
            self.lags.append((now - scheduled_at).total_seconds())


async def measure_plain(n: int, warmup: float, duration: float) -> Window:
    window = Window()
    anchors = [anchor(i, n) for i in range(n)]

    async def body(i: int) -> None:
        now = datetime.now(UTC)
        window.add(fire_time(now, anchors[i]), now)

    scheduler = AsyncIOScheduler(timezone=UTC, job_defaults={"max_instances": 1, "coalesce": True,
                                                             "misfire_grace_time": 60})
    for i in range(n):
        scheduler.add_job(body, trigger(i, n), args=(i,), id=f"lag-{i:05d}")
    scheduler.start()
    try:
        await run_window(window, warmup, duration)
    finally:
        scheduler.shutdown(wait=False)
    return window


async def measure_baton(n: int, url: str, warmup: float, duration: float) -> tuple[Window, dict[str, Any]]:
    window = Window()

    async def body(run: RunContext) -> None:
        window.add(run.scheduled_at, datetime.now(UTC))

    registry = JobRegistry()
    for i in range(n):
        registry.add(JobSpec(f"lag-{i:05d}", body, functools.partial(_lag_trigger, i, n), False, "fire-lag probe"))
    settings = Settings(node_id="bench-lag", lock_url=url, lock_name=f"bench-lag-{uuid.uuid4().hex[:8]}",
                        lease_ttl=10, renew_deadline=7, retry_period=2, misfire_grace=60, demo_jobs=False,
                        probe_jobs=0, claims="on")
    node = Node(settings, registry)
    retries = RetryCounter()
    logging.getLogger("baton.scheduler").addHandler(retries)
    await node.start()
    try:
        deadline = time.monotonic() + 30
        while not node.elector.is_leader:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench node did not win the lease on {url} within 30 s")
            await asyncio.sleep(0.02)
        await run_window(window, warmup, duration)
    finally:
        try:
            await asyncio.wait_for(node.stop(), timeout=STOP_TIMEOUT)
        except TimeoutError:
            window.notes.append(f"the node took over {STOP_TIMEOUT:g} s to stop")
        logging.getLogger("baton.scheduler").removeHandler(retries)
    return window, {**op_costs(node), "claim_retries": sum(retries.reasons.values()),
                         "retry_reasons": dict(sorted(retries.reasons.items(), key=lambda kv: -kv[1])[:3]),
                         "notes": window.notes}


class RetryCounter(logging.Handler):
    """Counts claims the scheduler had to retry, by the backend's reason: the usual cause of a long tail."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "failed, retrying" in message:
            reason = message.rsplit(": ", 1)[-1][:80]
            self.reasons[reason] = self.reasons.get(reason, 0) + 1


def op_costs(node: Node) -> dict[str, Any]:
    """Mean claim and record latency from the node's own metrics: where a run's time goes."""
    registry = node.metrics.registry
    out: dict[str, Any] = {}
    for op in COST_OPS:
        labels = {"backend": node.metrics.backend, "op": op}
        count = registry.get_sample_value("baton_lock_op_seconds_count", labels) or 0.0
        total = registry.get_sample_value("baton_lock_op_seconds_sum", labels) or 0.0
        out[f"{op}_mean_ms"] = round(total / count * 1000, 3) if count else None
        out[f"{op}_ops"] = int(count)
    return out


async def run_window(window: Window, warmup: float, duration: float) -> None:
    now = datetime.now(UTC)
    window.start = now + timedelta(seconds=warmup)
    window.end = window.start + timedelta(seconds=duration)
    await asyncio.sleep(warmup)
    cpus = os.sched_getaffinity(0)
    before, t0 = stolen(cpus), time.monotonic()
    await asyncio.sleep(duration + 0.3)  # + the last fire times' runs
    window.steal = share(before, stolen(cpus), time.monotonic() - t0, len(cpus))


def summary(lags: list[float], n: int, duration: float) -> dict[str, Any]:
    expected = n * duration / INTERVAL
    p50, p99 = percentile(lags, 50), percentile(lags, 99)
    return {"runs": len(lags), "expected_runs": round(expected), "runs_per_s": round(len(lags) / duration, 1),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "max_ms": round(max(lags) * 1000, 3) if lags else None,
            # the machine did not keep up: runs were dropped (coalesced) or started later than the interval
            "saturated": len(lags) < 0.9 * expected or (p50 is not None and p50 > INTERVAL / 2)}


@contextlib.contextmanager
def node_logging(path: Path) -> Iterator[None]:
    """Logs as a node ships them (JSON, info, APScheduler at warning), to a file; restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("apscheduler").level)
    handler = logging.FileHandler(path)
    handler.setFormatter(StructuredFormatter(lambda: {"node": "bench-lag"}))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("apscheduler").setLevel(saved[2])
        handler.close()


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(the servers' cores, the measuring process's cores), or None on a single core."""
    cpus = sorted(os.sched_getaffinity(0))
    return None if len(cpus) < 2 else ({cpus[-1]}, set(cpus[:-1]))


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run this process (and what it starts meanwhile) on ``cpus``; the old affinity is restored after."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def server_urls(ctx: BenchContext, stack: contextlib.ExitStack, failed: dict[str, str],
                cpus: set[int] | None = None) -> dict[str, str]:
    """A server per backend on ``cpus``, stopped when ``stack`` closes; one that fails to start goes in ``failed``."""
    urls: dict[str, str] = {}
    for kind in ctx.backends:
        if kind == "file":
            urls[kind] = f"file://{ctx.work / 'fire_lag' / 'locks'}"
            continue
        try:
            with pinned(cpus):  # the server's processes inherit the affinity
                server: Cluster = start_backend(kind, ctx.work / "fire_lag" / kind)
        except Exception as exc:  # the other backends still get measured
            failed[kind] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            continue
        stack.callback(server.close)
        urls[kind] = server.url
    if not urls:
        raise RuntimeError("no backend server started: " + "; ".join(f"{k}: {e}" for k, e in failed.items()))
    return urls


@dataclass
class Round:
    """One round at one rate: plain, Baton on each backend (in this round's order), plain again."""

    before: Window
    baton: dict[str, Window]
    costs: dict[str, dict[str, Any]]
    after: Window

    @property
    def plain_lags(self) -> list[float]:
        return self.before.lags + self.after.lags

    def steal(self) -> float | None:
        """The largest share of the measuring cores' time the host took in any of the round's windows."""
        shares = [w.steal for w in (self.before, self.after, *self.baton.values()) if w.steal is not None]
        return max(shares, default=None)

    def ratios(self) -> dict[str, float | None]:
        return {kind: round_ratio(w.lags, self.plain_lags) for kind, w in self.baton.items()}


def measure_round(n: int, urls: dict[str, str], warmup: float, window: float, turn: int,
                  advance: Advance) -> Round:
    before = asyncio.run(measure_plain(n, warmup, window / 2))
    advance()
    baton: dict[str, Window] = {}
    costs: dict[str, dict[str, Any]] = {}
    for kind, url in rotated(list(urls.items()), turn):
        limit = warmup + window + STOP_TIMEOUT + SLACK
        try:
            baton[kind], costs[kind] = asyncio.run(asyncio.wait_for(measure_baton(n, url, warmup, window), limit))
        except TimeoutError:
            baton[kind] = Window()
            costs[kind] = {"notes": [f"no result within {limit:g} s"]}
        advance()
    after = asyncio.run(measure_plain(n, warmup, window / 2))
    advance()
    return Round(before, baton, costs, after)


def redo_budget(rounds: int, quick: bool) -> int:
    """Rounds a rate may measure again for the host's steal: half its rounds, none in a quick run."""
    return 0 if quick else max(1, rounds // 2)


def quiet_rounds(rounds: int, budget: int, measure: Callable[[int], Round],
                 again: Callable[[], None]) -> tuple[list[Round], list[dict[str, Any]]]:
    """The ``rounds`` quietest of up to ``rounds + budget`` rounds, and the rounds put aside.

    Rounds are measured until ``rounds`` of them saw the host take at most
    ``STEAL_LIMIT`` of the measuring cores (a round without a reading counts as
    quiet) or ``budget`` rounds more than planned were measured; then the
    ``rounds`` with the least steal are kept, in the order they were measured.
    Whole rounds go, plain with Baton, by the kernel's count alone, never by
    their lags. ``measure(turn)`` measures one round (the backends' order turns
    with ``turn``); ``again`` is told before each round beyond the plan.
    """
    measured: list[Round] = []

    def steal(r: Round) -> float:
        return r.steal() or 0.0

    while len(measured) < rounds + budget:
        if sum(steal(r) <= STEAL_LIMIT for r in measured) >= rounds:
            break
        if len(measured) >= rounds:
            again()
        measured.append(measure(len(measured)))
    keep = set(sorted(range(len(measured)), key=lambda i: (steal(measured[i]), i))[:rounds])
    put_aside = [{"steal": round(steal(r), 4), "round_ratios_p99": r.ratios(),
                  "notes": [note for cost in r.costs.values() for note in cost.get("notes", [])]}
                 for i, r in enumerate(measured) if i not in keep]
    return [r for i, r in enumerate(measured) if i in keep], put_aside


def run(ctx: BenchContext) -> SectionResult:
    rates = QUICK_RATES if ctx.quick else RATES
    (ctx.work / "fire_lag").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    redone: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    split = cpu_split()
    servers_cpus, own_cpus = split if split is not None else (None, None)
    with contextlib.ExitStack() as stack:
        urls = server_urls(ctx, stack, failed, servers_cpus)
        stack.enter_context(pinned(own_cpus))
        plan = [(rate, rounds_for(rate, ctx.quick)) for rate in rates]
        per_round = 2 + len(urls)
        advance = ctx.step("fire lag", total=sum(rounds * per_round for _, rounds in plan))
        stack.enter_context(node_logging(ctx.work / "fire_lag" / "node.log"))
        for rate, rounds in plan:
            n = round(rate * INTERVAL)
            duration = duration_for(rate, ctx.quick)
            warmup = 1.0 + n / 1000  # start-up, and the catch-up on winning (one claim per job) drained
            window = duration / rounds
            measure = functools.partial(measure_round, n, urls, warmup, window, advance=advance)
            kept, redone[str(rate)] = quiet_rounds(rounds, redo_budget(rounds, ctx.quick), measure,
                                                   lambda: advance(0, more=per_round))
            results[str(rate)] = pooled(kept, list(urls), n, duration, ctx.seed)
    return result(ctx, rates, results, failed, split, redone)


def pooled(rounds: list[Round], kinds: list[str], n: int, duration: float, seed: int) -> dict[str, Any]:
    """One rate's row: each system's fire times pooled over the rounds, ratios to plain's p99 with intervals."""
    before = [lag for r in rounds for lag in r.before.lags]  # plain, ahead of each round's Baton runs
    after = [lag for r in rounds for lag in r.after.lags]  # and after them
    plain = {**summary(before + after, n, duration), "self_ratio_p99": self_ratio(before, after)}
    row: dict[str, Any] = {}
    # seconds of fire times, per system, for the ratio's interval (``resample``)
    plain_blocks = [block for r in rounds for block in seconds(r.before.lags, n) + seconds(r.after.lags, n)]
    steals = [None if (x := r.steal()) is None else round(x, 4) for r in rounds]
    ratios = [r.ratios() for r in rounds]
    for kind in kinds:
        costs: dict[str, Any] = {}
        for r in rounds:
            costs = merge_costs(costs, r.costs[kind])
        stats = summary([lag for r in rounds for lag in r.baton[kind].lags], n, duration)
        base, mine = plain["p99_ms"], stats["p99_ms"]
        interval = p99_ratio_interval([block for r in rounds for block in seconds(r.baton[kind].lags, n)],
                                      plain_blocks, seed=seed)
        row[kind] = {**stats, **costs, "round_ratios_p99": [of_round[kind] for of_round in ratios],
                     "round_steal": steals,
                     "ratio_p99": round(mine / base, 2) if base and mine is not None else None,
                     "ratio_p99_interval": None if interval is None else [round(x, 2) for x in interval]}
    row[PLAIN] = plain
    return row


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


def round_ratio(mine: list[float], plain: list[float]) -> float | None:
    """One round's ratio: Baton's p99 in it over plain's p99 in the same round (its runs before and after)."""
    a, b = percentile(mine, 99), percentile(plain, 99)
    return round(a / b, 2) if a is not None and b else None


def rotated(items: list[Any], turn: int) -> list[Any]:
    """``items`` turned by ``turn`` places: over as many rounds as items, each takes each place once."""
    if not items:
        return items
    k = turn % len(items)
    return items[k:] + items[:k]


def self_ratio(before: list[float], after: list[float]) -> float | None:
    """Plain APScheduler against itself: the larger of its two halves' p99 over the smaller (>= 1).

    Both halves run the same scheduler minutes apart at most, around the Baton
    runs of each round: how far apart they land is how far a ratio moves on
    this machine in this run with nothing changed, the yardstick for Baton's.
    """
    a, b = percentile(before, 99), percentile(after, 99)
    if not a or not b:
        return None
    return round(max(a, b) / min(a, b), 2)


def rounds_for(rate: int, quick: bool) -> int:
    if quick:
        return QUICK_ROUNDS
    if rate == TARGET_RATE:
        return TARGET_ROUNDS
    return ROUNDS if rate < TARGET_RATE else STEADY_ROUNDS if rate == STEADY_RATE else 1


def duration_for(rate: int, quick: bool) -> float:
    """Seconds of fire times per system at ``rate``, pooled over its rounds."""
    return QUICK_DURATION if quick else TARGET_DURATION if rate == TARGET_RATE else DURATION


def merge_costs(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Pool one round's op costs into the rate's: means weighted by their op counts, retries and notes added."""
    if not total:
        return more
    out = dict(total)
    for op in COST_OPS:
        n1, n2 = total.get(f"{op}_ops", 0), more.get(f"{op}_ops", 0)
        m1, m2 = total.get(f"{op}_mean_ms") or 0.0, more.get(f"{op}_mean_ms") or 0.0
        out[f"{op}_ops"] = n1 + n2
        out[f"{op}_mean_ms"] = round((m1 * n1 + m2 * n2) / (n1 + n2), 3) if n1 + n2 else None
    out["claim_retries"] = total.get("claim_retries", 0) + more.get("claim_retries", 0)
    reasons = dict(total.get("retry_reasons", {}))
    for reason, count in more.get("retry_reasons", {}).items():
        reasons[reason] = reasons.get(reason, 0) + count
    out["retry_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    out["notes"] = [*total.get("notes", []), *more.get("notes", [])]
    return out


def result(ctx: BenchContext, rates: tuple[int, ...], results: dict[str, dict[str, Any]],
           failed: dict[str, str], split: tuple[set[int], set[int]] | None = None,
           redone: dict[str, list[dict[str, Any]]] | None = None) -> SectionResult:
    lines = ["| runs/s | system | backend | runs | p50 ms | p99 ms | max ms | p99 ratio (interval) "
             "| claim window / record batch mean ms | claim retries |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    def with_interval(ratio: float | None, interval: list[float] | None) -> str:
        return ms(ratio) + ("" if interval is None else f" ({interval[0]:.2f}-{interval[1]:.2f})")

    for rate, row in results.items():
        for system, r in row.items():
            name, backend = (PLAIN, "-") if system == PLAIN else ("baton", system)
            ratio = "1.00" if system == PLAIN else with_interval(r.get("ratio_p99"), r.get("ratio_p99_interval"))
            costs = "" if system == PLAIN else (f"{ms(r.get('claim_window_mean_ms'))} / "
                                                f"{ms(r.get('record_batch_mean_ms'))}")
            retried = "" if system == PLAIN else str(r.get("claim_retries", "n/a"))
            if r.get("retry_reasons"):
                top, count = next(iter(r["retry_reasons"].items()))
                retried += f" ({count}: {top})"
            runs = f"{r['runs']}" + (" (saturated)" if r["saturated"] else "")
            lines.append(f"| {int(rate):,} | {name} | {backend} | {runs} | {ms(r['p50_ms'])} | {ms(r['p99_ms'])} "
                         f"| {ms(r['max_ms'])} | {ratio} | {costs} | {retried} |")
    spreads = [f"{int(rate):,}/s {ms(row[PLAIN].get('self_ratio_p99'))}" for rate, row in results.items()
               if PLAIN in row]
    targets: list[dict[str, Any]] = []
    at = results.get(str(TARGET_RATE), {})
    steady = results.get(str(STEADY_RATE), {})
    for kind in ctx.backends:
        ratio = at.get(kind, {}).get("ratio_p99")
        met = None if ratio is None else ratio <= TARGET_RATIO
        targets.append({"backend": kind, "rate": TARGET_RATE, "ratio_p99": ratio,
                        "ratio_p99_interval": at.get(kind, {}).get("ratio_p99_interval"), "met": met,
                        "target": f"p99 <= {TARGET_RATIO}x"})
    for kind in ctx.backends:
        steady_row: dict[str, Any] | None = steady.get(kind)
        if steady_row is None:
            continue
        share = steady_row["runs"] / steady_row["expected_runs"] if steady_row.get("expected_runs") else None
        steady_ratio: float | None = steady_row.get("ratio_p99")
        met = (None if share is None or steady_ratio is None
               else share >= STEADY_SHARE and steady_ratio <= STEADY_RATIO)
        targets.append({"backend": kind, "rate": STEADY_RATE, "ratio_p99": steady_ratio,
                        "ratio_p99_interval": steady_row.get("ratio_p99_interval"), "share_run": share, "met": met,
                        "target": f">= {STEADY_SHARE:.0%} run, p99 <= {STEADY_RATIO}x"})

    def met_text(met: bool | None) -> str:
        return "n/a (not run)" if met is None else "met" if met else "**not met**"

    target_lines = [f"| {t['backend']} | {t['rate']:,} | {with_interval(t['ratio_p99'], t['ratio_p99_interval'])} "
                    f"| {t['target']} | {met_text(t['met'])} |" for t in targets]
    rounds = ", ".join(f"{rounds_for(r, ctx.quick)} at {r:,}/s" for r in rates)
    durations = ", ".join(f"{duration_for(r, ctx.quick):g} s at {r:,}/s" for r in rates)
    cores = ("the backend servers on the last core, the measuring process on the others (the lock server "
             "is another host in a deployment; on a shared core its work on Baton's claims would be counted "
             "as Baton's lag)" if split is not None else "one core shared by the servers and the measurement")
    method = (f"In-process: one Baton node leading alone (claims ahead, run records, metrics, JSON logs to a "
              f"file) against a plain single-process AsyncIOScheduler, the same N interval jobs every "
              f"{INTERVAL:g} s with anchors spread over the interval (N runs/s), same job defaults. Per rate the "
              f"systems alternate in rounds ({rounds}: plain, Baton per backend in an order that turns each round, "
              f"plain again), fire times per system pooled over the rounds ({durations}); {cores}. The node "
              f"raises the process's "
              f"young-generation GC threshold while it runs (`node/gc_policy.py`); plain APScheduler runs with "
              f"the interpreter's default. "
              f"Lag: body start minus scheduled fire time. Ratio: Baton p99 / plain p99 at the same rate; in "
              f"brackets, the central {LEVEL:.0%} of that ratio over {DRAWS} resamples of whole seconds of fire "
              f"times, each system's apart (`loadtest/bench/resample.py`): how far it could move with this run's "
              f"seconds drawn otherwise. "
              f"Saturated: fewer than 90% of the fire times ran, or the median lag passed half the interval. "
              f"Claim-window and record-batch means come from the node's own `baton_lock_op_seconds` (ops "
              f"`claim_window`, `record_batch`); claim retries are claims the backend did not answer "
              f"(retried with a back-off), with the most frequent reason. Steal: the share of the measuring "
              f"cores' time the host took while a window's fire times ran (`/proc/stat`, "
              f"`loadtest/bench/steal.py`); a round in which it passed {STEAL_LIMIT:.0%} in any window is "
              f"measured again, plain and Baton alike, up to half the rate's rounds more, and the rounds with "
              f"the least steal are kept (whole rounds, by the kernel's count alone, never by their lags); "
              f"those put aside are listed below with their own ratios.")
    failures = [f"**{kind} failed:** {error}" for kind, error in failed.items()]
    spread = ("Plain against itself (its measurements before each round's Baton runs against those after, "
              "p99, the larger over the smaller; half the fire times each): " + ", ".join(spreads) + ". How far "
              "a ratio moves on this machine in this run with nothing changed.")
    per_round = [f"{int(rate):,}/s {system} " + ", ".join(ms(x) for x in r["round_ratios_p99"])
                 for rate, row in results.items() for system, r in row.items()
                 if len(r.get("round_ratios_p99") or ()) > 1]
    if per_round:
        spread += (" Each round on its own (Baton's p99 in the round over plain's in the same round; the verdict "
                   "is the pooled ratio above): " + "; ".join(per_round) + ". A verdict carried by one round is "
                   "a spell of the machine; one every round agrees on is Baton's.")
    steals = [f"{int(rate):,}/s " + ", ".join(percent(x) for x in next(iter(row.values())).get("round_steal", []))
              for rate, row in results.items() if len(row) > 1]
    if steals:
        spread += (" Steal in each of those rounds (the largest share of the measuring cores the host took in "
                   "any of its windows): " + "; ".join(steals) + ".")
    again = [f"{int(rate):,}/s: steal {percent(r['steal'])}, ratios "
             + ", ".join(f"{kind} {ms(x)}" for kind, x in r["round_ratios_p99"].items())
             for rate, rounds in (redone or {}).items() for r in rounds]
    spread += (" Rounds measured again for the host's steal (their fire times are in no pool above): "
               + ("; ".join(again) if again else "none") + ".")
    markdown = "\n".join([method, "", *failures, *([""] if failures else []), *lines, "", spread, "",
                          "Targets:", "",
                          "| backend | runs/s | p99 ratio (interval) | target | met |",
                          "| --- | ---: | ---: | --- | --- |",
                          *target_lines])
    verdict = [VerdictRow(PLAIN, "-", fire_lag_ratio=1.0)]
    for kind in ctx.backends:
        ratio = at.get(kind, {}).get("ratio_p99")
        verdict.append(VerdictRow("baton", kind, fire_lag_ratio=ratio))
    plots = [p for p in [plot(ctx.out / "fire_lag.png", results)] if p is not None]
    data = {"interval_s": INTERVAL, "rates": list(rates), "results": results,
            "window_s": {str(r): duration_for(r, ctx.quick) for r in rates},
            "targets": targets, "failed_backends": failed, "redone_rounds": redone or {},
            "steal_limit": STEAL_LIMIT,
            "rounds": {str(r): rounds_for(r, ctx.quick) for r in rates},
            "server_cpus": sorted(split[0]) if split else None, "bench_cpus": sorted(split[1]) if split else None}
    return SectionResult("fire_lag", "2. Fire lag", data, markdown, plots, verdict)


def plot(path: Path, results: dict[str, dict[str, Any]]) -> Path | None:
    """p50 and p99 lag per system and rate, log scale: the absolute numbers behind the ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return None
    rates = list(results)
    systems = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(rates) * max(1, len(systems)) / 2, 3.8))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(rates))]
        p99 = [results[r][system]["p99_ms"] or math.nan for r in rates]
        p50 = [results[r][system]["p50_ms"] or math.nan for r in rates]
        label = "plain APScheduler 3" if system == PLAIN else f"Baton, {system}"
        ax.bar(xs, p99, width * 0.9, label=label, alpha=0.85)
        ax.scatter(xs, p50, color="black", s=10, zorder=3, marker="_")
    ax.set_xticks(range(len(rates)), [f"{int(r):,}/s" for r in rates])
    ax.set_yscale("log")
    ax.set_ylabel("fire lag p99 (bars), p50 (ticks), ms")
    ax.set_title("Fire lag: scheduled time to body start")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

