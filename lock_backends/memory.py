"""In-memory backend: the protocol's reference semantics, for one process.

``memory://<store>`` names a store shared by every backend instance of the
process that uses the same name. Nodes in separate processes cannot share it,
so it is no deployment's backend; it is what the deterministic simulator
(``loadtest.sim``) runs whole clusters against, and the contract suite holds
it to the same rules as the real servers, so the simulator's verdicts carry
over.

Every operation yields to the event loop once before it applies, as a round
trip would; it then applies atomically (no other coroutine runs in between),
which is what a Lua script, a transaction or a compare-and-swap give the
server backends. The store keeps time on its own clock (a simulated server's
clock under the simulator), never on the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lock_backends import clock as clocks
from lock_backends.base import (
    MAX_LISTING,
    NO_WINDOW,
    BusyRun,
    Holder,
    Lease,
    RunQuery,
    RunRecord,
    Window,
    handed_back,
    local_deadline,
    next_window,
)
from lock_backends.errors import BackendUnavailable
from lock_backends.url import BackendOptions, bad_url, parse_options

#: Runs kept per lock at most (the newest), as the server backends cap their indexes.
MAX_RUNS_KEPT = 100_000


@dataclass
class LockState:
    holder: Holder | None = None
    token: int = 0
    nonce: int = 0
    expires: float = 0.0  # store clock, monotonic
    mark: Window | None = None
    busy: dict[str, BusyRun] = field(default_factory=dict)
    runs: dict[str, RunRecord] = field(default_factory=dict)  # insertion order = claimed_at order, mostly
    settings: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryStore:
    """The shared state of one ``memory://`` store: every lock name in it."""

    def __init__(self, name: str = "", server_clock: clocks.Clock | None = None) -> None:
        self.name = name
        #: The store's own clock (a simulated server's, under the simulator); the host's by default, never
        #: the clock of whichever node happened to open the store first.
        self.clock = server_clock or clocks.SYSTEM
        self.locks: dict[str, LockState] = {}
        self.nonces = 0

    def lock(self, name: str) -> LockState:
        state = self.locks.get(name)
        if state is None:
            state = self.locks[name] = LockState()
        return state

    def live(self, state: LockState) -> bool:
        return state.holder is not None and state.expires > self.clock.monotonic()

    def notify(self, state: LockState) -> None:
        state.changed.set()
        state.changed = asyncio.Event()


_STORES: dict[str, MemoryStore] = {}


def store(name: str, server_clock: clocks.Clock | None = None) -> MemoryStore:
    """The store ``memory://name`` opens, made on first use (with ``server_clock`` if given then)."""
    found = _STORES.get(name)
    if found is None:
        found = _STORES[name] = MemoryStore(name, server_clock)
    return found


def drop_store(name: str) -> None:
    _STORES.pop(name, None)


