"""The negative control: leader election as a naive implementation does it. Never for production.

``BATON_CLAIMS=off`` builds these instead of the real elector and gate, so the
checker can show what Baton's fencing prevents: a naive leader trusts its lease
until a renew says it is lost (a paused process wakes up still "leading") and
fires whatever its scheduler fires, with no claim window. They are kept out of
the production classes, which have no such mode.
"""

from __future__ import annotations

from datetime import datetime

from lock_backends import Lease
from node.admission import Refusal
from node.election import Elector
from node.jobs import JobSpec, claim_key
from node.outcomes import RunKind, RunOutcome
from node.scheduler import GatedScheduler


class NaiveElector(Elector):
    """Trusts the lease it holds, deadline or not, until a renew is refused."""

    def current_lease(self) -> Lease | None:
        return self._lease

    def _give_up_at(self, lease: Lease) -> float:
        return float("inf")

    def _renew_budget(self, lease: Lease) -> float:
        return lease.ttl


class NaiveScheduler(GatedScheduler):
    """Fires whatever the resumed scheduler fires while the elector believes it leads: no window, no claims."""

    async def on_started_leading(self, lease: Lease) -> None:
        self.token = lease.token
        self._lease = lease
        self._hand_back_at_us = None
        self.scheduler.resume()
        self.metrics.is_leader.set(1)
        self.metrics.lease_token.set(lease.token)
        self.metrics.transitions.inc()

    async def on_stopped_leading(self) -> None:
        self.scheduler.pause()
        self.token = None
        self.metrics.is_leader.set(0)
        self.metrics.lease_token.set(0)
        self.metrics.transitions.inc()

    async def hand_over(self) -> None:
        self.scheduler.pause()

    async def _admit(self, spec: JobSpec, scheduled_at: datetime, kind: RunKind,
                     force: bool) -> Refusal | tuple[Lease, str]:
        lease = self.elector.current_lease()
        if lease is None:
            return Refusal(RunOutcome.FENCED, "not leading")
        return lease, claim_key(spec.id, scheduled_at)
