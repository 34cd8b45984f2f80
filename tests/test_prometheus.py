"""Debian's real Prometheus scrapes a local cluster; its query API must agree with the collector."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.cluster import LocalCluster, Timing
from loadtest.servers import find_binary, free_port
from tests.probes import ProbeSink

SCRAPE = 1


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = find_binary("prometheus")  # fails loudly, naming the apt package, when missing
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        quoted = ", ".join(f"'{t}'" for t in targets)
        config.write_text(f"global:\n  scrape_interval: {SCRAPE}s\n  evaluation_interval: {SCRAPE}s\n"
                          f"scrape_configs:\n  - job_name: baton\n    static_configs:\n"
                          f"      - targets: [{quoted}]\n")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(), 60, "prometheus to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def range_values(self, expr: str, seconds: float) -> list[float]:
        end = time.time()
        body = httpx.get(f"{self.url}/api/v1/query_range",
                         params={"query": expr, "start": end - seconds, "end": end, "step": SCRAPE},
                         timeout=5).json()
        assert body["status"] == "success", body
        return [float(v) for series in body["data"]["result"] for _, v in series["values"]]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, ProbeSink]]:
    sink = ProbeSink()
    c = LocalCluster(tmp_path / "cluster", backend="file", nodes=3, timing=Timing(), probe_jobs=2,
                     probe_interval=1.0, probe_url=sink.url)
    c.start()
    yield c, sink
    c.close()
    sink.close()


def test_prometheus_sees_one_leader_transitions_and_every_run(tmp_path: Path,
                                                             cluster: tuple[LocalCluster, ProbeSink]) -> None:
    c, sink = cluster
    leader = c.wait_for_leader()
    prom = Prometheus(tmp_path, [f"127.0.0.1:{n.port}" for n in c.members])
    try:
        wait_for(lambda: prom.scalar("count(baton_is_leader)") == 3, 60, "all three nodes scraped")
        all_scraped = time.monotonic()
        wait_for(lambda: time.monotonic() - all_scraped > 6, 10, "six more scrape intervals")
        # exactly one node reports leading, at every step of the window since then
        values = prom.range_values("sum(baton_is_leader)", 5)
        assert values and all(v == 1 for v in values), values

        # quiesce the probes, then Prometheus's count of ok runs equals what the collector received
        auth = {"Authorization": f"Bearer {c.admin_token}"}
        for job in ("probe-000", "probe-001"):
            assert httpx.post(f"{leader.url}/admin/jobs/{job}/pause", headers=auth).status_code == 200
        time.sleep(2.5)
        received = len(sink.snapshot())
        assert received > 0
        wait_for(lambda: prom.scalar('sum(baton_job_runs_total{outcome="ok"})') == received, 30,
                 f"prometheus to count {received} ok runs")
        for job in ("probe-000", "probe-001"):
            httpx.post(f"{leader.url}/admin/jobs/{job}/resume", headers=auth)

        # kill the leader: the new leader's transitions counter moves
        before = {r["metric"]["instance"]: float(r["value"][1])
                  for r in prom.query("baton_leader_transitions_total")}
        leader.kill()
        new = c.wait_for_leader(timeout=30, exclude=leader)
        selector = f'baton_leader_transitions_total{{instance="127.0.0.1:{new.port}"}}'
        was = before.get(f"127.0.0.1:{new.port}", 0.0)
        wait_for(lambda: (prom.scalar(selector) or 0) > was, 30, "the new leader's transitions to move")
        wait_for(lambda: (prom.scalar(f'baton_is_leader{{instance="127.0.0.1:{new.port}"}}') or 0) == 1, 30,
                 "the new leader to report leading")
        wait_for(lambda: prom.scalar("sum(baton_is_leader)") == 1, 30, "one leader again")
    finally:
        prom.stop()
