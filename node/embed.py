"""Baton inside an application of one's own, wired the way APScheduler guides wire a scheduler into FastAPI.

    baton = Baton(Settings(lock_url="etcd://10.0.0.9:2379", node_id="web-1"), jobs)
    app = FastAPI(lifespan=baton.lifespan)          # or enter baton.lifespan(app) inside your own
    app.include_router(baton.router, prefix="/baton")

Promised:

* ``lifespan`` starts the node (it campaigns for the lease) before the app
  serves, and at shutdown hands over and stops it: running bodies get
  ``BATON_SHUTDOWN_GRACE``, the lease is released, the next leader takes over
  without waiting out the TTL.
* The handoff starts the moment SIGTERM or SIGINT arrives, as with
  ``python -m node``: at startup the lifespan chains the process's handlers
  (the server's own, uvicorn's under ``uvicorn myapp:app``, still runs right
  after) and restores them at shutdown. Signal handlers can only be set from
  the main thread; elsewhere, or with ``handle_signals=False``, the handoff
  starts when the server runs the lifespan's shutdown.
* ``router`` carries every route of ``python -m node``'s API (status, jobs,
  runs, metrics, the admin routes behind ``BATON_ADMIN_TOKEN``), under
  whatever prefix it is included with. Every path under ``<prefix>/admin`` is
  the router's: an unknown one answers 401/403 before 404, so the app's
  ``redirect_slashes`` never turns an admin path into a redirect. (Give your
  app ``redirect_slashes=False`` too: Starlette builds that redirect from the
  request's ``Host`` header, for any path.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

from fastapi import APIRouter, FastAPI

from node import logs
from node.app import Node, build_router
from node.config import ConfigError, Settings, load
from node.jobs import JobRegistry

log = logging.getLogger("baton.embed")

#: The signals a server stops on.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Baton:
    """One Baton node inside a FastAPI app: its ``lifespan`` and its ``router``.

    ``settings`` default to the ``BATON_*`` environment; ``jobs`` default to
    ``BATON_JOBS`` (or the demo jobs, as for ``python -m node``).
    """

    def __init__(self, settings: Settings | None = None, jobs: JobRegistry | None = None, *,
                 handle_signals: bool = True) -> None:
        self.settings = settings if settings is not None else load()
        self.node = Node(self.settings, jobs)
        self.handle_signals = handle_signals
        self._router: APIRouter | None = None
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False

    @classmethod
    def from_environment(cls) -> Baton:
        """The node ``uvicorn --factory node.app:create_app`` runs: a bad setting exits 2 with one line."""
        try:
            baton = cls(load())
        except ConfigError as exc:
            print(f"baton: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        logs.setup(baton.settings.log_level, baton.settings.log_format, baton.node.context)
        return baton

    @property
    def router(self) -> APIRouter:
        if self._router is None:
            self._router = build_router(self.node)
        return self._router

    def app(self) -> FastAPI:
        """A FastAPI app of this node alone (what ``python -m node`` serves, with the signal chaining)."""
        app = FastAPI(title="Baton node", version="0.1.0", lifespan=self.lifespan, redirect_slashes=False,
                      description="One member of a Baton cluster: leader-gated APScheduler with fenced claims.")
        app.state.node = self.node
        app.include_router(self.router)
        return app

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Start the node; at exit hand over and stop it. Pass to ``FastAPI(lifespan=...)`` or enter it in yours."""
        self._loop = asyncio.get_running_loop()
        if self.handle_signals:
            self._chain_signals()
        try:
            await self.node.start()
            self._serving = True
            yield
        finally:
            self._serving = False
            self._restore_signals()
            await self.node.stop()

    # -- signals -------------------------------------------------------------------------

    def _chain_signals(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the server's own shutdown starts the handoff
                log.debug("not chaining %s: not in the main thread", signal.Signals(sig).name)
                return

    def _restore_signals(self) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError):
                if signal.getsignal(sig) == self._on_signal:  # unless someone chained on top of us since
                    signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._hand_over)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL and loop is not None:  # nobody else listens: stop after the handoff
            loop.call_soon_threadsafe(self._then_default, signum)

    def _hand_over(self) -> None:
        if self._serving:
            self.node.hand_over()

    def _then_default(self, signum: int) -> None:
        def default(_: Any = None) -> None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        if self._serving:
            self.node.hand_over().add_done_callback(default)
        else:
            default()
