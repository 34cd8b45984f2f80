"""Leader-election lock backends behind one small protocol.

    from lock_backends import from_url, Holder
    backend = from_url("redis://127.0.0.1:6379/0")
    lease = await backend.acquire("scheduler", Holder("node-a", "http://a:8000"), ttl=5)
"""

from lock_backends.base import (
    DRIFT,
    Holder,
    Lease,
    LockBackend,
    RunRecord,
)
from lock_backends.errors import (
    ACCEPTED_URL_FORMS,
    BackendUnavailable,
    BackendURLError,
    LockBackendError,
)
from lock_backends.url import BackendOptions, from_url, redact

__all__ = [
    "ACCEPTED_URL_FORMS",
    "DRIFT",
    "BackendOptions",
    "BackendURLError",
    "BackendUnavailable",
    "Holder",
    "Lease",
    "LockBackend",
    "LockBackendError",
    "RunRecord",
    "from_url",
    "redact",
]
