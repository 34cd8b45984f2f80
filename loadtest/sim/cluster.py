"""How a simulated node is made of the production classes, and everything else that knows their insides.

This is the one module of the simulator that depends on the node core and
the lock backend protocol. Porting the simulator to another core means
changing this module (and the backend it builds) only:

* ``patched_clocks``: where production code reads time. Today's core calls
  ``time.monotonic``/``time.perf_counter``/``datetime.now`` in
  ``node.scheduler``, ``node.claims``, ``node.election`` and
  ``lock_backends.base``, and APScheduler reads ``datetime.now`` in
  ``apscheduler.schedulers.base``; for the simulation only, those module
  globals are replaced by shims that read the clock of the current context
  (``_CLOCK``: the process's host clock in its tasks, the sender's clock
  frozen at sending in a request applied at the server). The new core reads
  time through ``lock_backends.clock`` instead (``clock.using``), which makes
  all but the APScheduler shim unnecessary.
* ``Cluster.boot``: a node as ``node.app.Node`` wires it (an ``Elector`` and a
  ``GatedScheduler`` over one backend client), without HTTP and with inert
  metrics; its start (``Node.start``), graceful stop on SIGTERM
  (``NodeServer._release`` then ``Node.stop``), step-down
  (``POST /admin/leader/step-down``) and manual run (``POST /admin/jobs/{id}/run``).
* What is observed, without changing behaviour: the lease each elector holds
  (a subclass whose ``_lease`` attribute reports its assignments), every fire
  time handed to ``GatedScheduler.fire`` (an instance attribute wrapping the
  method), the tokens the store grants (the answer of ``acquire`` at the
  server), and the job bodies, which are the simulator's own.
* ``make_store``/``client``: the in-memory backend of the protocol in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time as _time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import apscheduler.executors.base as aps_executors
import apscheduler.schedulers.base as aps_schedulers

import lock_backends.base as backend_base
import node.claims
import node.election
import node.scheduler
from loadtest.sim.history import WALL0, History
from loadtest.sim.loop import DEAD, PAUSED, PROCESS, HostClock, Process, SimLoop
from loadtest.sim.memory_v1 import MemoryBackendV1, Store
from loadtest.sim.net import FaultyBackend, Network
from loadtest.sim.scenario import Fault, JobShape, RunConfig
from lock_backends import Holder, Lease
from node.election import ElectionConfig, Elector
from node.jobs import JobRegistry, JobSpec, RunContext, every
from node.scheduler import GatedScheduler

LOCK_NAME = "baton"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: How long an armed operation fault waits for its call.
OP_FAULT_WINDOW = 3.0


def to_us(t: datetime) -> int:
    return (t - EPOCH) // timedelta(microseconds=1)


# -- clocks --------------------------------------------------------------------------------------


class HostTime:
    """A host's clocks, read now (the loop's true time)."""

    __slots__ = ("clock", "loop")

    def __init__(self, loop: SimLoop, clock: HostClock) -> None:
        self.loop = loop
        self.clock = clock

    def monotonic(self) -> float:
        clock = self.clock
        return clock.mono0 + clock.rate * self.loop._now

    def time(self) -> float:
        clock = self.clock
        return clock.wall0 + clock.rate * self.loop._now + clock.offset


class FrozenTime:
    """A sender's clocks as read when its request left (what the server-side code of a request sees)."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, mono: float, wall: float) -> None:
        self._mono = mono
        self._wall = wall

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall


_CLOCK: contextvars.ContextVar[Any] = contextvars.ContextVar("baton_sim_clock", default=None)
_FALLBACK: list[Any] = [None]


def _now_clock() -> Any:
    clock = _CLOCK.get()
    return clock if clock is not None else _FALLBACK[0]


class _TimeShim:
    """Stands in for the ``time`` module inside the node's modules."""

    @staticmethod
    def monotonic() -> float:
        return (_CLOCK.get() or _FALLBACK[0]).monotonic()

    perf_counter = monotonic

    @staticmethod
    def time() -> float:
        return (_CLOCK.get() or _FALLBACK[0]).time()

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


