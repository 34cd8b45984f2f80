"""PostgreSQL backend: session advisory locks, a fence row per lock, claim windows, followers in the lock queue.

The lock is ``pg_try_advisory_lock(key)`` taken on a connection dedicated to
one lock name, so the lock lives exactly as long as that server session. The
fencing token is a row in ``baton_fence`` bumped in the same statement that
takes the lock, together with the holder's backend pid: "who leads" is then
"the fence row whose pid is granted the advisory lock right now", which no
crash can leave stale.

A follower waits for a change inside the server, on its own lock session:
``pg_advisory_xact_lock_shared(key)`` queues behind the holder's exclusive
lock and is granted the moment that lock goes, by release or by the end of
the holder's session (a crash, or the idle timeout below), and, taken in a
statement of its own, lets go again as the statement ends. So a waiting
follower costs the server one statement per wait and sees a crash at once,
with no polling (an earlier version polled twice a second beside LISTEN).

The trap: a paused (SIGSTOP) or cut-off holder keeps its session, and with it
the lock, for as long as the server sees a healthy TCP peer, which for a
stopped process is forever. So the lock connection sets
``idle_session_timeout`` to the TTL (and TCP keepalives): a holder that stops
renewing loses its session, and the lock, about one TTL after its last renew.
Renews therefore must come more often than the TTL, which the election loop
guarantees. A contender's connection killed the same way is reopened on the
next acquire.

The URL must reach PostgreSQL directly or through a session-pooling proxy: a
transaction-pooling PgBouncer would hand the session, and its lock, to others.

Tables (created, or upgraded in place from the first release's, on first
use: one node at a time, under a transaction advisory lock, with a timeout
of its own, since building indexes over a large ``baton_claims`` may take
longer than an operation may):

``baton_fence`` (one row per lock name)
    ``token``, ``node_id``, ``url``, ``holder_pid``: the lease. ``mark_token``,
    ``mark_since_us``, ``mark_until_us``, ``mark_sealed``: the claim mark of
    ``base.Window`` (zeros until the first window). Typed columns: nothing in
    them can have the wrong shape, and a mark that breaks ``since <= until``
    is reported as ``CorruptValue``, never acted on.
``baton_claims`` (one row per lock name and claim key)
    run records: single-key claims and the intents of recoverable fire times
    (``result`` NULL) and records (``result`` a JSON object; any other JSON
    is skipped by listings). ``expires_at`` is ``claimed_at`` plus the
    retention; expired rows are invisible, and deleted in bounded batches.
    A listing walks one index in order and stops when its page is full, so
    its cost does not grow with the retention: ``(name, claimed_at)`` for
    all runs, ``(name, job, claimed_at)`` with the job being
    ``split_part(key, '@', 1)`` (an equality, not LIKE: ``_`` and ``%`` in
    job ids are plain characters), ``(name, outcome, claimed_at)`` over rows
    with a result (a listing by job and outcome walks one and filters on
    the other), and ``(name, claimed_at) WHERE result IS NULL`` for the
    unfinished ones.
``baton_busy`` (one row per lock name and run key)
    the runs a node handed over while they were still going (``BusyRun``).
``baton_settings``
    small shared key/values.

Typed, NOT NULL columns leave little room for garbage; what room there is (a
mark that breaks ``since <= until``, a token below 1, a NULL where the
constraints were dropped by hand, a result that is JSON but no object) is
met with ``CorruptValue`` naming the table and lock, or, in listings, by
skipping the row: never acted on, never read as absent, and nothing to do
once the row is repaired.

How ``claim_window`` is atomic: it is one statement (``_CLAIM_WINDOW``).
Its first CTE is the fencing check ``claim`` makes (the fence row carries
the lease's token and the holder's session is granted the advisory lock
right now) and locks the fence row, FOR NO KEY UPDATE rather than claim's
FOR SHARE since the statement goes on to write it (two sharers upgrading
would deadlock). So an acquire racing it waits for it to commit (or it for
the acquire, and then the recheck on the bumped row fails), and so does a
second window claim, which then computes from the row this one wrote,
never from the older one it started with (that would shrink the window).
The next CTEs apply ``base.next_window`` to the locked mark, write it back
when it moved, insert the intents when the window is the caller's, drop
expired busy runs and read the live ones: every part works from the same
locked row and everything commits together. ``hand_back`` has the same
shape, with the mark's token (not the lease's lock) as its condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo

from lock_backends import clock
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
from lock_backends.url import BackendOptions, bad_url, parse_options, redact

Conn = psycopg.AsyncConnection[Any]
Row = tuple[Any, ...]
T = TypeVar("T")

#: libpq parameters a URL may carry besides the common options.
LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name")
#: A wait that returns sooner than this (nobody holds the lock) is padded to it, so that a
#: follower whose acquire keeps failing for another reason cannot spin against the server.
MIN_WAIT = 0.05
#: Expired run records are deleted at most this often per backend instance (after a record batch) ...
PURGE_INTERVAL = 300.0
#: ... at most this many per statement (a backlog is worked off batch by batch, never in one long delete).
PURGE_BATCH = 5_000
#: Creating or upgrading the tables may build indexes over a large ``baton_claims``: it gets this long,
#: once, instead of the operation timeout (which would fail the upgrade on every attempt).
MIGRATION_TIMEOUT = 60.0
#: Key of the transaction lock that serializes schema changes (two-int form: its own key space).
_SCHEMA_LOCK = (0x6261746F, 1)

_SCHEMA = (
    # -- the first release's tables, as it created them --
    """CREATE TABLE IF NOT EXISTS baton_fence (
        name text PRIMARY KEY,
        token bigint NOT NULL,
        node_id text NOT NULL,
        url text NOT NULL DEFAULT '',
        holder_pid integer,
        acquired_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS baton_claims (
        name text NOT NULL,
        key text NOT NULL,
        token bigint NOT NULL,
        node_id text NOT NULL,
        claimed_at timestamptz NOT NULL,
        result jsonb,
        expires_at timestamptz NOT NULL,
        id bigint GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (name, key))""",
    "CREATE INDEX IF NOT EXISTS baton_claims_recent ON baton_claims (name, claimed_at DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS baton_claims_expiry ON baton_claims (expires_at)",
    """CREATE TABLE IF NOT EXISTS baton_settings (
        name text NOT NULL,
        key text NOT NULL,
        value text NOT NULL,
        PRIMARY KEY (name, key))""",
    # -- claim windows: new tables and indexes, and columns added in place (CREATE TABLE IF NOT EXISTS
    # adds none to an existing table). In this order because every lock taken is held until the commit:
    # the index builds block writes to baton_claims only, and baton_fence, which every renew reads, is
    # locked last, for the moment its columns take (constant defaults: no table rewrite).
    """CREATE TABLE IF NOT EXISTS baton_busy (
        name text NOT NULL,
        key text NOT NULL,
        job_id text NOT NULL,
        node_id text NOT NULL,
        token bigint NOT NULL,
        until_us bigint NOT NULL,
        PRIMARY KEY (name, key))""",
    """CREATE INDEX IF NOT EXISTS baton_claims_job
        ON baton_claims (name, split_part(key, '@', 1), claimed_at DESC, id DESC)""",
    """CREATE INDEX IF NOT EXISTS baton_claims_outcome
        ON baton_claims (name, (result ->> 'outcome'), claimed_at DESC, id DESC) WHERE result IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS baton_claims_open
        ON baton_claims (name, claimed_at DESC, id DESC) WHERE result IS NULL""",
    """ALTER TABLE baton_fence
        ADD COLUMN IF NOT EXISTS mark_token bigint NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS mark_since_us bigint NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS mark_until_us bigint NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS mark_sealed boolean NOT NULL DEFAULT false""",
)
# Every table there, and the newest column: the transaction makes all of _SCHEMA visible at once. (A later
# change to the schema adds its newest object here.)
_SCHEMA_CURRENT = """SELECT to_regclass('baton_fence') IS NOT NULL AND to_regclass('baton_claims') IS NOT NULL
    AND to_regclass('baton_settings') IS NOT NULL AND to_regclass('baton_busy') IS NOT NULL
    AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('baton_fence') AND attname = 'mark_sealed'
                AND NOT attisdropped)"""

# pg_locks shows a bigint advisory key as its high half in classid, low half in objid, objsubid 1.
_GRANTED = """l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid::bigint = %(hi)s AND l.objid::bigint = %(lo)s"""

# One statement, so the lock and the fence bump commit together and leader() never sees one
# without the other. The first CTE is the re-entrancy guard: advisory locks stack per session.
# The session settings are applied only when the lock is taken, so a contender's idle session is
# left alone and a held session's timeout is never changed under its lease.
_ACQUIRE = f"""
WITH mine AS (
    SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED} AND l.pid = pg_backend_pid()) AS held
), got AS (
    SELECT pg_try_advisory_lock(%(key)s) AS ok FROM mine WHERE NOT mine.held
), bumped AS (
    INSERT INTO baton_fence AS f (name, token, node_id, url, holder_pid, acquired_at)
    SELECT %(name)s, 1, %(node_id)s, %(url)s, pg_backend_pid(), now() FROM got WHERE got.ok
    ON CONFLICT (name) DO UPDATE SET token = f.token + 1, node_id = EXCLUDED.node_id,
        url = EXCLUDED.url, holder_pid = EXCLUDED.holder_pid, acquired_at = EXCLUDED.acquired_at
    RETURNING f.token
)
SELECT token, pg_backend_pid(),
    set_config('idle_session_timeout', %(idle_session_timeout)s, false),
    set_config('tcp_keepalives_idle', %(tcp_keepalives_idle)s, false),
    set_config('tcp_keepalives_interval', %(tcp_keepalives_interval)s, false),
    set_config('tcp_keepalives_count', %(tcp_keepalives_count)s, false),
    set_config('tcp_user_timeout', %(tcp_user_timeout)s, false)
