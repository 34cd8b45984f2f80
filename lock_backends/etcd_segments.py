"""The etcd backend's run-record *segments*: a batch of finished runs written as a few values, not a key each.

Apart from ``etcd_runs`` because it is a layout of its own, with its own
argument for why listings stay right. A leader running thousands of jobs
finishes thousands of runs a second; written a key each (by key plus time
index: two puts, and a compare, per record) a transaction of etcd's 128
operations holds about 60 of them, so the records alone cost dozens of
transactions a second. A segment holds hundreds::

    /baton/N/seg/<inv>/<digest>   JSON list of RunRecord.to_dict(), the newest at <inv>, all within SEG_SPAN_US

``<inv>`` is the time index's inverted microsecond (``etcd_runs``) of the
segment's newest record, and every record in it is less than ``SEG_SPAN_US``
older than that, so a listing that has read every segment keyed at or after
an instant has read every segment record at or after it (``etcd_runs._scan``).
``<digest>`` is a hash of the segment's keys: the same batch written again (a
retry whose first answer was lost) puts the same values under the same keys.
Segments are on the shared retention lease, as every record is, so they expire
after ``claim_retention`` with the rest.

Which records go into segments: those with a result whose key has no record of
its own (``runs/<key>``), that is, fire times run through a claim window that
were not recoverable. A claim or an intent is a record of its own (its key is
how ``claim`` and the intents' compares find it) and stays one when its result
arrives: the result replaces it in place, deleting its open index entry.

How a segment write knows that none of its keys has a record of its own,
without a compare per key (etcd allows 128): every record without a result has
an *open* index entry (``open/<inv>/<key>``), and a record of its own with a
result replaced one of those. The writer keeps the keys of the open index as
read at some revision R, and each segment transaction compares that no open
entry was created or changed after R (one compare on the whole range, as the
busy runs' compare). Keys seen open, and keys this instance wrote as records
of their own, go to ``etcd_runs``' per-key transactions instead. A failed
compare rereads the open keys in the same round trip and tries again (a few
times, then the per-key way, which is always right). So a segment record never
coexists with an open entry of its key written before it: ``unfinished()``,
which reads the open index alone, never lists a run whose result is stored.
(An intent or claim written *after* a key's result went into a segment would
be listed: a key's result is written after its run, and a fire time's intent
before its window, a recovery's claim under a key of its own, so the node never
does that.)

Why each key is listed once, with its newest record: a key is in one place per
write, and a write puts the same key's record into at most one segment. What
can leave two copies is a retry of a batch whose first answer was lost, split
differently (a record of its own and a segment copy, or two segments): the same
record, so at the same instant, which listings read together (a page never
splits an instant). Listings keep, per key, the copy whose etcd value was
written last (its mod revision): the newest. Values that do not decode, a
whole segment or one entry in it, are skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aetcd.utils import prefix_range_end

from lock_backends.base import RunRecord
from lock_backends.etcd_client import (
    DIGITS,
    TXN_OPS,
    EtcdPlumbing,
    cmp,
    delete,
    etcd_key,
    get,
    inv,
    put,
    range_kvs,
    to_us,
)
from lock_backends.url import BackendOptions

#: A segment's records are within this many microseconds of its newest (listings read this far above a cursor).
SEG_SPAN_US = 500_000
#: Records and bytes of one segment at most (a listing reads whole segments).
SEG_RECORDS = 500
SEG_BYTES = 128 * 1024

@dataclass(frozen=True)
class Segment:
    """One segment value to put: its etcd key, its value, and the records in it."""

    key: bytes
    value: bytes
    runs: tuple[RunRecord, ...]
    #: The runs' keys, for the set operations of a write (which are busy, whether one is open): a batch's
    #: records are long out of the processor's caches by then, and a pass over them costs a millisecond.
    keys: frozenset[str]


#: A run as it goes into a segment: (minus its claimed_at in microseconds, its key, the run). Sorted, newest
#: first then by key (the same runs make the same segments), without a key function; the time is worked
#: out once per run, while the run is at hand.
Entry = tuple[int, str, RunRecord]


def entry(run: RunRecord) -> Entry:
    return -to_us(run.claimed_at), run.key, run


def pack(name: str, entries: Sequence[Entry], values: dict[str, bytes]) -> list[Segment]:
    """Entries (one per key, each run with a result) as segments, newest first; the same runs make the same ones."""
    packer = Packer(name, values)
    for item in sorted(entries):
        packer.add(item)
    return packer.segments()


class Packer:
    """Entries, fed to it sorted, as segments: what ``pack`` does, a piece at a time if need be (a batch's
    records are out of the processor's caches by then: packing 2,500 at once held the event loop for about
    4 ms)."""

    def __init__(self, name: str, values: dict[str, bytes]) -> None:
        self.name = name
        self.values = values
        self._done: list[Segment] = []
        self._group: list[RunRecord] = []
        self._size = self._newest = 0

    def add(self, item: Entry) -> None:
        minus_us, key, run = item
        us, more = -minus_us, len(self.values[key]) + 1
        group = self._group
        if group and (us <= self._newest - SEG_SPAN_US or len(group) >= SEG_RECORDS or self._size + more > SEG_BYTES):
            self._close()
        if not self._group:
            self._newest, self._size = us, 0
        self._group.append(run)
        self._size += more

    def segments(self) -> list[Segment]:
        """The segments of every run added (the last one closed)."""
        if self._group:
            self._close()
        return self._done

    def _close(self) -> None:
        keys = [run.key for run in self._group]
        digest = hashlib.blake2b("\n".join(keys).encode(), digest_size=8).hexdigest()
        value = b"[" + b",".join(self.values[key] for key in keys) + b"]"
        self._done.append(Segment(etcd_key(self.name, "seg", inv(self._newest).decode(), digest), value,
                                  tuple(self._group), frozenset(keys)))
        self._group = []


def txn_groups(segments: Sequence[Segment], busy: frozenset[str], txn_bytes: int) -> list[list[Segment]]:
    """Segments grouped so that each group (a put each, a delete per busy key) fits one transaction."""
    groups: list[list[Segment]] = []
    ops = size = 0
    for segment in segments:
        more = 1 + len(segment.keys & busy)
        if not groups or ops + more > TXN_OPS or size + len(segment.value) > txn_bytes:
            groups.append([])
            ops = size = 0
        groups[-1].append(segment)
        ops += more
        size += len(segment.value)
    return groups


def decode_record(key: str, value: bytes) -> RunRecord:
    """Raises ValueError (or RecursionError) for a value that is not a run record."""
    return RunRecord.from_dict(key, json.loads(value))


def decode(value: bytes) -> list[RunRecord]:
    """The records of a segment value; entries that do not decode are left out, a value that does not, all."""
    try:
        items = json.loads(value)
    except (ValueError, RecursionError):
        return []
    if not isinstance(items, list):
        return []
    runs = []
    for item in items:
        try:
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise ValueError("no key")
            runs.append(RunRecord.from_dict(item["key"], item))
        except ValueError:
            continue
    return runs


class EtcdSegments(EtcdPlumbing):
    """Segment writes: one transaction of segments, compared against the open index as last read."""

    def __init__(self, url: str, endpoints: list[tuple[str, int]], options: BackendOptions) -> None:
        super().__init__(url, endpoints, options)
        #: Open index keys of each lock as last read: (the revision they were read at, the run keys).
        self._open: dict[str, tuple[int, frozenset[str]]] = {}
        #: Busy-run keys of each lock as last seen: (the revision they were read at, their keys).
        self._busy: dict[str, tuple[int, frozenset[str]]] = {}

    def open_keys(self, name: str) -> frozenset[str]:
        return self._open.get(name, (0, frozenset()))[1]

    def busy_keys(self, name: str) -> frozenset[str]:
        return self._busy.get(name, (0, frozenset()))[1]

    def _note_busy(self, name: str, revision: int, kvs: Sequence[Any]) -> None:
        prefix = etcd_key(name, "busy", "")
        self._busy[name] = (revision, frozenset(kv.key[len(prefix):].decode(errors="replace") for kv in kvs))

    async def _segment_chunk(self, client: Any, name: str, chunk: Sequence[Segment]) -> bool:
        """One transaction of segments: True when written; False when the open index or the busy runs
        changed since last read (both then reread, from the failure branch) or when the chunk, as now
        known, takes more ops than one transaction. Repeatable: the same segments under the same keys."""
        open_prefix, busy_prefix = etcd_key(name, "open", ""), etcd_key(name, "busy", "")
        open_end, busy_end = prefix_range_end(open_prefix), prefix_range_end(busy_prefix)
        open_at, open_keys = self._open.get(name, (0, frozenset()))
        busy_at, busy = self._busy.get(name, (0, frozenset()))
        if not all(s.keys.isdisjoint(open_keys) for s in chunk):
            return False  # learned meanwhile (another transaction's failure branch): the per-key way
        done = [delete(etcd_key(name, "busy", key)) for s in chunk for key in sorted(s.keys & busy)]
        if len(chunk) + len(done) > TXN_OPS:
            return False

        async def txn(retention: int) -> Any:
            return await self._txn(client,
                                   [cmp(open_prefix, "MOD", open_at + 1, "LESS", open_end),
                                    cmp(busy_prefix, "MOD", busy_at + 1, "LESS", busy_end)],
                                   [*(put(s.key, s.value, retention) for s in chunk), *done],
                                   [get(open_prefix, open_end, keys_only=True),
                                    get(busy_prefix, busy_end, keys_only=True)])

        response = await self._with_retention(client, txn)
        if response.succeeded:
            return True
        revision = int(response.header.revision)
        self._open[name] = (revision, frozenset(kv.key[len(open_prefix) + DIGITS + 1:].decode(errors="replace")
                                                for kv in range_kvs(response.responses[0])))
        self._note_busy(name, revision, range_kvs(response.responses[1]))
        return False
