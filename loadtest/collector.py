"""The probe collector: an HTTP endpoint outside the nodes that keeps every probe start on disk.

The checker judges the cluster from this file alone, so the file must hold
every run a probe was told about: a POST is answered 200 only after its line
was written and ``fsync``-ed. Concurrent POSTs are group-committed (one write
and one ``fsync`` per batch of whatever arrived while the previous batch was
syncing), which keeps that promise without one ``fsync`` per request on the
event loop.

The file is opened in append mode and never truncated, so a harness can
restart the collector on the same file. Each stored line is the probe's JSON
object plus ``received_at`` (ISO 8601, UTC), as set by the collector: the
checker's witness of when a run started that no node's clock can fake. A probe
record is ``{job, scheduled_at, node, token, started_at}`` and, from newer
probes, ``kind`` and ``shape`` (``node.probes``); older records without them
are accepted as they are.

A body that is not a valid probe record gets a 400 with a JSON error and is
not stored; a write error gets a 503 (the probe sees a failure, never a
silent loss). Run it with::

    python -m loadtest.collector --port 8765 --out /tmp/probes.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from loadtest.probe_log import probe_problem

#: A probe record is ~200 bytes; anything this big is not one.
MAX_BODY = 64 * 1024


class JsonlSink:
    """Appends lines to one file, durably, in group commits.

    Callers await :meth:`append`; it returns once the line is on disk (written
    and fsync-ed) or raises ``OSError``. A single flusher task writes whatever
    queued up while the previous batch was syncing, so N concurrent callers
    cost one ``fsync``, not N, and lines never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = 0
        self._fd: int | None = None
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _open(self) -> None:
        """Open for append (creating it), count the lines already there, make the entry durable."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:  # the new directory entry must survive a crash too, not only the data
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        count = 0
        with open(self.path, "rb") as existing:
            while chunk := existing.read(1 << 20):
                count += chunk.count(b"\n")
        self.records = count
        self._fd = fd

    def _write(self, data: bytes) -> None:
        """One batch: write it all, fsync; on failure cut our own partial bytes off again."""
        if self._fd is None:
            self._open()
        assert self._fd is not None
        before = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            # an unacknowledged partial line would glue itself to the next record
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            raise

    async def append(self, line: bytes) -> None:
        """Return once ``line`` (which ends with a newline) is durably in the file."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((line, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="collector-flush")
        await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
            except OSError as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                self.records += len(batch)
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def count(self) -> int:
        """Lines in the file: those found at open plus those appended since."""
        if self._fd is None:
            await asyncio.to_thread(self._open)
        return self.records

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def make_app(path: Path) -> FastAPI:
    """The collector as an ASGI app appending to ``path``.

    The file is opened on first use, not at startup, so the app also works under transports that skip the
    lifespan (httpx's ASGITransport). ``GET /count`` counts every line in the file, including lines that
    were there before this process started.
    """
    sink = JsonlSink(Path(path))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await sink.close()

    app = FastAPI(title="baton probe collector", lifespan=lifespan)
    app.state.sink = sink

    def bad(reason: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status)

    @app.post("/probe")
    async def probe(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY:
            return bad(f"body larger than {MAX_BODY} bytes")
        try:
            record: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return bad(f"body is not JSON: {exc}")
        problem = probe_problem(record)
        if problem is not None:
            return bad(problem)
        record["received_at"] = datetime.now(UTC).isoformat()
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        try:
            await sink.append(line)
        except OSError as exc:
            return bad(f"could not store the record: {exc}", status=503)
        return JSONResponse({"stored": True})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/count")
    async def count() -> JSONResponse:
        try:
            return JSONResponse({"records": await sink.count()})
        except OSError as exc:  # an unreadable file is the operator's problem, not a 500
            return bad(str(exc), status=503)

    return app


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so "port in use" is reported before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.collector", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0 picks a free one)")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append probe records to")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    out: Path = args.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    except OSError as exc:
        print(f"collector: cannot append to {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        reason = "port already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        print(f"collector: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2

    import uvicorn  # only the runnable needs it

    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(out), workers=1, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    print(f"collector listening on http://{args.host}:{port}, appending to {out}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
