"""Section 3, backend load: what a Baton cluster costs its lock server, next to a per-run lock.

Counts come from the server (``loadtest.bench.server_stats``), never from the
nodes. Per backend and node count, Baton runs with production lease timing
(TTL 10 s, retry period 2 s) and:

* under load: 10 probe jobs every second (10 runs/s) reporting to a collector;
* idle: the same cluster after those jobs are paused through the admin API;
* then the leader alone, once the followers are killed: a follower's cost is
  ``(idle(N) - leader alone) / (N - 1)``;
* at the smallest node count, also idle with no jobs at all and idle with 100
  registered jobs that never fire in the window: election traffic must not
  grow with the jobs (100 jobs / 0 jobs).

The per-run lock (``loadtest.bench.perrun_lock``, the ShedLock pattern) runs
the same 10 jobs per second on Redis with the same node counts, its nodes'
clocks 0, 20 and 40 ms apart as separate hosts' would be; its duplicates and
misses are counted from the collector's records.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench.base import BenchContext, SectionResult, VerdictRow
from loadtest.bench.perrun_lock import EPOCH, PerRunLockCluster
from loadtest.bench.server_stats import OpsCounter, counter_for, measure
from loadtest.cluster import LocalCluster, Timing
from loadtest.servers import Cluster, start_backend
from loadtest.up import Collector
from lock_backends.registry import SERVERS
from node.claims import MIN_LEAD, RECORD_SPACING

#: Production defaults of node/config.py: what a user's cluster sends.
TIMING = Timing(ttl=10.0, renew_deadline=7.0, retry_period=2.0, op_timeout=1.0, misfire_grace=30.0)
LOAD_JOBS, LOAD_INTERVAL = 10, 1.0  # 10 runs per second
IDLE_JOBS = 100
#: Registered, never due: anchored at 2000-01-01, the next fire time is months away.
NEVER = 10_000_000.0
DUMMY_PROBE = "http://127.0.0.1:9/probe"
#: Per-run lock nodes' clocks run 0, 20 and 40 ms behind (node i: (i % 3) x this): one host's
#: processes share a clock, real hosts do not, and a per-run lock's safety hinges on that.
SKEW_STEP = 0.020


def plan(ctx: BenchContext) -> tuple[list[str], list[int], float, float]:
    """Backends, node counts, idle window and load window (seconds)."""
    servers = [b for b in ctx.backends if b in SERVERS]
    if ctx.quick:
        return (["redis"] if "redis" in servers else servers[:1]), [3], 3.0, 4.0
    return servers, [3, 10, 30], 12.0, 12.0


def row(system: str, backend: str, nodes: int, state: str, jobs: str, counter: OpsCounter, seconds: float,
        tick: Callable[[float], None]) -> dict[str, Any]:
    """One table row: the server-side rate over a window, labelled with what ran meanwhile."""
    rate = measure(counter, seconds, tick)
    return {"system": system, "backend": backend, "nodes": nodes, "state": state, "jobs": jobs,
            "seconds": round(rate.seconds, 2), "requests_s": round(rate.requests_s, 2),
            "commands_s": round(rate.commands_s, 2)}


def count_runs(path: Path, since: datetime, until: datetime, jobs: int, interval: float) -> dict[str, int]:
    """Runs, duplicate (job, fire time) pairs and misses in [since, until], from the collector's file."""
    seen: Counter[tuple[str, str]] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                at = datetime.fromisoformat(rec["scheduled_at"]).astimezone(UTC)
                if since <= at <= until:
                    seen[(rec["job"], at.isoformat())] += 1
    step = timedelta(seconds=interval)
    k = -(-(since - EPOCH) // step)  # first grid instant at or after `since`
    expected = set()
    while (t := EPOCH + k * step) <= until:
        expected |= {(f"probe-{j:03d}", t.isoformat()) for j in range(jobs)}
        k += 1
    return {"runs": sum(seen.values()), "duplicates": sum(1 for n in seen.values() if n > 1),
            "missed": len(expected - set(seen)), "expected": len(expected)}


@contextlib.contextmanager
def collecting(work: Path, name: str) -> Iterator[Collector]:
    """A probe collector of its own per measurement, so each window's records are read alone."""
    collector = Collector(work / f"{name}.jsonl", work / f"{name}-collector.log")
    try:
        yield collector
    finally:
        collector.stop()


@contextlib.contextmanager
def baton(work: Path, server: Cluster, nodes: int, name: str, jobs: int, interval: float,
          probe_url: str) -> Iterator[LocalCluster]:
    """A Baton cluster on the shared server, under a lock name of its own (no lease or claim of an
    earlier cluster in the way), without fault proxies (their forwarding would cost CPU we measure)."""
    cluster = LocalCluster(work / name, backend=server.kind, nodes=nodes, timing=TIMING, lock_url=server.url,
                           probe_jobs=jobs, probe_interval=interval, probe_url=probe_url, proxies=False,
                           extra_env={"BATON_LOCK_NAME": name, "BATON_LOG_LEVEL": "warning"})
    try:
        cluster.start()
        cluster.wait_for_leader(timeout=60)
        yield cluster
    finally:
        cluster.stop()


def pause_all(cluster: LocalCluster, jobs: int) -> None:
    """Pause the probe jobs through the admin API, as an operator would: the cluster goes idle."""
    leader = cluster.wait_for_leader(timeout=30)
    headers = {"Authorization": f"Bearer {cluster.admin_token}"}
    with httpx.Client(timeout=5) as http:
        for j in range(jobs):
            http.post(f"{leader.url}/admin/jobs/probe-{j:03d}/pause", headers=headers).raise_for_status()


def run_backend(ctx: BenchContext, kind: str, counts: list[int], idle_s: float, load_s: float) -> list[dict[str, Any]]:
    """Every measurement on one backend, against one server started for them (and the baseline, on Redis)."""
    work = ctx.work / f"load-{kind}"
    perrun = kind == "redis"
    windows = len(counts) * (2 * idle_s + load_s * (2 if perrun else 1)) + 2 * idle_s + len(SCALE_JOBS) * load_s
    tick = ctx.step(f"backend load: {kind}", total=windows)
    rows: list[dict[str, Any]] = []
    server = start_backend(kind, work / "server")
    counter = counter_for(kind, server.url)
    try:
        first = counts[0]
        idle_setups = ((0, 1.0, "", "0"), (IDLE_JOBS, NEVER, DUMMY_PROBE, f"{IDLE_JOBS} registered"))
        for jobs, interval, probe, label in idle_setups:
            with baton(work, server, first, f"idle{jobs}-{first}", jobs, interval, probe):
                time.sleep(1)
                rows.append(row("baton", kind, first, "idle", label, counter, idle_s, tick))
        for n in counts:
            with collecting(work, f"baton-{n}") as collector, \
                    baton(work, server, n, f"load-{n}", LOAD_JOBS, LOAD_INTERVAL, collector.url) as cluster:
                time.sleep(1.5)  # past the first fire time and the catch-up
                since = datetime.now(UTC)
                load = row("baton", kind, n, "load", f"{LOAD_JOBS} x 1/s", counter, load_s, tick)
                until = datetime.now(UTC) - timedelta(seconds=1)
                pause_all(cluster, LOAD_JOBS)
                time.sleep(1)
                rows += [load, row("baton", kind, n, "idle", f"{LOAD_JOBS} paused", counter, idle_s, tick)]
                leader = cluster.wait_for_leader()
                for node in cluster.members:
                    if node is not leader:
                        node.kill()
                time.sleep(1)
                alone = row("baton", kind, 1, "leader alone", f"{LOAD_JOBS} paused", counter, idle_s, tick)
                rows.append({**alone, "of_nodes": n})
            load.update(count_runs(collector.out, since, until, LOAD_JOBS, LOAD_INTERVAL))
            if perrun:
                rows.append(run_perrun(work, server, counter, n, load_s, tick))
        for jobs in SCALE_JOBS:
            rows.append(leading_with_jobs(server, counter, jobs, load_s, tick))
    finally:
        counter.close()
        server.close()
    return rows


#: Jobs a leader runs for the "claim cost does not grow with the job count" rows, every ``SCALE_PERIOD`` s.
SCALE_JOBS = (10, 1_000, 10_000)
SCALE_PERIOD = 5.0


def leading_with_jobs(server: Cluster, counter: OpsCounter, jobs: int, seconds: float,
                      tick: Callable[[float], None]) -> dict[str, Any]:
    """A leader alone, in process, running ``jobs`` no-op jobs spread over ``SCALE_PERIOD``: what its
    claim windows, renewals and record batches cost the server. Claims are per window of time and record
    writes spaced, so once the window never lapses this must not grow with the job count."""
    import asyncio

    from node.app import Node
    from node.config import Settings
    from node.jobs import INTERVAL_EPOCH as epoch
    from node.jobs import JobRegistry, JobSpec, RunContext

    async def body(run: RunContext) -> None:
        return None

    registry = JobRegistry()
    for i in range(jobs):
        start = epoch + timedelta(seconds=SCALE_PERIOD * i / jobs)
        registry.add(JobSpec(f"scale-{i:05d}", body, functools.partial(_every, SCALE_PERIOD, start)))

    async def measure_leader() -> dict[str, Any]:
        settings = Settings(node_id="bench-scale", lock_url=server.url, lock_name=f"scale-{jobs}",
                            lease_ttl=TIMING.ttl, renew_deadline=TIMING.renew_deadline,
                            retry_period=TIMING.retry_period, demo_jobs=False, log_level="warning")
        node = Node(settings, registry)
        await node.start()
        try:
            await asyncio.wait_for(node.elector.leading.wait(), 60)
            await asyncio.sleep(2.0)  # past the first window and the catch-up
            return await asyncio.to_thread(row, "baton", server.kind, 1, "leading",
                                           f"{jobs:,} x 1/{SCALE_PERIOD:g}s", counter, seconds, tick)
        finally:
            await node.stop()

    return asyncio.run(measure_leader())


def _every(period: float, start: datetime, tz: Any) -> Any:
    from apscheduler.triggers.interval import IntervalTrigger

    return IntervalTrigger(seconds=period, start_date=start, timezone=tz)


def run_perrun(work: Path, server: Cluster, counter: OpsCounter, nodes: int, seconds: float,
               tick: Callable[[float], None]) -> dict[str, Any]:
    """The per-run lock baseline under the same load, with its duplicates and misses from the records."""
    with collecting(work, f"perrun-{nodes}") as collector:
        cluster = PerRunLockCluster(work / f"perrun-{nodes}", server.url, nodes, LOAD_JOBS, LOAD_INTERVAL,
                                    collector.url, skew_step=SKEW_STEP)
        try:
            cluster.start()
            time.sleep(1.5)
            since = datetime.now(UTC)
            result = row("per-run lock", "redis", nodes, "load", f"{LOAD_JOBS} x 1/s", counter, seconds, tick)
            until = datetime.now(UTC) - timedelta(seconds=1)
            time.sleep(0.5)  # let the last runs in the window reach the collector
        finally:
            cluster.stop()
    result.update(count_runs(collector.out, since, until, LOAD_JOBS, LOAD_INTERVAL))
    return result


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(rows: list[dict[str, Any]], backends: list[str], counts: list[int]) -> dict[str, Any]:
    """The ratios the section claims, per backend."""
    out: dict[str, Any] = {}
    first = counts[0]

    def ops(unit: str = "requests_s", **m: Any) -> float | None:
        r = find(rows, **m)
        return None if r is None else float(r[unit])

    for kind in backends:
        zero = ops(backend=kind, system="baton", nodes=first, state="idle", jobs="0")
        followers = {}
        for n in counts:
            idle, alone = ops(backend=kind, system="baton", nodes=n, state="idle", jobs=f"{LOAD_JOBS} paused"), \
                ops(backend=kind, system="baton", state="leader alone", of_nodes=n)
            if idle is not None and alone is not None and n > 1:
                each = (idle - alone) / (n - 1)
                followers[n] = {"leader_alone_ops_s": alone, "per_follower_ops_s": round(each, 2),
                                "follower_over_leader": ratio(each, alone)}
        leading = {j: ops(backend=kind, system="baton", state="leading", jobs=f"{j:,} x 1/{SCALE_PERIOD:g}s")
                   for j in SCALE_JOBS}
        few, some, many = (leading[j] for j in SCALE_JOBS)
        out[kind] = {
            "leading_ops_s": leading,
            "leading_many_jobs_over_few": ratio(many, few),
            "leading_many_jobs_over_some": ratio(many, some),
            "idle_100_jobs_over_0_jobs": ratio(ops(backend=kind, system="baton", nodes=first, state="idle",
                                                   jobs=f"{IDLE_JOBS} registered"), zero),
            "followers": followers,
            "baton_over_perrun_under_load": {
                n: ratio(ops(backend=kind, system="baton", nodes=n, state="load"),
                         ops(backend=kind, system="per-run lock", nodes=n))
                for n in counts} if kind == "redis" else None,
            "baton_over_perrun_commands_under_load": {
                n: ratio(ops("commands_s", backend=kind, system="baton", nodes=n, state="load"),
                         ops("commands_s", backend=kind, system="per-run lock", nodes=n))
                for n in counts} if kind == "redis" else None,
        }
    return out


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], units: dict[str, str], skipped: list[str]) -> str:
    md = ["Operations per second the whole cluster sends to its lock server, counted at the server "
          "(never by the nodes), in one run. Baton nodes use production lease timing (TTL 10 s, retry "
          "period 2 s); under load 10 probe jobs fire every second (10 runs/s), the same jobs the "
          "per-run lock baseline (ShedLock pattern: plain APScheduler 3 on every node, one redis-py "
          "`Lock` per run, non-blocking acquire, released when the run ends: ShedLock's default "
          f"`lockAtLeastFor` of 0) runs, with node clocks {SKEW_STEP * 1000:.0f} and "
          f"{2 * SKEW_STEP * 1000:.0f} ms behind the first (simulated: those nodes fire that much later), "
          "as clocks on different hosts are. Units: "
          + "; ".join(f"{k}: {v}" for k, v in units.items()) + ".", ""]
    if skipped:
        md += [f"Not measured on {', '.join(skipped)}: no server to count operations at.", ""]
    md += ["| system | backend | nodes | state | jobs | ops/s | commands/s | runs | duplicates | missed |",
           "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        md.append(f"| {r['system']} | {r['backend']} | {r['nodes']} | {r['state']} | {r['jobs']} | "
                  f"{r['requests_s']:.1f} | {r['commands_s']:.1f} | {r.get('runs', '')} | "
                  f"{r.get('duplicates', '')} | {r.get('missed', '')} |")
    few, some, many = (f"{j:,}" for j in SCALE_JOBS)
    md += ["", f"Cost against the job count: a leader alone runs {few}, {some} or {many} jobs, each every "
           f"{SCALE_PERIOD:g} s (the `leading` rows). Claims are per window of time and, on the server backends, "
           f"run records go in at most {1 / RECORD_SPACING:g} writes a second, so once fire times are dense enough "
           f"that the claim window never lapses (a few jobs every {SCALE_PERIOD:g} s let it lapse between fire "
           f"times), what a leader sends stops growing with the number of jobs: about two claims per lead (at most "
           f"{2 / MIN_LEAD:g} a second), the record writes and the renewals. The {many} / {some} column shows it. "
           "On etcd a transaction holds at most 128 operations (the server's `--max-txn-ops`), so a batch's "
           "finished runs go into segments of hundreds of records, a value each (`lock_backends.etcd_segments`; "
           "`lock_backends.registry`, `batched_records`).", "",
           f"| backend | leading ops/s, {few} jobs | {some} jobs | {many} jobs | {many} / {some} | {many} / {few} |",
           "| --- | ---: | ---: | ---: | ---: | ---: |",
           *[f"| {kind} | {' | '.join(str(s['leading_ops_s'][j]) for j in SCALE_JOBS)} | "
             f"{s['leading_many_jobs_over_some']} | {s['leading_many_jobs_over_few']} |"
             for kind, s in summary.items()]]
    md += ["", "| backend | nodes | idle ops/s, 100 jobs / 0 jobs | leader alone ops/s | per follower ops/s | "
           "follower / leader | Baton / per-run lock under load: ops/s (commands/s) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, s in summary.items():
        versus = s["baton_over_perrun_under_load"] or {}
        commands = s["baton_over_perrun_commands_under_load"] or {}
        for n, f in s["followers"].items():
            vs = f"{versus[n]} ({commands.get(n)})" if n in versus else "n/a"
            md.append(f"| {kind} | {n} | {s['idle_100_jobs_over_0_jobs']} | {f['leader_alone_ops_s']} | "
                      f"{f['per_follower_ops_s']} | {f['follower_over_leader']} | {vs} |")
    md += ["", "A per-run lock sends nothing while no job is due; Baton's election traffic flows all the time, "
           "so the idle rows are Baton's floor. "
           "Redis counts requests as `INFO commandstats` calls minus the commands Lua scripts run inside "
           "the server (counted with `MONITOR`); commands/s keeps them. Runs, duplicates and misses come from "
           "the probe collector's records over the load window."]
    return "\n".join(md)


def plot(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    """ops/s against node count: Baton idle and loaded per backend, the per-run lock loaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r["state"] == "load" or (r["state"] == "idle" and r["jobs"].endswith("paused")):
            series.setdefault((f"{r['system']} {r['backend']}", r["state"]), []).append((r["nodes"], r["requests_s"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {name: f"C{i}" for i, name in enumerate(sorted({name for name, _ in series}))}
    for (name, state), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[name],
                linestyle="--" if state == "idle" else "-", label=f"{name} ({state})")
    ax.set_xticks(sorted({r["nodes"] for r in rows if r["state"] != "leader alone"}))
    ax.set_xlabel("nodes")
    ax.set_ylabel("backend ops/s (server-side count)")
    ax.set_title("Backend load: Baton vs a per-run lock, 10 runs/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(ctx: BenchContext) -> SectionResult:
    """Section 3 for the runner: every server backend in ``ctx.backends`` (quick: Redis, 3 nodes)."""
    backends, counts, idle_s, load_s = plan(ctx)
    skipped = [b for b in ctx.backends if b not in SERVERS]
    rows: list[dict[str, Any]] = []
    units: dict[str, str] = {}
    for kind in backends:
        rows += run_backend(ctx, kind, counts, idle_s, load_s)
        units[kind] = counter_units(kind)
    summary = summarize(rows, backends, counts)
    verdict = []
    for kind in backends:
        load = find(rows, system="baton", backend=kind, nodes=counts[0], state="load")
        verdict.append(VerdictRow("baton", kind, backend_ops_s=load["requests_s"] if load else None))
        perrun = find(rows, system="per-run lock", nodes=counts[0])
        if kind == "redis" and perrun is not None:
            verdict.append(VerdictRow("per-run lock", "redis", duplicates=perrun.get("duplicates"),
                                      misses=perrun.get("missed"), backend_ops_s=perrun["requests_s"]))
    plots = [p for p in [plot(ctx.out / "load.png", rows)] if p is not None]
    data = {"timing": vars(TIMING), "nodes": counts, "windows_s": {"idle": idle_s, "load": load_s},
            "perrun_clock_behind_s": [0.0, SKEW_STEP, 2 * SKEW_STEP],
            "units": units, "rows": rows, "summary": summary, "skipped": skipped}
    return SectionResult("load", "3. Backend load", data, markdown(rows, summary, units, skipped), plots, verdict)


def counter_units(kind: str) -> str:
    from loadtest.bench.server_stats import COUNTERS

    return str(COUNTERS[kind].unit)  # type: ignore[attr-defined]
