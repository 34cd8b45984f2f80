"""Redis backend: ``SET NX PX`` leases with a fencing counter, claim windows and run records, all in Lua.

Every mutation is one Lua script, so "check the holder, then act" is atomic on
the server: Redis runs a script to its end before it serves any other command.
The fencing token comes from ``INCR`` of a counter in the same script as the
``SET NX``. If the counter is missing (a fresh server, or one that restarted
without persistence) it is seeded from the server's clock in microseconds, so
tokens still grow across data loss. Claims and windows made before such a loss
are gone, though: run Redis with AOF (``appendfsync always``) when they must
survive a restart, and never trust a lock across a replica promotion.

Keys, for a lock named N (the ``{N}`` hash tag keeps them in one Redis Cluster slot):

``baton:{N}:lock``        string, expires after the TTL: the holder's JSON with a nonce (the lease's handle)
``baton:{N}:fence``       string: the last token issued, a decimal integer
``baton:{N}:window``      hash: the claim mark, fields ``token``, ``since_us``, ``until_us`` (decimal
                          integers) and ``sealed`` (``0`` or ``1``)
``baton:{N}:busy``        hash: run key -> ``BusyRun`` JSON, written by ``hand_back``
``baton:{N}:claim:<key>`` string, expires after the retention: the run record's JSON (claim, intent or result)
``baton:{N}:runs``        sorted set: run keys by ``claimed_at``, within the retention, MAX_RUNS_INDEXED at most
``baton:{N}:open``        sorted set: the run keys without a result, by ``claimed_at`` (``unfinished``)
``baton:{N}:settings``    hash
``baton:{N}:events``      pub/sub channel: ``acquired``, ``released``

``claim_window`` is one script: it compares the lock's value with the lease's
handle and the fence with its token (the fencing check), reads and checks the
mark, the busy entries and the records the intents would replace, applies
``base.next_window`` and only then writes: the mark, the intents, the pruning
of expired busy entries. A value that does not decode stops the script before
its first write, so an error never leaves half an operation behind.
``hand_back`` is one script too, conditioned on the mark's token (not the
lock's, which may have lapsed).

Numbers: Lua's are doubles, exact for integers below 2**53 (microsecond
timestamps and tokens are near 1.8e15), but ``tostring`` and ``cjson.encode``
print 14 significant digits. So the scripts never print a number they
computed: the mark is stored as separate hash fields, copied as the strings
Python sent or the hash held; JSON is written by Python, or spliced together
from such strings (an intent's ``claimed_at`` is the text of ``TIME``).

Garbage (another program's value, a hand edit): a value read to decide
something raises ``CorruptValue`` naming its key, and never reads as absent. That
covers a lock key that is not a holder's JSON (``leader``, ``acquire``), a fence
that is not an integer (``acquire``, checked before its ``SET NX``), a mark or busy
entry that does not decode (``claim_window``, ``hand_back``), a run record a
claim or an intent would replace (``claim``, ``claim_many``, ``claim_window``),
and a key of the wrong type. Compare-and-act checks (``renew``, ``release``,
the fencing check of claims and windows) compare bytes with the lease's own
value, so garbage there reads as "not this lease" and the caller stops acting.
``hand_back`` leaves a dropped intent it cannot read alone (nothing shows it is
its token's), and listings skip a record that does not decode. Nothing is
cached: once the value is repaired (or the lock key deleted) the next
operation works.
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
from lock_backends.base import MAX_LISTING, BusyRun, Holder, Lease, RunQuery, RunRecord, Window, local_deadline
from lock_backends.errors import BackendUnavailable, CorruptValue, LockBackendError
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
#: Integers above this are not exact as Lua numbers.
EXACT = 2**53

_JSON = json.JSONEncoder(separators=(",", ":")).encode

# Helpers every script starts with. A "corrupt" reply names the key; it is returned before any write.
_LIB = """
local EXACT = 9007199254740992
local function corrupt(key, why) return {'corrupt', key, why} end
local function whole(n) return type(n) == 'number' and n == math.floor(n) and n > -EXACT and n < EXACT end
local function int_text(s)
  if type(s) ~= 'string' or not string.match(s, '^%-?%d+$') then return nil end
  local n = tonumber(s)
  if whole(n) then return n end
  return nil
