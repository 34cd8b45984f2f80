"""The etcd backend's ``runs()`` listing: newest first across records of their own and segments.

Apart from ``etcd_runs`` because it is the one part of the run records that
reads two layouts at once, and its correctness is an argument of its own.

Two *streams* are read newest first, each in ascending key order (etcd's
order; ``<inv>`` makes it newest first): the time index of records of their
own (``time/<inv>/<key>``: a record exactly at its key's instant) and the
segments (``seg/<inv>/<digest>``: records at or up to ``SEG_SPAN_US`` before
the key's instant). etcd 3.4 walks the whole key range of a Range request in
its index (even with a limit), so no request spans more than a *slice* of
time: the first covers the last second (and the future), a slice read to its
end makes the next four times wider, and one that holds more than a page
makes the next as wide as a full page at the density just seen.

Each stream has a *frontier*: every entry keyed at or after it has been read.
A record at instant ``t`` is keyed at ``t`` or later in either stream, so once
both frontiers are at or below ``t``, every record at ``t`` or after has been
read; call the higher frontier ``M``. The listing stops when the records at or
after ``M`` that match the query are at least ``limit`` (then the last one
shown, and every other at its instant, is known: a page never splits an
instant, so the next page's cursor skips nothing), when both streams are read
down to ``since`` (or the oldest record), or after ``SCAN_CAP`` records; only
records at or after ``M`` are answered. A cursor (``before``) starts the time
index at its instant and the segments ``SEG_SPAN_US`` above it.

Per key, the copy in the value written last (its mod revision) is kept, before
any filter: a key's two copies (see ``etcd_segments``) are one record at one
instant, so a listing reads both or neither.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aetcd.utils import prefix_range_end

from lock_backends import clock
from lock_backends.base import MAX_LISTING, RunQuery, RunRecord
from lock_backends.etcd_client import DIGITS, INV, etcd_key, inv, to_us
from lock_backends.etcd_segments import SEG_SPAN_US, decode, decode_record

#: A listing examines at most this many records (filters apply to the newest ones), whatever it asks.
SCAN_CAP = 2 * MAX_LISTING
#: Records of their own per listing request at most.
_PAGE = 500
#: Bytes of segments a listing request asks for, about (its first asks for two segments).
_SEGMENT_PAGE_BYTES = 512 * 1024
#: Width of a listing's first time slice; a slice read to its end makes the next one four times wider.
_FIRST_SLICE_US = 1_000_000

#: ``read(start, end, limit)``: a Range request's response.
Read = Callable[[bytes, bytes, int], Awaitable[Any]]


@dataclass
class _Stream:
    prefix: bytes
    pos: bytes  # the next key to read
    frontier: int = INV + 1  # every entry keyed at or after this microsecond has been read
    segments: bool = False
    value_bytes: int = 0  # bytes and records of the segment values read so far, for the next page's size
    values: int = 0
    records: int = 0

    def end(self, lo_us: int) -> bytes:
        """The end (exclusive) of this stream's keys at or after ``lo_us``."""
        return self.prefix + inv(lo_us - 1) if lo_us > 0 else prefix_range_end(self.prefix)

    def page(self, query: RunQuery, wanted: int, scanned: int) -> int:
        filtered = query.job is not None or query.outcome is not None  # then expect to read more than shown
        if self.segments:  # whole segments: as many as a page's bytes take, and the runs wanted, at the sizes seen
            if not self.values:
                return 2
            size, runs = self.value_bytes // self.values, max(1, self.records // self.values)
            need = _PAGE if filtered else 2 + wanted // runs
            return max(1, min(_PAGE, SCAN_CAP - scanned, _SEGMENT_PAGE_BYTES // max(1, size), need))
        return max(1, min(_PAGE, SCAN_CAP - scanned, _PAGE if filtered else max(50, 2 * wanted)))


async def scan(read: Read, name: str, query: RunQuery, limit: int) -> list[RunRecord]:
    """The listing (see the module docstring); ``limit`` is at least 1."""
    floor_us = to_us(query.since) if query.since is not None else 0
    top_us = to_us(query.before) if query.before is not None else None
    own, seg = etcd_key(name, "time", ""), etcd_key(name, "seg", "")
    streams = (_Stream(own, own + inv(top_us) if top_us is not None else own),
               _Stream(seg, seg + inv(min(INV, top_us + SEG_SPAN_US - 1)) if top_us is not None else seg,
                       segments=True))
    lo = (top_us if top_us is not None else to_us(clock.time())) - _FIRST_SLICE_US
    width = _FIRST_SLICE_US
    best: dict[str, tuple[int, RunRecord]] = {}  # per key, the copy written last
    scanned = 0
    while True:
        lo = max(lo, floor_us)
        pending = [s for s in streams if s.pos < s.end(lo)]
        if not pending:
            if lo <= floor_us:
                break  # both read down to the floor: every record at or after it is in ``best``
            width *= 4
            lo -= width
            continue
        stream = max(pending, key=lambda s: s.frontier)  # the one further behind, in time
        end = stream.end(lo)
        wanted = limit - _count(best, query, _frontier(streams))
        response = await read(stream.pos, end, stream.page(query, wanted, scanned))
        kvs = list(response.kvs)
        scanned += _take(best, kvs, stream, query)
        if response.more and kvs:
            stream.pos = kvs[-1].key + b"\0"
            newest, oldest = _slice_times(kvs, stream.prefix)
            stream.frontier = min(stream.frontier, oldest + 1)  # more may be keyed at ``oldest`` itself
            width = max(1, (newest - oldest) * _PAGE // len(kvs) if not stream.segments else newest - oldest)
            lo = max(floor_us, oldest - width)
        else:
            stream.pos = end
            stream.frontier = min(stream.frontier, lo)
        if _count(best, query, _frontier(streams)) >= limit or scanned >= SCAN_CAP:
            break
    complete = _frontier(streams)
    found = sorted((run for _, run in best.values() if query.matches(run) and to_us(run.claimed_at) >= complete),
                   key=lambda run: (-run.claimed_at, run.key))
    # keep the first ``limit`` and every other run at the instant of the last of them
    if len(found) > limit:
        last = found[limit - 1].claimed_at
        found = found[:limit] + [run for run in found[limit:] if run.claimed_at == last]
    return found[:MAX_LISTING]


def _frontier(streams: Sequence[_Stream]) -> int:
    """Every record at or after this microsecond has been read."""
    return max(s.frontier for s in streams)


def _count(best: dict[str, tuple[int, RunRecord]], query: RunQuery, complete: int) -> int:
    return sum(1 for _, run in best.values() if to_us(run.claimed_at) >= complete and query.matches(run))


def _take(best: dict[str, tuple[int, RunRecord]], kvs: Sequence[Any], stream: _Stream, query: RunQuery) -> int:
    """Keep the records of ``kvs`` (per key, the copy written last); the records examined, for the cap."""
    examined = 0
    for kv in kvs:
        if stream.segments:
            stream.values += 1
            stream.value_bytes += len(kv.value)
            runs = decode(kv.value)
            stream.records += len(runs)
        else:
            run = listed(kv, stream.prefix)
            runs = [] if run is None else [run]
        revision = int(kv.mod_revision)
        for run in runs:
            if query.before is None or run.claimed_at < query.before:
                examined += 1
            held = best.get(run.key)
            if held is None or held[0] < revision:
                best[run.key] = (revision, run)
        examined += not runs
    return examined


def _slice_times(kvs: Sequence[Any], prefix: bytes) -> tuple[int, int]:
    """The microseconds of the first (newest) and last (oldest) time index keys of a page."""
    def at(kv: Any) -> int:
        digits = kv.key[len(prefix):len(prefix) + DIGITS]
        return INV - int(digits) if digits.isdigit() else 0
    return at(kvs[0]), at(kvs[-1])


def listed(kv: Any, prefix: bytes) -> RunRecord | None:
    """A listed index entry as a run, or None for one that does not decode (listings skip those)."""
    try:
        key = kv.key[len(prefix) + DIGITS + 1:].decode()
        return decode_record(key, kv.value)
    except (ValueError, RecursionError):
        return None
