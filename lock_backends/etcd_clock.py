"""The etcd server's wall clock, read from the ``Date`` header of its HTTP answers.

Apart from ``etcd`` because it has nothing to do with etcd's API: it is a small
HTTP client with a cache, used only by ``EtcdBackend.server_time``.

etcd's v3 API has no clock, but its client port also answers HTTP
(``GET /version``), whose ``Date`` header is the server's wall clock to the
second. ``ServerClock`` polls it on a keep-alive connection until the second
ticks over and takes the instant of the edge (within a few ms here: half the
polling interval plus a round trip), keeps the offset from this host's
*monotonic* clock (so a step of this host's wall clock, which is what callers
look for, is never hidden by the cache) and measures again every few minutes
in the background. Finding an edge takes up to a second, longer than an
operation may: the first call waits for it within the operation timeout and
answers None ("no clock to offer yet") if the edge has not come by then; later
calls answer at once.

The cache trusts this host's monotonic clock to keep time with the server's
wall clock. It does not when the host's virtual machine was paused (a live
migration, a suspended host): the monotonic clock stops, the wall clock is set
right on resume, and the cached offset would put the server tens of seconds
behind, so every node on that host would take itself for skewed and refuse to
lead until the next measurement (seen on the CI machine: +19.8 s on all three
nodes of a cluster). So a read first compares this host's wall clock minus its
monotonic clock with what it was at the measurement: if the two moved apart by
more than ``_CLOCK_STEP``, the offset is measured again (a true step of this
host's wall clock then shows again, measured; a stopped monotonic clock no
longer does), and until that measurement answers, the read answers None.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import Callable

from lock_backends import clock
from lock_backends.errors import BackendUnavailable

#: The offset is measured again after this many seconds.
_CLOCK_REFRESH = 300.0
#: Pause between two reads of the ``Date`` header while waiting for its second to tick over.
_CLOCK_POLL = 0.004
#: A measurement gives up after this long (an edge comes once a second).
_CLOCK_BUDGET = 2.5
#: This host's wall clock minus its monotonic clock may drift this far (seconds) from its value at the measurement
#: before the cached offset is no longer trusted (NTP slews far less between two measurements).
_CLOCK_STEP = 0.25


class ServerClock:
    """The server's wall clock as an offset from the local monotonic clock, measured now and then."""

    def __init__(self, endpoint_in_turn: Callable[[int], tuple[str, int]], endpoints: int, op_timeout: float,
                 kind: str, address: str) -> None:
        #: The i-th endpoint to try, counting from the one the backend uses now.
        self._endpoint_in_turn = endpoint_in_turn
        self._endpoints = endpoints
        self._op_timeout = op_timeout
        self._kind, self._address = kind, address
        #: (server wall clock minus local monotonic clock, monotonic time measured, local wall minus monotonic then).
        self._offset: tuple[float, float, float] | None = None
        self._task: asyncio.Task[float] | None = None

    async def read(self) -> float | None:
        """The server's wall clock now (unix seconds), or None before the first edge came (or after this host's
        clocks moved apart, until the edge is found again)."""
        cached = self._offset
        if cached is not None and abs(clock.time() - clock.monotonic() - cached[2]) > _CLOCK_STEP:
            cached = self._offset = None  # a paused VM, or a stepped wall clock: measured again, not assumed
        if cached is not None and clock.monotonic() - cached[1] < _CLOCK_REFRESH:
            return clock.monotonic() + cached[0]
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.get_running_loop().create_task(self._measure())
        try:
            async with asyncio.timeout(self._op_timeout):
                offset = await asyncio.shield(task)
        except TimeoutError:
            # no edge yet: a stale offset is still good (it follows the monotonic clock), none is none
            return None if cached is None else clock.monotonic() + cached[0]
        return clock.monotonic() + offset

    async def close(self) -> None:
        """Stop a measurement under way."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _measure(self) -> float:
        """Server wall clock minus local monotonic clock, from the first endpoint that answers HTTP."""
        errors: list[str] = []
        for i in range(self._endpoints):
            host, port = self._endpoint_in_turn(i)
            try:
                async with asyncio.timeout(_CLOCK_BUDGET):
                    offset = await self._date_edge(host.strip("[]"), port)
            except (OSError, ValueError, TypeError, EOFError, TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:
                errors.append(f"{host}:{port}: {exc!r}")
                continue
            now = clock.monotonic()
            self._offset = (offset, now, clock.time() - now)
            return offset
        raise BackendUnavailable(f"server_time: no endpoint's HTTP Date header could be read ({'; '.join(errors)})",
                                 backend=self._kind, address=self._address)

    async def _date_edge(self, host: str, port: int) -> float:
        """Poll ``GET /version`` until the ``Date`` second ticks over; the offset at that edge."""
        async with asyncio.timeout(self._op_timeout):
            reader, writer = await asyncio.open_connection(host, port)
        request = f"GET /version HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: baton\r\n\r\n".encode()
        try:
            previous: tuple[float, float, int] | None = None  # (sent, answered, second)
            while True:
                sent = clock.monotonic()
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.split(":", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ":" in line)
                headers = {k.strip().lower(): v.strip() for k, v in fields.items()}
                await reader.readexactly(int(headers.get("content-length", "0")))
                answered = clock.monotonic()
                second = int(email.utils.parsedate_to_datetime(headers["date"]).timestamp())
                if previous is not None and second == previous[2] + 1:
                    # the server read S at some instant of the previous request and S+1 during this one
                    edge = ((previous[0] + previous[1]) / 2 + (sent + answered) / 2) / 2
                    return second - edge
                previous = (sent, answered, second)
                await asyncio.sleep(_CLOCK_POLL)
        except KeyError:
            raise ValueError("no Date header in the answer to GET /version") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
