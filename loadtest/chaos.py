"""Faults against a local cluster, each logged with timestamps to a JSONL chaos log.

The vocabulary is shared with ``deploy/chaos.sh`` so the two tell one story:

* ``kill``: SIGKILL the leader, then start it again (the cluster keeps its size).
* ``pause``: SIGSTOP the leader for longer than the TTL, then SIGCONT.
* ``term``: SIGTERM the leader (graceful handoff), then start it again.
* ``restart-backend``: stop and start the lock server (for an etcd cluster, one member).
* ``partition``: cut one node (the leader by default) off from the backend, then heal.
* ``latency``: add delay on one node's path to the backend, then remove it.
* ``random``: a seeded mix of the above that apply to the backend.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.cluster import LocalCluster, NodeProc
from loadtest.servers import ServerError

FAULTS = ("kill", "pause", "term", "restart-backend", "partition", "latency")


class ChaosError(RuntimeError):
    """A fault cannot be applied to this cluster (the message says why)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class ChaosLog:
    """Append-only JSONL, flushed and fsynced per event, so a crash keeps what happened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **event: Any) -> dict[str, Any]:
        event = {"ts": now_iso(), **event}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return event


@dataclass
class FaultResult:
    fault: str
    target: str
    started_at: str
    ended_at: str = ""
    new_leader: str | None = None
    failover_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def applicable(fault: str, cluster: LocalCluster) -> bool:
    if fault in ("restart-backend", "partition", "latency"):
        return cluster.backend != "file" and (fault == "restart-backend" or cluster.hub is not None)
    return fault in FAULTS


class Chaos:
    def __init__(self, cluster: LocalCluster, log: ChaosLog, *, seed: int = 0, hold: float | None = None,
                 latency: float | None = None) -> None:
        self.cluster = cluster
        self.log = log
        self.rng = random.Random(seed)
        ttl = cluster.timing.ttl
        #: How long pause and partition last: longer than the TTL, so the lease is really lost.
        self.hold = hold if hold is not None else ttl * 1.5 + 0.5
        self.latency = latency if latency is not None else ttl * 0.2

    def run(self, fault: str, target: str | None = None) -> FaultResult:
        if fault == "random":
            choices = [f for f in FAULTS if applicable(f, self.cluster)]
            fault = self.rng.choice(choices)
        if fault not in FAULTS:
            raise ChaosError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)} or random")
        if not applicable(fault, self.cluster):
            raise ChaosError(f"fault {fault!r} does not apply to the {self.cluster.backend} backend")
        node = self._target(target) if fault != "restart-backend" else None
        name = node.node_id if node else "backend"
        result = FaultResult(fault, name, now_iso())
        self.log.write(fault=fault, target=name, phase="start")
        method = getattr(self, "_" + fault.replace("-", "_"))
        t0 = time.monotonic()
        method(node, result)
        if result.failover_s is None and result.new_leader is None:
            leader = self.cluster.wait_for_leader(timeout=60)
            result.new_leader = leader.node_id
        result.ended_at = now_iso()
        self.log.write(fault=fault, target=name, phase="end", new_leader=result.new_leader,
                       failover_s=result.failover_s, took_s=round(time.monotonic() - t0, 3), **result.details)
        return result

    def _target(self, target: str | None) -> NodeProc:
        if target is None or target == "leader":
            return self.cluster.wait_for_leader(timeout=60)
        try:
            return self.cluster.node(target)
        except KeyError:
            names = ", ".join(n.node_id for n in self.cluster.members)
            raise ChaosError(f"no node {target!r}; nodes are {names}") from None

    def _wait_new_leader(self, old: NodeProc, result: FaultResult, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        leader = self.cluster.wait_for_leader(timeout=timeout, exclude=old)
        result.new_leader = leader.node_id
        result.failover_s = round(time.monotonic() - t0, 3)

    def _kill(self, node: NodeProc | None, result: FaultResult) -> None:
        assert node is not None
        node.kill()
        self._wait_new_leader(node, result)
        node.start()
        node.wait_healthy()

    def _term(self, node: NodeProc | None, result: FaultResult) -> None:
        assert node is not None
        node.signal(signal.SIGTERM)
        self._wait_new_leader(node, result)
        if node.proc is not None:
            node.proc.wait(timeout=30)
        node.start()
        node.wait_healthy()

    def _pause(self, node: NodeProc | None, result: FaultResult) -> None:
        assert node is not None
        node.signal(signal.SIGSTOP)
        stalled = False
        try:
            try:
                self._wait_new_leader(node, result, timeout=self.hold + self.cluster.timing.ttl * 3)
            except ServerError:
                # Nobody could take over while the node was stopped (a backend whose lock a stopped
                # process can keep, as the file backend's mutex once did): record it, do not abort.
                stalled = True
            self._sleep_until(self.hold, since=result.started_at)
        finally:
            node.signal(signal.SIGCONT)
        result.details["held_s"] = self.hold
        if stalled:  # the leadership moves once the node runs again (or stays with it, its lease renewed)
            result.details["no_leader_while_paused"] = True
            leader = self.cluster.wait_for_leader(timeout=60)
            result.new_leader = leader.node_id
            since = datetime.fromisoformat(result.started_at)
            result.failover_s = round((datetime.now(UTC) - since).total_seconds(), 3)

    def _partition(self, node: NodeProc | None, result: FaultResult) -> None:
        assert node is not None and self.cluster.hub is not None
        self.cluster.hub.partition(node.node_id)
        try:
            self._wait_new_leader(node, result, timeout=self.hold + self.cluster.timing.ttl * 3 + 30)
            self._sleep_until(self.hold, since=result.started_at)
        finally:
            self.cluster.hub.heal(node.node_id)
        result.details["held_s"] = self.hold

    def _latency(self, node: NodeProc | None, result: FaultResult) -> None:
        assert node is not None and self.cluster.hub is not None
        self.cluster.hub.set_latency(node.node_id, self.latency)
        try:
            time.sleep(self.hold)
        finally:
            self.cluster.hub.heal(node.node_id)
        result.details.update(latency_s=self.latency, held_s=self.hold)

    def _restart_backend(self, node: NodeProc | None, result: FaultResult) -> None:
        server = self.cluster.server
        if server is None:
            raise ChaosError("the cluster uses an outside lock server (--lock-url); restart it yourself")
        member = self.rng.choice(server.members) if len(server.members) > 1 else server.members[0]
        member.stop()
        time.sleep(min(1.0, self.cluster.timing.ttl / 2))
        member.start()
        result.details["member_port"] = member.port

    @staticmethod
    def _sleep_until(seconds: float, since: str) -> None:
        elapsed = (datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds()
        if seconds > elapsed:
            time.sleep(seconds - elapsed)


def run_rounds(chaos: Chaos, faults: list[str], rounds: int, interval: float, target: str | None = None,
               on_result: Any = None) -> list[FaultResult]:
    """``rounds`` rounds; each round applies every fault in ``faults`` once, with ``interval`` between."""
    results = []
    for _ in range(rounds):
        for fault in faults:
            result = chaos.run(fault, target)
            results.append(result)
            if on_result is not None:
                on_result(result)
            time.sleep(interval)
    return results


def result_dict(result: FaultResult) -> dict[str, Any]:
    return asdict(result)
