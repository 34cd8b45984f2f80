"""An event loop on virtual time, where each simulated process can be paused or killed.

``SimLoop`` never sleeps and does no I/O: when nothing is ready, its clock
jumps to the next timer. Every callback carries the ``contextvars.Context``
it was scheduled in (Tasks and Futures pass theirs), and a simulated process
is the value of the ``PROCESS`` context variable in the contexts of its
tasks. When a callback comes due, the loop looks at its process:

* up: it runs;
* paused (SIGSTOP): it is set aside, and runs when the process resumes, in
  the order it came due (timers that expired meanwhile fire late, all at once,
  as after a real SIGCONT);
* dead (SIGKILL, or a process that exited): it never runs. Dropped handles are
  kept (``Process.graveyard``) so that the garbage collector does not close
  the dead process's coroutines, which would run their ``finally`` blocks.

The decision is taken when the callback is due, not when it was queued, so a
wake-up queued by another process (a lock released, a store event set) for a
paused one waits for it. Callbacks in a context without a process (the
simulated lock server, the driver) always run.

Each process also has its own clocks (``Process.clock``): ``loop.time()``
called inside a process reads that process's monotonic clock, and timers it
sets are converted back to the loop's true time, so a host whose clock runs
fast sleeps a little shorter in true time, as a real one would.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
from asyncio import events
from collections.abc import Callable
from typing import Any

UP, PAUSED, DEAD = "up", "paused", "dead"

_MIN_SCHEDULED = 100


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is set: the simulation cannot go on."""


class HostClock:
    """One host's clocks as functions of the loop's true time ``t``.

    ``monotonic = mono0 + rate * t``; ``wall = wall0 + rate * t + offset``,
    where ``offset`` changes only by steps (an NTP step, an operator). ``rate``
    is the host oscillator's rate against true time (1.0: exact).
    """

    __slots__ = ("mono0", "offset", "rate", "wall0")

    def __init__(self, wall0: float, mono0: float = 0.0, rate: float = 1.0, offset: float = 0.0) -> None:
        self.wall0 = wall0
        self.mono0 = mono0
        self.rate = rate
        self.offset = offset

    def monotonic(self, t: float) -> float:
        return self.mono0 + self.rate * t

    def wall(self, t: float) -> float:
        return self.wall0 + self.rate * t + self.offset

    def true_from_monotonic(self, mono: float) -> float:
        return (mono - self.mono0) / self.rate

    def true_from_wall(self, wall: float) -> float:
        """The true instant this clock reads ``wall`` (with the current offset)."""
        return (wall - self.wall0 - self.offset) / self.rate


class Process:
    """One simulated process: its run state, its host's clock, what waits for it."""

    __slots__ = ("clock", "deferred", "graveyard", "name", "pid", "state")

    def __init__(self, name: str, clock: HostClock, pid: int = 0) -> None:
        self.name = name
        self.pid = pid
        self.clock = clock
        self.state = UP
        self.deferred: list[events.Handle] = []
        self.graveyard: list[events.Handle] = []

    def __repr__(self) -> str:
        return f"Process({self.name!r}, {self.state})"


#: The process whose task (or callback) is running; None for the server and the driver.
PROCESS: contextvars.ContextVar[Process | None] = contextvars.ContextVar("sim_process", default=None)


class _Handle(events.Handle):
    """``events.Handle`` without the debug-mode bookkeeping (the simulation never runs in debug mode)."""

    __slots__ = ()

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop,
                 context: contextvars.Context | None) -> None:
        self._context = context if context is not None else contextvars.copy_context()
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None


class _TimerHandle(events.TimerHandle):
    __slots__ = ()

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...],
                 loop: asyncio.AbstractEventLoop, context: contextvars.Context | None) -> None:
        self._context = context if context is not None else contextvars.copy_context()
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None
        self._when = when
        self._scheduled = True


