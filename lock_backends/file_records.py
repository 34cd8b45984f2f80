"""The file backend's run records: claims, intents, busy runs and record batches, as files.

Layout under a lock's directory (``file.py`` keeps the lease log beside them):

``claims/<key>``
    single-key claims (``claim``, ``claim_many``). The name is the claim: it is
    made with ``link``, which fails if the name exists, so one token gets it.
    All new keys of one call are hard links to one file (token, node, time),
    written and fsynced once before the first link; one fsync of the directory
    after the last link makes every name durable before the answer. 150 keys
    cost one file, 150 ``link`` calls and two fsyncs (and the listing line
    below), where 150 exclusive creates and 150 fsyncs took longer than the
    operation timeout on a busy disk. (Creates with one directory fsync and no file fsync would not do: a
    crash could keep a name whose content never reached the disk, an empty
    claim that no longer says whose it is.) Recording the key's run replaces
    the name's content by the record (an atomic rename: the name never
    disappears, so the claim stays exclusive, and it says by itself that it
    was reported). New claims are also written as a line of a record batch
    (not fsynced: ``claims/`` is the truth), so listings never read
    ``claims/``, however many claims the retention keeps; ``unfinished`` does,
    the newest ``OPEN_CAP`` at most. A claim also looks at ``intents/`` and ``done/``: a key
    another token intended is not claimable. It does not look at record
    batches (that would cost the retention), so a key that was only ever
    recorded, never claimed or intended, can still be claimed; claim keys
    (recovery, manual runs) are never fire-time keys of a window.
``intents/<key>``
    intents of recoverable fire times (``claim_window``), made the same way
    (one fsynced file, a link per key, one directory fsync). Writing the key's
    record moves the intent to ``done/<key>`` (one rename): ``intents/`` holds
    only unreported runs, so ``unfinished`` reads a handful of files whatever
    the retention, and ``done/`` tells a later intent that the key has a result.
``busy/<key>``
    runs handed over still going (``hand_back``), one small file each, read by
    ``claim_window`` (expired ones are removed there) and removed with the
    key's record.
``records/<hour>/<max_us>-<min_us>-<written_ns>-<random>.jsonl``
    one file per ``record_many`` batch, fsynced once (and its directory), in
    the directory of the hour of its newest run; one JSON record per line,
    newest first. A listing walks hours, then files, newest first, and stops
    as soon as no unread file can hold a run newer than the page's oldest: its
    cost follows the page (and ``SCAN_LINES`` / ``SCAN_FILES`` when filters
    match little), never the retention. Pruning by age removes whole hours.

A key's versions rank: a record (in a batch, or a reported claim) over an
intent over a bare claim; among records, the batch written last. Keys become
file names percent-encoded (a leading dot too, so no key is taken for a
temporary file); a name that would be too long is cut and suffixed with a hash
of the key, which is then stored in the file. Files linked together share
their content: edit one by hand only after unlinking it. Every file is written
under a hidden temporary name (``.tmp-*``) removed whatever fails; those a
killed process left are pruned after ``STALE_TMP`` (in ``records/``, with
their hour). What does not decode is skipped by listings; ``claim`` of its
key raises ``CorruptValue``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import heapq
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from lock_backends._common import compact_json, listing_limit
from lock_backends.base import MAX_LISTING, BusyRun, RunQuery, RunRecord
from lock_backends.errors import CorruptValue

CLAIMS, INTENTS, DONE, BUSY, RECORDS = "claims", "intents", "done", "busy", "records"
SUBDIRS = (CLAIMS, INTENTS, DONE, BUSY, RECORDS)
TMP_PREFIX = ".tmp-"
HOUR_US = 3600 * 1_000_000
#: A listing decodes at most this many record lines and opens at most this many batch files.
SCAN_LINES = 10 * MAX_LISTING
SCAN_FILES = MAX_LISTING
#: Claim and intent files a listing reads at most (the newest), should a directory ever grow large.
OPEN_CAP = 2 * MAX_LISTING
#: Temporary files older than this are left-overs of a process killed while writing them.
STALE_TMP = 3600.0
#: Longest file name made from a key (NAME_MAX is 255 on Linux file systems).
MAX_NAME = 200

# precedence of the versions of one key: a record beats an intent, an intent beats a bare claim
_CLAIMED, _INTENDED, _RECORDED = 0, 1, 2


# -- small durable-file helpers (shared with the lease log) --------------------------------------


def corrupt(lockdir: Path, path: Path, why: str) -> CorruptValue:
    return CorruptValue(why, key=str(path), backend="file", address=str(lockdir.parent))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def durable_tmp(directory: Path, data: bytes, stem: str, sync: bool = True) -> Path:
    """``data`` in a new hidden file of ``directory``, on disk; the file is removed again if anything fails."""
    tmp = directory / f"{TMP_PREFIX}{stem}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def replace_durable(path: Path, data: bytes) -> None:
    """Make ``data`` the content of ``path`` atomically (the directory is not fsynced)."""
    tmp = durable_tmp(path.parent, data, path.name[:40])
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key_name(key: str) -> str:
    """The file name of ``key``: percent-encoded; cut and hashed if it would be too long."""
    name = quote(key, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 33]}~{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    return name


def _dump(data: dict[str, Any]) -> bytes:
    return compact_json(data, allow_nan=False).encode()


def _decode(lockdir: Path, path: Path, raw: bytes) -> RunRecord:
    """A claim, intent or done file as a run record; CorruptValue naming the file if it is not one."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        key = data.get("key")
        if not isinstance(key, str):
            long_keys = data.get("keys")
            key = long_keys.get(path.name) if isinstance(long_keys, dict) else None
        return RunRecord.from_dict(key if isinstance(key, str) else unquote(path.name), data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise corrupt(lockdir, path, f"not a run record: {exc}") from None


def read_key_file(lockdir: Path, path: Path) -> RunRecord | None:
    """None when the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return _decode(lockdir, path, raw)


class _LinkSource:
    """One durable file that many names are hard-linked to (a new one if the link count runs out)."""

    def __init__(self, directory: Path, body: bytes) -> None:
        self.directory, self.body = directory, body
        self.files: list[Path] = []

    def link(self, target: Path) -> bool:
        """False when ``target`` exists already."""
        if not self.files:
            self.files.append(durable_tmp(self.directory, self.body, "batch"))
        try:
            os.link(self.files[-1], target)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
            self.files.append(durable_tmp(self.directory, self.body, "batch"))
            return self.link(target)
        return True

    def close(self) -> None:
        for path in self.files:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _open_body(token: int, node_id: str, now: float, names: dict[str, str]) -> bytes:
    """What a claim or intent file holds; keys whose name was cut are named inside."""
    body: dict[str, Any] = {"token": token, "node_id": node_id, "claimed_at": now, "result": None}
    long_keys = {name: key for name, key in names.items() if unquote(name) != key}
    if long_keys:
        body["keys"] = long_keys
    return _dump(body)


# -- claims and intents -------------------------------------------------------------------------------


def claim_keys(lockdir: Path, keys: Sequence[str], token: int, node_id: str) -> set[str]:
    """The keys claimed (new, or this token's already); the caller checked the lease just before."""
    claimed: set[str] = set()
    fresh: dict[str, str] = {}
    for key in dict.fromkeys(keys):
        name = key_name(key)
        other = read_key_file(lockdir, lockdir / INTENTS / name) or read_key_file(lockdir, lockdir / DONE / name)
        if other is None:
            fresh[name] = key
        elif other.token == token:
            claimed.add(key)
    if not fresh:
        return claimed
    claims, now = lockdir / CLAIMS, time.time()
    made: list[RunRecord] = []
    source = _LinkSource(claims, _open_body(token, node_id, now, fresh))
    try:
        for name, key in fresh.items():
            for _ in range(3):  # a claim pruned between our link and our read: link again
                if source.link(claims / name):
                    claimed.add(key)
                    made.append(RunRecord(key, token, node_id, now))
                    break
                existing = read_key_file(lockdir, claims / name)
                if existing is not None:
                    if existing.token == token:
                        claimed.add(key)  # ours already: a retry after a lost answer
                    break
        fsync_dir(claims)
    finally:
        source.close()
    if made:  # for listings, which never read claims/; best effort, no fsync: claims/ is the truth
        with contextlib.suppress(OSError):
            _write_batch(lockdir, made, encode_records(made), sync=False)
    return claimed


def write_intents(lockdir: Path, keys: Sequence[str], token: int, node_id: str) -> list[Path]:
    """Store ``keys`` as intents of ``token``, durably, except keys with a result; the files made new."""
    intents = lockdir / INTENTS
    todo: dict[str, str] = {}
    for key in dict.fromkeys(keys):
        name = key_name(key)
        if os.path.lexists(lockdir / DONE / name):
            continue  # recorded: an intent never goes over a result
        with contextlib.suppress(CorruptValue):  # a claim that does not decode is no result
            claim = read_key_file(lockdir, lockdir / CLAIMS / name)
            if claim is not None and claim.result is not None:
                continue
        todo[name] = key
    made: list[Path] = []
    if not todo:
        return made
    source = _LinkSource(intents, _open_body(token, node_id, time.time(), todo))
    try:
        for name in todo:
            target = intents / name
            if source.link(target):
                made.append(target)
                continue
            with contextlib.suppress(CorruptValue):  # garbage is replaced like another token's intent
                existing = read_key_file(lockdir, target)
                if existing is not None and existing.token == token:
                    continue  # ours already: a retry
            tmp = intents / f"{TMP_PREFIX}{name[:40]}.{secrets.token_hex(4)}"
            source.link(tmp)
            try:
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        fsync_dir(intents)
    except BaseException:
        forget(made)
        raise
    finally:
        source.close()
    return made


def forget(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def drop_intents(lockdir: Path, keys: Sequence[str], token: int) -> None:
    """Delete the intents of ``keys`` that ``token`` wrote (fire times it gave back)."""
    dropped = False
    for key in dict.fromkeys(keys):
        path = lockdir / INTENTS / key_name(key)
        with contextlib.suppress(CorruptValue):
            existing = read_key_file(lockdir, path)
            if existing is not None and existing.token == token and existing.result is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    dropped = True
    if dropped:
        fsync_dir(lockdir / INTENTS)


# -- busy runs ----------------------------------------------------------------------------------------


def write_busy(lockdir: Path, runs: Sequence[BusyRun]) -> list[Path]:
    """Store the runs, durably; the files that did not exist before (to remove if the hand-back fails)."""
    made: list[Path] = []
    for run in runs:
        path = lockdir / BUSY / key_name(run.key)
        existed = os.path.lexists(path)
        replace_durable(path, _dump(run.to_dict()))
        if not existed:
            made.append(path)
    if runs:
        fsync_dir(lockdir / BUSY)
    return made


def read_busy(lockdir: Path, now_us: int) -> tuple[BusyRun, ...]:
    """The unexpired busy runs (expired ones are removed; one that does not decode is skipped)."""
    found: list[BusyRun] = []
    with os.scandir(lockdir / BUSY) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                run = BusyRun.from_dict(json.loads(Path(entry.path).read_bytes()))
            except (OSError, ValueError):
                continue
            if run.until_us > now_us:
                found.append(run)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    return tuple(sorted(found, key=lambda r: r.key))


# -- records ------------------------------------------------------------------------------------------


def newest_first(records: Sequence[RunRecord]) -> list[RunRecord]:
    """The order of a batch file's lines."""
    return sorted(records, key=lambda r: r.claimed_at, reverse=True)


def encode_line(record: RunRecord) -> bytes:
    """One line of a batch file; TypeError or ValueError if the result is not plain JSON."""
    return _dump(record.to_dict()) + b"\n"


def encode_records(records: Sequence[RunRecord]) -> bytes:
    """A batch file's content (newest first); TypeError or ValueError if a result is not plain JSON."""
    return b"".join(encode_line(r) for r in newest_first(records))


def _write_batch(lockdir: Path, records: Sequence[RunRecord], data: bytes, sync: bool) -> None:
    stamps = [max(0, int(r.claimed_at * 1_000_000)) for r in records]
    newest, oldest = max(stamps), min(stamps)
    hour = lockdir / RECORDS / str(newest // HOUR_US)
    created = False
    with contextlib.suppress(FileExistsError):
        hour.mkdir()
        created = True
    tmp = durable_tmp(hour, data, "batch", sync)
    try:
        os.rename(tmp, hour / f"{newest}-{oldest}-{time.time_ns()}-{secrets.token_hex(3)}.jsonl")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(hour)
        if created:
            fsync_dir(lockdir / RECORDS)


def write_records(lockdir: Path, records: Sequence[RunRecord], data: bytes) -> None:
    """One batch file for ``records`` (``data`` from ``encode_records``), then each key's other files."""
    if not records:
        return
    _write_batch(lockdir, records, data, sync=True)
    claims, intents = os.listdir(lockdir / CLAIMS), os.listdir(lockdir / INTENTS)
    if not claims and not intents:
        return  # the common case: no key to look up (each lookup is a percent-encoding, under the GIL)
    by_name = {key_name(r.key): r for r in records}
    claimed = by_name.keys() & set(claims)
    for name in claimed:  # the claim keeps its name (still exclusive) and now says it was reported
        replace_durable(lockdir / CLAIMS / name, _dump(by_name[name].to_dict()))
    if claimed:
        fsync_dir(lockdir / CLAIMS)
    intended = by_name.keys() & set(intents)
    for name in intended:
        with contextlib.suppress(FileNotFoundError):
            os.replace(lockdir / INTENTS / name, lockdir / DONE / name)
    if intended:
        fsync_dir(lockdir / DONE)
        fsync_dir(lockdir / INTENTS)
    for name in by_name.keys() & set(os.listdir(lockdir / BUSY)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lockdir / BUSY / name)


def _open_records(lockdir: Path, horizon: float, subs: Sequence[str]) -> list[tuple[RunRecord, int]]:
    """Claims or intents (a few files), with their precedence; files that do not decode are skipped."""
    found: list[tuple[RunRecord, int]] = []
    for sub in subs:
        rank = _CLAIMED if sub == CLAIMS else _INTENDED
        with os.scandir(lockdir / sub) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        if len(entries) > OPEN_CAP:  # never expected; bounded anyway, by the newest files
            entries = heapq.nlargest(OPEN_CAP, entries, key=_mtime)
        for entry in entries:
            with contextlib.suppress(CorruptValue, OSError):
                run = read_key_file(lockdir, Path(entry.path))
                if run is not None and run.claimed_at >= horizon:
                    found.append((run, _RECORDED if run.result is not None else rank))
    return found


def _reported(lockdir: Path, key: str) -> bool:
    """True when the claim of ``key`` has its result: the claim file then holds it (``write_records``).

    A claim is a batch line too, at the instant it was claimed; its result is a line at another
    instant, in another batch. One listing that reads both keeps the result, but a page ending between
    the two would list the claim, and a later page the result: the key twice. Claims are few (per-key
    claims: recoveries, manual runs), so each claim line costs one small file read.
    """
    with contextlib.suppress(CorruptValue, OSError):
        run = read_key_file(lockdir, lockdir / CLAIMS / key_name(key))
        return run is not None and run.result is not None
    return False


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat().st_mtime
    except OSError:
        return 0.0


@dataclass(frozen=True)
class _Batch:
    path: Path
    newest_us: int
    oldest_us: int
    written_ns: int


def _batches(lockdir: Path) -> Iterator[_Batch]:
    """Batch files, the one holding the newest run first."""
    root = lockdir / RECORDS
    for hour in sorted((int(n) for n in os.listdir(root) if n.isdigit()), reverse=True):
        try:
            names = os.listdir(root / str(hour))
        except FileNotFoundError:
            continue  # pruned meanwhile
        batches = []
        for name in names:
            parts = name.removesuffix(".jsonl").split("-")
            if name.startswith(".") or len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
                continue
            batches.append(_Batch(root / str(hour) / name, int(parts[0]), int(parts[1]), int(parts[2])))
        batches.sort(key=lambda b: (b.newest_us, b.written_ns), reverse=True)
        yield from batches


def _lines(path: Path) -> Iterator[RunRecord]:
    """The records of a batch file, newest first; a line that does not decode is skipped."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:  # pruned meanwhile: no records
        for line in f:
            try:
                data = json.loads(line)
                key = data.get("key") if isinstance(data, dict) else None
                if not isinstance(key, str):
                    continue
                yield RunRecord.from_dict(key, data)
            except ValueError:
                continue


class _Page:
    """The versions of each key met so far, and the ``limit`` newest matching instants."""

    def __init__(self, query: RunQuery, limit: int) -> None:
        self.query, self.limit = query, limit
        self.found: dict[str, tuple[int, int, RunRecord]] = {}
        self.top: list[float] = []

    def offer(self, run: RunRecord, rank: int, seq: int) -> None:
        old = self.found.get(run.key)
        if old is not None and (old[0], old[1]) >= (rank, seq):
            return
        self.found[run.key] = (rank, seq, run)
        if self.query.matches(run) and (old is None or not self.query.matches(old[2])):
            if len(self.top) < self.limit:
                heapq.heappush(self.top, run.claimed_at)
            elif run.claimed_at > self.top[0]:
                heapq.heapreplace(self.top, run.claimed_at)

    def full_above(self, instant: float) -> bool:
        """True when the page holds ``limit`` matches, none older than ``instant``."""
        return len(self.top) >= self.limit and self.top[0] >= instant

    def beats(self, instant: float) -> bool:
        """True when the page holds ``limit`` matches, all newer than ``instant``."""
        return len(self.top) >= self.limit and self.top[0] > instant


def list_runs(lockdir: Path, query: RunQuery, horizon: float) -> list[RunRecord]:
    """``runs``: newest ``claimed_at`` first; nothing older than ``horizon`` (the retention)."""
    limit = listing_limit(query)
    if limit == 0:
        return []
    since = horizon if query.since is None else max(query.since, horizon)
    page = _Page(query, limit)
    for run, rank in _open_records(lockdir, since, [INTENTS]):  # claims are in the batches too
        page.offer(run, rank, 0)
    lines = files = 0
    for batch in _batches(lockdir):
        bound = (batch.newest_us + 2) / 1_000_000  # every run of the batch is older (a µs spared for rounding)
        if bound <= since or page.full_above(bound) or files >= SCAN_FILES or lines >= SCAN_LINES:
            break
        if query.before is not None and (batch.oldest_us - 1) / 1_000_000 >= query.before:
            continue  # the whole batch is on earlier pages
        files += 1
        for run in _lines(batch.path):
            lines += 1
            if query.before is not None and run.claimed_at >= query.before:
                continue
            if run.claimed_at < since or page.beats(run.claimed_at):
                break  # the rest of the file is older still
            if run.result is None and _reported(lockdir, run.key):
                continue  # its result is listed at its own instant (which may be on another page)
            page.offer(run, _CLAIMED if run.result is None else _RECORDED, batch.written_ns)
            if lines >= SCAN_LINES:
                break
    runs = [run for _, _, run in page.found.values() if run.claimed_at >= since and query.matches(run)]
    runs.sort(key=lambda r: r.claimed_at, reverse=True)
    cut = runs[:limit]
    if cut:  # a page ends with every run at its last instant, so a cursor at that instant skips none
        cut += [r for r in runs[limit:] if r.claimed_at == cut[-1].claimed_at]
    return cut


def unfinished(lockdir: Path, limit: int, horizon: float) -> list[RunRecord]:
    """Claims and intents without a result, newest first: a few files, whatever the retention."""
    best: dict[str, tuple[int, RunRecord]] = {}
    for run, rank in _open_records(lockdir, horizon, [CLAIMS, INTENTS]):
        if run.key not in best or best[run.key][0] < rank:
            best[run.key] = (rank, run)
    open_runs = [run for rank, run in best.values()
                 if rank != _RECORDED and not os.path.lexists(lockdir / DONE / key_name(run.key))]
    open_runs.sort(key=lambda r: r.claimed_at, reverse=True)
    return open_runs[:max(0, limit)]


# -- pruning ------------------------------------------------------------------------------------------


def prune(lockdir: Path, now: float, retention: float) -> None:
    """Remove what is older than the retention, and temporary files a killed process left behind."""
    horizon = now - retention
    for directory in (lockdir, *(lockdir / sub for sub in (CLAIMS, INTENTS, DONE, BUSY))):
        with os.scandir(directory) as entries:
            for entry in entries:
                hidden = entry.name.startswith(".")
                if directory == lockdir and not hidden:
                    continue  # the lease log prunes itself
                with contextlib.suppress(OSError):
                    if entry.is_file() and entry.stat().st_mtime < (now - STALE_TMP if hidden else horizon):
                        os.unlink(entry.path)
    root = lockdir / RECORDS
    cut_us = int(horizon * 1_000_000)
    for name in os.listdir(root):
        if not name.isdigit():
            continue
        hour = int(name)
        if (hour + 1) * HOUR_US <= cut_us:
            shutil.rmtree(root / name, ignore_errors=True)
        elif hour * HOUR_US <= cut_us:  # the hour the horizon falls in: file by file
            with contextlib.suppress(FileNotFoundError), os.scandir(root / name) as entries:
                for entry in entries:
                    newest = entry.name.split("-", 1)[0]
                    if newest.isdigit() and int(newest) < cut_us:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
