"""Choosing a backend by URL scheme, as tooz picks its drivers.

Options common to every backend ride in the query string:
``timeout`` (seconds per operation) and ``claim_retention`` (seconds claims
and run records are kept). Anything else in the query is an error, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from lock_backends.base import DEFAULT_CLAIM_RETENTION, DEFAULT_OP_TIMEOUT
from lock_backends.errors import ACCEPTED_URL_FORMS, BackendURLError

if TYPE_CHECKING:
    from lock_backends.base import LockBackend

#: scheme -> (module, class name). Modules are imported only when used, so a
#: deployment on one backend does not need the others' client libraries.
SCHEMES: dict[str, tuple[str, str]] = {
    "redis": ("lock_backends.redis", "RedisBackend"),
    "rediss": ("lock_backends.redis", "RedisBackend"),
    "postgresql": ("lock_backends.postgres", "PostgresBackend"),
    "postgres": ("lock_backends.postgres", "PostgresBackend"),
    "etcd": ("lock_backends.etcd", "EtcdBackend"),
    "file": ("lock_backends.file", "FileBackend"),
}

COMMON_OPTIONS = ("timeout", "claim_retention")


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend honours."""

    op_timeout: float = DEFAULT_OP_TIMEOUT
    claim_retention: float = DEFAULT_CLAIM_RETENTION


def _bad(url: str, why: str) -> BackendURLError:
    forms = "; ".join(ACCEPTED_URL_FORMS)
    return BackendURLError(f"bad lock URL {redact(url)!r}: {why}. Accepted forms: {forms}")


def redact(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def parse_options(url: str, extra: tuple[str, ...] = ()) -> tuple[BackendOptions, dict[str, str]]:
    """Split the query string into common options and the backend's own ``extra`` ones."""
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    allowed = COMMON_OPTIONS + extra
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise _bad(url, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    values: dict[str, float] = {}
    for name in COMMON_OPTIONS:
        if name in query:
            try:
                values[name] = float(query.pop(name))
            except ValueError:
                raise _bad(url, f"option {name} must be a number of seconds") from None
            if values[name] <= 0:
                raise _bad(url, f"option {name} must be positive")
    opts = BackendOptions(
        op_timeout=values.get("timeout", DEFAULT_OP_TIMEOUT),
        claim_retention=values.get("claim_retention", DEFAULT_CLAIM_RETENTION),
    )
    return opts, query


def from_url(url: str) -> LockBackend:
    """Build the backend a URL names. Connects lazily, on the first operation."""
    if not isinstance(url, str) or "://" not in url:
        raise _bad(str(url), "expected scheme://...")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _bad(url, f"unknown scheme {scheme!r}")
    module_name, class_name = SCHEMES[scheme]
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: LockBackend = cls.from_url(url)
    return backend


def bad_url(url: str, why: str) -> BackendURLError:
    """For backend modules: the error for a URL of their scheme that they cannot use."""
    return _bad(url, why)
