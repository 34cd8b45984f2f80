"""Section 5: the peers under Baton's faults, judged by Baton's checker.

Two tools users would pick instead of Baton run the same probe workload
(``probe-000``.. every ``INTERVAL`` s on the epoch grid, one record per run to a
collector) as three worker processes each, in ``.venv-peers``:

* **tooz** leader election on its Redis driver (``loadtest/peers/tooz_worker.py``):
  the elected worker fires the probes itself;
* **APScheduler 4** (latest pre-release), three schedulers sharing one
  PostgreSQL data store and event broker (``loadtest/peers/aps4_worker.py``).

Faults, as ``python -m loadtest chaos`` applies them to Baton: ``kill``
(SIGKILL the worker that ran the latest probe, by the collector's last record,
then start it again) and ``pause`` (SIGSTOP it for ``HOLD`` > TTL, then
SIGCONT), logged in the chaos log format. Timing matches Baton's bench: TTL
2 s (tooz's leader-lock timeout; APScheduler 4's ``lease_duration`` and
``cleanup_interval``), retry period 0.2 TTL.

The checker (``loadtest.checker.check``) reads only the records and the chaos
log. Its failover time needs fencing tokens, which the peers do not have (see
the workers' docstrings for the stand-ins), so the headline failover here is
peer-neutral: from the fault until every probe job has started a run on a
worker other than the one hit (for a leader system, the new leader's first
instant; for APScheduler 4, the slowest job's recovery). A fault after which
some job never ran elsewhere before the next fault counts as not recovered.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.bench.base import BenchContext, SectionResult, VerdictRow
from loadtest.bench.peers_venv import ROOT, PeersError, ensure
from loadtest.chaos import ChaosLog
from loadtest.checker import check
from loadtest.peers.probe import READY
from loadtest.percentile import percentile
from loadtest.probe_log import InputError, load_chaos, load_records, parse_time
from loadtest.servers import Cluster, ServerError, start_backend
from loadtest.up import Collector, UpError

TTL = 2.0  # Baton's in the failover section (a test keeps them equal); tooz's lock timeout takes whole seconds
INTERVAL = 0.5
JOBS = 3
GRACE = 10.0  # misfire grace, as the failover section's: APScheduler 4's misfire_grace_time and the checker's
HOLD = TTL * 1.5 + 0.5  # how long a paused or killed worker stays out, as loadtest.chaos holds a pause
SETTLE = 2 * TTL  # between faults: the restarted or resumed worker rejoins
TAIL = GRACE + 4 * INTERVAL  # after the last fault, so the checker's window-end excuse cannot cover it
WORKERS = 3


@dataclass(frozen=True)
class Peer:
    system: str  # the verdict's system name
    backend: str
    module: str
    prefix: str  # worker names: prefix-0..


PEERS = (Peer("tooz", "redis", "loadtest.peers.tooz_worker", "tooz"),
         Peer("apscheduler4", "postgres", "loadtest.peers.aps4_worker", "aps4"))


@dataclass
class Worker:
    """One peer worker process; its log is appended across restarts."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while READY.encode() not in self.log.read_bytes()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[offset:].strip().splitlines()
                raise PeersError(f"peer worker {self.name} did not start: {tail[-1] if tail else 'no output'} "
                                 f"(log {self.log})")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.proc = None


