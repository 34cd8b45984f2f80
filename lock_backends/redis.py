"""Redis backend: ``SET NX PX`` leases with a fencing counter, claim windows and run records, all in Lua.

Every mutation is one Lua script, so "check the holder, then act" is atomic on
the server: Redis runs a script to its end before it serves any other command.
The fencing token comes from ``INCR`` of a counter in the same script as the
``SET NX``. If the counter is missing (a fresh server, or one that restarted
without persistence) it is seeded from the server's clock in microseconds, so
tokens still grow across data loss. Claims and windows made before such a loss
are gone, though: run Redis with AOF (``appendfsync always``) when they must
survive a restart, and never trust a lock across a replica promotion.

Every script, what it checks, the key layout and the rules the scripts keep
for Lua's numbers and for garbage are in ``redis_scripts``. In short: a value
read to decide something that does not decode raises ``CorruptValue`` naming
its key, compare-and-act checks read garbage as "not this lease", listings
skip records that do not decode, and nothing is cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lock_backends import clock
from lock_backends import redis_scripts as lua
from lock_backends._common import ENCODE_SLICE, compact_json, listing_limit, renewed
from lock_backends.base import (
    MAX_LISTING,
    BusyRun,
    Holder,
    Lease,
    RunQuery,
    RunRecord,
    Window,
    local_deadline,
)
from lock_backends.errors import BackendUnavailable, CorruptValue, LockBackendError
from lock_backends.redis_scripts import exact, lock_keys
from lock_backends.url import BackendOptions, bad_url, parse_options, redact

#: Runs kept in the runs (and unfinished) index at most, whatever the retention says.
MAX_RUNS_INDEXED = 10_000
#: Index entries a listing reads at most, whatever its filters skip: a filter that matches nothing
#: costs ~5 round trips (pages double) and, for ``outcome``, reading and decoding 2,000 records (~50 ms).
SCAN_CAP = 2_000
#: Records per ``record_many`` script. 5,000 records (a small result each), measured on a shared 2-core
#: host: 120-200 ms in all while it was quiet, ~50 ms of it encoding JSON in Python (before the op
#: timeout starts) and ~60 ms of server time in five scripts, so none holds the server up for more than
#: ~15 ms; 300-650 ms under a load average of 5-6 (server time 110-250 ms). At most ~3,900: the script
#: unpacks two values per record into one ZADD, and Lua's stack holds ~8,000.
RECORD_CHUNK = 1000
#: Connections one backend instance opens at most; more concurrent operations queue for one.
MAX_CONNECTIONS = 32
#: How long after the holder's key should have expired a waiter looks again.
EXPIRY_SLACK = 0.02
#: How long what a refused acquire saw (holder, expiry) may stand in for a fresh look when a wait starts.
SEEN_FRESH = 0.05


class RedisBackend:
    """Leases on one Redis server (or a primary behind a fixed address)."""

    kind = "redis"

    def __init__(self, url: str, options: BackendOptions) -> None:
        self.url = url
        self.options = options
        parts = urlsplit(url)
        self.address = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        timeout = options.op_timeout
        # A blocking pool: under a burst of claims a caller waits (within the operation timeout)
        # for a free connection, where the default pool fails outright past its cap. Bytes that are
        # not UTF-8 decode to lone surrogates, so garbage reaches the decoders below (and becomes
        # CorruptValue) instead of failing inside the client.
        pool = aioredis.BlockingConnectionPool.from_url(
            url.split("?", 1)[0], max_connections=MAX_CONNECTIONS, timeout=timeout,
            socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False,
            decode_responses=True, encoding_errors="surrogateescape", health_check_interval=0,
        )
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        script = self._client.register_script
        self._acquire, self._renew, self._release = script(lua.ACQUIRE), script(lua.RENEW), script(lua.RELEASE)
        self._claim, self._claim_window = script(lua.CLAIM), script(lua.CLAIM_WINDOW)
        self._hand_back, self._record = script(lua.HAND_BACK), script(lua.RECORD)
        self._claim_mark = script(lua.CLAIM_MARK)
        # lock name -> (holder value, seconds to its expiry, monotonic time) from the last refused acquire
        self._seen: dict[str, tuple[str, float, float]] = {}
        # one subscription kept across waits, so a follower's wait costs no SUBSCRIBE/UNSUBSCRIBE
        self._pubsub: Any = None
        self._subscribed: set[str] = set()
        self._waiting = False

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        parts = urlsplit(url)
        if not parts.hostname:
            raise bad_url(url, "redis URL needs a host")
        try:
            _ = parts.port
        except ValueError:
            raise bad_url(url, "port must be a number") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise bad_url(url, "redis database must be a number, as in redis://host:6379/0")
        options, _ = parse_options(url)
        return cls(url, options)

    # -- helpers ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _op(self, what: str, key: str = "") -> AsyncIterator[None]:
        """Bound the operation by the timeout and translate client errors, in one place.

        ``key`` is the one key a plain command touches: a WRONGTYPE error on it is a CorruptValue.
        """
        try:
            async with asyncio.timeout(self.options.op_timeout):
                yield
        except (TimeoutError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s ({exc})",
                                     backend=self.kind, address=self.address) from None
        except (RedisConnectionError, OSError) as exc:
            raise BackendUnavailable(f"{what} failed: {exc}", backend=self.kind,
                                     address=self.address) from None
        except ResponseError as exc:
            if key and str(exc).startswith("WRONGTYPE"):
                raise self._corrupt(what, key, str(exc)) from None
            raise LockBackendError(f"{what} failed: {exc}", backend=self.kind, address=self.address) from None
        except RedisError as exc:
            raise LockBackendError(f"{what} failed: {exc}", backend=self.kind,
                                   address=self.address) from None

    def _corrupt(self, what: str, key: str, why: str) -> CorruptValue:
        return CorruptValue(f"{what}: {why}", key=key, backend=self.kind, address=self.address)

    async def _script(self, what: str, script: AsyncScript, keys: Sequence[str],
                      args: Sequence[str | int]) -> list[Any]:
        """Run one script; a "corrupt" reply (returned before any write) becomes CorruptValue."""
        async with self._op(what):
            reply = await script(keys=keys, args=args)
        if not isinstance(reply, list) or not reply:
            raise LockBackendError(f"{what}: unexpected reply {reply!r}", backend=self.kind, address=self.address)
        if reply[0] == "corrupt":
            raise self._corrupt(what, str(reply[1]), str(reply[2]))
        return reply

    def _holder(self, what: str, key: str, raw: str) -> Holder:
        try:
            return Holder.from_json(raw)
        except (ValueError, KeyError, TypeError):
            raise self._corrupt(what, key, "the lock holds a value that is not a holder record") from None

    def _window(self, what: str, busy_key: str, reply: list[Any]) -> Window:
        """A script's {'ok', token, since_us, until_us, sealed, busy JSON...} as a Window."""
        busy: list[BusyRun] = []
        for raw in reply[5:]:
            try:
                busy.append(BusyRun.from_dict(json.loads(raw)))
            except ValueError:
                raise self._corrupt(what, busy_key, "a busy entry is not a busy-run record") from None
        mark = {"token": int(reply[1]), "since_us": int(reply[2]), "until_us": int(reply[3]),
                "sealed": reply[4] == "1"}
        return Window.from_dict(mark, tuple(busy))

    def _retention(self) -> list[str | int]:
        """Retention seconds, retention milliseconds and the index cap, as the scripts take them."""
        retention = self.options.claim_retention
        return [repr(retention), max(1, int(retention * 1000)), MAX_RUNS_INDEXED]

    @staticmethod
    def _claim_prefix(lease: Lease) -> str:
        """A claim's JSON up to its ``claimed_at``, which the script appends from the server's clock."""
        return f'{{"token":{lease.token},"node_id":{json.dumps(lease.holder.node_id)},"claimed_at":'

    # -- LeaseStore ------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        k = lock_keys(name)
        value = json.dumps({"node_id": holder.node_id, "url": holder.url, "nonce": secrets.token_hex(8)})
        t_sent = clock.monotonic()
        reply = await self._script("acquire", self._acquire, [k["lock"], k["fence"], k["events"]],
                                   [value, max(1, int(ttl * 1000))])
        if reply[0] == "held":  # refused: the script says who holds it and for how long
            held_by, pttl = str(reply[1]), reply[2]
            self._holder("acquire", k["lock"], held_by)  # garbage is an error, never somebody's lease
            self._seen[name] = (held_by, _seconds_left(pttl), clock.monotonic())
            return None
        return Lease(name, holder, int(reply[1]), ttl, local_deadline(t_sent, ttl), handle=value)

    def _fresh(self, name: str) -> tuple[str, float] | None:
        """What a refused acquire saw just now: the election loop starts its wait right after."""
        seen = self._seen.get(name)
        if seen is None or clock.monotonic() - seen[2] > SEEN_FRESH:
            return None
        return seen[0], max(0.0, seen[1] - (clock.monotonic() - seen[2]))

    async def renew(self, lease: Lease) -> Lease | None:
        k = lock_keys(lease.name)
        t_sent = clock.monotonic()
        async with self._op("renew"):
            ok = await self._renew(keys=[k["lock"], k["fence"]],
                                   args=[lease.handle, max(1, int(lease.ttl * 1000)), lease.token])
        if not ok:
            return None
        return renewed(lease, t_sent)

    async def release(self, lease: Lease) -> None:
        k = lock_keys(lease.name)
        async with self._op("release"):
            await self._release(keys=[k["lock"], k["fence"], k["events"]], args=[lease.handle, lease.token])

    async def leader(self, name: str) -> Holder | None:
        key = lock_keys(name)["lock"]
        async with self._op("leader", key):
            raw = cast(str | None, await self._client.get(key))  # decode_responses: text
        return None if raw is None else self._holder("leader", key, raw)

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Wake on the lock's pub/sub channel, or when the holder's key would expire.

        An expiry publishes nothing, so the waiter reads the key's remaining TTL
        (or takes it from the acquire just refused) and looks again only then.
        The subscription stays open between waits. A follower therefore costs
        the server its acquire per retry period and little else, and still sees
        a crashed holder's lease run out at once.
        """
        k = lock_keys(name)
        deadline = clock.monotonic() + timeout
        shared = not self._waiting  # a second waiter at once gets a subscription of its own
        pubsub = (self._pubsub or self._client.pubsub()) if shared else self._client.pubsub()
        if shared:
            self._waiting, self._pubsub = True, pubsub
        broken = False
        try:
            try:
                async with self._op("wait_for_change"):
                    # what the refused acquire saw is still current only if the subscription was
                    # already open when it looked: any change since then is waiting in it
                    seen = self._fresh(name) if shared and k["events"] in self._subscribed else None
                    if not shared or k["events"] not in self._subscribed:
                        await pubsub.subscribe(k["events"])
                        if shared:
                            self._subscribed.add(k["events"])
                    before, expires_in = seen if seen is not None else await self._lock_state(k["lock"])
            except LockBackendError:
                broken = True
                await asyncio.sleep(max(0.0, min(timeout, self.options.op_timeout)))
                return
            if before is None:
                return  # freed between the failed acquire and the subscription: go and acquire
            while (left := deadline - clock.monotonic()) > 0:
                try:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=min(left, expires_in + EXPIRY_SLACK))
                    if message is not None or clock.monotonic() >= deadline:
                        return
                    async with self._op("wait_for_change"):
                        now, expires_in = await self._lock_state(k["lock"])
                    if now != before:
                        return
                except (LockBackendError, RedisError, OSError):
                    broken = True
                    await asyncio.sleep(min(max(left, 0.0), self.options.op_timeout))
                    expires_in = 0.0
        except BaseException:
            broken = True  # cancelled mid-read: the connection's state is unknown
            raise
        finally:
            if shared:
                self._waiting = False
            if not shared or broken:
                if shared:
                    self._pubsub = None
                    self._subscribed.clear()
                await _close_quietly(pubsub)

    async def _lock_state(self, key: str) -> tuple[str | None, float]:
        """The lock's value and seconds until it expires (0 when gone, infinite without an expiry).

        A key of the wrong type reads as a value that never changes on its own: the waiter waits.
        """
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = await pipe.execute(raise_on_error=False)
        if isinstance(pttl, Exception):
            raise LockBackendError(f"PTTL failed: {pttl}", backend=self.kind, address=self.address)
        return (value if value is None or isinstance(value, str) else "<not a string>"), _seconds_left(pttl)

    async def server_time(self) -> float | None:
        async with self._op("server_time"):
            seconds, micros = await self._client.time()
        return int(seconds) + int(micros) / 1_000_000

    async def close(self) -> None:
        if self._pubsub is not None:
            await _close_quietly(self._pubsub)
            self._pubsub = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.op_timeout):
                await self._client.aclose()

    # -- ClaimStore ------------------------------------------------------------

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        k = lock_keys(lease.name)
        unique = list(dict.fromkeys(intents))
        reply = await self._script(
            "claim_window", self._claim_window,
            [k["lock"], k["fence"], k["window"], k["busy"], k["runs"], k["open"], *(k["claim"] + i for i in unique)],
            [lease.handle, lease.token, exact(until_us), exact(start_us), *self._retention(),
             self._claim_prefix(lease), *unique])
        return None if reply[0] == "fenced" else self._window("claim_window", k["busy"], reply)

    async def claim_mark(self, name: str) -> Window:
        key = lock_keys(name)["window"]
        return self._window("claim_mark", key, await self._script("claim_mark", self._claim_mark, [key], []))

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        k = lock_keys(lease.name)
        unique = list(dict.fromkeys(drop))
        pairs = [part for run in busy for part in (run.key, compact_json(run.to_dict()))]
        reply = await self._script(
            "hand_back", self._hand_back,
            [k["window"], k["busy"], k["runs"], k["open"], *(k["claim"] + key for key in unique)],
            [lease.token, exact(at_us), len(busy), *pairs, *unique])
        return None if reply[0] == "none" else self._window("hand_back", k["busy"], reply)

    async def claim(self, lease: Lease, key: str) -> bool:
        return key in await self.claim_many(lease, [key])

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        k = lock_keys(lease.name)
        reply = await self._script(
            "claim", self._claim,
            [k["lock"], k["fence"], k["runs"], k["open"], *(k["claim"] + key for key in unique)],
            [lease.handle, lease.token, *self._retention(), self._claim_prefix(lease), *unique])
        return {unique[int(i) - 1] for i in reply[1:]}

    # -- RunStore --------------------------------------------------------------

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        # everything is encoded (and refused, if it cannot be) before the first write, each row to its JSON
        # here a slice at a time: a chunk encoded at once (1,000 rows) held the loop for about a millisecond
        rows: list[str] = []
        for i, run in enumerate(records, 1):
            if i % ENCODE_SLICE == 0:
                await asyncio.sleep(0)  # the scheduler's fire times wait behind no long stretch of encoding
            if not math.isfinite(run.claimed_at):
                raise ValueError(f"run {run.key!r}: claimed_at {run.claimed_at!r} is not a finite number")
            value = compact_json({"token": run.token, "node_id": run.node_id, "claimed_at": run.claimed_at,
                           "result": run.result})
            rows.append(compact_json([run.key, repr(float(run.claimed_at)), value]))
        chunks = ["[" + ",".join(rows[at:at + RECORD_CHUNK]) + "]" for at in range(0, len(rows), RECORD_CHUNK)]
        k = lock_keys(name)
        async with self._op("record_many"):  # one timeout for every chunk
            for chunk in chunks:
                await self._script("record_many", self._record, [k["runs"], k["open"], k["busy"]],
                                   [*self._retention(), k["claim"], chunk])

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        """Newest first, from the runs index read in pages (SCAN_CAP entries at most, whatever the filters
        skip). A page ends with every run at its last instant, so a cursor at that instant skips none
        (MAX_LISTING runs at most, though)."""
        limit = listing_limit(query)
        if limit == 0:
            return []
        floor = clock.time() - self.options.claim_retention  # what the next write will trim anyway
        since = floor if query.since is None else max(query.since, floor)
        top = "+inf" if query.before is None else f"({query.before!r}"
        found: list[RunRecord] = []

        def take(run: RunRecord) -> bool:
            if len(found) >= limit and (len(found) >= MAX_LISTING or run.claimed_at < found[-1].claimed_at):
                return False
            if query.matches(run):
                found.append(run)
            return True

        k = lock_keys(name)
        async with self._op("runs", k["runs"]):
            await self._scan(k, "runs", top, repr(since), limit + 1, SCAN_CAP, take,
                             lambda member: query.job is None or member.partition("@")[0] == query.job)
        return found

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        if limit <= 0:
            return []
        found: list[RunRecord] = []

        def take(run: RunRecord) -> bool:
            if run.result is None:
                found.append(run)
            return len(found) < limit

        k = lock_keys(name)
        floor = clock.time() - self.options.claim_retention
        async with self._op("unfinished", k["open"]):
            await self._scan(k, "open", "+inf", repr(floor), limit, limit + SCAN_CAP, take)
        return found

    async def _scan(self, k: dict[str, str], index: str, top: str, bottom: str, page: int, cap: int,
                    take: Callable[[RunRecord], bool], want: Callable[[str], bool] = lambda _: True) -> None:
        """Feed ``take`` the records an index names (scores from ``top`` down to ``bottom``), newest first,
        until it returns False or ``cap`` entries were read. Only members ``want`` accepts are fetched;
        entries whose record expired, or does not decode, are skipped, and so are repeats (a write between
        two pages shifts the offsets)."""
        offset, seen = 0, set[str]()
        while offset < cap:
            count = min(page, cap - offset)
            page *= 2  # a filter that skips much reads further in few round trips
            members = cast(list[str], await self._client.zrevrangebyscore(k[index], top, bottom, start=offset,
                                                                          num=count))
            offset += len(members)
            fetch = [m for m in members if m not in seen and want(m)]
            seen.update(fetch)
            raws = cast(list[str | None], await self._client.mget([k["claim"] + m for m in fetch])) if fetch else []
            for member, raw in zip(fetch, raws, strict=True):
                run = _decode_run(member, raw)
                if run is not None and not take(run):
                    return
            if len(members) < count:
                return

    # -- SettingStore ----------------------------------------------------------

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        settings_key = lock_keys(name)["settings"]
        async with self._op("set_setting", settings_key):
            if value is None:
                await self._client.hdel(settings_key, key)
            else:
                await self._client.hset(settings_key, key, value)

    async def settings(self, name: str) -> dict[str, str]:
        settings_key = lock_keys(name)["settings"]
        async with self._op("settings", settings_key):
            found = cast(dict[str, str], await self._client.hgetall(settings_key))
        for field, value in found.items():
            try:
                (field + value).encode()
            except UnicodeEncodeError:
                raise self._corrupt("settings", settings_key, f"setting {field!r} is not UTF-8 text") from None
        return dict(found)

    def __repr__(self) -> str:
        return f"RedisBackend({redact(self.url)!r})"


def _decode_run(key: str, raw: str | None) -> RunRecord | None:
    if raw is None:
        return None  # expired since it was indexed
    try:
        return RunRecord.from_dict(key, json.loads(raw))
    except ValueError:
        return None  # garbage: listings skip it


def _seconds_left(pttl: Any) -> float:
    """PTTL in seconds: infinite for a key without expiry (-1), zero for a missing one (-2)."""
    pttl = int(pttl)
    return float("inf") if pttl == -1 else max(0.0, pttl / 1000)


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await pubsub.aclose()

