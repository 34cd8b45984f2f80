"""How a simulated node is made of the production classes, and everything else that knows their insides.

This is the one module of the simulator that depends on the node core and
the lock backend protocol:

* Clocks. Production code reads time only through ``lock_backends.clock``,
  whose clock is a context variable: every task of a simulated process runs
  with its host's clocks in force (``HostTime``), and a request applied at
  the store with the sender's clocks as they read when it left
  (``FrozenTime``). APScheduler reads ``datetime.now`` itself, in
  ``apscheduler.schedulers.base``: for the simulation only, that module
  global points at a shim reading the same context clock (``patched_clocks``).
* The store: ``lock_backends.memory`` (the reference semantics the contract
  suite holds to the real servers' rules), on the store's own true clocks,
  one ``MemoryBackend`` client per process behind ``FaultyBackend``.
* ``SimulatedNode``: ``node.app.Node`` wired as ``Node.__init__`` wires it
  (``SkewMonitor``, ``Elector`` with ``eligible=`` the skew guard,
  ``GatedScheduler``), with the host's monotonic clock and a seeded ``rng``
  for the elector, metrics that record nothing (``SimMetrics``) and without
  ``InstrumentedBackend`` (it only times operations for those metrics); its
  ``hand_over``, ``step_down`` and ``stop`` are ``Node``'s own. SIGTERM is what ``node.__main__.NodeServer`` does
  (``hand_over()`` at once, ``Node.stop()`` after uvicorn's tick), the
  step-down and manual-run faults what their HTTP routes do.
* What is observed, without changing behaviour: the lease each elector holds
  (a subclass whose ``_lease`` attribute reports its assignments), every fire
  time handed to ``GatedScheduler.fire`` (an instance attribute wrapping the
  method), what the store answers (tokens granted, claim windows, hand-backs,
  at the store), and the job bodies, which are the simulator's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import apscheduler.executors.base as aps_executors
import apscheduler.schedulers.base as aps_schedulers

from loadtest.sim.history import WALL0, History
from loadtest.sim.loop import DEAD, PAUSED, PROCESS, HostClock, Process, SimLoop
from loadtest.sim.net import FaultyBackend, Network
from loadtest.sim.scenario import STORE_KINDS, Fault, JobShape, RunConfig
from lock_backends import Holder, Lease, Window, memory
from lock_backends import clock as clocks
from lock_backends.clock import to_us
from lock_backends.url import BackendOptions
from node.app import Node
from node.election import ElectionConfig, Elector
from node.forward import Forwarder
from node.jobs import JobRegistry, JobSpec, RunContext, every
from node.outcomes import RunKind, RunOutcome
from node.scheduler import GatedScheduler
from node.skew import SkewMonitor

LOCK_NAME = "baton"
#: The context variable ``lock_backends.clock`` reads (``clock.using`` sets it for a block).
_CLOCK = clocks._current
#: How long an armed operation fault waits for its call.
OP_FAULT_WINDOW = 3.0
#: How the history names the kinds of runs (``node.outcomes.RunKind``).
KIND_NAMES = {RunKind.SCHEDULED: "scheduled", RunKind.CATCH_UP: "catch-up", RunKind.RECOVERY: "recovery",
              RunKind.MANUAL: "manual"}


# -- clocks --------------------------------------------------------------------------------------


class HostTime:
    """A host's clocks, read now (the loop's true time): a ``lock_backends.clock.Clock``."""

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
    """A sender's clocks as read when its request left (what the store-side code of a request sees)."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, mono: float, wall: float) -> None:
        self._mono = mono
        self._wall = wall

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall


class _DateTimeShim(datetime):
    """Stands in for ``datetime.datetime`` in APScheduler's modules: ``now()`` reads the context's clock."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return datetime.fromtimestamp(clocks.time(), tz)


_PATCHES = ((aps_schedulers, "datetime", _DateTimeShim), (aps_executors, "datetime", _DateTimeShim))


@contextlib.contextmanager
def patched_clocks(loop: SimLoop) -> Iterator[None]:
    """The simulation's clocks for the block: true time by default, APScheduler's ``now`` on the context clock."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in _PATCHES]
    for module, name, shim in _PATCHES:
        setattr(module, name, shim)
    try:
        with clocks.using(HostTime(loop, HostClock(WALL0))):
            yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


