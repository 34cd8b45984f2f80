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

from loadtest.check_cli import main
from loadtest.checker import DEFAULT_CLAIM_AHEAD, KINDS, check
from loadtest.collector import make_app
from loadtest.probe_log import EPOCH
from loadtest.servers import free_port

INTERVAL = 1.0
#: Fire time index 0 of the tests: a whole second, so on the 1 s grid.
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
JOBS = 3


def at(k: float, interval: float = INTERVAL) -> datetime:
    return T0 + timedelta(seconds=k * interval)


def rec(job: int, k: int, *, node: str = "node-1", token: int = 1, lag: float = 0.05,
        interval: float = INTERVAL, kind: str | None = None, prefix: str = "probe") -> dict[str, Any]:
    """One probe record, as a node posts it, for fire time index ``k`` (no ``kind``: as older probes post it)."""
    record = {"job": f"{prefix}-{job:03d}", "scheduled_at": at(k, interval).isoformat(), "node": node,
              "token": token, "started_at": (at(k, interval) + timedelta(seconds=lag + job * 0.001)).isoformat()}
    if kind is not None:
        record["kind"] = kind
    return record


def run(ks: range | list[int], *, jobs: int = JOBS, **kw: Any) -> list[dict[str, Any]]:
    return [rec(j, k, **kw) for k in ks for j in range(jobs)]


def judge(records: list[dict[str, Any]], grace: float = 10.0, **kw: Any) -> dict[str, Any]:
    if "probes" not in kw:
        kw.setdefault("jobs", JOBS)
        kw.setdefault("interval", INTERVAL)
    return check(records, start=kw.pop("start", None), end=kw.pop("end", None), misfire_grace=grace, **kw)


def fault(kind: str, target: str, ts: datetime, **extra: Any) -> dict[str, Any]:
    return {"ts": ts.isoformat(), "fault": kind, "target": target, "phase": "start", **extra}


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


def keep(records: list[dict[str, Any]], *drop: tuple[int, int]) -> list[dict[str, Any]]:
    """``records`` without the (job, fire time index) pairs in ``drop`` (1 s grid, probe- jobs)."""
    gone = {(f"probe-{j:03d}", at(k).isoformat()) for j, k in drop}
    return [r for r in records if (r["job"], r["scheduled_at"]) not in gone]


# -- what the checker shares with the nodes -----------------------------------------------------

def test_constants_match_the_nodes() -> None:
    from node.config import Settings
    from node.jobs import INTERVAL_EPOCH
    from node.outcomes import RunKind

    assert EPOCH == INTERVAL_EPOCH
    assert set(KINDS) == {k.value for k in RunKind}
    assert Settings.model_fields["claim_ahead"].default == DEFAULT_CLAIM_AHEAD


def test_probe_shape_spec() -> None:
    from node.probes import ProbeShape, ProbeSpecError, effective_shapes, parse_shapes, spec_text

    shapes = parse_shapes("basic:2@1, sparse@8s,long:1@8/2.5,recover:1@4", count=3, interval=0.5)
    assert shapes == [ProbeShape("basic", 2, 1.0), ProbeShape("sparse", 3, 8.0), ProbeShape("long", 1, 8.0, 2.5),
                      ProbeShape("recover", 1, 4.0)]
    assert [s.job_ids()[0] for s in shapes] == ["probe-000", "sparse-000", "long-000", "recover-000"]
    assert [s.max_instances for s in shapes] == [4, 4, 1, 4] and [s.recover for s in shapes] == [0, 0, 0, 1]
    assert spec_text(shapes) == "basic:2@1,sparse:3@8,long:1@8/2.5,recover:1@4"
    assert parse_shapes(spec_text(shapes)) == shapes
    assert effective_shapes("", 3, 0.1) == [ProbeShape("basic", 3, 0.1)]  # no spec: today's probes
    assert effective_shapes("", 0, 1.0) == []
    assert shapes[1].next_fire_time(EPOCH + timedelta(seconds=800_000_007.5)) == EPOCH + timedelta(
        seconds=800_000_008)
    assert shapes[1].next_fire_time(EPOCH + timedelta(seconds=800_000_008)) == EPOCH + timedelta(
        seconds=800_000_016)  # strictly after
    for bad, says in (("meteor:1@1", "unknown probe shape"), ("sparse:1@x", "is not SHAPE"),
                      ("long:1@8", "needs a body"), ("long:1@2/3", "must be shorter"), ("basic@0", "positive"),
                      ("basic:1@1,basic:2@1", "twice")):
        with pytest.raises(ProbeSpecError, match=says):
            parse_shapes(bad)


