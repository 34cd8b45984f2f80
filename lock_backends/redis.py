"""Redis backend: ``SET NX PX`` leases with a fencing counter, all in Lua.

Every mutation is one Lua script, so "check the holder, then act" is atomic on
the server. The fencing token comes from ``INCR`` of a counter in the same
script as the ``SET NX``. If the counter is missing (a fresh server, or one
that restarted without persistence) it is seeded from the server's clock in
microseconds, so tokens still grow across data loss. Claims made before such a
loss are gone, though: run Redis with AOF (``appendfsync always``) when claims
must survive a restart, and never trust a lock across a replica promotion.

Keys, for a lock named N: ``baton:{N}:lock`` (holder JSON with a nonce),
``baton:{N}:fence`` (last token), ``baton:{N}:claim:<key>`` (claim and
result), ``baton:{N}:runs`` (sorted set of claim keys by time) and
``baton:{N}:settings`` (hash). The ``{N}`` hash tag keeps one lock's keys in
one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lock_backends.base import Holder, Lease, RunRecord, local_deadline
from lock_backends.errors import BackendUnavailable, LockBackendError
from lock_backends.url import BackendOptions, bad_url, parse_options, redact

#: Claims kept in the runs index at most, whatever the retention says.
MAX_RUNS_INDEXED = 10_000
#: Connections one backend instance opens at most; more concurrent operations queue for one.
MAX_CONNECTIONS = 32
#: How long after the holder's key should have expired a waiter looks again.
EXPIRY_SLACK = 0.02
#: How long what a refused acquire saw (holder, expiry) may stand in for a fresh look when a wait starts.
SEEN_FRESH = 0.05

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.call('INCR', KEYS[2])
  if token == 1 then
    local now = redis.call('TIME')
    token = tonumber(now[1]) * 1000000 + tonumber(now[2])
    redis.call('SET', KEYS[2], token)
  end
  redis.call('PUBLISH', KEYS[3], 'acquired')
  return token
end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[3] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[3], 'released')
  return 1
end
return 0
"""

_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[7])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[8]) - 1)
return 1
"""

# KEYS: lock, fence, runs, then one claim key per run; ARGV: handle, token, claim, retention ms, now,
# runs cutoff, runs cap, then the run keys in KEYS' order. Returns the positions (1-based) claimed.
_CLAIM_MANY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return {}
end
local claimed = {}
for i = 4, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[3], 'NX', 'PX', ARGV[4]) then
    redis.call('ZADD', KEYS[3], ARGV[5], ARGV[i + 4])
    claimed[#claimed + 1] = i - 3
  end
end
if #claimed > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[7]) - 1)
end
return claimed
"""

