"""One SMTP session with a smarthost, on smtplib: connect, TLS, AUTH, and a result for every recipient.

    with SmtpSession(smarthost, hostname=config.hostname) as session:   # connect, EHLO, TLS, EHLO, AUTH
        outcomes = session.send(sender, recipients, message_bytes)       # one RecipientOutcome per recipient

One session carries many messages: RSET goes before every message but the first. When the server offers
PIPELINING (RFC 2920), RSET, MAIL, every RCPT and DATA go out in one write, and a message costs two round
trips: its commands, and its text. A caller with many messages starts the next one before it finishes the
current one (`start()`, then `finish()` in the same order): the next message's commands then ride in the
write of the current one's text, behind its final dot, and a message costs one round trip. The current
message's final reply is read and returned before any of the next one's text is sent, so the caller records
it first (DESIGN.md invariant 3); nothing of a message is delivered before its text has gone out.

Each wait has its limit, as RFC 5321 4.5.3.2 gives each step its own: `timeout` (short) for the
connection, the greeting, each command's reply and each block of text sent; `data_timeout` (10 minutes by
default) for the reply to the final dot, which a server may send only after scanning the message. When
that reply never comes the outcome is unknown, and the error says that the smarthost may already have
the message (`SessionError.outcome_unknown`).

Results are values, failures of the session are exceptions. `send()` returns, per recipient, `delivered` (the
server said 250 to DATA), `deferred` (a 4xx to MAIL, RCPT or DATA) or `failed` (a 5xx), with the server's
reply. Anything that ends the session (no connection, a timeout, TLS or certificate trouble, a pin
mismatch, STARTTLS or AUTH missing or refused, a password source failing, 421, the connection lost) raises
`SessionError`, one line that says what failed, why and what to do. The caller defers on it.

ESMTP parameters are sent only when the server offers them: SIZE; BODY=8BITMIME for a message with 8-bit
bytes (without 8BITMIME such a message goes as it is: no MIME down-conversion); SMTPUTF8 when an address is
non-ASCII (without it those recipients fail with 553 5.6.7, as RFC 6531 and Postfix do: no smarthost
setting can make the address deliverable there); NOTIFY, RET, ENVID and ORCPT (xtext, RFC 3461) with DSN.

Invariants kept here:
- Certificates are verified, always with an explicit `ssl.SSLContext` (smtplib's default verifies nothing):
  against the system store, or only against `ca_file` when one is set. `fingerprint` pins the server
  certificate (SHA-256 of its DER form) and, like msmtp's tls_fingerprint, *replaces* chain and host name
  verification, so a self-signed server can be used; with `ca_file` as well, both must hold.
- `security: starttls` never falls back to plain text: a server that does not offer STARTTLS is an error.
- AUTH is sent only over TLS, unless the smarthost says `auth_plaintext: true`.
- The secret is fetched only when AUTH is about to be sent, travels as `credentials.Secret`, and appears
  in no exception, log line or repr: AUTH dialogues are never logged, and a server reply quoted in an
  error is scrubbed of the secret and of what we sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pymta.delivery.credentials import CredentialError, Secret, resolve
from pymta.errors import EX_TEMPFAIL, PymtaError
from pymta.mail.message import fit_line_length

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from pymta.config.model import Smarthost

log = logging.getLogger(__name__)

# A reply may have this many lines (an EHLO reply has a dozen): a server that never ends one is cut off.
MAX_REPLY_LINES = 100
# Seconds a reply may take to arrive once the server starts it, beyond the timeout (the longest silence).
REPLY_TRANSFER_TIME = 30.0
# Bytes of one reply line (smtplib's limit too).
MAX_REPLY_LINE = 8192
# Bytes of the message text sent per block; each block has `timeout` to leave (RFC 5321 4.5.3.2.5 bounds
# each block, not the whole text): 64 KiB in 30 s is 2 KiB/s, slower than any uplink that still works.
DATA_BLOCK = 65536

Status = Literal["delivered", "deferred", "failed"]
Stage = Literal["connect", "greeting", "tls", "auth", "credentials", "protocol", "closed"]

# The mechanisms `auth: auto` tries, in order, among those the server offers. Over TLS: PLAIN (one round
# trip, UTF-8 by RFC 4616), LOGIN (old Exchange), CRAM-MD5 (obsolete). Without TLS (only with
# auth_plaintext) CRAM-MD5 comes first: it is the one that does not put the password on the wire.
# XOAUTH2 and OAUTHBEARER need a token, not a password, so they are used only when named.
AUTO_MECHANISMS_TLS: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
AUTO_MECHANISMS_PLAINTEXT: tuple[str, ...] = ("CRAM-MD5", "PLAIN", "LOGIN")
MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER")

# RFC 6531 3.4: a non-ASCII address cannot go to a server without SMTPUTF8; the message is undeliverable
# there (Postfix bounces with the same code). Down-conversion (RFC 6857) is not attempted.
SMTPUTF8_MISSING_REPLY = "553 5.6.7 {address}: non-ASCII address, and the smarthost does not offer SMTPUTF8"

_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_ENHANCED_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_UNSAFE_ADDRESS_RE = re.compile(r"[\x00-\x1f\x7f<>]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_DOT_LINE_RE = re.compile(rb"^\.", re.MULTILINE)


# --- Results and failures ---


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What the server said about one recipient of one message."""

    recipient: str
    status: Status  # delivered (2xx to DATA), deferred (4xx), failed (5xx)
    reply: str  # "550 5.1.1 <x@example.org>: user unknown": code, enhanced code, text, on one line

    @property
    def code(self) -> int:
        return int(self.reply[:3])

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code, e.g. "5.1.1" (X.0.0 when the server gave none)."""
        return self.reply.split(" ", 2)[1]


class SessionError(PymtaError):
    """The session with the smarthost failed as a whole; every recipient not yet answered is deferred.

    `str(error)` is one line: `relay: what failed, why; what to do`. `stage` says where it failed. A failed
    session is always closed before the error is raised; the caller opens a new one. `reconnect` is True when
    the server went away *between* messages (the RSET before a message found the connection closed, or got
    421), or the connection ended while an earlier started message was finished: nothing of that message
    reached the server, so the caller should open the session again and resend it at once. `untouched` is True
    when the session failed at MAIL, RCPT or DATA, before any of the message's text was sent: the server
    cannot have taken it, so another smarthost may get it in the same run. `outcome_unknown` is True when the
    message's text went out and the answer to its end never came (no answer within `data_timeout`, the
    connection lost): the server may have taken it, so sending it again may deliver it twice (RFC 5321
    4.5.3.2.6); the error says so. `reply` is the server's reply that caused the failure, when there was one.
    """

    exit_code = EX_TEMPFAIL

    def __init__(
        self,
        relay: str,
        reason: str,
        *,
        stage: Stage,
        reply: str | None = None,
        reconnect: bool = False,
        untouched: bool = False,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(f"{relay}: {reason}")
        self.relay = relay
        self.reason = reason
        self.stage: Stage = stage
        self.reply = reply
        self.reconnect = reconnect
        self.untouched = untouched
        self.outcome_unknown = outcome_unknown


@dataclass(frozen=True, slots=True)
class Certificate:
    """The server certificate as `pymta test` shows it."""

    subject: str  # "CN=smtp.example.org" (empty when it could not be decoded)
    issuer: str
    not_after: datetime | None  # expiry, UTC
    fingerprint: str  # "sha256:AB:CD:...", the form `fingerprint:` takes in the config
    verification: str  # how it was checked, in words


@dataclass(frozen=True, slots=True)
class TlsInfo:
    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    bits: int
    certificate: Certificate


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the session learned about the server, for `pymta test`; filled as far as the session got."""

    relay: str
    greeting: str  # the 220 line, as "220 ... text"
    extensions: tuple[str, ...]  # the EHLO keywords with parameters, e.g. "SIZE 35882577", "AUTH PLAIN LOGIN"
    tls: TlsInfo | None
    authenticated: str | None  # "PLAIN as me@example.org" once AUTH succeeded


