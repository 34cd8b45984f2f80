"""One simulated run: a scenario (config and fault schedule) in, a history and its verdict out."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from loadtest.sim import cluster
from loadtest.sim.history import History
from loadtest.sim.invariants import Checked, check
from loadtest.sim.loop import Deadlock, SimLoop
from loadtest.sim.scenario import RunConfig, Scenario, random_faults

#: A run that needs more loop iterations than this is stopped as a harness failure (something spins).
MAX_ITERATIONS = 2_000_000


class RunawayLoop(RuntimeError):
    """The run's loop kept iterating without virtual time getting anywhere."""


@dataclass
class RunResult:
    scenario: Scenario
    history: History
    checked: Checked
    #: a failure of the simulator itself (not of the code under test): deadlock, runaway loop, a crash
    error: str | None = None
    iterations: int = 0
    cpu_s: float = 0.0
    loop_errors: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.scenario.config.seed

    @property
    def ok(self) -> bool:
        return self.error is None and not self.checked.violations


def scenario_for_seed(seed: int, **overrides: Any) -> Scenario:
    config = RunConfig.from_seed(seed, **overrides)
    loop = SimLoop()
    try:
        ops = cluster.backend_ops(loop)
    finally:
        loop.close()
    return Scenario(config, random_faults(config, ops), name=f"seed {seed}",
                    replay=f"python -m loadtest sim --seed {seed}")


async def _drive(sim: cluster.Cluster, scenario: Scenario) -> None:
    loop = asyncio.get_running_loop()
    for n in sim.nodes:  # staggered by a few ms, as processes never start in the same instant
        await asyncio.sleep(sim.rng.uniform(0.0, 0.02))
        sim.boot(n)
    for fault in scenario.faults:
        if fault.at > loop.time():
            await asyncio.sleep(fault.at - loop.time())
        sim.apply(fault)
    end = scenario.duration()
    while loop.time() < end:
        await asyncio.sleep(min(1.0, end - loop.time()))
        if loop.iterations > MAX_ITERATIONS:  # type: ignore[attr-defined]
            raise RunawayLoop(f"more than {MAX_ITERATIONS} loop iterations by t={loop.time():.3f}")


def run_scenario(scenario: Scenario) -> RunResult:
    config = scenario.config
    t0 = time.process_time()
    random.seed(config.seed)  # nothing should draw from the global generator (electors get their own): in case
    loop = SimLoop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(str(ctx.get("message"))))
    history = History()
    error = None
    gc_was = gc.isenabled()
    gc.disable()  # collection at arbitrary points would close dead processes' coroutines mid-run
    try:
        with cluster.patched_clocks(loop), cluster.captured_logs(loop, history):
            sim = cluster.Cluster(loop, history, config)
            try:
                loop.run_until_complete(_drive(sim, scenario))
            except (Deadlock, RunawayLoop) as exc:
                error = f"{type(exc).__name__}: {exc}"
            sim.finish()
            if error is None and sim.task_errors:
                error = "a fault's task failed: " + sim.task_errors[0]
            history.freeze(loop.now)
            _close_tasks(loop)
    except Exception as exc:  # a bug of the simulator: reported, never taken for a verdict
        history.freeze(loop.now)
        error = f"{type(exc).__name__}: {exc}"
    finally:
        loop.close()
        if gc_was:
            gc.enable()
    checked = check(history, scenario)
    return RunResult(scenario, history, checked, error, loop.iterations, time.process_time() - t0, loop_errors)


def _close_tasks(loop: SimLoop) -> None:
    """Close every coroutine still suspended, while the clocks are still the simulation's.

    Their ``finally`` blocks run now, into a frozen history, instead of
    whenever the garbage collector reaches them (in some later run).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # coroutines of tasks that never got to run
        for task in asyncio.all_tasks(loop):
            with contextlib.suppress(BaseException):  # an await in a finally block of a closed coroutine
                task.get_coro().close()


def run_seed(seed: int) -> RunResult:
    return run_scenario(scenario_for_seed(seed))