class _Notes(logging.Handler):
    """Warnings the node code logs, into the history's notes (the event table shows them)."""

    def __init__(self, loop: SimLoop, history: History) -> None:
        super().__init__(logging.WARNING)
        self.loop = loop
        self.history = history

    def emit(self, record: logging.LogRecord) -> None:
        proc = PROCESS.get()
        job = getattr(record, "job", "") or ""
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None and not text.endswith(str(record.exc_info[1])):
            text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        for attr in ("key", "detail"):
            value = getattr(record, attr, None)
            if value:
                text += f" [{value}]"
        if not job and getattr(record, "key", None):
            job = str(getattr(record, "key", "")).partition("@")[0]
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
    """A metric that records nothing: every method returns itself."""

    __slots__ = ()

    def __getattr__(self, name: str) -> _Inert:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return self


_INERT = _Inert()


class SimMetrics:
    """``node.metrics.Metrics``'s interface, recording nothing (a test keeps the two alike).

    The real class builds a Prometheus registry with a process collector per
    node, and locks on every observation: a cost per simulated process and
    per run that would buy the simulation nothing.
    """

    runs: Any  # node.metrics.RunSeries; set with the other families below

    FAMILIES = ("is_leader", "transitions", "lease_token", "runs", "lock_ops", "lock_op_seconds", "records_dropped",
                "clock_skew", "api_reads_rejected")

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.registry = None
        for name in self.FAMILIES:
            setattr(self, name, _INERT)

    def lock_op(self, op: str, result: str, seconds: float) -> None:
        pass


class _ObservedElector(Elector):
    """The production elector; its ``_lease`` assignments are reported (the belief "I lead")."""

    def __init__(self, observe: Callable[[Lease | None], None], *args: Any, **kwargs: Any) -> None:
        self._sim_observe = observe
        self._sim_lease: Lease | None = None
        super().__init__(*args, **kwargs)

    @property
    def _lease(self) -> Lease | None:
        return self._sim_lease

    @_lease.setter
    def _lease(self, lease: Lease | None) -> None:
        self._sim_lease = lease
        self._sim_observe(lease)


#: The fire (its id in the history) whose gate call is running in this task: the body links its run to it.
_FIRE: contextvars.ContextVar[int | None] = contextvars.ContextVar("baton_sim_fire", default=None)


class SimulatedNode(Node):
    """``node.app.Node`` without HTTP: its parts wired as ``Node.__init__`` wires them, its own stop paths.

    ``hand_over``, ``step_down`` and ``stop`` are inherited unchanged; only the
    construction (a given backend, the host's clock, a seeded ``rng``, inert
    metrics, no probes) and ``start`` (no HTTP client, no metric series, no
    collector policy: ``node.gc_policy``) differ.
    """

    def __init__(self, backend: Any, config: RunConfig, registry: JobRegistry, host: str,
                 monotonic: Callable[[], float], rng: random.Random,
                 observe: Callable[[Lease | None], None]) -> None:
        self.metrics = SimMetrics(backend.kind)  # type: ignore[assignment]
        # Node wraps its backend in InstrumentedBackend, which only times each operation for the metrics (it
        # passes every answer and exception through): with inert metrics it would cost a coroutine per call
        self.backend = backend
        self.holder = Holder(host, f"http://{host}:8000")
        self.skew = SkewMonitor(self.backend, self.metrics, max_skew=config.max_clock_skew,
                                period=max(1.0, config.retry_period * 5))
        self.elector = _ObservedElector(
            observe, self.backend,
            ElectionConfig(LOCK_NAME, self.holder, config.ttl, config.renew_deadline, config.retry_period),
            on_started_leading=self._started_leading, on_stopped_leading=self._stopped_leading,
            clock=monotonic, rng=rng, eligible=self.skew.refusal)
        self.scheduler = GatedScheduler(
            jobs=registry, backend=self.backend, elector=self.elector, metrics=self.metrics,
            lock_name=LOCK_NAME, node_id=host, timezone=UTC, misfire_grace=config.misfire_grace,
            sync_period=config.retry_period, claim_ahead=config.claim_ahead,
            shutdown_grace=config.shutdown_grace, sync_workers=1)
        self._http = None
        self._handing_over = None
        self._gc_held = False  # the simulator's nodes leave the process's collector alone (node.gc_policy)
        self.forwarder = Forwarder(self.holder.url, (), timeout=1.0)  # no peers: never opens a connection
        #: Set once ``start`` returned (uvicorn's ``started``: a SIGTERM before it hands nothing over).
        self.started = asyncio.Event()
        #: A SIGTERM arrived (uvicorn is shutting down: a second one changes nothing).
        self.terminating = False

    async def start(self) -> None:  # Node.start, without the HTTP client, metric series and gc_policy
        await self.scheduler.start()
        self.skew.start()
        await self.skew.wait_first(self.backend.options.op_timeout * 4)
        self.elector.start()
        self.started.set()


