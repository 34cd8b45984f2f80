"""The etcd backend's run records: their three keys, the time index, batched writes and listings.

Apart from ``etcd`` because the record layout and its listings are a
subject of their own: how a record is kept findable by key, by time and
while unfinished, within etcd's limits on transactions and range requests.
The layout functions here are used by ``etcd_claims`` too (a claim and an
intent are records without a result); ``EtcdRuns`` adds the ``RunStore``
methods to ``etcd.EtcdBackend``.

A run's record is kept under three keys (see the layout in ``etcd``)::

    /baton/N/runs/<key>         by key: a claim or intent (result null) or an outcome
    /baton/N/time/<inv>/<key>   the same record, indexed by time for ``runs()``
    /baton/N/open/<inv>/<key>   the same record once more while it has no result, for ``unfinished()``

``<inv>`` is ``9999999999999999 - floor(claimed_at * 10**6)`` in 16 digits, so
etcd's natural ascending key order is newest first: etcd 3.4 walks the whole
requested key range for every Range (and fetches all of it to sort it), so
listings ask only for ascending ranges with a limit, narrowed to time slices
(see ``runs``). The three keys of one run are always written and deleted
together in one transaction, on one shared *retention lease*, so they expire
together after ``claim_retention``. Listings skip values that do not decode.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from aetcd.utils import prefix_range_end

from lock_backends import clock
from lock_backends._common import ENCODE_SLICE, listing_limit
from lock_backends.base import MAX_LISTING, RunQuery, RunRecord
from lock_backends.etcd_client import (
    TRIES,
    TXN_OPS,
    EtcdPlumbing,
    cmp,
    delete,
    etcd_key,
    first_kv,
    get,
    json_value,
    put,
    range_kvs,
)
from lock_backends.url import BackendOptions

#: Records per ``record_many`` transaction at most (one compare each, next to the busy-runs compare).
_RECORD_CHUNK = TXN_OPS - 2
#: Bytes of values per ``record_many`` transaction at most: etcd refuses a request over 1.5 MiB by default.
_TXN_BYTES = 1_000_000
#: ``record_many`` transactions in flight at once.
_RECORD_PARALLEL = 4

#: Time index keys: ``_INV - microseconds`` in ``_DIGITS`` digits, so ascending key order is newest first.
_DIGITS = 16
_INV: int = 10**_DIGITS - 1
#: A listing examines at most this many records (filters apply to the newest ones), whatever it asks.
SCAN_CAP = 2 * MAX_LISTING
#: Records per listing request at most.
_PAGE = 500
#: Width of a listing's first time slice; an empty slice makes the next one four times wider.
_FIRST_SLICE_US = 1_000_000


def to_us(seconds: float) -> int:
    """Unix seconds as whole microseconds, clamped to what a time index key can hold."""
    return min(_INV, max(0, math.floor(seconds * 1_000_000)))


def _inv(us: int) -> bytes:
    return f"{_INV - us:0{_DIGITS}d}".encode()


def decode_record(key: str, value: bytes) -> RunRecord:
    """Raises ValueError (or RecursionError) for a value that is not a run record."""
    return RunRecord.from_dict(key, json.loads(value))


@dataclass(frozen=True)
class Prev:
    """What a record key held when last read: its mod revision (0: absent) and its record (None: garbage)."""

    mod: int = 0
    record: RunRecord | None = None
    corrupt: bool = False


ABSENT = Prev()


def prev_of(kv: Any | None, key: str) -> Prev:
    """What a read of ``key``'s record key found, as a ``Prev``."""
    if kv is None:
        return ABSENT
    try:
        return Prev(int(kv.mod_revision), decode_record(key, kv.value))
    except (ValueError, RecursionError):
        return Prev(int(kv.mod_revision), None, corrupt=True)


def _record_keys(name: str, key: str, claimed_at: float) -> tuple[bytes, bytes, bytes]:
    """(by key, time index, open index) keys of ``key``'s record claimed at ``claimed_at``."""
    inv = _inv(to_us(claimed_at)).decode()
    return etcd_key(name, "runs", key), etcd_key(name, "time", inv, key), etcd_key(name, "open", inv, key)


