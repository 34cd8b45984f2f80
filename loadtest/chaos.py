"""Faults against a local cluster, each logged with timestamps to a JSONL chaos log.

The vocabulary is shared with ``deploy/chaos.sh`` so the two tell one story:

* ``kill``: SIGKILL the leader, then start it again (the cluster keeps its size).
* ``pause``: SIGSTOP the leader for longer than the TTL, then SIGCONT.
* ``term``: SIGTERM the leader (graceful handoff), then start it again.
* ``step-down``: ``POST /admin/leader/step-down`` on the leader, with the cluster's admin token: a
  graceful handoff through the API; the node stays up.
* ``restart-backend``: stop and start the lock server (for an etcd cluster, one member).
* ``partition``: cut one node (the leader by default) off from the backend, then heal.
* ``latency``: add delay on one node's path to the backend, then remove it.
* ``skew``: restart one node (a follower by default) under a shifted wall clock (libfaketime, from
  Debian's ``faketime`` package; its monotonic clock stays real, so its lease timing is unaffected),
  step the leadership down until that node leads (a guarded node refuses to), hold, then restart it
  with the real clock.
* ``random``: a seeded mix of the above that apply to the backend (not ``skew``).

Aiming (``Aim``, ``--aim before-fire:SECONDS[:SHAPE]``): a fault can be fired a chosen time before a
fire time of the probe schedule, the worst moment for a handoff (the leader has claimed that fire time
ahead and not started it). Fire times are ``EPOCH + k * interval`` (``node.jobs.INTERVAL_EPOCH``), so
they are known here without asking the nodes. SECONDS may be a range ``LOW..HIGH``, drawn per fault from
the seeded generator. The aimed fault's start entry carries ``aim``, ``aimed_shape``, the targeted
``fire_time`` and ``before_s`` (the planned lead); its end entry the lead it really had (``before_s``) and
how late it went off (``aim_late_s``). On a loaded machine an aim that cannot be kept is moved to the next
fire time rather than fired late.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from loadtest.cluster import HTTP, LocalCluster, NodeProc
from loadtest.servers import ServerError
from node.probes import ProbeShape, ProbeSpecError, effective_shapes

FAULTS = ("kill", "pause", "term", "step-down", "restart-backend", "partition", "latency", "skew")
#: What ``random`` picks from: ``skew`` needs faketime and puts a node's clock wrong on purpose.
RANDOM_FAULTS = tuple(f for f in FAULTS if f != "skew")
#: An aimed fault is planned at least this long ahead; the leader is looked up again this long before the
#: planned instant, so that the lookup does not delay the fault.
AIM_PREP = 1.0
#: An aim whose preparation overran, or whose sleep overshot by more than this share of its lead, is moved
#: to the next fire time (at most ``AIM_TRIES`` times; then the fault goes off late, and the log says so).
AIM_SLIP = 0.3
AIM_TRIES = 4
#: Where Debian's faketime package puts the preload library (the multi-threaded variant first).
FAKETIME_LIBS = ("/usr/lib/*/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1",
                 "/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1")


class ChaosError(RuntimeError):
    """A fault cannot be applied to this cluster (the message says why)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class ChaosLog:
    """Append-only JSONL, flushed and fsynced per event, so a crash keeps what happened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, sync: bool = True, **event: Any) -> dict[str, Any]:
        """Append ``event``; ``sync=False`` leaves the fsync to the next synced write (or :meth:`sync`), for an
        entry written right before an aimed fault, which an fsync would delay."""
        event = {"ts": now_iso(), **event}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            if sync:
                os.fsync(f.fileno())
        return event

    def sync(self) -> None:
        with open(self.path, "a") as f:
            os.fsync(f.fileno())


@dataclass
class FaultResult:
    fault: str
    target: str
    started_at: str
    ended_at: str = ""
    new_leader: str | None = None
    failover_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Aim:
    """When to fire a fault: ``low``..``high`` seconds before a fire time of ``shape`` (None: the sparsest)."""

    low: float
    high: float
    shape: str | None = None

    @classmethod
    def parse(cls, text: str) -> Aim:
        """``before-fire:SECONDS[:SHAPE]``, SECONDS a number or a range ``LOW..HIGH``."""
        kind, _, rest = text.strip().partition(":")
        seconds, _, shape = rest.partition(":")
        if kind != "before-fire" or not seconds:
            raise ChaosError(f"--aim {text!r}: expected before-fire:SECONDS[:SHAPE], e.g. before-fire:0.08 or "
                             "before-fire:0.01..0.1:sparse")
        low_text, _, high_text = seconds.partition("..")
        try:
            low = float(low_text)
            high = float(high_text) if high_text else low
        except ValueError:
            raise ChaosError(f"--aim {text!r}: {seconds!r} is not SECONDS or LOW..HIGH") from None
        if not 0 <= low <= high:
            raise ChaosError(f"--aim {text!r}: need 0 <= LOW <= HIGH")
        return cls(low, high, shape or None)

    def text(self) -> str:
        seconds = f"{self.low:g}" if self.low == self.high else f"{self.low:g}..{self.high:g}"
        return f"before-fire:{seconds}" + (f":{self.shape}" if self.shape else "")


def parse_skew(text: str) -> float:
    """``+30s``, ``-30s``, ``-1.5m``, ``+2h`` or plain seconds, as signed seconds."""
    value = text.strip()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(value[-1:])
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ChaosError(f"--skew {text!r}: expected signed seconds such as +30s, -30s or -2m") from None
    if seconds == 0:
        raise ChaosError("--skew must not be 0")
    return seconds


def faketime_library() -> str:
    for pattern in FAKETIME_LIBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise ChaosError("the skew fault needs libfaketime: apt-get install -y faketime")


def applicable(fault: str, cluster: LocalCluster) -> bool:
    if fault in ("restart-backend", "partition", "latency"):
        return cluster.backend != "file" and (fault == "restart-backend" or cluster.hub is not None)
    return fault in FAULTS


class Chaos:
    def __init__(self, cluster: LocalCluster, log: ChaosLog, *, seed: int = 0, hold: float | None = None,
                 latency: float | None = None, skew: float = 30.0) -> None:
        self.cluster = cluster
        self.log = log
        self.rng = random.Random(seed)
        ttl = cluster.timing.ttl
        #: How long pause, partition and skew last: longer than the TTL, so the lease is really lost.
        self.hold = hold if hold is not None else ttl * 1.5 + 0.5
        self.latency = latency if latency is not None else ttl * 0.2
        #: Seconds the skew fault shifts a node's wall clock by.
        self.skew = skew

    def run(self, fault: str, target: str | None = None, aim: Aim | None = None) -> FaultResult:
        if fault == "random":
            choices = [f for f in RANDOM_FAULTS if applicable(f, self.cluster)]
            fault = self.rng.choice(choices)
        if fault not in FAULTS:
            raise ChaosError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)} or random")
        if not applicable(fault, self.cluster):
            raise ChaosError(f"fault {fault!r} does not apply to the {self.cluster.backend} backend")
        if fault == "skew":
            faketime_library()  # before anything is stopped
        node = self._target(fault, target)
        name = node.node_id if node else "backend"
        extra: dict[str, Any] = {"skew_s": self.skew} if fault == "skew" else {}
        planned = None
        if aim is not None:
            node, planned, plan = self._aim(aim, fault, target)
            name = node.node_id if node else "backend"
            extra.update(plan)
        # an aimed fault's entry is fsynced right after the fault, not before: the fsync would delay it
        entry = self.log.write(sync=planned is None, fault=fault, target=name, phase="start", **extra)
        result = FaultResult(fault, name, entry["ts"])
        if planned is not None:
            fire_time = datetime.fromisoformat(extra["fire_time"])
            entry_ts = datetime.fromisoformat(entry["ts"])
            result.details.update(fire_time=extra["fire_time"], before_s=round((fire_time - entry_ts)
                                                                                .total_seconds(), 4),
                                  aim_late_s=round((entry_ts - planned).total_seconds(), 4))
        method = getattr(self, "_" + fault.replace("-", "_"))
        t0 = time.monotonic()
        try:
            method(node, result)
        finally:
            self.log.sync()
        if result.failover_s is None and result.new_leader is None:
            leader = self.cluster.wait_for_leader(timeout=60)
            result.new_leader = leader.node_id
        result.ended_at = now_iso()
        self.log.write(fault=fault, target=name, phase="end", new_leader=result.new_leader,
                       failover_s=result.failover_s, took_s=round(time.monotonic() - t0, 3), **result.details)
        return result

    # -- aiming ---------------------------------------------------------------------------

    def shapes(self) -> list[ProbeShape]:
        c = self.cluster
        try:
            return effective_shapes(c.probe_spec(), c.probe_jobs, c.probe_interval)
        except ProbeSpecError as exc:
            raise ChaosError(f"the cluster's probe shapes: {exc}") from None

    def _aim(self, aim: Aim, fault: str, target: str | None) -> tuple[NodeProc | None, datetime, dict[str, Any]]:
        """Wait for the aimed instant; the target (looked up again just before) and the plan to log."""
        for attempt in range(AIM_TRIES):
            planned, plan = self._plan(aim)
            self._sleep_until(planned - timedelta(seconds=AIM_PREP))
            node = self._target(fault, target)  # the leadership may have moved while we waited
            slip = plan["before_s"] * AIM_SLIP
            if (planned - datetime.now(UTC)).total_seconds() < AIM_PREP / 4 and attempt + 1 < AIM_TRIES:
                continue  # the lookup overran (a loaded machine): aim at the next fire time
            self._sleep_until(planned)
            if (datetime.now(UTC) - planned).total_seconds() <= slip or attempt + 1 == AIM_TRIES:
                return node, planned, {**plan, "aim_tries": attempt + 1}
        raise AssertionError("unreachable")

    def _plan(self, aim: Aim) -> tuple[datetime, dict[str, Any]]:
        """The instant to fire at, and what to log about it: ``before`` s ahead of the next reachable fire time."""
        shapes = self.shapes()
        if not shapes:
            raise ChaosError("--aim needs probe jobs to aim at; the cluster has none")
        shape: ProbeShape | None
        if aim.shape is None:
            shape = max(shapes, key=lambda s: s.interval)
        else:
            shape = next((s for s in shapes if s.shape == aim.shape), None)
            if shape is None:
                raise ChaosError(f"--aim: the cluster has no {aim.shape!r} probes; it has "
                                 f"{', '.join(s.shape for s in shapes)}")
        before = aim.low if aim.low == aim.high else self.rng.uniform(aim.low, aim.high)
        fire = shape.next_fire_time(datetime.now(UTC) + timedelta(seconds=before + AIM_PREP * 1.2))
        return fire - timedelta(seconds=before), {"aim": aim.text(), "aimed_shape": shape.shape,
                                                  "fire_time": fire.isoformat(), "before_s": round(before, 4)}

    @staticmethod
    def _sleep_until(when: datetime) -> None:
        """Sleep until the wall clock reads ``when``, to a millisecond or so."""
        while True:
            left = (when - datetime.now(UTC)).total_seconds()
            if left <= 0:
                return
            time.sleep(left - 0.002 if left > 0.004 else left / 2)

    # -- targets ----------------------------------------------------------------------------

    def _target(self, fault: str, target: str | None) -> NodeProc | None:
        if fault == "restart-backend":
            return None
        if target is None and fault == "skew":  # a follower: the leadership then moves to it on purpose
            leader = self.cluster.wait_for_leader(timeout=60)
            return next(n for n in self.cluster.members if n is not leader)
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

    # -- faults ------------------------------------------------------------------------------

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

    def _step_down(self, node: NodeProc | None, result: FaultResult) -> None:
        assert node is not None
        result.details["answer"] = self.step_down(node)
        self._wait_new_leader(node, result)

    def step_down(self, node: NodeProc) -> dict[str, Any]:
        """``POST /admin/leader/step-down`` on ``node`` with the admin token; a follower forwards it to the leader."""
        url = f"{node.url}/admin/leader/step-down"
        headers = {"Authorization": f"Bearer {self.cluster.admin_token}"}
        try:
            response = HTTP.post(url, headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            raise ChaosError(f"step-down on {node.node_id}: {exc}") from None
        if response.status_code != 200:
            raise ChaosError(f"step-down on {node.node_id}: HTTP {response.status_code} {response.text[:200]}")
        return dict(response.json())

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
            self._sleep_rest(self.hold, since=result.started_at)
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
            self._sleep_rest(self.hold, since=result.started_at)
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

    def _skew(self, node: NodeProc | None, result: FaultResult) -> None:
        assert node is not None
        lib = faketime_library()
        self._restart(node, result, env={"LD_PRELOAD": lib, "FAKETIME": f"{self.skew:+g}s",
                                         # the lease deadlines are monotonic: they must stay on the real clock
                                         "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        t0 = time.monotonic()
        led = self._lead_with(node)
        result.details.update(skew_s=self.skew, skewed_led=led, held_s=self.hold)
        if led:
            result.details["led_after_s"] = round(time.monotonic() - t0, 3)
            time.sleep(self.hold)
        self._restart(node, result, env={})  # the real clock again

    def _restart(self, node: NodeProc, result: FaultResult, env: dict[str, str]) -> None:
        """SIGTERM ``node`` (waiting for a new leader if it led), start it with ``env`` added, wait until healthy."""
        status = node.status()
        led = bool(status and status.get("role") == "leader")
        node.signal(signal.SIGTERM)
        if led:
            self._wait_new_leader(node, result)
        if node.proc is not None:
            node.proc.wait(timeout=30)
        saved = dict(node.env)
        node.env.update(env)
        try:
            node.start()
        finally:
            node.env = saved
        node.wait_healthy(path="/status")  # a skewed node is up, and unhealthy on purpose: it must not lead

    def _lead_with(self, node: NodeProc) -> bool:
        """Step the leadership down until ``node`` leads; False if it still does not after a few handoffs."""
        ttl = self.cluster.timing.ttl
        for _ in range(2 * len(self.cluster.members)):
            leader = self.cluster.wait_for_leader(timeout=ttl * 5)
            if leader is node:
                return True
            try:
                self.step_down(leader)
                self.cluster.wait_for_leader(timeout=ttl * 5, exclude=leader)
            except (ChaosError, ServerError):
                continue
        return self.cluster.leader() is node

    @staticmethod
    def _sleep_rest(seconds: float, since: str) -> None:
        elapsed = (datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds()
        if seconds > elapsed:
            time.sleep(seconds - elapsed)


def run_rounds(chaos: Chaos, faults: list[str], rounds: int, interval: float, target: str | None = None,
               on_result: Any = None, aim: Aim | None = None,
               aimed: tuple[str, ...] | None = None) -> list[FaultResult]:
    """``rounds`` rounds; each round applies every fault in ``faults`` once, with ``interval`` between.

    ``aim`` applies to the faults in ``aimed`` (all of them when None).
    """
    results = []
    for _ in range(rounds):
        for fault in faults:
            result = chaos.run(fault, target, aim if aimed is None or fault in aimed else None)
            results.append(result)
            if on_result is not None:
                on_result(result)
            time.sleep(interval)
    return results


def result_dict(result: FaultResult) -> dict[str, Any]:
    return asdict(result)
