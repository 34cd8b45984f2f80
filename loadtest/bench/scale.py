"""Section 4, scale and memory: one node's footprint and start-up, and one leader among many nodes.

One node (demo jobs off) is started idle and with 10,000 registered jobs
(probe jobs with an interval of months, so none is due), and measured:
resident memory (``VmRSS`` from ``/proc/PID/status``, once ready) and the time
from process start to ``/healthz`` 200 and to ``/readyz`` 200 (a leader is
known). Baselines in the same run: a bare ``python -c "import node.app"``
(the interpreter and Baton's imports, nothing running) and plain APScheduler 3
holding the same jobs (``loadtest.bench.plain_jobs``).

Then N nodes share one backend; every node's ``/status`` is polled, all nodes
at once, for a while: each poll must count exactly one leader once one is
elected. Polls are not atomic snapshots, so a handoff between two reads could
show two; with production lease timing none is expected.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench.base import BenchContext, SectionResult
from loadtest.bench.load import DUMMY_PROBE, NEVER, TIMING
from loadtest.cluster import LocalCluster, NodeProc
from loadtest.servers import Cluster, free_port, start_backend
from lock_backends.registry import SERVERS

JOBS = 10_000
ROOT = str(Path(__file__).resolve().parents[2])


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def measure_ready_line(argv: list[str], log: Path, settle: float) -> dict[str, float]:
    """Start ``argv``, time it to its ``ready`` line, read its memory once settled."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "ab"),  # noqa: SIM115
                            env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ready = time.perf_counter() - t0
        if b"ready" not in line:
            raise RuntimeError(f"{argv[2:]} exited without 'ready' (exit {proc.wait(5)}); see {log}")
        time.sleep(settle)
        rss, hwm = rss_kib(proc.pid)
        return {"ready_s": ready, "rss_kib": rss, "hwm_kib": hwm}
    finally:
        _stop(proc)


def measure_node(lock_url: str, name: str, jobs: int, log: Path, settle: float) -> dict[str, float]:
    """Start one node, time it to /healthz and /readyz 200, read its memory once settled."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env.update({"BATON_NODE_ID": name, "BATON_PORT": str(port), "BATON_LOCK_URL": lock_url,
                "BATON_LOCK_NAME": name, "BATON_DEMO_JOBS": "false", "BATON_PROBE_JOBS": str(jobs),
                "BATON_PROBE_INTERVAL": str(NEVER), "BATON_PROBE_URL": DUMMY_PROBE if jobs else "",
                "BATON_LOG_LEVEL": "warning", "PYTHONPATH": ROOT})
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        times: dict[str, float] = {}
        with httpx.Client(timeout=1.0) as http:
            for route in ("healthz", "readyz"):
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"node exited with {proc.returncode} while starting; see {log}")
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError(f"node not at /{route} 200 within 120 s; see {log}")
                    with contextlib.suppress(httpx.HTTPError):
                        if http.get(f"{url}/{route}").status_code == 200:
                            times[f"{route}_s"] = time.perf_counter() - t0
                            break
                    time.sleep(0.01)
        time.sleep(settle)
        rss, hwm = rss_kib(proc.pid)
        return {**times, "rss_kib": rss, "hwm_kib": hwm}
    finally:
        _stop(proc)


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per field: one slow start on a shared machine must not become the figure."""
    return {k: round(statistics.median(s[k] for s in samples), 3) for k in samples[0]}


def footprint(ctx: BenchContext, lock_url: str, reps: int, tick: Callable[[float], None]) -> dict[str, Any]:
    """Memory and start-up of a node and of its two baselines, one process at a time."""
    work = ctx.work / "scale"
    settle = 1.0
    py = sys.executable
    subjects: dict[str, Callable[[int], dict[str, float]]] = {
        "bare import": lambda _: measure_ready_line(
            [py, "-c", "import node.app; print('ready', flush=True); import sys; sys.stdin.read()"],
            work / "bare.log", settle),
        "apscheduler 0 jobs": lambda _: measure_ready_line(
            [py, "-m", "loadtest.bench.plain_jobs", "--jobs", "0"], work / "plain.log", settle),
        f"apscheduler {JOBS} jobs": lambda _: measure_ready_line(
            [py, "-m", "loadtest.bench.plain_jobs", "--jobs", str(JOBS)], work / "plain.log", settle),
        "baton 0 jobs": lambda i: measure_node(lock_url, f"scale-0-{i}", 0, work / "node.log", settle),
        f"baton {JOBS} jobs": lambda i: measure_node(lock_url, f"scale-{JOBS}-{i}", JOBS, work / "node.log", settle),
    }
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in subjects}
    for i in range(reps):  # interleaved, so drift on a shared machine hits every subject alike
        for name, measure in subjects.items():
            samples[name].append(measure(i))
            tick(1)
    return {name: median_of(s) for name, s in samples.items()}


