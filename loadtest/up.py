"""``python -m loadtest up``: a local cluster, a probe collector, a control endpoint, a live table.

``up`` owns what it starts (lock server, collector, nodes, proxies):

* SIGINT, SIGTERM or SIGHUP (Ctrl-C, ``kill``, a closed terminal), the end of
  ``--duration``, or a reader of its output that went away (``| tee`` or
  ``| head`` stopped) stop it cleanly: every node gets SIGTERM and hands its
  lease over, then the rest is stopped, and ``up`` exits 0. A second signal
  while it stops skips the waiting.
* However else it ends (``kill -9``, a crash), its children die with it: each
  asks the kernel for a SIGKILL when ``up`` dies (``owned_popen``).

While it runs, ``up`` holds an ``flock`` on ``up.lock`` in the state directory
(with its pid inside). The kernel drops that lock when the process ends, so a
second ``up`` on the same directory knows for sure whether the first is alive:
it says so in one line and exits, or, given ``--replace``, stops it first.
Nothing the collector wrote is removed. A state file in the state directory
tells ``chaos`` and ``check`` where everything is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
from loadtest.cluster import LocalCluster, NodeProc, Timing
from loadtest.servers import ServerError, free_port, owned_popen, port_open

#: How long a node gets to hand its lease over and exit on SIGTERM before it is killed.
NODE_STOP_TIMEOUT = 15.0
#: How long ``--replace`` waits for the earlier ``up`` to stop cleanly before it kills it.
REPLACE_TIMEOUT = 60.0


class UpError(RuntimeError):
    """A problem starting the cluster; one line for the person at the terminal."""


class Collector:
    """The probe collector as a subprocess, so a node or harness crash cannot take its file with it."""

    def __init__(self, out: Path, log: Path) -> None:
        self.out = out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/probe"
        with open(log, "ab") as f:
            self.proc = owned_popen([sys.executable, "-m", "loadtest.collector", "--port", str(self.port),
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


# -- stopping ---------------------------------------------------------------------------------


class Stop(BaseException):
    """Raised in the main thread by the first stop signal while ``up`` is starting or running.

    A BaseException, like KeyboardInterrupt: nothing on the way catches it by accident.
    """


class Stopper:
    """SIGINT, SIGTERM and SIGHUP, or output nobody reads any more, ask ``up`` to stop; a second signal hurries it.

    While ``armed`` (starting and running) the first signal raises :class:`Stop` in the main thread, so
    even a long start (a server, the first leader) is cut short; once stopping, signals only set ``hurry``.
    A signal that was ignored when ``up`` started (``nohup``, a background job) stays ignored; SIGTERM
    is always handled.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()
        self.armed = False
        self.reason = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            if sig != signal.SIGTERM and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self.armed = True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(sig, previous)
        self._previous.clear()

    def request(self, reason: str) -> None:
        """Ask for a stop from any thread; the main loop notices within half a second."""
        if not self.requested.is_set():
            self.reason = reason
            self.requested.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.requested.is_set():
            self.hurry.set()
            return
        self.request(signal.Signals(signum).name)
        if self.armed:
            raise Stop(signum)