class MemoryBackend:
    kind = "memory"

    def __init__(self, shared: MemoryStore, options: BackendOptions) -> None:
        self.store = shared
        self.options = options
        self.address = f"memory://{shared.name}"
        self.closed = False

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        parts = urlsplit(url)
        name = parts.netloc or parts.path.strip("/")
        if not name:
            raise bad_url(url, "a memory URL names its store: memory://name")
        options, _ = parse_options(url)
        return cls(store(name), options)

    async def _op(self) -> None:
        """One round trip: yield once, then the caller applies its change atomically."""
        if self.closed:
            raise BackendUnavailable("backend closed", backend=self.kind, address=self.address)
        await asyncio.sleep(0)

    def _now(self) -> float:
        return self.store.clock.time()

    def _current(self, state: LockState, lease: Lease) -> bool:
        return self.store.live(state) and state.token == lease.token and str(state.nonce) == lease.handle

    def _prune(self, state: LockState) -> None:
        horizon = self._now() - self.options.claim_retention
        while state.runs:
            key, oldest = next(iter(state.runs.items()))
            if oldest.claimed_at >= horizon and len(state.runs) <= MAX_RUNS_KEPT:
                break
            del state.runs[key]

    def _put_run(self, state: LockState, run: RunRecord) -> None:
        state.runs.pop(run.key, None)  # re-inserted at the end: newest last
        state.runs[run.key] = run

    # -- LeaseStore -------------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = clocks.monotonic()
        await self._op()
        state = self.store.lock(name)
        if self.store.live(state):
            return None
        self.store.nonces += 1
        state.holder, state.token, state.nonce = holder, state.token + 1, self.store.nonces
        state.expires = self.store.clock.monotonic() + ttl
        self.store.notify(state)
        return Lease(name, holder, state.token, ttl, local_deadline(t_sent, ttl), handle=str(state.nonce))

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = clocks.monotonic()
        await self._op()
        state = self.store.lock(lease.name)
        if not self._current(state, lease):
            return None
        state.expires = self.store.clock.monotonic() + lease.ttl
        return Lease(lease.name, lease.holder, lease.token, lease.ttl, local_deadline(t_sent, lease.ttl),
                     handle=lease.handle)

    async def release(self, lease: Lease) -> None:
        await self._op()
        state = self.store.lock(lease.name)
        if self._current(state, lease):
            state.holder = None
            state.expires = 0.0
            self.store.notify(state)

    async def leader(self, name: str) -> Holder | None:
        await self._op()
        state = self.store.lock(name)
        return state.holder if self.store.live(state) else None

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Wake on acquire or release, or when the holder's lease runs out on the store's clock."""
        if self.closed:
            await asyncio.sleep(max(0.0, timeout))
            return
        state = self.store.lock(name)
        wait = timeout
        if self.store.live(state):
            wait = min(timeout, state.expires - self.store.clock.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.changed.wait(), max(0.0, wait))

    async def server_time(self) -> float | None:
        await self._op()
        return self._now()

    async def close(self) -> None:
        self.closed = True

    # -- ClaimStore ---------------------------------------------------------------------

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        await self._op()
        state = self.store.lock(lease.name)
        if not self._current(state, lease):
            return None
        mark = next_window(state.mark, lease.token, until_us, start_us)
        state.mark = mark
        if mark.owned_by(lease.token):
            now = self._now()
            for key in dict.fromkeys(intents):
                existing = state.runs.get(key)
                if existing is None or existing.result is None:
                    self._put_run(state, RunRecord(key, lease.token, lease.holder.node_id, now))
            self._prune(state)
        return self._with_busy(state, mark)

    async def claim_mark(self, name: str) -> Window:
        await self._op()
        return self.store.lock(name).mark or NO_WINDOW  # stored without busy runs (they are kept apart)

    def _with_busy(self, state: LockState, mark: Window) -> Window:
        now_us = int(self._now() * 1_000_000)
        for key in [k for k, b in state.busy.items() if b.until_us <= now_us]:
            del state.busy[key]
        return Window(mark.token, mark.since_us, mark.until_us, mark.sealed, tuple(state.busy.values()))

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        await self._op()
        state = self.store.lock(lease.name)
        mark = handed_back(state.mark, lease.token, at_us)
        if mark is None:
            return None
        state.mark = mark
        for run in busy:
            state.busy[run.key] = run
        for key in drop:
            existing = state.runs.get(key)
            if existing is not None and existing.result is None and existing.token == lease.token:
                del state.runs[key]
        return self._with_busy(state, mark)

    async def claim(self, lease: Lease, key: str) -> bool:
        return bool(await self.claim_many(lease, [key]))

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        await self._op()
        state = self.store.lock(lease.name)
        if not self._current(state, lease):
            return set()
        claimed: set[str] = set()
        now = self._now()
        for key in dict.fromkeys(keys):
            existing = state.runs.get(key)
            if existing is None:
                self._put_run(state, RunRecord(key, lease.token, lease.holder.node_id, now))
                claimed.add(key)
            elif existing.token == lease.token:
                claimed.add(key)  # ours already: a retry after a lost answer
        self._prune(state)
        return claimed

    # -- RunStore ---------------------------------------------------------------------------

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        for run in records:
            json.dumps(run.result)  # refuse what the server backends could not store, before any change
        await self._op()
        state = self.store.lock(name)
        for run in records:
            self._put_run(state, run)
            state.busy.pop(run.key, None)
        self._prune(state)

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        await self._op()
        state = self.store.lock(name)
        self._prune(state)
        ordered = sorted(state.runs.values(), key=lambda r: r.claimed_at, reverse=True)
        found = [r for r in ordered if query.matches(r)]
        limit = max(0, min(query.limit, MAX_LISTING))
        page = found[:limit]
        if page:  # a page ends with every run at its last instant, so a cursor at that instant skips none
            page += [r for r in found[limit:] if r.claimed_at == page[-1].claimed_at]
        return page

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        await self._op()
        state = self.store.lock(name)
        open_runs = [r for r in state.runs.values() if r.result is None]
        open_runs.sort(key=lambda r: r.claimed_at, reverse=True)
        return open_runs[:max(0, limit)]

    # -- SettingStore -------------------------------------------------------------------------

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        await self._op()
        settings = self.store.lock(name).settings
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value

    async def settings(self, name: str) -> dict[str, str]:
        await self._op()
        return dict(self.store.lock(name).settings)

    def __repr__(self) -> str:
        return f"MemoryBackend({self.address!r})"

