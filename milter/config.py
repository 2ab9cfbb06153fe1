"""The daemon's TOML configuration: where to listen, workers, limits; command-line options override it."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from milter.errors import Problem, RulesError
from milter.server import parse_address


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: Path = Path("rules")
    # Postfix/Sendmail socket name for the milter; empty to run SMTP mode only.
    milter: str = "inet:127.0.0.1:8894"
    # SMTP mode: "HOST:PORT" to listen on, and the next hop accepted mail is relayed to.
    smtp: str = ""
    next_hop: str = "127.0.0.1:10026"
    # SMTP mode's TLS. STARTTLS is offered to clients when both files are set (PEM; the key
    # unencrypted, readable by the gateway's user only); TLS 1.2 and later.
    smtp_tls_cert: Path | None = None
    smtp_tls_key: Path | None = Field(default=None, validate_default=True)
    # Refuse MAIL before STARTTLS (530 5.7.0) from every client outside smtp_tls_exempt.
    smtp_require_tls: bool = False
    # Clients that need no TLS even then: loopback, where Postfix's content_filter connects from.
    smtp_tls_exempt: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # STARTTLS to the next hop: "opportunistic" (when offered, certificate unchecked),
    # "required" (a verified certificate naming the next_hop host, else the client gets a
    # 451 and keeps the message), "off".
    next_hop_tls: Literal["opportunistic", "required", "off"] = "opportunistic"
    # With "required": the CA certificates (PEM) to verify against instead of the system's.
    next_hop_tls_ca: Path | None = None
    # With "required": the name the next hop's certificate must carry, when the next_hop
    # host is an address or an alias the certificate does not name. Empty: the next_hop host.
    next_hop_tls_name: str = ""
    # SMTP mode's relay to the next hop, a timeout for each stage (seconds): connecting and
    # its greeting; each command before the message; the message, as the longest the next
    # hop may take none of it (a slow but steady next hop is never cut off); the reply to the
    # message's final dot (RFC 5321 4.5.3.2.6: 10 minutes).
    next_hop_connect_timeout: float = Field(default=30.0, gt=0)
    next_hop_command_timeout: float = Field(default=60.0, gt=0)
    next_hop_stall_timeout: float = Field(default=180.0, gt=0)
    next_hop_final_reply_timeout: float = Field(default=600.0, gt=0)
    # SMTP mode answers a client within this of its final dot, whatever the next hop does:
    # keep it under the client's own wait (Postfix's smtp_data_done_timeout, 600 s), or the
    # client gives up and sends the message again while the gateway may still deliver it.
    smtp_reply_deadline: float = Field(default=540.0, gt=0)
    spool: Path = Path("var/spool")
    # SMTP mode answers MAIL with 452 while the spool's disk has less free space than this
    # plus the size the client declares; 0 to check nothing before the message is written.
    spool_min_free: int = Field(default=20_000_000, ge=0)
    # The quarantine store (SQLAlchemy URL): SQLite by default, or
    # postgresql+psycopg://user:password@host/dbname shared by several daemons and hosts.
    # Empty: no store; quarantined mail goes to the MTA's hold queue instead.
    database: str = "sqlite:///var/quarantine.db"
    # Where released messages and the gateway's own mail (guidance, alerts) are delivered:
    # an MTA listener that runs no milter, "HOST:PORT" (deploy/postfix/master.cf.snippet).
    reinject: str = "127.0.0.1:10026"
    # The web console's address, quoted in alerts; empty when there is none.
    console_url: str = ""
    # How often (seconds) a daemon asks the store whether block/allow lists changed.
    lists_refresh: float = Field(default=1.0, ge=0)
    # How often (seconds) pending guidance mail and alerts are retried.
    outbox_interval: float = Field(default=10.0, gt=0)
    workers: int = Field(default=1, ge=1, le=64)
    # Prometheus metrics, "HOST:PORT"; empty to disable.
    metrics: str = "127.0.0.1:9464"
    max_connections: int = Field(default=200, ge=1)
    # Timeouts by stage on the milter path (seconds): between two commands from the MTA;
    # from connecting to option negotiation; from a packet's first byte to its last (so a
    # peer trickling a byte now and then is still cut off); the scan itself.
    idle_timeout: float = Field(default=900.0, gt=0)
    negotiate_timeout: float = Field(default=30.0, gt=0)
    packet_timeout: float = Field(default=120.0, gt=0)
    scan_timeout: float = Field(default=120.0, gt=0)
    progress_interval: float = Field(default=10.0, gt=0)
    max_message_bytes: int = Field(default=100_000_000, ge=1024)
    # Header lines a message may have on the milter path (more: 552 5.3.4).
    max_headers: int = Field(default=10_000, ge=100)
    # Messages up to this size are scanned on the event loop's thread instead of a pool
    # thread: about 10% less CPU a message (bench/milter_bench.py). clamd is still asked
    # without blocking the loop. 0 scans every message in the pool.
    inline_scan_bytes: int = Field(default=65_536, ge=0)
    # Seconds SIGTERM waits for messages in flight.
    shutdown_grace: float = Field(default=30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("milter")
    @classmethod
    def _milter_address(cls, v: str) -> str:
        if v:
            parse_address(v)
        return v

    @field_validator("database")
    @classmethod
    def _database(cls, v: str) -> str:
        return check_database_url(v) if v else v

    @field_validator("smtp", "next_hop", "metrics", "reinject")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if v:
            host_port(v)
        return v

    @field_validator("smtp_tls_cert", "smtp_tls_key", "next_hop_tls_ca", mode="before")
    @classmethod
    def _empty_path_is_none(cls, v: object) -> object:
        # "" switches a file off, as "" does for smtp, metrics and database.
        return None if v == "" else v

    @field_validator("smtp_tls_key")
    @classmethod
    def _key_with_certificate(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if (v is None) != (info.data.get("smtp_tls_cert") is None):
            raise ValueError("smtp_tls_cert and smtp_tls_key go together: set both or neither")
        return v

    @field_validator("smtp_require_tls")
    @classmethod
    def _tls_to_require(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("smtp_tls_cert") is None:
            raise ValueError("needs smtp_tls_cert and smtp_tls_key (there is no STARTTLS to require)")
        return v

    @field_validator("smtp_reply_deadline")
    @classmethod
    def _room_for_the_final_reply(cls, v: float, info: ValidationInfo) -> float:
        # The final dot is sent only while a command's time is left before the deadline.
        reserve = min(
            info.data.get("next_hop_command_timeout", 60.0),
            info.data.get("next_hop_final_reply_timeout", 600.0),
        )
        if v <= reserve:
            raise ValueError(
                f"must be more than next_hop_command_timeout ({reserve:g}), or no message is ever relayed"
            )
        return v

    @field_validator("smtp_tls_exempt")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for network in v:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network such as 127.0.0.0/8") from None
        return v


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_database_url(url: str) -> str:
    """A SQLAlchemy URL, or ValueError saying what one looks like."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        example = "sqlite:///path or postgresql+psycopg://..."
        raise ValueError(f"{url!r} is not a database URL ({example})") from None
    return url


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; RulesError (with the file named) when it cannot be read or parsed."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise RulesError([Problem(path, None, f"cannot read: {exc.strerror}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError([Problem(path, None, f"not valid TOML: {exc}")]) from None


def load_settings(path: Path | None, overrides: dict[str, object]) -> Settings:
    """The config file (if any) with command-line overrides on top; RulesError names file and key."""
    data: dict[str, object] = {}
    if path is not None:
        loaded = read_toml(path)
        section = loaded.get("gateway", loaded)
        if not isinstance(section, dict):
            raise RulesError([Problem(path, None, "[gateway] must be a table")])
        if "gateway" in loaded:
            # A setting above [gateway] would be silently ignored: say so instead.
            stray = [k for k, v in loaded.items() if k != "gateway" and not isinstance(v, dict)]
            if stray:
                names = ", ".join(stray)
                raise RulesError([Problem(path, None, f"{names}: settings go under [gateway], not above it")])
        data.update(section)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = path or Path("(command line)")
        raise RulesError(
            [Problem(where, None, f"{'.'.join(map(str, e['loc']))}: {e['msg']}") for e in exc.errors()]
        ) from None