@dataclass(eq=False, slots=True)
class Transaction:
    """A message started on a session (`SmtpSession.start`) and not finished yet."""

    recipients: list[str]  # as given to start(), in order
    outcomes: dict[str, RecipientOutcome]  # decided so far; those known without the server at start
    pending: list[str] = field(default_factory=list)  # the recipients that go to the server
    message: bytes = b""
    mail: str = ""  # the MAIL command
    rcpts: list[str] = field(default_factory=list)  # the RCPT commands, one per pending recipient
    reset: bool = False  # RSET goes first: a message went before on this connection
    pipelined: bool = False  # the server offers PIPELINING
    encoding: str = "ascii"  # of the commands: utf-8 with SMTPUTF8
    written: bool = False  # the commands went out
    lost: bool = False  # the connection ended before this message was finished: start it again


# --- The session ---


class SmtpSession:
    """One connection to a smarthost, reusable for many messages (RSET between them).

    `secret` returns the password (or OAuth2 token) when AUTH needs it; by default it is resolved from the
    smarthost's password source with `credentials.resolve`. It is called at most once per session, and not
    at all when the smarthost has no username.
    """

    def __init__(
        self,
        smarthost: Smarthost,
        hostname: str,
        secret: Callable[[], Secret] | None = None,
    ) -> None:
        self.smarthost = smarthost
        self.hostname = hostname  # our EHLO name
        self._secret_source = secret
        self._client: _Client | None = None
        self._last_ip: str | None = None  # the server's address, for messages after the connection closed
        self._transactions = 0
        self._started: list[Transaction] = []  # started and not finished, oldest first
        self._greeting = ""
        self._extensions: tuple[str, ...] = ()
        self._tls: TlsInfo | None = None
        self._authenticated: str | None = None
        self._sent_secrets: list[str] = []  # what AUTH put on the wire, scrubbed from quoted replies

    # -- public --

    @property
    def relay(self) -> str:
        """`host[ip]:port` as in Postfix logs; `host:port` until an address is known."""
        ip = self._client.peer_ip if self._client else self._last_ip
        host, port = self.smarthost.host, self.smarthost.port
        return f"{host}[{ip}]:{port}" if ip else f"{host}:{port}"

    @property
    def info(self) -> ServerInfo:
        return ServerInfo(self.relay, self._greeting, self._extensions, self._tls, self._authenticated)

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._client.sock is not None

    def open(self) -> ServerInfo:
        """Connect, EHLO, STARTTLS or implicit TLS, EHLO again, AUTH when a username is configured.

        Raises SessionError (and leaves the session closed) when any step fails.
        """
        if self._client is not None:
            raise RuntimeError("the session is already open")
        self._client = _Client(self.smarthost, self.hostname)
        try:
            self._connect()
            self._ehlo()
            if self.smarthost.security == "starttls":
                self._starttls()
                self._ehlo()
            if self.smarthost.username:
                self._authenticate(self.smarthost.username)
        except SessionError:
            self._abort()
            raise
        return self.info

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        notify: str | None = None,
        ret: str | None = None,
        envid: str | None = None,
        body_type: str | None = None,
        expanded: Collection[str] = (),
    ) -> list[RecipientOutcome]:
        """Send one message; one outcome per recipient, in the order given.

        `message` has CRLF line endings and is not dot-stuffed. `notify` ("never" or a comma list of
        success, failure, delay), `ret` ("hdrs"/"full") and `envid` go out as DSN parameters when the
        server offers DSN, `body_type` ("8BITMIME"/"7BIT") asks for BODY=8BITMIME (which is also used
        whenever the message has 8-bit bytes and the server offers it). The `expanded` recipients are the
        targets of an alias: their NOTIFY leaves out SUCCESS (RFC 3461 5.2.7.3), since the address the
        sender named was reported as expanded, and the targets are not the sender's to know.

        Raises SessionError when the session fails (see the class), ValueError before sending anything
        when an argument cannot be carried by SMTP (CR, LF, <, > in an address; an unknown NOTIFY word).
        """
        if self._started:
            raise RuntimeError("a started message must be finished first")
        return self.finish(
            self.start(
                sender,
                recipients,
                message,
                notify=notify,
                ret=ret,
                envid=envid,
                body_type=body_type,
                expanded=expanded,
            )
        )

    def start(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        notify: str | None = None,
        ret: str | None = None,
        envid: str | None = None,
        body_type: str | None = None,
        expanded: Collection[str] = (),
    ) -> Transaction:
        """Start one message (arguments as for `send()`); `finish()` sends it and gives the outcomes.

        Nothing is sent here. Messages are finished in the order they were started; a message started
        while an earlier one is not finished has its commands sent behind that one's text (see the module
        docstring). Raises ValueError as `send()` does; failures of the session come from `finish()`.
        """
        client = self._require_open()
        params = _check_arguments(sender, recipients, notify, ret, envid)
        message = fit_line_length(message)  # a line over 998 octets would be refused, and the mail bounced
        features = client.esmtp_features
        dsn = "dsn" in features
        needs_utf8 = not sender.isascii() or not all(r.isascii() for r in recipients)
        utf8 = needs_utf8 and "smtputf8" in features
        outcomes: dict[str, RecipientOutcome] = {}
        if needs_utf8 and not utf8:
            for recipient in recipients:
                if not (sender.isascii() and recipient.isascii()):
                    address = sender if not sender.isascii() else recipient
                    outcomes[recipient] = RecipientOutcome(
                        recipient, "failed", SMTPUTF8_MISSING_REPLY.format(address=address)
                    )
        pending = [r for r in dict.fromkeys(recipients) if r not in outcomes]
        if not pending:
            return Transaction(list(recipients), outcomes)

        mail_params = []
        if "size" in features:
            mail_params.append(f"SIZE={len(message)}")
        if "8bitmime" in features and (utf8 or body_type == "8BITMIME" or not message.isascii()):
            mail_params.append("BODY=8BITMIME")
        if utf8:
            mail_params.append("SMTPUTF8")
        if dsn:
            mail_params += params.mail
        mail = f"MAIL FROM:<{sender}>{_join(mail_params)}"
        rcpts = [f"RCPT TO:<{r}>{_join(params.for_recipient(r, expanded) if dsn else [])}" for r in pending]
        reset = self._transactions > 0
        self._transactions += 1
        transaction = Transaction(
            list(recipients),
            outcomes,
            pending,
            message,
            mail,
            rcpts,
            reset=reset,
            pipelined="pipelining" in features,
            encoding="utf-8" if utf8 else "ascii",
        )
        self._started.append(transaction)
        return transaction

    def finish(
        self, transaction: Transaction, *, while_waiting: Callable[[], None] | None = None
    ) -> list[RecipientOutcome]:
        """Send a started message; one outcome per recipient, in the order given to `start()`.

        `while_waiting`, if given, is called once the text (with the commands of the message started behind
        it) is written and before its reply is read: local work that overlaps the round trip. It must not
        raise, and must neither send nor record anything.

        Raises SessionError as `send()` does. When the connection ended before anything of this message
        was sent (a failure while finishing the one before it), the error says `reconnect` and the
        transaction is `lost`: start the message again, on this session reopened or another one.
        """
        outcomes = transaction.outcomes
        recipients = transaction.recipients
        if not transaction.pending:
            return [outcomes[r] for r in recipients]
        if transaction.lost:
            raise SessionError(
                self.relay,
                "the connection ended before this message was sent; try again later",
                stage="closed",
                reconnect=True,
            )
        if not self._started or self._started[0] is not transaction:
            raise RuntimeError("started messages are finished in the order they were started")
        client = self._require_open()
        client.command_encoding = transaction.encoding
        pending, message, reset = transaction.pending, transaction.message, transaction.reset

        # RSET before every message but the first. With PIPELINING (RFC 2920) RSET, MAIL, every RCPT and DATA
        # go out in one write (DATA may end a group), often behind the text of the message before; a message
        # then costs one or two round trips. A plain smtplib loop needs 3 + recipients.
        pipelining = transaction.pipelined
        lines = [transaction.mail, *transaction.rcpts, "DATA"] if pipelining else [transaction.mail]
        replies = self._exchange(lines, reset=reset, written=transaction.written)
        transaction.written = True
        code, reply = replies[0]
        status = _known_status(code)
        if status != "delivered":  # with PIPELINING the RCPTs and DATA were answered too (503): moot
            if pipelining and replies[-1][0] == 354:
                self._data(b"")  # the server took DATA anyway; end the empty transaction
            outcomes.update((r, RecipientOutcome(r, status, reply)) for r in pending)
            return self._finished(transaction)
        rcpt_replies = (
            replies[1:-1] if pipelining else [self._exchange([line])[0] for line in transaction.rcpts]
        )

        accepted = []
        for recipient, (code, reply) in zip(pending, rcpt_replies, strict=True):
            status = _known_status(code)
            if status == "delivered":
                accepted.append(recipient)
            else:
                outcomes[recipient] = RecipientOutcome(recipient, status, reply)
        if pipelining:
            code, reply = replies[-1]
        elif accepted:
            code, reply = self._command("DATA", "", "DATA")
        if code == 354:
            if not accepted:  # every RCPT refused, yet the server wants the text: send none (RFC 2920 3.1)
                self._data(b"")
                return self._finished(transaction)
            code, reply = self._data(message, while_waiting)
        elif accepted and _status(code) == "delivered":
            raise self._fail("protocol", f"the server answered DATA with {reply}, not 354", reply=reply)
        if accepted:
            status = _known_status(code)
            outcomes.update((r, RecipientOutcome(r, status, reply)) for r in accepted)
        return self._finished(transaction)

    def _finished(self, transaction: Transaction) -> list[RecipientOutcome]:
        self._started.pop(0)
        return [transaction.outcomes[r] for r in transaction.recipients]

    def close(self) -> None:
        """Say QUIT and close the connection; never raises. A closed session can be opened again."""
        client, self._client = self._client, None
        if client is None:
            return
        self._last_ip = client.peer_ip
        # A started message whose commands went out may have a 354 waiting: QUIT would be taken for its text.
        in_transaction = self._forget_started()
        try:
            if client.sock is not None and not in_transaction:
                client.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            client.close()
            self._transactions = 0

    def __enter__(self) -> SmtpSession:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SmtpSession {self.relay} {'open' if self.is_open else 'closed'}>"

    # -- the steps of open() --

    def _connect(self) -> None:
        client = self._require_client()
        host, port = self.smarthost.host, self.smarthost.port
        try:
            context = self._tls_context() if self.smarthost.security == "tls" else None
            client.tls_context = context
            code, message = client.connect(host, port)
        except SessionError:
            raise
        except Exception as error:
            raise self._network_failure(error, "connect") from error
        greeting = _format_reply(code, message)
        self._greeting = greeting
        if code == 421 or code // 100 in (4, 5):
            raise self._fail(
                "greeting", f"the server refused the session: {greeting}; try again later", reply=greeting
            )
        if code != 220:
            raise self._fail(
                "greeting", f"unexpected greeting {greeting!r}; check host and port", reply=greeting
            )
        log.debug("%s: connected: %s", self.relay, greeting)
        if context is not None:
            self._record_tls()

    def _ehlo(self) -> None:
        client = self._require_client()
        try:
            code, message = client.ehlo(self.hostname)
            if code != 250 and code != 421:
                code, message = client.helo(self.hostname)
        except Exception as error:
            raise self._network_failure(error, "EHLO") from error
        reply = _format_reply(code, message)
        if code == 421:
            raise self._closed(reply, "EHLO")
        if code != 250:
            raise self._fail(
                "protocol",
                f"the server refused EHLO {self.hostname}: {reply}; set hostname: in the config to this "
                "machine's public name",
                reply=reply,
            )
        lines = message.decode("utf-8", "replace").split("\n")[1:] if client.does_esmtp else []
        self._extensions = tuple(" ".join(line.split()) for line in lines if line.strip())

    def _starttls(self) -> None:
        client = self._require_client()
        if not client.has_extn("starttls"):
            raise self._fail(
                "tls",
                "the server does not offer STARTTLS, so mail and password would travel unencrypted; check "
                "the port (587 offers STARTTLS), use security: tls for port 465, or security: none for a "
                "relay on a trusted network",
            )
        try:
            context = self._tls_context()
            client.starttls(context=context)
        except smtplib.SMTPResponseException as error:
            reply = _format_reply(error.smtp_code, _as_bytes(error.smtp_error))
            if error.smtp_code == 421:
                raise self._closed(reply, "STARTTLS") from None
            raise self._fail(
                "tls", f"the server refused STARTTLS: {reply}; try again later", reply=reply
            ) from None
        except SessionError:
            raise
        except Exception as error:
            raise self._network_failure(error, "STARTTLS") from error
        self._check_pin()
        self._record_tls()

    def _authenticate(self, username: str) -> None:
        client = self._require_client()
        encrypted = self.smarthost.security != "none"
        if not encrypted and not self.smarthost.auth_plaintext:
            raise self._fail(
                "auth",
                "refusing to send the password over an unencrypted connection; use security: starttls or "
                "tls, or set auth_plaintext: true if the network to this host is trusted",
            )
        if not client.has_extn("auth"):
            after = " after STARTTLS" if self.smarthost.security == "starttls" else ""
            raise self._fail(
                "auth",
                f"a username is configured but the server offers no AUTH{after}; check the port (submission "
                "is 587 or 465), or remove username: if this relay takes mail without a login",
            )
        offered = client.esmtp_features["auth"].upper().split()
        mechanism = self._choose_mechanism(offered, encrypted)
        secret = self._fetch_secret()
        try:
            code, reply = _AUTH_DIALOGUES[mechanism](self, username, secret)
        except SessionError:
            raise
        except Exception as error:
            raise self._network_failure(error, f"AUTH {mechanism}") from None
        if code == 235:
            self._authenticated = f"{mechanism} as {username}"
            log.debug("%s: authenticated with %s as %s", self.relay, mechanism, username)
            return
        if code == 421:
            raise self._closed(reply, f"AUTH {mechanism}")
        if code // 100 == 4:
            raise self._fail(
                "auth", f"AUTH {mechanism} failed temporarily: {reply}; pymta will try again", reply=reply
            )
        raise self._fail(
            "auth",
            f"the server rejected the login of {username} with AUTH {mechanism}: {reply}; "
            f"check username: and the password{self._source_name()}",
            reply=reply,
        )

    def _choose_mechanism(self, offered: Sequence[str], encrypted: bool) -> str:
        wanted = self.smarthost.auth.upper()
        if wanted != "AUTO":
            if wanted not in MECHANISMS:
                raise self._fail(
                    "auth", f"unknown auth mechanism {wanted}; use one of {', '.join(MECHANISMS)}"
                )
            if wanted not in offered:
                raise self._fail(
                    "auth",
                    f"auth: {wanted.lower()} is configured but the server offers only {' '.join(offered)}; "
                    "choose one of those, or auth: auto",
                )
            return wanted
        order = AUTO_MECHANISMS_TLS if encrypted else AUTO_MECHANISMS_PLAINTEXT
        for mechanism in order:
            if mechanism in offered:
                return mechanism
        raise self._fail(
            "auth",
            f"the server offers AUTH {' '.join(offered)}, none of which pymta chooses by itself "
            f"({', '.join(order)}); for an OAuth2 token set auth: xoauth2 or oauthbearer",
        )

    def _fetch_secret(self) -> Secret:
        password = self.smarthost.password
        if self._secret_source is None and password is None:
            raise self._fail(
                "credentials",
                "a username is configured but no password source; add e.g. password: {keyring: pymta} "
                f"and run `pymta password set {self.smarthost.host}`",
            )
        try:
            if self._secret_source is not None:
                return self._secret_source()
            assert password is not None
            return resolve(password, host=self.smarthost.host, username=self.smarthost.username)
        except CredentialError as error:
            raise self._fail("credentials", f"cannot get the password: {error}") from None

    # -- TLS --

    def _tls_context(self) -> ssl.SSLContext:
        """A verifying context: the system store or ca_file; with a pin and no ca_file, the pin decides."""
        ca_file = self.smarthost.ca_file
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise self._fail(
                "tls",
                f"cannot load ca_file {ca_file}: {_error_text(error)}; check the path and that it holds "
                "PEM certificates readable by pymta",
            ) from None
        if self.smarthost.fingerprint and not ca_file:
            # The pin (checked right after the handshake, before a byte of SMTP is read) replaces chain and
            # name verification, as msmtp's tls_fingerprint does: it is what lets a self-signed server in.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _check_pin(self) -> None:
        client = self._require_client()
        if client.sock is None:
            return
        _verify_pin(self.smarthost, client.sock, self._fail)

    def _record_tls(self) -> None:
        client = self._require_client()
        sock = client.sock
        if not isinstance(sock, ssl.SSLSocket):
            return
        cipher = sock.cipher() or ("", "", 0)
        self._tls = TlsInfo(
            version=sock.version() or "",
            cipher=cipher[0],
            bits=cipher[2] or 0,
            certificate=_certificate(sock, self._verification()),
        )
        log.debug("%s: %s %s", self.relay, self._tls.version, self._tls.cipher)

    def _verification(self) -> str:
        ca = f"ca_file {self.smarthost.ca_file}" if self.smarthost.ca_file else "the system CA store"
        if self.smarthost.fingerprint and self.smarthost.ca_file:
            return f"pinned fingerprint matches; chain and host name verified against {ca}"
        if self.smarthost.fingerprint:
            return "pinned fingerprint matches (chain and host name not checked)"
        return f"chain and host name verified against {ca}"

    # -- transactions --

    def _exchange(
        self, lines: Sequence[str], *, reset: bool = False, written: bool = False
    ) -> list[tuple[int, str]]:
        """Send `lines` (with RSET first when `reset`) in one write and read one reply per line; `written`:
        they went out already, behind the text of the message before (`_data`), and are only read.

        The replies are 2xx, 4xx or 5xx; anything else, a 421 or a lost connection raises SessionError.
        When the server turns out to be gone at the RSET (closed the idle connection, or 421), the error
        says `reconnect`: nothing of this message reached it. Every error here is `untouched`: the message's
        text is sent only after these commands.
        """
        client = self._require_open()
        commands = ["RSET", *lines] if reset else list(lines)
        if not written:
            try:
                client.send(_command_lines(commands, client.command_encoding))
            except Exception as error:
                failure = self._network_failure(error, _doing(commands[0]))
                failure.reconnect, failure.untouched = reset, True
                raise failure from error
        replies = []
        for index, command in enumerate(commands):
            at_reset = reset and index == 0
            try:
                code, message = client.getreply()
            except Exception as error:
                failure = self._network_failure(error, _doing(command))
                failure.reconnect, failure.untouched = at_reset, True
                raise failure from error
            if at_reset and code == 250:
                continue
            reply = _transaction_reply(code, message)
            if code == 421:
                failure = self._closed(reply, _doing(command))
            elif at_reset:
                failure = self._fail("protocol", f"the server answered RSET with {reply}", reply=reply)
            elif _status(code) is None and not (code == 354 and command == "DATA"):
                failure = self._fail(
                    "protocol", f"unexpected reply to {_doing(command)}: {reply!r}", reply=reply
                )
            else:
                replies.append((code, reply))
                continue
            failure.reconnect, failure.untouched = at_reset and code == 421, True
            raise failure
        return replies

    def _command(self, verb: str, arguments: str, doing: str) -> tuple[int, str]:
        """Send one command, read its reply; a 421, a lost connection or a timeout raise SessionError."""
        client = self._require_open()
        try:
            code, message = client.docmd(verb, arguments)
        except Exception as error:
            raise self._network_failure(error, doing) from error
        reply = _transaction_reply(code, message)
        if code == 421:
            raise self._closed(reply, doing)
        if _status(code) is None and code != 354:
            raise self._fail("protocol", f"unexpected reply to {doing}: {reply!r}", reply=reply)
        return code, reply

    def _data(self, message: bytes, while_waiting: Callable[[], None] | None = None) -> tuple[int, str]:
        """Send the text of the first started message and read the reply to its end; the commands of the
        message started behind it go out in the same write (the module docstring says why that is safe).
        `while_waiting` runs between the write and the read (`finish`)."""
        client = self._require_open()
        body = message
        if body.startswith(b".") or b"\n." in body:  # most messages have no line to dot-stuff: no copy
            body = _DOT_LINE_RE.sub(b"..", body)
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        try:
            client.send(b"".join((body, b".\r\n", self._commands_behind())))  # one copy of the text
        except Exception as error:
            raise self._network_failure(error, "the message text (DATA)") from error
        if while_waiting is not None:
            while_waiting()
        try:
            code, reply_bytes = client.getreply(self.smarthost.data_timeout)  # RFC 5321 4.5.3.2.6
        except Exception as error:
            raise self._unanswered_text(error) from error
        reply = _transaction_reply(code, reply_bytes)
        if code == 421:
            raise self._closed(reply, "the end of DATA")
        if _status(code) is None:
            raise self._fail("protocol", f"unexpected reply to the end of DATA: {reply!r}", reply=reply)
        return code, reply

    def _commands_behind(self) -> bytes:
        """The commands of the message started after the one whose text is going out, if the server takes
        them pipelined (marked as sent); b"" when there is none (or they cannot be encoded: then `_exchange`
        reports that when that message is finished)."""
        if len(self._started) < 2:
            return b""
        following = self._started[1]
        if not following.pipelined or following.written or following.lost:
            return b""
        lines = [following.mail, *following.rcpts, "DATA"]
        try:
            data = _command_lines(["RSET", *lines] if following.reset else lines, following.encoding)
        except UnicodeError:
            return b""
        following.written = True
        return data

    # -- AUTH dialogues; each returns the final (code, reply) --

    def _auth_command(self, line: str) -> tuple[int, str, bytes]:
        """One AUTH step: send `line` (never logged), read the reply; (code, scrubbed reply, raw text)."""
        client = self._require_open()
        client.putcmd(line)
        code, message = client.getreply()
        return code, self._scrub(_format_reply(code, message)), message

    def _auth_plain(self, username: str, secret: Secret) -> tuple[int, str]:
        response = _b64(f"\0{username}\0{secret.reveal()}")
        self._sent_secrets.append(response)
        code, reply, _ = self._auth_command(f"AUTH PLAIN {response}")
        if code == 334:  # a server that ignores the initial response asks again
            code, reply, _ = self._auth_command(response)
        return code, reply

    def _auth_login(self, username: str, secret: Secret) -> tuple[int, str]:
        password = _b64(secret.reveal())
        self._sent_secrets.append(password)
        code, reply, _ = self._auth_command("AUTH LOGIN")
        if code == 334:
            code, reply, _ = self._auth_command(_b64(username))
        if code == 334:
            code, reply, _ = self._auth_command(password)
        return code, reply

    def _auth_cram_md5(self, username: str, secret: Secret) -> tuple[int, str]:
        code, reply, challenge = self._auth_command("AUTH CRAM-MD5")
        if code != 334:
            return code, reply
        try:
            nonce = base64.b64decode(challenge, validate=True)
        except binascii.Error:
            code, reply, _ = self._auth_command("*")
            return code, reply
        digest = hmac.new(secret.reveal().encode("utf-8"), nonce, hashlib.md5).hexdigest()
        code, reply, _ = self._auth_command(_b64(f"{username} {digest}"))
        return code, reply

    def _auth_xoauth2(self, username: str, secret: Secret) -> tuple[int, str]:
        response = _b64(f"user={username}\x01auth=Bearer {secret.reveal()}\x01\x01")
        self._sent_secrets.append(response)
        code, reply, error = self._auth_command(f"AUTH XOAUTH2 {response}")
        if code == 334:  # the error comes as a base64 JSON challenge; an empty line fetches the final reply
            detail = _oauth_error(error)
            code, reply, _ = self._auth_command("")
            reply = f"{reply} ({detail})" if detail else reply
        return code, reply

    def _auth_oauthbearer(self, username: str, secret: Secret) -> tuple[int, str]:
        authzid = username.replace("=", "=3D").replace(",", "=2C")
        host, port = self.smarthost.host, self.smarthost.port
        response = _b64(
            f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {secret.reveal()}\x01\x01"
        )
        self._sent_secrets.append(response)
        code, reply, error = self._auth_command(f"AUTH OAUTHBEARER {response}")
        if code == 334:  # RFC 7628 3.2.3: answer the error challenge with a lone ^A
            detail = _oauth_error(error)
            code, reply, _ = self._auth_command(_b64("\x01"))
            reply = f"{reply} ({detail})" if detail else reply
        return code, reply

    def _scrub(self, text: str) -> str:
        for sent in self._sent_secrets:
            text = text.replace(sent, "********")
        return text

    def _source_name(self) -> str:
        password = self.smarthost.password
        if password is None or self._secret_source is not None:
            return ""
        return f" in {{{password.kind}: {password.reference}}}"

    # -- failures --

    def _require_client(self) -> _Client:
        if self._client is None:
            raise RuntimeError("the session is not open")
        return self._client

    def _require_open(self) -> _Client:
        client = self._require_client()
        if client.sock is None:
            raise RuntimeError("the session is closed; open a new one")
        return client

    def _abort(self) -> None:
        """Drop the connection without QUIT: after a failure the server's state is not trusted."""
        client, self._client = self._client, None
        if client is not None:
            self._last_ip = client.peer_ip
            client.close()
        self._transactions = 0
        self._forget_started()

    def _forget_started(self) -> bool:
        """Mark the started messages lost (the connection is going); True when one had commands sent."""
        started, self._started = self._started, []
        for transaction in started:
            transaction.lost = True
        return any(transaction.written for transaction in started)

    def _fail(self, stage: Stage, reason: str, *, reply: str | None = None) -> SessionError:
        relay = self.relay
        self._abort()
        return SessionError(relay, self._scrub(reason), stage=stage, reply=reply)

    def _closed(self, reply: str, doing: str) -> SessionError:
        return self._fail(
            "closed", f"the server closed the session at {doing}: {reply}; try again later", reply=reply
        )

    def _network_failure(self, error: BaseException, doing: str) -> SessionError:
        stage, reason = _explain(error, doing, self.smarthost)
        return self._fail(stage, reason)

    def _unanswered_text(self, error: BaseException) -> SessionError:
        """The text and its final dot went out, and no answer came: the server may have the message (it
        answers once it has taken it, and a scanner may take long), or may not. Either way it is deferred;
        the error says that the smarthost may already have it, so a duplicate can be explained."""
        silent = any(isinstance(cause, TimeoutError) for cause in _causes(error))  # or its deadline passed
        fix = ""
        if isinstance(error, ReplyLimit) and not silent:
            what = f"{error} to the end of the message text, so pymta hung up"
        elif silent:
            what = f"no answer to the end of the message text within {self.smarthost.data_timeout:g} s"
            fix = "; if this smarthost scans mail slowly, raise its data_timeout"
        else:
            what = "the connection ended before the server answered the end of the message text (DATA)"
        failure = self._fail(
            "closed",
            f"{what}; the smarthost may already have the message: it is deferred, and when it is sent "
            f"again it may arrive twice{fix}",
        )
        failure.outcome_unknown = True
        return failure


