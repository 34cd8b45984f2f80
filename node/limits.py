"""How many lock-store reads the HTTP API may have going at once on one node.

Why: the lease is renewed through the same store (and, on some backends, the
same connections or thread pools) that ``GET /runs`` and a follower's
``GET /jobs`` read. Unauthenticated requests cost nothing to send; without a
bound, a flood of them queues store work faster than the store drains it, the
renewal waits behind that work past its deadline, and the cluster loses its
leader (issue #17: 64 concurrent ``GET /runs`` did exactly that). So every
API read of the store takes a slot here first: ``concurrency`` run at once
(``READS_AT_ONCE``), ``queue`` more wait (each at most ``wait`` seconds), and the rest are refused
at once with ``ReadsExhausted``, which the API answers 429 with
``Retry-After``. A refusal costs a few microseconds and touches no store.

The election loop and the scheduler never come through here: the limiter is
for work a client asks for, not for the work that keeps the cluster led.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: Store reads the API runs at once on one node, on every backend. One: a flood then costs
#: the store what one client reading in a loop costs, whatever the number of clients. More
#: in flight did not serve more: the file backend lists on one thread and PostgreSQL on the
#: one session the leader's run records share, so extra reads queue inside the backend, where
#: the wait counts against the operation timeout (a 503 for a read that was never slow, a
#: PostgreSQL session dropped); and four filtered scans at once on etcd (2,000 keys decoded
#: each, on the event loop) delayed a lease renewal past its 0.5 s timeout in the flood test.
READS_AT_ONCE = 1
#: Reads that may wait for a slot behind those; more are refused at once.
READS_QUEUED = 16
#: The longest a read waits for a slot (seconds) before it is refused.
QUEUE_WAIT = 2.0
#: Seconds a refused client is asked to wait before trying again (``Retry-After``).
RETRY_AFTER = 1
#: The share of the backend's operation timeout an API read may take before it is abandoned.
#: Below one on purpose: a read the API abandons is cancelled from outside, which a backend
#: takes for what it is; a read that runs into the backend's own timeout looks like a server
#: gone, and the etcd backend then moves to a fresh channel, the lease's in-flight renewal with
#: it (the flood test saw "renew failed: Channel is closed" after an expensive listing timed out).
READ_BUDGET = 0.8


class ReadsExhausted(Exception):
    """This node is already running (and queueing) as many store reads for the API as it allows."""

    def __init__(self, reason: str, retry_after: int = RETRY_AFTER) -> None:
        self.retry_after = retry_after
        super().__init__(reason)


class ReadTooSlow(Exception):
    """An API read took longer than its budget and was abandoned (the API answers 503)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.retry_after = RETRY_AFTER
        super().__init__(f"the read took longer than {budget:g}s and was abandoned (a filter that matches little "
                         "scans the most runs); narrow it (job, outcome, since) or retry shortly")


class ReadLimiter:
    """A counting gate with a short FIFO queue and a bounded wait, for API reads of the store.

    Not an ``asyncio.Semaphore``: a semaphore queues without bound and waits
    forever, which is the failure being prevented. A slot is handed straight
    from the reader that frees it to the first waiter, so a burst of new
    arrivals cannot overtake the queue.
    """

    def __init__(self, concurrency: int = READS_AT_ONCE, queue: int = READS_QUEUED, wait: float = QUEUE_WAIT,
                 budget: float | None = None, on_reject: Callable[[], None] | None = None) -> None:
        if concurrency < 1 or queue < 0 or wait < 0 or (budget is not None and budget <= 0):
            raise ValueError(f"need concurrency >= 1, queue >= 0, wait >= 0, budget > 0; "
                             f"got {concurrency}, {queue}, {wait}, {budget}")
        self.concurrency = concurrency
        self.queue = queue
        self.wait = wait
        #: Seconds one read may take once it runs (None: as long as the backend lets it).
        self.budget = budget
        self._on_reject = on_reject
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Reads refused so far (a node also counts them in ``baton_api_reads_rejected_total``, via ``on_reject``).
        self.rejected = 0
        #: The most reads ever running at once (for tests and a curious operator).
        self.peak = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def read(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` in a slot, within the budget: ``ReadsExhausted`` (no slot) or ``ReadTooSlow`` (over budget).

        A callable, not an awaitable: a read refused a slot is never even begun.
        """
        async with self.slot():
            if self.budget is None:
                return await call()
            budget = asyncio.timeout(self.budget)
            try:
                async with budget:
                    return await call()
            except TimeoutError:
                if budget.expired():
                    raise ReadTooSlow(self.budget) from None
                raise

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one read slot for the body; ``ReadsExhausted`` when none is free in time."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._active < self.concurrency and not self.waiting:
            self._take()
            return
        if self.waiting >= self.queue:
            self._rejected()
            raise ReadsExhausted(f"too many reads of the lock store at once on this node "
                                 f"({self.concurrency} running, {self.queue} waiting); retry shortly")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.wait):
                await asyncio.shield(waiter)
        except TimeoutError:
            self._forget(waiter)
            self._rejected()
            raise ReadsExhausted(f"no free read of the lock store on this node within {self.wait:g}s; "
                                 "retry shortly") from None
        except BaseException:  # cancelled while waiting: give back a slot handed over meanwhile
            self._forget(waiter)
            raise

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        """Drop a waiter that gives up; if a slot was handed to it in the meantime, pass that slot on."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled():
            self._release()
        else:
            waiter.cancel()

    def _rejected(self) -> None:
        self.rejected += 1
        if self._on_reject is not None:
            self._on_reject()

    def _take(self) -> None:
        self._active += 1
        self.peak = max(self.peak, self._active)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter: active stays the same
                return
        self._active -= 1
