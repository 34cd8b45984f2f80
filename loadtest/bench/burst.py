"""Section: bursts, N jobs due in the same second, Baton's leader against plain APScheduler 3.

The most common shape of a large schedule is a herd: thousands of per-tenant
jobs all at 03:00. Each measurement runs in a process of its own (so its
resident memory is its own): N interval jobs every ``PERIOD`` seconds, all
anchored at the same instant, either in a plain ``AsyncIOScheduler`` or in a
``node.app.Node`` leading alone on a backend (claim window, run records,
metrics, JSON logs to a file, as shipped). It waits for the first burst at
least ``lead-in`` seconds after it is ready, then reports how many of the N
fire times started within the burst's misfire grace, the start lags (body
start minus the fire time), and its resident memory. Systems alternate in
rounds, as in the fire-lag section, and the servers run on a core of their own
where there are two or more. Ratio = Baton p99 / plain p99 in the same run.

    python -m loadtest.bench.burst --worker plain --jobs 10000   # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loadtest.bench.base import BenchContext, SectionResult, VerdictRow
from loadtest.bench.fire_lag import cpu_split, node_logging, pinned, server_urls
from loadtest.percentile import percentile
from node.outcomes import RunOutcome

SIZES = (1_000, 10_000, 50_000)
QUICK_SIZES = (1_000, 5_000)
ROUNDS = 2
QUICK_ROUNDS = 1
#: Seconds between two bursts of the same jobs; the misfire grace is the same.
PERIOD = 600.0
GRACE = 60.0
TARGET_SIZE = 50_000
TARGET_RATIO = 1.5
PLAIN = "apscheduler3 (single process)"


def burst_instant(lead_in: float) -> datetime:
    """The burst: a whole second ``lead_in`` seconds from now. Every job's first fire time, so nothing fires
    before it (a burst still running would be measured into this one) and the next comes a period later."""
    return (datetime.now(UTC) + timedelta(seconds=lead_in + 1)).replace(microsecond=0)


# -- one measurement, in its own process ----------------------------------------------------------


class Lags:
    def __init__(self) -> None:
        self.burst: datetime | None = None
        self.lags: list[float] = []
        self.expected = 0
        self.all_started = asyncio.Event()

    def add(self, scheduled_at: datetime) -> None:
        if self.burst is not None and scheduled_at == self.burst:
            now = datetime.now(UTC)
            self.lags.append((now - scheduled_at).total_seconds())
            if len(self.lags) >= self.expected:
                self.all_started.set()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def wait_burst(lags: Lags, n: int, burst: datetime) -> dict[str, Any]:
    lags.burst = burst
    lags.all_started = asyncio.Event()
    lags.expected = n
    deadline = lags.burst + timedelta(seconds=GRACE)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(lags.all_started.wait(), (deadline - datetime.now(UTC)).total_seconds())
    rss = rss_mib()
    return {"jobs": n, "started": len(lags.lags), "p50_s": percentile(lags.lags, 50),
            "p99_s": percentile(lags.lags, 99), "max_s": max(lags.lags, default=None), "rss_mib": round(rss, 1)}


async def measure_plain(n: int, lead_in: float) -> dict[str, Any]:
    burst = burst_instant(lead_in)
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    lags = Lags()

    async def body(i: int) -> None:
        now = datetime.now(UTC)
        lags.add(burst + ((now - burst) // timedelta(seconds=PERIOD)) * timedelta(seconds=PERIOD))

    scheduler = AsyncIOScheduler(timezone=UTC, job_defaults={"max_instances": 1, "coalesce": True,
                                                             "misfire_grace_time": int(GRACE)})
    for i in range(n):
        scheduler.add_job(body, IntervalTrigger(seconds=PERIOD, start_date=burst, timezone=UTC), args=(i,),
                          id=f"burst-{i:05d}")
    scheduler.start()
    try:
        return await wait_burst(lags, n, burst)
    finally:
        scheduler.shutdown(wait=False)


async def measure_baton(n: int, url: str, lead_in: float, log_path: Path) -> dict[str, Any]:
    from apscheduler.triggers.interval import IntervalTrigger

    from node.app import Node
    from node.config import Settings
    from node.jobs import JobRegistry, JobSpec, RunContext

    lags = Lags()
    burst = burst_instant(lead_in)

    async def body(run: RunContext) -> None:
        lags.add(run.scheduled_at)

    registry = JobRegistry()
    for i in range(n):
        registry.add(JobSpec(f"burst-{i:05d}", body, lambda tz: IntervalTrigger(seconds=PERIOD, start_date=burst,
                                                                              timezone=tz)))
    settings = Settings(node_id="bench-burst", lock_url=url, lock_name=f"bench-burst-{uuid.uuid4().hex[:8]}",
                        lease_ttl=10, renew_deadline=7, retry_period=2, misfire_grace=GRACE, demo_jobs=False)
    node = Node(settings, registry)
    with node_logging(log_path):
        await node.start()
        try:
            deadline = time.monotonic() + 60
            while not node.elector.is_leader:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the bench node did not win the lease on {url} within 60 s")
                await asyncio.sleep(0.05)
            found = await wait_burst(lags, n, burst)
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(node.stop(), 30)
    found["outcomes"] = _outcomes(node)
    found["claim_window_ops"] = int(node.metrics.registry.get_sample_value(
        "baton_lock_op_seconds_count", {"backend": node.metrics.backend, "op": "claim_window"}) or 0)
    return found


def _outcomes(node: Any) -> dict[str, float]:
    totals: dict[str, float] = {}
    for metric in node.metrics.registry.collect():
        if metric.name != "baton_job_runs":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                totals[sample.labels["outcome"]] = totals.get(sample.labels["outcome"], 0) + sample.value
    return totals


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.burst")
    p.add_argument("--worker", choices=("plain", "baton"), required=True)
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--url", default="")
    p.add_argument("--lead-in", type=float, default=5.0)
    p.add_argument("--log", type=Path, default=Path("/dev/null"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.worker == "plain":
        found = asyncio.run(measure_plain(args.jobs, args.lead_in))
    else:
        found = asyncio.run(measure_baton(args.jobs, args.url, args.lead_in, args.log))
    print(json.dumps(found))
    return 0


# -- the section ----------------------------------------------------------------------------------


def measure(argv: list[str], timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, "-m", "loadtest.bench.burst", *argv], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:g} s"}
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": f"exit {done.returncode}: {tail}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one system: the worst round's counts (a burst that lost runs must show), pooled lags."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": "; ".join(r["error"] for r in runs)}
    worst = min(good, key=lambda r: r["started"])
    out = {"jobs": worst["jobs"], "started": worst["started"],
           "p50_s": max(r["p50_s"] or 0 for r in good) if any(r["p50_s"] for r in good) else None,
           "p99_s": max(r["p99_s"] or 0 for r in good) if any(r["p99_s"] for r in good) else None,
           "max_s": max(r["max_s"] or 0 for r in good) if any(r["max_s"] for r in good) else None,
           "rss_mib": max(r["rss_mib"] for r in good), "rounds": len(good)}
    for key in ("outcomes", "claim_window_ops"):
        if key in worst:
            out[key] = worst[key]
    if len(good) < len(runs):
        out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def run(ctx: BenchContext) -> SectionResult:
    sizes = QUICK_SIZES if ctx.quick else SIZES
    rounds = QUICK_ROUNDS if ctx.quick else ROUNDS
    work = ctx.work / "burst"
    work.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    split = cpu_split()
    servers_cpus, own_cpus = split if split is not None else (None, None)
    with contextlib.ExitStack() as stack:
        urls = server_urls(ctx, stack, failed, servers_cpus)
        stack.enter_context(pinned(own_cpus))  # the workers inherit it
        advance = ctx.step("bursts", total=len(sizes) * rounds * (2 + len(urls)))
        for n in sizes:
            lead_in = 5.0 + n / 5000  # start-up of N jobs, and the leader's realignment
            timeout = lead_in + GRACE + 120
            plain: list[dict[str, Any]] = []
            mine: dict[str, list[dict[str, Any]]] = {kind: [] for kind in urls}
            for _ in range(rounds):
                plain.append(measure(["--worker", "plain", "--jobs", str(n), "--lead-in", str(lead_in)], timeout))
                advance()
                for kind, url in urls.items():
                    log = work / f"node-{kind}-{n}.log"
                    mine[kind].append(measure(["--worker", "baton", "--jobs", str(n), "--url", url,
                                               "--lead-in", str(lead_in), "--log", str(log)], timeout))
                    advance()
                plain.append(measure(["--worker", "plain", "--jobs", str(n), "--lead-in", str(lead_in)], timeout))
                advance()
            row = {PLAIN: pooled(plain), **{kind: pooled(runs) for kind, runs in mine.items()}}
            base = row[PLAIN].get("p99_s")
            for kind in urls:
                p99 = row[kind].get("p99_s")
                row[kind]["ratio_p99"] = round(p99 / base, 2) if base and p99 is not None else None
            results[str(n)] = row
    return result(ctx, sizes, rounds, results, failed, split)


def result(ctx: BenchContext, sizes: tuple[int, ...], rounds: int, results: dict[str, dict[str, Any]],
           failed: dict[str, str], split: tuple[set[int], set[int]] | None) -> SectionResult:
    def s(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["| jobs due at once | system | backend | started | p50 s | p99 s | max s | p99 ratio | RSS MiB "
             "| other outcomes |", "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for n, row in results.items():
        for system, r in row.items():
            name, backend = (PLAIN, "-") if system == PLAIN else ("baton", system)
            if "error" in r:
                lines.append(f"| {int(n):,} | {name} | {backend} | **failed**: {r['error']} | | | | | | |")
                continue
            ratio = "1.00" if system == PLAIN else s(r.get("ratio_p99"))
            others = ", ".join(f"{k} {int(v)}" for k, v in sorted(r.get("outcomes", {}).items()) if k != RunOutcome.OK)
            lines.append(f"| {int(n):,} | {name} | {backend} | {r['started']:,} of {r['jobs']:,} | {s(r['p50_s'])} "
                         f"| {s(r['p99_s'])} | {s(r['max_s'])} | {ratio} | {r['rss_mib']:.0f} | {others} |")
    targets = []
    at = results.get(str(TARGET_SIZE), {})
    for kind in ctx.backends:
        r = at.get(kind, {})
        ratio, all_started = r.get("ratio_p99"), r.get("started") == TARGET_SIZE
        met = None if not r or "error" in r else all_started and ratio is not None and ratio <= TARGET_RATIO
        targets.append({"backend": kind, "started": r.get("started"), "ratio_p99": ratio, "met": met})
    def met_text(met: bool | None) -> str:
        return "n/a (not run)" if met is None else "met" if met else "**not met**"

    target_lines = [f"| {t['backend']} | {t['started'] if t['started'] is not None else 'n/a'} | "
                    f"{s(t['ratio_p99'])} | {met_text(t['met'])} |" for t in targets]
    cores = ("servers on the last core, the workers on the others" if split is not None
             else "one core shared by the servers and the workers")
    method = (f"Each measurement in a process of its own: N interval jobs whose first fire time is the same "
              f"instant, a few seconds after start-up (every {PERIOD:g} s after that), in a plain AsyncIOScheduler "
              f"or in a Baton node leading alone (claim window, run records, metrics, JSON logs to a file); that "
              f"burst is measured, within a {GRACE:g} s misfire grace. Started: fire times of the burst whose body "
              f"started. Lag: body start minus the fire time. {rounds} round(s) alternating plain, Baton per "
              f"backend, plain; the worst round's count and the highest lags are shown; {cores}. Other outcomes: "
              f"the node's own count of fire times that did not end `ok` (missed past the grace, skipped...).")
    failures = [f"**{kind} failed:** {error}" for kind, error in failed.items()]
    markdown = "\n".join([method, "", *failures, *([""] if failures else []), *lines, "",
                          f"Target at {TARGET_SIZE:,} jobs: every fire time started, p99 at most {TARGET_RATIO}x "
                          "plain's:", "", "| backend | started | p99 ratio | met |", "| --- | ---: | ---: | --- |",
                          *target_lines])
    verdict = [VerdictRow("baton", kind) for kind in ctx.backends]
    data = {"period_s": PERIOD, "grace_s": GRACE, "sizes": list(sizes), "rounds": rounds, "results": results,
            "targets": targets, "failed_backends": failed}
    return SectionResult("burst", "Bursts: N jobs due in the same second", data, markdown, [], verdict)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
