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


class CorruptValue(LockBackendError):
    """A value in the store does not decode as what Baton wrote there (garbage, or another program's).

    ``key`` names the store's key (or file) so a person can look at it and repair
    it. Callers never read such a value as "absent": a lease record that does not
    parse is not "no lease, token 0", so a token can never go backwards.
    """

    def __init__(self, message: str, *, key: str, backend: str = "", address: str = "") -> None:
        self.key = key
        super().__init__(f"{message} (key {key!r})", backend=backend, address=address)
