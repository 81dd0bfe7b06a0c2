"""TLS for a smarthost session: the verifying context, the pinned fingerprint, and the certificate that
`pymta test` shows.

Certificates are verified, always with an explicit `ssl.SSLContext` (smtplib's default verifies nothing):
against the system store, or only against `ca_file` when one is set. `fingerprint` pins the server
certificate (SHA-256 of its DER form) and, like msmtp's tls_fingerprint, *replaces* chain and host name
verification, so a self-signed server can be used; with `ca_file` as well, both must hold.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime

from pymta.delivery.smtp.outcome import SessionError
from pymta.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.model import Smarthost


@record(frozen=True, slots=True)
class Certificate:
    """The server certificate as `pymta test` shows it."""

    subject: str  # "CN=smtp.example.org" (empty when it could not be decoded)
    issuer: str
    not_after: datetime | None  # expiry, UTC
    fingerprint: str  # "sha256:AB:CD:...", the form `fingerprint:` takes in the config
    verification: str  # how it was checked, in words


@record(frozen=True, slots=True)
class TlsInfo:
    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    bits: int
    certificate: Certificate


def verifying_context(smarthost: Smarthost) -> ssl.SSLContext:
    """A verifying context: the system store or ca_file; with a pin and no ca_file, the pin decides.
    Raises OSError or ssl.SSLError when ca_file cannot be loaded."""
    context = ssl.create_default_context(cafile=smarthost.ca_file)
    if smarthost.fingerprint and not smarthost.ca_file:
        # The pin (checked right after the handshake, before a byte of SMTP is read) replaces chain and
        # name verification, as msmtp's tls_fingerprint does: it is what lets a self-signed server in.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def unverified_context() -> ssl.SSLContext:
    """A context that accepts any certificate: only to fetch one and show it (`fetch_certificate`)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verification(smarthost: Smarthost) -> str:
    """How the certificate of `smarthost` is checked, in words."""
    ca = f"ca_file {smarthost.ca_file}" if smarthost.ca_file else "the system CA store"
    if smarthost.fingerprint and smarthost.ca_file:
        return f"pinned fingerprint matches; chain and host name verified against {ca}"
    if smarthost.fingerprint:
        return "pinned fingerprint matches (chain and host name not checked)"
    return f"chain and host name verified against {ca}"


def tls_info(sock: ssl.SSLSocket, checked: str) -> TlsInfo:
    """What `sock`'s TLS session is, and its server's certificate (`checked`: how it was verified)."""
    cipher = sock.cipher() or ("", "", 0)
    return TlsInfo(
        version=sock.version() or "",
        cipher=cipher[0],
        bits=cipher[2] or 0,
        certificate=certificate(sock, checked),
    )


def fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def verify_pin(smarthost: Smarthost, sock: socket.socket, fail: Callable[..., SessionError]) -> None:
    pinned = smarthost.fingerprint_digest
    if pinned is None or not isinstance(sock, ssl.SSLSocket):
        return
    der = sock.getpeercert(binary_form=True) or b""
    if not hmac.compare_digest(hashlib.sha256(der).digest(), pinned):
        raise fail(
            "tls",
            f"the server certificate {fingerprint(der)} does not match the pinned fingerprint "
            f"{smarthost.fingerprint}; if the server's certificate was renewed, check the new one "
            "(pymta test shows it) and update fingerprint:",
        )


def certificate(sock: ssl.SSLSocket, verification: str) -> Certificate:
    der = sock.getpeercert(binary_form=True) or b""
    decoded = sock.getpeercert() or {}
    subject = name_of(decoded.get("subject", ()))
    issuer = name_of(decoded.get("issuer", ()))
    not_after: datetime | None = None
    expiry = decoded.get("notAfter")
    if isinstance(expiry, str):
        not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(expiry), UTC)
    if not decoded and der:
        subject, issuer, not_after = _decode_der(der)
    return Certificate(subject, issuer, not_after, fingerprint(der), verification)


def name_of(rdns: object) -> str:
    """An X.509 name from ssl.getpeercert(), e.g. "CN=smtp.example.org, O=Example"."""
    short = {"commonName": "CN", "organizationName": "O", "countryName": "C", "organizationalUnitName": "OU"}
    parts: list[str] = []
    for rdn in rdns if isinstance(rdns, tuple) else ():
        for key, value in rdn:
            parts.append(f"{short.get(key, key)}={value}")
    return ", ".join(parts)


def _decode_der(der: bytes) -> tuple[str, str, datetime | None]:
    """Subject, issuer and expiry of a certificate that was not verified (a pinned one): Python's ssl only
    decodes verified certificates, so `cryptography` does it when installed (keyring pulls it in on Linux)."""
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover
        return "", "", None
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return "", "", None
    return (
        certificate.subject.rfc4514_string(),
        certificate.issuer.rfc4514_string(),
        certificate.not_valid_after_utc,
    )
