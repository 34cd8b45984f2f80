"""Probe jobs for the harness, and the shape spec that the node, the cluster harness and the checker share.

A probe's body reports its start to an outside collector (``loadtest.collector``) and nothing else
(the ``long`` shape then sleeps): the checker judges the cluster from those reports alone. A record is
``{job, scheduled_at, node, token, started_at, kind, shape}``; ``kind`` is the run's
:class:`node.outcomes.RunKind` (scheduled, catch_up, recovery, manual).

Shapes, each a different way for a fire time to get lost in a handoff:

``basic``    today's probes (``probe-000`` ..): frequent, so a lost fire time hides behind the next one.
``sparse``   (``sparse-000`` ..) an interval several times the lease TTL: a lost fire time cannot hide.
``long``     (``long-000`` ..) the body sleeps ``BODY`` seconds after reporting its start, longer than
             the TTL, so a run is still going across a handoff; one run at a time (``max_instances`` 1).
``recover``  (``recover-000`` ..) ``recover=True``: a run claimed by a leader that died is run again.

The spec (``BATON_PROBE_SHAPES``, the checker's ``--probes``): comma-separated items
``SHAPE[:COUNT][@INTERVAL][/BODY]``, seconds for INTERVAL and BODY (a trailing ``s`` is allowed), e.g.
``basic:2@1,sparse:1@8,long:1@8/2.5,recover:1@4``. COUNT defaults to ``BATON_PROBE_JOBS`` (the checker:
``--jobs``, else 1), INTERVAL to ``BATON_PROBE_INTERVAL`` (``--interval``, else 1). An empty spec is
``basic`` alone: ``BATON_PROBE_JOBS`` probes every ``BATON_PROBE_INTERVAL``, as before shapes existed.

Every interval fire time is ``INTERVAL_EPOCH + k * INTERVAL``: the same instants on every node, and for
the checker and for ``loadtest.chaos``, which aims faults at them.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

import httpx
from pydantic import AfterValidator

from node.jobs import INTERVAL_EPOCH, JobRegistry, JobSpec, RunContext, every

#: Probe runs of one job allowed at once (shapes other than ``long``). A probe's body is its POST to the
#: collector: a slow collector must not make the scheduler skip the next fire time (that would be a miss
#: of the harness, not of the cluster).
PROBE_MAX_INSTANCES = 4

#: Shape name -> job id prefix.
PREFIXES = {"basic": "probe", "sparse": "sparse", "long": "long", "recover": "recover"}
SHAPES = tuple(PREFIXES)

_ITEM = re.compile(r"^(?P<shape>[a-z]+)(?::(?P<count>\d+))?(?:@(?P<interval>[0-9.]+)s?)?(?:/(?P<body>[0-9.]+)s?)?$")

#: How the spec reads, for error messages and ``node.config.ACCEPTED``.
SPEC_FORM = ("comma-separated SHAPE[:COUNT][@INTERVAL][/BODY] with SHAPE one of basic, sparse, long, recover, "
             "e.g. basic:2@1,sparse:1@8,long:1@8/2.5,recover:1@4")


class ProbeSpecError(ValueError):
    """The spec does not parse; the message says where and what is accepted."""


@dataclass(frozen=True)
class ProbeShape:
    """``count`` probe jobs of one shape, every ``interval`` seconds, each body sleeping ``body`` seconds."""

    shape: str
    count: int
    interval: float
    body: float = 0.0

    @property
    def prefix(self) -> str:
        return PREFIXES[self.shape]

    @property
    def recover(self) -> bool:
        return self.shape == "recover"

    @property
    def max_instances(self) -> int:
        return 1 if self.shape == "long" else PROBE_MAX_INSTANCES

    def job_ids(self) -> list[str]:
        return [f"{self.prefix}-{i:03d}" for i in range(self.count)]

    def text(self) -> str:
        """This item of the spec with everything explicit."""
        return f"{self.shape}:{self.count}@{self.interval:g}" + (f"/{self.body:g}" if self.body else "")

    def next_fire_time(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after``, exact to the microsecond."""
        step = round(self.interval * 1_000_000)
        since = after - INTERVAL_EPOCH
        us = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
        return INTERVAL_EPOCH + timedelta(microseconds=(us // step + 1) * step)


def _seconds(value: str, what: str, item: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ProbeSpecError(f"{what} {value!r} in {item!r} is not a number of seconds") from None


def parse_shapes(text: str, *, count: int = 1, interval: float | None = 1.0) -> list[ProbeShape]:
    """The shapes of a spec; COUNT and INTERVAL default to ``count`` and ``interval``.

    ``interval=None`` only checks the syntax of items that leave their interval out (the node's setting
    validates the spec before it knows BATON_PROBE_INTERVAL's value). Raises :class:`ProbeSpecError`.
    """
    shapes: list[ProbeShape] = []
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        match = _ITEM.match(item)
        if match is None:
            raise ProbeSpecError(f"{item!r} is not SHAPE[:COUNT][@INTERVAL][/BODY]")
        shape = match["shape"]
        if shape not in PREFIXES:
            raise ProbeSpecError(f"unknown probe shape {shape!r}; expected one of {', '.join(SHAPES)}")
        if shape in seen:
            raise ProbeSpecError(f"probe shape {shape!r} given twice (its job ids would collide)")
        seen.add(shape)
        n = int(match["count"]) if match["count"] is not None else count
        every_s = _seconds(match["interval"], "interval", item) if match["interval"] is not None else interval
        body = _seconds(match["body"], "body", item) if match["body"] is not None else 0.0
        if every_s is not None and not every_s > 0:
            raise ProbeSpecError(f"interval in {item!r} must be positive")
        if shape == "long" and not body > 0:
            raise ProbeSpecError(f"{item!r}: a long probe needs a body longer than the lease TTL, e.g. long:1@8/2.5")
        if every_s is not None:
            # the body must end before the next fire time, or APScheduler skips that one (a harness miss)
            limit = every_s * (1 if shape == "long" else PROBE_MAX_INSTANCES)
            if body >= limit:
                raise ProbeSpecError(f"{item!r}: the body ({body:g} s) must be shorter than {limit:g} s, or fire "
                                     "times would be skipped while earlier runs are still going")
        shapes.append(ProbeShape(shape, n, every_s if every_s is not None else 0.0, body))
    return shapes


def effective_shapes(text: str | None, count: int, interval: float) -> list[ProbeShape]:
    """The probe jobs a node registers: the spec's, or ``count`` basic probes when the spec is empty."""
    shapes = parse_shapes(text or "", count=count, interval=interval) if (text or "").strip() else []
    if not shapes and count > 0:
        shapes = [ProbeShape("basic", count, interval)]
    return [s for s in shapes if s.count > 0]


def spec_text(shapes: list[ProbeShape]) -> str:
    """The spec of ``shapes`` with every count and interval explicit."""
    return ",".join(s.text() for s in shapes)


def _valid_spec(value: str) -> str:
    try:
        parse_shapes(value, interval=None)
    except ProbeSpecError as exc:
        raise ValueError(str(exc)) from None
    return value.strip()


#: The type of the node's ``probe_shapes`` setting: a spec that parses.
ProbeShapesText = Annotated[str, AfterValidator(_valid_spec)]


def add_probe_jobs(jobs: JobRegistry, count: int, interval: float, url: str,
                   client: Callable[[], httpx.AsyncClient], shapes: str = "") -> None:
    """Register the probe jobs: ``shapes`` (a spec), or ``count`` basic probes every ``interval`` seconds."""
    for shape in effective_shapes(shapes, count, interval):
        for job_id in shape.job_ids():
            jobs.add(JobSpec(job_id, _probe_body(shape, url, client),
                             functools.partial(every, shape.interval), shape.recover,
                             f"{shape.shape} probe for the checker", max_instances=shape.max_instances))


def _probe_body(shape: ProbeShape, url: str, client: Callable[[], httpx.AsyncClient]) -> Callable[..., object]:
    async def probe(run: RunContext) -> None:
        record = {"job": run.job_id, "scheduled_at": run.scheduled_at.isoformat(), "node": run.node_id,
                  "token": run.token, "started_at": datetime.now(UTC).isoformat(), "kind": str(run.kind),
                  "shape": shape.shape}
        response = await client().post(url, json=record)
        response.raise_for_status()
        if shape.body:
            await asyncio.sleep(shape.body)

    return probe