FROM bumped
"""

_STILL_MINE = f"""
    EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED} AND l.pid = pg_backend_pid())
    AND EXISTS (SELECT 1 FROM baton_fence f
                WHERE f.name = %(name)s AND f.token = %(token)s AND f.holder_pid = pg_backend_pid())"""

_RENEW = f"SELECT {_STILL_MINE}"

_RELEASE = f"SELECT pg_advisory_unlock(%(key)s) WHERE {_STILL_MINE}"

# Granted when the holder's exclusive lock goes; a statement's transaction lock ends with it. The
# timeout is local to the statement's transaction, set before the lock is asked for (FROM first).
_WAIT = """SELECT pg_advisory_xact_lock_shared(%(key)s)
FROM (SELECT set_config('lock_timeout', %(lock_timeout)s, true)) AS settings"""

_HOLDER_LOCKED = f"EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED} AND l.pid = f.holder_pid)"

# The lease is current: its token is the fence row's and the holder's session is granted the lock now.
_FENCED = f"f.name = %(name)s AND f.token = %(token)s AND {_HOLDER_LOCKED}"

_LEADER = f"SELECT f.node_id, f.url FROM baton_fence f WHERE f.name = %(name)s AND {_HOLDER_LOCKED}"

_SERVER_TIME = "SELECT extract(epoch FROM clock_timestamp())::float8"

_NOW_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"

# A mark the rules below may act on: anything else was not written by them (see CorruptValue).
_SOUND_MARK = "(f.mark_token >= 0 AND 0 <= f.mark_since_us AND f.mark_since_us <= f.mark_until_us" \
              " AND f.mark_sealed IS NOT NULL) IS TRUE"

_BUSY_JSON = """coalesce(jsonb_agg(jsonb_build_object('key', b.key, 'job_id', b.job_id, 'node_id', b.node_id,
    'token', b.token, 'until_us', b.until_us) ORDER BY b.key), '[]'::jsonb)"""

# base.next_window in SQL, then its consequences, in one statement (see the module docstring). ``step``
# names the rule that applied: 'first' (the lock's first window), 'grow' (the same token, further),
# 'follow' (a new token, from where the previous window ends), 'keep' (nothing moves) or 'corrupt'.
_CLAIM_WINDOW = f"""
WITH cur AS MATERIALIZED (
    SELECT f.mark_token AS t, f.mark_since_us AS s, f.mark_until_us AS u, f.mark_sealed AS sealed,
        {_SOUND_MARK} AS sound
    FROM baton_fence f WHERE {_FENCED}
    FOR NO KEY UPDATE OF f
), rule AS (
    SELECT cur.*, CASE
        WHEN NOT cur.sound THEN 'corrupt'
        WHEN cur.t = 0 THEN 'first'
        WHEN cur.t > %(token)s OR (cur.t = %(token)s AND cur.sealed) OR %(until_us)s <= cur.u THEN 'keep'
        WHEN cur.t = %(token)s THEN 'grow'
        ELSE 'follow' END AS step
    FROM cur
), nxt AS MATERIALIZED (
    SELECT r.step,
        CASE WHEN r.step IN ('keep', 'corrupt') THEN r.t ELSE %(token)s END AS t,
        CASE r.step WHEN 'first' THEN least(%(start_us)s, %(until_us)s) WHEN 'follow' THEN r.u ELSE r.s END AS s,
        CASE WHEN r.step IN ('keep', 'corrupt') THEN r.u ELSE %(until_us)s END AS u,
        r.step IN ('keep', 'corrupt') AND r.sealed AS sealed
    FROM rule r
), moved AS (
    UPDATE baton_fence f SET mark_token = n.t, mark_since_us = n.s, mark_until_us = n.u, mark_sealed = n.sealed
    FROM nxt n WHERE f.name = %(name)s AND n.step IN ('first', 'grow', 'follow')
), intents AS (
    INSERT INTO baton_claims AS c (name, key, token, node_id, claimed_at, expires_at)
    SELECT %(name)s, k.key, %(token)s, %(node_id)s, clock_timestamp(),
        clock_timestamp() + make_interval(secs => %(retention)s)
    FROM nxt n, unnest(%(intents)s::text[]) AS k(key)
    WHERE n.step <> 'corrupt' AND n.t = %(token)s AND NOT n.sealed
    ON CONFLICT (name, key) DO UPDATE SET token = EXCLUDED.token, node_id = EXCLUDED.node_id,
        claimed_at = EXCLUDED.claimed_at, expires_at = EXCLUDED.expires_at
        WHERE c.result IS NULL
), expired AS (
    DELETE FROM baton_busy b USING nxt WHERE b.name = %(name)s AND b.until_us <= {_NOW_US}
)
SELECT n.step, n.t, n.s, n.u, n.sealed,
    (SELECT {_BUSY_JSON} FROM baton_busy b WHERE b.name = %(name)s AND b.until_us > {_NOW_US})
