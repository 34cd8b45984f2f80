"""``python -m loadtest up``: a local cluster, a probe collector, a control endpoint, a live table.

Everything it starts (lock server, collector, nodes, proxies) is stopped on
Ctrl-C or SIGTERM; nothing the collector wrote is removed. A state file in the
state directory tells ``chaos`` and ``check`` where everything is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loadtest.chaos import Aim, Chaos, ChaosError, ChaosLog, result_dict
from loadtest.cluster import LocalCluster, Timing
from loadtest.servers import ServerError, free_port, port_open


class UpError(RuntimeError):
    """A problem starting the cluster; one line for the person at the terminal."""


class Collector:
    """The probe collector as a subprocess, so a node or harness crash cannot take its file with it."""

    def __init__(self, out: Path, log: Path) -> None:
        self.out = out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/probe"
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "loadtest.collector", "--port", str(self.port),
                                          "--out", str(out)], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise UpError(f"probe collector did not start; see {log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Tail:
    """Follows the collector's JSONL: runs and last fire lag per node, and leader handoffs seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.runs: dict[str, int] = {}
        self.lag: dict[str, float] = {}
        self.last_token = 0
        self.last_node = ""

    def poll(self) -> Iterator[str]:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            while (line := f.readline()).endswith("\n"):
                self.offset = f.tell()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    r = json.loads(line)
                    node = str(r["node"])
                    self.runs[node] = self.runs.get(node, 0) + 1
                    lag = (datetime.fromisoformat(r["started_at"]) - datetime.fromisoformat(r["scheduled_at"]))
                    self.lag[node] = lag.total_seconds()
                    if int(r["token"]) > self.last_token:
                        if self.last_node and self.last_node != node:
                            yield f"runs moved {self.last_node} → {node} (token {r['token']})"
                        self.last_token, self.last_node = int(r["token"]), node


class Control(ThreadingHTTPServer):
    """POST /chaos {"fault": ..., "target": ...} runs one fault in this process, which owns the cluster."""

    def __init__(self, chaos: Chaos, state: dict[str, Any]) -> None:
        self.chaos = chaos
        self.state = state
        self.busy = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _ControlHandler)


class _ControlHandler(BaseHTTPRequestHandler):
    server: Control

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(200, self.server.state)

    def do_POST(self) -> None:
        if self.path != "/chaos":
            self._reply(404, {"detail": "unknown path"})
            return
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            fault = str(req["fault"])
        except (ValueError, KeyError, TypeError):
            self._reply(400, {"detail": 'expected JSON {"fault": NAME, "target": NODE or null}'})
            return
        if not self.server.busy.acquire(blocking=False):
            self._reply(409, {"detail": "another fault is running"})
            return
        try:
            chaos = self.server.chaos
            if req.get("hold") is not None:
                chaos.hold = float(req["hold"])
            if req.get("skew") is not None:
                chaos.skew = float(req["skew"])
            aim = Aim.parse(str(req["aim"])) if req.get("aim") else None
            self._reply(200, result_dict(chaos.run(fault, req.get("target"), aim)))
        except (ChaosError, ServerError) as exc:
            self._reply(400, {"detail": str(exc)})
        finally:
            self.server.busy.release()

    def log_message(self, *args: Any) -> None:
        pass


def node_table(cluster: LocalCluster, tail: Tail, events: list[str]) -> Group:
    table = Table(title=f"Baton cluster on {cluster.backend} (Ctrl-C stops everything)")
    for col in ("node", "pid", "role", "token", "lease left", "runs seen", "last fire lag"):
        table.add_column(col)
    for node in cluster.members:
        status = node.status(timeout=0.3)
        if node.paused:
            role, style = "paused", "yellow"
        elif not node.alive:
            role, style = "down", "red"
        elif status is None:
            role, style = "?", "dim"
        else:
            role = status["role"]
            style = "bold green" if role == "leader" else ""
        lag = tail.lag.get(node.node_id)
        table.add_row(node.node_id, str(node.pid or "-"), role,
                      str(status["token"]) if status and status["token"] else "-",
                      f"{status['lease_remaining_s']:.1f}s" if status and status["role"] == "leader" else "-",
                      str(tail.runs.get(node.node_id, 0)), f"{lag * 1000:.0f} ms" if lag is not None else "-",
                      style=style)
    return Group(table, Text("\n".join(events[-8:]) or "no failovers yet", style="dim"))


