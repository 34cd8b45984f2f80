"""The runtime job store: jobs added, changed and removed through the API, kept in the lock backend.

A stored job calls an importable function (``"myapp.tasks:sync_tenant"``)
with JSON ``args``/``kwargs`` on a trigger of ``node.triggers``. Each lives in
the backend's shared settings (the ``SettingStore``, beside the lease) as one
setting, ``job:<id>``, holding the job as JSON: so stored jobs survive
failovers and full restarts wherever the lease does, and every node reads the
same set.

Promised:

* A job is validated fully before it is stored (its target imports and is
  callable, its arguments fit the function's signature, its trigger and
  options pass ``node.jobs.build_spec``, a one-shot's date is not past):
  ``JobSpecError`` otherwise, naming the field. What is stored runs.
* A stored job never shadows a job defined in code: the id is refused
  (``JobConflict``), and a stored value that collides anyway (the code gained
  the id later) is skipped with a warning.
* A stored value that does not decode (or no longer validates: its target
  went away in a deploy) is logged once and skipped; it never fails a request
  or the settings sync.
* Changes made through any node reach the leader at its next settings sync
  (every ``BATON_RETRY_PERIOD``); the node that took the change applies it at
  once. The leader then catches up the fire times since the change it learned
  late (``GatedScheduler.add_spec``).

Not promised: two nodes creating the same id at the same instant both
succeed, the last write wins (the store has no compare-and-set for settings).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from datetime import datetime, tzinfo
from typing import Any, Protocol

from lock_backends import LockBackendError, SettingStore
from lock_backends import clock as clocks
from node.imports import ImportStringError, import_string
from node.jobs import JobRegistry, JobSpec, build_spec
from node.triggers import JobSpecError

log = logging.getLogger("baton.stored_jobs")

#: Settings key of a stored job: this prefix, then the job id.
JOB_PREFIX = "job:"
#: The largest stored job, as JSON.
STORED_MAX_BYTES = 64 * 1024
#: Keys of a stored job's JSON besides the trigger's fields and the job options.
META = ("id", "func", "trigger", "created_at", "updated_at")


class JobConflict(Exception):
    """The id is taken: by a job defined in code, or (for POST) by a stored job."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r}: {reason}")


class JobNotFound(KeyError):
    """No stored job with this id."""


class Host(Protocol):
    """What the store needs from the scheduler (``node.scheduler.GatedScheduler``)."""

    jobs: JobRegistry
    timezone: tzinfo

    def add_spec(self, spec: JobSpec) -> None: ...

    def remove_spec(self, job_id: str) -> None: ...

    async def refresh_settings(self) -> None: ...

    async def set_paused(self, job_id: str, paused: bool) -> None: ...


def build_stored(doc: Any, defaults: Mapping[str, Any] | None = None, *, timezone: tzinfo | None = None) -> JobSpec:
    """The ``JobSpec`` a stored job's JSON describes, or ``JobSpecError``. ``timezone``: refuse a past run_date."""
    if not isinstance(doc, Mapping):
        raise JobSpecError("?", "body", "a stored job is a JSON object")
    job_id = doc.get("id")
    if not isinstance(job_id, str):
        raise JobSpecError(str(job_id), "id", "a stored job needs an id (a string)")
    func_ref, trigger = doc.get("func"), doc.get("trigger")
    if not isinstance(func_ref, str):
        raise JobSpecError(job_id, "func", "the function to call, as an import string such as "
                                           "'myapp.tasks:sync_tenant'")
    if not isinstance(trigger, str):
        raise JobSpecError(job_id, "trigger", "one of cron, interval, date")
    if "replace_existing" in doc:
        raise JobSpecError(job_id, "replace_existing", "not for stored jobs: POST adds (409 when the id exists), "
                                                       "PUT adds or replaces")
    try:
        target = import_string(func_ref)
    except ImportStringError as exc:
        raise JobSpecError(job_id, "func", str(exc)) from None
    if not callable(target):
        raise JobSpecError(job_id, "func", f"{func_ref!r} is a {type(target).__name__}, not a function")
    given = {k: v for k, v in doc.items() if k not in META}
    given.setdefault("args", [])
    given.setdefault("kwargs", {})
    updated_at = _instant(job_id, "updated_at", doc.get("updated_at"))
    details = {"func": func_ref, "args": given["args"], "kwargs": given["kwargs"],
               "created_at": doc.get("created_at"), "updated_at": doc.get("updated_at"),
               "spec": {k: v for k, v in doc.items() if k not in ("created_at", "updated_at")}}
    spec, _ = build_spec(job_id, target, trigger, given, defaults, origin="stored", active_from=updated_at,
                         details=details)
    if timezone is not None and spec.schedule is not None and spec.schedule.one_shot:
        run_date = spec.make_trigger(timezone).get_next_fire_time(None, clocks.utcnow())
        if run_date is None:
            raise JobSpecError(job_id, "run_date", "is in the past: the job would never run (to run a job "
                                                   "now, POST /admin/jobs/{id}/run)")
    return spec