class _DateTimeShim(datetime):
    """Stands in for ``datetime.datetime`` where ``now()`` is read; everything else is the real class."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return datetime.fromtimestamp((_CLOCK.get() or _FALLBACK[0]).time(), tz)


_PATCHES = ((node.scheduler, "time", _TimeShim()), (node.scheduler, "datetime", _DateTimeShim),
            (node.claims, "time", _TimeShim()), (node.claims, "datetime", _DateTimeShim),
            (node.election, "time", _TimeShim()), (backend_base, "time", _TimeShim()),
            (aps_schedulers, "datetime", _DateTimeShim), (aps_executors, "datetime", _DateTimeShim))


@contextlib.contextmanager
def patched_clocks(loop: SimLoop) -> Iterator[None]:
    """Point the node's clock reads at the simulation's clocks, for the block only."""
    _FALLBACK[0] = HostTime(loop, HostClock(WALL0))
    saved = [(module, name, getattr(module, name)) for module, name, _ in _PATCHES]
    for module, name, shim in _PATCHES:
        setattr(module, name, shim)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        _FALLBACK[0] = None


class _Notes(logging.Handler):
    """Warnings the node code logs, into the history's notes (the event table shows them)."""

    def __init__(self, loop: SimLoop, history: History) -> None:
        super().__init__(logging.WARNING)
        self.loop = loop
        self.history = history

    def emit(self, record: logging.LogRecord) -> None:
        proc = PROCESS.get()
        job = getattr(record, "job", "") or ""
        if record.name.startswith("apscheduler") and record.args and hasattr(record.args[0], "id"):
            job = record.args[0].id  # "Execution of job ... skipped: maximum number of running instances"
            text = f"apscheduler: {job} " + record.getMessage().rpartition('" ')[2]
        else:
            text = record.getMessage()
        for attr in ("key", "detail"):
            value = getattr(record, attr, None)
            if value:
                text += f" [{value}]"
        if not job and getattr(record, "key", None):
            job = str(record.key).partition("@")[0]
        self.history.note(self.loop.now, proc.name if proc else "-", text, job)


@contextlib.contextmanager
def captured_logs(loop: SimLoop, history: History) -> Iterator[None]:
    handler = _Notes(loop, history)
    saved = []
    for name in ("baton", "apscheduler"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, logger.handlers[:]))
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        logger.handlers = [handler]
    try:
        yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.setLevel(level)
            logger.propagate = propagate
            logger.handlers = handlers


# -- the node ------------------------------------------------------------------------------------


class _Inert:
    """Metrics that record nothing: any attribute, any call, returns itself."""

    def __getattr__(self, name: str) -> _Inert:
        setattr(self, name, self)  # looked up once, an instance attribute from then on
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return self


class _ObservedElector(Elector):
    """The production elector; its ``_lease`` assignments are reported (the belief "I lead")."""

    def __init__(self, observe: Callable[[Lease | None], None], *args: Any, **kwargs: Any) -> None:
        self._sim_observe = observe
        self._sim_lease: Lease | None = None
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def _lease(self) -> Lease | None:
        return self._sim_lease

    @_lease.setter
    def _lease(self, lease: Lease | None) -> None:
        self._sim_lease = lease
        self._sim_observe(lease)


_FIRE: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar("baton_sim_fire", default=None)


class Parts:
    """One process's node, wired as ``node.app.Node`` wires it."""

    def __init__(self, backend: Any, config: RunConfig, registry: JobRegistry, host: str,
                 monotonic: Callable[[], float], observe: Callable[[Lease | None], None]) -> None:
        self.backend = backend
        holder = Holder(host, f"http://{host}:8000")
        self.elector = _ObservedElector(
            observe, backend, ElectionConfig(LOCK_NAME, holder, config.ttl, config.renew_deadline,
                                             config.retry_period),
            on_started_leading=self._started_leading, on_stopped_leading=self._stopped_leading, clock=monotonic)
        self.gated = GatedScheduler(
            jobs=registry, backend=backend, elector=self.elector, metrics=_Inert(), lock_name=LOCK_NAME,
            node_id=host, timezone=UTC, misfire_grace=config.misfire_grace, claims=True,
            sync_period=config.retry_period, claim_ahead=config.claim_ahead)

    async def _started_leading(self, lease: Lease) -> None:
        await self.gated.on_started_leading(lease)

    def _stopped_leading(self) -> None:
        self.gated.on_stopped_leading()

    async def start(self) -> None:  # Node.start, without metrics series and gc.freeze
        await self.gated.start()
        self.elector.start()

    async def stop(self) -> None:  # Node.stop
        await self.gated.drain()
        await self.elector.stop()
        await self.gated.shutdown()
        await self.backend.close()


