"""Every fault of issue 3, each against a real server on 127.0.0.1, through the whole delivery loop.

Each test queues a message with the real `sendmail`, runs a flush and checks three things: the recipient's
outcome (deferred for 4xx, network, timeout, TLS and AUTH trouble; failed only for a 5xx to MAIL, RCPT or
DATA), a one-line `last_error` that names the cause, and that nothing is lost (the queued message is still
there, byte for byte, unless every recipient was delivered). The last test runs whole flushes and looks for
the password everywhere a run leaves traces (ARCHITECTURE.md invariant 7).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import MtaEnv, script
from mailservers import (
    HOST,
    PASSWORD,
    USER,
    Authenticator,
    Certificates,
    Close,
    Expect,
    Handler,
    Hang,
    ScriptedServer,
    Send,
    SmtpServer,
    Step,
    certificates,
    greet,
    self_signed_context,
    smtp_server,
    wait_until,
)

from pymta.config.load import load
from pymta.delivery.flush import Flusher, FlushReport
from pymta.queue.entry import QueueEntry

__all__ = ["certificates", "smtp_server"]  # fixtures imported for use

BASE_CONFIG = "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
MESSAGE = b"From: alice@example.org\nTo: a@example.net\nSubject: fault test\n\nsome text\n.a dot line\n"
THREE = ("a@example.net", "b@example.net", "c@example.net")
# Smarthost timeout for the hanging servers: every command gets this long.
SHORT_TIMEOUT = "1s"
# A flush against a server that hangs must come back within this many seconds (a few timeouts at most).
FLUSH_DEADLINE = 10.0


# --- helpers ---


def host(port: int, security: str = "none", **values: object) -> dict[str, object]:
    return {"host": HOST, "port": port, "security": security, "timeout": "3s", **values}


def tls_host(server: SmtpServer, **values: object) -> dict[str, object]:
    """A STARTTLS smarthost entry for `server`, trusting the test CA unless `ca_file` is given."""
    assert server.tls is not None
    values.setdefault("ca_file", str(server.tls.ca_file))
    if values["ca_file"] is None:
        del values["ca_file"]
    return host(server.port, "starttls", **values)


def configure(mta: MtaEnv, *hosts: dict[str, object]) -> None:
    mta.write_config(BASE_CONFIG + f"smarthosts: {json.dumps(list(hosts))}\n")


def enqueue(mta: MtaEnv, *recipients: str, env: dict[str, str] | None = None) -> str:
    result = mta.sendmail("-v", "-i", "-f", "alice@example.org", *recipients, input=MESSAGE, env=env)
    assert result.returncode == 0, result.stderr
    found = re.search(rb"queued as (\w+)", result.stderr)
    assert found, result.stderr
    return found.group(1).decode()


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_flush(mta: MtaEnv, *, force: bool = False) -> tuple[FlushReport, list[str]]:
    """One flush in-process (with `force`, as `pymta flush --now`); its report and log lines. It must return
    within FLUSH_DEADLINE."""
    logger = logging.Logger("pymta-test", logging.INFO)
    capture = LogLines()
    logger.addHandler(capture)
    started = time.monotonic()
    report = Flusher(load(str(mta.config)), logger).run(force=force)
    assert time.monotonic() - started < FLUSH_DEADLINE
    return report, capture.lines


class Queued:
    """A message queued for a fault test, and what its stored copy was before the flush."""

    def __init__(self, mta: MtaEnv, *recipients: str) -> None:
        self.mta = mta
        self.id = enqueue(mta, *recipients)
        self.stored = (mta.spool / "new" / self.id).read_bytes()

    def entry(self) -> QueueEntry:
        """The entry after the flush: still queued, byte for byte (nothing lost), tried once."""
        entries = [entry for entry in self.mta.entries() if entry.id == self.id]
        assert len(entries) == 1, "the message is no longer queued"
        assert (self.mta.spool / "queue" / self.id).read_bytes() == self.stored
        assert entries[0].attempts == 1
        return entries[0]

    def deferred(self, cause: str) -> str:
        """Assert every recipient is deferred with a one-line reason matching `cause`; the reason."""
        entry = self.entry()
        assert entry.state == "deferred"
        assert entry.next_attempt is not None and entry.next_attempt > time.time()
        error = entry.last_error or ""
        assert "\n" not in error and "\r" not in error
        assert re.search(cause, error), error
        for recipient in entry.recipients:
            assert (recipient.status, recipient.last_error) == ("deferred", error)
        return error

    def statuses(self) -> dict[str, tuple[str, str | None]]:
        return {r.address: (r.status, r.last_error) for r in self.entry().recipients}


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound, so nobody else takes it, but not listening."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


# --- the network and the server's greeting ---


def test_smarthost_down(mta: MtaEnv, closed_port: int) -> None:
    configure(mta, host(closed_port))
    message = Queued(mta, "a@example.net")
    report, lines = run_flush(mta)
    assert report.deferred == 1
    error = message.deferred(rf"127\.0\.0\.1\[127\.0\.0\.1\]:{closed_port}: connection refused")
    assert "check host: and port:" in error


def test_connection_closed_before_the_greeting(mta: MtaEnv) -> None:
    with ScriptedServer([Close()]) as server:
        configure(mta, host(server.port))
        message = Queued(mta, "a@example.net")
        run_flush(mta)
    message.deferred(r"the server closed the connection during connect|reset")


def test_hanging_after_connect(mta: MtaEnv) -> None:
    with ScriptedServer([Hang()]) as server:
        configure(mta, host(server.port, timeout=SHORT_TIMEOUT))
        messages = [Queued(mta, f"{n}@example.net") for n in range(3)]
        run_flush(mta)
    # One timeout for the run, not one per message: a smarthost that hung is not tried again this run.
    assert server.connections == 1
    for message in messages:
        message.deferred(r"no greeting within 1 s")


@pytest.mark.parametrize(
    "greeting",
    ["421 4.3.2 mx.test too busy, come back later", "554 5.7.1 mx.test no service for you"],
    ids=["421", "554"],
)
def test_server_refusing_at_the_greeting(mta: MtaEnv, greeting: str) -> None:
    with ScriptedServer([Send(greeting), Close()]) as server:
        configure(mta, host(server.port))
        message = Queued(mta, "a@example.net")
        run_flush(mta)
    # Even a 5xx greeting defers: it refuses the session, not the message or a recipient.
    message.deferred(rf"the server refused the session: {re.escape(greeting)}")


# --- faults in DATA ---


def _until_data() -> list[Step]:
    return [
        *greet(),
        Expect("MAIL"), Send("250 2.1.0 OK"), Expect("RCPT"), Send("250 2.1.5 OK"),
        Expect("DATA"), Send("354 go ahead"),
    ]  # fmt: skip


def test_hanging_in_data(mta: MtaEnv) -> None:
    with ScriptedServer([*_until_data(), Hang()]) as server:
        configure(mta, host(server.port, timeout=SHORT_TIMEOUT, data_timeout=SHORT_TIMEOUT))
        queued = [Queued(mta, "a@example.net"), Queued(mta, "b@example.net")]
        run_flush(mta)
    assert server.errors == []
    # The text may have arrived before the server hung: deferred, not failed (delivery is at-least-once),
    # with a reason that says so. The other message is tried over a new connection (which this server
    # closes at once) and records only what happened to it, not the first one's timeout.
    assert server.connections == 2
    hung = r"no answer to the end of the message text within 1 s; the smarthost may already have the message"
    refused = r"the server closed the connection during connect"
    errors = sorted(message.deferred(f"{hung}|{refused}") for message in queued)
    assert re.search(hung, errors[0]) and re.search(refused, errors[1]), errors


def test_closing_mid_data(mta: MtaEnv) -> None:
    # The server reads the first line of the text, then hangs up.
    with ScriptedServer([*_until_data(), Expect(""), Close()]) as server:
        configure(mta, host(server.port))
        message = Queued(mta, "a@example.net")
        run_flush(mta)
    assert server.errors == []
    message.deferred(
        r"(closed the connection|connection was reset) during the message text \(DATA\)"
        r"|the connection ended before the server answered the end of the message text \(DATA\)"
    )


def test_sendmail_q_flushes_with_sigpipe_ignored(mta: MtaEnv) -> None:
    """sendmail sets SIGPIPE to kill it, as it does a C program (it must not queue what a dead pipe cut).
    `sendmail -q` runs the flush in that process: a write to a smarthost that hung up must come back as
    EPIPE (the message deferred, the run finished with its last fsync), so the flush ignores SIGPIPE again,
    as Python does. Seen in /proc while the flush waits for a greeting."""
    with ScriptedServer([Hang()]) as server:
        configure(mta, host(server.port))
        Queued(mta, "a@example.net")
        flush = subprocess.Popen(
            [script("sendmail"), "-q"], env=mta.env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_until(lambda: server.connections == 1, what="the flush to connect")
            status = Path(f"/proc/{flush.pid}/status").read_text()
            found = re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M)
            assert found, status
            ignored = int(found.group(1), 16)
            assert ignored & (1 << (signal.SIGPIPE - 1)), "the flush of sendmail -q dies of SIGPIPE"
        finally:
            flush.kill()
            flush.communicate(timeout=30)


# --- answers: 451 to MAIL, 452 and 550 to RCPT, 552 to the message ---


def test_451_to_mail_defers_every_recipient(mta: MtaEnv) -> None:
    with SmtpServer("plain", handler=Handler(mail_reply="451 4.3.0 mailbox busy")) as server:
        configure(mta, host(server.port))
        message = Queued(mta, *THREE)
        report, _ = run_flush(mta)
    assert report.deferred == 3
    assert server.handler.messages == []
    message.deferred(r"^451 4\.3\.0 mailbox busy$")


def test_452_to_one_rcpt_defers_only_that_recipient(mta: MtaEnv) -> None:
    reply = "452 4.5.3 too many recipients"
    with SmtpServer("plain", handler=Handler(rejections={"b@example.net": reply})) as server:
        configure(mta, host(server.port))
        message = Queued(mta, *THREE)
        run_flush(mta)
    assert [m.rcpt_tos for m in server.handler.messages] == [["a@example.net", "c@example.net"]]
    assert message.statuses() == {
        "a@example.net": ("delivered", None),
        "b@example.net": ("deferred", reply),
        "c@example.net": ("delivered", None),
    }
    assert message.entry().state == "deferred"
    assert message.entry().last_error == reply


def test_550_to_one_of_three_rcpts_fails_only_that_recipient(mta: MtaEnv) -> None:
    reply = "550 5.1.1 <b@example.net>: recipient unknown"
    with SmtpServer("plain", handler=Handler(rejections={"b@example.net": reply})) as server:
        configure(mta, host(server.port))
        message = Queued(mta, *THREE)
        run_flush(mta)
    original, notice = server.handler.messages
    assert original.rcpt_tos == ["a@example.net", "c@example.net"]
    assert (notice.mail_from, notice.rcpt_tos) == ("<>", ["alice@example.org"])  # the bounce (issue 4)
    assert b"Final-Recipient: rfc822; b@example.net" in notice.data
    assert b"Final-Recipient: rfc822; a@example.net" not in notice.data
    assert message.statuses() == {
        "a@example.net": ("delivered", None),
        "b@example.net": ("failed", reply),
        "c@example.net": ("delivered", None),
    }
    entry = message.entry()
    assert (entry.state, entry.last_error, entry.next_attempt) == ("failed", reply, None)


def test_552_to_the_message_fails_every_recipient(mta: MtaEnv) -> None:
    reply = "552 5.3.4 message too big for the system"
    (mta.root / "aliases").write_text("postmaster: root\n")
    with SmtpServer("plain", handler=Handler(data_reply=reply)) as server:
        configure(mta, host(server.port))
        message = Queued(mta, *THREE)
        report, lines = run_flush(mta)
    assert report.failed == 4  # the three recipients, and the bounce, which this server refuses too
    # The notice about the failed bounce went to postmaster: root's mailbox (the flush runs as root here).
    assert (
        report.sent == 1
        and b"Final-Recipient: rfc822; alice@example.org" in (mta.mail_spool / "root").read_bytes()
    )
    assert message.statuses() == dict.fromkeys(THREE, ("failed", reply))
    entry = message.entry()
    assert (entry.state, entry.last_error) == ("failed", reply)  # kept, visible to the admin
    assert all(r.reported for r in entry.recipients)  # and reported to the sender in one bounce
    # the three recipients, then the bounce to alice, refused the same way (and never bounced again)
    assert sum("status=bounced (552 5.3.4" in line for line in lines) == 4


# --- TLS ---


def test_certificate_for_another_name(mta: MtaEnv, certificates: Certificates) -> None:
    context = certificates.server_context(certificates.issue("other.example"))
    with SmtpServer("starttls", certificates, server_context=context) as server:
        configure(mta, tls_host(server))
        message = Queued(mta, "a@example.net")
        run_flush(mta)
    assert server.handler.messages == []
    message.deferred(r"certificate verify failed: .*mismatch.*127\.0\.0\.1.*; write host: exactly")


def test_expired_certificate(mta: MtaEnv, certificates: Certificates) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    context = certificates.server_context(certificates.issue(HOST, "localhost", not_after=past))
    with SmtpServer("starttls", certificates, server_context=context) as server:
        configure(mta, tls_host(server))
        message = Queued(mta, "a@example.net")
        run_flush(mta)
    assert server.handler.messages == []
    message.deferred(r"certificate verify failed: certificate has expired")


def test_self_signed_certificate_needs_a_pin(mta: MtaEnv, certificates: Certificates) -> None:
    context, fingerprint = self_signed_context()
    with SmtpServer("starttls", certificates, server_context=context) as server:
        configure(mta, tls_host(server, ca_file=None))
        message = Queued(mta, "a@example.net")
        run_flush(mta)
        message.deferred(r"certificate verify failed: self[- ]signed certificate")
        assert server.handler.messages == []

        configure(mta, tls_host(server, ca_file=None, fingerprint=fingerprint))
        report, _ = run_flush(mta, force=True)  # as an admin would after pinning: pymta flush --now
    assert report.sent == 1
    assert [m.rcpt_tos for m in server.handler.messages] == [["a@example.net"]]
    assert mta.entries() == []


def test_no_starttls_offered_never_sends_in_the_clear(mta: MtaEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server offers AUTH but no STARTTLS; after EHLO it would log whatever the client sends next.
    script_ = [*greet(("PIPELINING", "8BITMIME", "AUTH PLAIN LOGIN")), Expect("QUIT"), Send("221 bye")]
    with ScriptedServer(script_) as server:
        configure(
            mta,
            host(server.port, "starttls", username=USER, password={"env": "PYMTA_TEST_SECRET"}),
        )
        message = Queued(mta, "a@example.net")
        monkeypatch.setenv("PYMTA_TEST_SECRET", PASSWORD)
        run_flush(mta)
    assert [line.split()[0].upper() for line in server.lines] == ["EHLO"]  # no MAIL, no AUTH, no QUIT
    message.deferred(r"does not offer STARTTLS, so mail and password would travel unencrypted")


# --- AUTH and password sources ---


def _password_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "smarthost.secret"
    path.write_text(text + "\n", encoding="utf-8")
    path.chmod(0o600)
    return str(path)


def test_auth_rejected(mta: MtaEnv, smtp_server: SmtpServer, tmp_path: Path) -> None:
    secret = _password_file(tmp_path, "not the password")
    configure(mta, tls_host(smtp_server, username=USER, password={"file": secret}))
    message = Queued(mta, "a@example.net")
    run_flush(mta)
    assert [a.success for a in smtp_server.auth.attempts] == [False]
    assert smtp_server.handler.messages == []
    error = message.deferred(rf"the server rejected the login of {re.escape(USER)} with AUTH PLAIN: 535")
    assert f"check username: and the password in {{file: {secret}}}" in error


def test_auth_not_offered(mta: MtaEnv, certificates: Certificates, tmp_path: Path) -> None:
    secret = _password_file(tmp_path, PASSWORD)
    with SmtpServer("starttls", certificates, handler=Handler(hide={"AUTH"})) as server:
        configure(mta, tls_host(server, username=USER, password={"file": secret}))
        message = Queued(mta, "a@example.net")
        run_flush(mta)
    assert server.handler.messages == []
    message.deferred(r"a username is configured but the server offers no AUTH after STARTTLS")


@pytest.mark.parametrize("kind", ["command", "missing file"])
def test_a_failing_password_source(mta: MtaEnv, smtp_server: SmtpServer, tmp_path: Path, kind: str) -> None:
    missing = str(tmp_path / "no-such.secret")
    source, cause = {
        "command": ({"command": "exit 3"}, r"the password command `exit 3` exited with status 3"),
        "missing file": ({"file": missing}, rf"the password file {re.escape(missing)} cannot be opened"),
    }[kind]
    configure(mta, tls_host(smtp_server, username=USER, password=source))
    message = Queued(mta, "a@example.net")
    run_flush(mta)
    assert smtp_server.auth.attempts == []
    assert smtp_server.handler.messages == []
    message.deferred(rf"cannot get the password: 127\.0\.0\.1: {cause}")


# --- the spool ---


@pytest.mark.parametrize(
    "damage",
    [
        "garbage instead of the queue file",
        "an envelope of an unknown version",
        "a state file that is not JSON",
    ],
)
def test_a_corrupt_spool_entry_is_set_aside(mta: MtaEnv, damage: str) -> None:
    with SmtpServer("plain") as server:
        configure(mta, host(server.port))
        bad = Queued(mta, "bad@example.net")
        queued = mta.spool / "queue" / bad.id
        os.rename(mta.spool / "new" / bad.id, queued)  # as the pick-up leaves it
        if damage.startswith("garbage"):
            queued.write_bytes(b"\x00\xff not a queue file at all")
        elif damage.startswith("an envelope"):
            queued.write_bytes(bad.stored.replace(b'{"v":1,', b'{"v":99,', 1))
        else:
            (mta.spool / "state" / bad.id).write_bytes(b'{"state": "deferred", "recipi')
        kept = queued.read_bytes()
        good = Queued(mta, "good@example.net")

        report, lines = run_flush(mta)

    assert [m.rcpt_tos for m in server.handler.messages] == [["good@example.net"]]
    assert (report.attempted, report.sent) == (1, 1)
    assert (mta.spool / "corrupt" / bad.id).read_bytes() == kept  # set aside for the admin, not dropped
    assert not queued.exists()
    assert not (mta.spool / "state" / bad.id).exists()
    [line] = [line for line in lines if bad.id in line]
    assert re.fullmatch(rf"id={bad.id} cannot read the queued message \(.+\); moved to corrupt/", line)
    assert good.id not in os.listdir(mta.spool / "queue")
    assert mta.entries() == []


# --- secrets never leak (ARCHITECTURE.md invariant 7) ---


class SlowHandler(Handler):
    """A server that takes a moment over each message: the flush runs long enough to be watched."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(0.3)
        return await super().handle_DATA(server, session, envelope)


