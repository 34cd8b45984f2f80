"""A tooz leader-election worker on the Redis driver, running Baton's probe workload while it leads.

Runs inside ``.venv-peers``::

    python -m loadtest.peers.tooz_worker --node tooz-0 --url redis://127.0.0.1:6379 --collector URL

It follows tooz's documented pattern: join a group, ``watch_elected_as_leader``,
call ``run_watchers`` every retry period (0.2 TTL, Baton's), and keep the
heartbeat thread on (``start(start_heart=True)``). The leader lock's timeout is
the TTL (tooz takes whole seconds). On election it starts firing the probes
itself from a plain thread: sleep to the next grid instant, post every job's
record, repeat, late instants handled as APScheduler's coalesce and misfire
grace would. There is no catch-up of fire times missed before the election:
tooz has no scheduler and no record of what the last leader ran.

What the worker cannot do, because tooz's Redis driver does not offer it: learn
that it lost the lead. The driver implements neither ``get_leader`` nor
``stand_down_group_leader``, there is no "lost leadership" event, and a leader
lock whose heartbeat fails (it expired while the process was paused) is only
logged. So a leader leads until it dies. That is measured, not corrected.

Token: tooz has no fencing token. Each election stamps the worker's term with
``time.monotonic_ns() // 1e6`` at the moment the callback ran (CLOCK_MONOTONIC
is one clock for all processes of a Linux host), so later elections carry
larger numbers. A sink fencing on it is what the checker's fenced-sink column
simulates; tooz itself gives a sink nothing of the kind.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from loadtest.peers.probe import POST_ERRORS, fail, job_names, next_instant, parser, post_probe, ready, validate

GROUP = b"baton-peers"
log = logging.getLogger("tooz-worker")


class ProbeLeader:
    """Fires the probe jobs from the first election on; the term is re-stamped at every election."""

    def __init__(self, node: str, collector: str, jobs: int, interval: float, grace: float) -> None:
        self.node = node
        self.collector = collector
        self.names = job_names(jobs)
        self.interval = interval
        self.grace = grace
        self.term = 0
        self.elected = threading.Event()

    def on_elected(self, event: Any) -> None:
        """tooz's LeaderElected callback: from here on this worker believes it leads."""
        self.term = time.monotonic_ns() // 1_000_000
        log.warning("elected leader of %s, term %d", event.group_id, self.term)
        self.elected.set()

    def fire_forever(self) -> None:
        """Run every probe at each grid instant; a late loop behaves as an APScheduler job would.

        As APScheduler (coalesce on, a misfire grace) would: when the loop wakes late, it runs the latest
        instant that is due, once, if it is no older than the grace, and skips the older ones. So a
        stall shorter than the grace delays a run instead of losing it, and a leader woken from a pause
        runs the instant it overslept into, as a scheduler would.
        """
        self.elected.wait()
        instant = next_instant(self.interval, datetime.now(UTC))
        while True:
            time.sleep(max(0.0, (instant - datetime.now(UTC)).total_seconds()))
            now = datetime.now(UTC)
            # the latest instant <= now; never one before ``instant`` (already run) if the sleep ended a hair early
            due = max(instant, next_instant(self.interval, now) - timedelta(seconds=self.interval))
            if (now - due).total_seconds() <= self.grace:
                for job in self.names:
                    try:
                        post_probe(self.collector, job, due, self.node, self.term)
                    except POST_ERRORS as exc:
                        log.warning("probe %s@%s not stored: %s", job, due.isoformat(), exc)
            instant = due + timedelta(seconds=self.interval)


def coordinator_url(url: str, ttl: float) -> str:
    """tooz's Redis URL with the lock and membership timeouts at the TTL (lock_timeout is whole seconds)."""
    parts = urlsplit(url)
    lock_timeout = max(1, round(ttl))
    return (f"redis://{parts.hostname}:{parts.port or 6379}?timeout=1&lock_timeout={lock_timeout}"
            f"&membership_timeout={ttl:g}")


def main(argv: list[str] | None = None) -> int:
    p = parser("tooz_worker", "Redis URL, redis://host:port")
    args = p.parse_args(argv)
    validate(p, args)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {args.node} %(name)s %(message)s")
    import tooz
    from tooz import coordination

    leader = ProbeLeader(args.node, args.collector, args.jobs, args.interval, args.misfire_grace)
    try:
        coord = coordination.get_coordinator(coordinator_url(args.url, args.ttl), args.node.encode())
        coord.start(start_heart=True)
        with contextlib.suppress(coordination.GroupAlreadyExist):
            coord.create_group(GROUP).get()
        with contextlib.suppress(coordination.MemberAlreadyExist):
            coord.join_group(GROUP).get()
        coord.watch_elected_as_leader(GROUP, leader.on_elected)
    except tooz.ToozError as exc:
        return fail("tooz_worker", f"cannot join the election at {args.url}: {exc}")
    threading.Thread(target=leader.fire_forever, name="probe-fire", daemon=True).start()
    ready()
    retry = args.ttl * 0.2
    while True:
        try:
            coord.run_watchers()
        except tooz.ToozError as exc:
            log.warning("run_watchers failed: %s", exc)
        time.sleep(retry)


if __name__ == "__main__":
    sys.exit(main())
