"""Real SMTP servers on 127.0.0.1 for tests: aiosmtpd with TLS from trustme, and a scripted raw server.

Use them from any test file (the tests directory is on sys.path):

    from mailservers import Certificates, SmtpServer, ScriptedServer, make_smarthost, smtp_server

    def test_send(smtp_server):                       # a STARTTLS server, its CA in smtp_server.tls.ca_file
        host = smtp_server.smarthost()                # a Smarthost pointing at it, trusting the CA
        ...
        assert smtp_server.handler.messages[0].rcpt_tos == ["a@example.org"]

`SmtpServer` is aiosmtpd in a thread, listening on a socket we bound (no port races), in one of three modes:
`starttls` (587-style), `tls` (implicit, 465-style) or `plain`. Its `handler` records every message, every
RCPT, RSET and EHLO, answers per-recipient rejections and a fixed DATA reply; its `auth` accepts one
user/password (any Unicode) with PLAIN, LOGIN, CRAM-MD5, XOAUTH2 and OAUTHBEARER and records each attempt.

`ScriptedServer` follows a script per connection (send a line / expect a command / read DATA / hang /
close / start TLS) for faults aiosmtpd cannot produce. Every server stops itself within its `lifetime`, and
every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from pymta.config.model import PasswordSource, Smarthost
from pymta.records import fields

HOST = "127.0.0.1"
USER = "me@example.org"
PASSWORD = "pässwörd-€-秘密"  # non-ASCII on purpose: smtplib's login() cannot send it
TOKEN = "ya29.token-for-oauth2"
Mode = Literal["starttls", "tls", "plain"]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def make_smarthost(port: int, **values: Any) -> Smarthost:
    """A Smarthost for a test server on 127.0.0.1; short timeout. Keys Smarthost lacks are dropped only if
    they hold their default (so a test written for a newer config still runs on an older one)."""
    values.setdefault("host", HOST)
    values.setdefault("timeout", 3.0)
    known = {f.name for f in fields(Smarthost)}
    for key in list(values):
        if key not in known:
            if values[key] not in (None, "auto"):
                pytest.skip(f"Smarthost has no field {key!r} yet")
            del values[key]
    return Smarthost(port=port, **values)


# --- Certificates ---


@dataclass
class Certificates:
    """A CA and a server certificate for localhost and 127.0.0.1, written out for `ca_file`."""

    ca: trustme.CA
    ca_file: Path
    leaf: trustme.LeafCert
    directory: Path

    def server_context(self, leaf: trustme.LeafCert | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (leaf or self.leaf).configure_cert(context)
        return context

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.leaf.cert_chain_pems[0].bytes())

    def issue(self, *names: str, not_after: datetime.datetime | None = None) -> trustme.LeafCert:
        """Another server certificate from the same CA: another name, or expired."""
        not_before = None
        if not_after is not None and not_after < datetime.datetime.now(datetime.UTC):
            not_before = not_after - datetime.timedelta(days=30)
        return self.ca.issue_cert(*(names or (HOST, "localhost")), not_before=not_before, not_after=not_after)


def make_certificates(directory: Path) -> Certificates:
    ca = trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certificates(ca, ca_file, ca.issue_cert(HOST, "localhost"), directory)


def self_signed_context() -> tuple[ssl.SSLContext, str]:
    """A server context with a self-signed certificate for 127.0.0.1, and its sha256 fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed.test")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    blob = trustme.Blob(key_pem + pem)
    with blob.tempfile() as path:
        context.load_cert_chain(path)
    return context, fingerprint_of(pem)


def fingerprint_of(pem: bytes) -> str:
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


# --- aiosmtpd: handler, authenticator, controller ---


