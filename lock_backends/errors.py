"""Typed errors shared by every lock backend.

Callers never see a client library's own exception: each backend module
translates them in one place into these, naming the backend and the address,
so that a person reading a log line knows which server to look at.
"""

from __future__ import annotations


class LockBackendError(Exception):
    """Base class of every error a lock backend raises."""

    def __init__(self, message: str, *, backend: str = "", address: str = "") -> None:
        self.backend = backend
        self.address = address
        where = f"{backend} backend at {address}" if address else f"{backend} backend"
        super().__init__(f"{where}: {message}" if backend else message)


class BackendUnavailable(LockBackendError):
    """The server could not be reached, or did not answer within the operation timeout.

    The caller must assume nothing about the lease: it may or may not still be
    held on the server. An elector treats this like a failed renew.
    """


class BackendURLError(LockBackendError, ValueError):
    """A lock URL is malformed or names a scheme no backend handles."""


ACCEPTED_URL_FORMS = (
    "redis://[:password@]host[:port][/db]",
    "postgresql://[user[:password]@]host[:port]/dbname",
    "etcd://host:port[,host:port...]",
    "file:///absolute/path/to/lock-directory",
)
