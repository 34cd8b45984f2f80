"""Followers forward admin calls to a vouched-for leader, never redirect; no route redirects at all (#17.5, #17.6).

In process on memory:// (two real nodes); the HTTP between the nodes goes
through ``tests.api_nodes.Hosts``, which records every request a node sent,
so a test can say that nothing (no token) went to a host it should not reach.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from lock_backends import Holder
from lock_backends import memory as memory_store
from node.app import Node, create_app
from node.client import BatonAPIError, BatonClient
from node.forward import FORWARDED_BY, Forwarder, origin
from tests.api_nodes import AUTH, TOKEN, Hosts, apps, client, make_node, running
from tests.conftest import eventually

A_URL = "http://a:8000"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Node, Node, str]]:
    """``a`` leads; ``b`` follows and vouches for ``a`` (BATON_PEERS); the store's name is the third item."""
    store = f"fwd-{uuid.uuid4().hex[:8]}"
    a = make_node(f"memory://{store}", "a", "baton", peers=("http://b:8000",))
    b = make_node(f"memory://{store}", "b", "baton", peers=(A_URL,))
    try:
        async with running(a, b):
            yield a, b, store
    finally:
        memory_store.drop_store(store)


def route(b: Node, *nodes: Node) -> Hosts:
    hosts = Hosts(apps(*nodes))
    b.forwarder.transport = hosts
    return hosts


