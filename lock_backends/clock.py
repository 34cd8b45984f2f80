"""The clocks Baton reads, in one place, so a simulation can replace them.

Production code reads time only through this module: ``monotonic()`` for
lease deadlines and timeouts, ``time()`` and ``utcnow()`` for fire times and
records. The clock in force is a context variable, so the deterministic
simulator (``loadtest.sim``) runs several nodes in one event loop, each on
its own virtual clock (one of them stepped, say), while a real process never
sees anything but the system clocks.
"""

from __future__ import annotations

import contextvars
import time as _time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """A monotonic clock for durations and a wall clock for instants."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (lease deadlines, timeouts)."""
        ...

    def time(self) -> float:
        """Unix seconds on the wall clock (fire times, records). May jump."""
        ...


class SystemClock:
    """The process's own clocks."""

    def monotonic(self) -> float:
        return _time.monotonic()

    def time(self) -> float:
        return _time.time()


SYSTEM = SystemClock()

_current: contextvars.ContextVar[Clock] = contextvars.ContextVar("baton_clock", default=SYSTEM)


def current() -> Clock:
    return _current.get()


@contextmanager
def using(clock: Clock) -> Iterator[None]:
    """Run the block (and every task it creates) on ``clock``."""
    token = _current.set(clock)
    try:
        yield
    finally:
        _current.reset(token)


def monotonic() -> float:
    return _current.get().monotonic()


def time() -> float:
    return _current.get().time()


def utcnow() -> datetime:
    """The wall clock as an aware UTC datetime."""
    return datetime.fromtimestamp(_current.get().time(), UTC)


def to_us(t: datetime) -> int:
    """An aware datetime as whole microseconds since the Unix epoch: exact, and safe in JSON, Lua and SQL."""
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
