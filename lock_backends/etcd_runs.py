"""The etcd backend's run records: their keys, batched writes and ``unfinished``.

Apart from ``etcd`` because the record layout is a subject of its own: how a
record is kept findable by key, by time and while unfinished, within etcd's
limits on transactions and range requests. The layout functions here are used
by ``etcd_claims`` too (a claim and an intent are records without a result);
``EtcdRuns`` adds the ``RunStore`` methods to ``etcd.EtcdBackend``.

A run's record is kept in one of two ways (see the layout in ``etcd``). A
*record of its own*, under two or three keys::

    /baton/N/runs/<key>         by key: a claim or intent (result null), or its outcome
    /baton/N/time/<inv>/<key>   the same record, indexed by time for ``runs()``
    /baton/N/open/<inv>/<key>   the same record once more while it has no result, for ``unfinished()``

or, for a result whose key has no record of its own (a fire time run through a
claim window, not recoverable: nearly every run), an entry in a *segment*,
``/baton/N/seg/<inv>/<digest>``, a value holding hundreds of records
(``etcd_segments``, which says why a key is in one place and ``unfinished()``
never lists a run whose result is stored). ``runs()`` reads both
(``etcd_listing``); ``unfinished()`` reads the open index alone.

``<inv>`` is ``9999999999999999 - floor(claimed_at * 10**6)`` in 16 digits, so
etcd's natural ascending key order is newest first. The keys of one record
are always written and deleted together in one transaction, on one shared
*retention lease*, as segments are, so they expire together after
``claim_retention``. Listings skip values that do not decode.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from aetcd.utils import prefix_range_end

from lock_backends._common import ENCODE_SLICE, listing_limit
from lock_backends.base import RunQuery, RunRecord
from lock_backends.etcd_client import (
    TRIES,
    TXN_OPS,
    cmp,
    delete,
    etcd_key,
    first_kv,
    get,
    inv,
    json_value,
    put,
    range_kvs,
    to_us,
)
from lock_backends.etcd_listing import SCAN_CAP, listed, scan
from lock_backends.etcd_segments import (
    Entry,
    EtcdSegments,
    Packer,
    Segment,
    decode_record,
    entry,
    pack,
    txn_groups,
)
from lock_backends.url import BackendOptions

#: Records per per-key transaction at most (one compare each, next to the busy-runs compare).
_RECORD_CHUNK = TXN_OPS - 2
#: Bytes of values per ``record_many`` transaction at most: etcd refuses a request over 1.5 MiB by default.
_TXN_BYTES = 1_000_000
#: ``record_many`` transactions in flight at once.
_RECORD_PARALLEL = 4
#: Segment transactions of a batch that fail their compare (the open index or the busy runs changed) before
#: their records are written a key each.
_SEGMENT_TRIES = 3
#: Keys written as records of their own remembered per lock (a retry of a lost answer writes them there again).
_OWN_KEYS = 100_000
#: Records of a batch sorted into segments between two looks at the event loop.
_PACK_SLICE = 128
#: Records read per ``unfinished`` request at most.
_PAGE = 500


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
    at = inv(to_us(claimed_at)).decode()
    return etcd_key(name, "runs", key), etcd_key(name, "time", at, key), etcd_key(name, "open", at, key)


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


class EtcdRuns(EtcdSegments):
    """``RunStore`` for etcd: ``record_many``, ``runs`` and ``unfinished``."""

    def __init__(self, url: str, endpoints: list[tuple[str, int]], options: BackendOptions) -> None:
        super().__init__(url, endpoints, options)
        #: Keys this instance wrote as records of their own, recently (so a retry writes them there again).
        self._own: dict[str, dict[str, None]] = {}

    async def record_many(self, name: str, records: Sequence[RunRecord]) -> None:
        """Each record replaces the key's record (and its index entries, its intent, its busy entry).

        Records with a result whose key has no record of its own go into segments
        (``etcd_segments``): a batch of hundreds is one transaction. The others (a
        result for a claim or an intent, a record without a result) are written a key
        each: transactions of as many records as fit in 128 ops, each optimistic: it
        compares that each key is as last seen (absent, at first) and that no busy run
        appeared since they were read; one whose compare fails reads those keys and the
        busy runs in its failure branch and goes again. ``_RECORD_PARALLEL`` transactions
        are in flight, each bounded by the operation timeout on its own.

        Cost (``tests/test_etcd.py::test_record_many_batch_of_5000``, etcd 3.4, one
        member, loopback, 2 cores shared with other work): 5,000 new records within a few
        seconds of each other, one transaction of 10 segments; spread a second apart (a
        segment each), 40 transactions. Written a key each they took 79 (64 per
        transaction of 128 ops), 0.45-1.2 s. A typical RunRecorder batch is one transaction.
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
        #: (records to write a key each, or segments, and the tries so far)
        queue = asyncio.Queue[tuple[list[RunRecord], list[Segment], int]]()

        def queue_up(keyed: Sequence[RunRecord], segments: Sequence[Segment], tries: int) -> None:
            for group in self._split_records(name, keyed, prevs, values):
                queue.put_nowait((group, [], 1))
            for chunk in txn_groups(segments, self.busy_keys(name), _TXN_BYTES):
                queue.put_nowait(([], chunk, tries))

        def enqueue(runs: Sequence[RunRecord], tries: int) -> None:
            keyed, packed = self._partition(name, runs, tries)
            queue_up(keyed, pack(name, packed, values), tries)

        # sorted into segments a slice at a time: the whole batch at once held the loop for about 4 ms at 2,500
        # records (its records long out of the processor's caches), where fire times wait
        runs, keyed, order = list(latest.values()), list[RunRecord](), list[Entry]()
        for at in range(0, len(runs), _PACK_SLICE):
            some, more = self._partition(name, runs[at:at + _PACK_SLICE], 1)
            keyed += some
            order += more
            await asyncio.sleep(0)
        order.sort()  # a batch comes nearly oldest first: long descending runs, which the sort turns around
        packer = Packer(name, values)
        for at in range(0, len(order), _PACK_SLICE):
            for item in order[at:at + _PACK_SLICE]:
                packer.add(item)
            await asyncio.sleep(0)
        queue_up(keyed, packer.segments(), 1)

        async def worker() -> None:
            while not queue.empty():
                runs, segments, tries = queue.get_nowait()
                if tries > TRIES:
                    raise self._gave_up("record_many", f"records of {name!r}")
                if segments:
                    body = functools.partial(self._segment_chunk, name=name, chunk=segments)
                    if not await self._call("record_many", body):
                        enqueue([run for segment in segments for run in segment.runs], tries + 1)
                    continue
                body = functools.partial(self._record_chunk, name=name, chunk=runs, prevs=prevs, values=values)
                if await self._call("record_many", body):
                    continue
                for group in self._split_records(name, runs, prevs, values):
                    queue.put_nowait((group, [], tries + 1))

        await _all_or_first_error([worker() for _ in range(min(_RECORD_PARALLEL, queue.qsize()))])

    def _partition(self, name: str, runs: Sequence[RunRecord], tries: int) -> tuple[list[RunRecord], list[Entry]]:
        """(records to write a key each, entries for segments); the former noted as this instance's own.

        A segment takes a record with a result whose key is neither open nor written a key each
        by this instance lately (see ``etcd_segments``); after ``_SEGMENT_TRIES`` failed segment
        transactions, nothing (the per-key way is right whatever the open index does).
        """
        open_keys, own = self.open_keys(name), self._own.setdefault(name, {})
        keyed, packed = [], []
        for run in runs:
            if tries > _SEGMENT_TRIES or run.result is None or run.key in open_keys or run.key in own:
                keyed.append(run)
                own.pop(run.key, None)
                own[run.key] = None  # before the write: its answer may be lost after it applied
            else:
                packed.append(entry(run))
        while len(own) > _OWN_KEYS:
            del own[next(iter(own))]
        return keyed, packed

    def _split_records(self, name: str, runs: Sequence[RunRecord], prevs: dict[str, Prev],
                       values: dict[str, bytes]) -> list[list[RunRecord]]:
        """Records grouped so that each group's ops (and bytes) fit one transaction, as far as known."""
        busy = self.busy_keys(name)
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
        self._note_busy(name, int(response.header.revision), range_kvs(response.responses[0]))
        for run, op in zip(chunk, response.responses[1:], strict=True):
            prevs[run.key] = prev_of(first_kv(op), run.key)
        return False

    async def runs(self, name: str, query: RunQuery) -> list[RunRecord]:
        """Newest first from the time index and the segments, in time slices, bounded by the limit and
        ``SCAN_CAP`` (``etcd_listing``)."""
        limit = listing_limit(query)
        if limit == 0:
            return []
        return await self._call("runs", lambda c: scan(lambda start, end, page: self._range(c, start, end, page),
                                                       name, query, limit))

    async def unfinished(self, name: str, limit: int) -> list[RunRecord]:
        """Records without a result, newest first: the open index holds nothing else, so this is cheap."""
        if limit <= 0:
            return []
        prefix = etcd_key(name, "open", "")

        async def read_open(client: Any) -> list[RunRecord]:
            found: list[RunRecord] = []
            start, end = prefix, prefix_range_end(prefix)
            scanned = 0
            while len(found) < limit and scanned < SCAN_CAP:
                response = await self._range(client, start, end, min(_PAGE, limit - len(found) + 10))
                kvs = list(response.kvs)
                scanned += len(kvs)
                found += [run for run in (listed(kv, prefix) for kv in kvs)
                          if run is not None and run.result is None]
                if not response.more or not kvs:
                    break
                start = kvs[-1].key + b"\0"
            return found[:limit]

        return await self._call("unfinished", read_open)


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
