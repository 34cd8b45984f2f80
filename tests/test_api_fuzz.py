"""The HTTP API under generated requests (hypothesis): no 500, no redirect, and no unauthenticated state change.

Two real nodes on memory:// (a leader and a follower that vouches for it),
their apps driven through ``httpx.ASGITransport`` with generated methods,
paths (the real routes with odd segments, trailing and doubled slashes,
percent-encoding, very long ids), query strings (odd values for limit,
before, since, job, outcome, force), headers (Authorization variants, Host,
the forwarding mark) and bodies (JSON of odd shapes for the job routes, bytes
that are no JSON). The nodes run in an event loop of their own (a thread);
hypothesis drives the requests from the test's thread, one at a time.

* Without the right token: no answer is a 500 or carries a ``Location``;
  every path under ``/admin`` is a 401; and the store (settings, so stored jobs
  and the paused set; the leader and its token; the run records) and both
  nodes' own view (jobs, paused set) are the same after each request as
  before it. Nothing is forwarded.
* With the right token (another pair of nodes, so state the first one
  checks never moves): no 500, no ``Location``.

Bounded by a number of examples and a per-example deadline, derandomized
(the same examples on every run, no example database), so CI is reproducible
and the whole module runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lock_backends import memory
from node.app import Node, create_app
from node.forward import FORWARDED_BY
from node.jobs import JobRegistry, RunContext
from tests.api_nodes import AUTH, TOKEN, Hosts, apps, client, make_node, until_leader

T = TypeVar("T")

EXAMPLES = 1000
AUTHORIZED_EXAMPLES = 400
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
#: Every route with its method, and paths no route has.
ROUTES = (("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/status"), ("GET", "/jobs"), ("GET", "/jobs/{id}"),
          ("GET", "/runs"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", "/admin/jobs/{id}/run"),
          ("POST", "/admin/jobs/{id}/pause"), ("POST", "/admin/jobs/{id}/resume"),
          ("POST", "/admin/leader/step-down"), ("POST", "/admin/jobs"), ("PUT", "/admin/jobs/{id}"),
          ("DELETE", "/admin/jobs/{id}"), ("POST", "/admin"), ("GET", "/admin/{id}"), ("GET", "/{id}"),
          ("POST", "/{id}/admin"))


def hourly_jobs() -> JobRegistry:
    """Jobs that do not fire while the test runs: the run records stay still unless a request moves them."""
    jobs = JobRegistry()

    async def body(run: RunContext) -> None:
        return None

    jobs.interval("tick", hours=1)(body)
    jobs.cron("nightly", hour=3)(body)
    return jobs


# -- generated requests -------------------------------------------------------------------------

odd_text = st.text(st.characters(codec="utf-8"), max_size=40)  # utf-8: no lone surrogates
ids = st.one_of(
    st.sampled_from(["tick", "nightly"]),
    st.sampled_from(["tick", "nightly", "nope", "..", ".", "%2e%2e", "tick%2Frun", "tick%3Frun", "%00", "%ZZ",
                     "ü", "tick;x", "tick\\run", "$", "~", "%2F", "tick/run", "a" * 201, "b" * 5000]),
    odd_text.filter(bool).map(lambda s: quote(s, safe="")),
    odd_text.filter(bool).map(lambda s: quote(s, safe="/%;:@&=+$,!~*'()")),
)


@st.composite
def routes(draw: st.DrawFn) -> tuple[str, str]:
    """A route's method (another one now and then) and its path with an odd id, an odd slash now and then."""
    method, template = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 3)) == 0:
        method = draw(st.sampled_from(METHODS))
    path = template.replace("{id}", draw(ids))
    if draw(st.integers(0, 3)) == 0:
        path += "/"
    if draw(st.integers(0, 7)) == 0:
        path = path.replace("/", "//", 1)
    return method, path


odd_values = st.one_of(
    st.sampled_from(["", "0", "-1", "1", "50", "1000", "1001", "1e309", "nan", "inf", "-inf", "9" * 400, "true",
                     "false", "yes", "1.5", "0x10", "2026-13-45", "2026-01-01T00:00:00", "2026-01-01T00:00:00+00:00",
                     "2026-01-01T00:00:00+99:00", "ok", "error", "missed", "tick", "null", "[]", "{}", "%00"]),
    st.integers(-(2**70), 2**70).map(str), st.floats(allow_nan=True).map(str), odd_text,
)
queries = st.dictionaries(st.sampled_from(["limit", "before", "since", "job", "outcome", "force", "x", "limit[]"]),
                          odd_values, max_size=4)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**80), 2**80)
                           | st.floats(allow_nan=False, allow_infinity=False)
                           | odd_text, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12)
