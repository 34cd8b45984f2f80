"""The collector's records and the chaos log, as the checker reads them.

One shape per record (``Probe``, checked by ``probe_problem``, which the
collector also applies before it stores a record) and per fault entry
(``chaos_problem``); the fire-time grid every probe job runs on (``Grid``);
and the files read line by line, so that bad input is one ``InputError``
naming the file and the line, never a traceback. A last line without its
newline that does not parse is a torn write the collector never acknowledged:
it is skipped with a warning.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from node.outcomes import RunKind
from node.triggers import INTERVAL_EPOCH

#: Interval fire times count from here.
EPOCH = INTERVAL_EPOCH
#: A scheduled_at this close to a grid instant is that instant (float intervals, clock formatting).
GRID_TOLERANCE_US = 1000

REQUIRED_FIELDS: dict[str, type] = {"job": str, "scheduled_at": str, "node": str, "token": int, "started_at": str}


class InputError(ValueError):
    """Bad input; the message is one line naming the file and line (or record) at fault."""


def parse_time(value: object) -> datetime:
    """An ISO 8601 timestamp with an offset, as UTC. Naive times are refused: nodes' zones may differ."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a timestamp string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return parsed.astimezone(UTC)


def probe_problem(obj: object) -> str | None:
    """Why ``obj`` is not a probe record, or None. Shared with the collector, which refuses what this refuses.

    ``kind`` and ``shape`` are optional (older probes do not send them); when present they must be non-empty
    strings. An unknown kind is accepted here (a newer node may know more kinds) and warned about by the check.
    """
    if not isinstance(obj, dict):
        return "a probe record must be a JSON object"
    for key, kind in REQUIRED_FIELDS.items():
        if key not in obj:
            return f"missing field {key!r}"
        value = obj[key]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"field {key!r} must be an integer"
        elif not isinstance(value, str) or not value:
            return f"field {key!r} must be a non-empty string"
    for key in ("kind", "shape"):
        if key in obj and (not isinstance(obj[key], str) or not obj[key]):
            return f"field {key!r} must be a non-empty string when present"
    for key in ("scheduled_at", "started_at", *(("received_at",) if "received_at" in obj else ())):
        try:
            parse_time(obj[key])
        except ValueError as exc:
            return f"field {key!r}: {exc}"
    return None


@dataclass(frozen=True)
class Probe:
    job: str
    scheduled_at: datetime
    node: str
    token: int
    started_at: datetime
    order: int  # position in the input, to keep sorts stable and reproducible
    sched_us: int  # scheduled_at as microseconds since EPOCH: exact, hashable, cheap to compare
    kind: str = RunKind.SCHEDULED
    received_at: datetime | None = None

    @classmethod
    def from_dict(cls, obj: object, order: int, where: str) -> Probe:
        problem = probe_problem(obj)
        if problem is not None:
            raise InputError(f"{where}: {problem}")
        assert isinstance(obj, dict)
        scheduled_at = parse_time(obj["scheduled_at"])
        received = parse_time(obj["received_at"]) if "received_at" in obj else None
        return cls(obj["job"], scheduled_at, obj["node"], obj["token"], parse_time(obj["started_at"]), order,
                   Grid.micros(scheduled_at), str(obj.get("kind", RunKind.SCHEDULED)), received)

    @property
    def early_by(self) -> float:
        """Seconds this run started before its fire time, by the node's clock or by the collector's."""
        starts = [self.started_at] + ([self.received_at] if self.received_at is not None else [])
        return (self.scheduled_at - min(starts)).total_seconds()

    def ref(self) -> dict[str, Any]:
        """The run as evidence: which job, which fire time, which node and token, what kind."""
        return {"job": self.job, "scheduled_at": iso(self.scheduled_at), "node": self.node, "token": self.token,
                "kind": self.kind, "started_at": iso(self.started_at)}


@dataclass(frozen=True)
class Grid:
    """Fire instants as integers k: ``EPOCH + k * interval``, in whole microseconds to stay exact."""

    interval_us: int

    @classmethod
    def of(cls, interval: float) -> Grid:
        return cls(round(interval * 1_000_000))

    @staticmethod
    def micros(t: datetime) -> int:
        d = t - EPOCH
        return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds

    def index(self, us: int) -> int | None:
        """The instant at ``us`` microseconds since EPOCH, or None if that lies off the grid."""
        k, rem = divmod(us, self.interval_us)
        if rem <= GRID_TOLERANCE_US:
            return k
        if self.interval_us - rem <= GRID_TOLERANCE_US:
            return k + 1
        return None

    def first_at_or_after(self, t: datetime) -> int:
        return -(-(self.micros(t) - GRID_TOLERANCE_US) // self.interval_us)

    def last_at_or_before(self, t: datetime) -> int:
        return (self.micros(t) + GRID_TOLERANCE_US) // self.interval_us

    def time(self, k: int) -> datetime:
        return EPOCH + timedelta(microseconds=k * self.interval_us)


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def chaos_problem(entry: object) -> str | None:
    """Why ``entry`` is not a fault entry, or None."""
    if not isinstance(entry, dict):
        return "a chaos entry must be a JSON object"
    if not isinstance(entry.get("fault"), str) or not entry["fault"]:
        return "field 'fault' must be a non-empty string"
    try:
        parse_time(entry.get("ts"))
    except ValueError as exc:
        return f"field 'ts': {exc}"
    return None


def fault_starts(chaos: list[dict[str, Any]]) -> list[tuple[datetime, dict[str, Any]]]:
    """The fault entries that start a fault, in time order; a bad entry is an :class:`InputError`."""
    starts: list[tuple[datetime, dict[str, Any]]] = []
    for i, entry in enumerate(chaos):
        problem = chaos_problem(entry)
        if problem is not None:
            raise InputError(f"chaos entry {i + 1}: {problem}")
        if entry.get("phase", "start") != "end":
            starts.append((parse_time(entry["ts"]), entry))
    starts.sort(key=lambda s: s[0])
    return starts


def fault_ends(chaos: list[dict[str, Any]]) -> list[tuple[datetime, dict[str, Any]]]:
    """The fault entries that end a fault, in time order (``fault_starts`` has checked every entry)."""
    return sorted(((parse_time(e["ts"]), e) for e in chaos if e.get("phase") == "end"), key=lambda s: s[0])


def read_jsonl(path: Path, what: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, object) of each line of a JSONL file, and warnings. A bad line is an :class:`InputError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n") and bool(lines[-1].strip())
    out: list[tuple[int, dict[str, Any]]] = []
    warnings: list[str] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if torn_tail and number == len(lines):
                warnings.append(f"{path}:{number}: ignored a torn last line (no newline, not JSON)")
                continue
            raise InputError(f"{path}:{number}: not a JSON object: {exc}") from None
        out.append((number, obj))
    return out, warnings


def _load_checked(path: Path, what: str,
                  problem_of: Callable[[object], str | None]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every line checked here, so an error can name its line."""
    lines, warnings = read_jsonl(path, what)
    for number, obj in lines:
        problem = problem_of(obj)
        if problem is not None:
            raise InputError(f"{path}:{number}: {problem}")
    return [obj for _, obj in lines], warnings


def load_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Probe records of the collector's file."""
    return _load_checked(path, "records file", probe_problem)


def load_chaos(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Fault entries of the chaos log."""
    return _load_checked(path, "chaos log", chaos_problem)
