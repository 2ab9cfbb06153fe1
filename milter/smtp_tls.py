"""SMTP mode's TLS files: the listener's certificate and key, the next hop's CA, and their expiry.

Each file is checked when it is loaded so that a bad one is named with what is wrong
with it (OpenSSL's own errors do not say which file), both at start, where it stops the
gateway, and at a reload (SIGHUP, after a certificate is renewed), where it keeps the
files in force.
"""

from __future__ import annotations

import ssl
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography import x509

NextHopTls = Literal["opportunistic", "required", "off"]

# A certificate closer than this to its end is worth a warning at each start and reload.
EXPIRY_WARNING_DAYS = 14


class TlsSetupError(Exception):
    """A certificate, key or CA file that cannot be used; the text names the file and why."""


class StartTlsRefused(Exception):
    """The next hop answered STARTTLS with something other than 220."""

    def __init__(self, code: int) -> None:
        super().__init__(f"STARTTLS answered {code}")
        self.code = code


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKey


def _check_readable(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TlsSetupError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def _check_certificates(path: Path, what: str) -> None:
    """`path` holds at least one PEM certificate (load_cert_chain's errors do not say which file is bad)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise TlsSetupError(f"{what} {path}: no PEM certificate in it") from None


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The listener's TLS context: the standard library's server defaults (TLS 1.2 and later).

    TlsSetupError names the file at fault: unreadable, not PEM, an encrypted key, or a key
    that does not belong to the certificate.
    """
    _check_readable(cert, "TLS certificate")
    _check_readable(key, "TLS key")
    _check_certificates(cert, "TLS certificate")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = max(context.minimum_version, ssl.TLSVersion.TLSv1_2)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise TlsSetupError(
            f"TLS key {key}: encrypted with a passphrase; the gateway needs it unencrypted "
            "(readable by its user only)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSetupError(f"TLS key {key}: does not belong to the certificate in {cert}") from None
        raise TlsSetupError(f"TLS key {key}: no PEM private key in it") from None
    return context


def relay_tls_context(mode: NextHopTls, ca: Path | None = None) -> ssl.SSLContext | None:
    """The TLS context for STARTTLS to the next hop; None when next_hop_tls is "off".

    "required" verifies the certificate and its name (the next hop's host as configured)
    against `ca` alone when given (a school's own CA), else the system's CAs;
    "opportunistic" encrypts without checking either, as an MTA does when any TLS is
    better than none.
    """
    if mode == "off":
        return None
    cafile = None
    if mode == "required" and ca is not None:
        _check_readable(ca, "next hop CA file")
        cafile = str(ca)
    try:
        # With a cafile only that file is trusted; without, the system's store.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError:
        raise TlsSetupError(f"next hop CA file {ca}: no PEM certificate in it") from None
    context.minimum_version = max(context.minimum_version, ssl.TLSVersion.TLSv1_2)
    if mode == "opportunistic":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in OpenSSL's words (never message content)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error {exc.reason or exc.library or type(exc).__name__}"
    if isinstance(exc, StartTlsRefused):
        return f"STARTTLS answered {exc.code}"
    return type(exc).__name__


def negotiated_version(transport_info: object) -> str | None:
    return transport_info.version() if isinstance(transport_info, ssl.SSLObject | ssl.SSLSocket) else None


def certificate_expiry(cert: Path) -> datetime | None:
    """When the first certificate in a PEM file (the server's own, before its chain) expires."""
    try:
        return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None
