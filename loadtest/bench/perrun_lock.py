"""The per-run lock baseline: the ShedLock pattern on plain APScheduler 3 and one redis-py ``Lock``.

    python -m loadtest.bench.perrun_lock --redis-url redis://127.0.0.1:6379/0 --node-id n1 \\
        --jobs 10 --interval 1 [--probe-url http://127.0.0.1:8765/probe] [--lock-at-most-for 30]

Every node runs every job in its own ``AsyncIOScheduler``; each run first
takes a lock named after the job (ShedLock's lock name) with a non-blocking
acquire, runs only if it got it, and releases right after (ShedLock's default
``lockAtLeastFor`` of 0). ``lock_at_most_for`` is the lock's expiry, so a
crashed holder frees it. No election, no fencing: the cost users compare
Baton with. A short run releases before a slower node's scheduler tries, and
that node then runs the same fire time again. On one host the clocks agree;
``--clock-skew`` makes a node fire as if its clock ran behind, as another
host's would. The benchmark counts the duplicates from the collector's
records, never from what the nodes claim.

This module imports no Baton code: it is what a user would write instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

#: Same anchor as the Baton probes, so fire times (and the checker's grid) agree across nodes.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def fire_time(now: datetime, interval: float) -> datetime:
    """The grid instant a run started at ``now`` belongs to (APScheduler 3 does not hand it to the job)."""
    step = round(interval * 1_000_000)
    k = (now - EPOCH) // timedelta(microseconds=1) // step
    return EPOCH + timedelta(microseconds=k * step)


async def serve(args: argparse.Namespace) -> None:
    import httpx
    import redis.asyncio as aioredis
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger
    from redis.exceptions import LockError

    client = aioredis.Redis.from_url(args.redis_url)
    http = httpx.AsyncClient(timeout=5.0)

    async def run(job_id: str) -> None:
        started = datetime.now(UTC)
        lock = client.lock(f"shedlock:{job_id}", timeout=args.lock_at_most_for)
        if not await lock.acquire(blocking=False):
            return  # another node holds it: skip, as ShedLock does
        try:
            if args.probe_url:
                local = started - timedelta(seconds=args.clock_skew)  # what this node's clock reads
                record = {"job": job_id, "scheduled_at": fire_time(local, args.interval).isoformat(),
                          "node": args.node_id, "token": 0, "started_at": started.isoformat()}
                with contextlib.suppress(httpx.HTTPError):
                    await http.post(args.probe_url, json=record)
        finally:
            with contextlib.suppress(LockError):
                await lock.release()

    scheduler = AsyncIOScheduler(timezone=UTC, job_defaults={"max_instances": 1, "coalesce": True,
                                                             "misfire_grace_time": 30})
    for i in range(args.jobs):
        job_id = f"probe-{i:03d}"
        # a clock running `skew` behind fires each grid instant `skew` late in real time
        start = EPOCH + timedelta(seconds=args.clock_skew)
        scheduler.add_job(run, IntervalTrigger(seconds=args.interval, start_date=start, timezone=UTC),
                          args=(job_id,), id=job_id)
    await client.ping()
    scheduler.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    scheduler.shutdown(wait=False)
    await http.aclose()
    await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.perrun_lock", description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--probe-url", default="")
    parser.add_argument("--lock-at-most-for", type=float, default=30.0)
    parser.add_argument("--clock-skew", type=float, default=0.0,
                        help="seconds this node's clock runs behind (simulated: it fires that much later)")
    args = parser.parse_args(argv)
    if (args.jobs < 0 or not math.isfinite(args.interval) or args.interval <= 0 or args.lock_at_most_for <= 0
            or not 0 <= args.clock_skew < args.interval):
        print("perrun_lock: --jobs must be >= 0, --interval and --lock-at-most-for positive, "
              "--clock-skew in [0, interval)", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"perrun_lock: {exc}", file=sys.stderr)
        return 1
    return 0


@dataclass
class PerRunLockCluster:
    """N baseline processes against one Redis, started and stopped like a LocalCluster."""

    workdir: Path
    redis_url: str
    nodes: int
    jobs: int
    interval: float
    probe_url: str = ""
    #: Node i's clock runs (i % 3) * skew_step behind: hosts' clocks are never quite equal.
    skew_step: float = 0.0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        logs = [self.workdir / f"perrun-{i + 1}.log" for i in range(self.nodes)]
        try:
            for i, log_path in enumerate(logs):
                with open(log_path, "wb") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "loadtest.bench.perrun_lock", "--redis-url", self.redis_url,
                         "--node-id", f"perrun-{i + 1}", "--jobs", str(self.jobs), "--interval", str(self.interval),
                         "--probe-url", self.probe_url, "--clock-skew", str((i % 3) * self.skew_step)],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                        start_new_session=True))
            deadline = time.monotonic() + timeout
            for proc, log_path in zip(self.procs, logs, strict=True):
                while b"ready" not in log_path.read_bytes():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"per-run lock node did not start (exit {proc.poll()}):\n{tail}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


if __name__ == "__main__":
    sys.exit(main())