def record_ops(name: str, run: RunRecord, prev: Prev, lease_id: int, value: bytes | None = None) -> list[Any]:
    """The ops that replace ``prev`` (the key's record as last read) with ``run``, indexes included."""
    value = json_value(run.to_dict()) if value is None else value
    by_key, by_time, by_open = _record_keys(name, run.key, run.claimed_at)
    ops = [put(by_key, value, lease_id), put(by_time, value, lease_id)]
    if run.result is None:
        ops.append(put(by_open, value, lease_id))
    if prev.record is not None:
        _, old_time, old_open = _record_keys(name, run.key, prev.record.claimed_at)
        if old_time != by_time:
            ops.append(delete(old_time))
        if prev.record.result is None and (old_open != by_open or run.result is not None):
            ops.append(delete(old_open))
    # a record whose old value did not decode leaves its old index entries (unknown) to expire
    return ops


def _record_op_count(run: RunRecord, prev: Prev) -> int:
    """``len(record_ops(...))`` without building them."""
    count = 3 if run.result is None else 2
    if prev.record is not None:
        moved = to_us(prev.record.claimed_at) != to_us(run.claimed_at)
        count += moved + (prev.record.result is None and (moved or run.result is not None))
    return count


def delete_record_ops(name: str, record: RunRecord) -> list[Any]:
    """The ops that delete ``record`` and its index entries."""
    by_key, by_time, by_open = _record_keys(name, record.key, record.claimed_at)
    return [delete(by_key), delete(by_time), *([delete(by_open)] if record.result is None else [])]