def _instant(job_id: str, name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise JobSpecError(job_id, name, f"{value!r} is not an ISO 8601 instant") from None
    if t.tzinfo is None:
        raise JobSpecError(job_id, name, f"{value!r} has no UTC offset")
    return t


def encode(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


class StoredJobs:
    """Writes stored jobs to the backend, and keeps a scheduler's jobs in step with what is stored."""

    def __init__(self, host: Host, backend: SettingStore, lock_name: str,
                 defaults: Mapping[str, Any] | None = None) -> None:
        self.host = host
        self.backend = backend
        self.lock_name = lock_name
        self.defaults = dict(defaults or {})
        #: Installed stored jobs: id -> the raw value they were built from.
        self._installed: dict[str, str] = {}
        #: Values that did not decode, by id, so each is logged once.
        self._complained: dict[str, str] = {}

    # -- reading: the settings sync -----------------------------------------------------------

    def apply(self, settings: Mapping[str, str]) -> None:
        """Install, replace and remove jobs so the scheduler runs exactly the stored set (plus the code's)."""
        wanted = {k[len(JOB_PREFIX):]: v for k, v in settings.items() if k.startswith(JOB_PREFIX)}
        for job_id in [j for j in self._installed if j not in wanted]:
            self._uninstall(job_id)
        for job_id, raw in wanted.items():
            if self._installed.get(job_id) == raw:
                continue
            try:
                spec = self.decode(job_id, raw)
            except (JobSpecError, JobConflict) as exc:
                if self._complained.get(job_id) != raw:
                    self._complained[job_id] = raw
                    log.warning("stored job skipped: %s", exc, extra={"job": job_id})
                if job_id in self._installed:
                    self._uninstall(job_id)
                continue
            self._complained.pop(job_id, None)
            self.host.add_spec(spec)
            self._installed[job_id] = raw
            log.info("stored job installed", extra={"job": job_id})

    def decode(self, job_id: str, raw: str) -> JobSpec:
        """A stored value as a job; ``JobSpecError`` when it does not decode, ``JobConflict`` for a code job's id."""
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise JobSpecError(job_id, "value", f"the stored value is not JSON: {exc}") from None
        if isinstance(doc, dict) and doc.get("id") != job_id:
            raise JobSpecError(job_id, "id", f"the stored value names job {doc.get('id')!r}")
        self._refuse_code_id(job_id)
        return build_stored(doc, self.defaults)

    def _uninstall(self, job_id: str) -> None:
        del self._installed[job_id]
        self.host.remove_spec(job_id)
        log.info("stored job removed", extra={"job": job_id})

    def _refuse_code_id(self, job_id: str) -> None:
        existing = self.host.jobs.specs.get(job_id)
        if existing is not None and existing.origin != "stored":
            raise JobConflict(job_id, "a job with this id is defined in the application's code; pick another id")

    # -- writing: the admin API -----------------------------------------------------------------

    async def create(self, body: Mapping[str, Any]) -> JobSpec:
        """Store a new job (``POST /admin/jobs``): ``JobConflict`` when the id is taken."""
        if not isinstance(body, Mapping):
            raise JobSpecError("?", "body", "a stored job is a JSON object")
        job_id = body.get("id")
        if isinstance(job_id, str):
            self._refuse_code_id(job_id)
            if JOB_PREFIX + job_id in await self.backend.settings(self.lock_name):
                raise JobConflict(job_id, "a stored job with this id exists; PUT /admin/jobs/{id} replaces it")
        return await self._write(body, created_at=None)

    async def put(self, job_id: str, body: Mapping[str, Any]) -> tuple[JobSpec, bool]:
        """Store or replace a job (``PUT /admin/jobs/{id}``); True when it was created."""
        if not isinstance(body, Mapping):
            raise JobSpecError(job_id, "body", "a stored job is a JSON object")
        if body.get("id", job_id) != job_id:
            raise JobSpecError(job_id, "id", f"the body names job {body.get('id')!r}, the path {job_id!r}")
        self._refuse_code_id(job_id)
        old = (await self.backend.settings(self.lock_name)).get(JOB_PREFIX + job_id)
        created_at = None
        if old is not None:
            try:
                created_at = json.loads(old).get("created_at")
            except (ValueError, AttributeError):
                created_at = None
        spec = await self._write({**body, "id": job_id}, created_at=created_at)
        return spec, old is None

    async def delete(self, job_id: str) -> None:
        """Remove a stored job everywhere (``DELETE /admin/jobs/{id}``), and its paused flag."""
        self._refuse_code_id(job_id)
        if JOB_PREFIX + job_id not in await self.backend.settings(self.lock_name):
            raise JobNotFound(job_id)
        await self.backend.set_setting(self.lock_name, JOB_PREFIX + job_id, None)
        await self.host.set_paused(job_id, False)
        await self._refresh()

    async def _write(self, body: Mapping[str, Any], *, created_at: str | None) -> JobSpec:
        now = clocks.utcnow().isoformat()
        doc = {k: v for k, v in dict(body).items() if k not in ("created_at", "updated_at")}
        doc.update(created_at=created_at or now, updated_at=now)
        spec = build_stored(doc, self.defaults, timezone=self.host.timezone)
        try:
            raw = encode(doc)
        except ValueError as exc:
            raise JobSpecError(spec.id, "body", f"not JSON: {exc}") from None
        if len(raw.encode()) > STORED_MAX_BYTES:
            raise JobSpecError(spec.id, "body", f"{len(raw.encode())} bytes of JSON, more than {STORED_MAX_BYTES}")
        await self.backend.set_setting(self.lock_name, JOB_PREFIX + spec.id, raw)
        await self._refresh()
        return self.host.jobs.specs.get(spec.id, spec)

    async def _refresh(self) -> None:
        """Apply a change here at once; the write succeeded, so a slow read only delays it to the next sync."""
        with contextlib.suppress(LockBackendError, TimeoutError):
            await self.host.refresh_settings()
