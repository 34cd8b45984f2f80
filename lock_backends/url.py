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
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from lock_backends.base import DEFAULT_CLAIM_RETENTION, DEFAULT_OP_TIMEOUT
from lock_backends.errors import BackendURLError
from lock_backends.registry import ACCEPTED_URL_FORMS, BY_SCHEME, BackendKind

if TYPE_CHECKING:
    from lock_backends.base import LockBackend

#: Options every backend takes, with the range of seconds each accepts.
OPTION_BOUNDS: dict[str, tuple[float, float]] = {
    "timeout": (0.01, 60.0),
    "claim_retention": (0.5, 366 * 24 * 3600.0),
}
COMMON_OPTIONS = tuple(OPTION_BOUNDS)


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend honours."""

    op_timeout: float = DEFAULT_OP_TIMEOUT
    claim_retention: float = DEFAULT_CLAIM_RETENTION


def _bad(url: str, why: str) -> BackendURLError:
    forms = "; ".join(ACCEPTED_URL_FORMS)
    return BackendURLError(f"bad lock URL {redact(url)!r}: {why}. Accepted forms: {forms}")


def redact(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages.

    Hides the password of the user info and the value of every query option
    whose name looks secret (``?password=``, ``?sslpassword=``, ``?token=``, ...).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable>"
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    if query:
        secret = ("pass", "pwd", "secret", "token", "key", "auth", "credential")
        items = [item.partition("=") for item in query.split("&")]
        query = "&".join(f"{name}=***" if equals and value and any(s in unquote_plus(name).lower() for s in secret)
                         else f"{name}{equals}{value}" for name, equals, value in items)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()


def parse_options(url: str, extra: tuple[str, ...] = ()) -> tuple[BackendOptions, dict[str, str]]:
    """Split the query string into common options and the backend's own ``extra`` ones."""
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    allowed = COMMON_OPTIONS + extra
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise _bad(url, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    values: dict[str, float] = {}
    for name, (low, high) in OPTION_BOUNDS.items():
        if name in query:
            try:
                values[name] = float(query.pop(name))
            except ValueError:
                raise _bad(url, f"option {name} must be a number of seconds") from None
            if not low <= values[name] <= high:  # also refuses nan and inf
                raise _bad(url, f"option {name} must be between {low:g} and {high:g} seconds")
    opts = BackendOptions(
        op_timeout=values.get("timeout", DEFAULT_OP_TIMEOUT),
        claim_retention=values.get("claim_retention", DEFAULT_CLAIM_RETENTION),
    )
    return opts, query


def from_url(url: str) -> LockBackend:
    """Build the backend a URL names. Connects lazily, on the first operation."""
    if not isinstance(url, str) or "://" not in url:
        raise _bad(str(url), "expected scheme://...")
    kind = kind_of(url)
    cls = getattr(importlib.import_module(kind.module), kind.cls)
    backend: LockBackend = cls.from_url(url)
    return backend


def kind_of(url: str) -> BackendKind:
    """The backend a URL names, by its scheme, without building it."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    kind = BY_SCHEME.get(scheme)
    if kind is None:
        raise _bad(url, f"unknown scheme {scheme!r}")
    return kind


def bad_url(url: str, why: str) -> BackendURLError:
    """For backend modules: the error for a URL of their scheme that they cannot use."""
    return _bad(url, why)
