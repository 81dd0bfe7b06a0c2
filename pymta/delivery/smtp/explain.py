"""A failed session step in the admin's words: what failed, why, and what to do about it.

Every `SessionError` reason is one line ending in its fix (check host: and port:, set ca_file, pin the
certificate, raise data_timeout, try again later); the wording lives here so the session reads as SMTP.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator

from pymta.delivery.smtp.replies import ReplyLimit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.model import Smarthost
    from pymta.delivery.smtp.outcome import Stage


class Explained:
    """Why a session failed: its stage, the reason with its fix, and whether the server's certificate did
    not verify (`pymta test` shows it). A plain class: a `typing.NamedTuple` would import typing."""

    __slots__ = ("stage", "reason", "certificate_failed")

    def __init__(self, stage: Stage, reason: str, certificate_failed: bool = False) -> None:
        self.stage = stage
        self.reason = reason
        self.certificate_failed = certificate_failed


def auth_wanted(code: int, reply: str) -> bool:
    """Whether a reply to MAIL or RCPT says the server wants a login first: 530 (RFC 4954 6), or an
    "authentication required" in other words (5.7.0 and 4.7.0 servers, e.g. "550 5.7.0 Authentication
    required")."""
    text = reply.lower()
    return code == 530 or (code // 100 in (4, 5) and "authentication required" in text)


def auth_wanted_reason(reply: str, step: str, smarthost: Smarthost) -> str:
    """Why the mail waits when the server wants AUTH at `step`, and the fix."""
    if not smarthost.username:
        return (
            f"the smarthost requires AUTH (it answered {step} with {reply}): set username and password for "
            f"it in pymta.yaml, then run pymta test"
        )
    return (
        f"the smarthost answered {step} with {reply} although pymta logged in as {smarthost.username}; "
        "check with your provider that this account may send mail"
    )


def unanswered(error: BaseException, data_timeout: float) -> str:
    """The text and its final dot went out, and no answer came: the server may have the message (it
    answers once it has taken it, and a scanner may take long), or may not. Either way it is deferred; the
    reason says that the smarthost may already have it, so a duplicate can be explained."""
    silent = any(isinstance(cause, TimeoutError) for cause in causes(error))  # or its deadline passed
    fix = ""
    if isinstance(error, ReplyLimit) and not silent:
        what = f"{error} to the end of the message text, so pymta hung up"
    elif silent:
        what = f"no answer to the end of the message text within {data_timeout:g} s"
        fix = "; if this smarthost scans mail slowly, raise its data_timeout"
    else:
        what = "the connection ended before the server answered the end of the message text (DATA)"
    return (
        f"{what}; the smarthost may already have the message: it is deferred, and when it is sent "
        f"again it may arrive twice{fix}"
    )


def error_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# OpenSSL's reasons when the other side did not answer a ClientHello with TLS (a plain-text SMTP port).
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}
)

# What to do about a certificate that does not verify, by OpenSSL's verify code.
_VERIFY_FIXES: dict[int, str] = {
    9: "check this machine's clock (timedatectl)",
    10: "the server's certificate must be renewed (tell its admin), unless this machine's clock is wrong "
    "(timedatectl)",
    18: "set ca_file to that certificate, or pin it with fingerprint: (pymta test shows it)",
    19: "set ca_file to the CA that signed it, or pin the certificate with fingerprint: (see pymta test)",
    20: "set ca_file to the CA that signed it, or pin the certificate with fingerprint: (see pymta test)",
    21: "the server sends an incomplete certificate chain; its admin must fix that, or set ca_file",
}


def explain(error: BaseException, doing: str, smarthost: Smarthost) -> Explained:
    """A network or TLS failure: its stage, one admin-readable reason with the fix, and whether it was the
    server's certificate that did not verify."""
    timeout = f"{smarthost.timeout:g} s"
    if isinstance(error, ReplyLimit):  # before its context, which may be the timeout that ended the wait
        return Explained(
            "closed", f"{error} to {doing}, so pymta hung up; the server misbehaves, try again later"
        )
    for cause in causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            code = cause.verify_code
            message = (cause.verify_message or error_text(cause)).rstrip(".")
            if code in (62, 64) or "mismatch" in message:
                fix = "write host: exactly as the provider documents it (a name in its certificate)"
                return Explained(
                    "tls", f"certificate verify failed: {message}; {fix}", certificate_failed=True
                )
            fix = _VERIFY_FIXES.get(code, "set ca_file or fingerprint: if the server uses its own CA")
            return Explained("tls", f"certificate verify failed: {message}; {fix}", certificate_failed=True)
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or error_text(cause)
            if reason in _NOT_TLS_REASONS and smarthost.security == "tls":
                return Explained(
                    "tls",
                    f"TLS handshake failed ({reason}): the server does not speak TLS at once on port "
                    f"{smarthost.port}; use security: starttls for port 587 or 25",
                )
            return Explained(
                "tls", f"TLS handshake failed: {reason}; check security: and port, or the server's TLS setup"
            )
        if isinstance(cause, socket.gaierror):
            return Explained(
                "connect",
                f"cannot resolve {smarthost.host}: {cause.strerror or cause}; check host: and the DNS setup",
            )
        if isinstance(cause, ConnectionRefusedError):
            return Explained(
                "connect",
                f"connection refused: nothing listens on port {smarthost.port}; check host: and port:, and "
                "that the server is up",
            )
        if isinstance(cause, TimeoutError):
            if doing == "connect" and isinstance(error, TimeoutError):
                return Explained(
                    "connect",
                    f"no connection within {timeout}; check host:, port: and the firewall (many networks "
                    "block port 25)",
                )
            if doing == "connect":
                hint = (
                    "; if this port expects TLS from the start (465), set security: tls"
                    if smarthost.security != "tls"
                    else ""
                )
                return Explained("greeting", f"no greeting within {timeout}{hint}")
            return Explained(
                "closed",
                f"no answer to {doing} within {timeout}; the server or network hangs, try again later",
            )
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return Explained("closed", f"the connection was reset during {doing}; try again later")
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return Explained("closed", f"the server closed the connection during {doing}; try again later")
    if isinstance(error, OSError):
        stage: Stage = "connect" if doing == "connect" else "closed"
        return Explained(stage, f"{doing} failed: {error_text(error)}; check the network and try again later")
    if isinstance(error, smtplib.SMTPException):
        return Explained("protocol", f"{doing} failed: {error_text(error)}")
    return Explained("protocol", f"{doing} failed: {type(error).__name__}: {error_text(error)}")