def last_node(records: Path) -> str | None:
    """The node of the collector's latest record: the worker that ran the latest probe."""
    with contextlib.suppress(OSError), open(records, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
        for line in reversed(f.read().splitlines()):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return str(json.loads(line)["node"])
    return None


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def recovery(chaos: list[dict[str, Any]], records: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Per fault: seconds until every job started a run on another worker than the one hit (None: not seen)."""
    starts = sorted(((parse_time(e["ts"]), e) for e in chaos if e.get("phase") == "start"), key=lambda s: s[0])
    runs = sorted((parse_time(r["started_at"]), r["node"], r["job"]) for r in records)
    out = []
    for n, (ts, entry) in enumerate(starts):
        horizon = starts[n + 1][0] if n + 1 < len(starts) else None
        first: dict[str, float] = {}
        for at, node, job in runs:
            if at <= ts or node == entry["target"] or job in first:
                continue
            if horizon is not None and at >= horizon:
                break
            first[job] = (at - ts).total_seconds()
        done = len(first) == jobs
        out.append({"fault": entry["fault"], "target": entry["target"], "ts": entry["ts"],
                    "first_run_s": round(min(first.values()), 3) if first else None,
                    "failover_s": round(max(first.values()), 3) if done else None})
    return out


@dataclass
class Run:
    """What one peer's run produced: the checker's result and the per-fault recovery."""

    peer: Peer
    check: dict[str, Any]
    faults: list[dict[str, Any]]
    records: list[dict[str, Any]] = field(default_factory=list)


def run_peer(ctx: BenchContext, peer: Peer, python: Path, url: str, rounds: int) -> Run:
    """Start three workers and a collector, apply ``rounds`` kills and pauses, check the records."""
    work = ctx.work / "peers" / peer.prefix
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    records, chaos_path = work / "probes.jsonl", work / "chaos.jsonl"
    advance = ctx.step(f"peers: {peer.system} on {peer.backend}, {rounds} kill + {rounds} pause",
                       WORKERS + 2 * rounds + 2)
    try:
        collector = Collector(records, work / "collector.log")
    except UpError as exc:
        raise PeersError(str(exc)) from None
    workers: list[Worker] = []
    try:
        for i in range(WORKERS):
            name = f"{peer.prefix}-{i}"
            argv = [str(python), "-m", peer.module, "--node", name, "--url", url, "--collector", collector.url,
                    "--jobs", str(JOBS), "--interval", str(INTERVAL), "--ttl", str(TTL),
                    "--misfire-grace", str(GRACE)]
            workers.append(Worker(name, argv, work / f"{name}.log"))
            workers[-1].start()  # one at a time: concurrent schema creation races in APScheduler 4
            advance(1)
        deadline = time.monotonic() + 60
        while count_lines(records) < JOBS * 4:  # a few instants before the first fault
            if time.monotonic() > deadline:
                raise PeersError(f"no probe records from {peer.system} within 60 s; see {work}")
            time.sleep(0.1)
        log = ChaosLog(chaos_path)
        by_name = {w.name: w for w in workers}
        for _ in range(rounds):
            for fault in ("kill", "pause"):
                target = by_name.get(last_node(records) or "", workers[0])
                log.write(fault=fault, target=target.name, phase="start")
                t0 = time.monotonic()
                if fault == "kill":
                    target.kill()
                    time.sleep(HOLD)
                    target.start()
                else:
                    target.signal(signal.SIGSTOP)
                    time.sleep(HOLD)
                    target.signal(signal.SIGCONT)
                log.write(fault=fault, target=target.name, phase="end", held_s=HOLD,
                          took_s=round(time.monotonic() - t0, 3))
                advance(1)
                time.sleep(SETTLE)
        time.sleep(TAIL)
        advance(1)
    finally:
        for worker in workers:
            worker.kill()
        collector.stop()
    try:
        probes, _ = load_records(records)
        chaos, _ = load_chaos(chaos_path)
        result = check(probes, jobs=JOBS, interval=INTERVAL, start=None, end=None, misfire_grace=GRACE, chaos=chaos)
    except InputError as exc:
        raise PeersError(f"checker refused the {peer.system} records: {exc}") from None
    advance(1)
    return Run(peer, result, recovery(chaos, probes, JOBS), probes)


def ttl_x(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / TTL, 2)


def summary(run: Run) -> dict[str, Any]:
    """The numbers of one peer for report.json: absolute seconds and TTL multiples side by side."""
    c = run.check
    per_kind: dict[str, Any] = {}
    for kind in ("kill", "pause"):
        seen = [f["failover_s"] for f in run.faults if f["fault"] == kind]
        ok = [s for s in seen if s is not None]
        per_kind[kind] = {"faults": len(seen), "recovered": len(ok), "p50_s": percentile(ok, 50),
                          "p99_s": percentile(ok, 99), "max_s": max(ok, default=None),
                          "p50_ttl": ttl_x(percentile(ok, 50)), "p99_ttl": ttl_x(percentile(ok, 99))}
    every = [f["failover_s"] for f in run.faults if f["failover_s"] is not None]
    return {"system": run.peer.system, "backend": run.peer.backend, "records": c["records"],
            "expected": c["expected"], "duplicates": c["duplicates"],
            "fenced_sink_duplicates": c["fenced_sink_duplicates"], "missed": c["missed"],
            "excused": c["excused"], "gaps": {k: v for k, v in c["gaps"].items() if k != "list"},
            "open_gap": c["open_gap"], "handoffs": c["handoffs"], "stale_records": c["stale_records"],
            "failover": per_kind, "failover_p50_ttl": ttl_x(percentile(every, 50)),
            "failover_p99_ttl": ttl_x(percentile(every, 99)),
            "checker_token_failover": c.get("faults", {}).get("by_kind"), "faults": run.faults,
            "duplicate_examples": c["duplicate_starts"][:3], "missed_examples": c["missed_fire_times"][:3]}


def fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], rounds: int) -> str:
    head = ("| system | backend | records | duplicates | fenced-sink dup. | misses | gaps | gap p50 / p99 / max (s) "
            "| failover p50 / p99 (x TTL) | kill p99 (x TTL) | pause p99 (x TTL) | not recovered "
            "| skips excused across a handoff |\n" + "| --- " * 13 + "|\n")
    lines = []
    for r in rows:
        g, f = r["gaps"], r["failover"]
        lost = sum(k["faults"] - k["recovered"] for k in f.values())
        lines.append(f"| {r['system']} | {r['backend']} | {r['records']} | {r['duplicates']} | "
                     f"{r['fenced_sink_duplicates']} | {r['missed']} | {g['count']} | "
                     f"{fmt(g['p50_s'])} / {fmt(g['p99_s'])} / {fmt(g['max_s'])} | "
                     f"{fmt(r['failover_p50_ttl'])} / {fmt(r['failover_p99_ttl'])} | {fmt(f['kill']['p99_ttl'])} | "
                     f"{fmt(f['pause']['p99_ttl'])} | {lost} | "
                     f"{r['excused']['coalesced'] + r['excused']['leaderless']} |")
    return (f"Three workers per system, {JOBS} probe jobs every {INTERVAL:g} s on Baton's epoch grid, "
            f"{rounds} round(s) of a kill and a pause each (the worker that ran the latest probe; out for "
            f"{HOLD:g} s), TTL {TTL:g} s, misfire grace {GRACE:g} s, judged by Baton's checker from the "
            "collector's records alone.\n\n" + head + "\n".join(lines) + "\n\n"
            "Failover: from the fault until every probe job started a run on another worker (neither peer has "
            "a fencing token, so the checker's token-based failover does not apply). Fenced-sink duplicates: "
            "tooz records carry the worker's election time (monotonic ms) as a stand-in term, a number tooz "
            "itself never hands out; APScheduler 4 records carry 0 (it has no token), so every duplicate "
            "reaches a sink. tooz's Redis driver cannot tell a leader it lost the lock, so a paused leader "
            "keeps firing after it wakes; APScheduler 4 has no leader, every scheduler may run any job. The "
            "checker excuses a fire time skipped across a handoff (a higher token next) when a later run follows "
            "within the grace or the skip lies in a leaderless gap, as Baton's coalescing catch-up would stand "
            "for it; tooz runs no catch-up, so its excused skips are fire times nobody ran.\n")


def plot(path: Path, runs: list[Run]) -> Path | None:
    """Starts per fire time, stacked by worker, with the faults: duplicates rise above the line, gaps drop to 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.records]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs) + 0.6), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t0 = min(parse_time(r["scheduled_at"]) for r in run.records)
        nodes = sorted({r["node"] for r in run.records})
        last = max(round((parse_time(r["scheduled_at"]) - t0).total_seconds() / INTERVAL) for r in run.records)
        counts = {n: [0] * (last + 1) for n in nodes}
        for r in run.records:
            counts[r["node"]][round((parse_time(r["scheduled_at"]) - t0).total_seconds() / INTERVAL)] += 1
        xs = [k * INTERVAL for k in range(last + 1)]
        ax.stackplot(xs, *(counts[n] for n in nodes), labels=nodes, step="mid", alpha=0.8)
        ax.axhline(JOBS, color="black", linewidth=0.8, linestyle=":")
        for f in run.faults:
            at = (parse_time(f["ts"]) - t0).total_seconds()
            ax.axvline(at, color="red" if f["fault"] == "kill" else "orange", linestyle="--", linewidth=1)
            ax.text(at, JOBS * 2.05, f["fault"], fontsize=7, rotation=90, va="top")
        ax.set_ylim(0, JOBS * 2.2)
        ax.set_title(f"{run.peer.system} ({run.peer.backend}): starts per fire time, by worker", fontsize=9)
        ax.set_ylabel("starts")
        ax.legend(loc="lower right", fontsize=7, ncol=len(nodes), framealpha=0.9)
    axes[-1][0].set_xlabel(f"seconds since the first fire time (dotted: {JOBS} jobs, one start each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(ctx: BenchContext) -> SectionResult:
    """Build or reuse ``.venv-peers``, then run each peer through the faults and the checker."""
    rounds = ctx.rounds or (1 if ctx.quick else 5)
    python = ensure(ctx.work / "peers" / "pip.log", ctx.step)
    runs = []
    for peer in PEERS:
        try:
            server: Cluster = start_backend(peer.backend, ctx.work / "peers" / f"{peer.backend}-server")
        except ServerError as exc:
            raise PeersError(f"cannot start {peer.backend} for {peer.system}: {exc}") from None
        try:
            runs.append(run_peer(ctx, peer, python, server.url, rounds))
        finally:
            server.close()
    rows = [summary(r) for r in runs]
    # the verdict's failover column is the kill fault's p99, as the failover section fills it for Baton
    verdict = [VerdictRow(r["system"], r["backend"], duplicates=r["duplicates"], misses=r["missed"],
                          failover_p99_ttl=r["failover"]["kill"]["p99_ttl"]) for r in rows]
    data = {"ttl_s": TTL, "interval_s": INTERVAL, "jobs": JOBS, "misfire_grace_s": GRACE, "hold_s": HOLD,
            "rounds": rounds, "workers": WORKERS, "measured_at": datetime.now(UTC).isoformat(), "systems": rows}
    try:
        plots = [p for p in [plot(ctx.out / "peers_timeline.png", runs)] if p is not None]
    except ImportError:  # matplotlib is the bench extra; the numbers stand without the picture
        plots = []
    return SectionResult("peers", "5. Peers under the same faults: tooz and APScheduler 4", data,
                         markdown(rows, rounds), plots, verdict)