# -- the checker -------------------------------------------------------------------------------

def test_clean_run_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = cli_json(tmp_path, run(range(20)), capsys)
    assert code == 0
    assert result["verdict"] == "pass"
    assert (result["records"], result["expected"]) == (60, 60)
    assert result["duplicates"] == result["fenced_sink_duplicates"] == result["missed"] == result["early"] == 0
    assert result["gaps"]["count"] == 0 and result["handoffs"] == 0
    assert result["excused_gaps"] == [] and result["lost_to_crash"]["count"] == 0


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


def failover(catch_up_jobs: range | list[int] = range(JOBS), kind: str | None = "catch_up") -> list[dict[str, Any]]:
    """node-1 (token 1) fires 0..3 and dies; node-2 (token 2) takes over at 8.9 s and catches up fire time 8."""
    return [*run(range(4)), *[rec(j, 8, node="node-2", token=2, lag=0.9, kind=kind) for j in catch_up_jobs],
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
    assert result["excused"]["catch_up"] == 4 * JOBS
    # every excused gap names the run that covers it
    assert len(result["excused_gaps"]) == JOBS
    for j, excused in enumerate(sorted(result["excused_gaps"], key=lambda g: g["job"])):
        assert (excused["excuse"], excused["first"], excused["last"], excused["fire_times"]) == (
            "catch_up", at(4).isoformat(), at(7).isoformat(), 4)
        covered = excused["covered_by"]
        assert (covered["job"], covered["scheduled_at"], covered["node"], covered["token"], covered["kind"]) == (
            f"probe-{j:03d}", at(8).isoformat(), "node-2", 2, "catch_up")


def test_gap_covered_by_an_unlabelled_run_is_a_miss() -> None:
    """The same failover, but the new leader's first runs do not say they are a catch-up: nothing excuses the gap."""
    result = judge(failover(kind=None))
    assert result["verdict"] == "fail" and result["missed"] == 4 * JOBS
    assert all("not a catch-up" in m["reason"] for m in result["missed_fire_times"])


def test_gap_longer_than_grace_is_leaderless_beyond_the_grace() -> None:
    result = judge(failover(), grace=2.0)
    assert result["missed"] == 0
    # 4, 5 and 6 lie more than the grace before the new leader's first run (8.9): no catch-up could reach them
    assert result["excused"] == {"catch_up": JOBS, "leaderless": 3 * JOBS, "window_end": 0, "coalesced": JOBS}
    leaderless = [g for g in result["excused_gaps"] if g["excuse"] == "leaderless"]
    assert {(g["first"], g["last"]) for g in leaderless} == {(at(4).isoformat(), at(6).isoformat())}
    assert leaderless[0]["covered_by"]["node"] == "node-2" and leaderless[0]["no_leader_s"] == pytest.approx(4.9)


def test_partly_fired_instant_before_a_gap_is_excused() -> None:
    records = [r for r in failover() if not (r["scheduled_at"] == at(3).isoformat() and r["job"] != "probe-000")]
    result = judge(records, grace=2.0)
    assert result["missed"] == 0 and result["excused"]["leaderless"] > 0
    assert result["gaps"]["list"][0]["start"] == at(4).isoformat()


def test_job_left_out_of_the_catch_up_is_missed() -> None:
    result = judge(failover(catch_up_jobs=[0, 2]), grace=2.0)
    assert result["verdict"] == "fail"
    # probe-001 at 4, 5, 6 lie beyond the grace of the new leader (leaderless); 7 and 8 it should have caught up
    assert result["missed"] == 2
    assert [(m["job"], m["scheduled_at"]) for m in result["missed_fire_times"]] == [
        ("probe-001", at(7).isoformat()), ("probe-001", at(8).isoformat())]


def test_missing_fire_time_without_coalescing_run_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = cli_json(tmp_path, keep(run(range(20)), (1, 5)), capsys, grace=0.5)
    assert code == 1 and result["verdict"] == "fail"
    assert result["missed"] == 1
    assert result["missed_fire_times"] == [{"job": "probe-001", "scheduled_at": at(5).isoformat(),
                                            "reason": "the leader that ran the job before and after it skipped it"}]
    assert result["gaps"]["count"] == 0  # the others ran: a live leader skipped it


def test_a_live_leader_skipping_within_the_grace_is_still_a_miss() -> None:
    result = judge(keep(run(range(20)), (1, 5)), grace=2.0)
    assert result["missed"] == 1 and result["excused"]["catch_up"] == 0


def test_skip_across_a_handoff_is_excused_only_by_a_catch_up() -> None:
    """The old checker excused any skip across a handoff as 'coalesced'; only a catch-up run does now."""
    ordinary = run(range(6), token=1) + run(range(7, 20), node="node-2", token=2)
    result = judge(keep(ordinary, (1, 5)), grace=3.0)
    assert result["missed"] == 1 + JOBS  # probe-001 at 5, and every job at 6
    caught_up = run(range(6), token=1) + run([7], node="node-2", token=2, kind="catch_up") + run(
        range(8, 20), node="node-2", token=2)
    result = judge(keep(caught_up, (1, 5)), grace=3.0)
    assert result["missed"] == 0, result["missed_fire_times"]
    assert result["excused"]["catch_up"] == 1 + JOBS


def test_a_catch_up_does_not_cover_what_an_older_leader_skipped_while_firing() -> None:
    """node-1 keeps firing probe-000 and -002 at 5..7 but not probe-001: a catch-up does not cover 5 and 6."""
    records = [*run(range(5)), *[rec(j, k) for k in range(5, 8) for j in (0, 2)],
               *run([9], node="node-2", token=2, lag=0.5, kind="catch_up"), *run(range(10, 15), node="node-2", token=2)]
    result = judge(records)
    assert [(m["job"], m["scheduled_at"]) for m in result["missed_fire_times"]] == [
        ("probe-001", at(k).isoformat()) for k in (5, 6)]
    assert all("older leader" in m["reason"] for m in result["missed_fire_times"])
    # 7 was node-1's last, partly fired instant (it may have died between two jobs); 8 nobody led for
    assert result["excused"]["catch_up"] == JOBS + 1


def aimed_sigterms(*, ran_by_new_leader: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Finding 1 of issue #12: 3 nodes, 3 probe jobs every 2 s, TTL 2 s; SIGTERM the leader 80 ms before a fire
    time, restart it, 8 times. The dying leader claimed the fire time ahead and released; the new leader's
    claim was refused, so the fire time never ran, and the job's next run is an ordinary fire time."""
    interval, records, chaos = 2.0, [], []
    nodes = ["node-1", "node-2", "node-3"]
    k = 0
    for token in range(1, 10):
        node = nodes[(token - 1) % 3]
        first = k
        k += 5  # each leader runs a few fire times before the next SIGTERM
        for i in range(first, k):
            records += [rec(j, i, node=node, token=token, interval=interval) for j in range(JOBS)]
        if token < 9:
            chaos.append(fault("term", node, at(k, interval) - timedelta(seconds=0.08),
                               aim="before-fire:0.08", fire_time=at(k, interval).isoformat()))
            if ran_by_new_leader:  # what the fixed core does: the fire time is handed back and run once
                records += [rec(j, k, node=nodes[token % 3], token=token + 1, interval=interval) for j in range(JOBS)]
            k += 1
    return records, chaos


def test_finding_1_sigterm_before_a_fire_time_is_24_misses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The old checker passed these records ('coalesced 24': a handoff, and the next run within the grace);
    no catch-up ran them, so the strict checker fails them, each fire time named with its reason."""
    records, chaos = aimed_sigterms(ran_by_new_leader=False)
    path = write_jsonl(tmp_path / "probes.jsonl", records)
    log = write_jsonl(tmp_path / "chaos.jsonl", chaos)
    code = main(["--records", str(path), "--chaos-log", str(log), "--probes", "basic:3@2", "--misfire-grace", "30",
                 "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["verdict"] == "fail"
    assert result["missed"] == 24 and result["duplicates"] == 0
    assert result["excused"] == {"catch_up": 0, "leaderless": 0, "window_end": 0, "coalesced": 0}
    assert result["lost_to_crash"]["count"] == 0  # a SIGTERM is a graceful handoff, not a crash
    missed = {(m["job"], m["scheduled_at"]) for m in result["missed_fire_times"]}
    assert missed == {(f"probe-{j:03d}", e["fire_time"]) for e in chaos for j in range(JOBS)}
    assert all("is not a catch-up" in m["reason"] for m in result["missed_fire_times"])
    assert [f["aim"] for f in result["faults"]["list"]] == ["before-fire:0.08"] * 8

    fixed, chaos = aimed_sigterms(ran_by_new_leader=True)
    result = judge(fixed, grace=30.0, probes="basic:3@2", chaos=chaos)
    assert result["verdict"] == "pass" and result["missed"] == 0 and result["excused_gaps"] == []


def sparse_kill(*, kind: str, shape: str = "sparse", recovery: bool = False,
                target: str = "node-1") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One job every 4 s: node-1 runs 0..4; a ``kind`` fault hits ``target`` 50 ms before fire time 5; node-2
    takes over and runs 6.. (and, with ``recovery``, fire time 5 again as a recovery run)."""
    prefix = {"sparse": "sparse", "recover": "recover"}[shape]
    records = [rec(0, k, interval=4.0, prefix=prefix) for k in range(5)]
    if recovery:
        records.append(rec(0, 5, node="node-2", token=2, interval=4.0, prefix=prefix, lag=1.5, kind="recovery"))
    records += [rec(0, k, node="node-2", token=2, interval=4.0, prefix=prefix) for k in range(6, 10)]
    return records, [fault(kind, target, at(5, 4.0) - timedelta(seconds=0.05))]


def test_fire_time_claimed_by_a_killed_leader_is_lost_to_a_crash_not_a_pass() -> None:
    records, chaos = sparse_kill(kind="kill")
    result = judge(records, probes="sparse:1@4", chaos=chaos)
    assert result["verdict"] == "pass" and result["missed"] == 0
    assert result["lost_to_crash"]["count"] == 1 and sum(result["excused"].values()) == 0
    lost = result["lost_to_crash"]["list"][0]
    assert (lost["job"], lost["scheduled_at"]) == ("sparse-000", at(5, 4.0).isoformat())
    assert lost["fault"] == {"fault": "kill", "target": "node-1", "ts": chaos[0]["ts"], "leader_token": 1}
    ts = at(5, 4.0) - timedelta(seconds=0.05)
    assert lost["window"] == {"start": (ts - timedelta(seconds=0.1)).isoformat(),
                              "end": (ts + timedelta(seconds=DEFAULT_CLAIM_AHEAD + 0.1)).isoformat()}
    # a pause (the leader frozen holding its claims) is the same window; a graceful term is not
    assert judge(records, probes="sparse:1@4", chaos=sparse_kill(kind="pause")[1])["lost_to_crash"]["count"] == 1
    assert judge(records, probes="sparse:1@4", chaos=sparse_kill(kind="term")[1])["missed"] == 1
    # a kill of a follower, or of a leader whose claims could not reach that far, excuses nothing
    assert judge(records, probes="sparse:1@4", chaos=sparse_kill(kind="kill", target="node-3")[1])["missed"] == 1
    late = [{**chaos[0], "ts": (at(5, 4.0) - timedelta(seconds=0.5)).isoformat()}]
    assert judge(records, probes="sparse:1@4", chaos=late)["missed"] == 1
    assert judge(records, probes="sparse:1@4", chaos=late, claim_ahead=0.5)["lost_to_crash"]["count"] == 1


def test_a_lock_store_restart_just_before_a_fire_time_is_the_leaders_crash_window() -> None:
    """A lock-store restart ends the leader's lease at once (PostgreSQL drops its session): what it had claimed
    ahead is at-most-once, as in a crash; found by the failover suite on PostgreSQL (restart 140 ms before)."""
    records, _ = sparse_kill(kind="kill")
    restart = [fault("restart-backend", "backend", at(5, 4.0) - timedelta(seconds=0.14))]
    result = judge(records, probes="sparse:1@4", chaos=restart)
    assert result["verdict"] == "pass" and result["missed"] == 0 and result["lost_to_crash"]["count"] == 1
    early = [fault("restart-backend", "backend", at(5, 4.0) - timedelta(seconds=1.0))]
    assert judge(records, probes="sparse:1@4", chaos=early)["missed"] == 1  # its window ended before


def test_recoverable_fire_time_in_a_crash_window_must_run() -> None:
    records, chaos = sparse_kill(kind="kill", shape="recover")
    result = judge(records, probes="recover:1@4", chaos=chaos)
    assert result["verdict"] == "fail" and result["lost_to_crash"]["count"] == 0
    assert result["missed"] == 1 and "recovery" in result["missed_fire_times"][0]["reason"]
    records, chaos = sparse_kill(kind="kill", shape="recover", recovery=True)
    result = judge(records, probes="recover:1@4", chaos=chaos)
    assert result["verdict"] == "pass" and result["missed"] == 0 and result["duplicates"] == 0


def test_second_start_by_recovery_after_a_kill_is_at_least_once_not_a_duplicate() -> None:
    started = rec(0, 5, interval=4.0, prefix="recover", lag=0.01)  # node-1 started it, then was killed
    records, _ = sparse_kill(kind="kill", shape="recover", recovery=True)
    records.append(started)
    kill = [fault("kill", "node-1", at(5, 4.0) + timedelta(seconds=0.5))]
    result = judge(records, probes="recover:1@4", chaos=kill)
    assert result["verdict"] == "pass" and result["duplicates"] == 0 and result["fenced_sink_duplicates"] == 0
    assert result["at_least_once"]["count"] == 1
    again = result["at_least_once"]["list"][0]
    assert [r["kind"] for r in again["runs"]] == ["scheduled", "recovery"]
    assert again["kills"] == [{"fault": "kill", "target": "node-1", "ts": kill[0]["ts"]}]
    # without the kill (a graceful stop), or a second start that is no recovery run, or a job that is not
    # recoverable, it is a duplicate
    assert judge(records, probes="recover:1@4", chaos=[])["duplicates"] == 1
    assert judge(records, probes="recover:1@4", chaos=[{**kill[0], "fault": "term"}])["duplicates"] == 1
    ordinary = [{k: v for k, v in r.items() if k != "kind"} for r in records]
    assert judge(ordinary, probes="recover:1@4", chaos=kill)["duplicates"] == 1
    renamed = [{**r, "job": "sparse-000"} for r in records]
    assert judge(renamed, probes="sparse:1@4", chaos=kill)["duplicates"] == 1


@pytest.mark.parametrize("fault_kind", ["pause", "partition"])
def test_second_start_by_recovery_after_a_pause_or_partition_is_at_least_once(fault_kind: str) -> None:
    """A leader stopped (or cut off) past the TTL right after it started a recoverable run cannot report
    it; the next leader runs it again, as after a kill (the README's guarantees treat them alike)."""
    started = rec(0, 5, interval=4.0, prefix="recover", lag=0.01)
    records, _ = sparse_kill(kind=fault_kind, shape="recover", recovery=True)
    records.append(started)
    stopped = [fault(fault_kind, "node-1", at(5, 4.0) + timedelta(seconds=0.5))]
    result = judge(records, probes="recover:1@4", chaos=stopped)
    assert result["verdict"] == "pass" and result["duplicates"] == 0
    assert result["at_least_once"]["list"][0]["kills"] == [
        {"fault": fault_kind, "target": "node-1", "ts": stopped[0]["ts"]}]
    # a fault on another node excuses nothing
    elsewhere = [{**stopped[0], "target": "node-2"}]
    assert judge(records, probes="recover:1@4", chaos=elsewhere)["duplicates"] == 1


def test_a_recoverable_run_started_just_after_a_partition_began_is_at_least_once() -> None:
    """A leader cut off 30 ms before a fire time still believes its lease and starts the run; its record
    cannot reach the store, so the next leader runs it again (seen by the failover suite on etcd). Once the
    partition had ended before that start, the same two starts are a duplicate."""
    started = rec(0, 5, interval=4.0, prefix="recover", lag=0.01)
    records, _ = sparse_kill(kind="partition", shape="recover", recovery=True)
    records.append(started)
    cut = at(5, 4.0) - timedelta(seconds=0.03)
    chaos = [fault("partition", "node-1", cut),
             {**fault("partition", "node-1", cut + timedelta(seconds=3.5)), "phase": "end"}]
    result = judge(records, probes="recover:1@4", chaos=chaos)
    assert result["verdict"] == "pass" and result["duplicates"] == 0 and result["at_least_once"]["count"] == 1
    healed = [chaos[0], {**chaos[1], "ts": (cut + timedelta(seconds=0.02)).isoformat()}]
    assert judge(records, probes="recover:1@4", chaos=healed)["duplicates"] == 1
    # a kill logged that long before the start: the process was gone, so a start after it is no excuse
    killed = [fault("kill", "node-1", at(5, 4.0) - timedelta(seconds=0.5))]
    assert judge(records, probes="recover:1@4", chaos=killed)["duplicates"] == 1


def test_early_runs_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = run(range(10))
    records[3 * JOBS]["started_at"] = (at(3) - timedelta(seconds=0.2)).isoformat()  # by the node's own clock
    skewed = rec(1, 6, lag=0.01)  # a clock 30 s ahead: started_at looks fine, the collector knows better
    skewed["received_at"] = (at(6) - timedelta(seconds=30)).isoformat()
    records = [skewed if (r["job"], r["scheduled_at"]) == (skewed["job"], skewed["scheduled_at"]) else r
               for r in records]
    code, result = cli_json(tmp_path, records, capsys)
    assert code == 1 and result["verdict"] == "fail" and result["missed"] == 0
    assert result["early"] == 2
    assert [(r["job"], r["scheduled_at"], r["early_by_s"]) for r in result["early_runs"]] == [
        ("probe-000", at(3).isoformat(), pytest.approx(0.2, abs=0.001)),
        ("probe-001", at(6).isoformat(), pytest.approx(30.0, abs=0.01))]
    code, result = cli_json(tmp_path, records, capsys, "--early-tolerance", "60")
    assert code == 0 and result["early"] == 0
    # within the default tolerance: clock reading and formatting, not early
    records = run(range(10))
    records[0]["started_at"] = (at(0) - timedelta(seconds=0.03)).isoformat()
    assert judge(records)["early"] == 0


def test_manual_runs_are_counted_not_judged() -> None:
    manual = {**rec(0, 5), "scheduled_at": (at(5) + timedelta(seconds=0.37)).isoformat(), "kind": "manual"}
    result = judge([*run(range(10)), manual, {**manual, "node": "node-2"}])
    assert result["verdict"] == "pass" and result["manual_runs"] == 2 and result["records"] == 30
    assert result["warnings"] == []


def test_shapes_have_a_grid_each() -> None:
    spec = "basic:2@1,sparse:1@4,recover:1@2"
    records = [*run(range(13), jobs=2), *[rec(0, k, interval=4.0, prefix="sparse") for k in range(4)],
               *[rec(0, k, interval=2.0, prefix="recover") for k in range(7)]]
    result = judge(records, probes=spec)
    assert result["verdict"] == "pass", result["missed_fire_times"]
    assert result["expected"] == 2 * 13 + 4 + 7 and result["schedule"]["jobs"] == 4
    assert result["window"]["fire_times"] == 13  # on the finest grid
    # a sparse fire time cannot hide behind the next one
    result = judge([r for r in records if r["scheduled_at"] != at(2, 4.0).isoformat() or r["job"] != "sparse-000"],
                   probes=spec)
    assert result["missed_fire_times"] == [{"job": "sparse-000", "scheduled_at": at(2, 4.0).isoformat(),
                                            "reason": "the leader that ran the job before and after it skipped it"}]
    # records of a shape the spec does not name are only a warning
    result = judge(records, probes="basic:2@1,recover:1@2")
    assert result["verdict"] == "pass" and "sparse-000" in result["warnings"][0]


def test_runs_still_in_flight_at_the_end_are_excused() -> None:
    records = [r for r in run(range(20)) if not (r["job"] != "probe-000" and r["scheduled_at"] == at(19).isoformat())]
    result = judge(records, grace=0.5)
    assert result["missed"] == 0 and result["excused"]["window_end"] == 2
    late = check(records, jobs=JOBS, interval=INTERVAL, start=None, end=at(30), misfire_grace=0.5)
    # two jobs at 19, and every job at 20..28; 29 and 30 lie within grace + interval of the end
    assert late["missed"] == 2 + 9 * JOBS and late["excused"]["window_end"] == 2 * JOBS
    assert late["open_gap"] == {"start": at(20).isoformat(), "missing_fire_times": 11}


def test_window_starts_at_the_first_run() -> None:
    old = run(range(5), token=1)
    new = run(range(100, 110), node="node-3", token=7)
    result = check(old + new, jobs=JOBS, interval=INTERVAL, start=at(50), end=None, misfire_grace=1.0)
    assert result["records"] == 30 and result["expected"] == 30 and result["verdict"] == "pass"
    assert result["window"]["start"] == at(100).isoformat()
    # a restarted cluster: its first leader, elected at 99.85, catches up each job's latest fire time (the
    # sparse one at 96, long before), coalescing the basic ones from 96 into 99; the sparse one at 92 is
    # before the earliest fire time anyone ran, so nobody's (a new cluster does not run its past)
    records = [rec(0, 24, interval=4.0, prefix="sparse", lag=3.9, kind="catch_up"),
               *run([99], jobs=2, lag=0.9, kind="catch_up"), *run(range(100, 110), jobs=2),
               *[rec(0, k, interval=4.0, prefix="sparse") for k in (25, 26)]]
    result = judge(records, probes="basic:2@1,sparse:1@4")
    assert result["verdict"] == "pass" and result["expected"] == 2 * 14 + 4  # sparse: 96, 100, 104, 108
    assert result["excused"]["catch_up"] == 2 * 3  # basic 96, 97, 98: covered by the catch-up at 99
    assert result["excused"]["window_end"] == 1  # 108: its run may still come
    assert result["window"]["start"] == at(24, 4.0).isoformat()


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
    assert main(["--records", str(tmp_path / "p.jsonl"), "--probes", "sparse:1@x", "--misfire-grace", "1"]) == 2
    err = capsys.readouterr().err
    assert "--probes" in err and "SHAPE" in err and len(err.strip().splitlines()) == 1


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
        fault("kill", "node-1", at(3.5)),
        fault("kill", "node-3", at(10.5)),  # a follower
        fault("pause", "node-2", at(11)),
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

    # a state file with a probe spec (what `up` writes) and the nodes' claim lead
    state.write_text(json.dumps({"probe_jobs": 1, "probe_interval": 1.0, "probe_shapes": "basic:3@1",
                                 "claim_ahead": 0.5, "misfire_grace": 10, "collector_file": records.name}))
    assert main(["--state", str(state), "--json"]) == 0
    schedule = json.loads(capsys.readouterr().out)["schedule"]
    assert (schedule["probes"], schedule["claim_ahead_s"]) == ("basic:3@1", 0.5)


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
    path = write_jsonl(tmp_path / "probes.jsonl", [*failover(), rec(0, 10, node="node-3", token=2, lag=0.3)])
    assert main(["--records", str(path), "--jobs", "3", "--interval", "1", "--misfire-grace", "10"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "duplicate" in out
    # an excuse names the run that covers it, a crash loss the fault and its window
    assert "excused catch-up probe-000 @" in out and "probe-000@" + at(8).isoformat() + " on node-2 (token 2" in out
    records, chaos = sparse_kill(kind="kill")
    write_jsonl(path, records)
    log = write_jsonl(tmp_path / "chaos.jsonl", chaos)
    assert main(["--records", str(path), "--chaos-log", str(log), "--probes", "sparse:1@4",
                 "--misfire-grace", "10"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "lost to a crash" in out and "kill node-1 at" in out


# -- the collector -----------------------------------------------------------------------------

async def test_collector_stores_every_record_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "probes.jsonl"
    old = [rec(0, 0), rec(1, 0)]
    write_jsonl(path, old)
    app = make_app(path)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://collector") as client:
        # older probes send no kind; newer ones send the run's kind and their shape
        sent = [rec(j, k, kind=None if k % 2 else "scheduled") for k in range(1, 41) for j in range(5)]
        sent = [{**r, "shape": "basic"} if "kind" in r else r for r in sent]
        responses = await asyncio.gather(*(client.post("/probe", json=r) for r in sent))
        assert [r.status_code for r in responses] == [200] * len(sent)

        for body in (b"not json", b"[1, 2]", json.dumps({**rec(0, 1), "token": "7"}).encode(),
                     json.dumps({**rec(0, 1), "started_at": "2025-03-01 12:00:00"}).encode(),
                     json.dumps({k: v for k, v in rec(0, 1).items() if k != "node"}).encode(),
                     json.dumps({**rec(0, 1), "kind": ""}).encode(), json.dumps({**rec(0, 1), "shape": 3}).encode()):
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
    assert sum(r.get("kind") == "scheduled" and r.get("shape") == "basic" for r in stored) == len(sent) // 2
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
