"""Start and stop real Redis, PostgreSQL and etcd servers on free loopback ports.

Used by the tests and by ``python -m loadtest up``. Local binaries come from
Debian's packages; where a Docker engine answers and ``BATON_USE_DOCKER`` is
not ``0``, the same servers run as containers through testcontainers instead.
A missing binary is an error that names the command installing it, never a
silent skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lock_backends.registry import SERVERS

INSTALL_HINT = {
    "redis-server": "apt-get install -y redis-server",
    "etcd": "apt-get install -y etcd-server",
    "postgres": "apt-get install -y postgresql",
    "initdb": "apt-get install -y postgresql",
    "prometheus": "apt-get install -y prometheus",
}


class ServerError(RuntimeError):
    """A server could not be started; the message says what to do."""


class ServerBinaryMissing(ServerError):
    def __init__(self, binary: str) -> None:
        hint = INSTALL_HINT.get(binary, f"install {binary}")
        super().__init__(f"{binary} not found on PATH; install it with: {hint} (or run `make test`)")
        self.binary = binary


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_range() -> tuple[int, int]:
    """The ports :func:`free_port` picks from, both ends included: ``BATON_PORT_RANGE`` (``LOW-HIGH``), or
    from 15000 to just below the kernel's ephemeral range.

    Processes that share the machine and restart servers on the same port (parallel test workers) each get
    a range of their own, so none can take a port another one has stopped a server on for a moment.
    """
    given = os.environ.get("BATON_PORT_RANGE", "")
    if given:
        low_text, _, high_text = given.partition("-")
        try:
            low, high = int(low_text), int(high_text)
        except ValueError:
            raise ServerError(f"BATON_PORT_RANGE={given!r} is not LOW-HIGH") from None
        if not 1024 <= low < high <= 65535:
            raise ServerError(f"BATON_PORT_RANGE={given!r} is not LOW-HIGH within 1024-65535")
        return low, high
    low = _ephemeral_low()
    return min(15000, low - 1000), low - 1


def free_port(host: str = "127.0.0.1") -> int:
    """A free port *below* the kernel's ephemeral range (in :func:`port_range`).

    Servers and nodes are stopped and started again on the same port. A port
    from the ephemeral range could meanwhile be taken as the local end of some
    outgoing connection, and the restart would fail with "address in use".
    """
    low, high = port_range()
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: Ports this process gave out already, so two callers never get the same one before either binds it.
_handed_out: set[int] = set()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


PR_SET_PDEATHSIG = 1


class _Spawner:
    """Forks every child of :func:`owned_popen` from one thread that lives as long as this process.

    Each child asks the kernel for a SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so it
    cannot outlive this process however the process ends, ``kill -9`` included. The kernel means
    the *thread* that forked: a child forked from a short-lived thread (a control request that
    restarts a node) would be killed when that thread ends, hence this one long-lived thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0  # the pid whose thread this is (a forked copy of this process starts its own)
        self._jobs: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future[subprocess.Popen[bytes]]]] = \
            queue.SimpleQueue()
        try:
            self._prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # not Linux: children are stopped only by a clean exit
            self._prctl = None

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._owner != os.getpid():
                self._owner = os.getpid()
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), name="owned-popen",
                                 daemon=True).start()
            done: Future[subprocess.Popen[bytes]] = Future()
            self._jobs.put((argv, kwargs, done))
        try:
            return done.result()
        except BaseException:
            # interrupted while the child was being forked (a signal in the caller): do not lose it
            done.add_done_callback(_kill_started)
            raise

    def _serve(self, jobs: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future[subprocess.Popen[bytes]]]],
               ) -> None:
        while True:
            argv, kwargs, done = jobs.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(subprocess.Popen(argv, preexec_fn=self._die_with(os.getpid()), **kwargs))
            except BaseException as exc:
                done.set_exception(exc)

    def _die_with(self, parent: int) -> Callable[[], None] | None:
        prctl = self._prctl
        if prctl is None:
            return None

        def preexec() -> None:  # in the child, between fork and exec: nothing that takes a lock
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the line above: die with it
                os._exit(1)
        return preexec


def _kill_started(done: Future[subprocess.Popen[bytes]]) -> None:
    if not done.cancelled() and done.exception() is None:
        with contextlib.suppress(OSError):
            done.result().kill()


_spawner = _Spawner()


