"""The peers' own virtualenv, ``.venv-peers``: built once, reused until its requirements change.

APScheduler 4 (a peer) and APScheduler 3 (the node) are one distribution name
in two incompatible majors, so the peers cannot live in the project venv. The
build is the slow part of the peers section (pip over the network), so it is
skipped when the venv's stamp matches the requirements file and the
interpreter; a file lock keeps two benchmark runs from building at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-peers"
REQUIREMENTS = ROOT / "loadtest" / "peers" / "requirements.txt"
#: What the workers import; checked after a build so a broken install fails here, not mid-benchmark.
IMPORTS = "import tooz.drivers.redis, apscheduler, apscheduler.datastores.sqlalchemy, asyncpg, sniffio"


class PeersError(RuntimeError):
    """The peers section cannot run; the message is one line for the report."""


def python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def wanted_stamp() -> str:
    """Requirements and interpreter: either changing makes the venv stale."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def is_fresh(venv: Path = VENV) -> bool:
    stamp = venv / ".baton-requirements.sha256"
    return python(venv).exists() and stamp.exists() and stamp.read_text().strip() == wanted_stamp()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1] if lines else "no output"


def ensure(log: Path, step: Callable[[str, float], Callable[[float], None]] | None = None,
           venv: Path = VENV) -> Path:
    """The peers' python, building ``venv`` first if it is missing or stale. Raises :class:`PeersError`."""
    lock_path = Path(tempfile.gettempdir()) / "baton-venv-peers.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_fresh(venv):
            return python(venv)
        advance = step("peers: building .venv-peers (pip install, once)", 3) if step else (lambda _=1: None)
        shutil.rmtree(venv, ignore_errors=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            made = subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=out, stderr=subprocess.STDOUT)
            if made.returncode != 0:
                raise PeersError(f"could not create {venv}: python -m venv failed; see {log}")
            advance(1)
            try:
                pip = subprocess.run([str(python(venv)), "-m", "pip", "install", "--disable-pip-version-check",
                                      "-q", "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                raise PeersError(f"could not build {venv}: pip install took over 15 minutes") from None
            out.write(pip.stdout + pip.stderr)
            if pip.returncode != 0:
                raise PeersError(f"could not build {venv} (no network to PyPI?): pip install failed: "
                                 f"{_last_line(pip.stderr or pip.stdout)}; see {log}")
            advance(1)
            probe = subprocess.run([str(python(venv)), "-c", IMPORTS], capture_output=True, text=True)
            out.write(probe.stdout + probe.stderr)
            if probe.returncode != 0:
                raise PeersError(f"{venv} was built but does not import: {_last_line(probe.stderr)}")
        (venv / ".baton-requirements.sha256").write_text(wanted_stamp() + "\n")
        advance(1)
        return python(venv)