def fetch_certificate(smarthost: Smarthost, hostname: str) -> Certificate | None:
    """The certificate the server presents, fetched *without* verifying it and without AUTH or mail.

    For `pymta test` after a verification failure: the admin compares the fingerprint with the one the
    provider publishes and may pin it. None for `security: none`. Raises SessionError when even an
    unverified TLS session cannot be set up.
    """
    if smarthost.security == "none":
        return None
    probe = _UnverifiedSession(replace(smarthost, username=None, fingerprint=None), hostname)
    try:
        info = probe.open()
    finally:
        probe.close()
    return info.tls.certificate if info.tls else None


class _UnverifiedSession(SmtpSession):
    """A session that accepts any certificate: only for `fetch_certificate`, which sends nothing."""

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def _verification(self) -> str:
        return "NOT verified"


# Bound after the class body so the table can name the methods.
_AUTH_DIALOGUES: dict[str, Callable[[SmtpSession, str, Secret], tuple[int, str]]] = {
    "PLAIN": SmtpSession._auth_plain,
    "LOGIN": SmtpSession._auth_login,
    "CRAM-MD5": SmtpSession._auth_cram_md5,
    "XOAUTH2": SmtpSession._auth_xoauth2,
    "OAUTHBEARER": SmtpSession._auth_oauthbearer,
}


