"""Real processes of a user's application: ``python -m node --jobs``, uvicorn's factory, an embedded app.

The README's "Your own jobs" tests and the cluster tests of stored jobs and
of every trigger kind start nodes the way a user does, from a project
directory (``cwd``), with the repository on PYTHONPATH as an installed
package would be, and read what the job bodies printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.servers import free_port

REPO = Path(__file__).resolve().parent.parent
TOKEN = "secret"
#: Short lease timing, as the failover suite's.
TIMING = {"BATON_LEASE_TTL": "2", "BATON_RENEW_DEADLINE": "1.4", "BATON_RETRY_PERIOD": "0.4"}
HEARTBEAT = re.compile(r"heartbeat (\S+) node=(\S+) token=(\d+)")


def base_env(lock_url: str, **extra: str) -> dict[str, str]:
    """A node's environment: no BATON_* from the caller, the given lock store under a lock name of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env.update(TIMING)
    env.update({"BATON_LOCK_URL": lock_url, "BATON_LOCK_NAME": f"t-{uuid.uuid4().hex[:8]}",
                "BATON_ADMIN_TOKEN": TOKEN, "BATON_HOST": "127.0.0.1", "BATON_LOG_FORMAT": "json",
                "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@dataclass
class AppProc:
    """One node process; ``prefix`` is where its API is mounted (an embedded app's router prefix)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    port: int = field(default_factory=free_port)
    prefix: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def log_path(self) -> Path:
        return self.cwd / f"{self.name}.log"

    def start(self) -> AppProc:
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        env = {**self.env, "BATON_PORT": str(self.port), "BATON_NODE_ID": self.name}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout: float = 60.0) -> AppProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"{self.name} exited: {self.proc and self.proc.returncode}\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy within {timeout}s\n{self.log()[-3000:]}")

    def get(self, path: str, **kw: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10, **kw)
        response.raise_for_status()
        return response.json()

    def status(self) -> dict[str, Any] | None:
        if not self.alive:
            return None
        try:
            return dict(httpx.get(f"{self.url}/status", timeout=1).json())
        except (httpx.HTTPError, ValueError):
            return None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def heartbeats(self) -> list[tuple[str, str, int]]:
        return [(m[1], m[2], int(m[3])) for m in HEARTBEAT.finditer(self.log())]


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def leader_of(procs: list[AppProc], exclude: AppProc | None = None) -> AppProc | None:
    leaders = [p for p in procs if p is not exclude and (s := p.status()) and s["role"] == "leader"]
    return leaders[0] if len(leaders) == 1 else None


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
