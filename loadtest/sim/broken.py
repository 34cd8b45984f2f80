"""The holes of the exactly-once issue (#12), put back one at a time: proof that the simulator can still fail.

The core fixed the six holes, so every schedule of ``holes.json`` passes on
it. A simulator that passes everything proves nothing by itself: each bug
below re-creates one hole on the current core, from the outside (a method
replaced for the block, or a store client with the old semantics), never by
a branch in the production classes. ``tests/test_sim.py`` runs each hole's
schedule with its bug and expects the hole's invariant to fail;
``python -m loadtest sim --inject BUG`` does the same from the command line.

=====================  ====  =====================================================  ====================
bug                    hole  what it does                                           invariant it trips
=====================  ====  =====================================================  ====================
no-hand-back           1     a graceful stop gives nothing back: the fire times     lost
                             claimed ahead are lost (``GatedScheduler._hand_back``
                             does nothing)
claims-not-idempotent  2     the store refuses a retried ``claim_window`` it had    lost
                             applied (its answer lost): the claim is taken for
                             fenced
claim-error-escapes    3     an unexpected exception in a claim ends the claim      waits_forever
                             loop and leaves its waiters (``WindowKeeper._advance``
                             lets it escape)
hand-back-without-     4     the hand-back carries no busy runs (the store drops    duplicate_start
busy                         them): a recoverable run still going is recovered
max-instances-per-     5     ``max_instances`` counts this node's runs only         max_instances
node                         (``GatedScheduler._over_limit`` ignores busy runs)
no-shutdown-grace      6     a stopping node cuts running bodies at once            lost (cut)
                             (``GatedScheduler.shutdown`` with grace 0)
recovers-own-run       0     a leader that wins again lists unfinished runs before  duplicate_start
                             its own records are written, and forgets it holds them
                             (``GatedScheduler._recover`` with a recorder that
                             looks empty): a run it finished under its earlier
                             token, its record held up by a store restart, is run
                             again (found by the failover suite on PostgreSQL)
hand-back-flushes-    0     a hand-back tries the node's records once, then goes   duplicate_start
once                         without them, leaving their intents
                             (``GatedScheduler._hand_back`` with a recorder that
                             looks written after one flush): a recoverable run
                             that ended while the store restarted is recovered by
                             the next leader (found by the failover suite on etcd)
recovery-in-one-pass   0     a new leader's recovery looks once                     recovered
                             (``GatedScheduler._recover`` as one ``_recover_once``):
                             a run handed over as still going whose node was then
                             killed is not run again while it leads
recovery-skipped-for-  0     a recovery skipped for ``max_instances`` (a catch-up   recovered
good                         of its job going) is not tried again
                             (``GatedScheduler._recover_run`` fires once)
recovery-polls-for-a-  0     a skipped recovery looks for a free slot every 50 ms   recovered
slot                         (``GatedScheduler._a_run_ends`` sleeps): a job whose
                             runs fill its period leaves gaps it never sees
own-intents-never-     0     the recovery passes over every intent of its own       recovered
recovered                    token (``GatedScheduler._a_predecessors``): one a
                             first claim made without the predecessor's mark took
                             over from that predecessor is never run again
past-window-without-   0     a claim answered after its window's fire times came    recovered
intents                      due writes no intents for them
                             (``GatedScheduler._intents_between`` returns early):
                             a kill before their runs end loses them
recovery-never-looks-  0     a recovery that waited for a slot starts without       duplicate_start
again                        looking whether the run's own node has stored its
                             result meanwhile (``GatedScheduler._still_unfinished``
                             answers yes)
recovery-before-due    0     a recovery of a fire time not yet due starts at once   early
                             (``GatedScheduler._until_due`` does not wait)
=====================  ====  =====================================================  ====================
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from loadtest.sim import cluster
from lock_backends import BusyRun, Lease, LockBackendError, Window, memory
from lock_backends import clock as clocks
from node.admission import Refusal
from node.claims import WindowKeeper
from node.outcomes import RunKind, RunOutcome
from node.scheduler import GatedScheduler


class ClaimsNotIdempotent(memory.MemoryBackend):
    """The pre-window core's claims: asking again for what this token already holds is refused, as if fenced."""

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        mark = self.store.lock(lease.name).mark
        window = await super().claim_window(lease, until_us, start_us, intents)
        if window is not None and mark is not None and mark.token == lease.token and until_us <= mark.until_us:
            return None  # "claimed already": the retry after a lost answer is refused
        return window


class HandBackWithoutBusy(memory.MemoryBackend):
    """A hand-back that keeps none of the busy runs it is given."""

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        return await super().hand_back(lease, at_us, (), drop)


async def _no_hand_back(self: GatedScheduler, lease: Lease, at_us: int, *, retry_until: float) -> None:
    return None


def _escaping_advance(original: Callable[..., Any]) -> Callable[..., Any]:
    async def _advance(self: WindowKeeper, lease: Lease, until_us: int, start_us: int) -> None:
        before = self.window.until_us if self.window is not None else self._predecessor_until_us
        try:
            window = await self.backend.claim_window(lease, until_us, start_us,
                                                     self.intents(before or start_us, until_us))
        except LockBackendError:
            return await original(self, lease, until_us, start_us)  # retried, as the real one does
        # anything else escapes: the claim loop ends, and what waits for the window waits on
        if window is None:
            self.window = None
            self._stopping = True
        else:
            self.window = window
        return None

    return _advance


def _local_over_limit(self: GatedScheduler, spec: Any) -> Refusal | None:
    keys = self._running_keys.get(spec.id, set())
    if len(keys) >= spec.max_instances:
        return Refusal(RunOutcome.SKIPPED, "max_instances on this node")
    return None