class ReplyLimit(smtplib.SMTPServerDisconnected):
    """The server's reply went past a bound (`_Client.getreply`): the connection was closed."""


class _Client(smtplib.SMTP):
    """smtplib.SMTP that connects address by address (so the relay names the IP even when refused), wraps
    the socket for implicit TLS and checks the pin before reading the greeting, and reads replies within
    bounds: smtplib's getreply takes any number of lines, at any pace, so a server that never ends a reply
    (250-... forever) grew the flush without limit, and one that sent a byte a second held it for hours."""

    def __init__(self, smarthost: Smarthost, hostname: str) -> None:
        super().__init__(local_hostname=hostname, timeout=smarthost.timeout)
        self._host = smarthost.host  # smtplib sets it only when given a host at construction
        self.smarthost = smarthost
        self.peer_ip: str | None = None
        self.tls_context: ssl.SSLContext | None = None
        self._buffer = b""  # read from `_buffer_of`; from `_start` on not yet returned
        self._start = 0
        self._buffer_of: socket.socket | None = None

    def getreply(self, timeout: float | None = None) -> tuple[int, bytes]:
        """One reply, as smtplib's: (code, the lines' text joined by LF); -1 and the whole line when it has
        no code. At most MAX_REPLY_LINES lines, and the whole reply within `timeout` (default: the
        session's) plus REPLY_TRANSFER_TIME (`timeout` alone bounds only each wait for data). Past either
        the connection is closed and SMTPServerDisconnected says why."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit + REPLY_TRANSFER_TIME
        try:
            return self._reply(deadline, limit)
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.timeout)  # what sends after this expect, not the rest of a deadline

    def send(self, s: ReadableBuffer | str) -> None:
        """smtplib's send, in blocks of DATA_BLOCK bytes, each within the timeout: the socket's timeout
        bounds a whole sendall (since Python 3.5), so a large text on a slow link ran out of it while it
        was still moving, and was sent again in full at every retry."""
        view = memoryview(s.encode(self.command_encoding) if isinstance(s, str) else s).cast("B")
        if view.nbytes <= DATA_BLOCK:
            super().send(s)
            return
        for start in range(0, view.nbytes, DATA_BLOCK):
            super().send(view[start : start + DATA_BLOCK])

    def _reply(self, deadline: float, limit: float) -> tuple[int, bytes]:
        texts = []
        while True:
            line = self._readline(deadline, limit)
            if len(line) > MAX_REPLY_LINE:
                self.close()
                raise smtplib.SMTPResponseException(500, b"Line too long.")
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n", b""):
                return -1, line.strip(b" \t\r\n")  # no reply: keep all of it for the error message
            texts.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                return int(code), b"\n".join(texts)
            if len(texts) >= MAX_REPLY_LINES:
                self.close()
                raise ReplyLimit(f"a reply of more than {MAX_REPLY_LINES} lines")

    def _readline(self, deadline: float, limit: float) -> bytes:
        """A line of the server's (with its line end), read straight from the socket, waiting at most
        `limit` seconds for each piece of it, and never past `deadline`: a buffer that began on another
        socket is dropped, as STARTTLS requires (text sent before the handshake must not count as said
        under TLS)."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if self._buffer_of is not sock:
            self._buffer, self._start, self._buffer_of = b"", 0, sock
        while True:
            end = self._buffer.find(b"\n", self._start)
            if end >= 0:
                line = self._buffer[self._start : end + 1]
                self._start = end + 1
                return line
            if len(self._buffer) - self._start > MAX_REPLY_LINE:
                return self._buffer[self._start :]
            wait = min(deadline - time.monotonic(), limit)
            try:
                if wait <= 0:
                    raise TimeoutError
                sock.settimeout(wait)
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                self.close()
                if wait < limit:  # the reply's deadline, not one silence, ran out
                    raise ReplyLimit(f"no complete reply within {limit + REPLY_TRANSFER_TIME:g} s") from None
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
            if not chunk:
                rest = self._buffer[self._start :]
                if rest:  # a last line without its CRLF ("421 bye", then the close): still the server's word
                    self._buffer, self._start = b"", 0
                    return rest
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            self._buffer = self._buffer[self._start :] + chunk
            self._start = 0

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = self._tcp_connect(host, port, timeout)
        if self.tls_context is None:
            return sock
        try:
            wrapped = self.tls_context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise

        def fail(stage: Stage, reason: str, *, reply: str | None = None) -> SessionError:
            relay = f"{host}[{self.peer_ip}]:{port}"
            return SessionError(relay, reason, stage=stage, reply=reply)

        try:
            _verify_pin(self.smarthost, wrapped, fail)
        except BaseException:
            wrapped.close()
            raise
        return wrapped

    def _tcp_connect(self, host: str, port: int, timeout: float) -> socket.socket:
        last_error: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            self.peer_ip = str(address[0])
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(address)
                return sock
            except OSError as error:
                sock.close()
                last_error = error
        raise last_error or OSError(f"no address for {host}")


