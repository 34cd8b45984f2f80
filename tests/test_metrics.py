"""What a scrape costs grows with the number of jobs by a few series each, not by a histogram each; and the
per-run series a node keeps by hand export what prometheus_client's own metrics would.

A node renders /metrics holding the interpreter lock its scheduler needs; with
a histogram per job, a node with 1,000 jobs stalled its fire times for about
half a second per scrape. A real node on the file backend, its real registry.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest

from node.app import Node
from node.config import Settings
from node.jobs import JobRegistry, JobSpec, RunContext, every
from node.metrics import DURATION_HELP, LAG_BUCKETS, LAG_HELP, RUNS_HELP, RunSeries
from node.outcomes import RunOutcome

JOBS = 1_000


async def test_per_job_series_stay_few(tmp_path: Path) -> None:
    async def body(run: RunContext) -> None:
        return None

    registry = JobRegistry()
    for i in range(JOBS):
        registry.add(JobSpec(f"job-{i:04d}", body, lambda tz: every(3600, tz)))
    node = Node(Settings(node_id="m", lock_url=f"file://{tmp_path}", demo_jobs=False, probe_jobs=0), registry)
    await node.start()
    try:
        text = generate_latest(node.metrics.registry).decode()
    finally:
        await node.stop()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    per_job = [line for line in samples if 'job="job-' in line]
    # duration count and sum, and runs with outcome "ok", created at start so every job shows from zero
    assert len(per_job) == 3 * JOBS, len(per_job)
    assert len(samples) - len(per_job) < 100, "node-wide series should not depend on the job count"
    assert 'baton_job_duration_seconds_count{job="job-0999"} 0.0' in text
    assert "baton_job_fire_lag_seconds_bucket{le=" in text and "_created" not in text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", 'odd "job"\\n']), st.sampled_from(list(RunOutcome)),
                          st.integers(1, 3), st.floats(0, 120), st.floats(0, 5)), max_size=40),
       st.sampled_from(list(LAG_BUCKETS)))
def test_run_series_export_what_prometheus_clients_metrics_would(
        runs: list[tuple[str, RunOutcome, int, float, float]], on_a_bound: float) -> None:
    """The hand-kept series render line for line as Counter, Histogram and Summary fed the same runs would,
    a lag exactly on a bucket's bound included (it counts in that bucket: ``le``)."""
    series = RunSeries()
    reference = CollectorRegistry()
    counter = Counter("baton_job_runs_total", RUNS_HELP, ["job", "outcome"], registry=reference)
    histogram = Histogram("baton_job_fire_lag_seconds", LAG_HELP, buckets=LAG_BUCKETS, registry=reference)
    summary = Summary("baton_job_duration_seconds", DURATION_HELP, ["job"], registry=reference)
    series.add_job("never-ran", RunOutcome.OK)
    counter.labels("never-ran", str(RunOutcome.OK))
    summary.labels("never-ran")
    for job, outcome, n, lag, took in [*runs, ("a", RunOutcome.OK, 1, on_a_bound, 0.0)]:
        series.ran(job, outcome, n)
        counter.labels(job, str(outcome)).inc(n)
        series.started(lag)
        histogram.observe(lag)
        series.took(job, took)
        summary.labels(job).observe(took)
    mine = CollectorRegistry()
    mine.register(series)
    lines = sorted(generate_latest(mine).decode().splitlines())
    assert lines == sorted(generate_latest(reference).decode().splitlines())
