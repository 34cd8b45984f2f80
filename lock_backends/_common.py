"""Small pieces the backend modules used to repeat, each written once here.

Apart from ``base`` because they are not part of the protocol: they are how
the backends implement it the same way (the same JSON, the same renewed lease,
the same listing bound), so a change to one of them is made once and cannot
leave one backend behind. Nothing here talks to a store.
"""

from __future__ import annotations

import json
from typing import Any

from lock_backends.base import MAX_LISTING, Lease, RunQuery, local_deadline

#: Records a backend encodes for one batch between two looks at the event loop, so that the scheduler's
#: fire times never wait behind a long stretch of encoding (measured at 1,000 runs/s: stretches over 1 ms
#: from record encoding fell from 381 to 8 on Redis, from 448 to 34 on etcd, in 13 s).
ENCODE_SLICE = 8


def compact_json(value: Any) -> str:
    """``value`` as JSON without spaces, the form every backend stores (NaN is not refused here)."""
    return json.dumps(value, separators=(",", ":"))


def renewed(lease: Lease, t_sent: float) -> Lease:
    """``lease`` after a renew request sent at monotonic ``t_sent`` succeeded: only its deadline moves."""
    return Lease(lease.name, lease.holder, lease.token, lease.ttl, local_deadline(t_sent, lease.ttl),
                 handle=lease.handle)


def listing_limit(query: RunQuery) -> int:
    """How many runs a listing answers at most: the query's limit, within ``[0, MAX_LISTING]``."""
    return max(0, min(query.limit, MAX_LISTING))