FROM nxt n
"""

# base.handed_back in SQL: the mark's token is the condition, not the lease's lock (a corrupt mark is
# reported whoever's it seems to be). The busy runs read back are the new ones (RETURNING) and the
# older rows of other keys: the statement's snapshot does not see its own writes.
_HAND_BACK = f"""
WITH cur AS MATERIALIZED (
    SELECT f.mark_token AS t, f.mark_since_us AS s, f.mark_until_us AS u, f.mark_sealed AS sealed,
        {_SOUND_MARK} AS sound
    FROM baton_fence f WHERE f.name = %(name)s AND (f.mark_token = %(token)s OR NOT {_SOUND_MARK})
    FOR NO KEY UPDATE OF f
), nxt AS MATERIALIZED (
    SELECT cur.sound, cur.sealed AS was_sealed, cur.t, cur.s,
        CASE WHEN cur.sealed OR NOT cur.sound THEN cur.u
             ELSE greatest(cur.s, least(cur.u, %(at_us)s)) END AS u
    FROM cur
), moved AS (
    UPDATE baton_fence f SET mark_until_us = n.u, mark_sealed = true
    FROM nxt n WHERE f.name = %(name)s AND n.sound AND NOT n.was_sealed
), given AS (
    INSERT INTO baton_busy AS b (name, key, job_id, node_id, token, until_us)
    SELECT %(name)s, r.key, r.job_id, r.node_id, r.token, r.until_us
    FROM nxt n, jsonb_to_recordset(%(busy)s::jsonb)
        AS r(key text, job_id text, node_id text, token bigint, until_us bigint)
    WHERE n.sound
    ON CONFLICT (name, key) DO UPDATE SET job_id = EXCLUDED.job_id, node_id = EXCLUDED.node_id,
        token = EXCLUDED.token, until_us = EXCLUDED.until_us
    RETURNING b.key, b.job_id, b.node_id, b.token, b.until_us
), dropped AS (
    DELETE FROM baton_claims c USING nxt n
    WHERE n.sound AND c.name = %(name)s AND c.key = ANY(%(drop)s::text[]) AND c.token = %(token)s
        AND c.result IS NULL
), busy AS (
    SELECT * FROM given
    UNION ALL
    SELECT o.key, o.job_id, o.node_id, o.token, o.until_us FROM baton_busy o
    WHERE o.name = %(name)s AND o.key NOT IN (SELECT key FROM given)
)
SELECT CASE WHEN n.sound THEN 'handed back' ELSE 'corrupt' END, n.t, n.s, n.u, true,
    (SELECT {_BUSY_JSON} FROM busy b WHERE b.until_us > {_NOW_US})
