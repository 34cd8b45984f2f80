"""The etcd backend's ``ClaimStore``: claim windows, hand-back and single-key claims, as fenced transactions.

Apart from ``etcd`` because this is where the proof in ``base`` is kept on
etcd, and it reads best on its own: each operation is an optimistic ``Txn``
whose compares are the fence, retried with what its failure branch read.
``EtcdClaims`` adds these methods to ``etcd.EtcdBackend``; claims and intents
are run records without a result, written with ``etcd_runs``' layout.

Why a claim window is atomic with the fence: ``claim_window`` is one ``Txn``
whose compares are ``create_revision(lock) == token`` (the lease's token is
the lock's current one: the lock key exists, so its lease is alive) and
``mod_revision(window) == m``, where ``m`` is the mark's revision this instance
saw last. The success branch puts ``next_window(mark_seen_at_m, ...)`` (plus
the intents, plus a range read of the busy runs). If either compare fails,
nothing is written and the failure branch reads the lock, the mark and the
intents' records; the backend answers None if the token is no longer the
lock's, or else recomputes from the mark it just read and tries again (a few
times). So the mark written is always ``next_window`` of the mark it replaces,
under the lock's current token: point 1 of the proof in ``base``. With a cached
``m`` the whole operation is one round trip; asking for what is granted already
writes nothing. ``hand_back`` compares only the mark's revision (after reading
it), not the lock: it must work after the lease lapsed, until a successor moves
the mark, and ``handed_back`` refuses a mark that is not the caller's.

etcd refuses a transaction of more than 128 operations (``--max-txn-ops``) or
1.5 MiB, so big batches are split: ``claim_many`` 42 keys per transaction,
``claim_window`` 25 intents with the window (``record_many``: see ``etcd_runs``). Intents beyond
those 25 follow in transactions of their own *after* the window's, each fenced
by the lock again: a crash between them can lose an intent (a recoverable fire
time not recovered), never leave one for a window that was not granted (which a
successor would run twice). ``hand_back`` deletes the overflow of ``drop``
*before* sealing, fenced by the mark's revision, for the same reason: a crash
between them can leave given-back fire times without their intents (not
recovered), never intents for fire times the successor's window runs anyway.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from aetcd.utils import prefix_range_end

from lock_backends import clock
from lock_backends.base import NO_WINDOW, BusyRun, Lease, RunRecord, Window, handed_back, next_window
from lock_backends.etcd_client import (
    CLIENT_ERRORS,
    TRIES,
    TXN_OPS,
    EtcdPlumbing,
    cmp,
    delete,
    etcd_key,
    first_kv,
    get,
    json_value,
    lease_not_found,
    put,
    range_kvs,
    to_us,
    whole_seconds,
)
from lock_backends.etcd_runs import ABSENT, Prev, delete_record_ops, prev_of, record_ops
from lock_backends.url import BackendOptions

T = TypeVar("T")

#: Keys per ``claim_many`` transaction: one compare and three puts each (record, time and open index).
_CLAIM_CHUNK = (TXN_OPS - 2) // 3
#: Intents in the window's own transaction: at most five ops each (three puts, two stale index deletes),
#: next to the mark's put and the busy runs' read.
_WINDOW_INTENTS = (TXN_OPS - 2) // 5


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class EtcdClaims(EtcdPlumbing):
    """``ClaimStore`` for etcd: ``claim_window``, ``hand_back``, ``claim`` and ``claim_many``."""

    def __init__(self, url: str, endpoints: list[tuple[str, int]], options: BackendOptions) -> None:
        super().__init__(url, endpoints, options)
        #: The claim mark of each lock as last seen: (its mod revision, 0 when absent; the mark).
        self._marks: dict[str, tuple[int, Window | None]] = {}

    def _mark(self, kv: Any | None) -> Window | None:
        if kv is None:
            return None
        try:
            return Window.from_dict(json.loads(kv.value))
        except (ValueError, RecursionError) as exc:
            raise self._corrupt(kv.key, "the claim mark", exc) from None

    def _busy_runs(self, kvs: Iterable[Any]) -> tuple[BusyRun, ...]:
        """Busy runs not yet expired on this host's clock, in key order."""
        now_us = to_us(clock.time())
        found = []
        for kv in kvs:
            try:
                run = BusyRun.from_dict(json.loads(kv.value))
            except (ValueError, RecursionError) as exc:
                raise self._corrupt(kv.key, "a busy run", exc) from None
            if run.until_us > now_us:
                found.append(run)
        return tuple(found)

    async def claim_window(self, lease: Lease, until_us: int, start_us: int,
                           intents: Sequence[str] = ()) -> Window | None:
        keys = list(dict.fromkeys(intents))
        first, rest = keys[:_WINDOW_INTENTS], keys[_WINDOW_INTENTS:]
        window = await self._call("claim_window",
                                  lambda c: self._window_txn(c, lease, until_us, start_us, first))
        if window is None or not window.owned_by(lease.token):
            return window
        for chunk in _chunks(rest, _WINDOW_INTENTS):
            # after the window's own transaction, each fenced again (see the module docstring)
            if not await self._call("claim_window", functools.partial(self._intents_txn, lease=lease, keys=chunk)):
                return None  # the lock moved on meanwhile: act as fenced
        return window

    async def claim_mark(self, name: str) -> Window:
        kv, _ = await self._call("claim_mark", lambda c: self._get_one(c, etcd_key(name, "window")))
        mark = self._mark(kv)
        if kv is not None:  # the next claim's compare starts from what was just read
            self._marks[name] = (int(kv.mod_revision), mark)
        return NO_WINDOW if mark is None else mark

    async def _window_txn(self, client: Any, lease: Lease, until_us: int, start_us: int,
                          intents: Sequence[str]) -> Window | None:
        """The window's transaction (see the module docstring). Repeatable: it is ``next_window`` of
        the mark it reads, and intents are rewritten only over records without a result."""
        name, token = lease.name, lease.token
        lock, mark_key = etcd_key(name, "lock"), etcd_key(name, "window")
        busy = etcd_key(name, "busy", "")
        prevs = dict.fromkeys(intents, ABSENT)  # optimistic: intents are new keys, as a rule
        for _ in range(TRIES):
            mod, mark = self._marks.get(name, (0, None))
            new = next_window(mark, token, until_us, start_us)
            changed = mark is None or new.to_dict() != mark.to_dict()
            compare = [cmp(lock, "CREATE", token), cmp(mark_key, "MOD", mod)]
            success = [put(mark_key, json_value(new.to_dict()))] if changed else []
            retention = 0
            if new.owned_by(token) and intents:
                retention = await self._retention_lease(client)
                compare += [cmp(etcd_key(name, "runs", k), "MOD", p.mod) for k, p in prevs.items()]
                success += self._intent_ops(lease, prevs, retention)
            success.append(get(busy, prefix_range_end(busy)))
            failure = [get(lock), get(mark_key), *(get(etcd_key(name, "runs", k)) for k in intents)]
            try:
                response = await self._txn(client, compare, success, failure)
            except CLIENT_ERRORS as exc:
                if not (retention and lease_not_found(exc)):
                    raise
                self._retention = None
                continue
            if response.succeeded:
                self._marks[name] = (int(response.header.revision) if changed else mod, new)
                return Window(new.token, new.since_us, new.until_us, new.sealed,
                              self._busy_runs(range_kvs(response.responses[-1])))
            lock_kv, mark_kv = first_kv(response.responses[0]), first_kv(response.responses[1])
            self._marks[name] = (int(mark_kv.mod_revision) if mark_kv is not None else 0, self._mark(mark_kv))
            if lock_kv is None or lock_kv.create_revision != token:
                return None
            for key, op in zip(intents, response.responses[2:], strict=True):
                prevs[key] = prev_of(first_kv(op), key)
        raise self._gave_up("claim_window", f"the claim mark of {name!r}")

    def _intent_ops(self, lease: Lease, prevs: dict[str, Prev], retention: int) -> list[Any]:
        """Puts of intents over keys that hold nothing or a record without a result."""
        now = clock.time()
        ops: list[Any] = []
        for key, prev in prevs.items():
            if prev.corrupt:
                raise self._corrupt(etcd_key(lease.name, "runs", key), "a run record", "not a run record")
            if prev.record is not None and prev.record.result is not None:
                continue  # an intent never overwrites a result
            run = RunRecord(key, lease.token, lease.holder.node_id, now)
            ops += record_ops(lease.name, run, prev, retention)
        return ops

    async def _intents_txn(self, client: Any, lease: Lease, keys: Sequence[str]) -> bool:
        """Intents beyond the window's transaction, fenced by the lock. Repeatable, as the window's."""
        lock = etcd_key(lease.name, "lock")
        prevs = dict.fromkeys(keys, ABSENT)
        for _ in range(TRIES):
            async def txn(retention: int) -> Any:
                compare = [cmp(lock, "CREATE", lease.token),
                           *(cmp(etcd_key(lease.name, "runs", k), "MOD", p.mod) for k, p in prevs.items())]
                return await self._txn(client, compare, self._intent_ops(lease, prevs, retention),
                                       [get(lock), *(get(etcd_key(lease.name, "runs", k)) for k in keys)])

            response = await self._with_retention(client, txn)
            if response.succeeded:
                return True
            lock_kv = first_kv(response.responses[0])
            if lock_kv is None or lock_kv.create_revision != lease.token:
                return False
            for key, op in zip(keys, response.responses[1:], strict=True):
                prevs[key] = prev_of(first_kv(op), key)
        raise self._gave_up("claim_window", f"intents of {lease.name!r}")

    async def hand_back(self, lease: Lease, at_us: int, busy: Sequence[BusyRun] = (),
                        drop: Sequence[str] = ()) -> Window | None:
        unique = list(dict.fromkeys(drop))
        return await self._call("hand_back", lambda c: self._hand_back(c, lease, at_us, busy, unique))

    async def _hand_back(self, client: Any, lease: Lease, at_us: int, busy: Sequence[BusyRun],
                         drop: list[str]) -> Window | None:
        """Read the mark (and the records to drop), then seal it under a compare of its revision.

        Repeatable: ``handed_back`` of a mark sealed already is the same mark, and a drop
        deletes only records still holding an intent of this token.
        """
        name, token = lease.name, lease.token
        mark_key, busy_prefix = etcd_key(name, "window"), etcd_key(name, "busy", "")
        now_us = to_us(clock.time())
        live = list({run.key: run for run in busy if run.until_us > now_us}.values())  # one put per key
        busy_lease = 0
        if live:  # a lease of their own, so they vanish soon after the last one's until_us
            longest = max(run.until_us for run in live) / 1_000_000 - clock.time()
            busy_lease = int((await client.lease(whole_seconds(longest + 1.0))).id)
        busy_ops = [put(etcd_key(name, "busy", run.key), json_value(run.to_dict()), busy_lease) for run in live]
        # an expired one replaces the key's entry too (with nothing a reader would count)
        busy_ops += [delete(etcd_key(name, "busy", key)) for key in {r.key for r in busy} - {r.key for r in live}]
        for _ in range(TRIES):
            reads = [get(mark_key), *(get(etcd_key(name, "runs", k)) for k in drop[:TXN_OPS - 1])]
            response = await self._txn(client, [], reads)
            mark_kv = first_kv(response.responses[0])
            mod = int(mark_kv.mod_revision) if mark_kv is not None else 0
            mark = self._mark(mark_kv)
            prevs = {k: prev_of(first_kv(op), k) for k, op in zip(drop, response.responses[1:], strict=False)}
            for chunk in _chunks(drop[TXN_OPS - 1:], TXN_OPS):
                more = await self._txn(client, [], [get(etcd_key(name, "runs", k)) for k in chunk])
                prevs.update({k: prev_of(first_kv(op), k) for k, op in zip(chunk, more.responses, strict=True)})
            new = handed_back(mark, token, at_us)
            if new is None:
                return None
            # (compare, ops) per dropped intent: deleted only while it is still this token's, unreported
            dropping = [([cmp(etcd_key(name, "runs", k), "MOD", p.mod)], delete_record_ops(name, p.record))
                        for k, p in prevs.items()
                        if p.record is not None and p.record.result is None and p.record.token == token]
            items = dropping + [([], [op]) for op in busy_ops]
            changed = mark is None or new.to_dict() != mark.to_dict()
            head = [put(mark_key, json_value(new.to_dict()))] if changed else []
            fence = cmp(mark_key, "MOD", mod)
            batches = _pack(items, compare_room=TXN_OPS - 1, op_room=TXN_OPS - len(head) - 1)
            # every batch but the last goes first, fenced by the mark's revision; the last seals the mark
            moved = False
            for compare, ops in batches[:-1]:
                if not (await self._txn(client, [fence, *compare], ops)).succeeded:
                    moved = True
                    break
            if moved:
                continue
            compare, ops = batches[-1] if batches else ([], [])
            final = await self._txn(client, [fence, *compare],
                                    [*head, *ops, get(busy_prefix, prefix_range_end(busy_prefix))])
            if final.succeeded:
                self._marks[name] = (int(final.header.revision) if changed else mod, new)
                return Window(new.token, new.since_us, new.until_us, new.sealed,
                              self._busy_runs(range_kvs(final.responses[-1])))
        raise self._gave_up("hand_back", f"the claim mark of {name!r}")

    async def claim(self, lease: Lease, key: str) -> bool:
        return key in await self.claim_many(lease, [key])

    async def claim_many(self, lease: Lease, keys: Sequence[str]) -> set[str]:
        """One transaction per chunk of keys: each absent key claimed, each of this token's claimed again.

        A claim is a run record without a result (token, node, now), with its time and open
        index entries. A chunk meeting a claimed key learns who holds it from its failure branch
        and claims the rest again.
        """
        claimed: set[str] = set()
        for chunk in _chunks(list(dict.fromkeys(keys)), _CLAIM_CHUNK):
            mine = await self._call("claim", functools.partial(self._claim_chunk, lease=lease, chunk=chunk))
            if mine is None:
                return claimed  # fenced: the token is not the lock's any more
            claimed |= mine
        return claimed

    async def _claim_chunk(self, client: Any, lease: Lease, chunk: Sequence[str]) -> set[str] | None:
        """Repeatable: a retry finds what an earlier attempt claimed under this token, and counts it."""
        lock = etcd_key(lease.name, "lock")
        free, mine = list(chunk), set[str]()
        for _ in range(TRIES):
            if not free:
                return mine
            now = clock.time()
            runs = [RunRecord(k, lease.token, lease.holder.node_id, now) for k in free]

            async def txn(retention: int, free: list[str] = free, runs: list[RunRecord] = runs) -> Any:
                by_key = [etcd_key(lease.name, "runs", k) for k in free]
                return await self._txn(
                    client, [cmp(lock, "CREATE", lease.token), *(cmp(k, "MOD", 0) for k in by_key)],
                    [op for run in runs for op in record_ops(lease.name, run, ABSENT, retention)],
                    [get(lock), *(get(k) for k in by_key)])

            response = await self._with_retention(client, txn)
            if response.succeeded:
                return mine | set(free)
            lock_kv = first_kv(response.responses[0])
            if lock_kv is None or lock_kv.create_revision != lease.token:
                return None
            still_free = []
            for key, op in zip(free, response.responses[1:], strict=True):
                kv = first_kv(op)
                if kv is None:
                    still_free.append(key)
                    continue
                prev = prev_of(kv, key)
                if prev.record is None:
                    raise self._corrupt(kv.key, "a claim", "not a run record")
                if prev.record.token == lease.token:
                    mine.add(key)  # ours already: a retry after a lost answer
            free = still_free
        raise self._gave_up("claim", f"keys of {lease.name!r}")


def _pack(items: Sequence[tuple[list[Any], list[Any]]], compare_room: int,
          op_room: int) -> list[tuple[list[Any], list[Any]]]:
    """Group (compares, ops) items into transactions within etcd's limits, in order."""
    batches: list[tuple[list[Any], list[Any]]] = []
    for compare, ops in items:
        if not batches or len(batches[-1][0]) + len(compare) > compare_room \
                or len(batches[-1][1]) + len(ops) > op_room:
            batches.append(([], []))
        batches[-1][0].extend(compare)
        batches[-1][1].extend(ops)
    return batches
