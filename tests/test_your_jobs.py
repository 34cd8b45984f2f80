"""The README's "Your own jobs" section, run as written: its files, its commands, real processes.

The Python blocks of that section that start with ``# myapp/<file>.py`` are
written into a fresh project directory, and the commands the section shows
(each asserted to be in the README verbatim) are run from there: the import
string (``python -m node --jobs``), uvicorn's factory and ``node.app:app``,
and the embedded FastAPI app as a 3-node cluster whose leader is stopped with
SIGTERM in the middle of a long request.

The lock store is etcd here (the README's own default, the file backend,
runs these too once its claim-window port is merged).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app_procs import REPO, TOKEN, AppProc, base_env, leader_of, python, wait_until
from tests.conftest import ServerPool, expiry_bound, with_timeout

README = (REPO / "README.md").read_text()
SECTION = README[README.index("## Your own jobs"):README.index("## A local cluster")]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOBS = {"nightly-report", "sync-orders", "new-year-cleanup", "heartbeat"}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", SECTION, re.S)


def shown(command: str) -> str:
    """``command`` as the README shows it (it must be there), for the test to run."""
    assert command in SECTION, f"the README no longer shows {command!r}"
    return command


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory holding the README's myapp/ files, and nothing else."""
    files = {m[1]: block for block in python_blocks() if (m := re.match(r"# (myapp/\S+\.py)\n", block))}
    assert set(files) == {"myapp/jobs.py", "myapp/main.py", "myapp/tasks.py"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.fixture
def lock_url(servers: ServerPool) -> str:
    return with_timeout(servers.get("etcd").url)


@pytest.fixture
def procs() -> Iterator[list[AppProc]]:
    started: list[AppProc] = []
    yield started
    for p in started:
        p.kill()


def run_single(procs: list[AppProc], project: Path, argv: list[str], env: dict[str, str]) -> AppProc:
    node = AppProc("node-1", argv, env, project)
    procs.append(node.start())
    node.wait_healthy()
    wait_until("heartbeats", lambda: len(node.heartbeats()) >= 3, 30)
    jobs = {j["id"]: j for j in node.get("/jobs")}
    assert set(jobs) == JOBS and {j["origin"] for j in jobs.values()} == {"code"}
    assert jobs["nightly-report"]["schedule"] == {"type": "cron", "crontab": "0 3 * * mon-fri",
                                                  "timezone": "Europe/Berlin"}
    assert jobs["nightly-report"]["misfire_grace_time"] == 300 and jobs["nightly-report"]["recover"] is True
    assert jobs["new-year-cleanup"]["next_fire_time"].startswith("2027-01-01T00:00:00")
    beats = [t for t, _, _ in node.heartbeats()]
    assert len(beats) == len(set(beats))
    return node


def stops_cleanly(node: AppProc) -> None:
    code = node.stop()
    assert code in (0, -signal.SIGTERM), node.log()[-2000:]
    assert "Application shutdown complete" in node.log()


# -- the import string -----------------------------------------------------------------------------


def test_python_m_node_runs_your_jobs_from_an_import_string(project: Path, lock_url: str,
                                                            procs: list[AppProc]) -> None:
    shown("python -m node --jobs myapp.jobs:registry")
    node = run_single(procs, project, python("-m", "node", "--jobs", "myapp.jobs:registry"), base_env(lock_url))
    stops_cleanly(node)


@pytest.mark.parametrize("how", ["flag", "factory", "app"])
def test_an_import_that_fails_exits_2_with_one_line(project: Path, lock_url: str, how: str) -> None:
    env = base_env(lock_url, BATON_PORT="8000", BATON_JOBS="myapp.jobz:registry")
    argv = {"flag": python("-m", "node", "--jobs", "myapp.jobz:registry"),
            "factory": python("-m", "uvicorn", "--factory", "node.app:create_app", "--port", "0"),
            "app": python("-m", "uvicorn", "node.app:app", "--port", "0")}[how]
    if how == "flag":
        del env["BATON_JOBS"]
    done = subprocess.run(argv, env=env, cwd=project, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("baton:")]
    assert lines == ["baton: configuration error: BATON_JOBS: cannot import 'myapp.jobz': no module named "
                     f"'myapp.jobz' (is it installed, or on PYTHONPATH? the current directory is {project})"]


def test_a_job_that_does_not_register_exits_2_naming_job_and_field(project: Path, lock_url: str) -> None:
    (project / "myapp" / "broken.py").write_text(
        "from node.jobs import JobRegistry\nregistry = JobRegistry()\n\n"
        "@registry.interval('jittery', seconds=5, jitter=2)\nasync def jittery(run):\n    pass\n")
    done = subprocess.run(python("-m", "node", "--jobs", "myapp.broken:registry"), env=base_env(lock_url),
                          cwd=project, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "BATON_JOBS: importing 'myapp.broken': job 'jittery': jitter: refused" in done.stderr


# -- uvicorn ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["--factory node.app:create_app", "node.app:app"])
def test_uvicorn_runs_your_jobs_with_settings_from_the_environment(project: Path, lock_url: str,
                                                                   procs: list[AppProc], target: str) -> None:
    shown(f"BATON_JOBS=myapp.jobs:registry BATON_PORT=8000 uvicorn {target} --port 8000")
    node = run_single(procs, project, python("-m", "uvicorn", *target.split(), "--port", "{port}"),
                      base_env(lock_url, BATON_JOBS="myapp.jobs:registry"))
    stops_cleanly(node)


def test_importing_node_app_builds_nothing() -> None:
    done = subprocess.run(python("-c", "import node.app as a; print(a._default_app)"), cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env=base_env("zookeeper://nowhere", BATON_JOBS="missing.module:registry"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


# -- the embedded app, three of them -----------------------------------------------------------------------


def test_the_embedded_example_as_a_3_node_cluster_hands_over_fast_on_sigterm(
        project: Path, lock_url: str, procs: list[AppProc]) -> None:
    command = shown("BATON_NODE_ID=web-1 BATON_PORT=8001 BATON_LOCK_URL=etcd://127.0.0.1:2379 "
                    "uvicorn myapp.main:app --port 8001")
    assert command.endswith("uvicorn myapp.main:app --port 8001")
    # a lease long enough (6 s) that a handoff by release and one by expiry are seconds apart, however
    # slowly a loaded machine answers the polls that see the new leader
    env = base_env(lock_url, BATON_LEASE_TTL="6", BATON_RENEW_DEADLINE="4")
    nodes = [AppProc(f"web-{i}", python("-m", "uvicorn", "myapp.main:app", "--port", "{port}"), env, project,
                     prefix="/baton") for i in (1, 2, 3)]
    procs.extend(nodes)
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_healthy()
    assert httpx.get(f"http://127.0.0.1:{nodes[0].port}/", timeout=5).json() == {"hello": "world"}
    leader = wait_until("one leader", lambda: leader_of(nodes), 30)
    wait_until("every node sees the leader", lambda: all(
        (s := n.status()) and s["leader"] and s["leader"]["node_id"] == leader.name for n in nodes), 15)
    wait_until("heartbeats on the leader", lambda: len(leader.heartbeats()) >= 3, 20)
    assert all(not n.heartbeats() for n in nodes if n is not leader)

    # the client of the README, against a follower (changes reach the leader through the store)
    follower = next(n for n in nodes if n is not leader)
    client_code = next(b for b in python_blocks() if b.startswith("from node.client import BatonClient"))
    client_code = client_code.replace("http://127.0.0.1:8001/baton", follower.url).replace('"secret"', f'"{TOKEN}"')
    done = subprocess.run(python("-c", client_code), cwd=project, capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", done.stdout), done.stdout  # get_job()'s next fire time
    wait_until("the stored job gone from the leader too (within a retry period)",
               lambda: not [j for j in leader.get("/jobs") if j["origin"] == "stored"], 5)

    # a long request in flight (a manual run of the 3 s report) while the leader gets SIGTERM: uvicorn
    # would wait for it before its lifespan shutdown; the chained handler hands over at once regardless
    answer: dict[str, Any] = {}

    def manual_run() -> None:
        answer["r"] = httpx.post(f"{leader.url}/admin/jobs/nightly-report/run", headers=AUTH, timeout=30)

    runner = threading.Thread(target=manual_run)
    runner.start()
    wait_until("the report body runs", lambda: (s := leader.status()) and s["running"] >= 1, 10)
    others = [n for n in nodes if n is not leader]
    expires = expiry_bound(leader.status)
    leader.signal(signal.SIGTERM)
    sent = time.monotonic()
    new = wait_until("a new leader", lambda: leader_of(others), 10, every=0.01)
    took = time.monotonic() - sent
    assert time.monotonic() < expires, f"handoff took {took:.2f}s, no faster than the lease's expiry"
    runner.join(timeout=30)
    assert answer["r"].status_code == 200 and answer["r"].json()["outcome"] == "ok"  # the run was not cut
    assert leader.proc is not None and leader.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in leader.log()
    wait_until("heartbeats on the new leader", lambda: len(new.heartbeats()) >= 3, 20)
    time.sleep(1.0)

    # judged from what the bodies printed: every second once, across the handoff
    beats = [b for n in nodes for b in n.heartbeats()]
    counts = Counter(t for t, _, _ in beats)
    assert [t for t, n in counts.items() if n > 1] == []
    times = sorted(datetime.fromisoformat(t) for t in counts)
    expected = times[0]
    missing = []
    while expected <= times[-1]:
        if expected not in counts and expected.isoformat() not in counts:
            missing.append(expected)
        expected += timedelta(seconds=1)
    assert missing == [] and len(times) >= 6
    assert {node for _, node, _ in beats} == {leader.name, new.name}
    runs = new.get("/runs", params={"job": "nightly-report"})["runs"]
    assert runs[0]["result"]["value"] == {"rows": 1234} and runs[0]["result"]["kind"] == "manual"
