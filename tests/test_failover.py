"""The failover suite: every backend, every fault that applies, judged by the independent checker.

Each case runs a 3-node cluster with probe jobs every second through several
rounds of one fault. The checker reads only what the probe collector wrote
(and the chaos log) and must find 0 duplicate starts and 0 misses. The
negative control switches claims off and must make the checker fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest import scenario
from loadtest.cluster import Timing

ROUNDS = 3
PROBE_JOBS = 3
INTERVAL = 1.0
TIMING = Timing(ttl=2.0, renew_deadline=1.4, retry_period=0.4, op_timeout=0.5, misfire_grace=10.0)

SERVER_FAULTS = ["kill", "pause", "term", "restart-backend", "partition"]
CASES = [("file", f) for f in ("kill", "pause", "term")] + [
    (backend, fault) for backend in ("redis", "postgres", "etcd") for fault in SERVER_FAULTS]


def run_scenario(workdir: Path, backend: str, fault: str, *, claims: bool = True,
                 rounds: int = ROUNDS) -> dict[str, Any]:
    return scenario.run_scenario(workdir, scenario.Scenario(
        backend, [fault], rounds, TIMING, probe_jobs=PROBE_JOBS, probe_interval=INTERVAL, claims=claims,
        warmup=2.5, settle=2.0, drain=3.0, tail=2.0))


def summary(result: dict[str, Any]) -> str:
    keep = ("verdict", "records", "duplicates", "missed", "duplicate_starts", "missed_fire_times", "gaps")
    return str({k: result.get(k) for k in keep})


@pytest.mark.parametrize(("backend", "fault"), CASES)
def test_no_duplicates_no_misses(backend: str, fault: str, tmp_path: Path) -> None:
    result = run_scenario(tmp_path, backend, fault)
    assert result["records"] >= PROBE_JOBS * 5, summary(result)
    assert result["duplicates"] == 0, summary(result)
    assert result["fenced_sink_duplicates"] == 0, summary(result)
    assert result["missed"] == 0, summary(result)
    assert result["verdict"] == "pass", summary(result)
    if fault != "restart-backend":  # a short restart need not move the leadership, and with AOF does not
        assert result["handoffs"] >= 1, summary(result)  # the faults really moved the leadership


def test_negative_control_without_claims_the_checker_finds_duplicates(tmp_path: Path) -> None:
    result = run_scenario(tmp_path, "redis", "pause", claims=False)
    assert result["duplicates"] > 0, summary(result)
    assert result["verdict"] == "fail"
