"""Node settings from ``BATON_*`` environment variables or command-line flags.

Bad values stop the process with exit code 2 and one line that names the
variable and the accepted form (see ``ConfigError`` and ``node.__main__``).
Every duration is a finite number of seconds within the bounds in
``BOUNDS``; every ``BATON_*`` variable the node does not know is an error (a
misspelling must not fall back to a default silently); and no message shows a
secret: the admin token never, passwords in URLs (user info or query) as
``***``.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import socket
import tempfile
import zoneinfo
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, NoReturn
from urllib.parse import unquote_plus, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from lock_backends import ACCEPTED_URL_FORMS, BackendURLError, from_url, kind_of, redact
from node.probes import SPEC_FORM, ProbeShapesText


class ConfigError(ValueError):
    """A setting is invalid. ``variable`` is the environment variable (or flag) to fix.

    The message is always one line: whatever it quotes, line breaks are folded.
    """

    def __init__(self, variable: str, message: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {_one_line(message)}")


DAY = 86_400.0

#: The seconds each duration accepts, both ends included. Infinity and NaN never pass, and
#: the relations in ``Settings._defaults_and_timing`` (renew deadline below the TTL, ...) apply on top.
BOUNDS: dict[str, tuple[float, float]] = {
    "lease_ttl": (0.5, DAY),
    "renew_deadline": (0.01, DAY),
    "retry_period": (0.01, DAY),
    "misfire_grace": (0.1, 7 * DAY),
    "probe_interval": (0.01, 366 * DAY),  # the benchmarks register never-due probes at ~4 months
    "claim_ahead": (0.0, DAY),
    "shutdown_grace": (0.0, 3600.0),
    "max_clock_skew": (0.01, 60.0),
}


def _range(field: str) -> str:
    low, high = BOUNDS[field]
    return f"seconds from {low:g} to {high:g}"


#: What each setting accepts, for error messages and ``--help``.
ACCEPTED = {
    "node_id": "a non-empty name without spaces",
    "host": "an IP address to bind, such as 127.0.0.1, 0.0.0.0 (every IPv4 interface) or :: (every "
            "interface), or a host name",
    "port": "an integer port 1-65535",
    "advertise_url": "an http:// or https:// URL with a host (and optional port) peers can reach this node at",
    "lock_url": "one of " + "; ".join(ACCEPTED_URL_FORMS),
    "lock_name": "a non-empty name",
    "lease_ttl": f"{_range('lease_ttl')}, above BATON_RENEW_DEADLINE",
    "renew_deadline": f"{_range('renew_deadline')}, below BATON_LEASE_TTL and above BATON_RETRY_PERIOD",
    "retry_period": f"{_range('retry_period')}, below BATON_RENEW_DEADLINE",
    "misfire_grace": f"{_range('misfire_grace')} (7 days)",
    "timezone": "an IANA time zone name such as UTC or Europe/Berlin",
    "admin_token": "a bearer token of printable ASCII without leading or trailing spaces "
                   "(unset or empty disables the admin routes)",
    "probe_url": "an http:// or https:// URL of a probe collector, or empty",
    "probe_jobs": "an integer 0 to 100000",
    "probe_interval": _range("probe_interval"),
    "probe_shapes": f"{SPEC_FORM}; COUNT defaults to BATON_PROBE_JOBS, INTERVAL to BATON_PROBE_INTERVAL "
                    "(empty: BATON_PROBE_JOBS basic probes)",
    "claims": "on or off (off disables fencing, claims and the deadline re-check alike: "
              "for the checker's negative control only)",
    "claim_ahead": f"{_range('claim_ahead')} and below BATON_LEASE_TTL: the longest lead with which the leader "
                   "claims fire times before they come (0 claims each at its fire time)",
    "shutdown_grace": f"{_range('shutdown_grace')}: how long a stepping-down or stopping node waits for "
                      "running job bodies before it cancels them",
    "max_clock_skew": f"{_range('max_clock_skew')}: a leader whose wall clock is off by more does not fire",
    "peers": "comma-separated http:// or https:// base URLs of the other nodes, or empty; this node's own "
             "BATON_ADVERTISE_URL may be listed too (it is dropped)",
    "demo_jobs": "true or false",
    "jobs": "an import string module:attribute naming a JobRegistry (or a function returning one), "
            "e.g. myapp.jobs:registry",
    "sync_workers": "an integer 1 to 256: threads that run plain (def) job bodies",
    "log_level": "debug, info, warning or error",
    "log_format": "json or text",
}

#: Settings whose value no message may show.
SECRET_FIELDS = frozenset({"admin_token"})
#: Settings holding URLs: shown only through ``redact``.
URL_FIELDS = frozenset({"lock_url", "advertise_url", "probe_url", "peers"})
#: ``BATON_*`` variables that are not node settings and that a node therefore ignores: the
#: test harness reads them (``BATON_USE_DOCKER``, ``BATON_PORT_RANGE``: loadtest/servers.py).
NOT_NODE_SETTINGS = frozenset({"BATON_USE_DOCKER", "BATON_PORT_RANGE"})


def env_name(field: str) -> str:
    return f"BATON_{field.upper()}"


def flag_name(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def _seconds(default: float, field: str) -> Any:
    low, high = BOUNDS[field]
    return Field(default, ge=low, le=high, allow_inf_nan=False)


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a well-formed host name; None when it is one."""
    if not host:
        return "is empty"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"{host!r} is neither an IP address nor a host name"
    if labels[-1].isdigit():  # no top-level domain is all digits: this was meant as an address
        return f"{host!r} is not a valid IP address"
    return None


