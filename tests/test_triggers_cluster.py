"""Every trigger kind and option on a 3-node cluster through the failover suite's faults: kill, SIGTERM, step-down.

The jobs (tests/cluster_jobs.py) record each start from inside their bodies;
the verdict comes from those records and the nodes' own counters:

* no fire time started twice (a ``recover=True`` job may run a crashed
  leader's run again, as a recovery, and only then);
* every fire time of every job ran, except what a crash may lose (the dead
  leader's claimed lead, at most once; a recoverable job loses nothing there),
  what a coalescing job folds into its catch-up run across a handoff, and what
  a node skipped, and counted, because ``max_instances`` runs were still going
  (a late catch-up run just before it); a job with ``coalesce=False`` loses
  nothing to the leaderless gap;
* every one-shot ran exactly once, and no node counted it duplicate, lost,
  missed or fenced; no node counted any job duplicate.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cluster import LocalCluster, NodeProc, Timing
from lock_backends.registry import SHARED
from node.jobs import fire_times
from node.outcomes import RunKind, RunOutcome
from tests.cluster_jobs import ONE_SHOTS, build
from tests.conftest import expiry_bound, node_start_seconds

TIMING = Timing(ttl=2.0, renew_deadline=1.4, retry_period=0.4, op_timeout=0.5, misfire_grace=10.0)
#: Seconds after T0 at which each fault hits the leader (mid-second: fire times are whole or half seconds).
#: The kill comes over a second before ``once-after-kill`` (7 s): late as it may be on a busy machine, the
#: killed leader's claimed lead (0.25 s) does not reach it, and the takeover (a TTL) comes after it.
FAULTS = [("kill", 5.7), ("term", 16.3), ("step-down", 26.3)]
END = 34.0
#: A killed leader may have claimed this far past the kill (the lead, 0.25 s) and been this late
#: starting what came just before it (a loaded machine).
LOST_AFTER, LOST_BEFORE = 0.35, 0.5
ALARMS = (RunOutcome.DUPLICATE, RunOutcome.LOST, RunOutcome.MISSED, RunOutcome.FENCED)


def parse(t: str) -> datetime:
    return datetime.fromisoformat(t).astimezone(UTC)


def sleep_until(t: datetime) -> None:
    time.sleep(max(0.0, (t - datetime.now(UTC)).total_seconds()))


def scrape(node: NodeProc) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{node.url}/metrics", timeout=5).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "baton_job_runs":
            for s in family.samples:
                if s.name == "baton_job_runs_total":
                    out[(s.labels["job"], s.labels["outcome"])] = s.value
    return out


def start_before_t0(backend: str, tmp_path: Path, records: Path) -> tuple[LocalCluster, datetime]:
    """Three nodes leading (one of them) at least 2 s before the schedule's T0, which every node reads at start.

    T0 is set before the nodes exist, from how long a node takes to import now; a machine that got busier
    in between makes the cluster late: then it starts again, with twice the margin (at most three times).
    """
    margin = max(8.0, 3 + 5 * node_start_seconds())
    for attempt in range(3):
        t0 = (datetime.now(UTC) + timedelta(seconds=margin)).replace(microsecond=0)
        cluster = LocalCluster(tmp_path / f"cluster-{attempt}", backend=backend, nodes=3, timing=TIMING, extra_env={
            "BATON_JOBS": "tests.cluster_jobs:from_env", "JOBS_TEST_T0": t0.isoformat(),
            "JOBS_TEST_RECORDS": str(records)})
        try:
            cluster.start()
            cluster.wait_for_leader(timeout=60)
        except BaseException:
            cluster.close()
            raise
        if datetime.now(UTC) < t0 - timedelta(seconds=2):
            return cluster, t0
        cluster.close()
        records.unlink(missing_ok=True)
        margin *= 2
    pytest.fail(f"the cluster took too long to start, three times (the last margin {margin / 2:.0f} s)")


@pytest.mark.parametrize("backend", SHARED)
def test_every_trigger_kind_survives_kill_term_and_step_down(backend: str, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    cluster, t0 = start_before_t0(backend, tmp_path, records)
    counters: dict[int, dict[tuple[str, str], float]] = {}  # per process id, its last scrape
    faults: list[tuple[str, float, datetime]] = []
    handoffs: list[tuple[str, bool]] = []

    def scrape_all() -> None:
        for n in cluster.members:
            if n.alive and n.pid is not None:
                counters[n.pid] = scrape(n)

    try:
        for fault, at in FAULTS:
            sleep_until(t0 + timedelta(seconds=at - 2.5))
            cluster.wait_for_leader(timeout=15)
            scrape_all()  # the victim's counters, before they go
            sleep_until(t0 + timedelta(seconds=at))
            leader = cluster.wait_for_leader(timeout=15)  # the leader now, not a second ago
            expires = expiry_bound(leader.status)
            hit = datetime.now(UTC)
            if fault == "kill":
                leader.kill()
            elif fault == "term":
                leader.signal(signal.SIGTERM)
            else:
                r = httpx.post(f"{leader.url}/admin/leader/step-down", timeout=10,
                               headers={"Authorization": f"Bearer {cluster.admin_token}"})
                assert r.status_code == 200 and r.json()["stepped_down"], r.text
            new = cluster.wait_for_leader(timeout=15, exclude=leader if fault != "step-down" else None)
            faults.append((fault, (datetime.now(UTC) - hit).total_seconds(), hit))
            # a graceful handoff (term, step-down) must beat the lease's expiry
            handoffs.append((fault, time.monotonic() < expires))
            if fault == "term":
                assert leader.proc is not None and leader.proc.wait(timeout=30) in (0, -signal.SIGTERM)
            if fault != "step-down":
                leader.start()
                leader.wait_healthy()
            assert new is not None
        sleep_until(t0 + timedelta(seconds=END))
        scrape_all()
    finally:
        cluster.close()

    starts = [json.loads(line) for line in records.read_text().splitlines()]
    registry = build(t0, records)
    begin, end = t0 + timedelta(seconds=1), t0 + timedelta(seconds=END - 3)
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in starts:
        by_job[s["job"]].append(s)

    def first_start_after(hit: datetime) -> datetime:
        later = [parse(s["started_at"]) for s in starts if parse(s["started_at"]) > hit]
        return min(later) if later else hit + timedelta(seconds=30)

    totals: Counter[tuple[str, str]] = Counter()
    for scraped in counters.values():
        totals.update(scraped)
    problems: list[str] = []
    excuses: list[str] = []
    for spec in registry:
        runs = by_job.get(spec.id, [])
        counts = Counter(parse(s["scheduled_at"]) for s in runs if s["kind"] != "recovery")
        problems += [f"{spec.id} started {t.isoformat()} {n} times" for t, n in counts.items() if n > 1]
        if not spec.recover:
            problems += [f"{spec.id} ran a recovery" for s in runs if s["kind"] == RunKind.RECOVERY]
        ran = {parse(s["scheduled_at"]) for s in runs}
        # a fire time that found max_instances runs still going (a catch-up run just before it) is
        # skipped, and counted so by the node: APScheduler's rule, not a miss
        skips = int(totals[(spec.id, RunOutcome.SKIPPED)])
        for t in fire_times(spec.make_trigger(UTC), begin, end):
            if t in ran:
                continue
            excused = False
            for fault, _, hit in faults:
                gap_end = first_start_after(hit) + timedelta(seconds=0.1)
                lost = fault == "kill" and hit - timedelta(seconds=LOST_BEFORE) <= t <= hit + timedelta(
                    seconds=LOST_AFTER)
                folded = spec.coalesce and hit - timedelta(seconds=LOST_BEFORE) <= t <= gap_end
                if (lost and not spec.recover) or folded:
                    excused = True
            if not excused and skips > 0:
                skips, excused = skips - 1, True
            if not excused:
                problems.append(f"{spec.id} missed {t.isoformat()}")
            else:
                excuses.append(f"{spec.id} {t.isoformat()}")
        late = [s for s in runs if spec.id == "interval-end" and parse(s["scheduled_at"]) > t0 + timedelta(seconds=12)]
        problems += [f"interval-end ran after its end_date: {s}" for s in late]
    for job_id in ONE_SHOTS:
        assert len(by_job[job_id]) == 1, (job_id, by_job[job_id], faults)
    overlapping = by_job["overlap"]
    assert any(parse(b["started_at"]) - parse(a["started_at"]) < timedelta(seconds=1.2)
               for a, b in itertools.pairwise(overlapping)), "max_instances=2 never overlapped"
    assert {s["label"] for s in by_job["with-args"]} == {"x"} and {s["n"] for s in by_job["with-args"]} == {3}

    false_alarms = {k: v for k, v in totals.items() if v and (k[1] == RunOutcome.DUPLICATE or (
        k[0] in ONE_SHOTS and k[1] in ALARMS))}
    assert problems == [] and false_alarms == {}, (problems, false_alarms, faults, excuses)
    assert [f for f, before_expiry in handoffs if f != "kill" and not before_expiry] == [], faults
