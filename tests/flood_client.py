"""The /runs flood of ``tests/test_api_flood.py``, sent from a process of its own, as a deployment's clients are.

Usage: python -m tests.flood_client URL NEWEST

Sends two waves of ``FLOOD`` listings (``flood_requests``), each on ``FLOOD`` connections opened first and
then written at once, while ``/healthz``, ``/status`` and ``/readyz`` are probed back to back and timed.
Prints one JSON object: every listing's query, status, ``Retry-After`` and body, and every probe's path,
status and seconds. In the test's own process the client's work would share the node's event loop and
stall it as the node alone never is.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx

FLOOD = 64


def flood_requests(newest: float) -> list[dict[str, Any]]:
    """64 listings: most the cheapest (limit=1), a few with each filter and a cursor."""
    filtered: list[dict[str, Any]] = [
        {"limit": 1, "job": "heartbeat"}, {"limit": 1, "outcome": "error"}, {"limit": 5, "job": "heartbeat",
                                                                              "outcome": "ok"},
        {"limit": 1, "since": datetime.fromtimestamp(newest - 3600, UTC).isoformat()},
        {"limit": 1, "before": newest - 86400}, {"limit": 50}, {"limit": 1, "job": "nope"},
        {"limit": 1, "outcome": "missed", "before": newest - 3 * 86400},
    ]
    return filtered + [{"limit": 1}] * (FLOOD - len(filtered))


def _body(raw: bytes) -> Any:
    """The answer's JSON, or its text when it is not JSON (a server error page), for the test to show."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"text": raw.decode("utf-8", "replace")[:500]}


async def wave(host: str, port: int, targets: list[str]) -> list[dict[str, Any]]:
    """One request per target, each on a connection of its own opened first, then all written at once: they
    reach the node together (an HTTP client library would take a while per request to build and send it,
    and the node would serve the first before the last arrived)."""
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in targets))
    for (_, writer), target in zip(conns, targets, strict=True):
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    raws = await asyncio.gather(*(reader.read() for reader, _ in conns))
    answers = []
    for (_, writer), target, raw in zip(conns, targets, raws, strict=True):
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines)}
        answers.append({"query": target.partition("?")[2], "status": int(status_line.split()[1]),
                        "retry_after": headers.get("retry-after"), "body": _body(body)})
    return answers


async def flood(url: str, newest: float) -> dict[str, Any]:
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    probes: list[tuple[str, int, float]] = []
    done = asyncio.Event()

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            while not done.is_set():
                for path in ("/healthz", "/status", "/readyz"):
                    t0 = time.monotonic()
                    r = await c.get(path)
                    probes.append((path, r.status_code, time.monotonic() - t0))
                await asyncio.sleep(0.01)

    targets = [f"/runs?{urlencode(params)}" for params in flood_requests(newest)]
    prober = asyncio.create_task(probe())
    answers: list[dict[str, Any]] = []
    try:
        for _ in range(2):  # two waves: the second finds the queue of the first drained, not stuck
            answers += await wave(host, port, targets)
            await asyncio.sleep(0.2)
    finally:
        done.set()
        await prober
    return {"answers": answers, "probes": probes}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.flood_client URL NEWEST")
    print(json.dumps(asyncio.run(flood(sys.argv[1], float(sys.argv[2])))))