FROM nxt n
"""

# FOR SHARE makes a claim racing an acquire wait for the fence bump and re-check the new token. A key
# is taken when it is free or its claim expired, and answered True again when this token holds it.
_CLAIM = f"""
WITH current AS MATERIALIZED (
    SELECT f.name FROM baton_fence f WHERE {_FENCED}
    FOR SHARE OF f
), taken AS (
    INSERT INTO baton_claims AS c (name, key, token, node_id, claimed_at, expires_at)
    SELECT %(name)s, k.key, %(token)s, %(node_id)s, clock_timestamp(),
        clock_timestamp() + make_interval(secs => %(retention)s)
    FROM current, unnest(%(claim_keys)s::text[]) AS k(key)
    ON CONFLICT (name, key) DO UPDATE SET token = EXCLUDED.token, node_id = EXCLUDED.node_id,
        claimed_at = EXCLUDED.claimed_at, result = NULL, expires_at = EXCLUDED.expires_at
        WHERE c.expires_at < clock_timestamp()
    RETURNING c.key
)
SELECT key FROM taken
UNION
SELECT c.key FROM current, baton_claims c
WHERE c.name = %(name)s AND c.key = ANY(%(claim_keys)s::text[]) AND c.token = %(token)s
    AND c.expires_at >= clock_timestamp()
"""

# The batch as one array per column, sent in binary (no escaping on either side), and the results
# as one JSON array (one json.dumps, one parse), zipped back into rows by ROWS FROM. Rows are written
# in key order, so two batches sharing keys lock them in one order.
_RECORD = """
WITH r AS MATERIALIZED (
    SELECT * FROM ROWS FROM (unnest(%(keys)b::text[]), unnest(%(tokens)b::int8[]), unnest(%(node_ids)b::text[]),
                             unnest(%(claimed_at)b::float8[]), jsonb_array_elements(%(results)s::jsonb))
        AS r(key, token, node_id, claimed_at, result)
), freed AS (
    DELETE FROM baton_busy b USING r WHERE b.name = %(name)s AND b.key = r.key
)
INSERT INTO baton_claims AS c (name, key, token, node_id, claimed_at, result, expires_at)
SELECT %(name)s, r.key, r.token, r.node_id, to_timestamp(r.claimed_at), nullif(r.result, 'null'::jsonb),
    to_timestamp(r.claimed_at) + make_interval(secs => %(retention)s)
FROM r ORDER BY r.key COLLATE "C"
ON CONFLICT (name, key) DO UPDATE SET token = EXCLUDED.token, node_id = EXCLUDED.node_id,
    claimed_at = EXCLUDED.claimed_at, result = EXCLUDED.result, expires_at = EXCLUDED.expires_at
"""

# Expiry is checked again on the row deleted: a claim may have taken an expired key over meanwhile.
_PURGE = """
DELETE FROM baton_claims c
USING (SELECT name, key FROM baton_claims WHERE expires_at < clock_timestamp() LIMIT %(batch)s) old
WHERE c.name = old.name AND c.key = old.key AND c.expires_at < clock_timestamp()
"""

# What Baton writes: a result that is an object (a record) or none (an intent), at a finite instant.
# Written so that the planner estimates it true for nearly every row (as it is): an estimate of "few
# rows pass" would make it read and sort all the matching rows instead of walking an index in order.
_SHAPE = """coalesce(jsonb_typeof(c.result), 'object') NOT IN ('array', 'string', 'number', 'boolean', 'null')
    AND c.claimed_at > '-infinity' AND c.claimed_at < 'infinity'"""
_RUN_COLUMNS = "s.key, s.token, s.node_id, extract(epoch FROM s.claimed_at)::float8, s.result"

# A listing: the first ``limit`` runs down the index that serves its filters (``{filters}``), newest
# first, then every other run at the instant of the page's last one (the ``ties``, down the same
# index), so that the next page (``before`` that instant) skips none.
_RUNS = f"""
WITH page AS MATERIALIZED (
    SELECT c.id, c.key, c.token, c.node_id, c.claimed_at, c.result FROM baton_claims c
    WHERE c.name = %(name)s AND c.expires_at > clock_timestamp() AND {_SHAPE}{{filters}}
    ORDER BY c.claimed_at DESC, c.id DESC LIMIT %(limit)s
), last AS (
    SELECT claimed_at, id FROM page ORDER BY claimed_at, id LIMIT 1
), ties AS (
    SELECT c.id, c.key, c.token, c.node_id, c.claimed_at, c.result FROM last, baton_claims c
    WHERE c.name = %(name)s AND c.expires_at > clock_timestamp() AND {_SHAPE}{{filters}}
        AND c.claimed_at = last.claimed_at AND c.id < last.id
    ORDER BY c.id DESC LIMIT {MAX_LISTING}
)
SELECT {_RUN_COLUMNS} FROM (SELECT * FROM page UNION ALL SELECT * FROM ties) s
ORDER BY s.claimed_at DESC, s.id DESC LIMIT {MAX_LISTING}
"""
_JOB_FILTER = " AND split_part(c.key, '@', 1) = %(job)s"  # the expression of index baton_claims_job
_OUTCOME_FILTER = " AND c.result IS NOT NULL AND c.result ->> 'outcome' = %(outcome)s"  # baton_claims_outcome
_SINCE_FILTER = " AND c.claimed_at >= to_timestamp(%(since)s::float8)"
_BEFORE_FILTER = " AND c.claimed_at < to_timestamp(%(before)s::float8)"

_UNFINISHED = f"""
SELECT {_RUN_COLUMNS} FROM baton_claims s
WHERE s.name = %(name)s AND s.result IS NULL AND s.expires_at > clock_timestamp()
    AND s.claimed_at > '-infinity' AND s.claimed_at < 'infinity'