def _http_url(value: str, *, base: bool) -> str:
    """``value`` checked as an http(s) URL with a host, without a trailing slash.

    ``base``: a URL that paths are appended to (no query or fragment).
    """
    shown = repr(redact(value))
    if any(c.isspace() for c in value):
        raise ValueError(f"{shown} contains white space")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{shown} is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{shown} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{shown} names no host")
    if "@" in parts.netloc:
        raise ValueError(f"{shown} carries credentials (user@ or user:password@): nodes publish this URL")
    problem = host_problem(parts.hostname)
    if problem:
        raise ValueError(f"{shown}: its host {problem}")
    if port == 0:
        raise ValueError(f"{shown}: port 0 cannot be reached; ports are 1-65535")
    if base and (parts.query or parts.fragment or value.endswith(("?", "#"))):
        raise ValueError(f"{shown} must be a base URL, without query or fragment")
    return value.rstrip("/")


class Settings(BaseSettings):
    """Everything a node is told. Defaults give a working single-host node."""

    model_config = SettingsConfigDict(env_prefix="BATON_", extra="forbid", validate_default=True)

    node_id: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    advertise_url: str = ""
    lock_url: str = ""
    lock_name: str = Field("baton", min_length=1)
    lease_ttl: float = _seconds(10.0, "lease_ttl")
    renew_deadline: float = _seconds(7.0, "renew_deadline")
    retry_period: float = _seconds(2.0, "retry_period")
    misfire_grace: float = _seconds(300.0, "misfire_grace")
    timezone: str = "UTC"
    admin_token: SecretStr | None = None
    probe_url: str = ""
    probe_jobs: int = Field(0, ge=0, le=100_000)
    probe_interval: float = _seconds(1.0, "probe_interval")
    probe_shapes: ProbeShapesText = ""
    claims: Literal["on", "off"] = "on"
    claim_ahead: float = _seconds(0.25, "claim_ahead")
    shutdown_grace: float = _seconds(30.0, "shutdown_grace")
    max_clock_skew: float = _seconds(1.0, "max_clock_skew")
    peers: Annotated[tuple[str, ...], NoDecode] = ()
    demo_jobs: bool = True
    jobs: str = ""
    sync_workers: int = Field(8, ge=1, le=256)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("jobs")
    @classmethod
    def _import_string(cls, value: str) -> str:
        if not value.strip():
            return ""
        from node.imports import check_format  # imported here: node.imports imports the job modules

        return check_format(value.strip())

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if any(c.isspace() for c in value):
            raise ValueError("must not contain spaces")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if value.startswith("[") and value.endswith("]"):  # [::1], as in URLs
            value = value[1:-1]
            if ":" not in value:
                raise ValueError(f"{value!r} in brackets must be an IPv6 address")
        if not value:
            raise ValueError("'' is no address: name the one to listen on, 127.0.0.1 for this host only "
                             "or 0.0.0.0 for every IPv4 interface")
        problem = host_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("advertise_url")
    @classmethod
    def _advertise_url(cls, value: str) -> str:
        return _http_url(value, base=True) if value else value

    @field_validator("probe_url")
    @classmethod
    def _probe_url(cls, value: str) -> str:
        return _http_url(value, base=False) if value else value

    @field_validator("peers", mode="before")
    @classmethod
    def _split_peers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("peers")
    @classmethod
    def _peer_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        urls = (_http_url(url, base=True) for url in value)
        return tuple(dict.fromkeys(urls))  # once each, in the order given

    @field_validator("admin_token")
    @classmethod
    def _usable_token(cls, value: SecretStr | None) -> SecretStr | None:
        token = "" if value is None else value.get_secret_value()
        if not token:
            return None
        # messages here never quote the token
        if not token.strip():
            raise ValueError("is only white space, which no Authorization header can carry; "
                             "unset it to disable the admin routes")
        if token != token.strip():
            raise ValueError("has leading or trailing white space, which no Authorization header can carry")
        if not all(" " <= c <= "~" for c in token):
            raise ValueError("must be printable ASCII (a header carries nothing else intact)")
        return value

    @model_validator(mode="after")
    def _defaults_and_timing(self) -> Settings:
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}-{self.port}"
        if not self.advertise_url:
            host = self.host if self.host not in ("0.0.0.0", "::") else socket.gethostname()
            host = f"[{host}]" if ":" in host else host
            self.advertise_url = f"http://{host}:{self.port}"
        self.peers = tuple(url for url in self.peers if url != self.advertise_url)
        if not self.lock_url:
            self.lock_url = f"file://{tempfile.gettempdir()}/baton-locks"
        if not self.renew_deadline < self.lease_ttl:
            raise _FieldProblem("renew_deadline", f"{self.renew_deadline:g} must be below BATON_LEASE_TTL "
                                                  f"({self.lease_ttl:g})")
        if not self.retry_period < self.renew_deadline:
            raise _FieldProblem("retry_period", f"{self.retry_period:g} must be below BATON_RENEW_DEADLINE "
                                                f"({self.renew_deadline:g})")
        if not self.claim_ahead < self.lease_ttl:
            raise _FieldProblem("claim_ahead", f"{self.claim_ahead:g} must be below BATON_LEASE_TTL "
                                               f"({self.lease_ttl:g})")
        try:
            # builds the client objects only: nothing connects until the first operation
            op_timeout = from_url(self.lock_url).options.op_timeout
        except BackendURLError as exc:
            raise _FieldProblem("lock_url", str(exc), hint=False) from None
        if op_timeout >= self.renew_deadline:
            raise _FieldProblem("lock_url", f"its option timeout={op_timeout:g} must be below "
                                            f"BATON_RENEW_DEADLINE ({self.renew_deadline:g})", hint=False)
        return self

    @property
    def backend_kind(self) -> str:
        """The backend's registry name (``postgres`` for a postgresql:// URL)."""
        return kind_of(self.lock_url).name


