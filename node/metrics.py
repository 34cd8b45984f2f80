"""Prometheus metrics, by Prometheus conventions (docs/design.md): ``_total`` counters, ``_seconds`` in base units.

One registry per node object (not the global default), so tests can run
several nodes in one process; the process collector is added to it.

A scrape renders every series, and even in a thread it holds the interpreter
lock the scheduler needs, so what is labelled per job is kept to what a person
reads per job: runs by outcome, and the count and sum of body time. The
fire-lag histogram is one per node (its alert and panel sum over jobs anyway);
a histogram per job made a scrape of a node with 1,000 jobs stall the
scheduler for about half a second, and with 10,000 jobs for six.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    Summary,
    disable_created_metrics,
)

# ``_created`` timestamps would add a series beside every counter and histogram, per job; nobody queries them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves this one unannotated

#: Every metric family a node exports (without the _total/_bucket suffixes).
METRIC_NAMES = (
    "baton_is_leader",
    "baton_leader_transitions_total",
    "baton_lease_token",
    "baton_job_runs_total",
    "baton_job_fire_lag_seconds",
    "baton_job_duration_seconds",
    "baton_lock_ops_total",
    "baton_lock_op_seconds",
    "baton_run_records_dropped_total",
    "baton_clock_skew_seconds",
    "baton_api_reads_rejected_total",
)

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.is_leader = Gauge("baton_is_leader", "1 while this node holds the leadership lease", registry=r)
        self.transitions = Counter("baton_leader_transitions_total",
                                   "Times this node started or stopped leading", registry=r)
        self.lease_token = Gauge("baton_lease_token", "Fencing token of the lease this node holds, 0 if none",
                                 registry=r)
        self.job_runs = Counter("baton_job_runs_total", "Job fire times handled, by outcome (node.outcomes)",
                                ["job", "outcome"], registry=r)
        self.fire_lag = Histogram("baton_job_fire_lag_seconds",
                                  "Start of a job body minus its fire time, over all jobs", buckets=LAG_BUCKETS,
                                  registry=r)
        self.duration = Summary("baton_job_duration_seconds", "Wall time of the job body (count and sum)",
                                ["job"], registry=r)
        self.lock_ops = Counter("baton_lock_ops_total", "Lock backend operations by result",
                                ["backend", "op", "result"], registry=r)
        self.lock_op_seconds = Histogram("baton_lock_op_seconds", "Lock backend operation latency",
                                         ["backend", "op"], buckets=OP_BUCKETS, registry=r)
        self.records_dropped = Counter("baton_run_records_dropped_total",
                                       "Run records never written: the queue overflowed or the store refused them",
                                       registry=r)

        self.clock_skew = Gauge("baton_clock_skew_seconds",
                                "This node's wall clock minus the lock store's (positive: ahead), last measured",
                                registry=r)
        self.api_reads_rejected = Counter("baton_api_reads_rejected_total",
                                          "API requests answered 429: the node's store reads for the API were "
                                          "all taken (node.limits)", registry=r)
        self._runs: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}

    def runs_of(self, job: str, outcome: str) -> Any:
        """The ``baton_job_runs_total`` child for (job, outcome), looked up once: ``labels()`` is slow per run."""
        child = self._runs.get((job, outcome))
        if child is None:
            child = self._runs[(job, outcome)] = self.job_runs.labels(job, str(outcome))
        return child

    def duration_of(self, job: str) -> Any:
        child = self._durations.get(job)
        if child is None:
            child = self._durations[job] = self.duration.labels(job)
        return child

    def lock_op(self, op: str, result: str, seconds: float) -> None:
        self.lock_ops.labels(self.backend, op, result).inc()
        self.lock_op_seconds.labels(self.backend, op).observe(seconds)