@dataclass
class Received:
    """One message as the server accepted it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: dict[str, list[str]]
    login: str | None  # who had authenticated on that connection


@dataclass
class Handler:
    """Records what arrives and answers as configured.

    - rejections: address -> the reply to its RCPT, e.g. {"bad@x": "550 5.1.1 user unknown"};
    - mail_reply / data_reply: the reply to MAIL / to the end of DATA instead of 250, e.g. "552 5.3.4 big";
    - extensions: extra EHLO keywords, e.g. ["DSN"] (the DSN parameters are then accepted);
    - hide: EHLO keywords to remove, e.g. {"8BITMIME", "SMTPUTF8", "AUTH"};
    - slow: recipient -> seconds the reply to the end of DATA waits for a message to it (a content scanner
      at work); the message is recorded before the wait, as a scanner has it once it has read it.
    """

    rejections: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    extensions: list[str] = field(default_factory=list)
    hide: set[str] = field(default_factory=set)
    slow: dict[str, float] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)
    ehlo_names: list[str] = field(default_factory=list)
    mail_froms: list[str] = field(default_factory=list)  # every MAIL FROM address, answered or refused
    rcpts_seen: list[str] = field(default_factory=list)  # every RCPT TO address, accepted or refused
    resets: int = 0
    sessions: set[int] = field(default_factory=set)
    _rcpt_options: dict[str, list[str]] = field(default_factory=dict)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.ehlo_names.append(hostname)
        self.sessions.add(id(session))
        kept = [line for line in responses[:-1] if line[4:].split(" ")[0].upper() not in self.hide]
        return kept + [f"250-{keyword}" for keyword in self.extensions] + responses[-1:]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.mail_froms.append(address)
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.resets += 1
        return "250 2.0.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.rcpts_seen.append(address)
        if address in self.rejections:
            return self.rejections[address]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        self._rcpt_options[address] = list(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        content = envelope.original_content or b""
        assert isinstance(content, bytes)
        self.messages.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=content,
                mail_options=list(envelope.mail_options),
                rcpt_options={r: self._rcpt_options.pop(r, []) for r in envelope.rcpt_tos},
                login=session.auth_data.login.decode()
                if isinstance(session.auth_data, LoginPassword)
                else None,
            )
        )
        queued = len(self.messages)
        delay = max((self.slow.get(rcpt, 0.0) for rcpt in envelope.rcpt_tos), default=0.0)
        if delay:
            await asyncio.sleep(delay)
        return f"250 2.0.0 OK: queued as {queued}"

    # Mechanisms aiosmtpd lacks; it finds them on the handler by name (auth_CRAM__MD5 is CRAM-MD5).

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        nonce = f"<{secrets.token_hex(8)}@{HOST}>".encode()
        answer = await server.challenge_auth(nonce)
        if not isinstance(answer, bytes):
            return AuthResult(success=False, handled=False)
        login, _, digest = answer.decode("utf-8", "replace").rpartition(" ")
        auth: Authenticator = server._authenticator  # type: ignore[assignment]
        expected = hmac.new(auth.password.encode(), nonce, hashlib.md5).hexdigest()
        ok = login == auth.user and hmac.compare_digest(digest, expected)
        auth.record("CRAM-MD5", login, ok)
        return AuthResult(success=ok, handled=False, auth_data=LoginPassword(login.encode(), b""))

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        auth: Authenticator = server._authenticator  # type: ignore[assignment]
        raw = base64.b64decode(args[1]) if len(args) > 1 else b""
        auth.initial_responses.append(raw)
        parts = dict(p.split("=", 1) for p in raw.decode().split("\x01") if "=" in p)
        ok = parts.get("user") == auth.user and parts.get("auth") == f"Bearer {auth.token}"
        auth.record("XOAUTH2", parts.get("user", ""), ok)
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(auth.user.encode(), b""))
        error = json.dumps({"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"})
        await server.challenge_auth(error)
        return AuthResult(success=False, handled=False)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        auth: Authenticator = server._authenticator  # type: ignore[assignment]
        raw = base64.b64decode(args[1]) if len(args) > 1 else b""
        auth.initial_responses.append(raw)
        gs2, _, rest = raw.decode().partition("\x01")
        parts = dict(p.split("=", 1) for p in rest.split("\x01") if "=" in p)
        user = gs2.removeprefix("n,a=").rstrip(",").replace("=2C", ",").replace("=3D", "=")
        ok = user == auth.user and parts.get("auth") == f"Bearer {auth.token}"
        auth.record("OAUTHBEARER", user, ok)
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(auth.user.encode(), b""))
        await server.challenge_auth(json.dumps({"status": "invalid_token"}))
        return AuthResult(success=False, handled=False)


@dataclass
class Attempt:
    mechanism: str
    login: str
    success: bool


@dataclass
class Authenticator:
    """Accepts `user` with `password` (PLAIN, LOGIN, CRAM-MD5) or `token` (XOAUTH2, OAUTHBEARER)."""

    user: str = USER
    password: str = PASSWORD
    token: str = TOKEN
    attempts: list[Attempt] = field(default_factory=list)
    initial_responses: list[bytes] = field(default_factory=list)

    def record(self, mechanism: str, login: str, success: bool) -> None:
        self.attempts.append(Attempt(mechanism, login, success))

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login = auth_data.login.decode("utf-8", "replace")
        ok = login == self.user and auth_data.password == self.password.encode("utf-8")
        self.record(mechanism, login, ok)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


class _DsnSMTP(SMTP):
    """aiosmtpd's SMTP, taking the DSN parameters (RFC 3461) when the handler advertises DSN."""

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        result = super()._getparams(params)
        if result is not None and "DSN" in self.event_handler.extensions:
            for name in ("NOTIFY", "RET", "ENVID", "ORCPT"):
                result.pop(name, None)
        return result