# --- Helpers ---


@dataclass(frozen=True, slots=True)
class _DsnParams:
    mail: list[str]
    rcpt: list[str]
    targets: list[str]  # rcpt for an alias's targets: NOTIFY without SUCCESS

    def for_recipient(self, recipient: str, expanded: Collection[str]) -> list[str]:
        """The RCPT parameters of `recipient`: NOTIFY (without SUCCESS for an alias target) and ORCPT."""
        return (self.targets if recipient in expanded else self.rcpt) + _orcpt(recipient)


def _check_arguments(
    sender: str, recipients: Sequence[str], notify: str | None, ret: str | None, envid: str | None
) -> _DsnParams:
    if not recipients:
        raise ValueError("send() needs at least one recipient")
    for address in (sender, *recipients):
        if _UNSAFE_ADDRESS_RE.search(address):
            raise ValueError(f"address {address!r} contains characters SMTP cannot carry")
        if _SURROGATE_RE.search(address):  # bytes that were not UTF-8: no SMTP command can carry them
            raise ValueError(f"address {address!r} is not valid UTF-8")
    mail: list[str] = []
    rcpt: list[str] = []
    targets: list[str] = []
    if ret:
        if ret.upper() not in ("HDRS", "FULL"):
            raise ValueError(f"ret must be hdrs or full, not {ret!r}")
        mail.append(f"RET={ret.upper()}")
    if envid:
        if not envid.isascii() or not envid.isprintable():
            raise ValueError("envid must be printable ASCII")
        mail.append(f"ENVID={xtext(envid)}")
    if notify:
        words = [word.strip().upper() for word in notify.split(",")]
        if words != ["NEVER"] and not (words and set(words) <= _NOTIFY_WORDS):
            raise ValueError(f"notify must be never or a list of success, failure, delay, not {notify!r}")
        rcpt.append(f"NOTIFY={','.join(words)}")
        kept = [word for word in words if word != "SUCCESS"]
        targets.append(f"NOTIFY={','.join(kept or ['NEVER'])}")
    return _DsnParams(mail, rcpt, targets)


