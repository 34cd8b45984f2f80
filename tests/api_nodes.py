"""In-process nodes for the HTTP API's hardening tests (#17): settings, start/stop, clients, a host router.

The nodes are real (backend, elector, scheduler); only HTTP between them and
the test is in process (``httpx.ASGITransport``), except where a test serves
them on a socket itself.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import SecretStr

from node.app import Node, create_app
from node.config import Settings
from node.jobs import JobRegistry, RunContext
from tests.conftest import eventually

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Lease timing: short, but with room for a shared two-core machine.
TIMING: dict[str, Any] = {"lease_ttl": 3.0, "renew_deadline": 2.0, "retry_period": 0.3}


def tick_jobs() -> JobRegistry:
    """One job that fires every second and does nothing: the leader claims and records while tests run."""
    jobs = JobRegistry()

    @jobs.interval("tick", seconds=1)
    async def tick(run: RunContext) -> None:
        return None

    return jobs


def lock_name() -> str:
    return f"api-{uuid.uuid4().hex[:8]}"


def make_node(lock_url: str, node_id: str, name: str, *, peers: tuple[str, ...] = (),
              jobs: JobRegistry | None = None, **kw: Any) -> Node:
    settings = Settings(node_id=node_id, lock_url=lock_url, lock_name=name, admin_token=SecretStr(TOKEN),
                        advertise_url=f"http://{node_id}:8000", demo_jobs=False, peers=peers, **{**TIMING, **kw})
    return Node(settings, jobs if jobs is not None else tick_jobs())


@contextlib.asynccontextmanager
async def running(*nodes: Node, first_leads: bool = True) -> AsyncIterator[tuple[Node, ...]]:
    """Start the nodes in order (the first one leads before the others start); stop them all at the end."""
    try:
        for node in nodes:
            await node.start()
            if node is nodes[0] and first_leads:
                await until_leader(node)
        yield nodes
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                await node.stop()


async def until_leader(node: Node, within: float = 15.0) -> None:
    async def leads() -> bool | None:
        return True if node.elector.is_leader else None
    await eventually(f"{node.settings.node_id} leads", leads, within=within)


def client(app: FastAPI, host: str = "node") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}", timeout=30)


class Hosts(httpx.AsyncBaseTransport):
    """Routes each request to the in-process app of its ``host:port``; records every request it was given.

    A host it does not know cannot be reached (``httpx.ConnectError``), as on a network.
    """

    def __init__(self, apps: dict[str, FastAPI] | None = None) -> None:
        self.transports = {host: httpx.ASGITransport(app=app) for host, app in (apps or {}).items()}
        self.seen: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        transport = self.transports.get(request.url.netloc.decode())
        if transport is None:
            raise httpx.ConnectError(f"cannot reach {request.url.netloc.decode()}", request=request)
        return await transport.handle_async_request(request)


def apps(*nodes: Node) -> dict[str, FastAPI]:
    """Each node's app, by the ``host:port`` of its advertised URL."""
    return {node.settings.advertise_url.removeprefix("http://"): create_app(node) for node in nodes}