class _Controller(Controller):
    """aiosmtpd's threaded controller, serving on a socket bound beforehand (port 0: no races)."""

    def __init__(self, handler: Handler, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(handler, hostname=sock.getsockname()[0], port=sock.getsockname()[1], **kwargs)
        self._sock = sock

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock, ssl=self.ssl_context)

    def factory(self) -> SMTP:
        return _DsnSMTP(self.handler, **self.SMTP_kwargs)


class SmtpServer:
    """aiosmtpd on 127.0.0.1 in `mode` starttls, tls or plain; a context manager that stops it."""

    def __init__(
        self,
        mode: Mode = "starttls",
        tls: Certificates | None = None,
        *,
        handler: Handler | None = None,
        auth: Authenticator | None = None,
        server_context: ssl.SSLContext | None = None,
        auth_require_tls: bool = True,
        lifetime: float = 30.0,
        sock: socket.socket | None = None,
        server_hostname: str = "mx.test",
    ) -> None:
        """`sock`: a listening socket to serve on (another 127.0.0.x address, a port shared with other
        servers); default: a new one on 127.0.0.1. `server_hostname` is the name it gives in its replies."""
        self.mode = mode
        self.lifetime = lifetime
        self._stopped = threading.Lock()
        self._running = False
        self._guard: threading.Timer | None = None
        self.tls = tls
        self.handler = handler or Handler()
        self.auth = auth or Authenticator()
        if mode != "plain" and server_context is None:
            assert tls is not None, "a TLS mode needs certificates"
            server_context = tls.server_context()
        sock = sock or socket.create_server((HOST, 0))
        self.host, self.port = sock.getsockname()[:2]
        kwargs: dict[str, Any] = {
            "authenticator": self.auth,
            # aiosmtpd knows only STARTTLS as TLS; with implicit TLS the whole connection is encrypted.
            "auth_require_tls": auth_require_tls and mode != "tls",
            "server_hostname": server_hostname,
            "ready_timeout": 5.0,
            "timeout": lifetime,  # a client connection idle this long is dropped
        }
        if mode == "starttls":
            kwargs["tls_context"] = server_context
        elif mode == "tls":
            kwargs["ssl_context"] = server_context
        self.controller = _Controller(self.handler, sock, **kwargs)

    def smarthost(self, **values: Any) -> Smarthost:
        """A Smarthost for this server: its security mode and the test CA as ca_file."""
        values.setdefault("security", "none" if self.mode == "plain" else self.mode)
        if self.tls is not None and self.mode != "plain":
            values.setdefault("ca_file", str(self.tls.ca_file))
        return make_smarthost(self.port, **values)

    def start(self) -> SmtpServer:
        self.controller.start()
        self._running = True
        # A test that forgets to stop the server does not leave it running: it stops itself after `lifetime`.
        self._guard = threading.Timer(self.lifetime, self.stop)
        self._guard.daemon = True
        self._guard.start()
        return self

    def stop(self) -> None:
        with self._stopped:
            if not self._running:
                return
            self._running = False
            if self._guard is not None and self._guard is not threading.current_thread():
                self._guard.cancel()
            self.controller.stop(no_assert=True)

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def password_source() -> PasswordSource:
    """Where test sessions say the password lives (tests pass the secret directly, so it is never read)."""
    return PasswordSource("env", "PYMTA_TEST_PASSWORD")


# --- The scripted raw server ---


@dataclass(frozen=True)
class Send:
    """Send these lines (separated by \\n), each with CRLF."""

    text: str


@dataclass(frozen=True)
class Expect:
    """Read one command line; it must start with `verb` (case-insensitive), else the connection ends."""

    verb: str


@dataclass(frozen=True)
class ReadData:
    """Read the message text up to the line holding only a dot."""


@dataclass(frozen=True)
class Hang:
    """Answer nothing; read and discard until the client goes away or the server stops."""


@dataclass(frozen=True)
class Close:
    """Close the connection."""


@dataclass(frozen=True)
class StartTls:
    """Start TLS on the connection (after sending 220) with the server's context."""


Step = Send | Expect | ReadData | Hang | Close | StartTls


def greet(
    extensions: Sequence[str] = ("PIPELINING", "8BITMIME"), greeting: str = "220 scripted ESMTP"
) -> list[Step]:
    """The greeting and an answer to EHLO with `extensions`."""
    lines = ["250-scripted.test", *(f"250-{e}" for e in extensions)]
    lines[-1] = "250 " + lines[-1][4:]
    return [Send(greeting), Expect("EHLO"), Send("\n".join(lines))]


