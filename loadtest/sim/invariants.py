"""The invariants, checked on a run's history (``loadtest.sim.history``) and its scenario alone.

Nothing here asks the nodes what they did: runs are what the job bodies saw,
leadership is what the electors held (their lease and its local deadline),
faults are what the simulator did. Each check returns violations, earliest
first. The names and their meaning:

``duplicate_start``
    No fire time of a job is started twice, except a declared at-least-once
    recovery: a ``recovery`` run of a fire time whose every earlier run was on
    another process, one that failed (was killed, paused, or cut off from the
    store) between that run's start and the recovery's, and whose token handed
    no window back after the run ended without listing it as still going (a
    holder that did knew it had ended, and had the store to say so). A
    process never recovers its own run: it knows it ran it, whatever the store
    heard.
``recovered``
    A recoverable job's fire time whose every run was cut by a kill is run
    again (a ``recovery`` run) by a later token, if one led for
    ``RECOVERY_ALLOWANCE`` (plus twice the job's body) after it was owed: after the
    kill, or, for a run handed over as still going, after its busy entry
    expired (its node died within its shutdown grace). At least once, measured.
``fenced_sink``
    A sink that accepts a write when its token is at least the highest it
    accepted (per job; the bodies write at their start and end) never accepts
    a stale token: tokens the store grants strictly increase, one token is
    never accepted from two processes, and no fire time is accepted from two
    runs (except a declared recovery, as above).
``lost``
    Every fire time in the checked window is started, unless it is one of the
    documented cases: coalesced into a catch-up run (the job's next run after
    it, recoveries aside, is a catch-up within the misfire grace); coalesced by APScheduler
    after a stall of the leader (its next run is a scheduled one on the same
    host, which was paused or whose wall clock jumped forward over it); skipped
    because ``max_instances`` runs of the job were going on (on the leader, or
    cluster-wide); coalesced into the catch-up of a leader that failed before
    running it, when a later leader recovered that catch-up from its intent; a
    crash's at-most-once window (a non-recoverable job's fire time within the
    claim-ahead lead, plus one operation timeout either side, of the instant
    its leader was killed, paused or cut off, or due before the window that
    gave it to a leader killed or paused within that slack of the answer: a
    new leader's catch-up it had no time to start); no leader at all
    for the whole misfire grace after it. A fire time whose only runs were
    cancelled by a graceful stop is lost too (cut).
``max_instances``
    At no instant do more runs of a job go on than its ``max_instances``,
    counting runs on processes that are alive and reachable (a run stops
    counting when its process is killed, paused or cut off).
``waits_forever``
    No fire time handed to a node's gate waits forever: one that neither
    started its body nor returned by the end of its process (or of the run),
    after more than ``wait_bound`` seconds of process time, is a violation.
``one_leader``
    At most one process believes it leads at any instant (beliefs overlap by
    no more than ``LEADER_OVERLAP_BOUND``: hosts' clock rates stay within the
    documented drift, so the local deadline margin must absorb it). Except
    after a store restart that ended the leases: the holder learns it at its
    next renewal, so its belief may outlast the restart by up to its renew
    deadline (``RESTART_BELIEF_SLACK`` beyond it), or, paused or cut off, by
    up to the TTL (its local deadline, set by a renewal sent before the
    restart); its claim window, fenced by its token, keeps what it runs apart
    from the next leader's.
``raised``
    No call a fault makes into a node's API (a SIGTERM's ``Node.stop``, a
    step-down) raises: a route would answer 500, a shutdown end on a
    traceback, with the hand-back it was for possibly undone.
``early``
    No run of a fire time (scheduled, catch-up or recovery) starts before
    its fire time by the clock of the host that starts it (``EARLY_BOUND``),
    unless that clock was stepped back in the second before: APScheduler
    fires by that clock, and a recovery must wait for it too.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from loadtest.sim.history import WALL0, Belief, Fire, History, Mark, Run, View
from loadtest.sim.scenario import RECOVERY_ALLOWANCE, Scenario
from lock_backends.clock import to_us
from node.triggers import INTERVAL_EPOCH

INVARIANTS = ("duplicate_start", "fenced_sink", "lost", "recovered", "max_instances", "waits_forever", "one_leader",
              "raised", "early")

#: Unix time of the interval triggers' epoch, in microseconds: interval fire times are this plus whole periods.
INTERVAL_EPOCH_US = to_us(INTERVAL_EPOCH)
#: Seconds two beliefs may overlap (none: clock rates in a run stay inside the documented drift).
LEADER_OVERLAP_BOUND = 1e-9
#: Fire times this close to the run's start or end are not checked for "lost" (start-up, in flight).
WINDOW_START = 0.5
WINDOW_END_MARGIN = 2.0
#: Two instants this close are the same (the order of callbacks at one virtual instant).
EPS = 1e-6
#: How long a fire time of a leader's window may come due before the leader fails and still be lost with it:
#: the claim's answer can be that late (an operation timeout, then a retry).
CRASH_SLACK = 0.6
#: How long before it stopped firing a cut-off leader may have left a fire time of its window unstarted (the
#: wake-up of its scheduler: it needs no store to start what its window holds).
STOP_SLACK = 0.05
#: How long after its leadership ends a node may still be handing its window back (a flush, one attempt).
HAND_BACK_TIME = 1.5
#: How far before its fire time, by its own host's clock, a run may start (float rounding only).
EARLY_BOUND = 0.001
#: How long past its renew deadline after a store restart a holder may still believe it leads: the renewal in
#: flight at the restart answered late, and the holder's clock running slow.
RESTART_BELIEF_SLACK = 0.5


@dataclass
class Violation:
    invariant: str
    t: float
    detail: str
    job: str = ""
    f_us: int | None = None
    runs: list[int] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "t": round(self.t, 6), "detail": self.detail, "job": self.job,
                "fire_time_us": self.f_us, "runs": self.runs, "hosts": self.hosts}


@dataclass
class Checked:
    violations: list[Violation]
    #: what each invariant looked at (fire times, runs, instants...), for the summary
    counts: dict[str, int]
    #: lost-check excuses used, by reason
    excused: dict[str, int]


class _Facts:
    """Indexes over one history, shared by the checks."""

    def __init__(self, h: History, scenario: Scenario) -> None:
        self.h = h
        self.config = scenario.config
        self.procs = {p.pid: p for p in h.procs}
        # per process: intervals during which the cluster cannot see or reach it
        self.failures: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
        for _, pid, t0, t1 in h.pauses:
            self.failures[pid].append((t0, t1, "paused"))
        for proc in h.procs:
            for host, t0, t1 in h.cuts:
                if host in ("", proc.host) and t1 >= proc.start and (proc.end is None or t0 <= proc.end):
                    self.failures[proc.pid].append((t0, t1, "outage" if host == "" else "cut off"))
            if proc.how == "killed" and proc.end is not None:
                self.failures[proc.pid].append((proc.end, float("inf"), "killed"))
        for items in self.failures.values():
            items.sort()
        #: store restarts that ended every lease: when each began
        self.restarts = [float(f["t"]) for f in h.faults if f["kind"] == "restart"]
        self.runs_by_job: dict[str, list[Run]] = defaultdict(list)
        for run in h.runs:
            self.runs_by_job[run.job].append(run)
        self.scheduled_by_job: dict[str, list[Run]] = {}
        for job, runs in self.runs_by_job.items():
            self.scheduled_by_job[job] = sorted((r for r in runs if r.kind != "manual"),
                                                key=lambda r: (r.f_us, r.start))
        self.beliefs = sorted(h.beliefs, key=lambda b: b.since)
        self.beliefs_of: dict[int, list[Belief]] = defaultdict(list)
        for b in self.beliefs:
            self.beliefs_of[b.token].append(b)
        self.runs_by_key: dict[str, list[Run]] = defaultdict(list)
        for run in h.runs:
            self.runs_by_key[run.key].append(run)
        self.fires_of: dict[tuple[str, int], list[Fire]] = defaultdict(list)
        self.catch_ups: dict[str, list[Fire]] = defaultdict(list)
        for fire in h.fires:
            self.fires_of[(fire.job, fire.f_us)].append(fire)
            if fire.kind == "catch-up":
                self.catch_ups[fire.job].append(fire)
        self.scheduled_fires: dict[tuple[int, str], list[Fire]] = defaultdict(list)
        for fire in sorted(h.fires, key=lambda x: x.f_us):
            if fire.kind == "scheduled":
                self.scheduled_fires[(fire.pid, fire.job)].append(fire)
        self.scheduled_f_us = {k: [x.f_us for x in v] for k, v in self.scheduled_fires.items()}
        self.beliefs_by_pid: dict[int, list[Belief]] = defaultdict(list)
        for b in self.beliefs:
            self.beliefs_by_pid[b.pid].append(b)
        # claim marks the store answered, per token that asked and holds them; hand-backs per busy key
        self.marks_of: dict[int, list[Mark]] = defaultdict(list)
        self.hand_backs_of: dict[str, list[Mark]] = defaultdict(list)
        for m in h.marks:
            if m.token == m.asked:
                self.marks_of[m.token].append(m)
            for key in m.busy:
                self.hand_backs_of[key].append(m)
        self.views_of: dict[int, list[View]] = defaultdict(list)
        for v in h.views:
            self.views_of[v.pid].append(v)
        self.view_times = {pid: [v.t for v in views] for pid, views in self.views_of.items()}
        self._busy_ok: dict[tuple[str, int], bool] = {}

    def failed_between(self, pid: int, a: float, b: float) -> str | None:
        for t0, t1, how in self.failures.get(pid, ()):
            if t0 <= b + EPS and t1 >= a - EPS:
                return how
        return None

    def first_failure(self, pid: int, after: float) -> float | None:
        best = None
        for t0, t1, _ in self.failures.get(pid, ()):
            if t1 >= after:
                at = max(t0, after)
                best = at if best is None else min(best, at)
        return best

    def coalesced(self, shape: Any, f_us: int, grace_us: int) -> bool:
        """A new leader's catch-up for a later fire time within the grace covered ``f_us`` (its window began at
        or before it), and that catch-up ran, or was skipped for ``max_instances`` with the evidence of
        ``_skipped``: the catch-up runs the latest fire time a leader owes and folds the earlier ones into it."""
        for fire in self.catch_ups.get(shape.id, ()):
            if not f_us <= fire.f_us <= f_us + grace_us:
                continue
            since = self.window_since(fire.pid, fire.enter)
            if since is not None and since <= f_us and (fire.rid is not None or _skipped(self, shape, fire.f_us)):
                return True
        return False

    def recovered_catch_up(self, shape: Any, f_us: int, grace_us: int) -> bool:
        """``f_us`` was folded into the catch-up of a leader that failed before running it, and a later leader
        ran that catch-up again from its intent: a recovery run of a later fire time within the grace, both in
        the first window of an earlier token, the later one due before that window was asked for (so it was
        that leader's catch-up: the latest fire time it owed)."""
        for r in self.runs_by_job.get(shape.id, ()):
            if r.kind != "recovery" or not f_us < r.f_us <= f_us + grace_us:
                continue
            for token, marks in self.marks_of.items():
                first = marks[0]
                if (token < r.token and first.since_us <= f_us and r.f_us < first.until_us
                        and r.f_us <= self.h.wall(first.host, first.sent) * 1e6):
                    return True
        return False

    def stalled(self, shape: Any, f_us: int) -> str | None:
        """APScheduler folded ``f_us`` into a later fire time (``coalesce``) after a stall of the leader.

        A pause: the process was paused when ``f_us`` came due on its clock, and
        the next fire time of the job it handed to its gate ran, or was skipped
        for ``max_instances`` with the evidence of ``_skipped``. A forward step
        of a leading process's wall clock: ``f_us`` lies in the range it jumped
        over (up to a period after), and a later fire time of that range ran
        (its recovery included, the leader having died since) or was skipped so.
        The scheduler learns of the step at its next wake-up, timed on the
        monotonic clock before the step (the job's first fire time after the
        step's start, at the latest); a pause of the process that began by
        then holds that wake-up to its resume, and the range to the wall time
        of the resume.
        """
        h = self.h
        f = f_us / 1e6
        for (pid, job), fires in self.scheduled_fires.items():
            if job != shape.id:
                continue
            i = bisect.bisect_right(self.scheduled_f_us[(pid, job)], f_us)
            if i == len(fires):
                continue
            nxt = fires[i]
            due = h.true_at_wall(nxt.host, f)
            if (any(p == pid and t0 - EPS <= due <= t1 + EPS for _, p, t0, t1 in h.pauses)
                    and (nxt.rid is not None or _skipped(self, shape, nxt.f_us))):
                return "coalesced after a pause of the leader"
        for host, at, delta in h.steps:
            if delta <= 0 or not any(b.host == host and b.since - EPS <= at <= b.until + EPS for b in self.beliefs):
                continue
            before = h.wall(host, at - EPS)
            period_us = shape.period_ms * 1000
            first_us = INTERVAL_EPOCH_US + (int(before * 1e6) - INTERVAL_EPOCH_US) // period_us * period_us + period_us
            wakes = at + (first_us / 1e6 - before) / h.hosts[host]["rate"] + STOP_SLACK
            held = [t1 for p_host, _, t0, t1 in h.pauses if p_host == host and at - EPS <= t0 <= wakes]
            top_us = int((max([before + delta, *(h.wall(host, t1) for t1 in held)]) + shape.period_ms / 1000) * 1e6)
            if not before < f <= top_us / 1e6:
                continue
            if any(f_us < r.f_us <= top_us for r in self.runs_by_job.get(shape.id, ()) if r.kind != "manual"):
                return "coalesced after a forward clock step on the leader"
            if any(f_us < g <= top_us and _skipped(self, shape, g) for (job, g) in self.fires_of if job == shape.id):
                return "coalesced after a forward clock step on the leader"
        return None

    def window_since(self, pid: int, t: float) -> int | None:
        """Where the claim window of the token ``pid`` led with at ``t`` began (None: no window, or no belief)."""
        for b in self.beliefs_by_pid.get(pid, ()):
            if b.since - EPS <= t <= b.until + EPS:
                marks = self.marks_of.get(b.token)
                return marks[0].since_us if marks else None
        return None

    def alive(self, pid: int, t: float) -> bool:
        """The process had not died (killed, or exited) by ``t``."""
        end = self.procs[pid].end
        return end is None or end > t + EPS

    def last_view(self, pid: int, t: float) -> View | None:
        views = self.views_of.get(pid)
        if not views:
            return None
        i = bisect.bisect_right(self.view_times[pid], t + EPS)
        return views[i - 1] if i else None

    def truly_busy(self, key: str, node: str, token: int) -> bool:
        """A busy entry the store listed was written by a hand-back sent while that run was going: by its node,
        under the run's token or a later one of that node's (it won again while the run went on: seed 28566)."""
        cached = self._busy_ok.get((key, token))
        if cached is None:
            runs = [r for r in self.runs_by_key.get(key, ()) if r.token == token and r.host == node]
            cached = any(r.start <= m.sent + EPS and (r.end is None or r.end >= m.sent - EPS)
                         for m in self.hand_backs_of.get(key, ()) for r in runs if m.asked >= token and m.host == node)
            self._busy_ok[(key, token)] = cached
        return cached

    def failed_window(self, f_us: int) -> str | None:
        """How the leader holding ``f_us`` in its claim window failed, if it did: the at-most-once window of a crash.

        The fire time lies in the claim window the store had granted a token
        by requests sent up to the instant its process failed while it led (or
        while it tried to hand the window back after), and the window was not
        handed back below it. Killed or paused: the fire time came due no more
        than ``CRASH_SLACK`` before that instant (one due earlier was the
        leader's to start; the slack is how late a claim's answer may come).
        Cut off, or the store down: a leader keeps running its window, so only
        what came due after it stopped firing (its leadership ended, or a
        SIGTERM or step-down began; ``STOP_SLACK``) while it could not reach
        the store to hand the rest back; and what the store granted it but
        whose answer never reached it by then (a new leader's catch-up, or a
        claim ahead, answered too late), which it could not start.
        """
        h = self.h
        for token, marks in self.marks_of.items():
            final = marks[-1]  # a sealed mark is final: what was handed back is the next token's to run
            until = final.until_us if final.sealed else max(m.until_us for m in marks)
            if not marks[0].since_us <= f_us < until:
                continue
            for b in self.beliefs_of.get(token, ()):
                for t0, t1, how in self.failures.get(b.pid, ()):
                    if t1 < b.since - EPS or t0 > b.until + HAND_BACK_TIME:
                        continue
                    at = max(t0, b.since)
                    held = max((m.until_us for m in marks if m.sent <= at + EPS), default=0)
                    if f_us >= held:
                        continue
                    slack = CRASH_SLACK
                    if how in ("killed", "paused"):
                        due_from = at
                    else:  # unreachable: it must have stopped firing while it could not hand back
                        stopped = min([f["t"] for f in self.h.faults if f.get("pid") == b.pid
                                       and f["kind"] in ("term", "step_down") and b.since <= f["t"] <= b.until]
                                      + [b.until])
                        if not (t0 - EPS <= stopped + HAND_BACK_TIME and t1 >= stopped - EPS):
                            continue  # the store was reachable when it stopped firing: it could hand back
                        if f_us >= self.known_until(b.pid, token, stopped):
                            return how  # granted, but the answer never reached it: it could not start it
                        due_from, slack = max(at, stopped), STOP_SLACK
                    if f_us / 1e6 >= h.wall(b.host, due_from) - slack:
                        return how
                    # due before the window that gave it to this leader was answered (its catch-up), and the
                    # leader failed within the slack of that answer: it had no time to start it
                    given = min((m.t for m in marks if m.op == "claim_window" and m.since_us <= f_us < m.until_us),
                                default=None)
                    if how in ("killed", "paused") and given is not None and at <= given + slack:
                        return how
            return None
        return None

    def known_until(self, pid: int, token: int, t: float) -> int:
        """Where the window of ``token`` that process ``pid`` had learned by ``t`` ended (0: none reached it)."""
        return max((v.until_us for v in self.views_of.get(pid, ()) if v.token == token and v.t <= t + EPS),
                   default=0)

    def excused_recovery(self, later: Run, earlier: list[Run]) -> bool:
        """``later`` is a recovery, and every run before it was on another process that failed after it started.

        A kill, a pause, a cut or a store outage excuse it (at least once, as after a crash: the run may have ended
        unreported), but only while the lease ended without a hand-back: once the store took a hand-back of the
        run's token after the run ended, not listing it as still going, its holder knew it had ended and had the
        store to say so, so a recovery of it is a duplicate.
        """
        return later.kind == "recovery" and all(
            e.pid != later.pid and self._crashed_under(e, later.start) for e in earlier)

    def _crashed_under(self, run: Run, until: float) -> bool:
        if not any(t0 <= until + EPS and t1 >= run.start - EPS for t0, t1, _ in self.failures.get(run.pid, ())):
            return False
        ended = run.end if run.end is not None else float("inf")
        return not any(m.op == "hand_back" and m.asked == m.token == run.token and ended <= m.t <= until + EPS
                       and run.key not in m.busy for m in self.marks_of.get(run.token, ()))

    def restart_under(self, a: Belief, b: Belief) -> float | None:
        """The store restart that ended ``a``'s lease before ``b`` began, if ``a``'s belief ended within the
        renew deadline of it (the holder learns at its next renewal), or within the TTL (a holder paused or cut
        off learns nothing: it stops at the local deadline its last renewal before the restart set): when it
        began."""
        bound = max(self.config.renew_deadline + RESTART_BELIEF_SLACK, self.config.ttl)
        for t0 in self.restarts:
            if a.since - EPS <= t0 <= b.since + EPS and a.until <= t0 + bound:
                return t0
        return None

    def leader_when_due(self, f_us: int) -> tuple[Belief, float] | None:
        """The process that believed it led when ``f_us`` came due on its own clock, and that instant."""
        f = f_us / 1e6
        for b in self.beliefs:
            t = self.h.true_at_wall(b.host, f)
            if b.since <= t < b.until:
                return b, t
        return None


def check(h: History, scenario: Scenario) -> Checked:
    facts = _Facts(h, scenario)
    counts: dict[str, int] = {}
    excused: dict[str, int] = defaultdict(int)
    violations: list[Violation] = []
    for name in INVARIANTS:
        found, looked = globals()[f"check_{name}"](facts, excused)
        counts[name] = looked
        violations.extend(found)
    violations.sort(key=lambda v: (v.t, INVARIANTS.index(v.invariant)))
    return Checked(violations, counts, dict(sorted(excused.items())))


def _fmt_f(f_us: int) -> str:
    return f"{f_us / 1e6 - WALL0:+.3f}"


def _run_desc(r: Run) -> str:
    end = f"-{r.end:.3f} {r.status}" if r.end is not None else " (never ended)"
    return f"run {r.rid} on {r.host}/p{r.pid} token {r.token} {r.kind} {r.start:.3f}{end}"


# -- the checks ------------------------------------------------------------------------------------


def check_duplicate_start(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    out = []
    looked = 0
    for job, runs in facts.scheduled_by_job.items():
        by_f: dict[int, list[Run]] = defaultdict(list)
        for r in runs:
            by_f[r.f_us].append(r)
        looked += len(by_f)
        for f_us, group in by_f.items():
            group.sort(key=lambda r: (r.start, r.rid))
            for i, later in enumerate(group[1:], 1):
                if facts.excused_recovery(later, group[:i]):
                    excused["declared recovery of a failed process's run"] += 1
                    continue
                out.append(Violation(
                    "duplicate_start", later.start,
                    f"{job} fire time {_fmt_f(f_us)} started twice: "
                    + "; ".join(_run_desc(r) for r in group[:i + 1]),
                    job, f_us, [r.rid for r in group[:i + 1]], sorted({r.host for r in group[:i + 1]})))
                break
    return out, looked


def check_fenced_sink(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    h = facts.h
    out = []
    last = 0
    for t, token, host in h.grants:
        if token <= last:
            out.append(Violation("fenced_sink", t, f"the store granted token {token} to {host} after token {last}",
                                 hosts=[host]))
        last = max(last, token)
    owner: dict[int, int] = {}
    accepted: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for t, job, rid, phase, token, ok in h.sink:
        if not ok:
            continue
        run = h.runs[rid]
        if owner.setdefault(token, run.pid) != run.pid:
            out.append(Violation("fenced_sink", t, f"the sink accepted token {token} from process p{run.pid} "
                                 f"after accepting it from p{owner[token]}", job, run.f_us, [rid], [run.host]))
        if phase == "start" and run.kind != "manual":
            earlier = accepted[(job, run.f_us)]
            if earlier and run.rid not in {r.rid for r in earlier}:
                if facts.excused_recovery(run, earlier):
                    excused["sink: declared recovery"] += 1
                else:
                    out.append(Violation(
                        "fenced_sink", t, f"the sink accepted {job} fire time {_fmt_f(run.f_us)} twice: "
                        + "; ".join(_run_desc(r) for r in [*earlier, run]),
                        job, run.f_us, [r.rid for r in [*earlier, run]], sorted({r.host for r in [*earlier, run]})))
            earlier.append(run)
    return out, len(h.sink)


def check_lost(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    h, config = facts.h, facts.config
    out = []
    looked = 0
    skew = max(abs(h.wall(host, h.end) - (WALL0 + h.end)) for host in h.hosts)
    lo = WALL0 + WINDOW_START
    hi = WALL0 + h.end - WINDOW_END_MARGIN - skew
    grace_us = int(config.misfire_grace * 1e6)
    for shape in config.jobs:
        p_us = shape.period_ms * 1000
        runs = facts.scheduled_by_job.get(shape.id, [])
        started: dict[int, list[Run]] = defaultdict(list)
        for r in runs:
            started[r.f_us].append(r)
        # the runs that stand for a coalesced fire time: scheduled or catch-up (a recovery re-runs a claimed one)
        firsts: dict[int, Run] = {}
        for r in runs:
            if r.kind != "recovery":
                firsts.setdefault(r.f_us, r)
        run_fs = sorted(firsts)
        k = -(-(int(lo * 1e6) - INTERVAL_EPOCH_US) // p_us)
        while True:
            f_us = INTERVAL_EPOCH_US + k * p_us
            k += 1
            if f_us > hi * 1e6:
                break
            looked += 1
            if f_us in started:
                group = started[f_us]
                if all(r.status == "cancelled" for r in group):
                    cut = max(r.end or 0.0 for r in group)
                    out.append(Violation("lost", cut, f"{shape.id} fire time {_fmt_f(f_us)}: its only run was cut "
                                         "by a graceful stop: " + "; ".join(_run_desc(r) for r in group),
                                         shape.id, f_us, [r.rid for r in group], sorted({r.host for r in group})))
                continue
            i = bisect.bisect_right(run_fs, f_us)
            nxt = firsts[run_fs[i]] if i < len(run_fs) else None
            reason = _excuse(facts, shape, f_us, nxt, grace_us)
            if reason:
                excused[reason] += 1
                continue
            due = facts.leader_when_due(f_us)
            t = due[1] if due else f_us / 1e6 - WALL0
            who = f"; leader then {due[0].host}/p{due[0].pid} token {due[0].token}" if due else "; no leader then"
            after = f"; next run {_run_desc(nxt)} for {_fmt_f(nxt.f_us)}" if nxt else "; no later run"
            out.append(Violation("lost", t, f"{shape.id} fire time {_fmt_f(f_us)} never started{who}{after}",
                                 shape.id, f_us, [nxt.rid] if nxt else [], [due[0].host] if due else []))
    return out, looked


def _excuse(facts: _Facts, shape: Any, f_us: int, nxt: Run | None, grace_us: int) -> str | None:
    f = f_us / 1e6
    # coalesced into a catch-up run
    if facts.coalesced(shape, f_us, grace_us):
        return "coalesced into a catch-up run"
    if facts.recovered_catch_up(shape, f_us, grace_us):
        return "coalesced into a failed leader's catch-up, recovered"
    # coalesced by APScheduler after a stall of the leader (a pause, or its wall clock jumping over it)
    stalled = facts.stalled(shape, f_us)
    if stalled:
        return stalled
    skipped = _skipped(facts, shape, f_us)
    if skipped:
        return skipped
    # a failed leader's claim window: at most once (recoverable jobs are recovered instead)
    if not shape.recover:
        failed = facts.failed_window(f_us)
        if failed:
            return f"at-most-once window of a leader {failed}"
    # no leader for the whole grace
    t_ref = f - WALL0
    if not any(b.since <= t_ref + facts.config.misfire_grace and b.until >= t_ref for b in facts.beliefs):
        return "no leader within the misfire grace"
    return None


def _skipped(facts: _Facts, shape: Any, f_us: int) -> str | None:
    """Why a gate that had ``f_us`` in hand may have skipped it for ``max_instances``, from the history alone.

    At the instant a node's gate returned for this fire time: the job had
    ``max_instances`` runs going on processes still alive; or, counting the
    runs going on that process, the busy runs of the last claim mark that
    reached it (runs a previous leader handed over as still going, listed by
    the store until their records arrive or their entries expire) made up the
    number, each of them truly going when it was handed over.
    """
    for fire in facts.fires_of.get((shape.id, f_us), ()):
        t = fire.exit
        if t is None:
            continue
        going = [r for r in facts.runs_by_job.get(shape.id, ())
                 if r.start <= t + EPS and (r.end is None or r.end >= t - EPS) and facts.alive(r.pid, t)]
        if len(going) >= shape.max_instances:
            return "skipped: max_instances runs going in the cluster"
        view = facts.last_view(fire.pid, t)
        if view is None:
            continue
        own = {r.key for r in going if r.pid == fire.pid}
        wall_us = facts.h.wall(fire.host, t) * 1e6
        listed = {key for key, job, node, token, until_us in view.busy
                  if job == shape.id and until_us > wall_us and key not in own and facts.truly_busy(key, node, token)}
        if len(own) + len(listed) >= shape.max_instances:
            return "skipped: max_instances, counting handed-over runs until their records arrive"
    return None


def check_recovered(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    out = []
    looked = 0
    handed_until: dict[str, float] = {}  # busy entries as processes were told of them: key -> expiry, true time
    for views in facts.views_of.values():
        for v in views:
            for key, _job, _node, _token, until_us in v.busy:
                handed_until[key] = max(handed_until.get(key, 0.0), until_us / 1e6 - WALL0)
    skew = max(abs(facts.h.wall(host, facts.h.end) - (WALL0 + facts.h.end)) for host in facts.h.hosts)
    for shape in facts.config.jobs:
        if not shape.recover:
            continue
        by_f: dict[int, list[Run]] = defaultdict(list)
        for r in facts.scheduled_by_job.get(shape.id, []):
            by_f[r.f_us].append(r)
        for f_us, group in by_f.items():
            procs = [facts.procs[r.pid] for r in group]
            if not any(r.end is None and p.how == "killed" for r, p in zip(group, procs, strict=True)):
                continue
            looked += 1  # a kill cut one of its runs
            if any(r.end is not None for r in group) or any(p.how != "killed" or p.end is None for p in procs):
                continue  # a run ended (a recovery, say), or may still go on: nothing owed
            cut = max(p.end or 0.0 for p in procs)
            # a recovery that a kill cut too is one of the group: the fire time is owed again, from that kill
            owed = max([cut, *(handed_until.get(r.key, 0.0) + skew for r in group)])
            token = max(r.token for r in group)
            need = RECOVERY_ALLOWANCE + 2 * shape.body_s
            held = [b for b in facts.beliefs
                    if b.token > token and min(b.until, facts.h.end) - max(b.since, owed) >= need]
            if not held:
                excused["recovered: no later leader led long enough after it was owed"] += 1
                continue
            b = held[0]
            t = max(b.since, owed) + need
            out.append(Violation(
                "recovered", t, f"{shape.id} fire time {_fmt_f(f_us)}: every run cut by a kill (the last at "
                f"{cut:.3f}, owed from {owed:.3f}), and {b.host}/p{b.pid} token {b.token} led {need:.1f}s after "
                "that without recovering it: " + "; ".join(_run_desc(r) for r in group),
                shape.id, f_us, [r.rid for r in group], sorted({r.host for r in group})))
    return out, looked


def check_max_instances(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    h = facts.h
    out = []
    looked = 0
    for shape in facts.config.jobs:
        spans = []
        for r in facts.runs_by_job.get(shape.id, ()):
            stop = r.end if r.end is not None else h.end
            failed = facts.first_failure(r.pid, r.start)
            if failed is not None:
                stop = min(stop, failed)
            if stop > r.start:
                spans.append((r.start, stop, r))
        looked += len(spans)
        points = sorted([(s, 1, r.rid) for s, _, r in spans] + [(e, -1, r.rid) for _, e, r in spans],
                        key=lambda p: (p[0], p[1]))
        going: dict[int, Run] = {}
        reported = 0
        for t, delta, rid in points:
            if delta < 0:
                going.pop(rid, None)
                continue
            going[rid] = h.runs[rid]
            if len(going) > shape.max_instances and reported < 3:
                reported += 1
                runs = sorted(going.values(), key=lambda r: r.start)
                out.append(Violation(
                    "max_instances", t, f"{shape.id} (max_instances={shape.max_instances}) has {len(going)} runs "
                    "going: " + "; ".join(f"{_fmt_f(r.f_us)} " + _run_desc(r) for r in runs),
                    shape.id, h.runs[rid].f_us, [r.rid for r in runs], sorted({r.host for r in runs})))
    return out, looked


def check_waits_forever(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    h, config = facts.h, facts.config
    out = []
    for fire in h.fires:
        if fire.exit is not None or fire.rid is not None:
            continue
        proc = facts.procs[fire.pid]
        until = proc.end if proc.end is not None else h.end
        paused = sum(max(0.0, min(t1, until) - max(t0, fire.enter))
                     for _host, pid, t0, t1 in h.pauses if pid == fire.pid)
        waited = until - fire.enter - paused
        if waited > config.wait_bound:
            out.append(Violation(
                "waits_forever", fire.enter + config.wait_bound,
                f"{fire.job} fire time {_fmt_f(fire.f_us)} ({fire.kind}) handed to {fire.host}/p{fire.pid} at "
                f"{fire.enter:.3f} neither ran nor returned in {waited:.1f}s of process time "
                f"({'until the process ' + proc.how if proc.end is not None else 'until the end'})",
                fire.job, fire.f_us, [], [fire.host]))
    return out, len(h.fires)


def check_one_leader(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    out = []
    beliefs = facts.beliefs
    for i, a in enumerate(beliefs):
        for b in beliefs[i + 1:]:
            if b.since >= a.until:
                break
            if b.pid == a.pid:
                continue
            overlap = min(a.until, b.until) - b.since
            if overlap > LEADER_OVERLAP_BOUND and facts.restart_under(a, b) is not None:
                excused["one_leader: a holder learning at its next renewal that a store restart ended its lease"] += 1
            elif overlap > LEADER_OVERLAP_BOUND:
                out.append(Violation(
                    "one_leader", b.since, f"{a.host}/p{a.pid} (token {a.token}, {a.since:.3f}-{a.until:.3f}) and "
                    f"{b.host}/p{b.pid} (token {b.token}, {b.since:.3f}-{b.until:.3f}) both believed they led "
                    f"for {overlap:.3f}s", hosts=[a.host, b.host]))
    return out, len(beliefs)


def check_raised(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    calls = facts.h.calls
    return [Violation("raised", t, f"{what} on {host}/p{pid} raised {raised}", hosts=[host])
            for t, host, pid, what, raised in calls if raised], len(calls)


def check_early(facts: _Facts, excused: dict[str, int]) -> tuple[list[Violation], int]:
    h = facts.h
    out = []
    looked = 0
    for r in h.runs:
        if r.kind == "manual":
            continue
        looked += 1
        early = r.f_us / 1e6 - h.wall(r.host, r.start)
        if early <= EARLY_BOUND:
            continue
        if any(host == r.host and delta < 0 and r.start - 1.0 <= at <= r.start + EPS for host, at, delta in h.steps):
            excused["early: its host's clock stepped back in the second before"] += 1
            continue
        out.append(Violation("early", r.start, f"{r.job} fire time {_fmt_f(r.f_us)} started {early:.3f}s before it "
                             f"by {r.host}'s clock: {_run_desc(r)}", r.job, r.f_us, [r.rid], [r.host]))
    return out, looked