class _FieldProblem(ValueError):
    """A problem found across settings, blamed on ``field``; ``hint``: add what the field accepts."""

    def __init__(self, field: str, message: str, hint: bool = True) -> None:
        self.field = field
        self.hint = hint
        super().__init__(message)


# -- secrets -------------------------------------------------------------------

#: Query options whose values are secrets: any whose name contains one of these (the rule of
#: ``lock_backends.url.redact``).
_SECRET_KEYS = ("pass", "pwd", "secret", "token", "key", "auth", "credential")


def _secrets_in(field: str, value: str) -> set[str]:
    """The secret parts of a raw setting, in the forms a message might quote them."""
    if field in SECRET_FIELDS:
        return {value, value.strip()}
    found: set[str] = set()
    for part in value.split(",") if "://" in value else ():
        try:
            parts = urlsplit(part.strip())
        except ValueError:
            continue
        if parts.password:
            found.add(parts.password)
        for item in parts.query.split("&"):
            name, _, secret = item.partition("=")
            if any(key in unquote_plus(name).lower() for key in _SECRET_KEYS):
                found.add(secret)
    return found | {unquote_plus(s) for s in found}


def _scrub(message: str, secrets: Iterable[str]) -> str:
    """``message`` with every secret of four characters or more replaced by ``***``.

    A safety net behind ``redact`` and the messages that never quote secrets: it
    catches a secret echoed by a client library, say. Shorter ones would mangle
    ordinary words (and say nothing of the secret, were they found).
    """
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            message = message.replace(secret, "***")
    return message