# Splices the result into the claim's JSON as text: a cjson round trip would print the token
# (a 16-digit integer) with 14 significant digits and corrupt it.
_RECORD = """
for i = 1, #KEYS do
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local at = string.find(raw, ',"result":', 1, true)
    local base = at and string.sub(raw, 1, at - 1) or string.sub(raw, 1, -2)
    redis.call('SET', KEYS[i], base .. ',"result":' .. ARGV[i] .. '}', 'KEEPTTL')
  end
end
return 1
"""


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
        # for a free connection, where the default pool fails outright past its cap.
        pool = aioredis.BlockingConnectionPool.from_url(
            url.split("?", 1)[0], max_connections=MAX_CONNECTIONS, timeout=timeout,
            socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False, decode_responses=True, health_check_interval=0,
        )
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        self._claim = self._client.register_script(_CLAIM)
        self._claim_many = self._client.register_script(_CLAIM_MANY)
        self._record = self._client.register_script(_RECORD)
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
    async def _op(self, what: str) -> AsyncIterator[None]:
        """Bound the operation by the timeout and translate client errors, in one place."""
        try:
            async with asyncio.timeout(self.options.op_timeout):
                yield
        except (TimeoutError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s ({exc})",
                                     backend=self.kind, address=self.address) from None
        except (RedisConnectionError, OSError) as exc:
            raise BackendUnavailable(f"{what} failed: {exc}", backend=self.kind,
                                     address=self.address) from None
        except RedisError as exc:
            raise LockBackendError(f"{what} failed: {exc}", backend=self.kind,
                                   address=self.address) from None

    @staticmethod
    def _keys(name: str) -> dict[str, str]:
        base = f"baton:{{{name}}}"
        return {"lock": f"{base}:lock", "fence": f"{base}:fence", "events": f"{base}:events",
                "runs": f"{base}:runs", "settings": f"{base}:settings", "claim": f"{base}:claim:"}

    # -- protocol --------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        k = self._keys(name)
        value = json.dumps({"node_id": holder.node_id, "url": holder.url, "nonce": secrets.token_hex(8)})
        t_sent = time.monotonic()
        async with self._op("acquire"):
            token = await self._acquire(keys=[k["lock"], k["fence"], k["events"]],
                                        args=[value, int(ttl * 1000)])
        if isinstance(token, list):  # refused: the script says who holds it and for how long
            held_by, pttl = token
            self._seen[name] = (held_by, _seconds_left(pttl), time.monotonic())
            return None
        return Lease(name, holder, int(token), ttl, local_deadline(t_sent, ttl), handle=value)

    def _fresh(self, name: str) -> tuple[str, float] | None:
        """What a refused acquire saw just now: the election loop starts its wait right after."""
        seen = self._seen.get(name)
        if seen is None or time.monotonic() - seen[2] > SEEN_FRESH:
            return None
        return seen[0], max(0.0, seen[1] - (time.monotonic() - seen[2]))

    async def renew(self, lease: Lease) -> Lease | None:
        k = self._keys(lease.name)
        t_sent = time.monotonic()
        async with self._op("renew"):
            ok = await self._renew(keys=[k["lock"], k["fence"]],
                                   args=[lease.handle, int(lease.ttl * 1000), lease.token])
        if not ok:
            return None
        return Lease(lease.name, lease.holder, lease.token, lease.ttl,
                     local_deadline(t_sent, lease.ttl), handle=lease.handle)

    async def release(self, lease: Lease) -> None:
        k = self._keys(lease.name)
        async with self._op("release"):
            await self._release(keys=[k["lock"], k["fence"], k["events"]], args=[lease.handle, lease.token])

    async def leader(self, name: str) -> Holder | None:
        async with self._op("leader"):
            raw = await self._client.get(self._keys(name)["lock"])
        return Holder.from_json(raw) if raw else None

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Wake on the lock's pub/sub channel, or when the holder's key would expire.

        An expiry publishes nothing, so the waiter reads the key's remaining TTL
        (or takes it from the acquire just refused) and looks again only then.
        The subscription stays open between waits. A follower therefore costs
        the server its acquire per retry period and little else, and still sees
        a crashed holder's lease run out at once.
        """
        k = self._keys(name)
        deadline = time.monotonic() + timeout
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
            except BackendUnavailable:
                broken = True
                await asyncio.sleep(max(0.0, min(timeout, self.options.op_timeout)))
                return
            if before is None:
                return  # freed between the failed acquire and the subscription: go and acquire
            while (left := deadline - time.monotonic()) > 0:
                try:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=min(left, expires_in + EXPIRY_SLACK))
                    if message is not None or time.monotonic() >= deadline:
                        return
                    async with self._op("wait_for_change"):
                        now, expires_in = await self._lock_state(k["lock"])
                    if now != before:
                        return
                except (BackendUnavailable, RedisError, OSError):
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
        """The lock's value and seconds until it expires (0 when gone, infinite without an expiry)."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = await pipe.execute()
        return value, _seconds_left(pttl)

    async def claim(self, lease: Lease, key: str) -> bool:
        k = self._keys(lease.name)
        now = time.time()
        retention_ms = int(self.options.claim_retention * 1000)
        claim = json.dumps({"token": lease.token, "node_id": lease.holder.node_id, "claimed_at": now})
        async with self._op("claim"):
            ok = await self._claim(
                keys=[k["lock"], k["fence"], k["claim"] + key, k["runs"]],
                args=[lease.handle, lease.token, claim, retention_ms, now, key,
                      now - self.options.claim_retention, MAX_RUNS_INDEXED])
        return bool(ok)

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        k = self._keys(lease.name)
        now = time.time()
        claim = json.dumps({"token": lease.token, "node_id": lease.holder.node_id, "claimed_at": now})
        async with self._op("claim"):
            positions = await self._claim_many(
                keys=[k["lock"], k["fence"], k["runs"], *(k["claim"] + key for key in unique)],
                args=[lease.handle, lease.token, claim, int(self.options.claim_retention * 1000), now,
                      now - self.options.claim_retention, MAX_RUNS_INDEXED, *unique])
        return {unique[int(i) - 1] for i in positions}

    async def record(self, name: str, key: str, result: dict[str, Any]) -> None:
        await self.record_many(name, {key: result})

    async def record_many(self, name: str, results: Mapping[str, dict[str, Any]]) -> None:
        if not results:
            return
        prefix = self._keys(name)["claim"]
        async with self._op("record"):
            await self._record(keys=[prefix + key for key in results],
                               args=[json.dumps(result) for result in results.values()])

    async def runs(self, name: str, limit: int = 50) -> list[RunRecord]:
        k = self._keys(name)
        async with self._op("runs"):
            keys = await self._client.zrevrange(k["runs"], 0, max(limit, 1) - 1)
            raws = await self._client.mget([k["claim"] + key for key in keys]) if keys else []
        records = []
        for key, raw in zip(keys, raws, strict=True):
            if raw is None:
                continue  # expired since it was indexed
            data = json.loads(raw)
            records.append(RunRecord(key=key, token=int(data["token"]), node_id=str(data["node_id"]),
                                     claimed_at=float(data["claimed_at"]), result=data.get("result")))
        return records[:limit]

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        settings_key = self._keys(name)["settings"]
        async with self._op("set_setting"):
            if value is None:
                await self._client.hdel(settings_key, key)
            else:
                await self._client.hset(settings_key, key, value)

    async def settings(self, name: str) -> dict[str, str]:
        async with self._op("settings"):
            return dict(await self._client.hgetall(self._keys(name)["settings"]))

    async def close(self) -> None:
        if self._pubsub is not None:
            await _close_quietly(self._pubsub)
            self._pubsub = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.op_timeout):
                await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisBackend({redact(self.url)!r})"


def _seconds_left(pttl: Any) -> float:
    """PTTL in seconds: infinite for a key without expiry (-1), zero for a missing one (-2)."""
    pttl = int(pttl)
    return float("inf") if pttl == -1 else max(0.0, pttl / 1000)


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await pubsub.aclose()