def accept_message(reply: str = "250 2.0.0 OK queued") -> list[Step]:
    """MAIL, one RCPT, DATA and the text, answered with `reply`."""
    return [
        Expect("MAIL"), Send("250 2.1.0 OK"), Expect("RCPT"), Send("250 2.1.5 OK"),
        Expect("DATA"), Send("354 go ahead"), ReadData(), Send(reply),
    ]  # fmt: skip


class ScriptedServer:
    """A raw SMTP server on 127.0.0.1 that plays `scripts[n]` to its n-th connection (later ones are closed).

    `lines` holds every line the client sent, `data` every message text, `errors` every unexpected command.
    """

    def __init__(
        self, *scripts: Sequence[Step], tls_context: ssl.SSLContext | None = None, lifetime: float = 15.0
    ) -> None:
        self.scripts = [list(script) for script in scripts]
        self.tls_context = tls_context
        self.lifetime = lifetime
        self.lines: list[str] = []
        self.data: list[bytes] = []
        self.errors: list[str] = []
        self.connections = 0
        self.finished = threading.Event()  # set when the last script has ended
        self._stop = threading.Event()
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def smarthost(self, **values: Any) -> Smarthost:
        values.setdefault("security", "none")
        return make_smarthost(self.port, **values)

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.lifetime + 5)
        self._listener.close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the server thread --

    def _serve(self) -> None:
        deadline = time.monotonic() + self.lifetime
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                index = self.connections
                self.connections += 1
                with conn:
                    if index < len(self.scripts):
                        self._play(conn, self.scripts[index], deadline)
                        if index == len(self.scripts) - 1:
                            self.finished.set()
        finally:
            self.finished.set()

    def _play(self, conn: socket.socket, script: list[Step], deadline: float) -> None:
        reader = _LineReader(conn, self._stop, deadline)
        try:
            for step in script:
                if isinstance(step, Send):
                    reader.sock.sendall("".join(f"{line}\r\n" for line in step.text.split("\n")).encode())
                elif isinstance(step, Expect):
                    line = reader.line()
                    if line is None:
                        return
                    text = line.decode("utf-8", "replace").rstrip("\r\n")
                    self.lines.append(text)
                    if not text.upper().startswith(step.verb.upper()):
                        self.errors.append(f"expected {step.verb}, got {text!r}")
                        return
                elif isinstance(step, ReadData):
                    chunks = []
                    while (line := reader.line()) is not None and line != b".\r\n":
                        chunks.append(line)
                    self.data.append(b"".join(chunks))
                elif isinstance(step, Hang):
                    reader.drain()
                    return
                elif isinstance(step, Close):
                    return
                elif isinstance(step, StartTls):
                    assert self.tls_context is not None
                    reader.sock = self.tls_context.wrap_socket(reader.sock, server_side=True)
                    reader.buffer = b""
        except (OSError, ssl.SSLError) as error:
            self.errors.append(f"{type(error).__name__}: {error}")
        finally:
            reader.sock.close()  # after StartTls this is the TLS socket, which `with conn` does not close


class _LineReader:
    """Lines from a socket, polling so that the server's stop and deadline are honoured."""

    def __init__(self, sock: socket.socket, stop: threading.Event, deadline: float) -> None:
        self.sock = sock
        self.stop = stop
        self.deadline = deadline
        self.buffer = b""
        sock.settimeout(0.05)

    def _recv(self) -> bytes | None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                return self.sock.recv(65536)
            except TimeoutError:
                continue
            except ssl.SSLWantReadError:
                continue
        return None

    def line(self) -> bytes | None:
        while b"\n" not in self.buffer:
            chunk = self._recv()
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def drain(self) -> None:
        while self._recv():
            pass


# --- pytest fixtures (import them into a test module to use them) ---


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA (its PEM at .ca_file) and a server certificate for 127.0.0.1 and localhost."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def smtp_server(certificates: Certificates) -> Iterator[SmtpServer]:
    """aiosmtpd with STARTTLS and AUTH (user USER, password PASSWORD), recording what it receives."""
    with SmtpServer("starttls", certificates) as server:
        yield server


@pytest.fixture
def tls_server(certificates: Certificates) -> Iterator[SmtpServer]:
    """aiosmtpd with implicit TLS (465-style) and AUTH."""
    with SmtpServer("tls", certificates) as server:
        yield server


@pytest.fixture
def plain_server() -> Iterator[SmtpServer]:
    """aiosmtpd without TLS; AUTH offered in the clear (for auth_plaintext tests)."""
    with SmtpServer("plain", auth_require_tls=False) as server:
        yield server