class GuardedOutput:
    """``up``'s stdout for the console: a write that fails (closed terminal, reader gone) never raises.

    The first failure points the file descriptor at /dev/null (so nothing complains at exit either)
    and asks ``up`` to stop: nobody is watching any more.
    """

    def __init__(self, stream: Any, on_lost: Callable[[str], None]) -> None:
        self._stream = stream
        self._on_lost = on_lost
        self.lost = False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return int(self._stream.write(text))
            except (OSError, ValueError):
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lose()

    def isatty(self) -> bool:
        try:
            return bool(self._stream.isatty())
        except (OSError, ValueError):
            return False

    def reader_gone(self) -> bool:
        """True once the pipe's reader or the terminal went away, even before anything was written."""
        if self.lost:
            return True
        try:
            poller = select.poll()
            poller.register(self._stream.fileno(), 0)  # errors and hangups are always reported
            gone = any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in poller.poll(0))
        except (OSError, ValueError, AttributeError):
            return False
        if gone:
            self._lose()
        return gone

    def _lose(self) -> None:
        self.lost = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        self._on_lost("output closed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# -- one `up` per state directory -------------------------------------------------------------


class StateLock:
    """``up.lock`` in the state directory: ``flock``-ed by the live ``up``, with its pid inside.

    The kernel drops an ``flock`` when its process ends, however it ends, so "held" means "a live
    ``up``", where a pid alone could have been reused. The lock is not inherited by children.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "up.lock"
        self.fd: int | None = None

    def acquire(self, patience: float = 1.0) -> bool:
        """Take the lock; ``patience`` covers a ``chaos`` or ``check`` that looks at it at the same moment."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock; the pid stays, harmless in a file nobody holds
            self.fd = None

    def holder(self) -> int | None:
        """The pid of the ``up`` holding the lock (it writes it right after taking the lock)."""
        for _ in range(20):
            with contextlib.suppress(OSError, ValueError):
                return int(self.path.read_text().strip())
            time.sleep(0.05)
        return None


def lock_held(state_dir: Path) -> bool:
    """Whether a live ``up`` owns ``state_dir`` (a shared lock for a moment: it never blocks ``up`` for long)."""
    try:
        fd = os.open(state_dir / "up.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, if it was taken
    return False


def _read_state(state_path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(state_path.read_text())
        if isinstance(state, dict):
            return state
    return {}


def running_message(state_dir: Path, pid: int | None) -> str:
    """One line: which ``up`` owns ``state_dir``, what it runs, and how to stop it."""
    state = _read_state(state_dir / "state.json")
    parts = []
    if pid is not None and state.get("up_pid") == pid:
        if state.get("collector_pid"):
            parts.append(f"collector {state['collector_pid']}")
        nodes = [f"{n['node_id']} {n['pid']}" for n in state.get("nodes", []) if n.get("pid")]
        if nodes:
            parts.append(", ".join(nodes))
    what = f" ({'; '.join(parts)})" if parts else ""
    who = f"up pid {pid}" if pid is not None else "an up whose pid is not recorded"
    how = f"stop it with `kill {pid}` (it stops everything it started) or" if pid is not None else "stop it or"
    return (f"a cluster from {state_dir} is already running: {who}{what}; "
            f"{how} pass --replace to stop it and start this one")


def _proc_alive(pid: int) -> bool:
    """Running, not a zombie (a zombie is dead; whoever reaps it may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return _alive(pid)
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _proc_alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _stop_earlier_up(lock: StateLock, pid: int | None, console: Console) -> None:
    """``--replace``: SIGTERM the live ``up`` (it stops its cluster cleanly), SIGKILL it if that takes too long."""
    if pid is None:
        raise UpError(f"{lock.path} is locked by a process whose pid is not recorded; stop it yourself")
    console.print(f"stopping the cluster of up pid {pid} ...")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not lock.acquire(patience=REPLACE_TIMEOUT):
        console.print(f"up pid {pid} did not stop within {REPLACE_TIMEOUT:.0f}s; killing it (its children die with it)")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not lock.acquire(patience=15):
            raise UpError(f"up pid {pid} still holds {lock.path} after SIGKILL")


def leftovers(state: dict[str, Any]) -> list[tuple[str, int]]:
    """Processes of an earlier cluster on this state directory that outlived their ``up``.

    That cannot happen to an ``up`` that owns its children; it finds what an older one left behind
    (nodes and a collector that kept the lease and the port). A process counts by what ties it to
    this directory, never by a pid alone: a node's log file (its stdout), the collector's output
    file, a server's command line (its data directory).
    """
    node_logs = {str(n["log"]): str(n.get("node_id")) for n in state.get("nodes", []) if n.get("log")}
    collector_file = str(state.get("collector_file", "\0"))
    servers = [m.get("argv") for m in (state.get("server") or {}).get("members", []) if m.get("argv")]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            if not argv or not _proc_alive(pid):
                continue
            if argv[1:3] == ["-m", "loadtest.collector"] and collector_file in argv:
                found.append(("collector", pid))
            elif argv in servers:
                found.append((Path(argv[0]).name, pid))
            elif argv[1:] == ["-m", "node"] and (log := os.readlink(entry / "fd" / "1")) in node_logs:
                found.append((node_logs[log], pid))
        except OSError:
            continue
    return sorted(found)


def _stop_leftovers(found: list[tuple[str, int]], console: Console) -> None:
    pids = [pid for _, pid in found]
    console.print(f"stopping what an earlier cluster left running: {', '.join(f'{n} {p}' for n, p in found)}")
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    for pid in _wait_gone(pids, NODE_STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left := _wait_gone(pids, 10):
        raise UpError(f"could not stop pids {' '.join(map(str, left))}")


def _stop_nodes(cluster: LocalCluster, stopper: Stopper) -> list[str]:
    """SIGTERM every node at once (each hands its lease over), wait for them; the rest is killed later."""
    running = [n for n in cluster.members if n.alive]
    for node in running:
        with contextlib.suppress(OSError):
            node.signal(signal.SIGCONT)
            node.signal(signal.SIGTERM)
    deadline = time.monotonic() + NODE_STOP_TIMEOUT
    while any(n.alive for n in running) and time.monotonic() < deadline and not stopper.hurry.is_set():
        time.sleep(0.05)
    return [n.node_id for n in running if n.alive]


# -- up ---------------------------------------------------------------------------------------


def run(args: Any, console: Console) -> int:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.json"
    stopper = Stopper()
    output = GuardedOutput(console.file, stopper.request)
    console.file = output  # type: ignore[assignment]
    lock = StateLock(state_dir)
    if not lock.acquire():
        pid = lock.holder()
        if not getattr(args, "replace", False):
            raise UpError(running_message(state_dir, pid))
        _stop_earlier_up(lock, pid, console)
    try:
        found = leftovers(_read_state(state_path))
        if found and not getattr(args, "replace", False):
            listed = ", ".join(f"{name} {pid}" for name, pid in found)
            raise UpError(f"an earlier cluster from {state_dir} left processes running without their up: {listed}; "
                          f"stop them with `kill {' '.join(str(p) for _, p in found)}` or pass --replace")
        if found:
            _stop_leftovers(found, console)
        if args.base_port:
            for port in range(args.base_port, args.base_port + args.nodes):
                if port_open(port):
                    raise UpError(f"port {port} is in use; pick another --base-port")
        stopper.install()
        try:
            return _run(args, console, output, stopper, state_dir)
        except Stop:
            return 0
        finally:
            stopper.restore()
    finally:
        lock.release()


def _run(args: Any, console: Console, output: GuardedOutput, stopper: Stopper, state_dir: Path) -> int:
    state_path = state_dir / "state.json"
    timing = Timing.for_ttl(args.ttl, misfire_grace=args.misfire_grace)
    records = state_dir / "probes.jsonl"
    chaos_log = ChaosLog(state_dir / "chaos.jsonl")
    collector = Collector(records, state_dir / "collector.log")  # a stop signal in here: it dies with us
    cluster = LocalCluster(state_dir / "cluster", backend=args.backend, nodes=args.nodes, timing=timing,
                           lock_url=args.lock_url, probe_jobs=args.probe_jobs, probe_interval=args.probe_interval,
                           probe_shapes=args.probes or "",
                           probe_url=collector.url, claims=args.claims == "on", base_port=args.base_port,
                           admin_token=args.admin_token, etcd_members=args.etcd_members)
    control: Control | None = None
    serving = False
    try:
        console.print(f"starting {args.nodes} nodes on the {args.backend} backend ...")
        cluster.start()
        state: dict[str, Any] = {}
        control = Control(Chaos(cluster, chaos_log, seed=args.seed), state)
        threading.Thread(target=control.serve_forever, daemon=True).start()
        serving = True
        state.update(cluster.describe(), up_pid=os.getpid(), control_url=f"http://127.0.0.1:{control.server_port}",
                     collector_url=collector.url, collector_pid=collector.proc.pid, collector_file=str(records),
                     chaos_log=str(chaos_log.path), started_at=datetime.now(UTC).isoformat(),
                     misfire_grace=timing.misfire_grace)
        cluster.write_state(state_path, state)
        leader = _wait_for_leader(cluster, stopper, timeout=60)
        if leader is None:
            return 0
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
            nodes = cluster.describe()["nodes"]
            if nodes != state["nodes"]:  # a node restarted by chaos: keep the pids on disk current
                state["nodes"] = nodes
                cluster.write_state(state_path, state)
            return node_table(cluster, tail, events)

        live = args.live and console.is_terminal
        with Live(refresh(), console=console, refresh_per_second=2) if live else contextlib.nullcontext() as view:
            while not stopper.requested.is_set() and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.5)
                if output.reader_gone():
                    break
                group = refresh()
                if view is not None:
                    view.update(group)
        if not live and not stopper.requested.is_set():
            console.print(node_table(cluster, tail, events))
        return 0
    finally:
        # From here on a signal only hurries the stop (``armed`` is set before anything can be skipped).
        stopper.armed = False
        stopper.requested.set()
        _shutdown(console, stopper, cluster, collector, control if serving else None, state_path, records)


def _wait_for_leader(cluster: LocalCluster, stopper: Stopper, timeout: float) -> NodeProc | None:
    """``cluster.wait_for_leader``, except that a stop request (a broken pipe) ends the wait."""
    deadline = time.monotonic() + timeout
    while not stopper.requested.is_set():
        leader = cluster.leader()
        if leader is not None:
            return leader
        if time.monotonic() > deadline:
            raise ServerError(f"no single leader within {timeout}s: {cluster.statuses()}")
        time.sleep(0.05)
    return None


def _shutdown(console: Console, stopper: Stopper, cluster: LocalCluster, collector: Collector,
              control: Control | None, state_path: Path, records: Path) -> None:
    why = f" ({stopper.reason})" if stopper.reason else ""
    console.print(f"stopping the cluster{why} ...")
    if control is not None:
        control.shutdown()  # no new faults
        deadline = time.monotonic() + 120
        if control.busy.locked():
            console.print("waiting for the fault in flight to finish (signal again to skip) ...")
        while not control.busy.acquire(timeout=0.2):  # let a fault in flight finish restarting its node
            if stopper.hurry.is_set() or time.monotonic() > deadline:
                break
        control.server_close()
    killed = _stop_nodes(cluster, stopper)
    cluster.close()  # kills whatever is left, closes the proxies, stops the lock server
    collector.stop()
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(state_path.read_text())
        state["stopped_at"] = datetime.now(UTC).isoformat()
        state_path.write_text(json.dumps(state, indent=2))
    if killed:
        console.print(f"killed {', '.join(killed)}: did not stop within {NODE_STOP_TIMEOUT:.0f}s of SIGTERM")
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
    if state.get("stopped_at") or not lock_held(state_path.parent) or not _alive(up_pid):
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
