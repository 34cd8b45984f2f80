"""What can become of a fire time, and what kind of run a run is: the one list of each.

``baton_job_runs_total{outcome}``, the run records, the logs, the API and the
harness all use these values; nothing spells them out again.
"""

from __future__ import annotations

from enum import StrEnum


class RunKind(StrEnum):
    """Why a job body runs."""

    #: A fire time of the schedule, at (or soon after) its time.
    SCHEDULED = "scheduled"
    #: A new leader's run of the latest fire time nobody ran while there was no leader (coalesced).
    CATCH_UP = "catch_up"
    #: Once more, a recoverable run that a leader claimed and never reported (it died).
    RECOVERY = "recovery"
    #: ``POST /admin/jobs/{id}/run``.
    MANUAL = "manual"


class RunOutcome(StrEnum):
    """What became of one fire time on one node. Every fire time a node handles ends as exactly one."""

    #: The body ran and returned.
    OK = "ok"
    #: The body ran and raised.
    ERROR = "error"
    #: Not started: this node's lease was gone (or going) before the start. Another node runs it.
    FENCED = "fenced"
    #: Not started: another token had claimed it (a recovery or manual key taken by someone else).
    DUPLICATE = "duplicate"
    #: Not run by anyone: found past the misfire grace.
    MISSED = "missed"
    #: Not run: the job already had ``max_instances`` runs going in the cluster (APScheduler's skip).
    SKIPPED = "skipped"
    #: Not run here: folded into a later fire time of the same job (a catch-up's coalescing).
    COALESCED = "coalesced"
    #: Not run: it fell in the claim window of a leader that died (or stalled) before starting it.
    #: The at-most-once window of a crash; recoverable jobs run it again by recovery.
    LOST = "lost"
    #: Not run here: handed back to the next leader at a graceful handoff, which runs it.
    HANDED_BACK = "handed_back"
    #: The body was running at shutdown and was cut after the shutdown grace.
    CANCELLED = "cancelled"

    @property
    def ran(self) -> bool:
        """True when a body started for this fire time on this node."""
        return self in (RunOutcome.OK, RunOutcome.ERROR, RunOutcome.CANCELLED)


#: Outcomes that count as a problem in alerts: a stale leader tried to act, or two claimed one key.
ALERTING = (RunOutcome.FENCED, RunOutcome.DUPLICATE)
