"""``python -m loadtest up`` owns its processes: nothing it started outlives it, however it ends.

Each test starts a real ``up`` (file backend, no server) as a subprocess and
ends it the way a person or a machine would: Ctrl-C, ``kill``, a closed
terminal, ``kill -9``, a reader of its output that went away. The checks look
at the pids ``up`` wrote to its state file, a zombie counting as gone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from loadtest.up import lock_held, post_fault

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
#: Generous bounds: the machine may be busy; every wait below ends as soon as its condition holds.
START_TIMEOUT = 120.0
GONE_TIMEOUT = 60.0


def _default_signals() -> None:
    # A test runner started in the background may ignore SIGINT (and nohup SIGHUP); ``up`` rightly keeps
    # ignored signals ignored, so give it the disposition a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def up_argv(state_dir: Path, *extra: str) -> list[str]:
    return [PY, "-m", "loadtest", "up", "--state-dir", str(state_dir), "--no-live", "--ttl", "2",
            "--probe-jobs", "1", "--duration", "600", *extra]


class Up:
    """One ``up`` subprocess, its output in files (or stdout on a pipe the test holds)."""

    def __init__(self, state_dir: Path, *extra: str, stdout_pipe: bool = False) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.out_path = state_dir.parent / f"{state_dir.name}-up-{time.monotonic_ns()}.out"
        self.err_path = self.out_path.with_suffix(".err")
        self._out: IO[bytes] | int
        if stdout_pipe:
            self._out = subprocess.PIPE
        else:
            self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(up_argv(state_dir, *extra), cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=self._out, stderr=err, preexec_fn=_default_signals)
        self.piped = b""

    @property
    def out(self) -> str:
        if self.proc.stdout is not None:
            return self.piped.decode(errors="replace")
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self) -> dict[str, Any]:
        """Until ``up`` reports a leader and its state file names this process; the state file's content."""
        deadline = time.monotonic() + START_TIMEOUT
        while "leader: " not in self.out:
            if self.proc.poll() is not None:
                raise AssertionError(f"up exited with {self.proc.returncode}:\n{self.out}\n{self.err}")
            assert time.monotonic() < deadline, f"up not ready within {START_TIMEOUT}s:\n{self.out}\n{self.err}"
            if self.proc.stdout is not None:
                ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
                if ready:
                    self.piped += os.read(self.proc.stdout.fileno(), 65536)
            else:
                time.sleep(0.1)
        state = read_state(self.state_dir)
        assert state.get("up_pid") == self.proc.pid, state
        return state

    def wait(self, timeout: float = GONE_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its children die with it
            self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not isinstance(self._out, int):
            self._out.close()


@pytest.fixture
def ups() -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(state_dir: Path, *extra: str, stdout_pipe: bool = False) -> Up:
        up = Up(state_dir, *extra, stdout_pipe=stdout_pipe)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


def read_state(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / "state.json").read_text()))
    except (OSError, ValueError):
        return {}


def owned_pids(state: dict[str, Any]) -> dict[str, int]:
    pids = {n["node_id"]: n["pid"] for n in state["nodes"]}
    pids["collector"] = state["collector_pid"]
    assert all(pids.values()) and len(pids) == 4, state
    return pids