def run(args: Any, console: Console) -> int:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.json"
    if state_path.exists():
        with contextlib.suppress(ValueError, KeyError, OSError):
            old = json.loads(state_path.read_text())
            if _alive(int(old["up_pid"])) and old["up_pid"] != os.getpid():
                raise UpError(f"a cluster from {state_path} is still running (pid {old['up_pid']}); "
                              "stop it first or pass another --state-dir")
    if args.base_port:
        for port in range(args.base_port, args.base_port + args.nodes):
            if port_open(port):
                raise UpError(f"port {port} is in use; pick another --base-port")
    timing = Timing.for_ttl(args.ttl, misfire_grace=args.misfire_grace)
    records = state_dir / "probes.jsonl"
    chaos_log = ChaosLog(state_dir / "chaos.jsonl")
    collector = Collector(records, state_dir / "collector.log")
    cluster = LocalCluster(state_dir / "cluster", backend=args.backend, nodes=args.nodes, timing=timing,
                           lock_url=args.lock_url, probe_jobs=args.probe_jobs, probe_interval=args.probe_interval,
                           probe_shapes=args.probes or "",
                           probe_url=collector.url, claims=args.claims == "on", base_port=args.base_port,
                           admin_token=args.admin_token, etcd_members=args.etcd_members)
    control: Control | None = None
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        console.print(f"starting {args.nodes} nodes on the {args.backend} backend ...")
        cluster.start()
        state: dict[str, Any] = {}
        control = Control(Chaos(cluster, chaos_log, seed=args.seed), state)
        threading.Thread(target=control.serve_forever, daemon=True).start()
        state.update(cluster.describe(), up_pid=os.getpid(), control_url=f"http://127.0.0.1:{control.server_port}",
                     collector_url=collector.url, collector_file=str(records), chaos_log=str(chaos_log.path),
                     started_at=datetime.now(UTC).isoformat(), misfire_grace=timing.misfire_grace)
        cluster.write_state(state_path, state)
        leader = cluster.wait_for_leader(timeout=60)
        console.print(f"leader: {leader.node_id}; state in {state_path}")
        tail = Tail(records)
        events: list[str] = []
        last_leader = leader.node_id
        deadline = time.monotonic() + args.duration if args.duration else None

        def refresh() -> Group:
            nonlocal last_leader
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            events.extend(f"{stamp} {e}" for e in tail.poll())
            current = cluster.leader()
            if current is not None and current.node_id != last_leader:
                events.append(f"{stamp} leader {last_leader} → {current.node_id}")
                last_leader = current.node_id
            state["nodes"] = cluster.describe()["nodes"]
            return node_table(cluster, tail, events)

        live = args.live and console.is_terminal
        with Live(refresh(), console=console, refresh_per_second=2) if live else contextlib.nullcontext() as view:
            while not stopping.is_set() and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.5)
                group = refresh()
                if view is not None:
                    view.update(group)
        if not live:
            console.print(node_table(cluster, tail, events))
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.print("stopping the cluster ...")
        if control is not None:
            control.busy.acquire(timeout=120)  # let a fault in flight finish restarting its node
            control.shutdown()
        cluster.close()
        collector.stop()
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(state_path.read_text())
            state["stopped_at"] = datetime.now(UTC).isoformat()
            state_path.write_text(json.dumps(state, indent=2))
        console.print(f"stopped; probe records kept in {records}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def post_fault(state_path: Path, fault: str, target: str | None, hold: float | None, timeout: float,
               aim: str | None = None, skew: float | None = None) -> dict[str, Any]:
    """For ``chaos``: ask the running ``up`` to apply one fault."""
    if not state_path.exists():
        raise UpError(f"no cluster state at {state_path}; start a cluster with `python -m loadtest up`")
    try:
        state = json.loads(state_path.read_text())
        control_url, up_pid = state["control_url"], int(state["up_pid"])
    except (ValueError, KeyError) as exc:
        raise UpError(f"{state_path} is not a Baton state file ({exc})") from None
    if state.get("stopped_at") or not _alive(up_pid):
        raise UpError(f"the cluster in {state_path} is gone (its `up` process {up_pid} is not running); "
                      "start it again with `python -m loadtest up`")
    try:
        response = httpx.post(f"{control_url}/chaos", json={"fault": fault, "target": target, "hold": hold,
                                                            "aim": aim, "skew": skew}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UpError(f"the cluster in {state_path} does not answer at {control_url}: {exc}") from None
    body = response.json()
    if response.status_code != 200:
        raise UpError(str(body.get("detail", body)))
    return dict(body)
