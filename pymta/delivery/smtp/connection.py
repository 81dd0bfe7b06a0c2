"""The connection to a smarthost under a session: connect, greeting, EHLO, STARTTLS or implicit TLS, AUTH,
and how a failure closes it (`SmtpSession` adds the mail transactions on top).

Invariants kept here:
- Certificates are verified, always with an explicit `ssl.SSLContext` (`tls`).
- `security: starttls` never falls back to plain text: a server that does not offer STARTTLS is an error.
- An MX host (`direct.MxRelay`) is never sent AUTH; its TLS is its domain's policy (`_open_direct`):
  opportunistic takes what it gets, verify only a certificate valid for the MX name.
- AUTH is sent only over TLS, unless the smarthost says `auth_plaintext: true`.
- The secret is fetched only when AUTH is about to be sent, travels as `credentials.Secret`, and appears
  in no exception, log line or repr: AUTH dialogues are never logged, and a server reply quoted in an
  error is scrubbed of the secret and of what we sent.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Callable, Sequence

from pymta.delivery.credentials import CredentialError, Secret, resolve
from pymta.delivery.direct import MxRelay
from pymta.delivery.smtp import auth, tls
from pymta.delivery.smtp.explain import error_text, explain
from pymta.delivery.smtp.outcome import SessionError
from pymta.delivery.smtp.replies import Client, as_bytes, format_reply
from pymta.delivery.smtp.tls import Certificate, TlsInfo
from pymta.records import record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal, Self

    from pymta.config.model import Smarthost
    from pymta.delivery.smtp.outcome import Stage

    # What TLS a session got, for the log line of a direct delivery (`tls=`): a certificate verified for
    # the server's name, encryption without that (opportunistic TLS), or none.
    TlsLevel = Literal["verified", "encrypted", "none"]

log = logging.getLogger("pymta.delivery.smtp")  # the name it had as one module


@record(frozen=True, slots=True)
class ServerInfo:
    """What the session learned about the server, for `pymta test`; filled as far as the session got."""

    relay: str
    greeting: str  # the 220 line, as "220 ... text"
    extensions: tuple[str, ...]  # the EHLO keywords with parameters, e.g. "SIZE 35882577", "AUTH PLAIN LOGIN"
    tls: TlsInfo | None
    authenticated: str | None  # "PLAIN as me@example.org" once AUTH succeeded


class Connection:
    """One connection to a smarthost, opened, secured and authenticated; closed with QUIT or dropped.

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
        self._client: Client | None = None
        self._last_ip: str | None = None  # the server's address, for messages after the connection closed
        self._greeting = ""
        self._extensions: tuple[str, ...] = ()
        self._tls: TlsInfo | None = None
        self._authenticated: str | None = None
        self._sent_secrets: list[str] = []  # what AUTH put on the wire, scrubbed from quoted replies
        self.tls_level: TlsLevel = "none"  # what the open session got

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
        self._client = Client(self.smarthost, self.hostname)
        self.tls_level, self._tls = "none", None  # what an earlier session of this one got is gone
        if isinstance(self.smarthost, MxRelay):
            self._open_direct(self.smarthost)
            return self.info
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

    def _open_direct(self, relay: MxRelay) -> None:
        """Open a session with an MX host: STARTTLS with the certificate verified for the MX name; with the
        opportunistic policy, a certificate that does not verify is taken unverified on a new connection
        (tls=encrypted), and a server that does not offer STARTTLS, refuses it or fails the handshake gets
        the mail in clear (tls=none, on a new connection after a failure), as MTAs do between MX hosts
        (RFC 3207 4.1, RFC 7435). The verify policy takes nothing less than a verified certificate: the
        recipients wait (4.7.5). Never AUTH. Raises SessionError as `open` does."""
        verify = relay.tls_policy == "verify"
        level: TlsLevel = "verified"
        while True:
            self.tls_level = level  # `_tls_context` and `_verification` follow it
            try:
                self._connect()
                self._ehlo()
                if level != "none" and self._require_client().has_extn("starttls"):
                    self._starttls()
                    self._ehlo()
                elif verify:
                    raise self._fail("tls", "the MX host does not offer STARTTLS")
                else:
                    self.tls_level = "none"
                return
            except SessionError as error:
                self._abort()
                if error.stage == "tls" and verify:
                    raise self._refused_unverified(relay, error) from None
                if error.stage != "tls" or level == "none":
                    raise
                # A certificate that does not verify still encrypts; a handshake that fails gives nothing.
                log.debug("%s: TLS (%s) failed: %s; connecting again", self.relay, level, error.reason)
                level = "encrypted" if level == "verified" and error.certificate_failed else "none"
                self._client = Client(relay, self.hostname)  # the failed handshake spent the connection

    def _refused_unverified(self, relay: MxRelay, error: SessionError) -> SessionError:
        """The verify policy met an MX host without a valid certificate: its recipients wait (4.7.5)."""
        what = error.reason.split("; ")[0]  # the fix that explain() offers is a smarthost's
        why = (
            "the domain's MTA-STS policy is enforce (RFC 8461)"
            if relay.sts == "enforce"
            else "the TLS policy for the domain is verify (mx.tls_policy)"
        )
        return SessionError(
            error.relay,
            f"4.7.5 no TLS with a certificate valid for {relay.host}, and {why}: {what}",
            stage="tls",
            reply=error.reply,
            certificate_failed=error.certificate_failed,
        )

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

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the steps of open() --

    def _connect(self) -> None:
        client = self._require_client()
        host, port = self.smarthost.host, self.smarthost.port
        if isinstance(self.smarthost, MxRelay):
            host = self.smarthost.address  # the certificate is checked against the MX name (client._host)
        try:
            context = self._tls_context() if self.smarthost.security == "tls" else None
            client.tls_context = context
            code, message = client.connect(host, port)
        except SessionError:
            raise
        except Exception as error:
            raise self._network_failure(error, "connect") from error
        greeting = format_reply(code, message)
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
        reply = format_reply(code, message)
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
            reply = format_reply(error.smtp_code, as_bytes(error.smtp_error))
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
            dialogue = auth.Dialogue(self._require_open(), self.smarthost, self._sent_secrets)
            code, reply = auth.DIALOGUES[mechanism](dialogue, username, secret)
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
        try:
            return auth.choose(self.smarthost.auth.upper(), offered, encrypted)
        except ValueError as error:
            raise self._fail("auth", str(error)) from None

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
        if self.tls_level == "encrypted":  # opportunistic TLS after a certificate that did not verify
            return tls.unverified_context()
        try:
            return tls.verifying_context(self.smarthost)
        except (OSError, ssl.SSLError) as error:
            raise self._fail(
                "tls",
                f"cannot load ca_file {self.smarthost.ca_file}: {error_text(error)}; check the path and that "
                "it holds PEM certificates readable by pymta",
            ) from None

    def _check_pin(self) -> None:
        client = self._require_client()
        if client.sock is None:
            return
        tls.verify_pin(self.smarthost, client.sock, self._fail)

    def _record_tls(self) -> None:
        sock = self._require_client().sock
        if not isinstance(sock, ssl.SSLSocket):
            return
        self._tls = tls.tls_info(sock, self._verification())
        if self.tls_level == "none":  # a smarthost's certificate is always verified (or pinned)
            self.tls_level = "verified"
        log.debug("%s: %s %s", self.relay, self._tls.version, self._tls.cipher)

    def _verification(self) -> str:
        if self.tls_level == "encrypted":
            return "NOT verified (opportunistic TLS: the certificate did not verify for the MX name)"
        return tls.verification(self.smarthost)

    def _scrub(self, text: str) -> str:
        return auth.scrub(text, self._sent_secrets)

    def _source_name(self) -> str:
        password = self.smarthost.password
        if password is None or self._secret_source is not None:
            return ""
        return f" in {{{password.kind}: {password.reference}}}"

    # -- failures --

    def _require_client(self) -> Client:
        if self._client is None:
            raise RuntimeError("the session is not open")
        return self._client

    def _require_open(self) -> Client:
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
        self._forget_started()

    def _forget_started(self) -> bool:
        """The connection is going: forget what was started on it; True when a message had its commands
        sent (then QUIT would be taken for its text). A connection starts nothing (`SmtpSession` does)."""
        return False

    def _fail(self, stage: Stage, reason: str, *, reply: str | None = None) -> SessionError:
        relay = self.relay
        self._abort()
        return SessionError(relay, self._scrub(reason), stage=stage, reply=reply)

    def _closed(self, reply: str, doing: str) -> SessionError:
        return self._fail(
            "closed", f"the server closed the session at {doing}: {reply}; try again later", reply=reply
        )

    def _network_failure(self, error: BaseException, doing: str) -> SessionError:
        explained = explain(error, doing, self.smarthost)
        failure = self._fail(explained.stage, explained.reason)
        failure.certificate_failed = explained.certificate_failed
        return failure


def fetch_certificate(smarthost: Smarthost, hostname: str) -> Certificate | None:
    """The certificate the server presents, fetched *without* verifying it and without AUTH or mail.

    For `pymta test` after a verification failure: the admin compares the fingerprint with the one the
    provider publishes and may pin it. None for `security: none`. Raises SessionError when even an
    unverified TLS session cannot be set up.
    """
    if smarthost.security == "none":
        return None
    probe = _UnverifiedConnection(replace(smarthost, username=None, fingerprint=None), hostname)
    try:
        info = probe.open()
    finally:
        probe.close()
    return info.tls.certificate if info.tls else None


class _UnverifiedConnection(Connection):
    """A connection that accepts any certificate: only for `fetch_certificate`, which sends nothing."""

    def _tls_context(self) -> ssl.SSLContext:
        return tls.unverified_context()

    def _verification(self) -> str:
        return "NOT verified"
