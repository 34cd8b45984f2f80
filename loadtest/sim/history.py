"""What happened in one simulated run, as the checker reads it.

Recorded from outside the nodes' own accounting:

* runs, by the job bodies themselves: job, fire time, node, process, token,
  kind (scheduled, catch-up, recovery, manual), start, end and how it ended;
* a fenced sink the bodies write to at their start and their end: per job it
  accepts a write whose token is at least the highest it accepted before;
* fires: a fire time handed to the node's gate (``GatedScheduler.fire``) and
  when that call returned, for "no run waits forever";
* leadership beliefs: when each process set its lease and until when its local
  deadline let it believe it, in true time; the tokens the store granted;
* the claim marks the store answered (``claim_window`` and ``hand_back``, at
  the store, whether or not the answer reached the caller): which token held
  which window of fire times, and what was handed back with which busy runs;
* processes (started, paused, resumed, killed, exited), cut-offs, outages,
  clock steps, operation faults as they hit, and the faults as executed;
* warnings the node code logged (for the event table only).

Times are true virtual seconds from the run's start; fire times are whole
microseconds since the Unix epoch. Once ``freeze()`` is called nothing more is
recorded (a dead process's coroutines closed later by the garbage collector
must not write into a finished history).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

#: True time 0 of every run on the wall clock (2030-01-01T00:00:00Z); fire times show as seconds after it.
WALL0 = 1893456000.0


@dataclass
class Run:
    rid: int
    job: str
    f_us: int
    host: str
    pid: int
    token: int
    kind: str  # scheduled, catch-up, recovery, manual
    start: float
    fid: int | None
    key: str = ""  # the run's claim key (RunContext.key): what a record or a busy entry names
    end: float | None = None
    status: str = ""  # ok, cancelled; "" while running or cut by a kill
    accepted: bool = False  # the sink accepted its start write


@dataclass
class Fire:
    fid: int
    host: str
    pid: int
    job: str
    f_us: int
    kind: str
    enter: float
    exit: float | None = None
    outcome: str = ""
    rid: int | None = None


@dataclass
class Belief:
    host: str
    pid: int
    token: int
    since: float
    until: float  # the local deadline in true time, or when the lease was dropped


@dataclass
class Mark:
    """The claim mark as the store left it after a ``claim_window`` or ``hand_back`` of ``asked`` (a token)."""

    t: float
    host: str
    op: str  # claim_window, hand_back
    asked: int  # the caller's token
    token: int  # the mark's token after the operation
    since_us: int
    until_us: int
    sealed: bool
    at_us: int | None = None  # hand_back: the hand-back point asked
    busy: list[str] = field(default_factory=list)  # hand_back: keys of the runs still going
    sent: float = 0.0  # when the request left its process


@dataclass
class View:
    """A claim mark as it reached a process (the answer of its ``claim_window`` or ``hand_back``).

    ``busy``: the runs a previous leader handed over as still going, as the
    store listed them: (key, job, node, token, until_us). ``until_us``: where
    the window the process now knows it owns ends (0: the answer gave it none,
    a newer token's mark).
    """

    t: float
    host: str
    pid: int
    token: int
    busy: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    until_us: int = 0


@dataclass
class Proc:
    pid: int
    host: str
    start: float
    end: float | None = None
    how: str = ""  # killed, exited


@dataclass
class History:
    hosts: dict[str, dict[str, float]] = field(default_factory=dict)  # clock parameters at t=0
    runs: list[Run] = field(default_factory=list)
    fires: list[Fire] = field(default_factory=list)
    beliefs: list[Belief] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    grants: list[tuple[float, int, str]] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    views: list[View] = field(default_factory=list)
    pauses: list[tuple[str, int, float, float]] = field(default_factory=list)  # host, pid, from, to
    cuts: list[tuple[str, float, float]] = field(default_factory=list)  # host ("" = every host), from, to
    steps: list[tuple[str, float, float]] = field(default_factory=list)  # host, at, delta
    sink: list[tuple[float, str, int, str, int, bool]] = field(default_factory=list)  # t, job, rid, phase, token, ok
    faults: list[dict[str, Any]] = field(default_factory=list)  # as executed, with resolved targets
    notes: list[tuple[float, str, str, str]] = field(default_factory=list)  # t, host, text, job (faults, logs)
    #: calls a fault made into a node's API (a SIGTERM's stop, a step-down) that returned: t, host, pid, what,
    #: the exception it raised ("" if none)
    calls: list[tuple[float, str, int, str, str]] = field(default_factory=list)
    end: float = 0.0
    frozen: bool = False
    _open: dict[int, Belief] = field(default_factory=dict, repr=False)
    _sink_max: dict[str, int] = field(default_factory=dict, repr=False)

    # -- recording ---------------------------------------------------------------------

    def proc_start(self, t: float, host: str) -> int:
        pid = len(self.procs)
        if not self.frozen:
            self.procs.append(Proc(pid, host, t))
        return pid

    def proc_end(self, t: float, pid: int, how: str) -> None:
        if self.frozen:
            return
        proc = self.procs[pid]
        if proc.end is None:
            proc.end, proc.how = t, how
        belief = self._open.pop(pid, None)
        if belief is not None:
            belief.until = min(belief.until, t)

    def lease(self, t: float, host: str, pid: int, token: int | None, deadline: float) -> None:
        """A process set its lease (``token`` None: dropped it); ``deadline`` is its local deadline, true time."""
        if self.frozen:
            return
        open_ = self._open.get(pid)
        if open_ is not None:
            if token == open_.token and t <= open_.until:
                open_.until = deadline
                return
            open_.until = min(open_.until, t)
            del self._open[pid]
        if token is not None:
            belief = Belief(host, pid, token, t, deadline)
            self.beliefs.append(belief)
            self._open[pid] = belief

    def grant(self, t: float, token: int, host: str) -> None:
        if not self.frozen:
            self.grants.append((t, token, host))

    def window(self, t: float, host: str, op: str, asked: int, token: int, since_us: int, until_us: int,
               sealed: bool, at_us: int | None = None, busy: list[str] | None = None, sent: float = 0.0) -> None:
        if not self.frozen:
            self.marks.append(Mark(t, host, op, asked, token, since_us, until_us, sealed, at_us, busy or [], sent))

    def view(self, t: float, host: str, pid: int, token: int, busy: list[tuple[str, str, str, int, int]],
             until_us: int = 0) -> None:
        if not self.frozen:
            self.views.append(View(t, host, pid, token, busy, until_us))

    def fire_enter(self, t: float, host: str, pid: int, job: str, f_us: int, kind: str) -> int:
        fid = len(self.fires)
        if not self.frozen:
            self.fires.append(Fire(fid, host, pid, job, f_us, kind, t))
        return fid

    def fire_exit(self, t: float, fid: int, outcome: str) -> None:
        if not self.frozen and fid < len(self.fires):
            fire = self.fires[fid]
            fire.exit, fire.outcome = t, outcome

    def start(self, t: float, job: str, f_us: int, host: str, pid: int, token: int, kind: str,
              fid: int | None, key: str = "") -> int:
        rid = len(self.runs)
        if self.frozen:
            return rid
        run = Run(rid, job, f_us, host, pid, token, kind, t, fid, key)
        self.runs.append(run)
        if fid is not None and fid < len(self.fires):
            self.fires[fid].rid = rid
        run.accepted = self.write(t, job, rid, "start", token)
        return rid

    def finish(self, t: float, rid: int, status: str) -> None:
        if self.frozen or rid >= len(self.runs):
            return
        run = self.runs[rid]
        run.end, run.status = t, status
        if status == "ok":
            self.write(t, run.job, rid, "end", run.token)

    def write(self, t: float, job: str, rid: int, phase: str, token: int) -> bool:
        """The fenced sink: per job, accept a token at least the highest accepted so far."""
        ok = token >= self._sink_max.get(job, 0)
        if ok:
            self._sink_max[job] = token
        self.sink.append((t, job, rid, phase, token, ok))
        return ok

    def pause(self, host: str, pid: int, t0: float, t1: float) -> None:
        if not self.frozen:
            self.pauses.append((host, pid, t0, t1))

    def cut(self, host: str, t0: float, t1: float) -> None:
        if not self.frozen:
            self.cuts.append((host, t0, t1))

    def step(self, host: str, t: float, delta: float) -> None:
        if not self.frozen:
            self.steps.append((host, t, delta))

    def fault(self, entry: dict[str, Any]) -> None:
        if not self.frozen:
            self.faults.append(entry)

    def call(self, t: float, host: str, pid: int, what: str, raised: str = "") -> None:
        if not self.frozen:
            self.calls.append((t, host, pid, what, raised))

    def note(self, t: float, host: str, text: str, job: str = "") -> None:
        if not self.frozen:
            self.notes.append((t, host, text, job))

    def freeze(self, t: float) -> None:
        if self.frozen:
            return
        self.end = t
        for belief in self._open.values():
            belief.until = min(belief.until, t)
        self._open.clear()
        self.frozen = True

    # -- reading -----------------------------------------------------------------------

    def wall(self, host: str, t: float) -> float:
        """``host``'s wall clock at true time ``t`` (unix seconds)."""
        c = self.hosts[host]
        offset = c["offset"] + sum(d for h, at, d in self.steps if h == host and at <= t)
        return c["wall0"] + c["rate"] * t + offset

    def true_at_wall(self, host: str, wall: float) -> float:
        """The first true instant at which ``host``'s wall clock reads ``wall`` or later (steps included)."""
        c = self.hosts[host]
        segments = [(0.0, c["offset"])]
        for _, at, d in sorted((s for s in self.steps if s[0] == host), key=lambda s: s[1]):
            segments.append((at, segments[-1][1] + d))
        for i, (begin, offset) in enumerate(segments):
            t = (wall - c["wall0"] - offset) / c["rate"]
            if t < begin:
                return begin
            if i + 1 == len(segments) or t < segments[i + 1][0]:
                return t
        raise AssertionError("unreachable")

    def dump(self) -> str:
        """Everything recorded, as JSON lines: equal histories give equal bytes."""
        lines = [json.dumps({"hosts": self.hosts, "end": self.end}, sort_keys=True)]
        for name in ("runs", "fires", "beliefs", "procs", "marks", "views"):
            lines.extend(json.dumps([name, asdict(x)], sort_keys=True) for x in getattr(self, name))
        for name in ("grants", "pauses", "cuts", "steps", "sink", "faults", "notes", "calls"):
            lines.extend(json.dumps([name, x], sort_keys=True) for x in getattr(self, name))
        return "\n".join(lines) + "\n"
