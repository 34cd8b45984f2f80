"""Lock operation latency per backend, as a ratio to the server's bare round trip.

    python -m loadtest.bench_locks [--backends file,redis,postgres,etcd] [--iterations 300]

Absolute times on a shared machine are noise; what carries over is how much
an acquire, renew or claim costs compared with the cheapest request the same
server answers (PING, SELECT 1, a plain etcd get; for the file backend, a
stat of the lock directory), measured in the same run, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loadtest.servers import ServerError, start_backend
from lock_backends import Holder, LockBackend, from_url
from lock_backends.registry import SHARED

Op = Callable[[], Awaitable[Any]]


async def baseline_op(kind: str, url: str, workdir: Path) -> tuple[Op, Callable[[], Awaitable[None]]]:
    """The bare round trip for a server, and how to close its client."""
    if kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        return client.ping, client.aclose
    if kind == "postgres":
        import psycopg

        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)

        async def select1() -> None:
            await (await conn.execute("SELECT 1")).fetchone()

        return select1, conn.close
    if kind == "etcd":
        import aetcd

        host, port = url.removeprefix("etcd://").split(",")[0].split(":")
        etcd = aetcd.Client(host=host, port=int(port))

        async def get() -> None:
            await etcd.get(b"/baton-bench/none")

        return get, etcd.close

    async def stat() -> None:
        await asyncio.to_thread(os.stat, workdir)

    async def nothing() -> None:
        return None

    return stat, nothing


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50": statistics.median(ordered), "p99": p99, "ops_s": len(ordered) / sum(ordered)}


async def timed(op: Op) -> float:
    t0 = time.perf_counter()
    await op()
    return time.perf_counter() - t0


async def bench_backend(kind: str, url: str, workdir: Path, iterations: int,
                        tick: Callable[[], None]) -> dict[str, dict[str, float]]:
    base, close_base = await baseline_op(kind, url, workdir)
    backend: LockBackend = from_url(url)
    name = f"bench-{os.getpid()}"
    samples: dict[str, list[float]] = {"baseline": [], "acquire": [], "renew": [], "claim": []}
    try:
        for _ in range(20):  # warm connections and caches
            await base()
            lease = await backend.acquire(name, Holder("bench"), 30)
            if lease is not None:
                await backend.release(lease)
        for i in range(iterations):
            samples["baseline"].append(await timed(base))
            t0 = time.perf_counter()
            lease = await backend.acquire(name, Holder("bench"), 30)
            samples["acquire"].append(time.perf_counter() - t0)
            assert lease is not None, "benchmark lock unexpectedly held"
            t0 = time.perf_counter()
            renewed = await backend.renew(lease)
            samples["renew"].append(time.perf_counter() - t0)
            lease = renewed or lease
            samples["claim"].append(await timed(functools.partial(backend.claim, lease, f"k{i}")))
            await backend.release(lease)
            tick()
    finally:
        await backend.close()
        await close_base()
    return {op: summarize(values) for op, values in samples.items()}


def render(results: dict[str, dict[str, dict[str, float]]], console: Console) -> None:
    table = Table(title="Lock operations: latency as a multiple of the server's bare round trip")
    for col in ("backend", "op", "p50 x base", "p99 x base", "p50 ms", "p99 ms", "ops/s"):
        table.add_column(col, justify="right" if col not in ("backend", "op") else "left")
    for kind, ops in results.items():
        base = ops["baseline"]
        for op, s in ops.items():
            ratio50 = "1.00" if op == "baseline" else f"{s['p50'] / base['p50']:.2f}"
            ratio99 = "1.00" if op == "baseline" else f"{s['p99'] / base['p99']:.2f}"
            table.add_row(kind, op, ratio50, ratio99, f"{s['p50'] * 1e3:.3f}", f"{s['p99'] * 1e3:.3f}",
                          f"{s['ops_s']:.0f}")
    console.print(table)


async def run(kinds: list[str], iterations: int, console: Console) -> dict[str, Any]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as tmp, Progress(console=console) as progress:
        task = progress.add_task("benchmarking", total=iterations * len(kinds))
        for kind in kinds:
            progress.update(task, description=f"{kind}")
            workdir = Path(tmp) / kind
            workdir.mkdir()
            cluster = None
            if kind == "file":
                url = f"file://{workdir}/locks"
            else:
                cluster = start_backend(kind, workdir)
                url = cluster.url
            try:
                results[kind] = await bench_backend(kind, url, workdir, iterations,
                                                    lambda: progress.advance(task))
            finally:
                if cluster is not None:
                    cluster.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_locks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(SHARED), help=f"comma-separated subset of {','.join(SHARED)}")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    unknown = set(kinds) - set(SHARED)
    if unknown or args.iterations < 1:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}" if unknown
                     else "--iterations must be at least 1")
    console = Console()
    try:
        results = asyncio.run(run(kinds, args.iterations, console))
    except ServerError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    render(results, console)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