@contextlib.contextmanager
def _empty_looking(recorder: Any, *, flushes: int = 0) -> Iterator[None]:
    """The block sees ``recorder`` as empty: no records unwritten, and a flush that returns True at once (after
    the first ``flushes`` calls, which are real)."""
    real_flush = recorder.flush
    calls = 0

    async def flush(timeout: float) -> bool:
        nonlocal calls
        calls += 1
        return await real_flush(timeout) if calls <= flushes else True

    def nothing_unwritten() -> set[str]:
        return set()

    recorder.flush, recorder.unwritten = flush, nothing_unwritten
    try:
        yield
    finally:
        for name in ("flush", "unwritten"):  # another block may have put the originals back already
            recorder.__dict__.pop(name, None)


def _forgetful_recovery(original: Callable[..., Any]) -> Callable[..., Any]:
    async def _recover(self: GatedScheduler, lease: Lease) -> None:
        # for this recovery only (its own calls come first, before anything else on the node could ask)
        with _empty_looking(self.recorder):
            return await original(self, lease)

    return _recover


def _records_passed_by(original: Callable[..., Any]) -> Callable[..., Any]:
    async def _hand_back(self: GatedScheduler, lease: Lease, at_us: int, *, retry_until: float) -> None:
        # for this hand-back only (a node stepping down has nothing else to flush meanwhile): one flush, as
        # before the fix, and no intents of ended runs dropped
        with _empty_looking(self.recorder, flushes=1):
            return await original(self, lease, at_us, retry_until=retry_until)

    return _hand_back


def _one_pass(original: Callable[..., Any]) -> Callable[..., Any]:
    async def _recover(self: GatedScheduler, lease: Lease) -> None:
        await self._recover_once(lease, {})

    return _recover


async def _recovery_tried_once(self: GatedScheduler, lease: Lease, job_id: str, scheduled_at: Any) -> RunOutcome:
    return await self.fire(job_id, scheduled_at, RunKind.RECOVERY)


async def _slot_polled(self: GatedScheduler, job_id: str, timeout: float) -> None:
    await asyncio.sleep(timeout)


def _older_tokens_only(self: GatedScheduler, token: int, fire_us: int, lease: Lease, window: Window) -> bool:
    return token < lease.token and fire_us < window.since_us


def _past_window_without_intents(original: Callable[..., Any]) -> Callable[..., Any]:
    def _intents_between(self: GatedScheduler, lo_us: int, hi_us: int) -> list[str]:
        if max(lo_us, int(clocks.time() * 1_000_000)) >= hi_us:
            return []  # the early return before the fix: a window wholly in the past owes nothing
        result: list[str] = original(self, lo_us, hi_us)
        return result

    return _intents_between


async def _never_looks_again(self: GatedScheduler, key: str) -> bool:
    return True


async def _not_waiting_for_due(self: GatedScheduler, scheduled_at: Any) -> None:
    return None


def _no_grace(original: Callable[..., Any]) -> Callable[..., Any]:
    async def shutdown(self: GatedScheduler, grace: float | None = None) -> None:
        await original(self, 0.0)

    return shutdown


#: bug name -> (hole of #12, what replaces what: (owner, attribute, factory of the replacement from the original))
BUGS: dict[str, tuple[int, tuple[Any, str, Callable[[Any], Any]]]] = {
    "no-hand-back": (1, (GatedScheduler, "_hand_back", lambda _original: _no_hand_back)),
    "claims-not-idempotent": (2, (cluster, "BACKEND", lambda _original: ClaimsNotIdempotent)),
    "claim-error-escapes": (3, (WindowKeeper, "_advance", _escaping_advance)),
    "hand-back-without-busy": (4, (cluster, "BACKEND", lambda _original: HandBackWithoutBusy)),
    "max-instances-per-node": (5, (GatedScheduler, "_over_limit", lambda _original: _local_over_limit)),
    "no-shutdown-grace": (6, (GatedScheduler, "shutdown", _no_grace)),
    "recovers-own-run": (0, (GatedScheduler, "_recover", _forgetful_recovery)),
    "hand-back-flushes-once": (0, (GatedScheduler, "_hand_back", _records_passed_by)),
    "recovery-in-one-pass": (0, (GatedScheduler, "_recover", _one_pass)),
    "recovery-skipped-for-good": (0, (GatedScheduler, "_recover_run", lambda _original: _recovery_tried_once)),
    "recovery-polls-for-a-slot": (0, (GatedScheduler, "_a_run_ends", lambda _original: _slot_polled)),
    "own-intents-never-recovered": (0, (GatedScheduler, "_a_predecessors", lambda _original: _older_tokens_only)),
    "past-window-without-intents": (0, (GatedScheduler, "_intents_between", _past_window_without_intents)),
    "recovery-never-looks-again": (0, (GatedScheduler, "_still_unfinished", lambda _original: _never_looks_again)),
    "recovery-before-due": (0, (GatedScheduler, "_until_due", lambda _original: _not_waiting_for_due)),
}


@contextlib.contextmanager
def injected(name: str | None) -> Iterator[None]:
    """Run the block with bug ``name`` in place (None: none), and put the original back after."""
    if name is None:
        yield
        return
    _, (owner, attribute, make) = BUGS[name]
    original = getattr(owner, attribute)
    setattr(owner, attribute, make(original))
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def inject(name: str) -> None:
    """Put bug ``name`` in place for the rest of the process (``--inject``: the exploring workers inherit it)."""
    _, (owner, attribute, make) = BUGS[name]
    setattr(owner, attribute, make(getattr(owner, attribute)))
