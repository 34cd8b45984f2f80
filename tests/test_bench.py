"""``python -m loadtest bench`` end to end in its smallest real form, and its answers to bad input.

One quick run of the failover and fire-lag sections on a real Redis (about a
minute and a half): the report must exist, lead with the verdict table, name
Baton on Redis with measured numbers, and carry plain numbers in its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def numbers(value: Any) -> list[Any]:
    """Every leaf of a JSON value."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in numbers(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in numbers(v)]
    return [value]


@pytest.mark.timeout(300)
def test_quick_failover_and_fire_lag_on_redis(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = bench("--quick", "--sections", "failover,fire_lag", "--backends", "redis", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    md = (out / "report.md").read_text()
    lines = md.splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    header = lines[first_table]
    for column in ("system", "backend", "duplicates", "misses", "failover p99 (x TTL)", "fire-lag ratio",
                   "backend ops/s"):
        assert column in header, header
    table = []
    for line in lines[first_table + 2:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    baton = [row for row in table if row[:2] == ["baton", "redis"]]
    assert len(baton) == 1, table
    duplicates, misses, failover, ratio = baton[0][2:6]
    assert duplicates == "0", baton  # claims hold under every fault
    int(misses)
    assert float(failover) > 0 and float(ratio) > 0, baton
    assert ["apscheduler3 (single process)", "-"] in [row[:2] for row in table], table
    assert "## 1. Failover gap" in md and "## 2. Fire lag" in md
    for image in ("failover.png", "fire_lag.png"):
        assert f"]({image})" in md
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads((out / "report.json").read_text())
    assert doc["sections"]["failover"]["status"] == "ok" and doc["sections"]["fire_lag"]["status"] == "ok"
    assert doc["machine"]["cores"] >= 1 and doc["date"]
    row = next(r for r in doc["verdict"] if r["system"] == "baton" and r["backend"] == "redis")
    for key in ("duplicates", "misses", "failover_p99_ttl", "fire_lag_ratio"):
        assert isinstance(row[key], int | float) and not isinstance(row[key], bool), (key, row)
    kill = doc["sections"]["failover"]["data"]["backends"]["redis"]["by_kind"]["kill"]
    assert kill["failovers"] >= 1 and isinstance(kill["p99_s"], float)
    lag = doc["sections"]["fire_lag"]["data"]["results"]["1000"]
    assert isinstance(lag["redis"]["p99_ms"], float) and isinstance(lag["apscheduler3 (single process)"]["p99_ms"],
                                                                    float)
    assert lag["apscheduler3 (single process)"]["self_ratio_p99"] >= 1.0  # plain against itself, the yardstick
    assert len(lag["redis"]["round_ratios_p99"]) == 1  # one round in a quick run: one ratio of its own
    low, high = lag["redis"]["ratio_p99_interval"]  # the ratio over resampled seconds: around the ratio itself
    assert low <= lag["redis"]["ratio_p99"] * 1.01 and high >= lag["redis"]["ratio_p99"] * 0.99
    assert "Plain against itself" in md
    (steal,) = lag["redis"]["round_steal"]  # what the host took from the measuring core, read from the kernel
    assert 0.0 <= steal <= 1.0
    assert doc["sections"]["fire_lag"]["data"]["redone_rounds"] == {"100": [], "1000": []}  # none in a quick run
    assert all(v is None or isinstance(v, str | int | float | bool) for v in numbers(doc))
    assert not (out / "out").exists(), "scratch space is removed after a clean run"


def test_a_missing_section_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A section module that is not there yet fails alone: one line in the report, exit 1, no traceback."""
    from loadtest.bench import runner

    monkeypatch.setattr(runner, "SECTIONS", (*runner.SECTIONS, "nosuch"))
    code = runner.main(["--sections", "nosuch", "--out", str(tmp_path)])
    assert code == 1
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[2].startswith("| system |")  # the verdict table is still first
    assert "**Failed**" in md and "no module loadtest.bench.nosuch" in md
    assert json.loads((tmp_path / "report.json").read_text())["sections"]["nosuch"]["status"] == "failed"


@pytest.mark.parametrize(("args", "says"), [
    (["--sections", "failover,nosuch"], "unknown section(s) 'nosuch'"),
    (["--backends", "mysql"], "unknown backend(s) 'mysql'"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--rounds", "many"], "invalid int value"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_with_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    done = bench(*args, "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_unwritable_out_dir_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = bench("--out", str(blocker / "bench"), timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is not writable" in done.stderr, done.stderr


def test_verdict_rows_merge_per_system_and_backend() -> None:
    """Sections fill different columns of one row; a later section's None never erases a number."""
    from loadtest.bench.base import SectionResult, VerdictRow
    from loadtest.bench.report import SectionOutcome, merge_verdict, verdict_markdown

    def outcome(name: str, *rows: VerdictRow) -> SectionOutcome:
        return SectionOutcome(name, SectionResult(name, name, {}, "", [], list(rows)), None, 1.0)

    rows = merge_verdict([
        outcome("failover", VerdictRow("baton", "redis", duplicates=0, misses=2, failover_p99_ttl=1.1)),
        outcome("fire_lag", VerdictRow("apscheduler3 (single process)", "-", fire_lag_ratio=1.0),
                VerdictRow("baton", "redis", fire_lag_ratio=2.5), VerdictRow("baton", "file", fire_lag_ratio=1.2)),
        outcome("load", VerdictRow("baton", "redis", misses=None, backend_ops_s=1234.5)),
        SectionOutcome("scale", None, "RuntimeError: boom", 0.0),
    ])
    assert [(r.system, r.backend) for r in rows] == [
        ("baton", "file"), ("baton", "redis"), ("apscheduler3 (single process)", "-")]
    redis = rows[1]
    assert (redis.duplicates, redis.misses, redis.failover_p99_ttl, redis.fire_lag_ratio, redis.backend_ops_s) == (
        0, 2, 1.1, 2.5, 1234.5)
    table = verdict_markdown(rows).splitlines()
    assert table[3] == "| baton | redis | 0 | 2 | 1.10 | 2.50 | 1,234 |"
    assert table[2].endswith("| n/a | n/a | n/a | 1.20 | n/a |")


def test_a_kill_is_held_to_the_lease_ttl_only_where_a_dead_holder_keeps_it() -> None:
    """The kill target follows the registry: within a second where a dead holder gives the lease up at once
    (a PostgreSQL session ends, the file backend sees the holder's process gone), else a TTL and a retry."""
    from loadtest.bench.failover import TIMING, target

    ttl_bound = TIMING.ttl + TIMING.retry_period
    assert {b: target(b, "kill", TIMING)[0] for b in ("file", "redis", "postgres", "etcd")} == {
        "file": 1.0, "redis": ttl_bound, "postgres": 1.0, "etcd": ttl_bound}
    assert target("etcd", "term", TIMING) == (0.25, "< 0.25 s")


def test_plain_against_itself_is_the_larger_p99_over_the_smaller() -> None:
    from loadtest.bench.fire_lag import self_ratio

    fast, slow = [0.001] * 100, [0.002] * 100
    assert self_ratio(fast, slow) == self_ratio(slow, fast) == 2.0
    assert self_ratio(fast, fast) == 1.0
    assert self_ratio([], slow) is None


def test_the_backends_order_turns_so_each_takes_each_place_once() -> None:
    from loadtest.bench.fire_lag import rotated

    kinds = ["file", "redis", "postgres", "etcd"]
    orders = [rotated(kinds, turn) for turn in range(len(kinds))]
    assert all(sorted(order) == sorted(kinds) for order in orders)
    assert all(sorted(order[place] for order in orders) == sorted(kinds) for place in range(len(kinds)))
    assert rotated(kinds, 4) == kinds and rotated([], 3) == []


def test_a_rounds_ratio_is_its_baton_p99_over_the_same_rounds_plain_p99() -> None:
    from loadtest.bench.fire_lag import round_ratio

    assert round_ratio([0.003] * 100, [0.001] * 50 + [0.002] * 50) == 1.5
    assert round_ratio([], [0.001] * 100) is None
    assert round_ratio([0.001] * 100, []) is None


STAT = """cpu  4075611 133 624188 11725328 35391 0 34175 209483 0 0
cpu0 2412218 133 270163 5514708 15969 0 12135 104528 0 0
cpu1 1663392 0 354025 6210619 19421 0 22039 104954 0 0
intr 1 2 3
"""


def test_steal_is_read_per_core_from_the_kernels_counters() -> None:
    import os

    from loadtest.bench.steal import share, stolen

    tick = os.sysconf("SC_CLK_TCK")
    assert stolen({0}, STAT) == 104528 / tick
    assert stolen({0, 1}, STAT) == (104528 + 104954) / tick
    assert stolen({2}, STAT) is None  # a core the kernel does not list: no reading rather than a wrong one
    here = stolen(os.sched_getaffinity(0))  # this machine's own counters
    assert here is not None and here >= 0.0
    assert share(1.0, 1.5, wall=10.0, cores=1) == 0.05
    assert share(1.0, 1.5, wall=10.0, cores=2) == 0.025
    assert share(None, 1.5, wall=10.0, cores=1) is None


def test_rounds_the_host_took_cpu_from_are_measured_again_and_the_quietest_kept() -> None:
    from loadtest.bench.fire_lag import STEAL_LIMIT, Round, Window, quiet_rounds

    def window(steal: float | None, lag: float) -> Window:
        w = Window()
        w.lags, w.steal = [lag] * 100, steal
        return w

    def made(steal: float | None, lag: float) -> Round:
        return Round(window(0.0, 0.001), {"file": window(steal, lag)}, {"file": {"notes": ["slow stop"]}},
                     window(0.0, 0.001))

    def run(plan: list[Round], rounds: int, budget: int) -> tuple[list[float], list[float], list[int], int]:
        turns: list[int] = []
        agains = [0]

        def measure(turn: int) -> Round:
            turns.append(turn)
            return plan.pop(0)

        def again() -> None:
            agains[0] += 1

        kept, aside = quiet_rounds(rounds, budget, measure, again)
        return [r.baton["file"].lags[0] for r in kept], [a["steal"] for a in aside], turns, agains[0]

    quiet, spell = STEAL_LIMIT / 2, STEAL_LIMIT * 3
    # enough quiet rounds within the budget: the noisy ones are put aside, the rest never measured
    kept, aside, turns, agains = run([made(spell, 0.004), made(quiet, 0.0012), made(None, 0.0011),
                                      made(quiet, 0.0013), made(spell, 0.009)], 3, 2)
    assert kept == [0.0012, 0.0011, 0.0013] and aside == [round(spell, 4)]
    assert turns == [0, 1, 2, 3] and agains == 1  # the backends' order turns on; the bar learns of one more round
    # the budget spent: the quietest rounds are kept, whatever their steal
    kept, aside, turns, agains = run([made(spell * 2, 0.005), made(quiet, 0.0012), made(spell * 3, 0.006),
                                      made(spell, 0.004), made(spell * 4, 0.007)], 3, 2)
    assert kept == [0.005, 0.0012, 0.004] and aside == [round(spell * 3, 4), round(spell * 4, 4)]  # measured order
    assert turns == [0, 1, 2, 3, 4] and agains == 2
    # no budget (a quick run): every round counts
    kept, aside, turns, agains = run([made(spell, 0.004)], 1, 0)
    assert kept == [0.004] and aside == [] and agains == 0
    # what a put-aside round reports: its own ratios and notes
    _, aside_rounds = quiet_rounds(1, 1, lambda turn: [made(spell, 0.004), made(quiet, 0.001)][turn], lambda: None)
    assert aside_rounds == [{"steal": round(spell, 4), "round_ratios_p99": {"file": 4.0}, "notes": ["slow stop"]}]