def xtext(text: str) -> str:
    """RFC 3461 xtext: printable ASCII except + and = as is, everything else as +XX (UTF-8 bytes)."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else "".join(f"+{byte:02X}" for byte in char.encode())
        for char in text
    )


def _orcpt(recipient: str) -> list[str]:
    # ORCPT with the utf-8 address type (RFC 6533) is not sent: a non-ASCII recipient simply has none.
    return [f"ORCPT=rfc822;{xtext(recipient)}"] if recipient.isascii() else []


def _command_lines(commands: Sequence[str], encoding: str) -> bytes:
    return "".join(f"{command}\r\n" for command in commands).encode(encoding)


def _doing(command: str) -> str:
    """A command as error messages name it: "RSET", "MAIL FROM", "RCPT TO"."""
    return command.split(":", 1)[0] if ":" in command else command.split(" ", 1)[0]


def _join(params: Sequence[str]) -> str:
    return "".join(f" {param}" for param in params)


_STATUS_BY_CLASS: dict[int, Status] = {2: "delivered", 4: "deferred", 5: "failed"}


def _status(code: int) -> Status | None:
    """The outcome a reply code means for a recipient; None for codes outside 2xx, 4xx, 5xx."""
    return _STATUS_BY_CLASS.get(code // 100) if 200 <= code <= 599 else None


def _known_status(code: int) -> Status:
    status = _status(code)
    if status is None:  # _command() and _data() raise SessionError for these first
        raise AssertionError(f"reply code {code} has no outcome")
    return status


# The replies of a transaction repeat ("250 2.0.0 Ok" to every RSET, MAIL and RCPT): each distinct one is
# formatted once. Bounded, as the final replies often differ ("queued as ..."); AUTH replies never go in.
_REPLY_CACHE_SIZE = 64
_reply_cache: dict[tuple[int, bytes], str] = {}


def _transaction_reply(code: int, message: bytes) -> str:
    """`_format_reply` for the replies of a mail transaction, remembered."""
    key = (code, message)
    reply = _reply_cache.get(key)
    if reply is None:
        reply = _format_reply(code, message)
        if len(_reply_cache) < _REPLY_CACHE_SIZE:
            _reply_cache[key] = reply
    return reply


def _format_reply(code: int, message: bytes) -> str:
    """A reply as one line, "CODE ENHANCED text"; X.0.0 stands in for a missing enhanced code."""
    if b"\n" not in message and message.isascii():
        # The common case, one printable line such as b"2.0.0 Ok: queued": no regex, no loop.
        text = message.decode("ascii").strip()
        first, _, rest = text.partition(" ")
        if text.isprintable() and _is_enhanced(first, code):
            return f"{code} {first} {rest.strip()}".rstrip()
    enhanced = ""
    texts = []
    for line in message.decode("utf-8", "replace").split("\n"):
        first, _, rest = line.strip().partition(" ")
        if _ENHANCED_RE.fullmatch(first) and first[0] == str(code)[0]:
            enhanced = enhanced or first
            line = rest
        if line.strip():
            texts.append(line.strip())
    text = " ".join(texts)
    if not text.isprintable():
        text = "".join(char if char.isprintable() else "?" for char in text)
    if not enhanced and 200 <= code <= 599:
        enhanced = f"{code // 100}.0.0"
    return " ".join(part for part in (str(code), enhanced, text) if part)


def _is_enhanced(word: str, code: int) -> bool:
    """Whether `word` is an RFC 3463 code of the reply's class, e.g. "2.0.0" for a 250."""
    if not 5 <= len(word) <= 9 or word[0] not in "245" or word[0] != str(code)[0] or word[1] != ".":
        return False
    subject, dot, detail = word[2:].partition(".")
    return bool(dot) and 0 < len(subject) <= 3 and 0 < len(detail) <= 3 and (subject + detail).isdigit()


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "replace")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _oauth_error(challenge: bytes) -> str:
    """The status in an XOAUTH2/OAUTHBEARER error challenge (base64 JSON), e.g. "status 401"."""
    try:
        data = json.loads(base64.b64decode(challenge, validate=True))
    except (binascii.Error, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    status = data.get("status")
    return f"token rejected, status {status}; the token may have expired" if status else ""


def _fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def _verify_pin(smarthost: Smarthost, sock: socket.socket, fail: Callable[..., SessionError]) -> None:
    pinned = smarthost.fingerprint_digest
    if pinned is None or not isinstance(sock, ssl.SSLSocket):
        return
    der = sock.getpeercert(binary_form=True) or b""
    if not hmac.compare_digest(hashlib.sha256(der).digest(), pinned):
        raise fail(
            "tls",
            f"the server certificate {_fingerprint(der)} does not match the pinned fingerprint "
            f"{smarthost.fingerprint}; if the server's certificate was renewed, check the new one "
            "(pymta test shows it) and update fingerprint:",
        )


def _certificate(sock: ssl.SSLSocket, verification: str) -> Certificate:
    der = sock.getpeercert(binary_form=True) or b""
    decoded = sock.getpeercert() or {}
    subject = _name(decoded.get("subject", ()))
    issuer = _name(decoded.get("issuer", ()))
    not_after: datetime | None = None
    expiry = decoded.get("notAfter")
    if isinstance(expiry, str):
        not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(expiry), UTC)
    if not decoded and der:
        subject, issuer, not_after = _decode_der(der)
    return Certificate(subject, issuer, not_after, _fingerprint(der), verification)