end
local function wrong_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then return corrupt(key, 'holds a ' .. t .. ', not a ' .. want) end
  return nil
end
local function holds(lock, fence, handle, token)
  return redis.pcall('GET', lock) == handle and redis.pcall('GET', fence) == token
end
local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000000 + us, t[1] .. '.' .. string.format('%06d', us), s + us / 1000000
end
local function record(key)
  local raw = redis.pcall('GET', key)
  if type(raw) == 'table' then return nil, corrupt(key, raw['err']) end
  if not raw then return false end
  local ok, r = pcall(cjson.decode, raw)
  if not ok or type(r) ~= 'table' or not whole(r['token']) or type(r['claimed_at']) ~= 'number'
      or r['node_id'] == nil or not (r['result'] == nil or r['result'] == cjson.null
      or type(r['result']) == 'table') then
    return nil, corrupt(key, 'not a run record')
  end
  return r
end
local function finished(r) return type(r['result']) == 'table' end
local function read_mark(key)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return false end
  if t ~= 'hash' then return nil, corrupt(key, 'holds a ' .. t .. ', not a claim-window hash') end
  local f = redis.call('HMGET', key, 'token', 'since_us', 'until_us', 'sealed')
  local m = {t = f[1], s = f[2], u = f[3], sealed = f[4]}
  m.tn, m.sn, m.un = int_text(m.t), int_text(m.s), int_text(m.u)
  if not (m.tn and m.sn and m.un) or (m.sealed ~= '0' and m.sealed ~= '1') then
    return nil, corrupt(key, 'not a claim-window mark')
  end
  return m
end
local function write_mark(key, m)
  redis.call('HSET', key, 'token', m.t, 'since_us', m.s, 'until_us', m.u, 'sealed', m.sealed)
