"""HTTP routes of the runtime job store: ``POST /admin/jobs``, ``PUT``/``DELETE /admin/jobs/{id}``, ``GET /jobs/{id}``.

Any node takes a change (it is written to the lock backend, which every node
reads); the leader runs it within one ``BATON_RETRY_PERIOD``. Answers:
201 created, 200 replaced or removed, 404 no such stored job, 409 the id
belongs to a job defined in code (or, for POST, to a stored job already),
422 the job does not validate (``detail`` names the job, the field and what is wrong),
503 the backend did not answer. The body is what APScheduler's ``add_job``
takes, as JSON::

    {"id": "tenant-42-sync", "func": "myapp.tasks:sync_tenant", "args": [42],
     "trigger": "interval", "minutes": 5, "max_instances": 1}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path
from fastapi.params import Depends
from fastapi.responses import JSONResponse

from node.stored_jobs import JobConflict, JobNotFound
from node.triggers import JobSpecError

if TYPE_CHECKING:
    from node.app import Node

JobId = Annotated[str, Path(min_length=1, max_length=200)]
JobBody = Annotated[dict[str, Any], Body(examples=[{
    "id": "tenant-42-sync", "func": "myapp.tasks:sync_tenant", "args": [42], "kwargs": {},
    "trigger": "cron", "crontab": "*/5 * * * *", "timezone": "Europe/Berlin", "max_instances": 1}])]


def add_stored_job_routes(router: APIRouter, node: Node, admin: Depends,
                          known_job: Callable[[str], Awaitable[None]]) -> None:
    store = node.scheduler.stored

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: JobId) -> dict[str, Any]:
        """One job: origin (code or stored), schedule, options, next fire time; a stored job's target and args."""
        await known_job(job_id)
        return node.scheduler.describe(node.scheduler.jobs.specs[job_id])

    @router.post("/admin/jobs", dependencies=[admin], status_code=201)
    async def add_job(body: JobBody) -> dict[str, Any]:
        """Store a new job: every node runs it from now on (the leader within one retry period)."""
        spec = await _answer(store.create(body))
        return node.scheduler.describe(spec)

    @router.put("/admin/jobs/{job_id}", dependencies=[admin])
    async def put_job(job_id: JobId, body: JobBody) -> JSONResponse:
        """Store a job under this id, replacing a stored one (change or reschedule it); 201 when new."""
        spec, created = await _answer(store.put(job_id, body))
        return JSONResponse(node.scheduler.describe(spec), status_code=201 if created else 200)

    @router.delete("/admin/jobs/{job_id}", dependencies=[admin])
    async def delete_job(job_id: JobId) -> dict[str, Any]:
        """Remove a stored job everywhere. Runs already going end as they would."""
        await _answer(store.delete(job_id))
        return {"id": job_id, "removed": True}


async def _answer(pending: Awaitable[Any]) -> Any:
    """The store's typed errors as HTTP answers."""
    try:
        return await pending
    except JobSpecError as exc:
        raise HTTPException(422, str(exc)) from None
    except JobConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except JobNotFound as exc:
        raise HTTPException(404, f"no stored job with id {exc.args[0]!r}") from None