class SimHost:
    """One host: its clocks, and the process running on it now (None while it is down)."""

    def __init__(self, loop: SimLoop, index: int, name: str, offset: float, rate: float) -> None:
        self.name = name
        self.clock = HostClock(WALL0, mono0=1000.0 * (index + 1), rate=rate, offset=offset)
        self.time = HostTime(loop, self.clock)
        self.proc: Process | None = None
        self.node: SimulatedNode | None = None
        self.context: contextvars.Context | None = None

    def up(self) -> bool:
        return self.proc is not None and self.proc.state != DEAD

    def believes_it_leads(self) -> bool:
        return self.up() and self.node is not None and self.node.elector.current_lease() is not None


def make_store(loop: SimLoop) -> memory.MemoryStore:
    """A fresh in-memory store on the store's own (true) clocks (made directly: no registry entry outlives the run)."""
    return memory.MemoryStore(f"sim-{id(loop):x}", HostTime(loop, HostClock(WALL0)))


#: The store client's class (``loadtest.sim.broken`` puts one with a hole of #12 in its place, for a test).
BACKEND: type[memory.MemoryBackend] = memory.MemoryBackend


def client(store: memory.MemoryStore, config: RunConfig | None = None) -> memory.MemoryBackend:
    """One process's client of ``store`` (``closed`` is per client), with the run's operation timeout."""
    return BACKEND(store, BackendOptions(op_timeout=config.op_timeout if config else 0.5))