class SimLoop(asyncio.BaseEventLoop):
    """A loop whose clock jumps to the next timer, with per-process pause and kill."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._seq = 0  # timers due at the same instant run in the order they were set
        #: Iterations run; a run that spins without end is stopped by its driver.
        self.iterations = 0

    # -- time ---------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """True virtual time (what the server and the checker use)."""
        return self._now

    def time(self) -> float:
        proc = PROCESS.get()
        if proc is None:
            return self._now
        return proc.clock.monotonic(self._now)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any,
                   context: contextvars.Context | None = None) -> events.TimerHandle:
        """``call_at(time() + delay)``, in one step: ``delay`` seconds of the caller's monotonic clock."""
        proc = PROCESS.get()
        return self.call_at_true(self._now + (delay if proc is None else delay / proc.clock.rate), callback, *args,
                                 context=context)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: contextvars.Context | None = None) -> events.TimerHandle:
        proc = PROCESS.get()  # ``when`` was computed from the caller's ``time()``
        if proc is not None:
            when = proc.clock.true_from_monotonic(when)
        return self.call_at_true(when, callback, *args, context=context)

    def call_at_true(self, when: float, callback: Callable[..., Any], *args: Any,
                     context: contextvars.Context | None = None) -> events.TimerHandle:
        """``call_at`` on the loop's true time, whoever calls."""
        timer = _TimerHandle(when, callback, args, self, context)
        self._seq += 1
        heapq.heappush(self._scheduled, (when, self._seq, timer))
        return timer

    def call_soon(self, callback: Callable[..., Any], *args: Any,
                  context: contextvars.Context | None = None) -> events.Handle:
        handle = _Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    call_soon_threadsafe = call_soon  # type: ignore[assignment]

    # -- processes -------------------------------------------------------------------------

    def pause(self, proc: Process) -> None:
        if proc.state == UP:
            proc.state = PAUSED

    def resume(self, proc: Process) -> None:
        if proc.state == PAUSED:
            proc.state = UP
            self._ready.extend(proc.deferred)
            proc.deferred = []

    def kill(self, proc: Process) -> None:
        if proc.state != DEAD:
            proc.state = DEAD
            proc.graveyard.extend(proc.deferred)
            proc.deferred = []

    # -- the loop -------------------------------------------------------------------------------

    def _write_to_self(self) -> None:
        """No threads and no selector: call_soon_threadsafe is call_soon."""

    def _process_events(self, event_list: Any) -> None:  # pragma: no cover - never called
        pass

    def _run_once(self) -> None:
        # ``_scheduled`` holds (when, seq, TimerHandle): tuples compare in C, and equal times keep their order
        self.iterations += 1
        sched = self._scheduled
        if len(sched) > _MIN_SCHEDULED and self._timer_cancelled_count * 2 > len(sched):
            kept = []
            for entry in sched:
                if entry[2]._cancelled:
                    entry[2]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._scheduled = sched = kept
            self._timer_cancelled_count = 0
        else:
            while sched and sched[0][2]._cancelled:
                self._timer_cancelled_count -= 1
                heapq.heappop(sched)[2]._scheduled = False
        ready = self._ready
        if not ready and not self._stopping:
            if not sched:
                raise Deadlock("no callback ready and no timer set")
            when = sched[0][0]
            if when > self._now:
                self._now = when
        now = self._now
        pop = heapq.heappop
        while sched and sched[0][0] <= now:
            handle = pop(sched)[2]
            handle._scheduled = False
            if handle._cancelled:
                self._timer_cancelled_count -= 1
            else:
                ready.append(handle)
        for _ in range(len(ready)):
            handle = ready.popleft()
            if handle._cancelled:
                continue
            context = handle._context
            proc = context.get(PROCESS)
            if proc is not None and proc.state != UP:
                (proc.deferred if proc.state == PAUSED else proc.graveyard).append(handle)
                continue
            try:  # Handle._run, inline (a call less per callback)
                context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.call_exception_handler({"message": f"Exception in callback {handle._callback!r}",
                                             "exception": exc, "handle": handle})
        handle = None  # break cycles on exceptions, as the stdlib loop does
