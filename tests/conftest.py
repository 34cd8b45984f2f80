"""Fixtures that start real servers on free loopback ports, and the tiers the suite is selected by.

Each server kind starts once per test session (per xdist worker), lazily, and stops at the end.
Tests that stop or restart a server get their own (``private_server``). A
missing binary fails the test with the command that installs it.

Every test file belongs to one tier (``TIERS``), a marker of the same name on each of its tests:
``make test-fast`` runs ``-m "contract or unit or sim"``, ``make test`` runs them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from loadtest.servers import Cluster, port_range, start_backend
from lock_backends import BackendUnavailable, LockBackend, from_url
from lock_backends.memory import drop_store
from lock_backends.registry import NAMES, SERVERS, SHARED

T = TypeVar("T")

#: The tier of each test file (a test file not listed is a collection error). Tests run tier by
#: tier in this order, each tier's files in the order listed: the longest first, so that parallel workers
#: (``make test`` runs ``pytest -n``) do not end waiting on one long test started last.
TIERS: dict[str, tuple[str, ...]] = {
    # quick runs of the benchmark (the peers' one builds a venv of its own)
    "bench": ("test_bench_peers.py", "test_bench.py", "test_bench_load.py"),
    # real node processes: clusters, faults, the harness's commands, the README's own commands
    "cluster": ("test_triggers_cluster.py", "test_failover.py", "test_stored_jobs_cluster.py", "test_node_cluster.py",
                "test_up.py", "test_your_jobs.py", "test_loadtest_cli.py", "test_prometheus.py"),
    # one backend's own behaviour, on real servers (some of them private, stopped and restarted)
    "backend": ("test_api_flood.py", "test_file_backend.py", "test_etcd.py", "test_postgres.py", "test_sigstop.py",
                "test_redis.py", "test_redis_traps.py"),
    # the LockBackend contract on every backend
    "contract": ("test_contract.py",),
    # the simulator: seeded runs on virtual time
    "sim": ("test_sim.py",),
    # in one process: nodes on the in-memory store or a shared server, the checker, config, triggers, deploy/
    "unit": ("test_skew.py", "test_claim_window.py", "test_job_options.py", "test_exactly_once.py",
             "test_stored_jobs.py", "test_deploy.py", "test_config.py", "test_checker.py", "test_election.py",
             "test_embed.py", "test_metrics.py", "test_triggers.py", "test_api_fuzz.py", "test_api_forwarding.py",
             "test_api_corrupt.py", "test_run_recorder.py", "test_proxy.py", "test_gc_policy.py",
             "test_record_json.py", "test_loop_scheduler.py", "test_jobstore.py", "test_resample.py"),
}
#: Tests of the fast tiers that ``make test-fast`` leaves to ``make test`` (marker ``slow``): the longest ones,
#: each tens of seconds of a worker (the simulator's command-line runs start interpreters; the 2,000 seeds).
SLOW = frozenset({
    "test_sim.py::test_no_violation_over_ci_seeds", "test_sim.py::test_cli_hole_schedule_and_json",
    "test_sim.py::test_cli_bad_input_is_one_line_and_exit_2", "test_sim.py::test_cli_explores_and_prints_failing_seeds",
    "test_sim.py::test_replay_from_the_command_line_is_byte_for_byte",
    "test_job_options.py::test_a_sync_body_that_sleeps_does_not_delay_other_jobs",
    "test_api_fuzz.py::test_without_the_token_no_request_is_a_500_or_changes_anything",
    "test_api_fuzz.py::test_with_the_token_no_request_is_a_500",
})
TIER_OF = {name: tier for tier, names in TIERS.items() for name in names}
_RANK = {tier: i for i, tier in enumerate(TIERS)}
_FILE_RANK = {name: i for names in TIERS.values() for i, name in enumerate(names)}


def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: a test of the {tier} tier (tests/conftest.py TIERS)")
    config.addinivalue_line("markers", "slow: left out by make test-fast (tests/conftest.py SLOW)")
    # Parallel workers restart servers and nodes on the ports they picked: give each worker its own range.
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        index, count = int(worker["workerid"].removeprefix("gw")), int(worker["workercount"])
        low, high = port_range()
        size = (high - low + 1) // count
        os.environ["BATON_PORT_RANGE"] = f"{low + index * size}-{low + (index + 1) * size - 1}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unlisted = sorted({item.path.name for item in items if item.path.name not in TIER_OF})
    if unlisted:  # else `make test-fast` would leave it out without a word
        raise pytest.UsageError(f"test files in no tier: {', '.join(unlisted)}; add each to TIERS in tests/conftest.py")
    for item in items:
        item.add_marker(TIER_OF[item.path.name])
        if f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in SLOW:
            item.add_marker("slow")
    # stable: within a file, pytest's own order (which sets up each module fixture's parameter once) stays
    items.sort(key=lambda item: (_RANK[TIER_OF[item.path.name]], _FILE_RANK[item.path.name], str(item.path)))


#: Tests of an ``xdist_group`` that ``--dist loadgroup`` did not group (pytest_collection_finish).
_UNGROUPED: set[str] = set()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The shared fixtures (one failover scenario per backend, one peers' run, ...) are shared only while
    ``--dist loadgroup`` sends each ``xdist_group`` to one worker; a pytest that no longer takes the group into
    the node id turns that into a copy per worker, silently. Such a run fails those tests, saying why."""
    config = session.config
    if getattr(config, "workerinput", None) is None or not getattr(config.option, "loadgroup", False):
        return
    _UNGROUPED.update(item.nodeid for item in session.items
                      if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in _UNGROUPED:
        pytest.fail(f"--dist loadgroup did not group this test: this pytest ({pytest.__version__}) and "
                    f"pytest-xdist disagree on node ids; install the pins of pyproject.toml", pytrace=False)


#: Every backend, the in-memory reference included: the contract holds for all of them.
BACKENDS = list(NAMES)
SERVER_BACKENDS = list(SERVERS)
SHARED_BACKENDS = list(SHARED)

#: Per-operation timeout used in tests; well below the test TTLs.
OP_TIMEOUT = 0.5
#: TTL used by the contract tests. etcd rounds leases up to whole seconds (min 2 s here).
TTL = 2.0


class ServerPool:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clusters: dict[str, Cluster] = {}

    def get(self, kind: str) -> Cluster:
        if kind not in self.clusters:
            self.clusters[kind] = start_backend(kind, self.tmp / kind)
        return self.clusters[kind]

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.close()


def with_timeout(url: str, timeout: float = OP_TIMEOUT) -> str:
    return f"{url}{'&' if '?' in url else '?'}timeout={timeout}"


def _url(kind: str, request: pytest.FixtureRequest, servers: ServerPool, tmp_path: Path) -> str:
    if kind == "file":
        return with_timeout(f"file://{tmp_path / 'baton.lock'}")
    if kind == "memory":
        name = f"contract-{uuid.uuid4().hex[:10]}"
        request.addfinalizer(lambda: drop_store(name))
        return with_timeout(f"memory://{name}")
    return with_timeout(servers.get(kind).url)


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, servers: ServerPool, tmp_path: Path) -> str:
    """Every backend, the in-process reference included."""
    return _url(request.param, request, servers, tmp_path)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_backend_url(request: pytest.FixtureRequest, servers: ServerPool, tmp_path: Path) -> str:
    """Every backend several processes can share: for tests whose holder runs in a child process."""
    return _url(request.param, request, servers, tmp_path)


