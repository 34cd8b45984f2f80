"""The hand-built schedules of ``holes.json``: a scenario per hole of the exactly-once issue (#12), and findings.

On the claim-window core every schedule passes. Each hole names the bug of
``loadtest.sim.broken`` that puts it back, and the invariant the simulator
then reports (``expect``); findings are weaknesses found beside the six
holes, each fixed, kept as regression schedules; a finding that names a bug
must fail with it, as a hole does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.sim.history import History
from loadtest.sim.scenario import Scenario

PATH = Path(__file__).with_name("holes.json")


@dataclass(frozen=True)
class Hole:
    name: str
    hole: int
    expect: str
    fire_time: float | None
    about: str
    scenario: Scenario
    #: the bug of ``loadtest.sim.broken`` that re-creates the hole (a finding may have none)
    bug: str = ""


def load(path: Path = PATH, *, findings: bool = False) -> list[Hole]:
    """The holes of #12 (``findings``: also the weaknesses found beside them, numbered 0)."""
    data = json.loads(path.read_text())
    out = []
    for item in [*data["scenarios"], *(data.get("findings", []) if findings else [])]:
        scenario = Scenario.from_dict(item)
        scenario.replay = f"python -m loadtest sim --hole {item['name']}"
        out.append(Hole(item["name"], int(item["hole"]), item["expect"], item.get("fire_time"), item["about"],
                        scenario, item.get("bug", "")))
    return out


def with_bugs() -> list[Hole]:
    """The schedules that must fail with a bug put back: the holes of #12, and the findings that name one."""
    return [hole for hole in load(findings=True) if hole.bug]


def by_name(name: str) -> Hole:
    for hole in load(findings=True):
        if hole.name == name:
            return hole
    raise KeyError(name)


def classify(violation: Any, history: History) -> int | None:
    """Which hole of #12 a violation most likely shows (a heuristic, for the tests of ``loadtest.sim.broken``).

    1: a fire time lost within the claim-ahead lead after its leader stopped leading without a failure
       (a SIGTERM, or any other end of leadership that forgets the claims made ahead);
    2: a fire time lost after a claim's answer was lost (fail-after, or a response later than the timeout);
    3: a fire time that waits forever (or is lost behind a claim batch that raised);
    4: a recovery run beside a run whose process had not failed;
    5: more runs of a job than max_instances;
    6: a fire time whose only run was cut by a graceful stop.
    Fire times are compared with the wall clock of the host a fault hit, as that host saw them.
    """
    kind = violation.invariant
    if kind == "waits_forever":
        return 3
    if kind == "max_instances":
        return 5
    if kind in ("duplicate_start", "fenced_sink") and violation.runs:
        return 4 if history.runs[violation.runs[-1]].kind == "recovery" else None
    if kind != "lost" or violation.f_us is None:
        return None
    if "cut by a graceful stop" in violation.detail:
        return 6
    f = violation.f_us / 1e6
    for fault in history.faults:
        host = fault.get("host")
        if fault.get("skipped") or host is None:
            continue
        wall = history.wall(host, fault["t"])
        if fault["kind"] == "term" and f - LEAD <= wall <= f + SLACK:
            return 1
        if fault["kind"] == "op" and fault.get("op") in CLAIMS and f - 3.5 <= wall <= f:
            if fault.get("effect") == "raise":
                return 3
            if fault.get("effect") == "fail-after" or fault.get("effect", "").startswith("delay"):
                return 2
    for belief in history.beliefs:
        if belief.until < history.end and not _failing(history, belief.pid, belief.host, belief.until):
            wall = history.wall(belief.host, belief.until)
            if wall - SLACK <= f <= wall + LEAD:
                return 1
    return None


def _failing(history: History, pid: int, host: str, t: float) -> bool:
    """Was the process killed, paused or cut off at ``t`` (a documented at-most-once window)?"""
    if any(p.pid == pid and p.how == "killed" and p.end is not None and abs(p.end - t) < SLACK
           for p in history.procs):
        return True
    if any(p == pid and t0 <= t <= t1 + SLACK for _, p, t0, t1 in history.pauses):
        return True
    return any(h in ("", host) and t0 <= t <= t1 + SLACK for h, t0, t1 in history.cuts)


#: Operations that claim fire times, in either core's protocol.
CLAIMS = ("claim", "claim_many", "claim_window")
#: The longest claim-ahead lead, plus a little: how far past a leadership's end a forgotten claim reaches.
LEAD = 0.3
SLACK = 0.05