end
local function read_busy(key, now_us)
  local bad = wrong_type(key, 'hash')
  if bad then return nil, nil, bad end
  local flat = redis.call('HGETALL', key)
  local live, expired = {}, {}
  for i = 1, #flat, 2 do
    local ok, b = pcall(cjson.decode, flat[i + 1])
    if not ok or type(b) ~= 'table' or b['key'] == nil or b['job_id'] == nil or b['node_id'] == nil
        or not whole(b['token']) or not whole(b['until_us']) then
      return nil, nil, corrupt(key, 'busy entry ' .. flat[i] .. ' is not a busy-run record')
    end
    if b['until_us'] <= now_us then expired[#expired + 1] = flat[i] else live[#live + 1] = flat[i + 1] end
  end
  return live, expired, nil
end
local function answer(m, live, expired, busy_key)
  for _, field in ipairs(expired) do redis.call('HDEL', busy_key, field) end
  local out = {'ok', m.t, m.s, m.u, m.sealed}
  for _, raw in ipairs(live) do out[#out + 1] = raw end
  return out
end
local function trim(index, cutoff, cap)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', cutoff)
  redis.call('ZREMRANGEBYRANK', index, 0, -cap - 1)
end
"""

# KEYS: lock, fence, events. ARGV: holder value, ttl ms. The fence is checked before the SET NX:
# an INCR error after it would leave a lock nobody holds.
_ACQUIRE = _LIB + """
local fence = redis.pcall('GET', KEYS[2])
if type(fence) == 'table' then return corrupt(KEYS[2], fence['err']) end
if fence and not (string.match(fence, '^%d+$') and int_text(fence)) then
  return corrupt(KEYS[2], 'the fencing counter is not an integer')
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.call('INCR', KEYS[2])
  if token == 1 then
    token = clock()
    redis.call('SET', KEYS[2], token)
  end
  redis.call('PUBLISH', KEYS[3], 'acquired')
  return {'ok', token}
end
local held = redis.pcall('GET', KEYS[1])
if type(held) == 'table' then return corrupt(KEYS[1], held['err']) end
return {'held', held, redis.call('PTTL', KEYS[1])}
"""

_RENEW = _LIB + """
if holds(KEYS[1], KEYS[2], ARGV[1], ARGV[3]) then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = _LIB + """
if holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[3], 'released')
  return 1
end
return 0
"""

# KEYS: lock, fence, runs, open, then one claim key per run key.
# ARGV: handle, token, retention s, retention ms, index cap, record prefix, then the run keys.
# Returns {'ok', positions claimed (1-based)...} or {'fenced'}.
_CLAIM = _LIB + """
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return {'fenced'} end
for _, index in ipairs({KEYS[3], KEYS[4]}) do
  local bad = wrong_type(index, 'zset')
  if bad then return bad end
end
local token = tonumber(ARGV[2])
local found = {}
for i = 5, #KEYS do
  local r, bad = record(KEYS[i])
  if bad then return bad end
  found[i] = r
end
local _, now_text, now_s = clock()
local out, added = {'ok'}, false
for i = 5, #KEYS do
  if not found[i] then
    redis.call('SET', KEYS[i], ARGV[6] .. now_text .. '}', 'PX', ARGV[4])
    redis.call('ZADD', KEYS[3], now_text, ARGV[i + 2])
    redis.call('ZADD', KEYS[4], now_text, ARGV[i + 2])
    out[#out + 1], added = i - 4, true
  elseif found[i]['token'] == token then
    out[#out + 1] = i - 4
  end
end
if added then
  trim(KEYS[3], now_s - tonumber(ARGV[3]), tonumber(ARGV[5]))
  trim(KEYS[4], now_s - tonumber(ARGV[3]), tonumber(ARGV[5]))
end
return out
"""

# KEYS: lock, fence, window, busy, runs, open, then one claim key per intent.
# ARGV: handle, token, until_us, start_us, retention s, retention ms, index cap, record prefix, then the
# intents' run keys. Returns {'ok', token, since_us, until_us, sealed, busy JSON...} or {'fenced'}.
_CLAIM_WINDOW = _LIB + """
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return {'fenced'} end
local mark, bad = read_mark(KEYS[3])
if bad then return bad end
local now_us, now_text, now_s = clock()
local live, expired, bad_busy = read_busy(KEYS[4], now_us)
if bad_busy then return bad_busy end
for _, index in ipairs({KEYS[5], KEYS[6]}) do
  local wrong = wrong_type(index, 'zset')
  if wrong then return wrong end
end
local token, want, start = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local new = mark  -- base.next_window, on the stored strings
if not mark or mark.tn == 0 then
  new = {t = ARGV[2], s = start <= want and ARGV[4] or ARGV[3], u = ARGV[3], sealed = '0'}
elseif mark.tn == token then
  if mark.sealed == '0' and want > mark.un then new = {t = ARGV[2], s = mark.s, u = ARGV[3], sealed = '0'} end
elseif mark.tn < token and want > mark.un then
  new = {t = ARGV[2], s = mark.u, u = ARGV[3], sealed = '0'}
end
local fresh = {}
if tonumber(new.t) == token and new.sealed == '0' then
  for i = 7, #KEYS do
    local r, bad_record = record(KEYS[i])
    if bad_record then return bad_record end
    if not r or not finished(r) then fresh[#fresh + 1] = i end
  end
end
if new ~= mark then write_mark(KEYS[3], new) end
for _, i in ipairs(fresh) do
  redis.call('SET', KEYS[i], ARGV[8] .. now_text .. '}', 'PX', ARGV[6])
  redis.call('ZADD', KEYS[5], now_text, ARGV[i + 2])
  redis.call('ZADD', KEYS[6], now_text, ARGV[i + 2])
end
if #fresh > 0 then
  trim(KEYS[5], now_s - tonumber(ARGV[5]), tonumber(ARGV[7]))
  trim(KEYS[6], now_s - tonumber(ARGV[5]), tonumber(ARGV[7]))
end
return answer(new, live, expired, KEYS[4])
"""

# KEYS: window, busy, runs, open, then one claim key per intent to drop.
# ARGV: token, at_us, number of busy runs n, n pairs (run key, BusyRun JSON), then the dropped run keys.
# Returns {'ok', token, since_us, until_us, sealed, busy JSON...} or {'none'}. A dropped key whose
# record does not decode is left alone: nothing shows it is this token's.
_HAND_BACK = _LIB + """
local mark, bad = read_mark(KEYS[1])
if bad then return bad end
local token = tonumber(ARGV[1])
if not mark or mark.tn ~= token then return {'none'} end
local now_us = clock()
local _, _, bad_busy = read_busy(KEYS[2], now_us)
if bad_busy then return bad_busy end
for _, index in ipairs({KEYS[3], KEYS[4]}) do
  local wrong = wrong_type(index, 'zset')
  if wrong then return wrong end
end
local new = mark  -- base.handed_back
if mark.sealed == '0' then
  local u = mark.u
  if tonumber(ARGV[2]) < mark.un then u = ARGV[2] end
  if tonumber(u) < mark.sn then u = mark.s end
  new = {t = mark.t, s = mark.s, u = u, sealed = '1'}
  write_mark(KEYS[1], new)
end
local n = tonumber(ARGV[3])
for i = 1, n do redis.call('HSET', KEYS[2], ARGV[2 + 2 * i], ARGV[3 + 2 * i]) end
for i = 5, #KEYS do
  local r = record(KEYS[i])
  if r and r['token'] == token and not finished(r) then
    local member = ARGV[3 + 2 * n + i - 4]
    redis.call('DEL', KEYS[i])
    redis.call('ZREM', KEYS[3], member)
    redis.call('ZREM', KEYS[4], member)
  end
end
local live, expired = read_busy(KEYS[2], now_us)
return answer(new, live, expired, KEYS[2])
"""

# KEYS: runs, open, busy. ARGV: retention s, retention ms, index cap, the claim keys' prefix and a JSON
# array of [run key, claimed_at, record JSON]: all strings, so nothing is re-encoded. One argument per
# chunk, because packing thousands of small ones costs the client more than the script costs the
# server; so the claim keys are named in the script, not in KEYS (the {N} hash tag still puts them in
# the slot of the keys declared).
_RECORD = _LIB + """
for _, check in ipairs({{KEYS[1], 'zset'}, {KEYS[2], 'zset'}, {KEYS[3], 'hash'}}) do
  local bad = wrong_type(check[1], check[2])
  if bad then return bad end
end
local rows = cjson.decode(ARGV[5])
local scored, members = {}, {}
for i, row in ipairs(rows) do
  redis.call('SET', ARGV[4] .. row[1], row[3], 'PX', ARGV[2])
  scored[2 * i - 1], scored[2 * i], members[i] = row[2], row[1], row[1]
end
redis.call('ZADD', KEYS[1], unpack(scored))
redis.call('ZREM', KEYS[2], unpack(members))
redis.call('HDEL', KEYS[3], unpack(members))
local _, _, now_s = clock()
trim(KEYS[1], now_s - tonumber(ARGV[1]), tonumber(ARGV[3]))
return {'ok'}
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
        self._acquire, self._renew, self._release = script(_ACQUIRE), script(_RENEW), script(_RELEASE)
        self._claim, self._claim_window, self._hand_back = script(_CLAIM), script(_CLAIM_WINDOW), script(_HAND_BACK)
        self._record = script(_RECORD)
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

    @staticmethod
    def _keys(name: str) -> dict[str, str]:
        base = f"baton:{{{name}}}"
        keys = {part: f"{base}:{part}" for part in
                ("lock", "fence", "events", "window", "busy", "runs", "open", "settings")}
        return {**keys, "claim": f"{base}:claim:"}  # a prefix: the run key follows

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
        k = self._keys(name)
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
        k = self._keys(lease.name)
        t_sent = clock.monotonic()
        async with self._op("renew"):
            ok = await self._renew(keys=[k["lock"], k["fence"]],
                                   args=[lease.handle, max(1, int(lease.ttl * 1000)), lease.token])
        if not ok:
            return None
        return Lease(lease.name, lease.holder, lease.token, lease.ttl,
                     local_deadline(t_sent, lease.ttl), handle=lease.handle)

    async def release(self, lease: Lease) -> None:
        k = self._keys(lease.name)
        async with self._op("release"):
            await self._release(keys=[k["lock"], k["fence"], k["events"]], args=[lease.handle, lease.token])

    async def leader(self, name: str) -> Holder | None:
        key = self._keys(name)["lock"]
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
        k = self._keys(name)
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
        k = self._keys(lease.name)
        unique = list(dict.fromkeys(intents))
        reply = await self._script(
            "claim_window", self._claim_window,
            [k["lock"], k["fence"], k["window"], k["busy"], k["runs"], k["open"], *(k["claim"] + i for i in unique)],
            [lease.handle, lease.token, _exact(until_us), _exact(start_us), *self._retention(),
             self._claim_prefix(lease), *unique])
        return None if reply[0] == "fenced" else self._window("claim_window", k["busy"], reply)

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        k = self._keys(lease.name)
        unique = list(dict.fromkeys(drop))
        pairs = [part for run in busy for part in (run.key, _JSON(run.to_dict()))]
        reply = await self._script(
            "hand_back", self._hand_back,
            [k["window"], k["busy"], k["runs"], k["open"], *(k["claim"] + key for key in unique)],
            [lease.token, _exact(at_us), len(busy), *pairs, *unique])
        return None if reply[0] == "none" else self._window("hand_back", k["busy"], reply)

    async def claim(self, lease: Lease, key: str) -> bool:
        return key in await self.claim_many(lease, [key])

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        k = self._keys(lease.name)
        reply = await self._script(
            "claim", self._claim,
            [k["lock"], k["fence"], k["runs"], k["open"], *(k["claim"] + key for key in unique)],
            [lease.handle, lease.token, *self._retention(), self._claim_prefix(lease), *unique])
        return {unique[int(i) - 1] for i in reply[1:]}

    # -- RunStore --------------------------------------------------------------

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        # everything is encoded (and refused, if it cannot be) before the first write
        rows: list[tuple[str, str, str]] = []
        for run in records:
            if not math.isfinite(run.claimed_at):
                raise ValueError(f"run {run.key!r}: claimed_at {run.claimed_at!r} is not a finite number")
            value = _JSON({"token": run.token, "node_id": run.node_id, "claimed_at": run.claimed_at,
                           "result": run.result})
            rows.append((run.key, repr(float(run.claimed_at)), value))
        chunks = [rows[at:at + RECORD_CHUNK] for at in range(0, len(rows), RECORD_CHUNK)]
        k = self._keys(name)
        async with self._op("record_many"):  # one timeout for every chunk
            for chunk in chunks:
                await self._script("record_many", self._record, [k["runs"], k["open"], k["busy"]],
                                   [*self._retention(), k["claim"], _JSON(chunk)])

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        """Newest first, from the runs index read in pages (SCAN_CAP entries at most, whatever the filters
        skip). A page ends with every run at its last instant, so a cursor at that instant skips none
        (MAX_LISTING runs at most, though)."""
        limit = max(0, min(query.limit, MAX_LISTING))
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

        k = self._keys(name)
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

        k = self._keys(name)
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
        settings_key = self._keys(name)["settings"]
        async with self._op("set_setting", settings_key):
            if value is None:
                await self._client.hdel(settings_key, key)
            else:
                await self._client.hset(settings_key, key, value)

    async def settings(self, name: str) -> dict[str, str]:
        settings_key = self._keys(name)["settings"]
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


def _exact(us: int) -> str:
    """An integer the scripts compare as a Lua number: refused unless it is exact there."""
    if isinstance(us, bool) or not isinstance(us, int) or not -EXACT < us < EXACT:
        raise ValueError(f"{us!r} is not an integer below 2**53 in magnitude")
    return str(us)


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