def poll_leaders(ctx: BenchContext, kind: str, server: Cluster | None, nodes: int, seconds: float,
                 tick: Callable[[float], None]) -> dict[str, Any]:
    """Start ``nodes`` nodes, then poll every node's /status at once, counting leaders per poll."""
    cluster = LocalCluster(ctx.work / f"scale-{kind}-{nodes}", backend=kind, nodes=nodes, timing=TIMING,
                           lock_url=server.url if server else None, proxies=False,
                           extra_env={"BATON_LOCK_NAME": f"scale-{nodes}", "BATON_LOG_LEVEL": "warning"})
    t0 = time.monotonic()
    first_leader: float | None = None
    failed: list[BaseException] = []
    starter = threading.Thread(target=_start, args=(cluster, failed), daemon=True)
    counts: list[int] = []
    agree = 0
    leaders_seen: set[str] = set()
    limits = httpx.Limits(max_connections=nodes + 4, max_keepalive_connections=nodes + 4)
    try:
        with ThreadPoolExecutor(max_workers=min(32, nodes)) as pool, \
                httpx.Client(timeout=2.0, limits=limits) as http:
            def status(node: NodeProc) -> dict[str, Any] | None:
                if not node.alive or node.paused:
                    return None
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = http.get(f"{node.url}/status")
                    return dict(response.json()) if response.status_code == 200 else None
                return None

            starter.start()
            while starter.is_alive() or first_leader is None:  # time to the first leader, while nodes start
                if failed:
                    raise RuntimeError(f"{nodes} {kind} nodes did not start: {failed[0]}")
                if time.monotonic() - t0 > 180:
                    raise RuntimeError(f"no leader among {nodes} {kind} nodes within 180 s; logs in {cluster.workdir}")
                if first_leader is None and any(
                        s and s.get("role") == "leader" for s in pool.map(status, list(cluster.members))):
                    first_leader = time.monotonic() - t0
                time.sleep(0.1)
            healthy = time.monotonic() - t0
            end = last = time.monotonic()
            end += seconds
            while (left := end - time.monotonic()) > 0:
                statuses = list(pool.map(status, cluster.members))
                roles = [s for s in statuses if s]
                leaders = [s["node_id"] for s in roles if s.get("role") == "leader"]
                counts.append(len(leaders))
                leaders_seen.update(leaders)
                named = {(s.get("leader") or {}).get("node_id") for s in roles}
                agree += len(roles) == nodes and len(named) == 1 and None not in named
                time.sleep(min(0.25, left))
                now = min(time.monotonic(), end)
                tick(now - last)
                last = now
    finally:
        starter.join(timeout=120)
        rss = [rss_kib(n.pid)[0] for n in cluster.members if n.alive and n.pid]
        cluster.stop()
    return {"backend": kind, "nodes": nodes, "polls": len(counts), "min_leaders": min(counts, default=0),
            "max_leaders": max(counts, default=0), "polls_exactly_one": sum(c == 1 for c in counts),
            "polls_all_agree": agree, "distinct_leaders": len(leaders_seen),
            "first_leader_s": round(first_leader or 0.0, 2), "all_healthy_s": round(healthy, 2),
            "median_node_rss_kib": int(statistics.median(rss)) if rss else None, "leader_counts": counts}


def _start(cluster: LocalCluster, failed: list[BaseException]) -> None:
    """Start the cluster in a thread while the caller watches for the first leader; keep the error."""
    try:
        cluster.start()
    except Exception as exc:
        failed.append(exc)


