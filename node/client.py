"""A small Python client for a Baton cluster's API: the runtime job store, manual runs, pauses, run records.

    from node.client import BatonClient

    with BatonClient("http://10.0.0.5:8000", token="secret") as baton:
        baton.add_job("tenant-42-sync", "myapp.tasks:sync_tenant", "interval", args=[42], minutes=5)
        baton.reschedule_job("tenant-42-sync", "cron", crontab="0 3 * * mon-fri")
        baton.remove_job("tenant-42-sync")

Method names follow APScheduler's scheduler (``add_job``, ``modify_job``,
``reschedule_job``, ``remove_job``, ``get_job(s)``, ``pause_job``,
``resume_job``). Any node takes a change; a call that must reach the leader
(``run_job``) is forwarded there by the node itself (``node.forward``: only
to a leader listed in its ``BATON_PEERS``), so the token goes to the URL given
here and nowhere else, and no redirect is ever followed. Errors are typed:
``JobNotFound`` (404), ``JobConflict`` (409), ``InvalidJob`` (422), else
``BatonAPIError`` with the status and the server's ``detail``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from node.triggers import TRIGGER_FIELDS


class BatonAPIError(Exception):
    """The API refused a call. ``status`` is the HTTP status, ``detail`` the server's explanation."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {detail}")


class JobNotFound(BatonAPIError):
    """404: no such job."""


class JobConflict(BatonAPIError):
    """409: the id belongs to a job defined in code, or a stored job exists (add_job); or a manual run was refused."""


class InvalidJob(BatonAPIError):
    """422: the job does not validate; ``detail`` names the field."""


_ERRORS = {404: JobNotFound, 409: JobConflict, 422: InvalidJob}


class BatonClient:
    """Talks to one node (any node: changes reach the leader through the lock backend)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # follow_redirects=False: no Baton node redirects; a redirect would come from something else, and the
        # token must not follow it anywhere
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport,
                                  follow_redirects=False)

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the runtime job store -----------------------------------------------------------

    def add_job(self, job_id: str, func: str, trigger: str, *, args: list[Any] | tuple[Any, ...] = (),
                kwargs: dict[str, Any] | None = None, **trigger_fields_and_options: Any) -> dict[str, Any]:
        """Store a new job calling ``func`` (``"module:function"``); ``JobConflict`` if the id is taken."""
        body = _job(job_id, func, trigger, args, kwargs, trigger_fields_and_options)
        return self._object("POST", "/admin/jobs", json=body)

    def put_job(self, job_id: str, func: str, trigger: str, *, args: list[Any] | tuple[Any, ...] = (),
                kwargs: dict[str, Any] | None = None, **trigger_fields_and_options: Any) -> dict[str, Any]:
        """Store a job under ``job_id``, replacing the stored one if there is one."""
        body = _job(job_id, func, trigger, args, kwargs, trigger_fields_and_options)
        return self._object("PUT", f"/admin/jobs/{job_id}", json=body)

    def modify_job(self, job_id: str, **changes: Any) -> dict[str, Any]:
        """Change some of a stored job's fields (``args``, ``max_instances``, ...), keeping the others."""
        return self._put_changed(job_id, changes, keep_trigger=True)

    def reschedule_job(self, job_id: str, trigger: str, **trigger_fields: Any) -> dict[str, Any]:
        """Give a stored job a new trigger; its function, arguments and options stay."""
        return self._put_changed(job_id, {"trigger": trigger, **trigger_fields}, keep_trigger=False)

    def remove_job(self, job_id: str) -> None:
        """Remove a stored job everywhere."""
        self._call("DELETE", f"/admin/jobs/{job_id}")

    def _put_changed(self, job_id: str, changes: dict[str, Any], *, keep_trigger: bool) -> dict[str, Any]:
        current = self.get_job(job_id)
        if current.get("origin") != "stored":
            raise JobConflict(409, f"job {job_id!r} is defined in code; only stored jobs change at runtime")
        body = dict(current["spec"])
        if not keep_trigger:
            for name in {n for names in TRIGGER_FIELDS.values() for n in names}:
                body.pop(name, None)
        body.update(changes)
        return self._object("PUT", f"/admin/jobs/{job_id}", json=body)

    # -- reading, and acting on any job ------------------------------------------------------

    def get_jobs(self) -> list[dict[str, Any]]:
        """Every job, code-defined and stored (``origin``), with its schedule and next fire time."""
        return self._rows("GET", "/jobs")

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._object("GET", f"/jobs/{job_id}")

    def pause_job(self, job_id: str) -> None:
        self._call("POST", f"/admin/jobs/{job_id}/pause")

    def resume_job(self, job_id: str) -> None:
        self._call("POST", f"/admin/jobs/{job_id}/resume")

    def run_job(self, job_id: str, *, force: bool = False) -> dict[str, Any]:
        """Run now, on the leader; the answer carries the outcome (``JobConflict`` if paused or at max_instances)."""
        return self._object("POST", f"/admin/jobs/{job_id}/run", params={"force": "true"} if force else None)

    def runs(self, *, job: str | None = None, outcome: str | None = None, since: str | None = None,
             limit: int = 50) -> list[dict[str, Any]]:
        """Recent runs, newest first: outcome, kind, duration_ms, error, the body's returned ``value``."""
        params = {k: v for k, v in {"job": job, "outcome": outcome, "since": since, "limit": limit}.items()
                  if v is not None}
        runs: list[dict[str, Any]] = self._object("GET", "/runs", params=params)["runs"]
        return runs

    def _object(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        """``_call`` for a route that answers a JSON object."""
        body: dict[str, Any] = self._call(method, path, **kw)
        return body

    def _rows(self, method: str, path: str, **kw: Any) -> list[dict[str, Any]]:
        """``_call`` for a route that answers a JSON list of objects."""
        body: list[dict[str, Any]] = self._call(method, path, **kw)
        return body

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        response = self._http.request(method, path, **kw)
        if response.status_code >= 300:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise _ERRORS.get(response.status_code, BatonAPIError)(response.status_code, detail)
        return response.json() if response.content else None


def _job(job_id: str, func: str, trigger: str, args: Any, kwargs: Any, rest: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "func": func, "trigger": trigger, "args": list(args), "kwargs": dict(kwargs or {}), **rest}