async def test_a_follower_forwards_the_callers_call_to_the_leader_and_relays_its_answer(
        pair: tuple[Node, Node, str]) -> None:
    a, b, _ = pair
    hosts = route(b, a)
    async with client(create_app(b)) as follower:
        r = await follower.post("/admin/jobs/tick/run", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["node_id"] == "a" and r.json()["outcome"] == "ok"
        assert r.headers["x-baton-answered-by"] == "a" and "location" not in r.headers
        sent = hosts.seen[-1]
        assert sent.url == httpx.URL(f"{A_URL}/admin/jobs/tick/run")
        assert sent.headers["authorization"] == f"Bearer {TOKEN}" and sent.headers[FORWARDED_BY] == "b"

        # the leader's refusals come back as they are: paused is a 409 ... until the query says force
        assert (await follower.post("/admin/jobs/tick/pause", headers=AUTH)).status_code == 200

        async def leader_knows() -> bool | None:
            return True if "tick" in a.scheduler.paused_jobs else None
        await eventually("the leader reads the pause", leader_knows, within=10)
        r = await follower.post("/admin/jobs/tick/run", headers=AUTH)
        assert r.status_code == 409 and "paused" in r.json()["detail"]
        r = await follower.post("/admin/jobs/tick/run", params={"force": "true"}, headers=AUTH, json={"why": "test"})
        assert r.status_code == 200 and r.json()["outcome"] == "ok"
        assert hosts.seen[-1].url.params["force"] == "true" and hosts.seen[-1].content == b'{"why":"test"}'
        assert hosts.seen[-1].headers["content-type"] == "application/json"

        # a call without the token is refused here, before anything leaves the node
        before = len(hosts.seen)
        assert (await follower.post("/admin/jobs/tick/run")).status_code == 401
        assert (await follower.post("/admin/jobs/tick/run", headers={"Authorization": "Bearer no"})).status_code == 401
        assert (await follower.post("/admin/leader/step-down")).status_code == 401
        assert len(hosts.seen) == before

        # a step-down asked of a follower reaches the leader
        r = await follower.post("/admin/leader/step-down", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"node_id": "a", "stepped_down": True}


async def test_a_forged_holder_record_gets_no_token_and_no_redirect(pair: tuple[Node, Node, str]) -> None:
    a, b, store = pair
    hosts = route(b, a)
    # whoever can write the store names another URL for the leader (the lease itself stays a's)
    state = memory_store.store(store).lock("baton")
    state.holder = Holder("a", "http://evil.example:8000")
    async with client(create_app(b)) as follower:
        b.elector.observed_leader = await b.backend.leader("baton")
        assert b.elector.observed_leader == Holder("a", "http://evil.example:8000")
        for path in ("/admin/jobs/tick/run", "/admin/leader/step-down"):
            r = await follower.post(path, headers=AUTH)
            assert r.status_code == 503 and "not vouched for" in r.json()["detail"], r.text
            assert "location" not in r.headers and "evil" not in r.text
        assert hosts.seen == [], "nothing may be sent to a URL the node cannot vouch for"


async def test_a_forwarded_call_is_never_forwarded_again(pair: tuple[Node, Node, str]) -> None:
    a, b, _ = pair
    hosts = route(b, a)
    async with client(create_app(b)) as follower:
        r = await follower.post("/admin/jobs/tick/run", headers={**AUTH, FORWARDED_BY: "c"})
        assert r.status_code == 503 and "forwarded already" in r.json()["detail"]
        assert r.headers["retry-after"] == "1"
    assert hosts.seen == []


async def test_without_peers_a_follower_answers_503_and_the_leader_still_serves(
        pair: tuple[Node, Node, str]) -> None:
    a, _, store = pair
    lonely = make_node(f"memory://{store}", "c", "baton")  # no BATON_PEERS
    hosts = route(lonely, a)
    async with running(lonely, first_leads=False), client(create_app(lonely)) as c:
        lonely.elector.observed_leader = await lonely.backend.leader("baton")
        r = await c.post("/admin/jobs/tick/run", headers=AUTH)
        assert r.status_code == 503 and "BATON_PEERS" in r.json()["detail"] and "location" not in r.headers
        # calls that go through the store work on any node, peers or not
        assert (await c.post("/admin/jobs/tick/pause", headers=AUTH)).status_code == 200
    assert hosts.seen == []


async def test_an_unreachable_leader_is_a_503_and_no_redirect(pair: tuple[Node, Node, str]) -> None:
    _, b, _ = pair
    hosts = route(b)  # a's URL is vouched for but cannot be reached
    async with client(create_app(b)) as follower:
        r = await follower.post("/admin/jobs/tick/run", headers=AUTH)
    assert r.status_code == 503 and "could not be reached" in r.json()["detail"] and "location" not in r.headers
    assert len(hosts.seen) == 1


@pytest.mark.parametrize("path", [
    "/admin/jobs/tick/run/", "/admin/jobs/tick/pause/", "/admin/leader/step-down/", "/admin/jobs/", "/admin/jobs/x/",
    "/admin/", "/admin", "/admin/nope", "/admin/jobs/tick", "/admin//jobs/tick/run", "/admin/jobs/tick/run//",
])
async def test_every_admin_path_authenticates_before_anything_and_nothing_redirects(
        pair: tuple[Node, Node, str], path: str) -> None:
    a, b, _ = pair
    hosts = route(b, a)
    for node in (a, b):
        async with client(create_app(node)) as c:
            for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                r = await c.request(method, path, headers={"Host": "evil.example"})
                assert r.status_code == 401, (node.settings.node_id, method, path, r.status_code)
                assert "location" not in r.headers
                r = await c.request(method, path, headers={**AUTH, "Host": "evil.example"})
                assert r.status_code in (404, 405, 409, 422), (node.settings.node_id, method, path, r.status_code)
                assert "location" not in r.headers
            for public in ("/status/", "/jobs/", "/runs/", "/healthz/", "/metrics/"):
                r = await c.get(public, headers={"Host": "evil.example"})
                assert r.status_code == 404 and "location" not in r.headers, public
    assert hosts.seen == []


async def test_admin_routes_are_403_when_no_token_is_configured() -> None:
    store = f"fwd-{uuid.uuid4().hex[:8]}"
    node = make_node(f"memory://{store}", "a", "baton")
    node.settings.admin_token = None
    try:
        async with client(create_app(node)) as c:
            for path in ("/admin/jobs/tick/run", "/admin/jobs/tick/run/", "/admin/nope", "/admin"):
                r = await c.post(path, headers=AUTH)
                assert r.status_code == 403 and "location" not in r.headers, path
    finally:
        memory_store.drop_store(store)


def test_the_vouching_rule_compares_scheme_host_port_and_path() -> None:
    forwarder = Forwarder("http://self:8000", ("http://Node-2:8000/", "https://node-3.example.com",
                                               "http://self:8000"), timeout=1)
    assert forwarder.vouched("http://node-2:8000") == "http://Node-2:8000"
    assert forwarder.vouched("HTTP://NODE-2:8000/") == "http://Node-2:8000"
    assert forwarder.vouched("https://node-3.example.com:443") == "https://node-3.example.com"
    for forged in ("http://node-2:8001", "https://node-2:8000", "http://node-2:8000/x", "http://evil:8000",
                   "http://node-2:8000@evil:8000", "http://evil#@node-2:8000", "http://self:8000", "",
                   "http://node-3.example.com", "javascript:alert(1)", "http://[::1", "//node-2:8000"):
        assert forwarder.vouched(forged) is None, forged
    assert origin("http://a:8000?x=1") is None


def test_the_client_follows_no_redirect_and_sends_its_token_nowhere_else() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(307, headers={"location": "http://evil.example/admin/jobs/tick/run"})

    with BatonClient("http://node:8000", token=TOKEN, transport=httpx.MockTransport(answer)) as c, \
            pytest.raises(BatonAPIError) as refused:
        c.run_job("tick")
    assert refused.value.status == 307
    assert [r.url.host for r in seen] == ["node"]
