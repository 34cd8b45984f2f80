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

import bisect
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class RunSeries(Collector):
    """The series every run moves (runs by job and outcome, the fire lag, the body's time), as plain numbers.

    prometheus_client's own metrics take a lock per update and walk the buckets in Python: three
    updates a run cost about 3 microseconds, a few percent of a core at ten thousand runs a second,
    where the scheduler's tail grows with every percent taken from its idle time. Here a run adds to
    dicts and a list on the event loop, and a scrape reads them (``collect``): the same names, labels
    and values as ``Counter``, ``Histogram`` and ``Summary`` export. A scrape from another thread may
    see a run in one series and not yet in the next, as it may with prometheus_client's.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], float] = {}
        self._lag_buckets = [0] * (len(LAG_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self._lag_sum = 0.0
        self._durations: dict[str, list[float]] = {}  # job: [count, sum]

    def ran(self, job: str, outcome: str, n: int = 1) -> None:
        """``n`` fire times of ``job`` handled with ``outcome`` (a RunOutcome)."""
        key = (job, outcome)
        self._runs[key] = self._runs.get(key, 0.0) + n

    def started(self, lag: float) -> None:
        """A body started ``lag`` seconds after its fire time."""
        self._lag_buckets[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        self._lag_sum += lag

    def took(self, job: str, seconds: float) -> None:
        """A body of ``job`` ran for ``seconds``."""
        entry = self._durations.get(job)
        if entry is None:
            entry = self._durations[job] = [0.0, 0.0]
        entry[0] += 1
        entry[1] += seconds

    def add_job(self, job: str, outcome: str) -> None:
        """``job``'s series exist from now, at zero (a rate over a series that appears later misses its start)."""
        self._runs.setdefault((job, outcome), 0.0)
        self._durations.setdefault(job, [0.0, 0.0])

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("baton_job_runs", RUNS_HELP, labels=["job", "outcome"])
        yield HistogramMetricFamily("baton_job_fire_lag_seconds", LAG_HELP)
        yield SummaryMetricFamily("baton_job_duration_seconds", DURATION_HELP, labels=["job"])

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("baton_job_runs", RUNS_HELP, labels=["job", "outcome"])
        for (job, outcome), count in list(self._runs.items()):
            runs.add_metric([job, str(outcome)], count)
        yield runs
        cumulative, total = [], 0
        for bound, count in zip((*LAG_BUCKETS, float("inf")), list(self._lag_buckets), strict=True):
            total += count
            cumulative.append((floatToGoString(bound), float(total)))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily("baton_job_fire_lag_seconds", LAG_HELP, buckets=cumulative,
                                    sum_value=self._lag_sum)
        durations = SummaryMetricFamily("baton_job_duration_seconds", DURATION_HELP, labels=["job"])
        for job, (count, seconds) in list(self._durations.items()):
            durations.add_metric([job], int(count), seconds)
        yield durations


RUNS_HELP = "Job fire times handled, by outcome (node.outcomes)"
LAG_HELP = "Start of a job body minus its fire time, over all jobs"
DURATION_HELP = "Wall time of the job body (count and sum)"


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
        self.runs = RunSeries()
        r.register(self.runs)
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

    def lock_op(self, op: str, result: str, seconds: float) -> None:
        self.lock_ops.labels(self.backend, op, result).inc()
        self.lock_op_seconds.labels(self.backend, op).observe(seconds)