def _name(rdns: object) -> str:
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


def _error_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def _causes(error: BaseException) -> Iterator[BaseException]:
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


def _explain(error: BaseException, doing: str, smarthost: Smarthost) -> tuple[Stage, str]:
    """A network or TLS failure as (stage, one admin-readable reason with the fix)."""
    timeout = f"{smarthost.timeout:g} s"
    if isinstance(error, ReplyLimit):  # before its context, which may be the timeout that ended the wait
        return "closed", f"{error} to {doing}, so pymta hung up; the server misbehaves, try again later"
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            code = cause.verify_code
            message = (cause.verify_message or _error_text(cause)).rstrip(".")
            if code in (62, 64) or "mismatch" in message:
                fix = "write host: exactly as the provider documents it (a name in its certificate)"
                return "tls", f"certificate verify failed: {message}; {fix}"
            fix = _VERIFY_FIXES.get(code, "set ca_file or fingerprint: if the server uses its own CA")
            return "tls", f"certificate verify failed: {message}; {fix}"
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or _error_text(cause)
            if reason in _NOT_TLS_REASONS and smarthost.security == "tls":
                return (
                    "tls",
                    f"TLS handshake failed ({reason}): the server does not speak TLS at once on port "
                    f"{smarthost.port}; use security: starttls for port 587 or 25",
                )
            return (
                "tls",
                f"TLS handshake failed: {reason}; check security: and port, or the server's TLS setup",
            )
        if isinstance(cause, socket.gaierror):
            return "connect", (
                f"cannot resolve {smarthost.host}: {cause.strerror or cause}; check host: and the DNS setup"
            )
        if isinstance(cause, ConnectionRefusedError):
            return "connect", (
                f"connection refused: nothing listens on port {smarthost.port}; check host: and port:, and "
                "that the server is up"
            )
        if isinstance(cause, TimeoutError):
            if doing == "connect" and isinstance(error, TimeoutError):
                return "connect", (
                    f"no connection within {timeout}; check host:, port: and the firewall (many networks "
                    "block port 25)"
                )
            if doing == "connect":
                hint = (
                    "; if this port expects TLS from the start (465), set security: tls"
                    if smarthost.security != "tls"
                    else ""
                )
                return "greeting", f"no greeting within {timeout}{hint}"
            return (
                "closed",
                f"no answer to {doing} within {timeout}; the server or network hangs, try again later",
            )
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return "closed", f"the connection was reset during {doing}; try again later"
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return "closed", f"the server closed the connection during {doing}; try again later"
    if isinstance(error, OSError):
        stage: Stage = "connect" if doing == "connect" else "closed"
        return stage, f"{doing} failed: {_error_text(error)}; check the network and try again later"
    if isinstance(error, smtplib.SMTPException):
        return "protocol", f"{doing} failed: {_error_text(error)}"
    return "protocol", f"{doing} failed: {type(error).__name__}: {_error_text(error)}"


__all__ = [
    "AUTO_MECHANISMS_PLAINTEXT",
    "AUTO_MECHANISMS_TLS",
    "MECHANISMS",
    "Certificate",
    "RecipientOutcome",
    "ServerInfo",
    "SessionError",
    "SmtpSession",
    "Status",
    "TlsInfo",
    "Transaction",
    "fetch_certificate",
    "xtext",
]
