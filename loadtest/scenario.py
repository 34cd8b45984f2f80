"""One fault scenario, end to end: a cluster with probe jobs, rounds of faults, the checker's verdict.

The failover suite (tests/test_failover.py) and the failover benchmark
(loadtest.bench.failover) both run this; they differ only in the numbers
(probe shapes, rounds, pauses, aim) and in what they do with the verdict.
The verdict comes from the collector's records and the chaos log alone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loadtest.chaos import Aim, Chaos, ChaosLog, FaultResult, run_rounds
from loadtest.checker import check
from loadtest.cluster import LocalCluster, Timing
from loadtest.probe_log import load_chaos, load_records
from loadtest.up import Collector


@dataclass(frozen=True)
class Scenario:
    backend: str
    faults: list[str]
    rounds: int
    timing: Timing
    probe_jobs: int = 3
    probe_interval: float = 1.0
    #: Probe shapes (``node.probes`` spec); empty: ``probe_jobs`` basic probes every ``probe_interval``.
    probe_shapes: str = ""
    claims: bool = True
    seed: int = 7
    nodes: int = 3
    #: Seconds of probes before the first fault, between faults, and after the last leader is back.
    warmup: float = 2.0
    settle: float = 2.0
    drain: float = 3.0
    #: The checked window ends this long before the scenario did (in-flight runs are not misses). At least
    #: the longest probe interval and a second: every fire time judged then has a later one to judge it by.
    tail: float = 2.0
    #: Fire the faults in ``aimed`` (all when None) this way before a probe fire time (``loadtest.chaos.Aim``).
    aim: str | None = None
    aimed: tuple[str, ...] | None = None
    #: Seconds the ``skew`` fault shifts a node's clock by.
    skew: float = 30.0


def run_scenario(workdir: Path, scenario: Scenario, *, records_dir: Path | None = None,
                 on_fault: Callable[[FaultResult], Any] | None = None) -> dict[str, Any]:
    """Run ``scenario`` under ``workdir``; the checker's result, plus its ``warnings``.

    ``records_dir`` puts the collector's file elsewhere while it runs (a tmpfs,
    so its fsyncs do not stall the probes); it is moved into ``workdir`` after.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    records = (records_dir or workdir) / "probes.jsonl"
    collector = Collector(records, workdir / "collector.log")
    cluster = LocalCluster(workdir / "cluster", backend=scenario.backend, nodes=scenario.nodes,
                           timing=scenario.timing, probe_jobs=scenario.probe_jobs,
                           probe_interval=scenario.probe_interval, probe_shapes=scenario.probe_shapes,
                           probe_url=collector.url, claims=scenario.claims)
    chaos_log = ChaosLog(workdir / "chaos.jsonl")
    chaos = Chaos(cluster, chaos_log, seed=scenario.seed, skew=scenario.skew)
    tail = max([scenario.tail] + [s.interval + 1.0 for s in chaos.shapes()])
    try:
        cluster.start()
        cluster.wait_for_leader(timeout=60)
        time.sleep(scenario.warmup)
        run_rounds(chaos, scenario.faults, scenario.rounds, scenario.settle, on_result=on_fault,
                   aim=Aim.parse(scenario.aim) if scenario.aim else None, aimed=scenario.aimed)
        cluster.wait_for_leader(timeout=60)
        time.sleep(scenario.drain + tail - scenario.tail)  # the last catch-up and in-flight probes land
        end = datetime.now(UTC) - timedelta(seconds=tail)
    finally:
        cluster.close()
        collector.stop()
        if records_dir is not None and records.exists():
            records = Path(shutil.move(records, workdir / "probes.jsonl"))
    found, warnings = load_records(records)
    events, _ = load_chaos(chaos_log.path)
    result = check(found, probes=chaos.shapes(), start=None, end=end, misfire_grace=scenario.timing.misfire_grace,
                   chaos=events)
    result["warnings"] = warnings + result["warnings"]
    return result
