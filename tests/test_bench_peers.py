"""Section 5 of the benchmark for real: tooz and APScheduler 4 under kill and pause, judged by the checker.

Builds ``.venv-peers`` when it is missing or stale (CI starts without one),
starts real Redis and PostgreSQL, and runs the quick mode. Only that numbers
were measured is asserted here, never what they are: duplicates and misses of
the peers are findings for the report, not failures.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from loadtest import checker, probe_log
from loadtest.bench import peers, peers_venv
from loadtest.bench.base import BenchContext, SectionResult
from loadtest.peers import probe
from node.jobs import INTERVAL_EPOCH

ROOT = Path(__file__).resolve().parent.parent
#: One worker runs this file (``--dist loadgroup``): the quick peers section runs once, for every test.
pytestmark = pytest.mark.xdist_group("test_bench_peers")


@pytest.fixture(scope="module")
def section(tmp_path_factory: pytest.TempPathFactory) -> SectionResult:
    tmp = tmp_path_factory.mktemp("bench-peers")
    console = Console(file=sys.stderr)
    with Progress(console=console) as progress:
        ctx = BenchContext(out=tmp / "out", work=tmp / "work", quick=True, backends=["redis", "postgres"], seed=1,
                           console=console, progress=progress)
        ctx.out.mkdir()
        return peers.run(ctx)


def test_both_peers_were_measured_from_real_records(section: SectionResult) -> None:
    systems = {row["system"]: row for row in section.data["systems"]}
    assert set(systems) == {"tooz", "apscheduler4"}
    for name, row in systems.items():
        assert row["records"] > 0, name
        assert row["expected"] > 0, name
        assert isinstance(row["duplicates"], int) and isinstance(row["missed"], int), name
        assert row["fenced_sink_duplicates"] <= row["duplicates"], name
        assert isinstance(row["gaps"]["count"], int), name
        assert [f["fault"] for f in row["faults"]] == ["kill", "pause"], name
        assert all(f["target"].startswith(("tooz-", "aps4-")) for f in row["faults"]), name
    # killing the tooz leader leaves fire times nobody runs until its lock expires: a measured gap
    tooz = systems["tooz"]
    assert tooz["gaps"]["count"] >= 1 and tooz["gaps"]["p50_s"] is not None
    assert tooz["failover"]["kill"]["recovered"] == 1 and tooz["failover_p99_ttl"] is not None
    # APScheduler 4 records carry no token, so a sink could fence none of its duplicates
    aps4 = systems["apscheduler4"]
    assert aps4["fenced_sink_duplicates"] == aps4["duplicates"] and aps4["stale_records"] == 0


def test_verdict_rows_and_markdown(section: SectionResult) -> None:
    rows = {(v.system, v.backend): v for v in section.verdict}
    assert set(rows) == {("tooz", "redis"), ("apscheduler4", "postgres")}
    for row in rows.values():
        assert row.duplicates is not None and row.misses is not None
    assert section.name == "peers"
    assert "| tooz | redis |" in section.markdown and "| apscheduler4 | postgres |" in section.markdown


def test_peer_grid_and_names_are_the_checkers() -> None:
    assert probe.EPOCH == probe_log.EPOCH == INTERVAL_EPOCH
    assert probe.job_names(12) == checker.job_names(12)
    now = datetime(2026, 11, 23, 8, 30, 0, 250_000, tzinfo=UTC)
    for interval in (0.5, 0.3, 7.0):
        t = probe.next_instant(interval, now)
        grid = probe_log.Grid.of(interval)
        assert grid.index(grid.micros(t)) is not None and now < t <= now + timedelta(seconds=interval)


def test_peer_timing_is_batons_in_the_failover_section() -> None:
    from loadtest.bench.failover import TIMING

    assert (TIMING.ttl, TIMING.misfire_grace) == (peers.TTL, peers.GRACE)


def test_worker_bad_input_is_one_line_and_exit_2() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.peers.tooz_worker", "--node", "x", "--url",
                           "redis://127.0.0.1:1", "--collector", "http://127.0.0.1:1/probe", "--jobs", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "--jobs must be >= 1" in done.stderr.strip().splitlines()[-1]
    done = subprocess.run([sys.executable, "-m", "loadtest.peers.aps4_worker", "--node", "x", "--url",
                           "redis://127.0.0.1:1", "--collector", "http://127.0.0.1:1/probe"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "postgresql://" in done.stderr


def test_failed_venv_build_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No PyPI, or a requirement pip cannot install: the section fails with one line, no traceback."""
    broken = tmp_path / "requirements.txt"
    broken.write_text(str(tmp_path / "no-such-peer-1.0-py3-none-any.whl") + "\n")  # local: fails without network
    monkeypatch.setattr(peers_venv, "REQUIREMENTS", broken)
    with pytest.raises(peers_venv.PeersError) as caught:
        peers_venv.ensure(tmp_path / "pip.log", venv=tmp_path / "venv")
    message = str(caught.value)
    assert "\n" not in message and "pip install failed" in message and str(tmp_path / "pip.log") in message
    assert not peers_venv.is_fresh(tmp_path / "venv")


def test_recovery_waits_for_every_job_on_another_worker() -> None:
    t0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def rec(job: str, node: str, after_s: float) -> dict[str, object]:
        at = (t0 + timedelta(seconds=after_s)).isoformat()
        return {"job": job, "scheduled_at": at, "node": node, "token": 0, "started_at": at}

    chaos = [{"ts": t0.isoformat(), "fault": "kill", "target": "a", "phase": "start"},
             {"ts": (t0 + timedelta(seconds=4)).isoformat(), "fault": "kill", "target": "a", "phase": "end"},
             {"ts": (t0 + timedelta(seconds=10)).isoformat(), "fault": "pause", "target": "b", "phase": "start"}]
    records = [rec("probe-000", "a", -0.5), rec("probe-000", "a", 0.5),  # the hit worker does not count
               rec("probe-000", "b", 1.0), rec("probe-001", "c", 2.5),
               rec("probe-000", "a", 11.0)]  # after the pause only probe-000 ran elsewhere: not recovered
    first, second = peers.recovery(chaos, records, jobs=2)
    assert (first["fault"], first["first_run_s"], first["failover_s"]) == ("kill", 1.0, 2.5)
    assert (second["fault"], second["first_run_s"], second["failover_s"]) == ("pause", 1.0, None)
