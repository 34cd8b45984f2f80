"""The hand-built schedules of ``holes.json``: one scenario per hole of the exactly-once issue (#12)."""

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


def load(path: Path = PATH) -> list[Hole]:
    data = json.loads(path.read_text())
    out = []
    for item in data["scenarios"]:
        scenario = Scenario.from_dict(item)
        scenario.replay = f"python -m loadtest sim --hole {item['name']}"
        out.append(Hole(item["name"], int(item["hole"]), item["expect"], item.get("fire_time"), item["about"],
                        scenario))
    return out


def by_name(name: str) -> Hole:
    for hole in load():
        if hole.name == name:
            return hole
    raise KeyError(name)


def classify(violation: Any, history: History) -> int | None:
    """Which hole of #12 a violation most likely shows (a heuristic for summaries; None: another cause).

    1: a fire time lost within the claim-ahead lead after a SIGTERM of its leader;
    2: a fire time lost after an operation answer was lost (fail-after) on its leader;
    3: a fire time that waits forever;
    4: a recovery run beside a run whose process had not failed;
    5: more runs of a job than max_instances;
    6: a fire time whose only run was cut by a graceful stop.
    """
    from loadtest.sim.cluster import WALL0

    kind = violation.invariant
    if kind == "waits_forever":
        return 3
    if kind == "max_instances":
        return 5
    if kind in ("duplicate_start", "fenced_sink") and violation.runs:
        runs = [history.runs[r] for r in violation.runs]
        if runs[-1].kind == "recovery":
            return 4
        return None
    if kind == "lost" and violation.f_us is not None:
        if "cut by a graceful stop" in violation.detail:
            return 6
        f = violation.f_us / 1e6 - WALL0
        for fault in history.faults:
            if fault.get("skipped"):
                continue
            if fault["kind"] == "term" and f - 0.3 <= fault["t"] <= f:
                return 1
            if fault["kind"] == "op" and fault.get("effect") == "fail-after" and f - 3.5 <= fault["t"] <= f:
                return 2
    return None