class EtcdRuns(EtcdPlumbing):
    """``RunStore`` for etcd: ``record_many``, ``runs`` and ``unfinished``."""

    def __init__(self, url: str, endpoints: list[tuple[str, int]], options: BackendOptions) -> None:
        super().__init__(url, endpoints, options)
        #: Busy-run keys of each lock as last seen: (the revision they were read at, their keys).
        self._busy: dict[str, tuple[int, frozenset[str]]] = {}

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        """Each record replaces the key's record (and its index entries, its intent, its busy entry).

        Transactions of as many records as fit in 128 ops (64 new keys: two puts each),
        ``_RECORD_PARALLEL`` in flight, each optimistic: it compares that each key is as last
        seen (absent, at first: fire times that were never claimed, as a rule) and that no busy
        run appeared since they were read. A transaction whose compare fails reads those keys
        and the busy runs in its failure branch and goes again. Each transaction is bounded by
        the operation timeout on its own: a batch is as many round trips as it has transactions.

        Cost of a batch of 5,000 new records (``tests/test_etcd.py::test_record_many_batch_of_5000``,
        etcd 3.4, one member, loopback, 2 cores shared with other work): 79 transactions, 0.45-0.5 s
        on a quiet machine (1-1.2 s under load), about 0.3 s of it this process's CPU (JSON and
        protobuf). The same 5,000 again (every key present: each transaction fails its compares
        once) about 1.2 s. The get-then-compare-and-swap per record it replaces took about 15 s.
        A typical RunRecorder batch of 20 records is one transaction, 1-2 ms.
        """
        latest: dict[str, RunRecord] = {}
        values: dict[str, bytes] = {}
        for i, run in enumerate(records, 1):
            values[run.key] = json_value(run.to_dict())  # refuse what cannot be stored, before any change
            if i % ENCODE_SLICE == 0:
                await asyncio.sleep(0)  # the scheduler's fire times wait behind no long stretch of encoding
            latest.pop(run.key, None)
            latest[run.key] = run  # the last record of a key wins, as it would written one by one
        if not latest:
            return
        prevs: dict[str, Prev] = {}
        queue = asyncio.Queue[tuple[list[RunRecord], int]]()
        for group in self._split_records(name, list(latest.values()), prevs, values):
            queue.put_nowait((group, 1))

        async def worker() -> None:
            while not queue.empty():
                chunk, tries = queue.get_nowait()
                if tries > TRIES:
                    raise self._gave_up("record_many", f"records of {name!r}")
                body = functools.partial(self._record_chunk, name=name, chunk=chunk, prevs=prevs, values=values)
                if await self._call("record_many", body):
                    continue
                for group in self._split_records(name, chunk, prevs, values):
                    queue.put_nowait((group, tries + 1))

        await _all_or_first_error([worker() for _ in range(min(_RECORD_PARALLEL, queue.qsize()))])

    def _split_records(self, name: str, runs: Sequence[RunRecord], prevs: dict[str, Prev],
                       values: dict[str, bytes]) -> list[list[RunRecord]]:
        """Records grouped so that each group's ops (and bytes) fit one transaction, as far as known."""
        busy = self._busy.get(name, (0, frozenset()))[1]
        groups: list[list[RunRecord]] = []
        ops = size = 0
        for run in runs:
            more = _record_op_count(run, prevs.get(run.key, ABSENT)) + (run.key in busy)
            weight = len(values[run.key]) * (3 if run.result is None else 2)
            if not groups or ops + more > TXN_OPS or size + weight > _TXN_BYTES or len(groups[-1]) >= _RECORD_CHUNK:
                groups.append([])
                ops = size = 0
            groups[-1].append(run)
            ops += more
            size += weight
        return groups

    async def _record_chunk(self, client: Any, name: str, chunk: Sequence[RunRecord],
                            prevs: dict[str, Prev], values: dict[str, bytes]) -> bool:
        """One transaction of records: True when written; False when a compare failed (``prevs`` and
        the busy runs then refreshed from the failure branch) or when the chunk, as now known, takes
        more ops than one transaction. Repeatable: a record written twice is the same."""
        busy_prefix = etcd_key(name, "busy", "")
        busy_end = prefix_range_end(busy_prefix)
        seen_at, busy = self._busy.get(name, (0, frozenset()))
        by_key = [etcd_key(name, "runs", run.key) for run in chunk]

        async def txn(retention: int) -> Any:
            ops = []
            for i, run in enumerate(chunk, 1):
                ops += record_ops(name, run, prevs.get(run.key, ABSENT), retention, values[run.key])
                if run.key in busy:
                    ops.append(delete(etcd_key(name, "busy", run.key)))
                if i % ENCODE_SLICE == 0:
                    await asyncio.sleep(0)
            if len(ops) > TXN_OPS:
                return None
            compare = [cmp(busy_prefix, "MOD", seen_at + 1, "LESS", busy_end),
                       *(cmp(k, "MOD", prevs.get(run.key, ABSENT).mod) for k, run in zip(by_key, chunk, strict=True))]
            return await self._txn(client, compare, ops,
                                   [get(busy_prefix, busy_end, keys_only=True), *(get(k) for k in by_key)])

        response = await self._with_retention(client, txn)
        if response is None:
            return False  # more ops than one transaction takes: split it
        if response.succeeded:
            return True
        self._busy[name] = (int(response.header.revision),
                            frozenset(kv.key[len(busy_prefix):].decode(errors="replace")
                                      for kv in range_kvs(response.responses[0])))
        for run, op in zip(chunk, response.responses[1:], strict=True):
            prevs[run.key] = prev_of(first_kv(op), run.key)
        return False

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        """Newest first from the time index, in time slices, bounded by the limit and ``SCAN_CAP``.

        etcd 3.4 walks the whole key range of a Range request in its index (even with a limit), so
        no request here spans more than a slice of time: the first covers the last second (and the
        future), an empty one makes the next four times wider, and one that holds more than a page
        makes the next as wide as a full page at the density just seen. (One wide slice may still
        walk many keys in the server's in-memory index once; values are read only up to the page.)
        A page ends with every run at its last instant (``RunQuery``), so the next page's cursor
        skips none.
        """
        limit = listing_limit(query)
        if limit == 0:
            return []
        return await self._call("runs", lambda c: self._scan(c, name, query, limit))

    async def _scan(self, client: Any, name: str, query: RunQuery, limit: int) -> list[RunRecord]:
        prefix = etcd_key(name, "time", "")
        floor_us = to_us(query.since) if query.since is not None else 0
        top_us = to_us(query.before) if query.before is not None else None
        start = prefix + _inv(top_us) if top_us is not None else prefix
        lo = (top_us if top_us is not None else to_us(clock.time())) - _FIRST_SLICE_US
        width = _FIRST_SLICE_US
        filtered = query.job is not None or query.outcome is not None  # then expect to read more than shown
        found: list[RunRecord] = []
        tie_us: int | None = None  # once ``limit`` runs are found: the microsecond of the last one
        scanned = 0
        while scanned < SCAN_CAP and len(found) < MAX_LISTING:
            lo = max(lo, floor_us)
            end = prefix + _inv(lo - 1) if lo > 0 else prefix_range_end(prefix)
            if start < end:
                page = min(_PAGE, SCAN_CAP - scanned, _PAGE if filtered else max(50, 2 * (limit - len(found))))
                response = await self._range(client, start, end, page)
                kvs = list(response.kvs)
                scanned += len(kvs)
                for kv in kvs:
                    run = _listed(kv, prefix)
                    if run is None or not query.matches(run):
                        continue
                    if tie_us is not None and to_us(run.claimed_at) != tie_us:
                        continue  # older than the page's last instant (the next ranges end there)
                    found.append(run)
                    if tie_us is None and len(found) >= limit:
                        tie_us = to_us(run.claimed_at)
                        floor_us = lo = max(floor_us, tie_us)
                if response.more and kvs:
                    start = kvs[-1].key + b"\0"
                    newest, oldest = _slice_times(kvs, prefix)
                    width = max(1, (newest - oldest) * _PAGE // len(kvs))  # about a full page at this density
                    lo = max(floor_us, oldest - width)
                    continue
            start = end
            if lo <= floor_us:
                break
            width *= 4
            lo -= width
        # within one microsecond the index orders by key, the protocol by claimed_at: sort, then
        # keep the first ``limit`` and every other run at the instant of the last of them
        found.sort(key=lambda run: run.claimed_at, reverse=True)
        if len(found) > limit:
            last = found[limit - 1].claimed_at
            found = found[:limit] + [run for run in found[limit:] if run.claimed_at == last]
        return found[:MAX_LISTING]

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        """Records without a result, newest first: the open index holds nothing else, so this is cheap."""
        if limit <= 0:
            return []
        prefix = etcd_key(name, "open", "")

        async def scan(client: Any) -> list[RunRecord]:
            found: list[RunRecord] = []
            start, end = prefix, prefix_range_end(prefix)
            scanned = 0
            while len(found) < limit and scanned < SCAN_CAP:
                response = await self._range(client, start, end, min(_PAGE, limit - len(found) + 10))
                kvs = list(response.kvs)
                scanned += len(kvs)
                found += [run for run in (_listed(kv, prefix) for kv in kvs)
                          if run is not None and run.result is None]
                if not response.more or not kvs:
                    break
                start = kvs[-1].key + b"\0"
            return found[:limit]

        return await self._call("unfinished", scan)


def _slice_times(kvs: Sequence[Any], prefix: bytes) -> tuple[int, int]:
    """The microseconds of the first (newest) and last (oldest) time index keys of a page."""
    def at(kv: Any) -> int:
        digits = kv.key[len(prefix):len(prefix) + _DIGITS]
        return _INV - int(digits) if digits.isdigit() else 0
    return at(kvs[0]), at(kvs[-1])


def _listed(kv: Any, prefix: bytes) -> RunRecord | None:
    """A listed index entry as a run, or None for one that does not decode (listings skip those)."""
    try:
        key = kv.key[len(prefix) + _DIGITS + 1:].decode()
        return decode_record(key, kv.value)
    except (ValueError, RecursionError):
        return None


async def _all_or_first_error(coros: Sequence[Awaitable[None]]) -> None:
    """Run ``coros`` concurrently; on the first failure cancel the others, wait for them, raise it.

    Unlike ``asyncio.gather`` nothing is left running unobserved, and unlike a TaskGroup the
    error comes out as itself (``_call``'s typed errors), not in an ExceptionGroup.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
