"""``python -m loadtest up | chaos | check`` end to end, and their answers to bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loadtest(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_chaos_check_end_to_end(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    earlier = '{"note": "a record from an earlier run must survive"}\n'
    (state_dir / "probes.jsonl").write_text(earlier)
    up = subprocess.Popen([sys.executable, "-m", "loadtest", "up", "--state-dir", str(state_dir), "--duration", "40",
                           "--no-live", "--ttl", "2", "--probe-jobs", "2"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state_path = state_dir / "state.json"
        deadline = time.monotonic() + 60
        while not (state_path.exists() and "control_url" in state_path.read_text()):
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "no state file"
            time.sleep(0.2)
        time.sleep(3)
        done = loadtest("chaos", "--state-dir", str(state_dir), "--fault", "kill,term", "--interval", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "kill node-" in done.stdout and "term node-" in done.stdout
        # partition needs a proxy, which the file backend has no use for: one clear line, exit 1
        done = loadtest("chaos", "--state-dir", str(state_dir), "--fault", "partition")
        assert done.returncode == 1 and "does not apply to the file backend" in done.stderr
        time.sleep(4)
    finally:
        up.terminate()
        out, _ = up.communicate(timeout=60)
    assert "stopped; probe records kept" in out, out
    # no node, collector or server left behind
    state = json.loads((state_dir / "state.json").read_text())
    for node in state["nodes"]:
        assert not node["pid"] or not alive(node["pid"]), f"{node['node_id']} left running"
    records = (state_dir / "probes.jsonl").read_text()
    assert records.startswith(earlier)  # appended to, never truncated
    # the checker reads the collector's file and the chaos log; the earlier foreign line is bad input for it,
    # so check a copy without it
    (tmp_path / "probes.jsonl").write_text(records[len(earlier):])
    state["collector_file"] = str(tmp_path / "probes.jsonl")
    (tmp_path / "state.json").write_text(json.dumps(state))
    done = loadtest("check", "--state", str(tmp_path / "state.json"), "--json")
    assert done.stdout.strip(), done.stderr
    report = json.loads(done.stdout)
    assert report["duplicates"] == 0 and report["missed"] == 0, report
    assert report["handoffs"] >= 2
    assert done.returncode == 0
    # and a cluster that is gone is reported as such
    done = loadtest("chaos", "--state-dir", str(state_dir), "--fault", "kill")
    assert done.returncode == 1 and "is gone" in done.stderr


def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path: Path) -> None:
    done = loadtest("up", "--backend", "mongodb", "--state-dir", str(tmp_path / "a"))
    assert done.returncode == 2 and "unknown backend 'mongodb'" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = loadtest("up", "--base-port", str(port), "--state-dir", str(tmp_path / "b"))
    assert done.returncode == 2 and f"port {port} is in use" in done.stderr

    done = loadtest("chaos", "--state-dir", str(tmp_path / "nowhere"))
    assert done.returncode == 1 and "no cluster state" in done.stderr

    done = loadtest("chaos", "--state-dir", str(tmp_path / "nowhere"), "--fault", "meteor")
    assert done.returncode == 1 and "unknown fault" in done.stderr


def test_missing_server_binary_names_the_install_command(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    env = {**os.environ, "PATH": str(bindir), "BATON_USE_DOCKER": "0"}
    assert shutil.which("redis-server", path=str(bindir)) is None
    done = loadtest("up", "--backend", "redis", "--state-dir", str(tmp_path / "s"), "--duration", "5", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "apt-get install -y redis-server" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stdout + done.stderr
