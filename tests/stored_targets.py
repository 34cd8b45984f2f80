"""Functions stored jobs call in the in-process tests (tests/test_stored_jobs.py): each call is kept here."""

from __future__ import annotations

from typing import Any

from node.jobs import current_run

#: (function, args, kwargs, job id, node id, scheduled_at, kind) of every call.
CALLS: list[tuple[Any, ...]] = []

#: Not a function: a stored job naming it is refused.
NOT_CALLABLE = 42


def sync_tenant(tenant: int, full: bool = False) -> dict[str, Any]:
    """A plain def: runs in the job thread pool."""
    run = current_run.get()
    CALLS.append(("sync_tenant", (tenant,), {"full": full}, run.job_id, run.node_id, run.scheduled_at, run.kind))
    return {"tenant": tenant, "rows": 3}


async def ping(label: str = "") -> str:
    run = current_run.get()
    CALLS.append(("ping", (label,), {}, run.job_id, run.node_id, run.scheduled_at, run.kind))
    return label


def calls_of(job_id: str) -> list[tuple[Any, ...]]:
    return [c for c in CALLS if c[3] == job_id]
