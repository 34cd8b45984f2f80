"""The checker must be able to fail: synthetic record sets with known defects, and the collector that feeds it.

Times are built on the probe grid (``EPOCH + k * interval``), so each test
states its scenario in fire-time indexes and the expected verdict follows
from the rules in ``loadtest.checker``'s docstring.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.checker import EPOCH, check, main
from loadtest.collector import make_app
from loadtest.servers import free_port

INTERVAL = 1.0
#: Fire time index 0 of the tests: a whole second, so on the 1 s grid.
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
JOBS = 3


def at(k: float, interval: float = INTERVAL) -> datetime:
    return T0 + timedelta(seconds=k * interval)


def rec(job: int, k: int, *, node: str = "node-1", token: int = 1, lag: float = 0.05,
        interval: float = INTERVAL) -> dict[str, Any]:
    """One probe record, as a node posts it, for fire time index ``k``."""
    return {"job": f"probe-{job:03d}", "scheduled_at": at(k, interval).isoformat(), "node": node, "token": token,
            "started_at": (at(k, interval) + timedelta(seconds=lag + job * 0.001)).isoformat()}


def run(ks: range | list[int], *, jobs: int = JOBS, **kw: Any) -> list[dict[str, Any]]:
    return [rec(j, k, **kw) for k in ks for j in range(jobs)]


def judge(records: list[dict[str, Any]], grace: float = 10.0, **kw: Any) -> dict[str, Any]:
    return check(records, jobs=kw.pop("jobs", JOBS), interval=kw.pop("interval", INTERVAL), start=None, end=None,
                 misfire_grace=grace, **kw)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_json(tmp_path: Path, records: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], *extra: str,
             grace: float = 10.0) -> tuple[int, dict[str, Any]]:
    """Run ``main`` on a records file; its exit code and its --json output."""
    path = write_jsonl(tmp_path / "probes.jsonl", records)
    code = main(["--records", str(path), "--jobs", str(JOBS), "--interval", str(INTERVAL),
                 "--misfire-grace", str(grace), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


# -- the checker -------------------------------------------------------------------------------

def test_epoch_matches_the_nodes() -> None:
    from node.jobs import INTERVAL_EPOCH

    assert EPOCH == INTERVAL_EPOCH


def test_clean_run_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = cli_json(tmp_path, run(range(20)), capsys)
    assert code == 0
    assert result["verdict"] == "pass"
    assert (result["records"], result["expected"]) == (60, 60)
    assert result["duplicates"] == result["fenced_sink_duplicates"] == result["missed"] == 0
    assert result["gaps"]["count"] == 0 and result["handoffs"] == 0


def test_duplicate_start_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [*run(range(10)), rec(1, 4, node="node-2", lag=0.2)]  # same token: two nodes believe they lead
    code, result = cli_json(tmp_path, records, capsys)
    assert code == 1 and result["verdict"] == "fail"
    assert result["duplicates"] == 1
    assert result["fenced_sink_duplicates"] == 1  # equal tokens pass the fence
    dup = result["duplicate_starts"][0]
    assert dup["job"] == "probe-001" and dup["starts"] == 2
    assert {r["node"] for r in dup["runs"]} == {"node-1", "node-2"}


def test_stale_token_duplicate_is_fenced() -> None:
    records = [*run(range(5), token=1), *run(range(5, 10), node="node-2", token=2),
               rec(1, 5, node="node-1", token=1, lag=0.5)]  # the old leader wakes up after the new one ran 5
    result = judge(records)
    assert result["duplicates"] == 1
    assert [r["token"] for r in result["duplicate_starts"][0]["runs"]] == [2, 1]
    assert result["fenced_sink_duplicates"] == 0
    assert result["stale_records"] == 1 and result["handoffs"] == 1
    assert result["verdict"] == "fail"


def test_newer_token_after_stale_run_passes_the_fence_twice() -> None:
    records = [*run(range(5), token=1), rec(1, 5, token=1, lag=0.01), *run(range(5, 10), node="node-2", token=2)]
    result = judge(records)
    assert result["duplicates"] == 1 and result["fenced_sink_duplicates"] == 1


def failover(catch_up_jobs: range | list[int] = range(JOBS)) -> list[dict[str, Any]]:
    """node-1 (token 1) fires 0..3 and dies; node-2 (token 2) takes over at 8.9 s and catches up fire time 8."""
    return [*run(range(4)), *[rec(j, 8, node="node-2", token=2, lag=0.9) for j in catch_up_jobs],
            *run(range(9, 13), node="node-2", token=2)]


def test_gap_with_catch_up_is_not_a_miss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = cli_json(tmp_path, failover(), capsys)
    assert code == 0 and result["missed"] == 0
    gaps = result["gaps"]
    assert gaps["count"] == 1
    gap = gaps["list"][0]
    assert (gap["start"], gap["end"]) == (at(4).isoformat(), at(8).isoformat())
    assert gap["missing_fire_times"] == 4
    assert gap["duration_s"] == gaps["p50_s"] == gaps["p99_s"] == gaps["max_s"] == 4.0
    assert gap["wall_s"] == pytest.approx(5.848, abs=0.01)  # 3.052 -> 8.9
    assert gap["handoff"] and result["handoffs"] == 1
    assert result["excused"]["coalesced"] == 4 * JOBS


def test_gap_longer_than_grace_is_excused_unless_strict() -> None:
    records = failover()
    assert judge(records, grace=2.0)["missed"] == 0  # 4 and 5 lie beyond the catch-up's look-back: by design
    strict = judge(records, grace=2.0, strict=True)
    assert strict["missed"] == 2 * JOBS
    assert {m["scheduled_at"] for m in strict["missed_fire_times"]} == {at(4).isoformat(), at(5).isoformat()}


def test_partly_fired_instant_before_a_gap_is_excused() -> None:
    records = [r for r in failover() if not (r["scheduled_at"] == at(3).isoformat() and r["job"] != "probe-000")]
    result = judge(records, grace=2.0)
    assert result["missed"] == 0 and result["excused"]["leaderless"] > 0
    assert result["gaps"]["list"][0]["start"] == at(4).isoformat()


def test_job_left_out_of_the_catch_up_is_missed() -> None:
    result = judge(failover(catch_up_jobs=[0, 2]), grace=2.0)
    assert result["verdict"] == "fail"
    assert result["missed"] == 3  # probe-001 at 4, 5, 6; 7 and 8 are coalesced into its run at 9
    assert {m["job"] for m in result["missed_fire_times"]} == {"probe-001"}


def test_missing_fire_time_without_coalescing_run_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [r for r in run(range(20)) if not (r["job"] == "probe-001" and r["scheduled_at"] == at(5).isoformat())]
    code, result = cli_json(tmp_path, records, capsys, grace=0.5)
    assert code == 1 and result["verdict"] == "fail"
    assert result["missed"] == 1
    assert result["missed_fire_times"] == [{"job": "probe-001", "scheduled_at": at(5).isoformat()}]
    assert result["gaps"]["count"] == 0  # the others ran: a live leader skipped it


def test_a_live_leader_skipping_within_the_grace_is_still_a_miss() -> None:
    """Coalescing excuses a skip only across a handoff; the same token on both sides is a lost run."""
    records = [r for r in run(range(20)) if not (r["job"] == "probe-001" and r["scheduled_at"] == at(5).isoformat())]
    result = judge(records, grace=2.0)
    assert result["missed"] == 1 and result["excused"]["coalesced"] == 0


def test_skip_across_a_handoff_within_the_grace_is_coalesced() -> None:
    records = run(range(6), token=1) + run(range(7, 20), node="node-2", token=2)
    records = [r for r in records if not (r["job"] == "probe-001" and r["scheduled_at"] == at(5).isoformat())]
    result = judge(records, grace=3.0)
    assert result["missed"] == 0, result["missed_fire_times"]
    assert result["excused"]["coalesced"] >= 1


def test_runs_still_in_flight_at_the_end_are_excused() -> None:
    records = [r for r in run(range(20)) if not (r["job"] != "probe-000" and r["scheduled_at"] == at(19).isoformat())]
    result = judge(records, grace=0.5)
    assert result["missed"] == 0 and result["excused"]["window_end"] == 2
    late = check(records, jobs=JOBS, interval=INTERVAL, start=None, end=at(30), misfire_grace=0.5)
    # two jobs at 19, and every job at 20..28; 29 and 30 lie within grace + interval of the end
    assert late["missed"] == 2 + 9 * JOBS and late["excused"]["window_end"] == 2 * JOBS
    assert late["open_gap"] == {"start": at(20).isoformat(), "missing_fire_times": 11}


def test_window_start_narrows_and_skips_start_up() -> None:
    old = run(range(5), token=1)
    new = run(range(100, 110), node="node-3", token=7)
    result = check(old + new, jobs=JOBS, interval=INTERVAL, start=at(50), end=None, misfire_grace=1.0)
    assert result["records"] == 30 and result["expected"] == 30 and result["verdict"] == "pass"
    assert result["window"]["start"] == at(100).isoformat()


def test_more_jobs_than_seen_are_missed() -> None:
    result = judge(run(range(10)), grace=1.0, jobs=JOBS + 1)
    assert result["missed"] == 7  # probe-003 never ran; its fire times 7, 8, 9 are within the end allowance


def test_fractional_interval_grid() -> None:
    interval = 0.1
    start = EPOCH + timedelta(seconds=800_000_000)
    records = [{"job": f"probe-{j:03d}", "scheduled_at": (start + k * timedelta(seconds=interval)).isoformat(),
                "node": "n", "token": 1, "started_at": (start + timedelta(seconds=k * interval + 0.01)).isoformat()}
               for k in range(50) for j in range(2)]
    result = check(records, jobs=2, interval=interval, start=None, end=None, misfire_grace=0.0)
    assert result["expected"] == 100 and result["missed"] == 0 and result["verdict"] == "pass"
    assert result["warnings"] == []


def test_no_records_fails() -> None:
    result = check([], jobs=JOBS, interval=INTERVAL, start=at(0), end=at(10), misfire_grace=1.0)
    assert result["verdict"] == "fail" and result["expected"] == 11 * JOBS


def test_malformed_jsonl_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps(rec(0, 0)) + "\n" + '{"job": "probe-001", "sched\n' + json.dumps(rec(2, 0)) + "\n")
    code = main(["--records", str(path), "--jobs", "3", "--interval", "1", "--misfire-grace", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:2:" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_invalid_record_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = rec(0, 1)
    bad["scheduled_at"] = "2025-03-01T12:00:01"  # no offset
    path = write_jsonl(tmp_path / "probes.jsonl", [rec(0, 0), bad])
    assert main(["--records", str(path), "--jobs", "1", "--interval", "1", "--misfire-grace", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "no UTC offset" in err


def test_missing_inputs_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--records", str(tmp_path / "nope.jsonl"), "--jobs", "1", "--interval", "1",
                 "--misfire-grace", "1"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["--records", str(write_jsonl(tmp_path / "p.jsonl", [])), "--interval", "1"]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_torn_last_line_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "probes.jsonl", run(range(10)))
    with path.open("a") as f:
        f.write('{"job": "probe-000", "sche')
    code = main(["--records", str(path), "--jobs", "3", "--interval", "1", "--misfire-grace", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and any("torn" in w for w in result["warnings"])


def test_state_file_and_chaos_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = write_jsonl(tmp_path / "probes.jsonl", failover())
    chaos = write_jsonl(tmp_path / "chaos.jsonl", [
        {"ts": at(3.5).isoformat(), "fault": "kill", "target": "node-1", "phase": "start"},
        {"ts": at(10.5).isoformat(), "fault": "kill", "target": "node-3", "phase": "start"},  # a follower
        {"ts": at(11).isoformat(), "fault": "pause", "target": "node-2", "phase": "start"},
        {"ts": at(11.5).isoformat(), "fault": "pause", "target": "node-2", "phase": "end"},
    ])
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"probe_jobs": JOBS, "probe_interval": INTERVAL, "misfire_grace": 10,
                                 "started_at": at(-30).isoformat(), "collector_file": records.name,
                                 "chaos_log": str(chaos)}))
    assert main(["--state", str(state), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["expected"] == 13 * JOBS and result["verdict"] == "pass"
    faults = result["faults"]
    first, follower, pause = faults["list"]
    assert first["failover_s"] == pytest.approx(5.4) and first["hit_leader"] and first["new_leader"] == "node-2"
    assert follower["failover_s"] is None and not follower["hit_leader"]
    assert pause["failover_s"] is None and pause["hit_leader"]
    assert faults["by_kind"]["kill"] == {"faults": 2, "failovers": 1, "p50_s": 5.4, "p99_s": 5.4, "max_s": 5.4}

    # explicit flags win over the state file
    assert main(["--state", str(state), "--jobs", str(JOBS + 1), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["schedule"]["jobs"] == JOBS + 1


def test_state_file_before_any_fault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`up` names a chaos log that only the first fault creates: no log yet means no faults, not an error."""
    records = write_jsonl(tmp_path / "probes.jsonl", run(range(10)))
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"probe_jobs": JOBS, "probe_interval": INTERVAL, "misfire_grace": 10,
                                 "collector_file": records.name, "chaos_log": "chaos.jsonl"}))
    assert main(["--state", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"
    # a chaos log asked for by flag must exist
    assert main(["--state", str(state), "--chaos-log", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err


def test_table_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "probes.jsonl", [*failover(), rec(0, 10, node="node-1", token=1, lag=0.3)])
    assert main(["--records", str(path), "--jobs", "3", "--interval", "1", "--misfire-grace", "10"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "duplicate" in out


# -- the collector -----------------------------------------------------------------------------

async def test_collector_stores_every_record_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "probes.jsonl"
    old = [rec(0, 0), rec(1, 0)]
    write_jsonl(path, old)
    app = make_app(path)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://collector") as client:
        sent = [rec(j, k) for k in range(1, 41) for j in range(5)]
        responses = await asyncio.gather(*(client.post("/probe", json=r) for r in sent))
        assert [r.status_code for r in responses] == [200] * len(sent)

        for body in (b"not json", b"[1, 2]", json.dumps({**rec(0, 1), "token": "7"}).encode(),
                     json.dumps({**rec(0, 1), "started_at": "2025-03-01 12:00:00"}).encode(),
                     json.dumps({k: v for k, v in rec(0, 1).items() if k != "node"}).encode()):
            response = await client.post("/probe", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, body
            assert "error" in response.json()

        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/count")).json() == {"records": len(old) + len(sent)}
    await app.state.sink.close()

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[:2] == old  # appended, not truncated
    stored = lines[2:]
    assert sorted((r["job"], r["scheduled_at"]) for r in stored) == sorted((r["job"], r["scheduled_at"]) for r in sent)
    assert all(datetime.fromisoformat(r["received_at"]).tzinfo is not None for r in stored)
    result = check(lines, jobs=5, interval=INTERVAL, start=at(1), end=None, misfire_grace=1.0)
    assert result["verdict"] == "pass" and result["records"] == len(sent)


async def test_collector_write_failure_is_503(tmp_path: Path) -> None:
    app = make_app(tmp_path / "probes.jsonl")

    def broken(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    app.state.sink._write = broken
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector") as client:
        response = await client.post("/probe", json=rec(0, 0))
    assert response.status_code == 503 and "No space" in response.json()["error"]
    await app.state.sink.close()


def start_collector(port: int, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "loadtest.collector", "--port", str(port), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_collector_process(tmp_path: Path) -> None:
    out = tmp_path / "probes.jsonl"
    port = free_port()
    proc = start_collector(port, out)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "collector did not come up"
            time.sleep(0.05)
        assert httpx.post(f"{url}/probe", json=rec(0, 0), timeout=5).status_code == 200
        assert out.read_text().count("\n") == 1  # on disk before the 200

        second = start_collector(port, tmp_path / "other.jsonl")
        _, err = second.communicate(timeout=30)
        assert second.returncode == 2
        assert "port already in use" in err and len(err.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises the signal


def test_collector_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = start_collector(free_port(), blocker / "probes.jsonl")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "cannot append" in err and len(err.strip().splitlines()) == 1
    if os.geteuid() != 0:  # root writes anywhere; a read-only directory only stops others
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        proc = start_collector(free_port(), ro / "probes.jsonl")
        assert proc.wait(timeout=30) == 2