def running(pid: int) -> bool:
    """Alive and not a zombie: an orphan's zombie waits for init to reap it, which may take a moment."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_gone(pids: dict[str, int], timeout: float = GONE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while (left := {name: pid for name, pid in pids.items() if running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left running: {left}"


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)
    return value


def assert_clean_stop(up: Up, code: int, state_file_is_its_own: bool = True) -> None:
    out, err = up.out, up.err
    assert code == 0, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err, out + err
    assert "stopped; probe records kept" in out, out
    assert "killed" not in out, out  # every node stopped on its SIGTERM, handing its lease over
    if state_file_is_its_own:
        assert read_state(up.state_dir).get("stopped_at"), "state file not marked stopped"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_nothing_outlives_up(tmp_path: Path, ups: Callable[..., Up], sig: int) -> None:
    state_dir = tmp_path / "state"
    up = ups(state_dir)
    state = up.wait_ready()
    old_node1 = owned_pids(state)["node-1"]
    # a node that chaos kills is restarted from a control request's thread: it must be owned the same way
    result = post_fault(state_dir / "state.json", "kill", "node-1", None, timeout=120)
    assert result["target"] == "node-1"
    state = eventually(lambda: (s := read_state(state_dir)) and s["nodes"][0]["pid"] != old_node1 and s,
                       30, "the restarted node-1 in the state file")
    pids = owned_pids(state)
    assert running(pids["node-1"]), "the restarted node died with the request thread that started it"

    os.kill(up.proc.pid, sig)
    code = up.wait()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert_clean_stop(up, code)
    wait_gone(pids)
    assert not lock_held(state_dir)


def test_second_up_refuses_in_one_line_then_replaces(tmp_path: Path, ups: Callable[..., Up]) -> None:
    state_dir = tmp_path / "state"
    first = ups(state_dir)
    pids = owned_pids(first.wait_ready())

    t0 = time.monotonic()
    done = subprocess.run(up_argv(state_dir), cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert f"already running: up pid {first.proc.pid}" in line and f"kill {first.proc.pid}" in line
    assert "--replace" in line
    assert all(str(pid) in line for pid in pids.values()), line
    assert took < 30, f"took {took:.1f}s"  # at once: no waiting for a leader that cannot come
    assert first.proc.poll() is None and all(running(p) for p in pids.values())

    second = ups(state_dir, "--replace")
    state = second.wait_ready()
    # the first one was asked to stop, and stopped cleanly (the state file is the second one's by now)
    assert_clean_stop(first, first.wait(), state_file_is_its_own=False)
    wait_gone(pids)
    assert "stopping the cluster of up pid" in second.out

    new = owned_pids(state)
    second.proc.send_signal(signal.SIGTERM)
    assert_clean_stop(second, second.wait())
    wait_gone(new)


def test_reader_gone_stops_up(tmp_path: Path, ups: Callable[..., Up]) -> None:
    """``up | head`` or ``up | tee`` stopped: the pipe breaks, ``up`` stops everything and says nothing more."""
    state_dir = tmp_path / "state"
    up = ups(state_dir, stdout_pipe=True)
    pids = owned_pids(up.wait_ready())
    assert up.proc.stdout is not None
    up.proc.stdout.close()
    code = up.wait()
    assert code == 0, up.err
    assert "Traceback" not in up.err and "BrokenPipe" not in up.err, up.err
    wait_gone(pids)
    assert read_state(state_dir).get("stopped_at")


def test_leftovers_of_an_older_up_are_found_and_replaced(tmp_path: Path, ups: Callable[..., Up]) -> None:
    """An ``up`` from before it owned its nodes left one running on the state directory: say so, or stop it."""
    fake = tmp_path / "fake"
    (fake / "node").mkdir(parents=True)
    (fake / "node" / "__main__.py").write_text(textwrap.dedent("""
        import time
        time.sleep(600)
    """))
    state_dir = tmp_path / "state"
    (state_dir / "cluster").mkdir(parents=True)
    log = state_dir / "cluster" / "node-1.log"
    with open(log, "ab") as out:
        orphan = subprocess.Popen([PY, "-m", "node"], cwd=fake, env={**os.environ, "PYTHONPATH": str(fake)},
                                  stdout=out, stdin=subprocess.DEVNULL)
    try:
        eventually(lambda: Path(f"/proc/{orphan.pid}/cmdline").read_bytes().endswith(b"-m\0node\0"), 30,
                   "the orphan to run")
        (state_dir / "state.json").write_text(json.dumps({
            "up_pid": 1, "nodes": [{"node_id": "node-1", "port": 1, "pid": orphan.pid, "log": str(log)}]}))

        done = subprocess.run(up_argv(state_dir), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert f"node-1 {orphan.pid}" in done.stderr and "--replace" in done.stderr
        assert orphan.poll() is None

        up = ups(state_dir, "--replace")
        pids = owned_pids(up.wait_ready())
        assert orphan.wait(timeout=30) == -signal.SIGTERM
        up.proc.send_signal(signal.SIGINT)
        assert_clean_stop(up, up.wait())
        wait_gone(pids)
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