def run(ctx: BenchContext, *, leader_nodes: int | None = None, reps: int | None = None,
        poll_s: float | None = None) -> SectionResult:
    """Footprint of one node, then one leader among ``leader_nodes`` (30; quick 10) nodes."""
    servers = [b for b in SERVERS if b in ctx.backends]
    one_kind = "redis" if "redis" in servers else (servers[0] if servers else "file")
    many_kind = one_kind if ctx.quick else ("etcd" if "etcd" in servers else one_kind)
    leader_nodes = leader_nodes or (10 if ctx.quick else 30)
    reps = reps or (1 if ctx.quick else 3)
    poll_s = poll_s or (5.0 if ctx.quick else 30.0)
    (ctx.work / "scale").mkdir(parents=True, exist_ok=True)
    started: dict[str, Cluster] = {}
    try:
        for kind in {one_kind, many_kind} - {"file"}:
            started[kind] = start_backend(kind, ctx.work / f"scale-{kind}-server")
        lock_url = started[one_kind].url if one_kind in started else f"file://{ctx.work / 'scale' / 'locks'}"
        tick = ctx.step("scale: one node's memory and start-up", total=5 * reps)
        one = footprint(ctx, lock_url, reps, tick)
        tick = ctx.step(f"scale: leaders among {leader_nodes} {many_kind} nodes", total=poll_s)
        many = poll_leaders(ctx, many_kind, started.get(many_kind), leader_nodes, poll_s, tick)
    finally:
        for server in started.values():
            server.close()
    ratios = compare(one)
    data = {"backend_one_node": one_kind, "jobs": JOBS, "reps": reps, "footprint": one, "ratios": ratios,
            "leaders": many}
    return SectionResult("scale", "4. Scale and memory", data, markdown(one, ratios, many, one_kind, reps))


def compare(one: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """The headline ratios: Baton over what the same Python, or APScheduler alone, costs."""
    def r(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    node0, node_n = one["baton 0 jobs"], one[f"baton {JOBS} jobs"]
    plain0, plain_n, bare = one["apscheduler 0 jobs"], one[f"apscheduler {JOBS} jobs"], one["bare import"]
    per_job_baton = (node_n["rss_kib"] - node0["rss_kib"]) * 1024 / JOBS
    per_job_plain = (plain_n["rss_kib"] - plain0["rss_kib"]) * 1024 / JOBS
    return {
        "idle_rss_over_bare_import": r(node0["rss_kib"], bare["rss_kib"]),
        "rss_10k_over_apscheduler_10k": r(node_n["rss_kib"], plain_n["rss_kib"]),
        "bytes_per_job_baton": round(per_job_baton), "bytes_per_job_apscheduler": round(per_job_plain),
        "per_job_bytes_ratio": r(per_job_baton, per_job_plain),
        "idle_healthz_over_bare_import_start": r(node0["healthz_s"], bare["ready_s"]),
        "ready_10k_over_apscheduler_10k_start": r(node_n["readyz_s"], plain_n["ready_s"]),
    }


def markdown(one: dict[str, dict[str, float]], ratios: dict[str, float | None], many: dict[str, Any],
             kind: str, reps: int) -> str:
    md = [f"One process at a time, median of {reps}, node on the {kind} backend, demo jobs off; "
          f"{JOBS:,} jobs are interval jobs none of which is due. Memory is `VmRSS` once ready.", "",
          "| process | RSS MiB | peak RSS MiB | start to ready s | to /healthz s | to /readyz s |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in one.items():
        ready = m.get("ready_s")
        md.append(f"| {name} | {m['rss_kib'] / 1024:.1f} | {m['hwm_kib'] / 1024:.1f} | "
                  f"{'' if ready is None else f'{ready:.2f}'} | {m.get('healthz_s', '')} | {m.get('readyz_s', '')} |")
    md += ["", "| ratio | value |", "| --- | ---: |"]
    md += [f"| {k.replace('_', ' ')} | {v} |" for k, v in ratios.items()]
    counts = many["leader_counts"]
    verdict = "exactly one leader at every poll" if counts and all(c == 1 for c in counts) else \
        f"leader count per poll ranged {many['min_leaders']}..{many['max_leaders']}"
    md += ["", f"**{many['nodes']} nodes on {many['backend']}** (production lease timing, TTL {TIMING.ttl:g} s): "
           f"{verdict} ({many['polls']} polls of every node's `/status`); first leader "
           f"{many['first_leader_s']} s after the processes were launched, all healthy after "
           f"{many['all_healthy_s']} s; {many['polls_all_agree']} of {many['polls']} polls had every node naming "
           f"the same leader; {many['distinct_leaders']} distinct leader(s); median node RSS "
           f"{(many['median_node_rss_kib'] or 0) / 1024:.1f} MiB."]
    return "\n".join(md)
