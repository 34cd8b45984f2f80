"""A local Baton cluster: a backend server, N node subprocesses, optional per-node proxies.

The harness, the node integration tests and ``python -m loadtest up`` all
drive nodes through this module, so "kill the leader" means the same thing
everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.proxy import ProxyHub
from loadtest.servers import Cluster, ServerError, free_port, owned_popen, port_open, start_backend
from lock_backends.registry import BY_NAME, SHARED
from node.probes import effective_shapes, spec_text

#: The backends a cluster of node processes can run on (every one but the in-process reference).
BACKENDS = SHARED
#: One client for every poll of the nodes: ``httpx.get`` builds a client (an SSL context included) per call,
#: CPU under the GIL that delays whatever else the harness does at that moment (an aimed fault).
HTTP = httpx.Client(timeout=2.0)


@dataclass
class Timing:
    """Lease timing for a cluster. Tests use short values; ttl > renew_deadline > retry_period."""

    ttl: float = 2.0
    renew_deadline: float = 1.4
    retry_period: float = 0.4
    op_timeout: float = 0.5
    misfire_grace: float = 30.0

    @classmethod
    def for_ttl(cls, ttl: float, misfire_grace: float = 30.0) -> Timing:
        return cls(ttl=ttl, renew_deadline=ttl * 0.7, retry_period=ttl * 0.2,
                   op_timeout=min(1.0, ttl * 0.25), misfire_grace=misfire_grace)


@dataclass
class NodeProc:
    index: int
    node_id: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive:
            return
        if port_open(self.port):
            raise ServerError(f"port {self.port} for {self.node_id} is already in use")
        with open(self.log_path, "ab") as log:
            # owned: dies with this process (see owned_popen), from whichever thread restarts it
            self.proc = owned_popen([sys.executable, "-m", "node"], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.paused = False

    def wait_healthy(self, timeout: float = 30.0, path: str = "/healthz") -> None:
        """Until ``path`` answers below 500 (``/status`` for a node that is up but may not lead: a skewed one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise ServerError(f"{self.node_id} exited with {self.proc and self.proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if HTTP.get(f"{self.url}{path}", timeout=0.5).status_code < 500:
                    return
            time.sleep(0.05)
        raise ServerError(f"{self.node_id} not healthy within {timeout}s")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGSTOP:
                self.paused = True
            elif sig == signal.SIGCONT:
                self.paused = False

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        if not self.alive or self.paused:
            return None
        try:
            response = HTTP.get(f"{self.url}/status", timeout=timeout)
            return dict(response.json()) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def metrics(self, timeout: float = 2.0) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=timeout).text


@dataclass
class LocalCluster:
    workdir: Path
    backend: str = "file"
    nodes: int = 3
    timing: Timing = field(default_factory=Timing)
    lock_url: str | None = None
    probe_jobs: int = 0
    probe_interval: float = 1.0
    #: Probe shapes (``node.probes``); empty: ``probe_jobs`` basic probes every ``probe_interval``.
    probe_shapes: str = ""
    probe_url: str = ""
    claims: bool = True
    base_port: int | None = None
    admin_token: str = "test-admin-token"
    extra_env: dict[str, str] = field(default_factory=dict)
    etcd_members: int = 1
    #: Put a fault proxy between each node and the backend (partition and latency faults).
    proxies: bool = True
    server: Cluster | None = None
    hub: ProxyHub | None = None
    members: list[NodeProc] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ServerError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start_backend()
            if self.proxies and BY_NAME[self.backend].server:  # a proxy sits on a network connection
                self.hub = ProxyHub()
            base = self.base_port
            ports = [base + i if base else free_port() for i in range(self.nodes)]
            # every node vouches for the others (BATON_PEERS), so a follower forwards admin calls to the leader
            peers = ",".join(f"http://127.0.0.1:{port}" for port in ports)
            for i, port in enumerate(ports):
                env = {"BATON_PEERS": peers, **self._env(i, port)}
                node = NodeProc(i, f"node-{i + 1}", port, env, self.workdir / f"node-{i + 1}.log")
                self.members.append(node)
                node.start()
            for node in self.members:
                node.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _start_backend(self) -> None:
        if self.lock_url:
            return
        if self.backend == "file":
            self.lock_url = f"file://{self.workdir / 'locks'}"
            return
        self.server = start_backend(self.backend, self.workdir / self.backend, etcd_members=self.etcd_members)
        self.lock_url = self.server.url

    def node_lock_url(self, index: int) -> str:
        """The lock URL node ``index`` uses: through its own proxies when there are any."""
        assert self.lock_url is not None
        url = self.lock_url
        if self.hub is not None:
            url = self._through_proxies(url, f"node-{index + 1}")
        if "timeout=" in url:
            return url
        return f"{url}{'&' if '?' in url else '?'}timeout={self.timing.op_timeout}"

    def _through_proxies(self, url: str, node_id: str) -> str:
        assert self.hub is not None
        scheme, rest = url.split("://", 1)
        netloc, slash, tail = rest.partition("/")
        if "?" in netloc:  # etcd://h:p?x=y has no path
            netloc, _, query = netloc.partition("?")
            tail, slash = f"?{query}", ""
        userinfo, at, hosts = netloc.rpartition("@")
        proxied = []
        for endpoint in hosts.split(","):
            host, _, port = endpoint.rpartition(":")
            link = self.hub.add(node_id, host or "127.0.0.1", int(port))
            proxied.append(f"127.0.0.1:{link.port}")
        return f"{scheme}://{userinfo}{at}{','.join(proxied)}{slash}{tail}"

    def _env(self, index: int, port: int) -> dict[str, str]:
        t = self.timing
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
        env.update({
            "BATON_NODE_ID": f"node-{index + 1}", "BATON_HOST": "127.0.0.1", "BATON_PORT": str(port),
            "BATON_LOCK_URL": self.node_lock_url(index), "BATON_LEASE_TTL": str(t.ttl),
            "BATON_RENEW_DEADLINE": str(t.renew_deadline), "BATON_RETRY_PERIOD": str(t.retry_period),
            "BATON_MISFIRE_GRACE": str(t.misfire_grace), "BATON_ADMIN_TOKEN": self.admin_token,
            "BATON_PROBE_JOBS": str(self.probe_jobs or int(bool(self.probe_shapes))),
            "BATON_PROBE_INTERVAL": str(self.probe_interval), "BATON_PROBE_SHAPES": self.probe_spec(),
            "BATON_PROBE_URL": self.probe_url, "BATON_CLAIMS": "on" if self.claims else "off",
            "BATON_DEMO_JOBS": "false", "BATON_LOG_FORMAT": "json",
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        })
        env.update(self.extra_env)
        return env

    def probe_spec(self) -> str:
        """The probe spec with every count and interval explicit ("" without shapes: the basic probes)."""
        if not self.probe_shapes:
            return ""
        return spec_text(effective_shapes(self.probe_shapes, self.probe_jobs or 1, self.probe_interval))

    def stop(self) -> None:
        for node in self.members:
            with contextlib.suppress(Exception):
                node.kill()
        if self.hub is not None:
            self.hub.close()
            self.hub = None
        if self.server is not None:
            self.server.stop()

    def close(self) -> None:
        self.stop()
        if self.server is not None:
            self.server.close()

    # -- observing ------------------------------------------------------------------------

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {n.node_id: n.status() for n in self.members}

    def leaders(self) -> list[NodeProc]:
        return [n for n in self.members if (s := n.status()) and s.get("role") == "leader"]

    def leader(self) -> NodeProc | None:
        found = self.leaders()
        return found[0] if len(found) == 1 else None

    def wait_for_leader(self, timeout: float = 30.0, exclude: NodeProc | None = None) -> NodeProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None and leader is not exclude:
                return leader
            time.sleep(0.02)
        raise ServerError(f"no single leader within {timeout}s: {self.statuses()}")

    def node(self, node_id: str) -> NodeProc:
        for n in self.members:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def describe(self) -> dict[str, Any]:
        """What the chaos and check commands need to find this cluster again."""
        return {
            "backend": self.backend, "lock_url": self.lock_url, "workdir": str(self.workdir),
            "timing": vars(self.timing), "probe_jobs": self.probe_jobs, "probe_interval": self.probe_interval,
            "probe_shapes": self.probe_spec(),
            "probe_url": self.probe_url, "claims": self.claims, "admin_token": self.admin_token,
            "nodes": [{"node_id": n.node_id, "port": n.port, "url": n.url, "pid": n.pid,
                       "log": str(n.log_path)} for n in self.members],
            "server": None if self.server is None else {
                "kind": self.server.kind, "url": self.server.url,
                "members": [{"port": m.port, "pid": m.proc.pid if m.proc else None, "argv": m.argv}
                            for m in self.server.members]},
        }

    def write_state(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.describe(), **(extra or {})}, indent=2))
        os.replace(tmp, path)
