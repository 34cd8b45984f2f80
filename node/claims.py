"""The leader's two conversations with the store: its claim window, and its run records.

``WindowKeeper`` keeps the lock's claim window a short *lead* ahead of the
clock. The leader claims time, not jobs: one fenced ``claim_window`` moves the
mark forward, and every fire time inside the window its token holds is its to
run (the proof is in ``lock_backends.base``). So the cost of claiming is one
operation per refill of the lead, whatever the number of jobs: a burst of
fifty thousand fire times due in the same second costs what one does, and at
the fire time the leader only checks, locally, that its lease is still valid
and the fire time inside its window.

What a window costs: a leader that dies (or stalls past its lease) holding a
window leaves the fire times it had not reached unrun, at most the lead
(``BATON_CLAIM_AHEAD``): the at-most-once window of a crash (or, for a leader
that dies right after winning, the catch-up its first window gave it).
Recoverable jobs are claimed as *intents* with each window, the catch-up's
included, so the next leader runs them again.
A graceful stop hands back what it has not started (``hand_back``), so a
planned handoff loses nothing. The lead adapts to the store: a small multiple
of the slowest recent round trip, between ``MIN_LEAD`` and the setting, and
never past the lease's local deadline. The round trips are the claims' and the
node's own record writes' (``RunRecorder(on_round_trip=WindowKeeper.observe)``):
a store applies one operation after another (etcd's log, Redis's one thread, a
PostgreSQL row both touch), so a claim sent while a large record write is in
flight waits for it, and a refill margin sized to the claims alone (a few
milliseconds) let the window run out behind a write of eighty (etcd at ten
thousand runs a second: fire times waited for the window, p99 lag 13 ms).

``RunRecorder`` writes run records in batches a round trip can carry:
whatever queued within ``RECORD_LINGER`` of the first record, and never more
than one write per ``RECORD_SPACING`` on the stores where one operation
carries a whole batch (``BackendKind.batched_records``: Redis, PostgreSQL, etcd), so
the records cost a bounded number of operations a second however many jobs
fire (a leader with ten thousand jobs sends no more than one with a thousand);
up to a batch size that grows while writes are quick and halves when one
fails or runs long (as TCP's window does). What the spacing costs: a leader
killed outright loses the records of the runs it finished in its last
``RECORD_SPACING`` at most; the recoverable ones among them are run again by
the next leader (at least once, as a crash mid-run is), the others are
only missing from the history. A graceful stop flushes them all, and a
manual run's record, which its caller waits for, goes without the spacing, as
do the records of a leadership handing over (``prompt``): the next leader
learns from them that the runs it was handed as still going have ended. A
failed batch is retried with backoff, one batch at a time, so an outage never
becomes a storm; records wait in a bounded queue meanwhile, and what
overflows it is counted, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lock_backends import BackendUnavailable, ClaimStore, Lease, LockBackendError, RunRecord, RunStore, Window
from lock_backends import clock as clocks

log = logging.getLogger("baton.scheduler")

US = 1_000_000
#: The lead never drops below this, so a window is ready before an idle loop even wakes.
MIN_LEAD = 0.1
#: Lead = this many times the slowest of the recent round trips to the store (claims and record writes).
LEAD_FACTOR = 4.0
#: Round trips remembered for the lead.
LATENCY_WINDOW = 32
#: A window is refilled when less than this share of the lead is left ahead of the clock.
REFILL_SHARE = 0.5
#: Backoff between attempts at a claim the store did not answer.
RETRY_FIRST, RETRY_MAX = 0.02, 0.5
#: The loop looks again at least this often.
MAX_SLEEP = 0.25

#: A run record waits this long for others to share its write.
RECORD_LINGER = 0.02
#: Run-record writes start at most this often: their operations a second are bounded, not proportional to the runs.
RECORD_SPACING = 0.25
#: Records per write: where a batch starts, and the bounds it adapts between.
BATCH_START, BATCH_MIN, BATCH_MAX = 500, 20, 20_000
#: Attempts at a batch that fails with anything but BackendUnavailable before it is dropped (counted): a record
#: the store refuses must not block the queue, but a passing surprise must not lose a record either (a recoverable
#: run whose record is lost runs again at the next handoff; found by the simulator).
SURPRISE_ATTEMPTS = 3
#: Records waiting to be written at most; beyond, the oldest are dropped and counted.
QUEUE_MAX = 500_000
#: Records taken off the queue, or let go of once written, between two looks at the event loop. A batch's records
#: are long out of the processor's caches by then: taking 2,500 one by one, or freeing them at once, held the
#: loop for about 2 ms at 10,000 runs/s, where fire times wait. (A queue that fits in the batch is handed over
#: whole, in no time.)
RECORD_SLICE = 256


@dataclass
class _Waiter:
    t_us: int
    done: asyncio.Future[None]


class WindowKeeper:
    """Keeps the leader's claim window ``lead`` ahead of the wall clock, one fenced operation per refill."""

    def __init__(self, backend: ClaimStore, *, max_lead: float, current_lease: Callable[[], Lease | None],
                 intents: Callable[[int, int], Sequence[str]],
                 next_fire: Callable[[], int | None] = lambda: None) -> None:
        self.backend = backend
        self.max_lead = max_lead
        self.current_lease = current_lease
        self.intents = intents
        #: The earliest fire time the scheduler has coming (us), or None: an idle leader claims nothing.
        self.next_fire = next_fire
        #: The last window the store answered for this leadership (None before the first).
        self.window: Window | None = None
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._waiters: list[_Waiter] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._complaint = ""
        #: Where the predecessor's window ended, read before this leadership's first claim (us; 0: unknown): the
        #: first claim's intents start there, since every fire time before it is the predecessor's.
        self._predecessor_until_us = 0

    @property
    def lead(self) -> float:
        """Seconds ahead of the clock to keep claimed (0: claim only what is due, on demand)."""
        if self.max_lead <= 0:
            return 0.0
        slowest = max(self._latencies, default=0.0)
        return min(self.max_lead, max(MIN_LEAD, LEAD_FACTOR * slowest))

    def observe(self, seconds: float) -> None:
        """A round trip of another operation on the store (a record write): a claim may queue behind the next."""
        self._latencies.append(seconds)

    def reset(self) -> None:
        """A new leadership: nothing of the last one's window carries over."""
        self.window = None
        self._stopping = False
        self._predecessor_until_us = 0

    def owns(self, t_us: int, token: int) -> bool:
        window = self.window
        return window is not None and window.owned_by(token) and window.covers(t_us)

    async def open(self, lease: Lease) -> Window | None:
        """The first claim of a leadership, before anything fires: where this leader's window starts.

        The mark is read first: when the predecessor's window ended in the past,
        the first window starts there and the fire times since are this leader's
        catch-up. Their intents (recoverable jobs) go into the claim that grants
        them, so a leader that dies right after winning leaves its catch-up to
        the next one instead of taking it along (found by the simulator, seed
        9910 of #13). Unread (the store slow or failing), the catch-up's intents
        follow one round trip later, as before.
        """
        now_us = _now_us()
        try:
            mark = await self.backend.claim_mark(lease.name)
        except Exception as exc:  # only a shortcut: whatever goes wrong, the claim goes on without it
            self._complain("reading the claim mark failed (the catch-up's intents follow the claim)", exc,
                           error=not isinstance(exc, LockBackendError))
        else:
            # past: the catch-up's fire times start there. Ahead of this clock (a hand-back point past a fire time
            # the predecessor started by its own clock, running ahead of ours): the fire times before it are the
            # predecessor's, run or handed over as still going, and an intent of ours for one of them would
            # take its intent over and hide it from recovery if that run's node died (found by the simulator)
            if mark.token and mark.token < lease.token:
                self._predecessor_until_us = mark.until_us
        await self._advance(lease, now_us + max(1, int(self.lead * US)), now_us)
        return self.window

    def offer(self, window: Window | None) -> None:
        """An answer to a claim made beside the loop (a catch-up's intents): the freshest busy runs, kept when
        it is this leadership's window and reaches at least as far as the one held. A held window that was
        handed back stays as it is: an answer overtaken by the hand-back's must not unseal it."""
        held = self.window
        if (window is not None and held is not None and not held.sealed and window.token == held.token
                and window.until_us >= held.until_us):
            self.window = window

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._loop(), name="claim-window")

    async def stop(self) -> None:
        """No more claims for this leadership; the claim in flight (if any) is awaited, not cut."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._release_waiters()

    async def cover(self, t_us: int, lease: Lease, give_up_at: float) -> Window | None:
        """Wait until the window reaches past ``t_us`` (asking for it now), or until ``give_up_at`` (monotonic).

        Returns the window as last answered; the caller decides what it means
        for ``t_us``. Never waits past ``give_up_at``: no run waits forever.
        """
        window = self.window
        if window is not None and (window.until_us > t_us or window.token > lease.token
                                   or (window.token == lease.token and window.sealed)):
            return window  # covered (by us, or by a predecessor's window), or not ours to grow any more
        if self._stopping:
            return window
        waiter = _Waiter(t_us, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._wake.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter.done), max(0.0, give_up_at - clocks.monotonic()))
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return self.window

    # -- internals ------------------------------------------------------------------------

    def _release_waiters(self) -> None:
        window = self.window
        for waiter in list(self._waiters):
            covered = window is not None and (window.until_us > waiter.t_us or window.sealed)
            if (covered or self._stopping) and not waiter.done.done():
                waiter.done.set_result(None)

    async def _loop(self) -> None:
        while not self._stopping:
            lease = self.current_lease()
            if lease is None:
                break
            window = self.window
            if window is not None and not window.owned_by(lease.token) and window.token == lease.token:
                break  # sealed: this leadership handed back, nothing more to claim
            now_us = _now_us()
            lead_us = int(self.lead * US)
            # never claim past what the lease can vouch for locally
            reach_us = now_us + int(max(0.0, lease.remaining()) * US)
            wanted = max((w.t_us + 1 for w in self._waiters), default=0)
            # the frontier: our window's end, or a predecessor's that reaches further ahead than we ask
            until = window.until_us if window is not None else 0
            nxt = self.next_fire()
            # at least a lead past the next fire time, so it is covered with room to spare when it comes
            ahead = max(now_us, nxt if nxt is not None and nxt >= until else 0) + lead_us
            target = min(max(ahead, wanted), reach_us) if lead_us else min(wanted, reach_us)
            # refill while fire times keep coming inside the window; past it, only once the next one is near
            busy = nxt is not None and nxt < until
            due = nxt is not None and nxt < now_us + lead_us
            refill = lead_us and (until - now_us < lead_us * REFILL_SHARE if busy else due)
            if target > until and (refill or wanted > until):
                await self._advance(lease, target, now_us)
                self._release_waiters()
                continue
            if self._stopping:
                break
            # sleep until the window needs a refill, the next fire time nears, or a run asks for more
            sleep = MAX_SLEEP
            if lead_us and busy:
                sleep = min(sleep, max(0.001, (until - now_us - lead_us * REFILL_SHARE) / US))
            elif lead_us and nxt is not None:
                sleep = min(sleep, max(0.001, (nxt - now_us - lead_us) / US))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)
        self._release_waiters()

    async def _advance(self, lease: Lease, until_us: int, start_us: int) -> None:
        """One claim, retried (with the same target: claims are idempotent) while the lease lasts."""
        delay = RETRY_FIRST
        while True:
            t0 = clocks.monotonic()
            try:
                before = self.window.until_us if self.window is not None else self._predecessor_until_us
                window = await self.backend.claim_window(lease, until_us, start_us,
                                                         self.intents(before or start_us, until_us))
            except BackendUnavailable as exc:
                self._complain("claiming the window failed, retrying", exc)
            except LockBackendError as exc:
                self._complain("claiming the window failed", exc)
            except Exception as exc:  # a bug or a surprise must not leave runs waiting for a window
                self._complain("claiming the window raised unexpectedly", exc, error=True)
            else:
                self._complaint = ""
                if window is None:  # fenced: our token is no longer the lock's
                    self.window = None
                    self._stopping = True
                else:
                    self.window = window
                return
            finally:
                self._latencies.append(clocks.monotonic() - t0)  # slow answers (and timeouts) lengthen the lead
            if not self._may_retry(lease):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            # looked at again after the backoff: a leadership that ended meanwhile must not claim (a claim it
            # will never run would outlive it unless handed back; found by the simulator)
            if not self._may_retry(lease):
                return

    def _may_retry(self, lease: Lease) -> bool:
        current = self.current_lease()
        return not self._stopping and current is not None and current.token == lease.token

    def _complain(self, what: str, exc: BaseException, error: bool = False) -> None:
        """Log a failure once per kind of failure, not once per retry."""
        text = f"{type(exc).__name__}: {exc}"
        if text != self._complaint:
            self._complaint = text
            if error:
                log.error("%s: %s", what, text, exc_info=exc)
            else:
                log.warning("%s: %s", what, text)


def _now_us() -> int:
    return int(clocks.time() * US)


class RunRecorder:
    """Writes run records in adaptive batches, one write at a time, retrying through outages."""

    def __init__(self, backend: RunStore, lock_name: str, *, op_timeout: float,
                 on_dropped: Callable[[int], None] | None = None, linger: float = RECORD_LINGER,
                 spacing: float = RECORD_SPACING, prompt: Callable[[], bool] = lambda: False,
                 on_round_trip: Callable[[float], None] | None = None) -> None:
        self.backend = backend
        self.lock_name = lock_name
        self.op_timeout = op_timeout
        self.linger = linger
        self.spacing = spacing
        self.on_dropped = on_dropped
        self.batch = BATCH_START
        self._queue: deque[RunRecord] = deque()
        #: Who waits for which queued record (by the record's id): few (manual runs), so a written batch is
        #: looked through only when there are any.
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._writer: asyncio.Task[None] | None = None
        #: The batch being taken or written: out of the queue, not yet known to be stored.
        self._in_flight: deque[RunRecord] = deque()
        self._complaint = ""
        #: Set by ``flush``: a writer waiting out its backoff tries again at once.
        self._nudge = asyncio.Event()
        #: Set by ``flush`` and by a record someone waits for: the next write waits out the linger, not the spacing.
        self._hurry = asyncio.Event()
        #: True while records go after the linger alone, without the spacing: while a leadership hands over, when
        #: the next leader learns from them that runs it was handed as still going have ended.
        self.prompt = prompt
        #: When the last write that stored its batch started (monotonic), for the spacing.
        self._last_write = -math.inf
        #: Told how long each write took, answered or not (the claim window's lead covers it).
        self.on_round_trip = on_round_trip

    def __len__(self) -> int:
        return len(self._queue)

    def unwritten(self) -> set[str]:
        """Keys of the records queued or in a write not yet answered: runs this node knows of, the store may not.

        A recovery skips them: a run this node finished under an earlier token
        whose record a store restart held up reads as a dead leader's in the
        store's listing, but is not one.
        """
        return {record.key for record in self._queue} | {record.key for record in self._in_flight}

    def add(self, record: RunRecord, *, wait: bool = False) -> asyncio.Future[None] | None:
        """Queue a record. With ``wait``, a future that resolves once it is stored (or given up on)."""
        done = None
        if wait:
            done = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(id(record), []).append(done)
        self._queue.append(record)
        if len(self._queue) > QUEUE_MAX:
            dropped = 0
            while len(self._queue) > QUEUE_MAX:
                self._release(self._queue.popleft())
                dropped += 1
            log.warning("run records queue full: dropped the %d oldest unwritten records", dropped)
            if self.on_dropped is not None:
                self.on_dropped(dropped)
        if wait:
            self._hurry.set()
        self._ensure_writer()
        return done

    def _ensure_writer(self) -> asyncio.Task[None]:
        """The writer task, started if none is going: records queued never wait on one that ended."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="run-recorder")
        return self._writer

    async def _write(self) -> None:
        delay = RETRY_FIRST
        surprises = 0  # failures in a row that were not BackendUnavailable
        while self._queue:
            await self._gather()
            batch = await self._take()
            size = len(batch)
            t0 = clocks.monotonic()
            try:
                try:
                    await self.backend.record_many(self.lock_name, batch)
                finally:  # answered or not, the write's round trip is measured once, for the batch and the lead
                    self._in_flight = deque()  # stored, put back in the queue below, or dropped (counted)
                    took = clocks.monotonic() - t0
                    if self.on_round_trip is not None:
                        self.on_round_trip(took)
            except asyncio.CancelledError:
                # not known stored: back in the queue for the writer that comes next (a flush or a record starts
                # one); a batch the store did apply is only written again, a record being the same each time
                self._put_back(batch)
                raise
            except BackendUnavailable as exc:
                # not written (or not known to be): put it back, smaller batches, and wait before the next try
                self._put_back(batch)
                self.batch = max(BATCH_MIN, self.batch // 2)
                self._complain(f"writing {size} run record(s) failed, retrying", exc)
                await self._backoff(delay)
                delay = min(delay * 2, RETRY_MAX * 4)
                continue
            except Exception as exc:  # a record the store refuses: drop this batch (counted), keep going
                surprises += 1
                if surprises < SURPRISE_ATTEMPTS:  # unless it was a passing surprise: try it again first
                    self._put_back(batch)
                    self._complain(f"writing {size} run record(s) failed, trying again", exc, error=True)
                    await self._backoff(delay)
                    delay = min(delay * 2, RETRY_MAX * 4)
                    continue
                surprises = 0
                self._complain(f"writing {size} run record(s) failed; dropped", exc, error=True)
                if self.on_dropped is not None:
                    self.on_dropped(size)
            else:
                surprises = 0
                self._last_write = t0  # a retry waits out its backoff instead
                self._complaint = ""
                delay = RETRY_FIRST
                if size >= self.batch and took < self.op_timeout / 4:
                    self.batch = min(BATCH_MAX, self.batch * 2)
                elif took > self.op_timeout / 2:
                    self.batch = max(BATCH_MIN, self.batch // 2)
            await self._let_go(batch)
        self._hurry.clear()

    async def _take(self) -> deque[RunRecord]:
        """The next batch, oldest first: the whole queue if it fits, else its first ``self.batch`` records."""
        if len(self._queue) <= self.batch:
            batch, self._queue = self._queue, deque()
            self._in_flight = batch
            return batch
        batch = self._in_flight = deque[RunRecord]()
        try:
            while len(batch) < self.batch and self._queue:
                for _ in range(min(RECORD_SLICE, self.batch - len(batch), len(self._queue))):
                    batch.append(self._queue.popleft())
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._put_back(batch)
            self._in_flight = deque()
            raise
        return batch

    def _put_back(self, batch: deque[RunRecord]) -> None:
        """A batch not known to be stored goes back to the head of the queue, in its order."""
        self._queue.extendleft(reversed(batch))

    async def _let_go(self, batch: deque[RunRecord]) -> None:
        """Let go of a batch written (or given up on) a slice at a time, oldest first, answering its waiters."""
        try:
            while batch:
                for _ in range(min(RECORD_SLICE, len(batch))):
                    record = batch.popleft()
                    if self._waiters:
                        self._release(record)
                del record
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            while batch and self._waiters:  # stored: nobody waits for it any longer
                self._release(batch.popleft())
            raise

    def _release(self, record: RunRecord) -> None:
        """Whoever waits for ``record`` (now stored, or given up on) waits no more."""
        for fut in self._waiters.pop(id(record), ()):
            if not fut.done():
                fut.set_result(None)

    async def _gather(self) -> None:
        """Wait for the records that will share the next write: the linger, then what is left of the spacing."""
        if self.linger > 0:
            await asyncio.sleep(self.linger)
        rest = self._last_write + self.spacing - clocks.monotonic()
        if rest > 0 and not self._hurry.is_set() and not self.prompt():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), rest)

    async def _backoff(self, delay: float) -> None:
        self._nudge.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudge.wait(), delay)

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every queued record to be written. True if none is left, queued or in a write
        not yet answered.

        A writer waiting out the backoff of an earlier failure tries again at
        once: after an outage, the backoff could outlast the timeout while the
        store answers again (a handoff then lets the next leader take a finished
        run's intent for a dead leader's; found by the simulator).
        """
        self._nudge.set()
        self._hurry.set()
        deadline = clocks.monotonic() + timeout
        while self._queue or (self._writer is not None and not self._writer.done()):
            left = deadline - clocks.monotonic()
            if left <= 0:
                break
            writer = self._ensure_writer()  # records queued and the writer ended: one, as ``add`` starts
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), left)
        return not self._queue and not self._in_flight

    def _complain(self, what: str, exc: BaseException, error: bool = False) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text != self._complaint:
            self._complaint = text
            (log.error if error else log.warning)("%s: %s", what, text)