class SimNode:
    """One host: its clocks, and the process running on it now (None while it is down)."""

    def __init__(self, loop: SimLoop, index: int, name: str, offset: float, rate: float) -> None:
        self.name = name
        self.clock = HostClock(WALL0, mono0=1000.0 * (index + 1), rate=rate, offset=offset)
        self.time = HostTime(loop, self.clock)
        self.proc: Process | None = None
        self.parts: Parts | None = None
        self.context: contextvars.Context | None = None

    def up(self) -> bool:
        return self.proc is not None and self.proc.state != DEAD

    def believes_it_leads(self) -> bool:
        return self.up() and self.parts is not None and self.parts.elector.current_lease() is not None


def make_store(loop: SimLoop) -> Any:
    """The shared in-memory store, on the server's own (true) clocks."""
    return Store(server_monotonic=lambda: loop._now, server_time=lambda: WALL0 + loop._now)


def client(store: Any) -> Any:
    """A backend client of ``store`` for one process (it reads the sender's clock for lease deadlines)."""
    return MemoryBackendV1(store, caller_monotonic=lambda: _now_clock().monotonic())


def backend_ops(loop: SimLoop) -> list[str]:
    """The round-trip operations of the protocol in force (operation faults are drawn among them)."""
    return FaultyBackend.async_methods(client(make_store(loop)))