ORDER BY s.claimed_at DESC, s.id DESC LIMIT %(limit)s
"""


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key: Python's hash() changes between processes."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def _key_params(name: str) -> dict[str, Any]:
    key = lock_key(name)
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return {"name": name, "key": key, "hi": unsigned >> 32, "lo": unsigned & 0xFFFF_FFFF}


def _session_settings(ttl: float) -> dict[str, str]:
    """What makes the server end a silent holder's session, and so its lock, about one TTL later."""
    ttl_ms = max(1, int(ttl * 1000))
    return {
        "idle_session_timeout": str(ttl_ms),
        "tcp_keepalives_idle": str(max(1, int(ttl / 2))),
        "tcp_keepalives_interval": str(max(1, int(ttl / 4))),
        "tcp_keepalives_count": "2",
        "tcp_user_timeout": str(ttl_ms),
    }


def _listing(query: RunQuery) -> str:
    """The listing statement for ``query``'s filters."""
    filters = "".join(part for part, used in ((_JOB_FILTER, query.job), (_OUTCOME_FILTER, query.outcome),
                                              (_SINCE_FILTER, query.since), (_BEFORE_FILTER, query.before))
                      if used is not None)
    return _RUNS.format(filters=filters)


class PostgresBackend:
    """Leases as session advisory locks on one PostgreSQL server."""

    kind = "postgres"

    def __init__(self, url: str, options: BackendOptions, conninfo: str, address: str) -> None:
        self.url = url
        self.options = options
        self.address = address
        self._conninfo = conninfo
        # slot -> session: "claims" (claims only, so they never queue behind records), "shared" (the rest)
        self._shared: dict[str, Conn] = {}
        self._locks: dict[str, Conn] = {}  # lock name -> its dedicated session
        self._guards: dict[str, asyncio.Lock] = {}
        self._schema_ready = False
        self._last_purge = 0.0

    @classmethod
    def from_url(cls, url: str) -> PostgresBackend:
        parts = urlsplit(url)
        try:
            port = parts.port or 5432
        except ValueError:
            raise bad_url(url, "port must be a number") from None
        if not parts.hostname:
            raise bad_url(url, "postgres URL needs a host, as in postgresql://user@host:5432/dbname")
        options, extra = parse_options(url, extra=LIBPQ_OPTIONS)
        dbname = unquote(parts.path.lstrip("/"))
        if "/" in dbname:
            raise bad_url(url, "the path must be one database name")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        address = f"{host}:{port}/{dbname or parts.username or 'postgres'}"
        # statement and lock timeouts free the server's side too when the client gave up
        server_ms = max(1, int(options.op_timeout * 1000))
        keepalive = max(1, math.ceil(options.op_timeout))
        try:
            conninfo = make_conninfo(
                urlunsplit(parts._replace(query="", fragment="")),
                **{"application_name": "baton", **extra},
                connect_timeout=max(2, math.ceil(options.op_timeout)),
                keepalives=1, keepalives_idle=keepalive, keepalives_interval=keepalive, keepalives_count=3,
                tcp_user_timeout=keepalive * 3000,
                options=f"-c statement_timeout={server_ms} -c lock_timeout={server_ms}",
            )
        except psycopg.Error as exc:
            raise bad_url(url, str(exc)) from None
        return cls(url, options, conninfo, address)

    # -- plumbing --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _op(self, what: str, extra: float = 0.0) -> AsyncIterator[float]:
        """Give the operation its deadline and translate every client error, in one place."""
        deadline = time.monotonic() + self.options.op_timeout + extra
        try:
            yield deadline
        except TimeoutError:
            raise BackendUnavailable(f"{what} timed out after {self.options.op_timeout}s",
                                     backend=self.kind, address=self.address) from None
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise BackendUnavailable(f"{what} failed: {_brief(exc)}", backend=self.kind,
                                     address=self.address) from None
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
                self._schema_ready = False  # somebody dropped (or restored old) tables: redo them on next use
            raise LockBackendError(f"{what} failed: {_brief(exc)}", backend=self.kind,
                                   address=self.address) from None

    async def _run(self, conn: Conn, fn: Callable[[Conn], Awaitable[T]], deadline: float,
                   *, abandon_on_cancel: bool = True) -> T:
        """Run ``fn`` on ``conn`` by ``deadline``, or discard the connection and raise TimeoutError.

        Not asyncio.wait_for: cancelling a psycopg query sends a cancel request and
        waits for the server, which is exactly what hangs when the server is unreachable.
        """
        task = asyncio.ensure_future(fn(conn))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            if abandon_on_cancel:
                self._abandon(conn, task)
            else:  # others share this connection: drop it only if the query overruns
                handle = asyncio.get_running_loop().call_later(
                    max(0.0, deadline - time.monotonic()), self._abandon, conn, task)
                task.add_done_callback(lambda _t: handle.cancel())
                task.add_done_callback(_consume)
            raise
        if not done:
            self._abandon(conn, task)
            raise TimeoutError
        return task.result()

    def _abandon(self, conn: Conn, task: asyncio.Future[Any] | None = None) -> None:
        """Drop a connection whose state is unknown, never waiting on the server.

        Shutting the socket down ends the server session (and any advisory lock in it)
        and makes a query still in flight fail at once; the connection is closed when
        that query has let go of the socket, so no half-closed fd stays in the event loop.
        """
        self._forget(conn)
        with contextlib.suppress(Exception):
            dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
            try:
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()
        if task is None or task.done():
            _finish(conn)
        else:
            task.add_done_callback(_consume)
            task.add_done_callback(lambda _t: _finish(conn))

    def _forget(self, conn: Conn) -> None:
        for slot in [s for s, c in self._shared.items() if c is conn]:
            del self._shared[slot]
        for name in [n for n, c in self._locks.items() if c is conn]:
            del self._locks[name]

    @contextlib.asynccontextmanager
    async def _guard(self, slot: str, deadline: float) -> AsyncIterator[None]:
        """Serialize opening (and, per lock name, using) one connection slot within the deadline."""
        lock = self._guards.setdefault(slot, asyncio.Lock())
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await lock.acquire()
        try:
            yield
        finally:
            lock.release()

    async def _connect(self, deadline: float) -> tuple[Conn, float]:
        """A new session with the tables ready, and the operation's deadline (see ``_ensure_schema``)."""
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            deadline = await self._ensure_schema(conn, deadline)
        except BaseException:
            self._abandon(conn)
            raise
        return conn, deadline

    async def _ensure_schema(self, conn: Conn, deadline: float, *, shared: bool = False) -> float:
        """Create or upgrade the tables if this instance has not seen them current yet.

        The check takes the operation's deadline; an upgrade (which may build indexes over a
        large ``baton_claims``) takes up to MIGRATION_TIMEOUT, once, and the deadline returned for
        the rest of the operation is moved on by the time it took.
        """
        if self._schema_ready:
            return deadline
        if not await self._run(conn, _schema_current, deadline, abandon_on_cancel=not shared):
            started = time.monotonic()
            await self._run(conn, _migrate, max(deadline, started + MIGRATION_TIMEOUT), abandon_on_cancel=not shared)
            deadline += time.monotonic() - started
        self._schema_ready = True
        return deadline

    async def _shared_call(self, fn: Callable[[Conn], Awaitable[T]], deadline: float, slot: str = "shared") -> T:
        """Run on a shared connection, reopening it once if the server had dropped it."""
        for attempt in (0, 1):
            fresh = False
            async with self._guard(slot, deadline):
                conn = self._shared.get(slot)
                if conn is None or conn.closed:
                    conn, deadline = await self._connect(deadline)
                    self._shared[slot] = conn
                    fresh = True
                else:
                    deadline = await self._ensure_schema(conn, deadline, shared=True)
            try:
                return await self._run(conn, fn, deadline, abandon_on_cancel=False)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _lock_conn(self, name: str, deadline: float) -> tuple[Conn, bool, float]:
        """The session dedicated to ``name`` (opened if need be), whether it is new, and the deadline."""
        conn = self._locks.get(name)
        if conn is not None and not conn.closed:
            return conn, False, deadline
        if conn is not None:
            self._abandon(conn)
        conn, deadline = await self._connect(deadline)
        self._locks[name] = conn
        return conn, True, deadline

    # -- the lease ---------------------------------------------------------------------

    async def acquire(self, name: str, holder: Holder, ttl: float) -> Lease | None:
        t_sent = clock.monotonic()
        params = {**_key_params(name), **_session_settings(ttl), "node_id": holder.node_id, "url": holder.url}
        row: Row | None = None
        async with self._op("acquire") as deadline, self._guard(f"lock:{name}", deadline):
            for attempt in (0, 1):
                conn, fresh, deadline = await self._lock_conn(name, deadline)
                try:
                    row = await self._run(conn, lambda c: _fetchone(c, _ACQUIRE, params), deadline)
                    break
                except psycopg.Error as exc:
                    # the session may hold the lock without a fence bump: only its end is safe
                    self._abandon(conn)
                    # a contender's idle session is ended by idle_session_timeout: reopen once
                    if fresh or attempt or not isinstance(exc, psycopg.OperationalError):
                        raise
            if row is not None and (not isinstance(row[0], int) or row[0] < 1):
                self._abandon(conn)  # the lock was taken under no valid token: give it up with the session
                raise self._corrupt(f"the fencing token is {row[0]!r}", f"baton_fence/{name}")
        if row is None:
            return None
        return Lease(name, holder, row[0], ttl, local_deadline(t_sent, ttl), handle=f"pid:{row[1]}")

    async def renew(self, lease: Lease) -> Lease | None:
        t_sent = clock.monotonic()
        params = {**_key_params(lease.name), "token": lease.token}
        async with self._op("renew") as deadline, self._guard(f"lock:{lease.name}", deadline):
            conn = self._locks.get(lease.name)
            if conn is None:
                return None  # no session, no lock: a new session could never hold the old one
            try:
                row = await self._run(conn, lambda c: _fetchone(c, _RENEW, params), deadline)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)  # the session ended, and the lock with it
                return None
        if row is None or not row[0]:
            # whatever this session still holds is no lease: drop it, so that no lock outlives the lease
            # (and a wait on this session, which would be granted its own lock at once, cannot spin)
            self._abandon(conn)
            return None
        return Lease(lease.name, lease.holder, lease.token, lease.ttl,
                     local_deadline(t_sent, lease.ttl), handle=lease.handle)

    async def release(self, lease: Lease) -> None:
        params = {**_key_params(lease.name), "token": lease.token}
        async with self._op("release") as deadline, self._guard(f"lock:{lease.name}", deadline):
            conn = self._locks.get(lease.name)
            if conn is None:
                return
            try:
                await self._run(conn, lambda c: _fetchone(c, _RELEASE, params), deadline)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if not conn.closed:
                    raise
                self._abandon(conn)  # nothing left to release

    async def leader(self, name: str) -> Holder | None:
        params = _key_params(name)
        async with self._op("leader") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, _LEADER, params), deadline)
        return None if row is None else self._holder(name, row)

    def _holder(self, name: str, row: Row) -> Holder:
        node_id, url = row
        if not isinstance(node_id, str) or not isinstance(url, str):
            raise self._corrupt(f"the holder (node_id {node_id!r}, url {url!r}) is no holder", f"baton_fence/{name}")
        return Holder(node_id=node_id, url=url)

    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Wait in the lock's queue, on this node's lock session, until the holder's lock goes."""
        started = time.monotonic()
        params = {**_key_params(name), "lock_timeout": str(max(1, int(timeout * 1000)))}

        async def wait(conn: Conn) -> None:
            with contextlib.suppress(psycopg.errors.LockNotAvailable):  # the timeout: nothing changed
                await conn.execute(_WAIT, params)

        try:
            async with (self._op("wait_for_change", extra=timeout) as deadline,
                        self._guard(f"lock:{name}", deadline)):
                conn, _, deadline = await self._lock_conn(name, deadline)
                await self._run(conn, wait, deadline)
        except LockBackendError:  # an unreachable server is waited out, not raised: the loop retries
            await asyncio.sleep(max(0.0, started + timeout - time.monotonic()))
            return
        await asyncio.sleep(max(0.0, started + MIN_WAIT - time.monotonic()))

    async def server_time(self) -> float | None:
        async with self._op("server_time") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, _SERVER_TIME, {}), deadline)
        return float(row[0]) if row else None

    # -- claims ------------------------------------------------------------------------

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        params = {**_key_params(lease.name), "token": lease.token, "until_us": until_us, "start_us": start_us,
                  "node_id": lease.holder.node_id, "intents": sorted(set(intents)),
                  "retention": self.options.claim_retention}
        async with self._op("claim_window") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, _CLAIM_WINDOW, params), deadline, slot="claims")
        return None if row is None else self._window(lease.name, row)

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        given = {run.key: run.to_dict() for run in busy}  # one row per key, the last one given wins
        params = {"name": lease.name, "token": lease.token, "at_us": at_us,
                  "busy": _json(list(given.values())), "drop": sorted(set(drop))}
        async with self._op("hand_back") as deadline:
            row = await self._shared_call(lambda c: _fetchone(c, _HAND_BACK, params), deadline, slot="claims")
        return None if row is None else self._window(lease.name, row)

    def _window(self, name: str, row: Row) -> Window:
        """The mark and busy runs a window statement answered, or CorruptValue naming what is wrong."""
        step, token, since_us, until_us, sealed, busy = row
        if step == "corrupt":
            raise self._corrupt(f"the claim mark (token {token}, since {since_us}, until {until_us}, "
                                f"sealed {sealed}) is no window: nothing was changed", f"baton_fence/{name}")
        try:
            if not isinstance(busy, list):
                raise ValueError("busy runs are not a list")
            runs = tuple(BusyRun.from_dict(entry) for entry in busy)
        except ValueError as exc:
            raise self._corrupt(f"a busy run does not decode: {exc}", f"baton_busy/{name}") from None
        return Window(int(token), int(since_us), int(until_us), bool(sealed), runs)

    async def claim(self, lease: Lease, key: str) -> bool:
        return bool(await self.claim_many(lease, [key]))

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        # ON CONFLICT cannot touch one row twice in a statement; sorted, two batches lock rows in one order
        unique = sorted(set(keys))
        if not unique:
            return set()
        params = {**_key_params(lease.name), "token": lease.token, "claim_keys": unique,
                  "node_id": lease.holder.node_id, "retention": self.options.claim_retention}

        async def insert(conn: Conn) -> list[Row]:
            cur = await conn.execute(_CLAIM, params)
            return await cur.fetchall()

        async with self._op("claim") as deadline:
            rows = await self._shared_call(insert, deadline, slot="claims")
        return {str(row[0]) for row in rows}

    # -- runs ----------------------------------------------------------------------------

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        """One statement for the whole batch (``_RECORD``): one round trip, whatever its size.

        Measured cost of 5,000 records with small results (PostgreSQL 15 on loopback, on a 2-core
        test machine shared with other work): about 35 ms of client CPU (the column arrays and one
        JSON text) and 200-250 ms of server CPU (about 40% for the heap, the parsing of the results
        and the primary key, the rest for the five other indexes), so 0.3-0.5 s from call to answer
        at a quiet moment, and close to the 1 s default operation timeout under heavy contention
        (load 6 on 2 cores). A caller with a larger backlog should send it in batches of a few
        thousand.
        """
        if not records:
            return
        latest = {run.key: run for run in records}  # a key given twice: the last record wins
        batch = [latest[key] for key in sorted(latest)]
        params = {"name": name, "keys": [r.key for r in batch], "tokens": [r.token for r in batch],
                  "node_ids": [r.node_id for r in batch], "claimed_at": [float(r.claimed_at) for r in batch],
                  "results": _json([r.result for r in batch]),
                  "retention": self.options.claim_retention}
        async with self._op("record") as deadline:
            await self._shared_call(lambda c: c.execute(_RECORD, params), deadline)
        if time.monotonic() - self._last_purge > PURGE_INTERVAL:
            await self._purge()

    async def _purge(self) -> None:
        """Delete one batch of expired runs; never fails the caller (a failed purge is retried later)."""
        self._last_purge = time.monotonic()

        async def delete(conn: Conn) -> int:
            cur = await conn.execute(_PURGE, {"batch": PURGE_BATCH})
            return cur.rowcount

        with contextlib.suppress(LockBackendError):
            async with self._op("purge expired runs") as deadline:
                if await self._shared_call(delete, deadline) >= PURGE_BATCH:
                    self._last_purge = 0.0  # a backlog: the next batch after the next record

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        limit = min(query.limit, MAX_LISTING)
        if limit <= 0:
            return []
        params = {"name": name, "limit": limit, "job": query.job, "outcome": query.outcome,
                  "since": query.since, "before": query.before}
        statement = _listing(query)
        async with self._op("runs") as deadline:
            # never a prepared, generic plan: the index to walk depends on the values (a job, a limit)
            rows = await self._shared_call(lambda c: _fetchall(c, statement, params, prepare=False), deadline)
        return _decode_runs(rows)

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        if limit <= 0:
            return []
        params = {"name": name, "limit": limit}
        async with self._op("unfinished") as deadline:
            rows = await self._shared_call(lambda c: _fetchall(c, _UNFINISHED, params, prepare=False), deadline)
        return _decode_runs(rows)

    # -- settings ----------------------------------------------------------------------------

    async def set_setting(self, name: str, key: str, value: str | None) -> None:
        params = {"name": name, "key": key, "value": value}
        query = ("DELETE FROM baton_settings WHERE name = %(name)s AND key = %(key)s" if value is None else
                 "INSERT INTO baton_settings (name, key, value) VALUES (%(name)s, %(key)s, %(value)s) "
                 "ON CONFLICT (name, key) DO UPDATE SET value = EXCLUDED.value")
        async with self._op("set_setting") as deadline:
            await self._shared_call(lambda c: c.execute(query, params), deadline)

    async def settings(self, name: str) -> dict[str, str]:
        async def fetch(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute("SELECT key, value FROM baton_settings WHERE name = %(name)s",
                                     {"name": name})
            return await cur.fetchall()

        async with self._op("settings") as deadline:
            rows = await self._shared_call(fetch, deadline)
        for key, value in rows:
            if not isinstance(value, str):
                raise self._corrupt(f"setting {key!r} is {value!r}", f"baton_settings/{name}")
        return {str(k): v for k, v in rows}

    async def close(self) -> None:
        """Drop every session; the server frees their advisory locks, so call ``release`` first."""
        conns = [*self._shared.values(), *self._locks.values()]
        for conn in conns:
            self._abandon(conn)
        self._guards.clear()

    def _corrupt(self, message: str, key: str) -> CorruptValue:
        return CorruptValue(message, key=key, backend=self.kind, address=self.address)

    def __repr__(self) -> str:
        return f"PostgresBackend({redact(self.url)!r})"


async def _schema_current(conn: Conn) -> bool:
    row = await _fetchone(conn, _SCHEMA_CURRENT, {})
    return bool(row and row[0])


async def _migrate(conn: Conn) -> None:
    """Create or upgrade the tables, one node at a time; the others wait for it, then find them current."""
    limit = f"{int(MIGRATION_TIMEOUT * 1000)}"
    async with conn.transaction():
        # index builds may take long on a big table, and so may the wait for another node doing them
        await conn.execute(f"SET LOCAL statement_timeout = {limit}")
        await conn.execute(f"SET LOCAL lock_timeout = {limit}")
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _SCHEMA_LOCK)
        if await _schema_current(conn):  # another node did it while this one waited
            return
        # but a wait for a table lock keeps the operation's lock_timeout (the session's), so that an
        # upgrade never queues the live traffic behind it for long
        await conn.execute("SET LOCAL lock_timeout TO DEFAULT")
        for statement in _SCHEMA:
            await conn.execute(statement)