@pytest.fixture(params=SERVER_BACKENDS)
def private_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A server of its own, for tests that stop, restart or otherwise disturb it."""
    cluster = start_backend(request.param, tmp_path / request.param)
    yield cluster
    cluster.close()


@pytest.fixture
def lock_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[[str], LockBackend]]:
    """Factory of backend instances (each one a separate 'node'), closed after the test."""
    made: list[LockBackend] = []

    def make(url: str) -> LockBackend:
        backend = from_url(url)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        with contextlib.suppress(Exception):
            await backend.close()


async def eventually(what: str, op: Callable[[], Awaitable[T | None]], within: float,
                     every: float = 0.05) -> tuple[T, float]:
    """Retry ``op`` until it returns something other than None; return it and the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            result = await op()
        except BackendUnavailable:
            result = None
        if result is not None:
            return result, time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(every)


def expiry_bound(status: Callable[[], dict[str, Any] | None]) -> float:
    """The monotonic instant before which nobody can take the lease *by expiry*: the leader's lease left.

    Read from the leader's ``/status`` (``status``) just before it is asked to hand over; conservative
    (counted from before the request went out). A handoff that gets a new leader before this instant went
    through release, whatever the machine's load; a fixed bound such as "1.5 s" fails first on a busy one.
    """
    asked = time.monotonic()
    seen = status()
    assert seen is not None and seen["role"] == "leader", seen
    return asked + float(seen["lease_remaining_s"])


def node_start_seconds() -> float:
    """Seconds one node process takes to import itself on this machine now (1 s on an idle 2-core box).

    Deadlines a test sets before its nodes exist (a schedule's T0) scale with it, not with a fixed guess.
    """
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import node.app"], check=True, cwd=Path(__file__).resolve().parent.parent)
    return time.monotonic() - started


# the in-memory cluster's fixture, for every test module (tests/memory_cluster.py)
from tests.memory_cluster import make_cluster  # noqa: E402, F401
