"""A follower passes an authenticated admin call on to the leader itself, and only to a leader it can vouch for.

Why not a redirect: the leader's URL comes from the lock store's holder
record, which anybody who can write the store can forge. A 307 to it would
send every admin client, and with the README's advice its bearer token, to
any URL the forger likes. So no admin route redirects (nor does any other
route: nothing answers with a ``Location`` built from the store or from the
request's ``Host``). A follower forwards the call instead, server to server,
and only to a URL the node's own configuration names:

**The vouching rule.** The leader's advertised URL is trusted only when it is
one of ``BATON_PEERS`` (compared by scheme, host, port and path, case of
scheme and host aside). The forwarded call is sent to the URL as configured,
never to the store's spelling of it. This node's own URL is never a target
(a node that is asked while not leading does not call itself).

Why that rule and not "URLs of nodes seen holding a valid lease": a lease,
its token and its holder record are all data in the store, so they prove
nothing a forger could not write; the admin token is the secret being
protected, and the operator who configures the token is the one who can say
where the cluster's nodes are. Without ``BATON_PEERS`` a follower answers 503
for the few calls that must reach the leader (a manual run, a step-down):
call the leader (``GET /status`` names it) or list the peers. Every other
admin call (pause, resume, the job store) works on any node through the store.

Forwarding keeps the method, the raw path (with the router's prefix, so an
embedded app's leader is reached under the same prefix), the query, the body
and the caller's ``Authorization`` (already checked here; the leader checks it
again), and relays the leader's status and JSON. ``X-Baton-Forwarded-By``
marks a forwarded call: it is never forwarded again, so two nodes that each
believe the other leads cannot bounce a call between them.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lock_backends import Holder, redact

log = logging.getLogger("baton.forward")

#: Set on a call a follower forwards, to the forwarding node's id; a call carrying it is never forwarded again.
FORWARDED_BY = "X-Baton-Forwarded-By"
#: Set on a relayed answer: the node that answered it.
ANSWERED_BY = "X-Baton-Answered-By"
#: Request headers passed on to the leader; nothing else (no cookies, no Host, no proxy headers).
PASSED_ON = ("authorization", "content-type", "accept")
#: Answer headers relayed back to the caller.
RELAYED = ("content-type", "retry-after", "www-authenticate")


class Origin(NamedTuple):
    """A URL's identity for vouching: what must match, spelled one way."""

    scheme: str
    host: str
    port: int
    path: str


def origin(url: str) -> Origin | None:
    """``url`` reduced to scheme, host, port (default filled in) and path; None when it is no http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    if parts.query or parts.fragment:
        return None
    return Origin(scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80), parts.path.rstrip("/"))


class Forwarder:
    """Forwards admin calls from a follower to a vouched-for leader (see the module's doc)."""

    def __init__(self, own_url: str, peers: Sequence[str], timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        own = origin(own_url)
        self._peers = {o: url.rstrip("/") for url in peers if (o := origin(url)) is not None and o != own}
        self.timeout = timeout
        #: How calls reach the peers: the network unless set (tests route them to in-process apps).
        self.transport = transport
        self._client: httpx.AsyncClient | None = None

    def vouched(self, url: str) -> str | None:
        """The configured peer URL that ``url`` (a holder's advertised URL) names, or None."""
        found = origin(url)
        return self._peers.get(found) if found is not None else None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: a call carrying the admin token goes to the peer itself, never through whatever
            # proxy the environment names; redirects are never followed (a leader does not send any). Peers'
            # certificates are checked against the system's CAs (OpenSSL's default paths, so SSL_CERT_FILE and
            # SSL_CERT_DIR still name a private CA), which trust_env=False would otherwise drop for certifi's.
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=min(2.0, self.timeout)),
                                             follow_redirects=False, trust_env=False, transport=self.transport,
                                             verify=ssl.create_default_context())
        return self._client

    async def to_leader(self, request: Request, leader: Holder | None, node_id: str) -> Response:
        """The leader's answer to ``request``, or a 503/504 saying why there is none. Never a redirect."""
        if FORWARDED_BY in request.headers:
            return _unavailable(f"this call was forwarded already, and {node_id!r} does not lead (any more); "
                                "retry shortly")
        if leader is None or not leader.url:
            return _unavailable("no leader right now; retry shortly")
        target = self.vouched(leader.url)
        if target is None:
            log.warning("not forwarding to the leader %r: its URL %s is not in BATON_PEERS",
                        leader.node_id, redact(leader.url))
            return _unavailable("leader unknown or not vouched for: its advertised URL is not one of this "
                                "node's BATON_PEERS; call the leader directly (GET /status names it) or list "
                                "the nodes in BATON_PEERS")
        url = target + _raw_path(request)
        if request.url.query:
            url += "?" + request.url.query
        headers = {name: value for name, value in request.headers.items() if name in PASSED_ON}
        headers[FORWARDED_BY] = node_id
        body = await request.body()
        try:
            answer = await self._http().request(request.method, url, headers=headers, content=body)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                return _unavailable(f"the leader {leader.node_id!r} could not be reached: connect timed out")
            return JSONResponse({"detail": f"the leader {leader.node_id!r} did not answer within "
                                           f"{self.timeout:g}s; the call may or may not have been applied"},
                                status_code=504)
        except httpx.HTTPError as exc:
            return _unavailable(f"the leader {leader.node_id!r} could not be reached: {type(exc).__name__}")
        relayed = {name: answer.headers[name] for name in RELAYED if name in answer.headers}
        relayed[ANSWERED_BY] = leader.node_id
        return Response(answer.content, status_code=answer.status_code, headers=relayed)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _raw_path(request: Request) -> str:
    """The path as the client sent it (still percent-encoded), so an id holding ``?`` or ``/`` stays one segment."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw.decode("latin-1")
    return httpx.URL(path=request.url.path).raw_path.decode("ascii")


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