async def _fetchone(conn: Conn, query: str, params: dict[str, Any]) -> Row | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def _fetchall(conn: Conn, query: str, params: dict[str, Any], *, prepare: bool | None = None) -> list[Row]:
    cur = await conn.execute(query, params, prepare=prepare)
    return await cur.fetchall()


def _decode_runs(rows: list[Row]) -> list[RunRecord]:
    """Rows of ``_RUN_COLUMNS`` as run records, skipping any that are not what Baton writes."""
    runs: list[RunRecord] = []
    for key, token, node_id, claimed_at, result in rows:
        if (isinstance(key, str) and isinstance(token, int) and isinstance(node_id, str)
                and isinstance(claimed_at, float) and math.isfinite(claimed_at)
                and (result is None or isinstance(result, dict))):
            runs.append(RunRecord(key, token, node_id, claimed_at, result))
    return runs


def _json(value: Any) -> str:
    """JSON that ``jsonb`` accepts: no NaN, and strings cleaned of what jsonb refuses.

    jsonb refuses ``\\u0000`` and unpaired surrogates; one such string in a run's result (the text of
    an exception, say) would otherwise fail its whole batch on every retry. They are replaced (by
    U+FFFD and ``?``). Raises ValueError or TypeError, before any change, for what JSON cannot hold.
    """
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    if "\\u0000" in text or "\\ud" in text:  # rare: check the strings (pairs of surrogates are fine)
        text = json.dumps(_clean(value), separators=(",", ":"), allow_nan=False)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_clean(k) if isinstance(k, str) else k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _finish(conn: Conn) -> None:
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned query's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