def _watch_argv(process: subprocess.Popen[bytes]) -> list[bytes]:
    """Every distinct /proc/PID/cmdline the process showed until it ended (polled, with a deadline)."""
    seen: list[bytes] = []
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline and cmdline not in seen:
            seen.append(cmdline)
    return seen


def _needles() -> dict[str, bytes]:
    password = PASSWORD.encode("utf-8")
    return {
        "the password": password,
        "the password as JSON writes it": json.dumps(PASSWORD)[1:-1].encode(),
        "its base64 (AUTH LOGIN)": base64.b64encode(password),
        "the base64 AUTH PLAIN string": base64.b64encode(b"\0" + USER.encode() + b"\0" + password),
    }


@pytest.mark.parametrize("source", ["env", "file"])
@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "rejected"])
def test_the_password_appears_nowhere(
    mta: MtaEnv, certificates: Certificates, tmp_path: Path, source: str, accepted: bool
) -> None:
    handler = SlowHandler(
        rejections={"later@example.net": "451 4.3.0 try later", "bad@example.net": "550 5.1.1 no such user"}
    )
    auth = Authenticator() if accepted else Authenticator(password="another " + PASSWORD)
    env = dict(mta.env)
    if source == "env":
        password: dict[str, str] = {"env": "PYMTA_TEST_SECRET"}
        env["PYMTA_TEST_SECRET"] = PASSWORD
    else:
        password = {"file": _password_file(tmp_path, PASSWORD)}
    with SmtpServer("starttls", certificates, handler=handler, auth=auth) as server:
        configure(mta, tls_host(server, username=USER, password=password))
        queue_id = enqueue(mta, "now@example.net", "later@example.net", "bad@example.net", env=env)
        process = subprocess.Popen(
            [script("pymta"), "flush", "-v"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        argvs = _watch_argv(process)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr

    # The run did what it should: AUTH was tried with the real password, and the outcome matches.
    assert [a.success for a in auth.attempts] == [accepted]
    assert any(b"flush" in argv for argv in argvs), argvs
    text = stderr.decode()
    if accepted:
        assert [m.rcpt_tos for m in handler.messages] == [["now@example.net"], ["alice@example.org"]]
        assert "status=sent" in text and "status=deferred (451" in text and "status=bounced (550" in text
    else:
        assert handler.messages == []
        assert "rejected the login" in text and "status=sent" not in text
    assert (mta.spool / "queue" / queue_id).exists()
    assert (mta.spool / "state" / queue_id).exists()

    listing = mta.run("pymta", ["queue", "--json"], env=env)
    assert listing.returncode == 0
    traces: dict[str, bytes] = {"stdout": stdout, "stderr": stderr, "queue --json": listing.stdout}
    traces.update((f"argv {n}", argv) for n, argv in enumerate(argvs))
    for path in sorted(mta.spool.rglob("*")):
        traces[f"name of {path}"] = str(path).encode()
        if path.is_file():
            traces[str(path)] = path.read_bytes()
    assert any("/state/" in name for name in traces)
    for what, needle in _needles().items():
        for where, blob in traces.items():
            assert needle not in blob, f"{what} appears in {where}"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (as root, in a mount namespace)")
def test_sendmail_leaves_the_flush_room_to_drain_a_nearly_full_spool(mta: MtaEnv) -> None:
    """Found by the torture suite: sendmail filled the spool to its last 256 KiB, after which every flush
    refused to deliver (it records what it delivers) and nothing could drain the queue. Now sendmail keeps
    SUBMIT_MIN_FREE free: it refuses with 75 and queues nothing, and the flush still delivers."""
    small = mta.root / "small"
    small.mkdir()
    mta.spool = small / "spool"
    mta.write_config("domain: example.org\nhostname: mx.example.org\ndeliver: queue\n")
    steps = f"""
        set -e
        mount -t tmpfs -o size=4m tmpfs {small}
        printf 'Subject: before\n\nqueued while there was room\n' | {script("sendmail")} root
        dd if=/dev/zero of={small}/ballast bs=64k 2>/dev/null || true
        truncate -s -600K {small}/ballast
        set +e
        printf 'Subject: after\\n\\nno room\\n' | {script("sendmail")} root; echo "sendmail=$?"
        ls {mta.spool}/new | wc -l | sed 's/^/new=/'
        {script("pymta")} flush; echo "flush=$?"
        find {mta.spool}/queue {mta.spool}/new -type f | wc -l | sed 's/^/left=/'
    """
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", steps],
        capture_output=True, text=True, env=mta.env, timeout=60,
    )  # fmt: skip
    assert "sendmail=75" in result.stdout, result
    assert "stay free for the deliveries that empty it" in result.stderr
    assert "new=1" in result.stdout  # the one queued on the tmpfs before it filled up; nothing more
    assert "flush=0" in result.stdout, result
    assert "left=0" in result.stdout, result
    assert b"queued while there was room" in (mta.mail_spool / "root").read_bytes()
