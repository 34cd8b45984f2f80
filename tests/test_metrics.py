"""What a scrape costs grows with the number of jobs by a few series each, not by a histogram each.

A node renders /metrics holding the interpreter lock its scheduler needs; with
a histogram per job, a node with 1,000 jobs stalled its fire times for about
half a second per scrape. A real node on the file backend, its real registry.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from node.app import Node
from node.config import Settings
from node.jobs import JobRegistry, JobSpec, RunContext, every

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
