"""The console's settings: a [web] table in the gateway's TOML, with [gateway] filling the gaps.

database, reinject and the metrics address are the gateway's own unless [web] names
others, so one file configures both and they cannot drift apart.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from milter.config import check_database_url, host_port, read_toml
from milter.errors import Problem, RulesError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OidcSettings(BaseModel):
    """Single sign-on through OpenID Connect (Google Workspace, Microsoft 365, ...)."""

    model_config = ConfigDict(extra="forbid")

    # Shown on the button: "Sign in with Google".
    name: str = "single sign-on"
    # e.g. https://accounts.google.com/.well-known/openid-configuration or
    # https://login.microsoftonline.com/TENANT/v2.0/.well-known/openid-configuration
    discovery_url: str
    client_id: str
    client_secret: str
    # Only identities whose verified address is in one of these domains are considered.
    allowed_domains: list[str] = Field(min_length=1)

    @field_validator("discovery_url")
    @classmethod
    def _https(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname or "")):
            raise ValueError(f"{v!r}: the discovery URL must be https:// (http only on loopback, for tests)")
        return v

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = [d.strip().lower().lstrip("@").strip(".") for d in v]
        bad = [d for d in out if "." not in d]
        if bad:
            raise ValueError(f"not a mail domain: {', '.join(repr(d) for d in bad)}")
        return out


class WebSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: str = "sqlite:///var/quarantine.db"
    # The MTA listener without milter that releases are delivered to, "HOST:PORT".
    reinject: str = "127.0.0.1:10026"
    # The gateway's Prometheus endpoint, for scanner health on the dashboard; "" for none.
    metrics_url: str = "http://127.0.0.1:9464/metrics"
    listen: str = "127.0.0.1:8080"
    # Cookies carry Secure unless the console is served as plain http on loopback only.
    secure_cookies: bool = True
    # The address people type, e.g. https://mail-gateway.school.example; requests are checked
    # against its origin (behind a TLS proxy the console cannot see the scheme itself).
    base_url: str | None = None
    oidc: OidcSettings | None = None
    session_idle_minutes: int = Field(default=30, ge=1, le=24 * 60)
    session_max_hours: int = Field(default=12, ge=1, le=24 * 7)

    @field_validator("reinject", "listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if v:
            host_port(v)
        return v

    @field_validator("database")
    @classmethod
    def _database(cls, v: str) -> str:
        if not v:
            raise ValueError("the console needs the quarantine store's database URL")
        return check_database_url(v)

    @field_validator("metrics_url")
    @classmethod
    def _metrics(cls, v: str) -> str:
        if v and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError(f"{v!r}: expected http://HOST:PORT/metrics or empty")
        return v

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{v!r}: expected https://HOST[:PORT]")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _plain_http_only_on_loopback(self) -> WebSettings:
        if not self.secure_cookies and not is_loopback(host_port(self.listen)[0]):
            raise ValueError(
                "cookies without Secure (plain http) are allowed only when listening on loopback "
                f"(127.0.0.1 or ::1), not on {self.listen}"
            )
        return self

    @property
    def origin(self) -> str | None:
        """scheme://host[:port] of base_url, the only origin a form may be posted from."""
        if not self.base_url:
            return None
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}".lower()


def _metrics_url(address: object) -> str:
    # The gateway's `metrics` is "HOST:PORT" (or "" for none); the console wants the URL.
    if not isinstance(address, str) or not address:
        return ""
    host, port = host_port(address)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def load_web_settings(path: Path | None, overrides: dict[str, Any] | None = None) -> WebSettings:
    """[web] of the TOML file (if any), gaps filled from [gateway], then overrides (None = unset)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_toml(path)
        web = loaded.get("web", {})
        gateway = loaded.get("gateway", {})
        for name, table in (("web", web), ("gateway", gateway)):
            if not isinstance(table, dict):
                raise RulesError([Problem(path, None, f"[{name}] must be a table")])
        data.update(web)
        for key in ("database", "reinject"):
            if key not in data and key in gateway:
                data[key] = gateway[key]
        if "metrics_url" not in data and "metrics" in gateway:
            try:
                data["metrics_url"] = _metrics_url(gateway["metrics"])
            except ValueError as exc:
                raise RulesError([Problem(path, None, f"gateway.metrics: {exc}")]) from None
        if "base_url" not in data and gateway.get("console_url"):
            data["base_url"] = gateway["console_url"]
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return WebSettings.model_validate(data)
    except ValidationError as exc:
        where = path or Path("(command line)")
        problems = []
        for error in exc.errors():
            key = ".".join(map(str, error["loc"]))
            prefix = f"web.{key}: " if key else "web: "
            problems.append(Problem(where, None, prefix + str(error["msg"]).removeprefix("Value error, ")))
        raise RulesError(problems) from None
