"""Leader-election lock backends behind one small protocol.

    from lock_backends import from_url, Holder
    backend = from_url("redis://127.0.0.1:6379/0")
    lease = await backend.acquire("scheduler", Holder("node-a", "http://a:8000"), ttl=5)
"""

from lock_backends.base import (
    DRIFT,
    NO_WINDOW,
    BusyRun,
    ClaimStore,
    Holder,
    Lease,
    LeaseStore,
    LockBackend,
    RunQuery,
    RunRecord,
    RunStore,
    SettingStore,
    Window,
)
from lock_backends.errors import (
    BackendUnavailable,
    BackendURLError,
    CorruptValue,
    LockBackendError,
)
from lock_backends.registry import ACCEPTED_URL_FORMS
from lock_backends.url import BackendOptions, from_url, kind_of, redact

__all__ = [
    "ACCEPTED_URL_FORMS",
    "DRIFT",
    "NO_WINDOW",
    "BackendOptions",
    "BackendURLError",
    "BackendUnavailable",
    "BusyRun",
    "ClaimStore",
    "CorruptValue",
    "Holder",
    "Lease",
    "LeaseStore",
    "LockBackend",
    "LockBackendError",
    "RunQuery",
    "RunRecord",
    "RunStore",
    "SettingStore",
    "Window",
    "from_url",
    "kind_of",
    "redact",
]