job_bodies = st.fixed_dictionaries({}, optional={
    "id": st.one_of(ids, json_values), "func": st.one_of(st.sampled_from(["tests.nope:x", "nope", ":", "a:b:c", ""]),
                                                           odd_text, json_values),
    "trigger": st.one_of(st.sampled_from(["cron", "interval", "date", "nope"]), json_values),
    "seconds": st.one_of(st.integers(-(2**70), 2**70), st.floats(), odd_text), "minutes": json_values,
    "crontab": st.one_of(st.sampled_from(["* * * * *", "61 * * * *", "", "@reboot"]), odd_text),
    "run_date": st.one_of(odd_values, json_values), "timezone": st.one_of(odd_text, json_values),
    "args": json_values, "kwargs": json_values, "max_instances": json_values, "replace_existing": json_values,
    "jitter": json_values, "extra": json_values,
})
raw_types = st.sampled_from(["application/octet-stream", "application/json", "text/plain", "application/x+json",
                             "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])
bodies = st.one_of(st.none(), json_values.map(lambda v: ("json", v)), job_bodies.map(lambda v: ("json", v)),
                   st.tuples(raw_types, st.one_of(st.binary(max_size=200), st.sampled_from(
                       [b"{", b"[1,", b'{"id": 1', b"\x80", b"null", b"Infinity", b"1e99999", b"--x--"]))))
wrong_authorizations = st.one_of(
    st.none(),
    st.sampled_from(["", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                     f"Bearer  {TOKEN}", f"Token {TOKEN}", f"Basic {TOKEN}", TOKEN, f"{TOKEN} Bearer",
                     f"Bearer {TOKEN.upper()}", "Bearer \t", "Bearer " + "x" * 5000]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).filter(lambda s: TOKEN not in s),
)
hosts = st.one_of(st.none(), st.sampled_from(["evil.example", "a:8000", "b:8000", "", "x" * 300, "[::1]:80",
                                              "evil.example:443", "node@evil.example"]))
forward_marks = st.one_of(st.none(), st.sampled_from(["a", "b", "", "x" * 200]))


@dataclass
class Call:
    node: int
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    host: str | None
    forwarded: str | None
    body: tuple[str, Any] | None


@st.composite
def calls(draw: st.DrawFn, authorizations: st.SearchStrategy[str | None]) -> Call:
    method, path = draw(routes())
    return Call(draw(st.sampled_from([0, 1])), method, path, draw(queries), draw(authorizations), draw(hosts),
                draw(forward_marks), draw(bodies))


# -- the nodes, in a loop of their own ----------------------------------------------------------


class Fuzzed:
    """A leader and a follower on one memory:// store, served from an event loop in a thread."""

    def __init__(self) -> None:
        self.store = f"fuzz-{uuid.uuid4().hex[:8]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-nodes", daemon=True)
        self.thread.start()
        self.nodes: list[Node] = []
        #: What each node forwarded (each reaches the other in process, never the network).
        self.hosts: list[Hosts] = []
        self.clients: list[httpx.AsyncClient] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        url = f"memory://{self.store}?timeout=0.5"
        a = make_node(url, "a", "baton", peers=("http://b:8000",), jobs=hourly_jobs())
        b = make_node(url, "b", "baton", peers=("http://a:8000",), jobs=hourly_jobs())
        self.nodes = [a, b]
        await a.start()
        await until_leader(a)
        await b.start()
        self.hosts = [Hosts(apps(b)), Hosts(apps(a))]
        a.forwarder.transport, b.forwarder.transport = self.hosts
        self.clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(n)), base_url="http://node",
                                          timeout=30) for n in self.nodes]

    async def stop(self) -> None:
        for c in self.clients:
            await c.aclose()
        for n in reversed(self.nodes):
            await n.stop()

    def close(self) -> None:
        try:
            self.run(self.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            memory.drop_store(self.store)

    async def state(self) -> dict[str, Any]:
        """Everything a request could change: the store's, and each node's own view of it."""
        lock = memory.store(self.store).lock("baton")
        return {
            "settings": dict(lock.settings), "holder": lock.holder, "token": lock.token,
            "runs": [(r.key, r.token, r.result) for r in lock.runs.values()],
            "busy": dict(lock.busy),
            "nodes": [(sorted(s.id for s in n.scheduler.jobs), sorted(n.scheduler.paused_jobs),
                       n.elector.is_leader, n.elector._step_down.is_set()) for n in self.nodes],
        }

    async def send(self, call: Call) -> httpx.Response:
        headers: dict[str, str] = {}
        if call.authorization is not None:
            headers["Authorization"] = call.authorization
        if call.host is not None:
            headers["Host"] = call.host
        if call.forwarded is not None:
            headers[FORWARDED_BY] = call.forwarded
        content: bytes | None = None
        if call.body is not None:
            kind, value = call.body
            if kind == "json":
                headers["Content-Type"] = "application/json"
                content = httpx.Request("POST", "http://x", json=value).content
            else:  # bytes under a content type of their own: JSON that does not parse, a form, garbage
                headers["Content-Type"] = kind
                content = value
        client = self.clients[call.node]
        return await client.request(call.method, call.path, params=call.query, headers=headers, content=content)


def fuzzed_nodes() -> Iterator[Fuzzed]:
    made = Fuzzed()
    try:
        made.run(made.start())
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def anonymous() -> Iterator[Fuzzed]:
    yield from fuzzed_nodes()


@pytest.fixture(scope="module")
def admin() -> Iterator[Fuzzed]:
    yield from fuzzed_nodes()


def is_admin_path(path: str) -> bool:
    """The server's view: the path percent-decoded (as Starlette routes it), slashes as they are."""
    decoded = unquote(path)
    return decoded == "/admin" or decoded.startswith("/admin/")


@FUZZ
@given(call=calls(wrong_authorizations))
def test_without_the_token_no_request_is_a_500_or_changes_anything(anonymous: Fuzzed, call: Call) -> None:
    before = anonymous.run(anonymous.state())
    r = anonymous.run(anonymous.send(call))
    after = anonymous.run(anonymous.state())
    event(f"{r.status_code}")
    assert r.status_code != 500 and r.status_code < 600, (call, r.status_code, r.text[:300])
    assert "location" not in r.headers, (call, r.headers)
    if is_admin_path(r.request.url.path):
        assert r.status_code == 401, (call, r.status_code, r.text[:300])
    assert after == before, call
    assert not any(h.seen for h in anonymous.hosts), "nothing unauthenticated is forwarded"


@settings(FUZZ, max_examples=AUTHORIZED_EXAMPLES)
@given(call=calls(st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}"])))
def test_with_the_token_no_request_is_a_500(admin: Fuzzed, call: Call) -> None:
    r = admin.run(admin.send(call))
    event(f"{r.status_code}")
    assert r.status_code != 500 and r.status_code < 600, (call, r.status_code, r.text[:300])
    assert "location" not in r.headers, (call, r.headers)


# -- what the fuzzer found, pinned --------------------------------------------------------------


async def test_found_a_body_neither_json_nor_utf8_is_a_422_not_a_500() -> None:
    store = f"fuzz-{uuid.uuid4().hex[:8]}"
    node = make_node(f"memory://{store}", "a", "baton", jobs=hourly_jobs())
    try:
        async with client(create_app(node)) as c:
            for method, path in (("POST", "/admin/jobs"), ("PUT", "/admin/jobs/x")):
                r = await c.request(method, path, content=b"\x80\xff", headers={
                    **AUTH, "Content-Type": "application/octet-stream"})
                assert r.status_code == 422, (method, path, r.status_code)
    finally:
        memory.drop_store(store)


async def test_found_a_body_of_infinity_or_nan_is_a_422_not_a_500() -> None:
    """Python's JSON reads ``Infinity`` and ``NaN``; the 422 that quotes them back must still be JSON."""
    store = f"fuzz-{uuid.uuid4().hex[:8]}"
    node = make_node(f"memory://{store}", "a", "baton", jobs=hourly_jobs())
    try:
        async with client(create_app(node)) as c:
            for method, path in (("POST", "/admin/jobs"), ("PUT", "/admin/jobs/x")):
                for body in (b"Infinity", b"-Infinity", b"NaN", b"[Infinity, {}]"):
                    r = await c.request(method, path, content=body, headers={
                        **AUTH, "Content-Type": "application/json"})
                    assert r.status_code == 422, (method, path, body, r.status_code)
                    assert r.json()["detail"], (method, path, body)
    finally:
        memory.drop_store(store)


@pytest.mark.parametrize("path", ["/admin/jobs/%0A/run/", "/admin/%0A", "/admin/jobs/tick/run%0A/", "/admin/%0D%0A/"])
async def test_found_a_line_break_in_an_admin_path_is_still_authenticated_first(path: str) -> None:
    store = f"fuzz-{uuid.uuid4().hex[:8]}"
    node = make_node(f"memory://{store}", "a", "baton", jobs=hourly_jobs())
    try:
        async with client(create_app(node)) as c:
            for method in METHODS:
                r = await c.request(method, path)
                assert r.status_code == 401 and "location" not in r.headers, (method, r.status_code)
    finally:
        memory.drop_store(store)


async def test_found_json_that_does_not_parse_is_a_401_without_the_token_not_a_422() -> None:
    store = f"fuzz-{uuid.uuid4().hex[:8]}"
    node = make_node(f"memory://{store}", "a", "baton", jobs=hourly_jobs())
    try:
        async with client(create_app(node)) as c:
            for method, path in (("POST", "/admin/jobs"), ("PUT", "/admin/jobs/x")):
                for body in (b"{", b"\x00", b'{"id": 1'):
                    r = await c.request(method, path, content=body, headers={"Content-Type": "application/json"})
                    assert r.status_code == 401, (method, path, body, r.status_code)
                    r = await c.request(method, path, content=body, headers={
                        **AUTH, "Content-Type": "application/json"})
                    assert r.status_code == 422, (method, path, body, r.status_code)
    finally:
        memory.drop_store(store)