def owned_popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kwargs)`` for a child that dies with this process, however it ends.

    Callers still stop their children cleanly when they can (a node hands its lease over on
    SIGTERM); this is the guarantee for when they cannot: SIGKILL of this process, an uncaught
    exception, a signal nobody handles. Safe to call from any thread.
    """
    return _spawner.popen(argv, **kwargs)


def find_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if name in ("postgres", "initdb", "pg_ctl"):
        for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
            return str(candidate)
    raise ServerBinaryMissing(name)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}")


def docker_available() -> bool:
    if os.environ.get("BATON_USE_DOCKER", "") == "0" or not shutil.which("docker"):
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class Server:
    """One server (or one etcd member) with a stable port across restarts."""

    kind: str
    port: int
    workdir: Path
    argv: list[str]
    ready: Callable[[], bool]
    peer_port: int = 0
    #: The signal that asks for a quick clean stop (PostgreSQL: SIGINT, "fast" shutdown; its SIGTERM
    #: waits for every client session to end).
    stop_signal: int = signal.SIGTERM
    #: Run the server as this user (PostgreSQL refuses root).
    user: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.kind}-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        if port_open(self.port):
            raise ServerError(f"port {self.port} for {self.kind} is already in use")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        as_user = {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}
        self.proc = owned_popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.workdir if not self.user else "/", **as_user,
        )
        log.close()
        try:
            wait_until(self.answers, timeout, f"{self.kind} on {self.port}")
        except ServerError:
            self.stop()
            raise

    def answers(self) -> bool:
        """Whether the server answers yet; raises if its process exited."""
        return self._alive_or_raise() and self.ready()

    def _alive_or_raise(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServerError(f"{self.kind} exited with {self.proc.returncode}:\n{tail}")
        return True

    def stop(self, sig: int | None = None, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig if sig is not None else self.stop_signal)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        # make sure nothing of the process group is left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        wait_until(lambda: not port_open(self.port), 10, f"{self.kind} port {self.port} to close")

    def close(self) -> None:
        self.stop()


@dataclass
class ContainerServer(Server):
    """The same server in a container (testcontainers), on a fixed host port so restarts keep it."""

    image: str = ""
    container_port: int = 0
    command: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    container: Any = None

    @property
    def running(self) -> bool:
        if self.container is None:
            return False
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def start(self, timeout: float = 120.0) -> None:
        if self.container is None:
            from testcontainers.core.container import DockerContainer

            container = DockerContainer(self.image, command=self.command, env=self.env)
            container.with_bind_ports(self.container_port, self.port)
            container.start()
            self.container = container
        elif not self.running:
            self.container.get_wrapped_container().start()
        wait_until(self.ready, timeout, f"{self.kind} container on {self.port}")

    def stop(self, sig: int | None = None, timeout: float = 15.0) -> None:
        if self.container is not None and self.running:
            self.container.get_wrapped_container().stop(timeout=int(timeout))
        wait_until(lambda: not port_open(self.port), 30, f"{self.kind} port {self.port} to close")

    def close(self) -> None:
        if self.container is not None:
            self.container.stop()  # stops and removes
            self.container = None


@dataclass
class Cluster:
    """A backend: one server, or several etcd members, and the URL nodes use."""

    kind: str
    url: str
    members: list[Server]
    workdir: Path
    own_workdir: bool = True
    extra_dirs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        for member in self.members:
            member.proc = None
        try:
            if self.kind == "etcd" and len(self.members) > 1:
                self._start_etcd_members()
            else:
                for member in self.members:
                    member.start()
        except BaseException:
            self.stop()
            raise

    def _start_etcd_members(self) -> None:
        # members of a new cluster wait for each other: launch all, then wait for all
        for m in self.members:
            log = open(m.log_path, "ab")  # noqa: SIM115
            m.proc = owned_popen(m.argv, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, cwd=m.workdir)
            log.close()
        for m in self.members:
            wait_until(m.answers, 60, f"etcd member on {m.port}")

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def close(self) -> None:
        for member in self.members:
            member.close()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for extra in self.extra_dirs:
            shutil.rmtree(extra, ignore_errors=True)


def _redis_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False
    return check


def redis_cluster(workdir: Path, port: int | None = None) -> Cluster:
    binary = find_binary("redis-server")
    port = port or free_port()
    # AOF with fsync on every write: claims and the fence must survive a restart-backend fault
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(workdir), "--daemonize", "no", "--protected-mode", "no"]
    server = Server("redis", port, workdir, argv, _redis_ready(port))
    return Cluster("redis", f"redis://127.0.0.1:{port}/0", [server], workdir)


def _pg_ready(port: int, pg_isready: str | None) -> Callable[[], bool]:
    def check() -> bool:
        if pg_isready:
            done = subprocess.run([pg_isready, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
                                  capture_output=True)
            return done.returncode == 0
        return port_open(port)
    return check


def postgres_cluster(workdir: Path, port: int | None = None) -> Cluster:
    postgres = find_binary("postgres")
    initdb = find_binary("initdb")
    try:
        pg_isready: str | None = find_binary("pg_isready")
    except ServerBinaryMissing:
        pg_isready = None
    port = port or free_port()
    pgroot = workdir
    extra: list[Path] = []
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses root: run the server as the postgres user, in a directory it owns and can
        # reach (a test's tmp dir is often mode 0700 somewhere up the path)
        as_postgres = ["runuser", "-u", "postgres", "--"]
        pgroot = Path(tempfile.mkdtemp(prefix="baton-pg-"))
        extra.append(pgroot)
        shutil.chown(pgroot, "postgres", "postgres")
        pgroot.chmod(0o755)
    datadir = pgroot / "pgdata"
    sockdir = pgroot / "pgsock"
    if not datadir.exists():
        sockdir.mkdir(exist_ok=True)
        if as_postgres:
            shutil.chown(sockdir, "postgres", "postgres")
        done = subprocess.run([*as_postgres, initdb, "-D", str(datadir), "-A", "trust", "-U", "postgres",
                               "--no-sync", "-E", "UTF8"], capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
    argv = [postgres, "-D", str(datadir), "-p", str(port), "-k", str(sockdir),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=300"]
    server = Server("postgres", port, workdir, argv, _pg_ready(port, pg_isready), stop_signal=signal.SIGINT,
                    user="postgres" if as_postgres else None)
    return Cluster("postgres", f"postgresql://postgres@127.0.0.1:{port}/postgres", [server], workdir,
                   extra_dirs=extra)


def _etcd_ready(port: int) -> Callable[[], bool]:
    import urllib.request

    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False
    return check


def etcd_cluster(workdir: Path, members: int = 1) -> Cluster:
    binary = find_binary("etcd")
    ports = [(free_port(), free_port()) for _ in range(members)]
    initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    token = f"baton-{os.getpid()}-{ports[0][0]}"
    servers = []
    for i, (client, peer) in enumerate(ports):
        argv = [binary, "--name", f"m{i}", "--data-dir", str(workdir / f"etcd-m{i}"),
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--unsafe-no-fsync", "--logger", "zap", "--log-level", "warn"]
        servers.append(Server("etcd", client, workdir, argv, _etcd_ready(client), peer_port=peer))
    endpoints = ",".join(f"127.0.0.1:{c}" for c, _ in ports)
    return Cluster("etcd", f"etcd://{endpoints}", servers, workdir)


def container_cluster(kind: str, workdir: Path) -> Cluster:
    """One server of ``kind`` as a container, for machines with a Docker engine and no local binaries."""
    port = free_port()
    if kind == "redis":
        server = ContainerServer(kind, port, workdir, [], _redis_ready(port), image="redis:7",
                                 container_port=6379, command="redis-server --appendonly yes --appendfsync always")
        return Cluster(kind, f"redis://127.0.0.1:{port}/0", [server], workdir)
    if kind == "postgres":
        server = ContainerServer(kind, port, workdir, [], _pg_ready(port, None), image="postgres:15",
                                 container_port=5432, command="postgres -c max_connections=300",
                                 env={"POSTGRES_HOST_AUTH_METHOD": "trust"})
        return Cluster(kind, f"postgresql://postgres@127.0.0.1:{port}/postgres", [server], workdir)
    server = ContainerServer(kind, port, workdir, [], _etcd_ready(port), image="quay.io/coreos/etcd:v3.5.17",
                             container_port=2379,
                             command=("etcd --listen-client-urls http://0.0.0.0:2379 "
                                      f"--advertise-client-urls http://127.0.0.1:{port}"))
    return Cluster(kind, f"etcd://127.0.0.1:{port}", [server], workdir)


def start_backend(kind: str, workdir: Path | None = None, etcd_members: int = 1) -> Cluster:
    """Start a backend server of ``kind`` (one of ``lock_backends.registry.SERVERS``) and wait until it answers.

    Containers (testcontainers) when a Docker engine answers, local binaries otherwise; set
    ``BATON_USE_DOCKER=0`` to insist on local binaries. A multi-member etcd always uses binaries.
    """
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"baton-{kind}-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if kind not in SERVERS:
        raise ServerError(f"unknown backend server {kind!r}; expected one of {', '.join(SERVERS)}")
    if etcd_members == 1 and docker_available():
        cluster = container_cluster(kind, workdir)
    elif kind == "redis":
        cluster = redis_cluster(workdir)
    elif kind == "postgres":
        cluster = postgres_cluster(workdir)
    else:
        cluster = etcd_cluster(workdir, etcd_members)
    cluster.own_workdir = own
    cluster.start()
    return cluster
