"""The Redis backend's Lua scripts, with what each checks and why, and the key layout they work on.

Apart from ``redis`` because the scripts are the backend's logic (every
mutation is one of them) in another language: they read best together, with
the helpers they share (``_LIB``), the keys they touch and the rules they keep
for numbers and garbage. ``redis`` registers them and reads their replies.

Keys, for a lock named N (the ``{N}`` hash tag keeps them in one Redis Cluster slot):

``baton:{N}:lock``        string, expires after the TTL: the holder's JSON with a nonce (the lease's handle)
``baton:{N}:fence``       string: the last token issued, a decimal integer
``baton:{N}:window``      hash: the claim mark, fields ``token``, ``since_us``, ``until_us`` (decimal
                          integers) and ``sealed`` (``0`` or ``1``)
``baton:{N}:busy``        hash: run key -> ``BusyRun`` JSON, written by ``hand_back``
``baton:{N}:claim:<key>`` string, expires after the retention: the run record's JSON (claim, intent or result)
``baton:{N}:runs``        sorted set: run keys by ``claimed_at``, within the retention, at most
                          ``redis.MAX_RUNS_INDEXED`` of them
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

#: Integers above this are not exact as Lua numbers.
EXACT = 2**53


def exact(us: int) -> str:
    """An integer the scripts compare as a Lua number: refused unless it is exact there."""
    if isinstance(us, bool) or not isinstance(us, int) or not -EXACT < us < EXACT:
        raise ValueError(f"{us!r} is not an integer below 2**53 in magnitude")
    return str(us)


def lock_keys(name: str) -> dict[str, str]:
    """The keys of the lock ``name``, by their names in the layout above (``claim`` is a prefix)."""
    base = f"baton:{{{name}}}"
    found = {part: f"{base}:{part}" for part in
             ("lock", "fence", "events", "window", "busy", "runs", "open", "settings")}
    return {**found, "claim": f"{base}:claim:"}  # a prefix: the run key follows


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
ACQUIRE = _LIB + """
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

RENEW = _LIB + """
if holds(KEYS[1], KEYS[2], ARGV[1], ARGV[3]) then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE = _LIB + """
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
CLAIM = _LIB + """
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
CLAIM_WINDOW = _LIB + """
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

# KEYS: window. A read, with the scripts' own rule for a sound mark (``read_mark``).
# Returns {'ok', token, since_us, until_us, sealed} ({'ok', '0', '0', '0', '0'} when never claimed).
CLAIM_MARK = _LIB + """
local mark, bad = read_mark(KEYS[1])
if bad then return bad end
if not mark then return {'ok', '0', '0', '0', '0'} end
return {'ok', mark.t, mark.s, mark.u, mark.sealed}
"""

# KEYS: window, busy, runs, open, then one claim key per intent to drop.
# ARGV: token, at_us, number of busy runs n, n pairs (run key, BusyRun JSON), then the dropped run keys.
# Returns {'ok', token, since_us, until_us, sealed, busy JSON...} or {'none'}. A dropped key whose
# record does not decode is left alone: nothing shows it is this token's.
HAND_BACK = _LIB + """
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
RECORD = _LIB + """
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
