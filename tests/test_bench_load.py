"""Sections 3 (backend load) and 4 (scale and memory) of ``python -m loadtest bench``, run for real.

One quick run of each on Redis with 3 nodes: the numbers must be there and
sane (server-side counts, one leader at every poll), not fast. The timing
claims themselves live in the benchmark's report as ratios, never here.
"""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from loadtest.bench import load, scale
from loadtest.bench.base import BenchContext
from loadtest.bench.perrun_lock import EPOCH, fire_time

ROOT = Path(__file__).resolve().parent.parent


def context(tmp_path: Path) -> BenchContext:
    console = Console(file=io.StringIO())
    return BenchContext(out=tmp_path / "out", work=tmp_path / "work", quick=True, backends=["redis"], seed=0,
                        console=console, progress=Progress(console=console))


def test_count_runs_finds_duplicates_and_misses(tmp_path: Path) -> None:
    records = tmp_path / "probes.jsonl"
    t = "2026-11-23T08:00:0{}+00:00"
    lines = [
        f'{{"job": "probe-000", "scheduled_at": "{t.format(1)}"}}',
        f'{{"job": "probe-000", "scheduled_at": "{t.format(1)}"}}',  # a duplicate
        f'{{"job": "probe-001", "scheduled_at": "{t.format(1)}"}}',
        f'{{"job": "probe-000", "scheduled_at": "{t.format(2)}"}}',  # probe-001 at :02 is missed
        f'{{"job": "probe-000", "scheduled_at": "{t.format(9)}"}}',  # outside the window
    ]
    records.write_text("\n".join(lines) + "\n")
    since = datetime.fromisoformat(t.format(0)).replace(microsecond=500_000)
    until = datetime.fromisoformat(t.format(2))
    got = load.count_runs(records, since, until, jobs=2, interval=1.0)
    assert got == {"runs": 4, "duplicates": 1, "missed": 1, "expected": 4}


def test_fire_time_is_the_grid_instant_at_or_before() -> None:
    now = datetime(2026, 11, 23, 8, 0, 7, 900_000, tzinfo=UTC)
    assert fire_time(now, 1.0) == datetime(2026, 11, 23, 8, 0, 7, tzinfo=UTC)
    assert (fire_time(now, 5.0) - EPOCH).total_seconds() % 5 == 0


@pytest.mark.parametrize("module", ["loadtest.bench.perrun_lock", "loadtest.bench.plain_jobs"])
def test_baseline_scripts_refuse_bad_input_in_one_line(module: str) -> None:
    argv = [sys.executable, "-m", module, "--jobs", "-1"]
    if module.endswith("perrun_lock"):
        argv += ["--redis-url", "redis://127.0.0.1:1/0", "--node-id", "x"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.timeout(150)
def test_backend_load_quick_on_redis(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    ctx.out.mkdir(parents=True)
    result = load.run(ctx)
    rows = result.data["rows"]

    def one(**match: object) -> dict[str, Any]:
        found = load.find(rows, **match)
        assert found is not None, f"no row {match} in {rows}"
        return found

    baton = one(system="baton", backend="redis", nodes=3, state="load")
    perrun = one(system="per-run lock", backend="redis", nodes=3, state="load")
    alone = one(system="baton", backend="redis", state="leader alone")
    for r in (baton, perrun, alone):
        assert 0 < float(r["requests_s"]) <= float(r["commands_s"])  # scripts' inner commands only add
    # both systems really ran the workload, every fire time, Baton exactly once
    assert baton["duplicates"] == 0 and baton["missed"] == 0 and int(baton["expected"]) >= 20
    assert perrun["missed"] == 0 and int(perrun["runs"]) >= int(perrun["expected"]) >= 20
    # a per-run lock asks the server at least once per node and run: 3 nodes x 10 runs/s
    assert float(perrun["requests_s"]) >= 25
    summary = result.data["summary"]["redis"]
    assert summary["idle_100_jobs_over_0_jobs"] is not None and summary["idle_100_jobs_over_0_jobs"] < 1.5
    assert summary["followers"][3]["per_follower_ops_s"] is not None
    assert summary["baton_over_perrun_under_load"][3] > 0
    # a leader alone with 10, 1,000 and 10,000 jobs: each measured at the server
    assert set(summary["leading_ops_s"]) == set(load.SCALE_JOBS) and all(summary["leading_ops_s"].values())
    assert summary["leading_many_jobs_over_some"] is not None
    verdict = {(v.system, v.backend): v for v in result.verdict}
    assert verdict[("baton", "redis")].backend_ops_s == baton["requests_s"]
    assert verdict[("per-run lock", "redis")].backend_ops_s == perrun["requests_s"]
    assert verdict[("per-run lock", "redis")].duplicates == perrun["duplicates"]
    assert result.plots and all(p.exists() and p.stat().st_size > 0 for p in result.plots)
    assert "| per-run lock | redis | 3 | load |" in result.markdown


@pytest.mark.timeout(120)
def test_scale_quick_on_redis(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    result = scale.run(ctx, leader_nodes=3, reps=1, poll_s=3.0)
    footprint = result.data["footprint"]
    assert set(footprint) == {"bare import", "apscheduler 0 jobs", f"apscheduler {scale.JOBS} jobs",
                              "baton 0 jobs", f"baton {scale.JOBS} jobs"}
    for name, m in footprint.items():
        assert m["rss_kib"] > 10_000, name  # any Python process holds more than 10 MiB
    for name in ("baton 0 jobs", f"baton {scale.JOBS} jobs"):
        assert 0 < footprint[name]["healthz_s"] <= footprint[name]["readyz_s"]
    # 10,000 registered jobs cost memory, in Baton as in APScheduler
    assert footprint[f"baton {scale.JOBS} jobs"]["rss_kib"] > footprint["baton 0 jobs"]["rss_kib"]
    leaders = result.data["leaders"]
    assert leaders["nodes"] == 3 and leaders["polls"] >= 5
    assert leaders["leader_counts"] == [1] * leaders["polls"]
    # a node answering /healthz may not have asked who leads yet when the polls begin
    assert leaders["polls_all_agree"] >= leaders["polls"] - 2
    assert 0 < leaders["first_leader_s"] <= leaders["all_healthy_s"] + 1
    assert "exactly one leader at every poll" in result.markdown
