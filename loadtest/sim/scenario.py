"""A run's shape (timing, jobs, clocks) and its fault schedule, both drawn from the seed, and plain data.

A schedule is a list of ``Fault``: what happens, when (virtual seconds from
the run's start), to whom. ``target`` is ``"leader"`` (whichever process
believes it leads at that instant, resolved then), a host name (``n0``,
``n1``, ...), or empty for the store. Schedules and configurations convert to
and from JSON, so a hand-built schedule (``loadtest/sim/holes.json``) replays
on any node core that the cluster module can assemble.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from node.handoff import BUSY_SLACK

KINDS = ("pause", "kill", "term", "step_down", "clock_step", "outage", "restart", "cut", "op", "run_now")
#: Faults of the store itself (no target): down for a while; a restart also ends every lease.
STORE_KINDS = ("outage", "restart")

#: Relative weights of fault kinds in a random schedule.
KIND_WEIGHTS = {"pause": 3, "kill": 2, "term": 3, "step_down": 3, "clock_step": 1, "outage": 1, "restart": 1,
                "cut": 1, "op": 6, "run_now": 1}
#: Relative weights of operations for operation faults; a name not listed weighs ``OP_DEFAULT_WEIGHT``.
OP_WEIGHTS = {"claim_window": 5, "hand_back": 3, "claim": 2, "renew": 3, "acquire": 2, "record_many": 3,
              "unfinished": 2, "release": 1, "settings": 1, "leader": 1, "server_time": 1,
              "claim_many": 0, "runs": 0, "set_setting": 0}
OP_DEFAULT_WEIGHT = 2
EFFECT_WEIGHTS = {"delay-request": 2, "delay-response": 2, "fail-before": 2, "fail-after": 3, "raise": 2}
#: Share of a random schedule's SIGTERMs that the orchestrator follows with a SIGKILL while the node is still
#: stopping (its own grace shorter than the node's, as a rolling deploy's can be), and the range of that delay:
#: from the middle of the hand-back to well into a long body's run.
KILL_IN_GRACE_SHARE = 0.4
KILL_IN_GRACE_DELAY = (0.05, 3.0)
#: Leadership a recovery may take after it is owed (its first window, a flush, the listing, the look again after a
#: busy entry's expiry), beside twice the job's body (a run of it going holds the recovery back).
RECOVERY_ALLOWANCE = 2.0


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    target: str = "leader"
    #: pause, outage, restart, cut: how long; kill, term: how long until the host's process is started again
    duration: float = 0.0
    #: term: seconds until the orchestrator's SIGKILL if the process is still up (0: its grace outlasts the node's)
    kill_after: float = 0.0
    #: clock_step: seconds added to the target's wall clock
    delta: float = 0.0
    #: op: the operation's method name and what happens to its next call
    op: str = ""
    effect: str = ""
    #: run_now: the job
    job: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "kind": self.kind}
        for f in fields(self)[2:]:
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault field(s) {', '.join(sorted(unknown))}")
        if data.get("kind") not in KINDS:
            raise ValueError(f"unknown fault kind {data.get('kind')!r}; expected one of {', '.join(KINDS)}")
        return cls(**data)

    def describe(self) -> str:
        who = self.target or "store"
        if self.kind in ("pause", *STORE_KINDS, "cut"):
            return f"{self.kind} {who} for {self.duration:.3f}s"
        if self.kind == "term" and self.kill_after:
            return (f"term {who}, SIGKILL after {self.kill_after:.3f}s if still up, "
                    f"restart after {self.duration:.3f}s")
        if self.kind in ("kill", "term"):
            return f"{self.kind} {who}, restart after {self.duration:.3f}s"
        if self.kind == "clock_step":
            return f"clock_step {who} by {self.delta:+.3f}s"
        if self.kind == "op":
            extra = f" {self.duration:.3f}s" if self.effect.startswith("delay") else ""
            return f"op {self.op} of {who}: {self.effect}{extra}"
        if self.kind == "run_now":
            return f"run_now {self.job} on {who}"
        return f"{self.kind} {who}"


@dataclass(frozen=True)
class JobShape:
    id: str
    period_ms: int
    body_s: float
    recover: bool = False
    max_instances: int = 1


@dataclass(frozen=True)
class HostShape:
    name: str
    #: wall clock error at t=0, seconds
    offset: float = 0.0
    #: oscillator rate against true time
    rate: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    seed: int
    jobs: tuple[JobShape, ...]
    hosts: tuple[HostShape, ...]
    ttl: float = 2.0
    renew_deadline: float = 1.4
    retry_period: float = 0.4
    op_timeout: float = 0.5
    claim_ahead: float = 0.25
    misfire_grace: float = 10.0
    latency: tuple[float, float] = (0.0005, 0.003)
    #: faults are drawn in [fault_start, fault_start + fault_span]
    fault_start: float = 1.0
    fault_span: float = 7.0
    #: quiet time after the last fault's effects ended, before the run stops
    tail: float = 3.0
    #: an interval of process time after which a fire time that has neither run nor returned waits "forever"
    wait_bound: float = 5.0
    #: BATON_SHUTDOWN_GRACE: longer than every body a random run draws (1.3 x 8 s), so no body is ever cut
    shutdown_grace: float = 12.0
    #: BATON_MAX_CLOCK_SKEW
    max_clock_skew: float = 1.0
    faults_min: int = 2
    faults_max: int = 4

    @classmethod
    def from_seed(cls, seed: int, **overrides: Any) -> RunConfig:
        rng = random.Random(f"baton-sim-config-{seed}")
        fast = JobShape("fast", rng.choice([250, 300, 400, 500]), rng.choice([0.0, 0.01, 0.05]),
                        recover=rng.random() < 0.3)
        mid = JobShape("mid", rng.choice([1000, 1500, 2000]), round(rng.uniform(0.1, 1.2), 3),
                       recover=rng.random() < 0.5, max_instances=rng.choice([1, 1, 2]))
        long_period = rng.choice([3000, 4000, 6000, 8000])
        long = JobShape("long", long_period, round(long_period / 1000 * rng.uniform(0.5, 1.3), 3),
                        recover=rng.random() < 0.5)
        hosts = tuple(HostShape(f"n{i}", round(rng.uniform(-0.02, 0.02), 6), round(1 + rng.uniform(-0.005, 0.005), 6))
                      for i in range(3))
        config = cls(seed=seed, jobs=(fast, mid, long), hosts=hosts)
        return replace(config, **overrides) if overrides else config

    def job(self, job_id: str) -> JobShape:
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise KeyError(job_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(sorted(unknown))}")
        if "jobs" in data:
            data["jobs"] = tuple(JobShape(**j) for j in data["jobs"])
        if "hosts" in data:
            data["hosts"] = tuple(HostShape(**h) for h in data["hosts"])
        if "latency" in data:
            data["latency"] = tuple(data["latency"])
        base = cls.from_seed(int(data.get("seed", 0)))
        return replace(base, **data)


@dataclass
class Scenario:
    """A config and its schedule: everything a run needs besides the node core."""

    config: RunConfig
    faults: list[Fault] = field(default_factory=list)
    name: str = ""
    #: the command that replays it ("" when it must be saved first, as a shrunk schedule)
    replay: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(), "faults": [f.to_dict() for f in self.faults]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        return cls(RunConfig.from_dict(data.get("config", {})),
                   sorted((Fault.from_dict(f) for f in data.get("faults", [])), key=lambda f: f.at),
                   str(data.get("name", "")))

    def end_of_faults(self) -> float:
        """When the last fault's own effects are over (a pause resumed, a killed host restarted).

        A SIGTERM that a SIGKILL follows can leave runs handed over as still
        going that no record will end: their busy entries expire after the
        shutdown grace and its slack, and only then are they owed again. The
        run lasts until a recovery of the longest recoverable job could be
        seen, so ``recovered`` checks them rather than excusing them.
        """
        config = self.config
        recover_body = max((j.body_s for j in config.jobs if j.recover), default=0.0)
        owed = config.shutdown_grace + BUSY_SLACK + RECOVERY_ALLOWANCE + 2 * recover_body + 1.0
        end = config.fault_start
        for f in self.faults:
            end = max(end, f.at + f.duration + (0.5 if f.kind == "term" else 0.0))
            if f.kind == "term" and f.kill_after:
                end = max(end, f.at + f.kill_after + f.duration, f.at + owed)
        return end

    def duration(self) -> float:
        return self.end_of_faults() + self.config.tail


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    names = [n for n, w in weights.items() if w > 0]
    return rng.choices(names, [weights[n] for n in names])[0]


def random_faults(config: RunConfig, ops: list[str]) -> list[Fault]:
    """The seed's fault schedule. ``ops`` are the backend's round-trip operations (protocol-dependent)."""
    rng = random.Random(f"baton-sim-faults-{config.seed}")
    hosts = [h.name for h in config.hosts]
    op_weights = {op: OP_WEIGHTS.get(op, OP_DEFAULT_WEIGHT) for op in ops}
    faults = []
    for _ in range(rng.randint(config.faults_min, config.faults_max)):
        at = round(config.fault_start + rng.uniform(0, config.fault_span), 4)
        kind = _weighted(rng, KIND_WEIGHTS)
        target = "leader" if rng.random() < 0.75 else rng.choice(hosts)
        if kind == "pause":
            duration = rng.uniform(0.05, 0.8) if rng.random() < 0.5 else rng.uniform(2.5, 5.0)
            faults.append(Fault(at, kind, target, duration=round(duration, 4)))
        elif kind in ("kill", "term"):
            faults.append(Fault(at, kind, target, duration=round(rng.uniform(0.5, 3.0), 4)))
        elif kind == "step_down":
            faults.append(Fault(at, kind, target))
        elif kind == "clock_step":
            delta = rng.uniform(0.05, 1.5) * rng.choice([-1, 1])
            faults.append(Fault(at, kind, target, delta=round(delta, 4)))
        elif kind in STORE_KINDS:
            faults.append(Fault(at, kind, "", duration=round(rng.uniform(0.2, 3.0), 4)))
        elif kind == "cut":
            faults.append(Fault(at, kind, target, duration=round(rng.uniform(0.2, 3.0), 4)))
        elif kind == "op":
            effect = _weighted(rng, EFFECT_WEIGHTS)
            delay = round(rng.uniform(0.02, 0.9), 4) if effect.startswith("delay") else 0.0
            faults.append(Fault(at, kind, target, duration=delay, op=_weighted(rng, op_weights), effect=effect))
        elif kind == "run_now":
            faults.append(Fault(at, kind, "leader", job=rng.choice(config.jobs).id))
    faults.sort(key=lambda f: f.at)
    # drawn from a stream of their own: a seed's schedule is otherwise what it was before SIGKILLs were drawn
    orchestrator = random.Random(f"baton-sim-orchestrator-{config.seed}")
    for i, f in enumerate(faults):
        if f.kind == "term" and orchestrator.random() < KILL_IN_GRACE_SHARE:
            faults[i] = replace(f, kill_after=round(orchestrator.uniform(*KILL_IN_GRACE_DELAY), 4))
    return faults
