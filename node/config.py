"""Node settings from ``BATON_*`` environment variables or command-line flags.

Bad values stop the process with exit code 2 and one line that names the
variable and the accepted form (see ``ConfigError`` and ``node.__main__``).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import zoneinfo
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lock_backends import ACCEPTED_URL_FORMS, BackendURLError, from_url


class ConfigError(ValueError):
    """A setting is invalid. ``variable`` is the environment variable to fix."""

    def __init__(self, variable: str, message: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {message}")


#: What each setting accepts, for error messages.
ACCEPTED = {
    "node_id": "a non-empty name without spaces",
    "host": "an address to bind, such as 0.0.0.0 or 127.0.0.1",
    "port": "an integer port 1-65535",
    "advertise_url": "an http:// or https:// URL peers can reach this node at",
    "lock_url": "one of " + "; ".join(ACCEPTED_URL_FORMS),
    "lock_name": "a non-empty name",
    "lease_ttl": "seconds, a positive number greater than BATON_RENEW_DEADLINE",
    "renew_deadline": "seconds, positive, below BATON_LEASE_TTL and above BATON_RETRY_PERIOD",
    "retry_period": "seconds, positive, below BATON_RENEW_DEADLINE",
    "misfire_grace": "seconds, a positive number",
    "timezone": "an IANA time zone name such as UTC or Europe/Berlin",
    "admin_token": "a bearer token string (unset disables the admin routes)",
    "probe_url": "an http:// URL of a probe collector, or empty",
    "probe_jobs": "an integer 0 or more",
    "probe_interval": "seconds, a positive number",
    "claims": "on or off (off disables fencing, claims and the deadline re-check alike: "
              "for the checker's negative control only)",
    "claim_ahead": "seconds, 0 or more and below BATON_LEASE_TTL: the longest lead with which the leader "
                   "claims fire times before they come (0 claims each at its fire time)",
    "demo_jobs": "true or false",
    "jobs": "an import string module:attribute naming a JobRegistry (or a function returning one), "
            "e.g. myapp.jobs:registry",
    "sync_workers": "an integer 1-1024: threads that run plain-def job bodies",
    "log_level": "debug, info, warning or error",
    "log_format": "json or text",
}


def env_name(field: str) -> str:
    return f"BATON_{field.upper()}"


class Settings(BaseSettings):
    """Everything a node is told. Defaults give a working single-host node."""

    model_config = SettingsConfigDict(env_prefix="BATON_", extra="forbid", validate_default=True)

    node_id: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    advertise_url: str = ""
    lock_url: str = ""
    lock_name: str = Field("baton", min_length=1)
    lease_ttl: float = Field(10.0, gt=0)
    renew_deadline: float = Field(7.0, gt=0)
    retry_period: float = Field(2.0, gt=0)
    misfire_grace: float = Field(60.0, gt=0)
    timezone: str = "UTC"
    admin_token: SecretStr | None = None
    probe_url: str = ""
    probe_jobs: int = Field(0, ge=0, le=100_000)
    probe_interval: float = Field(1.0, gt=0)
    claims: Literal["on", "off"] = "on"
    claim_ahead: float = Field(0.25, ge=0)
    demo_jobs: bool = True
    jobs: str = ""
    sync_workers: int = Field(8, ge=1, le=1024)
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

    @field_validator("advertise_url", "probe_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _defaults_and_timing(self) -> Settings:
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}-{self.port}"
        if not self.advertise_url:
            host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
            self.advertise_url = f"http://{host}:{self.port}"
        if not self.lock_url:
            self.lock_url = f"file://{tempfile.gettempdir()}/baton-locks"
        if not self.renew_deadline < self.lease_ttl:
            raise _timing("renew_deadline", f"{self.renew_deadline} must be below BATON_LEASE_TTL "
                                            f"({self.lease_ttl})")
        if not self.retry_period < self.renew_deadline:
            raise _timing("retry_period", f"{self.retry_period} must be below BATON_RENEW_DEADLINE "
                                          f"({self.renew_deadline})")
        if not self.claim_ahead < self.lease_ttl:
            raise _timing("claim_ahead", f"{self.claim_ahead} must be below BATON_LEASE_TTL ({self.lease_ttl})")
        try:
            backend = from_url(self.lock_url)
        except BackendURLError as exc:
            raise _timing("lock_url", str(exc)) from None
        op_timeout = backend.options.op_timeout  # type: ignore[attr-defined]
        if op_timeout >= self.renew_deadline:
            raise _timing("lock_url", f"timeout={op_timeout} must be below BATON_RENEW_DEADLINE "
                                      f"({self.renew_deadline})")
        return self

    @property
    def backend_kind(self) -> str:
        return self.lock_url.split("://", 1)[0]


class _FieldProblem(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _timing(field: str, message: str) -> _FieldProblem:
    return _FieldProblem(field, message)


def load(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from the environment, with ``overrides`` (from flags) on top.

    Raises ConfigError naming the variable at fault.
    """
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        error = exc.errors()[0]
        ctx_error = (error.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldProblem):
            field, message = ctx_error.field, str(ctx_error)
        else:
            field = str(error["loc"][0]) if error["loc"] else "settings"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                raise ConfigError(env_name(field), "is not a setting Baton knows; see "
                                  "`python -m node --help` for the list") from None
            given = error.get("input")
            if given is not None and not isinstance(given, dict) and repr(str(given)) not in message:
                message = f"{message} (got {str(given)!r})"
        accepted = ACCEPTED.get(field)
        redundant = not accepted or accepted in message or "Accepted forms" in message
        suffix = "" if redundant else f"; expected {accepted}"
        raise ConfigError(env_name(field), f"{message}{suffix}") from None


def flag_parser() -> argparse.ArgumentParser:
    """Flags mirror the environment variables; a flag given wins over its variable."""
    parser = argparse.ArgumentParser(
        prog="python -m node", description="Run one Baton node (leader-gated APScheduler).",
        epilog="Every flag has an environment variable: --lease-ttl is BATON_LEASE_TTL, and so on.")
    for field, accepted in ACCEPTED.items():
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, default=None, metavar="VALUE",
                            help=f"{env_name(field)}: {accepted}")
    return parser


def from_argv(argv: list[str] | None = None) -> Settings:
    args = flag_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return load(overrides)
