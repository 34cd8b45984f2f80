"""Garbage in the store's settings never becomes a 500, nor a leader lost (#17.3, the node's side).

The store's shared settings (the paused set, stored jobs) are garbled under
two running nodes: on the in-memory backend (its settings raise the typed
``CorruptValue``, as every real backend's do) and on the file backend (``[1]``
written into ``<dir>/<lock name>/settings.json``, what a hand edit might
leave). Then every route is asked, with and without the token, on the leader
and on a follower: no 500; what needs the settings is a 503 whose message
names the key to repair and shows no secret; a follower's ``GET /jobs``
answers with the last good paused set and says so in ``X-Baton-Stale``; the
leader keeps its lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from lock_backends import CorruptValue, memory
from node.app import STALE_HEADER, Node, create_app
from tests.api_nodes import AUTH, TOKEN, client, make_node, running
from tests.conftest import eventually

NAME = "garbled"


class GarbledMemory(memory.MemoryBackend):
    """The in-memory store, whose settings (once ``garbled``) hold a value that does not decode."""

    garbled = False

    def corrupt(self) -> CorruptValue:
        return CorruptValue("settings are not an object of strings", key=f"{self.store.name}/{NAME}/settings",
                            backend=self.kind, address=self.address)

    async def settings(self, name: str) -> dict[str, str]:
        await self._op()
        if GarbledMemory.garbled:
            raise self.corrupt()
        return await super().settings(name)

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        await self._op()
        if GarbledMemory.garbled:  # as the real backends: garbage is refused, never overwritten as empty
            raise self.corrupt()
        await super().set_setting(name, key, value)


class Garbler:
    """Builds the two nodes on one store and garbles its settings; ``key`` is what a message must name."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.store = f"garble-{uuid.uuid4().hex[:8]}"
        self.lock_url = (f"memory://{self.store}?timeout=0.5" if kind == "memory"
                         else f"file://{tmp_path / 'locks'}?timeout=0.5")
        self.settings_file = tmp_path / "locks" / quote(NAME, safe="") / "settings.json"
        self.key = f"{self.store}/{NAME}/settings" if kind == "memory" else str(self.settings_file)

    def node(self, node_id: str) -> Node:
        made = make_node(self.lock_url, node_id, NAME, peers=("http://a:8000", "http://b:8000"))
        if self.kind == "memory":
            inner = made.backend.inner
            made.backend.inner = GarbledMemory(memory.store(self.store), inner.options)
        return made

    def garble(self) -> None:
        if self.kind == "memory":
            GarbledMemory.garbled = True
        else:
            self.settings_file.write_text("[1]")


@pytest.fixture(params=["memory", "file"])
def garbler(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Garbler]:
    made = Garbler(request.param, tmp_path)
    yield made
    GarbledMemory.garbled = False
    memory.drop_store(made.store)


#: Every route, as (method, path, body); each is asked with and without the token.
CALLS: list[tuple[str, str, object]] = [
    ("GET", "/healthz", None), ("GET", "/readyz", None), ("GET", "/status", None), ("GET", "/metrics", None),
    ("GET", "/jobs", None), ("GET", "/jobs/tick", None), ("GET", "/jobs/stored-1", None),
    ("GET", "/runs", None), ("GET", "/runs?job=tick&outcome=ok&limit=3", None),
    ("POST", "/admin/jobs/tick/pause", None), ("POST", "/admin/jobs/tick/resume", None),
    ("POST", "/admin/jobs/stored-1/pause", None),
    ("POST", "/admin/jobs", {"id": "stored-1", "func": "tests.stored_targets:sync_tenant", "args": [1],
                             "trigger": "interval", "minutes": 5}),
    ("PUT", "/admin/jobs/stored-1", {"id": "stored-1", "func": "tests.stored_targets:sync_tenant", "args": [1],
                                     "trigger": "interval", "minutes": 5}),
    ("DELETE", "/admin/jobs/stored-1", None),
    ("POST", "/admin/jobs/tick/run?force=true", None),
]


async def test_garbage_in_the_settings_is_never_a_500_and_a_follower_shows_the_last_good_pauses(
        garbler: Garbler) -> None:
    a, b = garbler.node("a"), garbler.node("b")
    async with running(a, b), client(create_app(a)) as leader, client(create_app(b)) as follower:
        assert (await follower.post("/admin/jobs/tick/pause", headers=AUTH)).status_code == 200

        async def leader_knows() -> bool | None:
            return True if "tick" in a.scheduler.paused_jobs else None
        await eventually("the leader reads the pause", leader_knows, within=10)
        lease = a.elector.current_lease()
        assert lease is not None

        garbler.garble()

        # a follower's job list: the last good paused set, and a note naming the key to repair
        r = await follower.get("/jobs")
        assert r.status_code == 200
        assert {j["id"]: j["paused"] for j in r.json()} == {"tick": True}
        note = r.headers[STALE_HEADER]
        assert garbler.key in note and TOKEN not in note, note

        for api in (leader, follower):
            for method, path, body in CALLS:
                for headers in ({}, AUTH):
                    r = await api.request(method, path, json=body, headers=headers)
                    where = f"{method} {path} {'with' if headers else 'without'} the token: {r.status_code} {r.text}"
                    assert r.status_code < 500 or r.status_code == 503, where
                    assert TOKEN not in r.text, where
                    if r.status_code == 503 and path not in ("/healthz", "/readyz", "/admin/jobs/tick/run?force=true"):
                        assert garbler.key in r.json()["detail"], where
            # pausing needs the settings: a 503 naming the key, never a 500, never "nothing was paused"
            r = await api.post("/admin/jobs/tick/resume", headers=AUTH)
            assert r.status_code == 503 and garbler.key in r.json()["detail"] and r.headers["retry-after"] == "1"

        # the leader kept its lease, and says it is healthy; so does the follower
        assert a.elector.current_lease() is not None and a.elector.current_lease().token == lease.token  # type: ignore[union-attr]
        assert (await leader.get("/healthz")).status_code == 200
        assert (await follower.get("/healthz")).status_code == 200
