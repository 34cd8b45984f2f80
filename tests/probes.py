"""A minimal in-test probe sink: collects what probe jobs POST, in memory, thread-safe."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ProbeSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.lock:
                    sink.records.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/probe"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records)

    def duplicates(self) -> list[tuple[str, str]]:
        counts = Counter((r["job"], r["scheduled_at"]) for r in self.snapshot())
        return [key for key, n in counts.items() if n > 1]

    def by_node(self) -> Counter[str]:
        return Counter(r["node"] for r in self.snapshot())

    def fire_times(self, job: str) -> list[datetime]:
        return sorted(datetime.fromisoformat(r["scheduled_at"]) for r in self.snapshot() if r["job"] == job)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
