"""Between the simulated processes and the simulated lock server: latency, outages, operation faults.

``FaultyBackend`` wraps any backend object and intercepts every coroutine
method by name (``claim_window``, ``hand_back``, ``server_time``... of the
protocol in ``lock_backends.base``), so it needs no change when the protocol
grows. A call is a round trip:

1. the request leaves at once, and reaches the server after the request
   latency, *in the server's context*: a process paused or killed after
   sending does not hold its request back, as on a real network;
2. the server applies it (the wrapped method runs to completion there and
   then, atomically, as a script or a transaction: it may yield to the loop,
   as the in-memory backends do once, but never wait), unless the store is
   down, the caller's host is cut off, or an operation fault says it fails
   first;
3. the answer comes back after the response latency, or never (a lost
   answer), and the caller gives up at its operation timeout with
   ``BackendUnavailable``: as with the real clients, an operation that times
   out may still have been applied, later.

Faults on single operations are armed for a host (or any host) and an
operation name, and hit the next matching call within their window:
``delay-request`` and ``delay-response`` (slow, possibly past the timeout),
``fail-before`` (refused, not applied), ``fail-after`` (applied, answer lost),
and ``raise`` (an exception that is not a ``LockBackendError``, not applied).

Waits (``wait_for_change``) are not round trips: they run in the caller's
context, and a caller that cannot reach the store just waits its timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from loadtest.sim.loop import SimLoop
from lock_backends import BackendUnavailable

#: Methods that wait rather than ask: no round trip, no faults.
WAITS = frozenset({"wait_for_change"})
#: Methods that do not reach the server.
LOCAL = frozenset({"close"})
#: Methods whose answers are reported to ``on_answer`` when they reach the caller.
ANSWERS_SEEN = frozenset({"claim_window", "hand_back"})

EFFECTS = ("delay-request", "delay-response", "fail-before", "fail-after", "raise")


class InjectedError(RuntimeError):
    """An unexpected exception from a backend call (a client library bug, a decoding error)."""


@dataclass
class ArmedFault:
    host: str | None  # None: any host
    op: str
    effect: str
    delay: float
    until: float  # true time after which it is dropped unused
    label: str


class Network:
    """What every call crosses: seeded latencies, store outages, cut-off hosts, armed operation faults."""

    def __init__(self, loop: SimLoop, rng: random.Random, *, op_timeout: float,
                 latency: tuple[float, float] = (0.0005, 0.003),
                 apply_as: Callable[[Any, Callable[[], Any]], Any] | None = None,
                 on_event: Callable[..., None] | None = None,
                 observe: Callable[[str, str, tuple[Any, ...], Any, float], None] | None = None) -> None:
        self.loop = loop
        self.rng = rng
        self.op_timeout = op_timeout
        self.latency = latency
        self.down_until = -1.0
        self.cut_until: dict[str, float] = {}
        self.armed: list[ArmedFault] = []
        #: Runs a server-side application with the sender's clock readings (``frozen``) in force.
        self._apply_as = apply_as or (lambda _frozen, fn: fn())
        #: The context of everything that happens at the server (no process: never paused or killed).
        self.server = contextvars.Context()
        self._on_event = on_event or (lambda *a: None)
        #: Called at the server when an operation applied: (host, op, args, result, when the request left).
        self._observe = observe or (lambda *a: None)

    # -- faults ------------------------------------------------------------------------

    def outage(self, duration: float) -> None:
        self.down_until = max(self.down_until, self.loop.now + duration)

    def cut(self, host: str, duration: float) -> None:
        self.cut_until[host] = max(self.cut_until.get(host, -1.0), self.loop.now + duration)

    def arm(self, host: str | None, op: str, effect: str, delay: float, window: float, label: str) -> None:
        self.armed.append(ArmedFault(host, op, effect, delay, self.loop.now + window, label))

    def reachable(self, host: str) -> bool:
        now = self.loop.now
        return now >= self.down_until and now >= self.cut_until.get(host, -1.0)

    def _take(self, host: str, op: str) -> ArmedFault | None:
        if not self.armed:
            return None
        now = self.loop.now
        for i, fault in enumerate(self.armed):
            if fault.until < now:
                continue
            if fault.op == op and (fault.host is None or fault.host == host):
                del self.armed[i]
                return fault
        self.armed = [f for f in self.armed if f.until >= now]
        return None

    # -- a round trip ------------------------------------------------------------------------

    def call(self, host: str, op: str, method: Callable[..., Any], frozen: Any,
             args: tuple[Any, ...], kwargs: dict[str, Any]) -> Awaitable[Any]:
        """Send the request now; the awaitable returned gives the answer (a plain future: no coroutine per call)."""
        loop = self.loop
        lo, hi = self.latency
        up = self.rng.uniform(lo, hi)
        down = self.rng.uniform(lo, hi)
        fault = self._take(host, op)
        effect = ""
        if fault is not None:
            effect = fault.effect
            self._on_event("op-fault", host, op, fault.effect, round(fault.delay, 6), fault.label)
            if effect == "delay-request":
                up += fault.delay
            elif effect == "delay-response":
                down += fault.delay
            elif effect == "raise":
                return _raise_after(up + down, InjectedError(f"injected: unexpected error in {op}"))
        sent = loop.now
        gave_up = sent + self.op_timeout
        answer: asyncio.Future[Any] = loop.create_future()
        server = self.server

        def settle(value: Any, error: BaseException | None) -> None:
            if not answer.done():
                if error is not None:
                    answer.set_exception(error)
                else:
                    answer.set_result(value)

        def timed_out() -> None:
            settle(None, BackendUnavailable(f"{op}: no answer within {self.op_timeout}s", backend="memory",
                                            address="memory://sim"))

        def arrive() -> None:
            value: Any = None
            error: Exception | None = None
            if effect == "fail-before" or not self.reachable(host):
                error = BackendUnavailable(f"{op}: store unreachable", backend="memory", address="memory://sim")
            else:
                try:
                    value = self._apply_as(frozen, lambda: _apply(method(*args, **kwargs)))
                except Exception as exc:
                    error = exc
                else:
                    self._observe(host, op, args, value, sent)
            at = loop.now + down
            if effect == "fail-after" or at > gave_up:
                # the answer is lost, or comes after the caller gave up: the caller's timeout speaks
                if loop.now <= gave_up:
                    loop.call_at_true(gave_up, timed_out, context=server)
                return
            loop.call_at_true(at, settle, value, error, context=server)

        loop.call_at_true(sent + up, arrive, context=server)
        if up > self.op_timeout:
            loop.call_at_true(gave_up, timed_out, context=server)
        return answer


async def _raise_after(delay: float, error: BaseException) -> Any:
    await asyncio.sleep(delay)
    raise error


def _apply(coro: Any) -> Any:
    """Run a simulated backend operation to its end, now: it may yield to the loop, never wait on anything."""
    try:
        while True:
            if coro.send(None) is not None:
                coro.close()
                raise RuntimeError("a simulated backend operation waited on a future; it must apply at once")
    except StopIteration as stop:
        return stop.value


class FaultyBackend:
    """A backend as one host sees it through the ``Network``; every coroutine method is a round trip."""

    def __init__(self, inner: Any, net: Network, host: str, frozen_clock: Callable[[], Any],
                 on_answer: Callable[[str, tuple[Any, ...], Any], None] | None = None) -> None:
        self.inner = inner
        self.net = net
        self.host = host
        #: Returns the caller's clock readings at the moment of sending (the server-side task reads them).
        self._frozen_clock = frozen_clock
        #: Called in the caller's context when an answer reaches it: (op, args, result).
        self._on_answer = on_answer
        for name in ("kind", "address", "options"):  # read often, never changed: no __getattr__ for them
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attr) or name in LOCAL:
            return attr
        wrapped: partial[Any]
        if name in WAITS:
            wrapped = partial(self._wait, attr)
        elif self._on_answer is not None and name in ANSWERS_SEEN:
            wrapped = partial(self._call_seen, name, attr)
        else:
            wrapped = partial(self._call, name, attr)
        self.__dict__[name] = wrapped
        return wrapped

    def _call(self, op: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self.net.call(self.host, op, method, self._frozen_clock(), args, kwargs)

    async def _call_seen(self, op: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = await self.net.call(self.host, op, method, self._frozen_clock(), args, kwargs)
        assert self._on_answer is not None
        self._on_answer(op, args, result)
        return result

    async def _wait(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.net.reachable(self.host):
            timeout = kwargs.get("timeout", args[-1] if args else 0.0)
            await asyncio.sleep(max(0.0, float(timeout)))
            return None
        return await method(*args, **kwargs)

    @staticmethod
    def async_methods(inner: Any) -> list[str]:
        """The round-trip operations of a backend, in a fixed order (for drawing operation faults)."""
        return sorted(name for name in dir(inner)
                      if not name.startswith("_") and name not in WAITS | LOCAL
                      and inspect.iscoroutinefunction(getattr(inner, name)))