def _shown(field: str, given: Any) -> str | None:
    """How a message may quote the value ``given`` for ``field``: never, when it is a secret."""
    if field in SECRET_FIELDS or given is None or isinstance(given, dict):
        return None
    text = ",".join(map(str, given)) if isinstance(given, (tuple, list)) else str(given)
    if field in URL_FIELDS:
        text = ",".join(redact(part) for part in text.split(","))
    return repr(text)


def _one_line(message: str) -> str:
    return re.sub(r"\s*[\r\n]+\s*", " ", message).strip()


# -- loading -------------------------------------------------------------------

def unknown_variable(environ: Mapping[str, str]) -> ConfigError | None:
    """The error for the first ``BATON_*`` variable that is no setting, suggesting the closest one."""
    known = sorted(env_name(field) for field in Settings.model_fields)
    for key in sorted(environ):
        name = key.upper()  # pydantic-settings reads variables case-insensitively
        if name.startswith("BATON_") and name not in known and name not in NOT_NODE_SETTINGS:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            return ConfigError(key, f"is not a setting Baton knows{hint} (`python -m node --help` lists them)")
    return None


def load(overrides: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, with ``overrides`` (from flags) on top.

    Raises ConfigError naming the variable at fault, for a ``BATON_*`` variable
    that is no setting too.
    """
    overrides = overrides or {}
    environ = os.environ if environ is None else environ
    unknown = unknown_variable(environ)
    if unknown is not None:
        raise unknown
    secrets: set[str] = set()
    for key, value in environ.items():
        if key.upper().startswith("BATON_"):
            secrets |= _secrets_in(key.upper().removeprefix("BATON_").lower(), value)
    for field, value in overrides.items():
        if isinstance(value, str):
            secrets |= _secrets_in(field, value)

    def fail(field: str, message: str) -> NoReturn:
        variable = env_name(field)
        if field in overrides:
            variable = f"{variable} ({flag_name(field)})"
        raise ConfigError(variable, _scrub(message, secrets)) from None

    try:
        return Settings(**overrides)
    except SettingsError as exc:  # a value pydantic-settings could not even decode
        match = re.search(r'field "(\w+)"', str(exc))
        fail(match.group(1) if match else "settings", str(exc))
    except ValidationError as exc:
        error = exc.errors()[0]
        ctx_error = (error.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldProblem):
            field, message = ctx_error.field, str(ctx_error)
            if not ctx_error.hint:
                fail(field, message)
        else:
            field = str(error["loc"][0]) if error["loc"] else "settings"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                close = difflib.get_close_matches(field, list(Settings.model_fields), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(field, f"is not a setting Baton knows{hint}") from None
            shown = _shown(field, error.get("input"))
            if shown is not None and shown not in message:
                message = f"{message} (got {shown})"
        accepted = ACCEPTED.get(field)
        redundant = not accepted or accepted in message
        fail(field, message if redundant else f"{message}; expected {accepted}")


class _FlagParser(argparse.ArgumentParser):
    """argparse, except that a bad flag is a ConfigError: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        match = re.match(r"argument (--[\w-]+)(?:/\S+)?: (.*)", message)
        if match is None:
            raise ConfigError("flags", message)
        flag, why = match.groups()
        raise ConfigError(f"{env_name(flag[2:].replace('-', '_'))} ({flag})", why)


def flag_parser() -> argparse.ArgumentParser:
    """Flags mirror the environment variables; a flag given wins over its variable."""
    parser = _FlagParser(
        prog="python -m node", description="Run one Baton node (leader-gated APScheduler).", allow_abbrev=False,
        epilog="Every flag has an environment variable: --lease-ttl is BATON_LEASE_TTL, and so on. "
               "Exit codes: 0 after a clean shutdown (SIGTERM or SIGINT included), 2 for bad configuration, "
               "1 for anything else that stopped the node.")
    for field, accepted in ACCEPTED.items():
        parser.add_argument(flag_name(field), dest=field, default=None, metavar="VALUE",
                            help=f"{env_name(field)}: {accepted}")
    return parser


def from_argv(argv: list[str] | None = None) -> Settings:
    parser = flag_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        first = rest[0]
        if not first.startswith("-"):
            raise ConfigError("flags", f"unexpected argument {first!r}: every setting is a --flag VALUE pair")
        flag = first.split("=", 1)[0]
        flags = [flag_name(field) for field in ACCEPTED]
        close = difflib.get_close_matches(flag, flags, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(flag, f"is not a flag Baton knows{hint} (`python -m node --help` lists them)")
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return load(overrides)