class Cluster:
    """The simulated hosts, their processes, and the faults applied to them."""

    def __init__(self, loop: SimLoop, history: History, config: RunConfig) -> None:
        self.loop = loop
        self.history = history
        self.config = config
        self.rng = random.Random(f"baton-sim-cluster-{config.seed}")
        self.store = make_store(loop)
        self.net = Network(loop, random.Random(f"baton-sim-net-{config.seed}"), op_timeout=config.op_timeout,
                           latency=config.latency, apply_as=self._apply_as,
                           on_event=self._on_net_event, observe=self._observe)
        self.nodes = [SimNode(loop, i, h.name, h.offset, h.rate) for i, h in enumerate(config.hosts)]
        self.by_name = {n.name: n for n in self.nodes}
        for n in self.nodes:
            history.hosts[n.name] = {"wall0": n.clock.wall0, "rate": n.clock.rate, "offset": n.clock.offset}
        self._bodies: dict[int, dict[int, asyncio.Task[Any]]] = {}
        self._paused_since: dict[int, float] = {}
        self.registry = JobRegistry()
        for shape in config.jobs:
            self.registry.add(JobSpec(shape.id, self._body(shape), lambda tz, s=shape.period_ms / 1000: every(s, tz),
                                      recover=shape.recover, max_instances=shape.max_instances))

    # -- the store side -----------------------------------------------------------------------

    @staticmethod
    def _apply_as(frozen: Any, apply: Callable[[], Any]) -> Any:
        """Apply a request at the server with the sender's clock as it read when the request left."""
        token = _CLOCK.set(frozen)
        try:
            return apply()
        finally:
            _CLOCK.reset(token)

    def _on_net_event(self, kind: str, host: str, op: str, effect: str, delay: float, label: str) -> None:
        self.history.note(self.loop.now, host, f"{kind}: {op} {effect}" + (f" {delay}s" if delay else ""), "")

    def _observe(self, host: str, op: str, args: tuple[Any, ...], result: Any) -> None:
        if op == "acquire" and result is not None:
            self.history.grant(self.loop.now, result.token, host)

    # -- processes ----------------------------------------------------------------------------

    def boot(self, n: SimNode) -> None:
        """Start a fresh process of the node on host ``n`` (a first start or a restart)."""
        loop, history = self.loop, self.history
        proc = Process(n.name, n.clock)
        proc.pid = history.proc_start(loop.now, n.name)
        ctx = contextvars.Context()
        ctx.run(PROCESS.set, proc)
        ctx.run(_CLOCK.set, n.time)
        pid = proc.pid

        def observe(lease: Lease | None) -> None:
            if lease is None:
                history.lease(loop.now, n.name, pid, None, 0.0)
            else:
                history.lease(loop.now, n.name, pid, lease.token, n.clock.true_from_monotonic(lease.deadline))

        def frozen() -> FrozenTime:
            return FrozenTime(n.clock.monotonic(loop._now), n.clock.wall(loop._now))

        def assemble() -> Parts:
            backend = FaultyBackend(client(self.store), self.net, n.name, frozen)
            parts = Parts(backend, self.config, self.registry, n.name, n.time.monotonic, observe)
            self._observe_fires(parts.gated, proc)
            return parts

        n.proc, n.context = proc, ctx
        n.parts = ctx.run(assemble)
        loop.create_task(n.parts.start(), context=ctx.copy())

    def _observe_fires(self, gated: GatedScheduler, proc: Process) -> None:
        original = gated.fire
        loop, history = self.loop, self.history

        async def fire(job_id: str, scheduled_at: datetime, *, catch_up: bool = False, recovery: bool = False,
                       manual: bool = False) -> str:
            kind = "recovery" if recovery else "manual" if manual else "catch-up" if catch_up else "scheduled"
            fid = history.fire_enter(loop.now, proc.name, proc.pid, job_id, to_us(scheduled_at), kind)
            reset = _FIRE.set((fid, kind))
            outcome = "cancelled"
            try:
                outcome = await original(job_id, scheduled_at, catch_up=catch_up, recovery=recovery, manual=manual)
                return outcome
            except Exception as exc:
                outcome = f"raised {type(exc).__name__}"
                raise
            finally:
                _FIRE.reset(reset)
                if proc.state != DEAD:
                    history.fire_exit(loop.now, fid, outcome)

        gated.fire = fire  # type: ignore[method-assign]

    def _body(self, shape: JobShape) -> Callable[[RunContext], Any]:
        loop, history, bodies = self.loop, self.history, self._bodies

        async def body(run: RunContext) -> None:
            proc = PROCESS.get()
            assert proc is not None
            fid, kind = _FIRE.get() or (None, "?")
            rid = history.start(loop.now, shape.id, to_us(run.scheduled_at), proc.name, proc.pid, run.token,
                                kind, fid)
            mine = bodies.setdefault(proc.pid, {})
            mine[rid] = asyncio.current_task()  # type: ignore[assignment]
            try:
                if shape.body_s > 0:
                    await asyncio.sleep(shape.body_s)
            except asyncio.CancelledError:
                if proc.state != DEAD:
                    history.finish(loop.now, rid, "cancelled")
                raise
            finally:
                mine.pop(rid, None)
            if proc.state != DEAD:
                history.finish(loop.now, rid, "ok")

        return body

    def _end(self, n: SimNode, proc: Process, how: str) -> None:
        if proc.state == DEAD:
            return
        since = self._paused_since.pop(proc.pid, None)
        if since is not None:
            self.history.pause(n.name, proc.pid, since, self.loop.now)
        self.loop.kill(proc)
        self.history.proc_end(self.loop.now, proc.pid, how)
        self._bodies.pop(proc.pid, None)
        if n.proc is proc:
            n.proc = None

    def _later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        self.loop.call_at_true(self.loop.now + delay, callback, *args, context=contextvars.Context())

    def _in(self, n: SimNode, coro_fn: Callable[[], Any]) -> None:
        """Run ``coro_fn()`` as a task of the host's current process."""
        assert n.context is not None
        self.loop.create_task(coro_fn(), context=n.context.copy())

    # -- faults -------------------------------------------------------------------------------------

    def leader(self) -> SimNode | None:
        for n in self.nodes:
            if n.believes_it_leads():
                return n
        return None

    def resolve(self, target: str) -> SimNode | None:
        if target == "leader":
            return self.leader()
        return self.by_name.get(target)

    def apply(self, fault: Fault) -> None:
        now = self.loop.now
        entry: dict[str, Any] = {"t": round(now, 6), **fault.to_dict()}
        if fault.kind == "outage":
            self.net.outage(fault.duration)
            self.history.cut("", now, now + fault.duration)
            self.history.fault(entry)
            return
        n = self.resolve(fault.target)
        if n is None or (not n.up() and fault.kind != "clock_step"):
            entry["skipped"] = "no leader" if fault.target == "leader" else f"{fault.target} is down"
            self.history.fault(entry)
            return
        entry["host"] = n.name
        if n.proc is not None:
            entry["pid"] = n.proc.pid
        self.history.fault(entry)
        getattr(self, f"_fault_{fault.kind}")(n, fault)

    def _fault_pause(self, n: SimNode, fault: Fault) -> None:
        proc = n.proc
        assert proc is not None
        if proc.state == PAUSED:
            return
        self.loop.pause(proc)
        self._paused_since[proc.pid] = self.loop.now
        self._later(fault.duration, self._resume, n, proc)

    def _resume(self, n: SimNode, proc: Process) -> None:
        since = self._paused_since.pop(proc.pid, None)
        if since is None or proc.state != PAUSED:
            return
        self.history.pause(n.name, proc.pid, since, self.loop.now)
        self.loop.resume(proc)

    def _fault_kill(self, n: SimNode, fault: Fault) -> None:
        assert n.proc is not None
        self._end(n, n.proc, "killed")
        self._later(fault.duration, self._restart, n)

    def _restart(self, n: SimNode) -> None:
        if not n.up():
            self.boot(n)

    def _fault_term(self, n: SimNode, fault: Fault) -> None:
        proc, parts = n.proc, n.parts
        assert proc is not None and parts is not None
        uvicorn_delay = 0.1 + self.rng.uniform(0.0, 0.1)

        async def terminate() -> None:
            # NodeServer.handle_exit -> _release: the elector stops (and releases) at once
            releasing = asyncio.ensure_future(parts.elector.stop())
            # uvicorn notices the signal on its next tick, closes connections, then runs the lifespan shutdown
            await asyncio.sleep(uvicorn_delay)
            await parts.stop()
            await releasing
            # asyncio.run ends: what still runs is cancelled, then the process exits
            for task in list(self._bodies.get(proc.pid, {}).values()):
                task.cancel()
            for _ in range(3):
                await asyncio.sleep(0)
            self._end(n, proc, "exited")
            self._later(fault.duration, self._restart, n)

        self._in(n, terminate)

    def _fault_step_down(self, n: SimNode, fault: Fault) -> None:
        parts = n.parts
        assert parts is not None

        async def step_down() -> None:  # POST /admin/leader/step-down on this node
            if not parts.elector.is_leader:
                return
            await parts.gated.drain()
            parts.elector.request_step_down()

        self._in(n, step_down)

    def _fault_run_now(self, n: SimNode, fault: Fault) -> None:
        parts = n.parts
        assert parts is not None

        async def run_now() -> None:  # POST /admin/jobs/{id}/run on the leader
            if not parts.elector.is_leader or fault.job not in parts.gated.jobs:
                return
            now = datetime.fromtimestamp(_now_clock().time(), UTC)
            parts.gated.spawn(parts.gated.fire(fault.job, now, manual=True))

        self._in(n, run_now)

    def _fault_clock_step(self, n: SimNode, fault: Fault) -> None:
        n.clock.offset += fault.delta
        self.history.step(n.name, self.loop.now, fault.delta)

    def _fault_cut(self, n: SimNode, fault: Fault) -> None:
        self.net.cut(n.name, fault.duration)
        self.history.cut(n.name, self.loop.now, self.loop.now + fault.duration)

    def _fault_op(self, n: SimNode, fault: Fault) -> None:
        self.net.arm(n.name, fault.op, fault.effect, fault.duration, OP_FAULT_WINDOW, fault.describe())

    # -- the end --------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Record the end of paused intervals still open."""
        for n in self.nodes:
            proc = n.proc
            if proc is not None:
                since = self._paused_since.pop(proc.pid, None)
                if since is not None:
                    self.history.pause(n.name, proc.pid, since, self.loop.now)