def backend_ops(loop: SimLoop) -> list[str]:
    """The round-trip operations of the protocol (operation faults are drawn among them)."""
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
        self.nodes = [SimHost(loop, i, h.name, h.offset, h.rate) for i, h in enumerate(config.hosts)]
        self.by_name = {n.name: n for n in self.nodes}
        for n in self.nodes:
            history.hosts[n.name] = {"wall0": n.clock.wall0, "rate": n.clock.rate, "offset": n.clock.offset}
        self._bodies: dict[int, dict[int, asyncio.Task[Any]]] = {}
        self._paused_since: dict[int, float] = {}
        #: Fault tasks that died of an exception (``_in``): each makes the run a simulator error.
        self.task_errors: list[str] = []
        self.registry = JobRegistry()
        for shape in config.jobs:
            self.registry.add(JobSpec(shape.id, self._body(shape), functools.partial(every, shape.period_ms / 1000),
                                      recover=shape.recover, max_instances=shape.max_instances))

    # -- the store side -----------------------------------------------------------------------

    @staticmethod
    def _apply_as(frozen: Any, apply: Callable[[], Any]) -> Any:
        """Apply a request at the store with the sender's clocks as they read when the request left."""
        token = _CLOCK.set(frozen)  # clocks.using(frozen), without a generator per request
        try:
            return apply()
        finally:
            _CLOCK.reset(token)

    def _on_net_event(self, kind: str, host: str, op: str, effect: str, delay: float, label: str) -> None:
        self.history.note(self.loop.now, host, f"{kind}: {op} {effect}" + (f" {delay}s" if delay else ""), "")

    def _observe(self, host: str, op: str, args: tuple[Any, ...], result: Any, sent: float) -> None:
        """What the store answered (at the store, whether or not the answer reaches the caller)."""
        if op == "acquire":
            if result is not None:
                self.history.grant(self.loop.now, result.token, host)
        elif op in ("claim_window", "hand_back") and isinstance(result, Window):
            hand_back = op == "hand_back"
            self.history.window(self.loop.now, host, op, args[0].token, result.token, result.since_us,
                                result.until_us, result.sealed, args[1] if hand_back else None,
                                [b.key for b in args[2]] if hand_back and len(args) > 2 else [], sent)

    def _answered(self, host: str, pid: int) -> Callable[[str, tuple[Any, ...], Any], None]:
        """What reached the process: the busy runs of each claim mark it was answered (its ``max_instances`` view)."""
        loop, history = self.loop, self.history

        def answered(op: str, args: tuple[Any, ...], result: Any) -> None:
            if op in ("claim_window", "hand_back") and isinstance(result, Window):
                history.view(loop.now, host, pid, args[0].token,
                             [(b.key, b.job_id, b.node_id, b.token, b.until_us) for b in result.busy],
                             result.until_us if result.token == args[0].token else 0)

        return answered

    # -- processes ----------------------------------------------------------------------------

    def boot(self, n: SimHost) -> None:
        """Start a fresh process of the node on host ``n`` (a first start or a restart)."""
        loop, history = self.loop, self.history
        proc = Process(n.name, n.clock)
        proc.pid = history.proc_start(loop.now, n.name)
        ctx = contextvars.Context()
        ctx.run(PROCESS.set, proc)
        ctx.run(_CLOCK.set, n.time)  # every task of the process reads its host's clocks
        pid = proc.pid

        def observe(lease: Lease | None) -> None:
            if lease is None:
                history.lease(loop.now, n.name, pid, None, 0.0)
            else:
                history.lease(loop.now, n.name, pid, lease.token, n.clock.true_from_monotonic(lease.deadline))

        def frozen() -> FrozenTime:
            return FrozenTime(n.clock.monotonic(loop._now), n.clock.wall(loop._now))

        def assemble() -> SimulatedNode:
            backend = FaultyBackend(client(self.store, self.config), self.net, n.name, frozen,
                                    self._answered(n.name, pid))
            rng = random.Random(f"baton-sim-elector-{self.config.seed}-{pid}")
            node = SimulatedNode(backend, self.config, self.registry, n.name, n.time.monotonic, rng, observe)
            self._observe_fires(node.scheduler, proc)
            return node

        n.proc, n.context = proc, ctx
        n.node = ctx.run(assemble)
        loop.create_task(n.node.start(), context=ctx.copy())

    def _observe_fires(self, gated: GatedScheduler, proc: Process) -> None:
        original = gated.fire
        loop, history = self.loop, self.history

        async def fire(job_id: str, scheduled_at: datetime, kind: RunKind = RunKind.SCHEDULED, *,
                       force: bool = False) -> RunOutcome:
            fid = history.fire_enter(loop.now, proc.name, proc.pid, job_id, to_us(scheduled_at), KIND_NAMES[kind])
            reset = _FIRE.set(fid)
            outcome: RunOutcome | str = "cancelled"
            try:
                result = await original(job_id, scheduled_at, kind, force=force)
                outcome = result
                return result
            except Exception as exc:
                outcome = f"raised {type(exc).__name__}"
                raise
            finally:
                _FIRE.reset(reset)
                if proc.state != DEAD:
                    history.fire_exit(loop.now, fid, str(outcome))

        gated.fire = fire  # type: ignore[method-assign]

    def _body(self, shape: JobShape) -> Callable[[RunContext], Any]:
        loop, history, bodies = self.loop, self.history, self._bodies

        async def body(run: RunContext) -> None:
            proc = PROCESS.get()
            assert proc is not None
            rid = history.start(loop.now, shape.id, to_us(run.scheduled_at), proc.name, proc.pid, run.token,
                                KIND_NAMES[run.kind], _FIRE.get(), run.key)
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

    def _end(self, n: SimHost, proc: Process, how: str) -> None:
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

    def _in(self, n: SimHost, coro_fn: Callable[[], Any]) -> None:
        """Run ``coro_fn()`` as a task of the host's current process.

        A fault's task that dies of an exception is a simulator error, never
        silence: a fault whose task died half-way would leave its host's
        process up forever and its later faults unapplied. What the node's own
        API raises is not that: ``_api_call`` records it for ``raised``.
        """
        assert n.context is not None
        task = self.loop.create_task(coro_fn(), context=n.context.copy())
        task.add_done_callback(self._fault_task_done)

    def _fault_task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            name = getattr(task.get_coro(), "__qualname__", "a task")
            self.task_errors.append(f"{type(exc).__name__} in {name}: {exc}")

    # -- faults -------------------------------------------------------------------------------------

    def leader(self) -> SimHost | None:
        for n in self.nodes:
            if n.believes_it_leads():
                return n
        return None

    def resolve(self, target: str) -> SimHost | None:
        if target == "leader":
            return self.leader()
        return self.by_name.get(target)

    def apply(self, fault: Fault) -> None:
        now = self.loop.now
        entry: dict[str, Any] = {"t": round(now, 6), **fault.to_dict()}
        if fault.kind in STORE_KINDS:
            self.net.outage(fault.duration)
            self.history.cut("", now, now + fault.duration)
            self.history.fault(entry)
            if fault.kind == "restart":
                self._drop_leases()
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

    def _drop_leases(self) -> None:
        """A store restart that ends every lease, as PostgreSQL's does (a session advisory lock ends with its
        session): the holder learns it at its next renewal, when it is refused. What the store wrote stays:
        tokens, claim marks, run records."""
        for state in self.store.locks.values():
            if state.holder is not None:
                state.holder, state.expires = None, 0.0
                self.store.notify(state)

    def _fault_pause(self, n: SimHost, fault: Fault) -> None:
        proc = n.proc
        assert proc is not None
        if proc.state == PAUSED:
            return
        self.loop.pause(proc)
        self._paused_since[proc.pid] = self.loop.now
        self._later(fault.duration, self._resume, n, proc)

    def _resume(self, n: SimHost, proc: Process) -> None:
        since = self._paused_since.pop(proc.pid, None)
        if since is None or proc.state != PAUSED:
            return
        self.history.pause(n.name, proc.pid, since, self.loop.now)
        self.loop.resume(proc)

    def _fault_kill(self, n: SimHost, fault: Fault) -> None:
        assert n.proc is not None
        self._end(n, n.proc, "killed")
        self._later(fault.duration, self._restart, n)

    def _restart(self, n: SimHost) -> None:
        if not n.up():
            self.boot(n)

    def _fault_term(self, n: SimHost, fault: Fault) -> None:
        proc, node = n.proc, n.node
        assert proc is not None and node is not None
        if node.terminating:
            return  # a second SIGTERM: uvicorn is already shutting down
        node.terminating = True
        uvicorn_delay = 0.1 + self.rng.uniform(0.0, 0.1)

        async def terminate() -> None:
            # NodeServer.handle_exit -> _release: once serving, the node hands over at once
            if node.started.is_set():
                node.hand_over()
            # uvicorn notices the signal on its next tick (after its startup), closes connections,
            # then runs the lifespan shutdown: Node.stop
            await node.started.wait()
            await asyncio.sleep(uvicorn_delay)
            await self._api_call(n, "Node.stop", node.stop)  # uvicorn logs what it raised, and exits all the same
            # asyncio.run ends: what still runs is cancelled, then the process exits
            for task in list(self._bodies.get(proc.pid, {}).values()):
                task.cancel()
            for _ in range(3):
                await asyncio.sleep(0)
            self._end(n, proc, "exited")
            self._later(fault.duration, self._restart, n)

        self._in(n, terminate)
        if fault.kill_after:
            self._later(fault.kill_after, self._kill_in_grace, n, proc, fault)

    def _kill_in_grace(self, n: SimHost, proc: Process, fault: Fault) -> None:
        """The orchestrator's grace ran out before the node had stopped: SIGKILL, then a restart as for the
        SIGTERM. Nothing if the process has exited meanwhile."""
        if proc.state == DEAD:
            return
        self.history.fault({"t": round(self.loop.now, 6), "kind": "kill_in_grace", "host": n.name, "pid": proc.pid,
                            "after_term": fault.kill_after})
        self._end(n, proc, "killed")
        self._later(fault.duration, self._restart, n)

    def _fault_step_down(self, n: SimHost, fault: Fault) -> None:
        node = n.node
        assert node is not None
        # POST /admin/leader/step-down on this node (a follower: nothing)
        self._in(n, lambda: self._api_call(n, "Node.step_down", node.step_down))

    async def _api_call(self, n: SimHost, what: str, call: Callable[[], Awaitable[Any]]) -> None:
        """A call into the node's API, as a route or a signal handler makes it: what it raises is the node's
        failure (an HTTP 500, a shutdown that ends on a traceback), recorded for ``raised``, not a simulator
        error."""
        proc = n.proc
        assert proc is not None
        try:
            await call()
        except Exception as exc:
            self.history.call(self.loop.now, n.name, proc.pid, what, f"{type(exc).__name__}: {exc}")
        else:
            self.history.call(self.loop.now, n.name, proc.pid, what)

    def _fault_run_now(self, n: SimHost, fault: Fault) -> None:
        node = n.node
        assert node is not None

        async def run_now() -> None:  # POST /admin/jobs/{id}/run on the leader (a follower redirects)
            if not node.elector.is_leader or fault.job not in node.scheduler.jobs:
                return
            node.scheduler.spawn(node.scheduler.fire(fault.job, clocks.utcnow(), RunKind.MANUAL))

        self._in(n, run_now)

    def _fault_clock_step(self, n: SimHost, fault: Fault) -> None:
        n.clock.offset += fault.delta
        self.history.step(n.name, self.loop.now, fault.delta)

    def _fault_cut(self, n: SimHost, fault: Fault) -> None:
        self.net.cut(n.name, fault.duration)
        self.history.cut(n.name, self.loop.now, self.loop.now + fault.duration)

    def _fault_op(self, n: SimHost, fault: Fault) -> None:
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
