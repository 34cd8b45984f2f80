"""The PostgreSQL backend's tables and statements: the schema, its migration, every SQL statement.

Apart from ``postgres`` because the SQL is most of what the backend does, and
reads best in one piece: each statement is a named constant with the comment
that says why it is written as it is, next to the tables it works on. The
Python side (``postgres``, ``postgres_sessions``) only chooses a statement,
fills its parameters and reads its row.

Tables (created, or upgraded in place from the first release's, on first
use: one node at a time, under a transaction advisory lock, with a timeout
of its own, since building indexes over a large ``baton_claims`` may take
longer than an operation may; see ``migrate``):

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

How ``claim_window`` is atomic: it is one statement (``CLAIM_WINDOW``).
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

import json
import math
from typing import Any

import psycopg

from lock_backends._common import compact_json
from lock_backends.base import MAX_LISTING, RunQuery, RunRecord

Conn = psycopg.AsyncConnection[Any]
Row = tuple[Any, ...]

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
ACQUIRE = f"""
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

RENEW = f"SELECT {_STILL_MINE}"

RELEASE = f"SELECT pg_advisory_unlock(%(key)s) WHERE {_STILL_MINE}"

# Granted when the holder's exclusive lock goes; a statement's transaction lock ends with it. The
# timeout is local to the statement's transaction, set before the lock is asked for (FROM first).
WAIT = """SELECT pg_advisory_xact_lock_shared(%(key)s)
FROM (SELECT set_config('lock_timeout', %(lock_timeout)s, true)) AS settings"""

_HOLDER_LOCKED = f"EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED} AND l.pid = f.holder_pid)"

# The lease is current: its token is the fence row's and the holder's session is granted the lock now.
_FENCED = f"f.name = %(name)s AND f.token = %(token)s AND {_HOLDER_LOCKED}"

LEADER = f"SELECT f.node_id, f.url FROM baton_fence f WHERE f.name = %(name)s AND {_HOLDER_LOCKED}"

SERVER_TIME = "SELECT extract(epoch FROM clock_timestamp())::float8"

_NOW_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"

# A mark the rules below may act on: anything else was not written by them (see CorruptValue).
_SOUND_MARK = "(f.mark_token >= 0 AND 0 <= f.mark_since_us AND f.mark_since_us <= f.mark_until_us" \
              " AND f.mark_sealed IS NOT NULL) IS TRUE"

_BUSY_JSON = """coalesce(jsonb_agg(jsonb_build_object('key', b.key, 'job_id', b.job_id, 'node_id', b.node_id,
    'token', b.token, 'until_us', b.until_us) ORDER BY b.key), '[]'::jsonb)"""

# The mark as stored, and whether it is a window at all (``claim_mark``: a read, nothing locked).
CLAIM_MARK = f"""
SELECT {_SOUND_MARK}, f.mark_token, f.mark_since_us, f.mark_until_us, f.mark_sealed
FROM baton_fence f WHERE f.name = %(name)s"""

# base.next_window in SQL, then its consequences, in one statement (see the module docstring). ``step``
# names the rule that applied: 'first' (the lock's first window), 'grow' (the same token, further),
# 'follow' (a new token, from where the previous window ends), 'keep' (nothing moves) or 'corrupt'.
CLAIM_WINDOW = f"""
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
HAND_BACK = f"""
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
CLAIM = f"""
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

# The batch as one JSON array per column, zipped back into rows by ROWS FROM. JSON because the client
# writes it in C (orjson): psycopg's array dumpers are Python, and held the event loop, where fire
# times wait, for about 2 ms per column of 2,500 records. Rows are taken and written in key order, so
# two batches sharing keys lock them in one order.
RECORD = """
WITH r AS MATERIALIZED (
    SELECT e.key, e.token::int8, e.node_id, e.claimed_at::float8, e.result
    FROM ROWS FROM (jsonb_array_elements_text(%(keys)s::jsonb), jsonb_array_elements_text(%(tokens)s::jsonb),
                    jsonb_array_elements_text(%(node_ids)s::jsonb), jsonb_array_elements_text(%(claimed_at)s::jsonb),
                    jsonb_array_elements(%(results)s::jsonb))
        AS e(key, token, node_id, claimed_at, result)
    ORDER BY e.key COLLATE "C"
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
PURGE = """
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

UNFINISHED = f"""
SELECT {_RUN_COLUMNS} FROM baton_claims s
WHERE s.name = %(name)s AND s.result IS NULL AND s.expires_at > clock_timestamp()
    AND s.claimed_at > '-infinity' AND s.claimed_at < 'infinity'
ORDER BY s.claimed_at DESC, s.id DESC LIMIT %(limit)s
"""

SETTINGS = "SELECT key, value FROM baton_settings WHERE name = %(name)s"
PUT_SETTING = ("INSERT INTO baton_settings (name, key, value) VALUES (%(name)s, %(key)s, %(value)s) "
               "ON CONFLICT (name, key) DO UPDATE SET value = EXCLUDED.value")
DELETE_SETTING = "DELETE FROM baton_settings WHERE name = %(name)s AND key = %(key)s"


def listing(query: RunQuery) -> str:
    """The listing statement for ``query``'s filters."""
    filters = "".join(part for part, used in ((_JOB_FILTER, query.job), (_OUTCOME_FILTER, query.outcome),
                                              (_SINCE_FILTER, query.since), (_BEFORE_FILTER, query.before))
                      if used is not None)
    return _RUNS.format(filters=filters)


def decode_runs(rows: list[Row]) -> list[RunRecord]:
    """Rows of ``_RUN_COLUMNS`` (``UNFINISHED``, ``listing``) as run records, skipping any that are not what
    Baton writes."""
    runs: list[RunRecord] = []
    for key, token, node_id, claimed_at, result in rows:
        if (isinstance(key, str) and isinstance(token, int) and isinstance(node_id, str)
                and isinstance(claimed_at, float) and math.isfinite(claimed_at)
                and (result is None or isinstance(result, dict))):
            runs.append(RunRecord(key, token, node_id, claimed_at, result))
    return runs


def jsonb_text(value: Any) -> str:
    """JSON that ``jsonb`` accepts: no NaN, and strings cleaned of what jsonb refuses.

    jsonb refuses ``\\u0000`` and unpaired surrogates; one such string in a run's result (the text of
    an exception, say) would otherwise fail its whole batch on every retry. They are replaced (by
    U+FFFD and ``?``). Raises ValueError or TypeError, before any change, for what JSON cannot hold.
    """
    text = compact_json(value, allow_nan=False)
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


async def schema_current(conn: Conn) -> bool:
    """True when every table and column of ``_SCHEMA`` is there."""
    cur = await conn.execute(_SCHEMA_CURRENT, {})
    row = await cur.fetchone()
    return bool(row and row[0])


async def migrate(conn: Conn) -> None:
    """Create or upgrade the tables, one node at a time; the others wait for it, then find them current."""
    limit = f"{int(MIGRATION_TIMEOUT * 1000)}"
    async with conn.transaction():
        # index builds may take long on a big table, and so may the wait for another node doing them
        await conn.execute(f"SET LOCAL statement_timeout = {limit}")
        await conn.execute(f"SET LOCAL lock_timeout = {limit}")
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _SCHEMA_LOCK)
        if await schema_current(conn):  # another node did it while this one waited
            return
        # but a wait for a table lock keeps the operation's lock_timeout (the session's), so that an
        # upgrade never queues the live traffic behind it for long
        await conn.execute("SET LOCAL lock_timeout TO DEFAULT")
        for statement in _SCHEMA:
            await conn.execute(statement)
