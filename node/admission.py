"""Whether a fire time starts here, now: the gate's checks, each refusal with its outcome and reason.

The part of ``node.scheduler.GatedScheduler`` that admits a run, apart so that
the conditions read in one place. What admission promises: a run is admitted
only after the last await of its checks, with the lease locally valid and,

* for a scheduled or catch-up fire time, the fire time inside the claim
  window this lease's token holds, before any hand-back point, within the
  job's misfire grace (the window is waited for, at most until the lease's
  deadline or the grace's end);
* for a recovery, its own claim key won in the store (``#recovery-<token>``:
  one recovery per fire time and leadership);
* for a manual run, while leading and not handing over;

and in every case fewer runs of the job going in the cluster than its
``max_instances``: the ones here, plus those a predecessor handed over as
still going (busy entries of the window). Anything else is a ``Refusal``:
the outcome that is counted, and why.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from lock_backends import BackendUnavailable, Lease, LockBackend, Window
from lock_backends import clock as clocks
from lock_backends.clock import to_us
from node.claims import SURPRISE_ATTEMPTS, WindowKeeper
from node.jobs import JobSpec, claim_key
from node.outcomes import RunKind, RunOutcome


@dataclass
class Refusal:
    """Why a fire time does not start here."""

    outcome: RunOutcome
    detail: str


class Admission:
    """The gate's admission checks, mixed into ``GatedScheduler``: its state, read here."""

    if TYPE_CHECKING:  # what the scheduler provides
        backend: LockBackend
        keeper: WindowKeeper
        paused_jobs: set[str]
        _running_keys: dict[str, set[str]]
        _hand_back_at_us: int | None

        def grace(self, spec: JobSpec) -> float: ...
        def _current_lease(self) -> Lease | None: ...
        async def _first_window(self, lease: Lease, now: datetime) -> Window | None: ...

    async def _admit(self, spec: JobSpec, scheduled_at: datetime, kind: RunKind,
                     force: bool) -> Refusal | tuple[Lease, str]:
        """Whether this node may start the run now: a refusal, or the lease and the key's suffix to run it under.

        Whatever returns admission does so after its last await, so the caller
        starts the body with every check still true.
        """
        if kind is RunKind.MANUAL:
            lease = self._current_lease()
            if lease is not None:  # a new leader learns the runs its predecessor left going with its first window
                await self._first_window(lease, scheduled_at)  # (admitted before, a manual run could overlap them)
            return self._admit_manual(spec, scheduled_at, force)
        if kind is RunKind.RECOVERY:
            return await self._admit_recovery(spec, scheduled_at)
        return await self._admit_in_window(spec, scheduled_at)

    def _admit_now(self, spec: JobSpec, t_us: int) -> tuple[Lease, str] | None:
        """The common case in one look, without an await: leading, in our window, nothing in the way.

        None sends the fire time through the full admission (``_admit``), which
        says why not, or waits for the window to reach it.
        """
        lease = self._current_lease()
        window = self.keeper.window
        if (lease is None or window is None or self._hand_back_at_us is not None or window.sealed
                or window.token != lease.token or not window.since_us <= t_us < window.until_us
                or window.busy or spec.id in self.paused_jobs
                or len(self._running_keys.get(spec.id, ())) >= spec.max_instances
                or clocks.time() - t_us / 1e6 > self.grace(spec)):
            return None
        return lease, ""

    async def _admit_in_window(self, spec: JobSpec, scheduled_at: datetime) -> Refusal | tuple[Lease, str]:
        t_us = to_us(scheduled_at)
        lateness = clocks.time() - t_us / 1e6
        grace = self.grace(spec)
        if lateness > grace:
            return Refusal(RunOutcome.MISSED, f"{lateness:.1f}s late, past the misfire grace ({grace:g}s)")
        if spec.id in self.paused_jobs:
            return Refusal(RunOutcome.SKIPPED, "paused")
        lease = self._current_lease()
        if lease is None:
            return Refusal(RunOutcome.FENCED, "not leading (no valid lease)")
        while self._hand_back_at_us is None and not self.keeper.owns(t_us, lease.token):
            give_up = min(lease.deadline, clocks.monotonic() + max(0.0, grace - lateness))
            await self.keeper.cover(t_us, lease, give_up)
            waited_out = clocks.monotonic() >= give_up
            before, lease = lease, self._current_lease()
            if lease is None:
                return Refusal(RunOutcome.FENCED, "lease lost while the claim window was extended")
            lateness = clocks.time() - t_us / 1e6
            # waited until the lease's deadline, but it was renewed meanwhile: still ours to run, wait on (given
            # up, the fire time would be lost, though this leader owns it once the store answers; simulator)
            if not (waited_out and lease.deadline > before.deadline and lateness < grace):
                break
        refusal = self._outside_window(t_us, lease, grace)
        if refusal is not None:
            return refusal
        limit = self._over_limit(spec)
        if limit is not None:
            return limit
        return lease, ""

    def _outside_window(self, t_us: int, lease: Lease, grace: float) -> Refusal | None:
        """None when ``t_us`` is this leadership's to start now; else why not."""
        if self._hand_back_at_us is not None and t_us >= self._hand_back_at_us:
            return Refusal(RunOutcome.HANDED_BACK, "handed back to the next leader at a graceful handoff")
        window = self.keeper.window
        if window is None:
            return Refusal(RunOutcome.FENCED, "no claim window: the store refused or did not answer")
        if window.owned_by(lease.token) and window.covers(t_us):
            return None
        if window.token == lease.token and window.sealed:
            return Refusal(RunOutcome.HANDED_BACK, "handed back to the next leader")
        if window.token == lease.token and t_us < window.since_us:
            return Refusal(RunOutcome.LOST, "before this leader's window: claimed by a predecessor that did not "
                                            "run it (at most once after a crash)")
        if window.token < lease.token and t_us < window.until_us:
            return Refusal(RunOutcome.LOST, f"inside the claim window of token {window.token}, a predecessor that "
                                            "did not hand it back (at most once after a crash)")
        if window.token > lease.token:
            return Refusal(RunOutcome.FENCED, f"a newer leader (token {window.token}) holds the claim window")
        if clocks.time() - t_us / 1e6 > grace:
            return Refusal(RunOutcome.MISSED, "the store did not extend the claim window within the misfire grace")
        return Refusal(RunOutcome.FENCED, "the lease ran out before the claim window reached the fire time")

    def _over_limit(self, spec: JobSpec) -> Refusal | None:
        """The job's ``max_instances`` across the cluster: runs here plus runs a predecessor handed over."""
        keys = self._running_keys.get(spec.id, set())
        window = self.keeper.window
        if window is not None and window.busy:
            now_us = int(clocks.time() * 1_000_000)
            keys = keys | {b.key for b in window.busy if b.job_id == spec.id and b.until_us > now_us}
        if len(keys) >= spec.max_instances:
            return Refusal(RunOutcome.SKIPPED, f"max_instances: {len(keys)} run(s) of this job still going in the "
                                               "cluster")
        return None

    def _admit_manual(self, spec: JobSpec, now: datetime, force: bool) -> Refusal | tuple[Lease, str]:
        lease = self._current_lease()
        if lease is None or self._hand_back_at_us is not None:
            return Refusal(RunOutcome.FENCED, "not leading (no valid lease)")
        if spec.id in self.paused_jobs and not force:
            return Refusal(RunOutcome.SKIPPED, "paused (force to run it anyway)")
        limit = self._over_limit(spec)
        if limit is not None:
            return limit
        return lease, "#manual"

    async def _admit_recovery(self, spec: JobSpec, scheduled_at: datetime) -> Refusal | tuple[Lease, str]:
        lease = self._current_lease()
        if lease is None:
            return Refusal(RunOutcome.FENCED, "not leading (no valid lease)")
        suffix = f"#recovery-{lease.token}"
        key = claim_key(spec.id, scheduled_at) + suffix
        delay = 0.05
        surprises = 0
        while True:
            try:
                claimed = await self.backend.claim(lease, key)
                break
            except Exception as exc:
                # a surprise is tried again too, as a record write's is: given up at once, the recovery it was
                # owed was lost for the whole leadership (found by the simulator, seed 33272)
                if not isinstance(exc, BackendUnavailable):
                    surprises += 1
                if surprises >= SURPRISE_ATTEMPTS:
                    return Refusal(RunOutcome.ERROR, f"claiming the recovery failed: {exc}")
                if not lease.valid():
                    return Refusal(RunOutcome.FENCED, f"lease ran out while claiming the recovery: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        lease = self._current_lease()
        if lease is None or self._hand_back_at_us is not None:
            return Refusal(RunOutcome.FENCED, "lost the lease before the recovery started")
        if not claimed:
            return Refusal(RunOutcome.DUPLICATE, "recovery claimed by another token")
        limit = self._over_limit(spec)
        if limit is not None:
            return limit
        return lease, suffix
