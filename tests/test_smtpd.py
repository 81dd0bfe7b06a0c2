"""`sendmail -bs`: SMTP on standard input and output, through the installed script as a real process.

Driven over pipes (as Symfony Mailer, SwiftMailer and Laravel run it), by `smtplib` over a socketpair, and
through a tiny loopback accept loop that hands each connection to a `sendmail -bs` as its stdin and stdout,
which is what examples/pymta-smtpd.socket does. Every queued message is checked in the spool: the same
envelope as plain sendmail writes, the message as it came (dot-unstuffed, CRLF). A few tests run the
session in-process where a real process would be slow to show it (the idle timeout).
"""

from __future__ import annotations

import os
import pwd
import select
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import MtaEnv, script

from pymta.config.limits import DEFAULT_MAX_MESSAGE_SIZE
from pymta.errors import EX_OK, EX_TEMPFAIL, EX_USAGE, SpoolFullError
from pymta.submission import smtpd
from pymta.submission.smtpd import Session

ROOT = Path(__file__).resolve().parent.parent
LOGIN = pwd.getpwuid(os.getuid()).pw_name
DEADLINE = 30.0


class Client:
    """The client side of a dialogue on raw descriptors: send lines, read whole replies (with a deadline)."""

    def __init__(self, read_fd: int, write: object) -> None:
        self.read_fd = read_fd
        self.write = write
        self.buffer = b""

    def send(self, data: bytes) -> None:
        if isinstance(self.write, int):
            view = memoryview(data)
            while view:
                view = view[os.write(self.write, view) :]
        else:
            self.write.write(data)  # type: ignore[attr-defined]
            self.write.flush()  # type: ignore[attr-defined]

    def line(self) -> bytes:
        deadline = time.monotonic() + DEADLINE
        while b"\r\n" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.read_fd], [], [], left)[0], (
                f"no reply; got {self.buffer!r}"
            )
            chunk = os.read(self.read_fd, 65536)
            assert chunk, f"the server closed the connection; got {self.buffer!r}"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        """The next reply: its code and its text (the lines of a multi-line reply joined by newlines)."""
        texts = []
        while True:
            line = self.line().decode()
            texts.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(texts)

    def expect(self, code: int, words: str = "") -> str:
        got, text = self.reply()
        assert (got, words in text) == (code, True), f"expected {code} {words!r}, got {got} {text!r}"
        return text

    def command(self, line: str, code: int, words: str = "") -> str:
        self.send(line.encode() + b"\r\n")
        return self.expect(code, words)

    def rest(self) -> bytes:
        """Everything until the server closes its side."""
        deadline = time.monotonic() + DEADLINE
        data = self.buffer
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.read_fd], [], [], left)[0], "the server did not close"
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return data
            data += chunk


@contextmanager
def session(mta: MtaEnv, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Client]]:
    """`sendmail -bs ARGS` with pipes, greeted; at the end its stdin is closed and it is waited for."""
    with subprocess.Popen(
        [script("sendmail"), "-bs", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=mta.env,
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        client = Client(process.stdout.fileno(), process.stdin)
        client.expect(220, "mx.example.org ESMTP pymta")
        try:
            yield process, client
        finally:
            if not process.stdin.closed:
                process.stdin.close()
            process.wait(timeout=DEADLINE)


def send_message(client: Client, sender: str, recipients: list[str], text: bytes) -> str:
    """One transaction, answer by answer; returns the queue id from `250 ... queued as ID`."""
    client.command(f"MAIL FROM:<{sender}>", 250, "2.1.0")
    for recipient in recipients:
        client.command(f"RCPT TO:<{recipient}>", 250, "2.1.5")
    client.command("DATA", 354)
    client.send(text + b".\r\n")
    return client.expect(250, "2.0.0 Ok: queued as ").rsplit(" ", 1)[1]


MESSAGE_1 = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: one\r\n\r\nfirst body\r\n"
MESSAGE_2 = b"Subject: two\r\n\r\nsecond body\r\n"


# --- A whole session ---


def test_a_session_queues_two_messages_with_the_envelopes_sendmail_writes(mta: MtaEnv) -> None:
    with session(mta) as (process, client):
        ehlo = client.command("EHLO client.example.org", 250)
        assert ehlo.splitlines() == [
            "mx.example.org",
            "PIPELINING",
            "SIZE 35000000",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        first = send_message(client, "alice@example.org", ["bob@example.net", "root"], MESSAGE_1)
        second = send_message(client, "", ["carol@example.net"], MESSAGE_2)
        client.command("QUIT", 221, "2.0.0")
        assert client.rest() == b""
    assert process.returncode == EX_OK
    entries = {entry.id: entry for entry in mta.entries()}
    assert sorted(entries) == sorted([first, second])
    one, two = entries[first], entries[second]
    assert (one.sender, [r.address for r in one.recipients]) == (
        "alice@example.org",
        ["bob@example.net", "root"],
    )
    assert (two.sender, [r.address for r in two.recipients]) == ("", ["carol@example.net"])
    for entry in (one, two):
        # the real user running sendmail, as plain sendmail records it (the socket unit's user, there)
        assert (entry.submitted_by, entry.uid, entry.location) == (LOGIN, os.getuid(), "new")
    assert mta.message(one) == MESSAGE_1
    assert mta.message(two) == MESSAGE_2


def test_the_same_message_is_stored_as_plain_sendmail_stores_it(mta: MtaEnv) -> None:
    text = b"Subject: same\nBcc: hidden@example.net\nTo: x@example.net\n\nbody\n"
    assert mta.sendmail("-i", "x@example.net", input=text).returncode == 0
    with session(mta) as (_, client):
        client.command("HELO me", 250, "mx.example.org")
        send_message(client, LOGIN, ["x@example.net"], text.replace(b"\n", b"\r\n"))
        client.command("QUIT", 221)
    plain, smtp = mta.entries()
    assert mta.message(plain) == mta.message(smtp)  # Bcc gone from both, CRLF in both
    for field in ("sender", "submitted_by", "uid", "full_name", "body_type"):
        assert getattr(plain, field) == getattr(smtp, field), field


def test_dots_are_unstuffed(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        send_message(
            client,
            "a@example.org",
            ["b@example.net"],
            b"Subject: dots\r\n\r\n..\r\n...\r\n..leading\r\n.x\r\n",
        )
        client.command("QUIT", 221)
    assert mta.message(mta.only_entry()) == b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nx\r\n"


def test_pipelined_commands_are_answered_in_order(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("EHLO me", 250, "PIPELINING")
        client.send(
            b"MAIL FROM:<a@example.org> SIZE=40\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<not an address>\r\n"
            b"RCPT TO:<c@example.net>\r\nDATA\r\n"
        )
        for code in (250, 250, 553, 250, 354):
            client.expect(code)
        client.send(
            b"Subject: p\r\n\r\npipelined\r\n.\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n"
        )
        for code in (250, 250, 250, 250, 354):
            client.expect(code)
        client.send(b"second\r\n.\r\nQUIT\r\n")
        client.expect(250, "queued as")
        client.expect(221)
    first, second = sorted(mta.entries(), key=lambda entry: entry.sender, reverse=True)
    assert [r.address for r in first.recipients] == ["b@example.net", "c@example.net"]
    assert [r.address for r in second.recipients] == ["d@example.net"]
    assert mta.message(second) == b"second\r\n"


def test_a_whole_dialogue_written_at_once_works_like_a_script_would_send_it(mta: MtaEnv) -> None:
    script_text = (
        b"HELO me\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n"
        b".\r\nQUIT\r\n"
    )
    result = mta.run("sendmail", ["-bs"], input=script_text)
    assert result.returncode == 0, result.stderr
    codes = [line[:3] for line in result.stdout.split(b"\r\n") if line]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert mta.message(mta.only_entry()) == b"Subject: s\r\n\r\nhi\r\n"


def test_rset_ends_the_transaction_and_nothing_is_queued_for_it(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<b@example.net>", 250)
        client.command("RSET", 250, "2.0.0")
        client.command("DATA", 503, "5.5.1")
        client.command("MAIL FROM:<c@example.org>", 250)  # no "nested MAIL": the RSET ended the first
        client.command("MAIL FROM:<c@example.org>", 503, "nested MAIL")
        client.command("RCPT TO:<d@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"x\r\n.\r\n")
        client.expect(250)
        client.command("QUIT", 221)
    entry = mta.only_entry()
    assert (entry.sender, [r.address for r in entry.recipients]) == ("c@example.org", ["d@example.net"])


def test_commands_out_of_order_get_503(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("RCPT TO:<b@example.net>", 503, "5.5.1 need MAIL")
        client.command("DATA", 503, "5.5.1 need MAIL")
        client.command("MAIL FROM:<a@example.org>", 250)  # HELO is not required (Postfix's default)
        client.command("DATA", 503, "5.5.1 need RCPT")
        client.command("EHLO me", 250)  # EHLO resets the transaction
        client.command("RCPT TO:<b@example.net>", 503)
        client.command("QUIT", 221)
    assert mta.entries() == []


def test_bad_recipients_and_senders_get_553_and_the_session_goes_on(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        client.command("MAIL FROM:<a@@example.org>", 553, "5.1.7 bad sender address")
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<two words@example.net>", 553, "5.1.3")
        client.command("RCPT TO:<>", 553, "null address")
        client.command("RCPT TO:<a@example.net, b@example.net>", 553, "5.1.3")
        client.command("RCPT TO:<b@example.net> NOTIFY=NEVER", 555, "5.5.4")
        client.command("RCPT TO b@example.net", 501, "5.5.4 Syntax")
        client.command("RCPT TO:<Postmaster>", 250)
        client.command("DATA", 354)
        client.send(b"x\r\n.\r\n")
        client.expect(250)
        client.command("QUIT", 221)
    assert [r.address for r in mta.only_entry().recipients] == ["Postmaster"]


def test_lenient_paths_and_parameters(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("ehlo me", 250)
        client.command("mail from: <a@example.org> body=8bitmime", 250)
        client.command("rcpt to:b@example.net", 250)
        client.command("data", 354)
        client.send(b"caf\xc3\xa9\r\n.\r\n")
        client.expect(250)
        client.command("MAIL FROM:<x@example.org> BODY=BINARYMIME", 555, "BODY=")
        client.command("MAIL FROM:<x@example.org> SIZE=big", 501, "SIZE=")
        client.command("MAIL FROM:<x@example.org> AUTH=<>", 555, "not supported: AUTH")
        client.command("MAIL FROM:<x@example.org", 501, "unterminated")
        client.command("QUIT", 221)
    assert mta.only_entry().body_type == "8BITMIME"


def test_smtputf8_addresses_need_the_parameter(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        client.command("MAIL FROM:<jörg@example.org>", 553, "5.6.7")
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<müller@example.net>", 553, "5.6.7")
        client.command("RSET", 250)
        client.command("MAIL FROM:<jörg@example.org> SMTPUTF8", 250)
        client.command("RCPT TO:<müller@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"x\r\n.\r\n")
        client.expect(250)
        client.command("QUIT", 221)
    entry = mta.only_entry()
    assert (entry.sender, entry.recipients[0].address) == ("jörg@example.org", "müller@example.net")


def test_the_other_commands(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("NOOP", 250, "2.0.0")
        client.command("VRFY root", 252, "2.0.0")
        client.command("VRFY", 501)
        client.command("HELP", 214, "EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
        client.command("EXPN staff", 502, "5.5.1 EXPN is not implemented")
        client.command("STARTTLS", 502, "5.5.1")
        client.command("AUTH PLAIN AGFsaWNlAHNlY3JldA==", 502, "5.5.1")
        client.command("FROB", 500, "5.5.2 command not recognized")
        client.command("", 500, "5.5.2")
        client.command("EHLO", 501, "5.5.4")
        client.command("HELO", 501, "5.5.4")
        client.command("DATA now", 501, "5.5.4")
        client.command("X" * 3000, 500, "line too long")
        client.command("QUIT", 221, "2.0.0")


def test_recipients_on_the_command_line_are_a_usage_error(mta: MtaEnv) -> None:
    result = mta.sendmail("-bs", "root", input=b"QUIT\r\n")
    assert result.returncode == EX_USAGE
    assert b"RCPT TO" in result.stderr and result.stdout == b""


def test_laravel_flags_are_accepted(mta: MtaEnv) -> None:
    with session(mta, "-i") as (process, client):  # Laravel: 'path' => '/usr/sbin/sendmail -bs -i'
        client.command("EHLO [127.0.0.1]", 250)
        send_message(client, "app@example.org", ["user@example.net"], MESSAGE_2)
        client.command("QUIT", 221)
    assert process.returncode == 0
    assert len(mta.entries()) == 1


# --- Limits ---


def test_oversize_messages_get_552_and_are_not_queued(mta: MtaEnv) -> None:
    mta.write_config("domain: example.org\nhostname: mx.example.org\ndeliver: queue\nmax_message_size: 1k\n")
    with session(mta) as (_, client):
        client.command("EHLO me", 250, "SIZE 1000")
        client.command("MAIL FROM:<a@example.org> SIZE=5000", 552, "5.3.4")
        client.command("MAIL FROM:<a@example.org> SIZE=500", 250)
        client.command("RCPT TO:<b@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"Subject: big\r\n\r\n" + b"0123456789\r\n" * 100 + b".\r\n")
        client.expect(552, "5.3.4 the message is larger than the limit of 1000 octets")
        assert mta.entries() == []
        small = send_message(client, "a@example.org", ["b@example.net"], b"x" * 900 + b"\r\n")  # 902 octets
        client.command("QUIT", 221)
    assert mta.only_entry().id == small


def test_a_line_over_998_octets_gets_552_and_is_not_queued(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<b@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"Subject: long\r\n\r\nshort\r\n" + b"y" * 999 + b"\r\n" + b"z" * 5000 + b"\r\n.\r\n")
        client.expect(552, "line 4 is longer than 998 octets")
        assert mta.entries() == []
        longest = b"Subject: ok\r\n\r\n" + b"y" * 998 + b"\r\n"
        send_message(client, "a@example.org", ["b@example.net"], longest)
        client.command("QUIT", 221)
    assert mta.message(mta.only_entry()) == longest


def test_too_many_errors_end_the_session_with_421(mta: MtaEnv) -> None:
    with session(mta) as (process, client):
        for _ in range(smtpd.MAX_ERRORS - 1):
            client.command("FROB", 500)
        client.send(b"FROB\r\n")
        client.expect(500)
        client.expect(421, "4.7.0 mx.example.org too many errors")
        assert client.rest() == b""
    assert process.returncode == EX_TEMPFAIL


@pytest.mark.parametrize("line", ["GET / HTTP/1.1", "POST /submit HTTP/1.0", "Host: 127.0.0.1:25"])
def test_http_requests_are_refused_at_once(mta: MtaEnv, line: str) -> None:
    with session(mta) as (process, client):
        client.command(line, 421, "4.7.0")
        assert client.rest() == b""
    assert process.returncode == EX_TEMPFAIL


# --- SMTP smuggling and cut-off input ---


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n"], ids=["LF.LF", "CRLF.LF", "LF.CRLF"])
def test_only_crlf_dot_crlf_ends_data(mta: MtaEnv, fake_end: bytes) -> None:
    smuggled = b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nfake\r\n"
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<b@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"Subject: smuggle\r\n\r\nbody" + fake_end + smuggled + b".\r\n")
        client.expect(250, "queued as")  # one message: the fake end and what follows are its text
        client.command("QUIT", 221)
    entry = mta.only_entry()
    assert [r.address for r in entry.recipients] == ["b@example.net"]
    stored = mta.message(entry)
    assert stored == b"Subject: smuggle\r\n\r\nbody\r\n.\r\n" + smuggled  # bare LFs stored as CRLF


def test_bare_lf_lines_are_accepted_and_stored_with_crlf(mta: MtaEnv) -> None:
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        send_message(client, "a@example.org", ["b@example.net"], b"Subject: lf\n\nline one\nline two\r\n")
        client.command("QUIT", 221)
    assert mta.message(mta.only_entry()) == b"Subject: lf\r\n\r\nline one\r\nline two\r\n"


def test_a_closed_stdin_in_the_middle_of_data_queues_nothing(mta: MtaEnv) -> None:
    with session(mta) as (process, client):
        client.command("EHLO me", 250)
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<b@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"Subject: cut\r\n\r\nhalf a mess")
        assert process.stdin is not None and process.stderr is not None
        process.stdin.close()
        assert client.rest() == b""
        process.wait(timeout=DEADLINE)
        assert process.stderr.read() == f"sendmail: {smtpd.INCOMPLETE_DATA}\n".encode()  # one line: why
    assert process.returncode == EX_TEMPFAIL
    assert mta.entries() == []
    assert [path for path in mta.spool.rglob("*") if path.is_file()] == []  # not even in tmp/


def test_a_killed_session_queues_nothing_and_what_was_confirmed_stays(mta: MtaEnv) -> None:
    with session(mta) as (process, client):
        client.command("EHLO me", 250)
        kept = send_message(client, "a@example.org", ["b@example.net"], MESSAGE_2)
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<b@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"Subject: cut\r\n\r\nhalf\r\n")
        process.kill()
    assert [entry.id for entry in mta.entries()] == [kept]


# --- A broken spool ---


def test_a_broken_spool_answers_451_with_the_reason_and_the_session_goes_on(mta: MtaEnv) -> None:
    good = mta.config.read_text()
    mta.config.write_text(good.replace(f"spool: {mta.spool}", f"spool: {mta.root}/missing/spool"))
    with session(mta) as (_, client):
        client.command("EHLO me", 250)
        client.command("MAIL FROM:<a@example.org>", 250)
        client.command("RCPT TO:<b@example.net>", 250)
        client.command("DATA", 354)
        client.send(b"Subject: first\r\n\r\nx\r\n.\r\n")
        client.expect(451, f"4.3.0 not queued: cannot create the spool {mta.root}/missing/spool")
        mta.config.write_text(good)  # the admin fixes it; the client tries again in the same session
        send_message(client, "a@example.org", ["b@example.net"], b"Subject: again\r\n\r\nx\r\n")
        client.command("QUIT", 221)
    assert mta.message(mta.only_entry()).startswith(b"Subject: again")


# --- Real clients ---


def test_the_symfony_mailer_dialogue(mta: MtaEnv) -> None:
    """Symfony Mailer's SmtpTransport over `sendmail -bs` (SwiftMailer's is the same shape): EHLO with an
    address literal, MAIL, RCPT, DATA with the message dot-stuffed and CRLF, and QUIT when it is done."""
    message = (
        b"From: app@example.org\r\nTo: user@example.net\r\nSubject: Welcome\r\n"
        b"Message-ID: <abc@example.org>\r\n"
        b"MIME-Version: 1.0\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Hello,\r\n..\r\nBye\r\n"
    )
    with session(mta) as (process, client):
        client.command("EHLO [127.0.0.1]", 250)
        client.command("MAIL FROM:<app@example.org>", 250)
        client.command("RCPT TO:<user@example.net>", 250)
        client.command("DATA", 354)
        client.send(message + b"\r\n.\r\n")  # Symfony writes the end as "\r\n.\r\n" after the last CRLF
        client.expect(250)
        client.command("QUIT", 221)
    assert process.returncode == 0
    entry = mta.only_entry()
    assert (entry.sender, [r.address for r in entry.recipients]) == ("app@example.org", ["user@example.net"])
    assert mta.message(entry) == message.replace(b"\r\n..\r\n", b"\r\n.\r\n") + b"\r\n"


def test_smtplib_sendmail_over_a_socketpair(mta: MtaEnv) -> None:
    message = b"From: a@example.org\r\nSubject: smtplib\r\n\r\n.leading dot\r\nend\r\n"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with subprocess.Popen(
            [script("sendmail"), "-bs"], stdin=theirs.fileno(), stdout=theirs.fileno(), env=mta.env
        ) as process:
            theirs.close()
            client = smtplib.SMTP(local_hostname="client.example.org")
            client.sock = ours
            try:
                assert client.getreply()[0] == 220
                refused = client.sendmail("a@example.org", ["b@example.net", "a@@b"], message)
                assert list(refused) == ["a@@b"] and refused["a@@b"][0] == 553
                client.quit()
            finally:
                client.close()
                ours.close()  # the session sees the end of input even when an assertion failed
        assert process.returncode == 0
    entry = mta.only_entry()
    assert [r.address for r in entry.recipients] == ["b@example.net"]
    assert mta.message(entry) == message


def test_a_loopback_listener_hands_each_connection_to_sendmail_bs(mta: MtaEnv) -> None:
    """What pymta-smtpd.socket does (Accept=yes): the accepted connection is the session's stdin and stdout.
    monit and rsyslog's ommail say HELO, not EHLO."""
    processes: list[subprocess.Popen[bytes]] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            connection, _ = listener.accept()
            with connection:
                processes.append(
                    subprocess.Popen(
                        [script("sendmail"), "-bs"],
                        stdin=connection.fileno(),
                        stdout=connection.fileno(),
                        env=mta.env,
                    )
                )

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="monit.local", timeout=DEADLINE) as client:
            assert client.helo("monit.local")[0] == 250
            client.sendmail("monit@example.org", ["root"], b"Subject: monit alert\r\n\r\nDisk full\r\n")
        acceptor.join(DEADLINE)
    assert processes[0].wait(timeout=DEADLINE) == 0
    entry = mta.only_entry()
    assert (entry.sender, entry.submitted_by, [r.address for r in entry.recipients]) == (
        "monit@example.org",
        LOGIN,
        ["root"],
    )
    assert mta.message(entry) == b"Subject: monit alert\r\n\r\nDisk full\r\n"


# --- In-process: the idle timeout and spool answers, without waiting 5 minutes ---


@contextmanager
def pipes() -> Iterator[tuple[int, int, int, int]]:
    client_to_server = os.pipe()
    server_to_client = os.pipe()
    try:
        yield client_to_server[0], client_to_server[1], server_to_client[0], server_to_client[1]
    finally:
        for fd in (*client_to_server, *server_to_client):
            try:
                os.close(fd)
            except OSError:
                pass


def run_in_process(data: bytes, queue: Callable[..., str], timeout: float = 0.3) -> tuple[int, bytes]:
    """A Session on pipes that hold `data` and then never more: it ends by QUIT or by the idle timeout."""
    with pipes() as (server_in, client_out, client_in, server_out):
        os.write(client_out, data)
        code = Session(
            server_in, server_out, hostname="h.test", max_size=1000, queue=queue, timeout=timeout
        ).run()
        os.close(server_out)
        output = b""
        while chunk := os.read(client_in, 65536):
            output += chunk
    return code, output


def recorder(calls: list[object]) -> Callable[..., str]:
    def queue(*args: object) -> str:
        calls.append(args)
        return "ID"

    return queue


def test_the_idle_timeout_is_five_minutes_and_ends_the_session_with_421() -> None:
    assert smtpd.IDLE_TIMEOUT == 300
    code, output = run_in_process(b"EHLO me\r\n", recorder([]))
    assert code == EX_TEMPFAIL
    assert output.endswith(b"\r\n421 4.4.2 h.test nothing received for 0.3s; closing\r\n")


def test_a_timeout_inside_data_queues_nothing() -> None:
    calls: list[object] = []
    dialogue = b"HELO me\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nSubject: t\r\n\r\nhalf"
    code, output = run_in_process(dialogue, recorder(calls))
    assert (code, calls) == (EX_TEMPFAIL, [])
    assert output.split(b"\r\n")[-2].startswith(b"421 4.4.2")


def test_a_full_disk_answers_452_and_the_session_goes_on() -> None:
    def full(*args: object) -> str:
        raise SpoolFullError(
            "cannot write the message to the spool /s: No space left on device; free some space"
        )

    dialogue = b"HELO me\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n"
    code, output = run_in_process(dialogue, full)
    lines = output.split(b"\r\n")
    assert code == EX_OK
    assert lines[-4].startswith(
        b"452 4.3.1 not queued: cannot write the message to the spool /s: No space left"
    )
    assert lines[-3:] == [b"250 2.0.0 Ok", b"221 2.0.0 h.test closing", b""]


def test_the_default_size_limit_is_the_configs() -> None:
    assert smtpd.DEFAULT_MAX_SIZE == DEFAULT_MAX_MESSAGE_SIZE


def test_sendmail_imports_the_smtp_module_only_for_bs(mta: MtaEnv) -> None:
    result = subprocess.run(
        [script("python"), "-X", "importtime", script("sendmail"), "root"],
        input=b"Subject: x\n\nx\n",
        capture_output=True,
        env=mta.env,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    assert b"pymta.cli.sendmail" in result.stderr and b"pymta.submission.smtpd" not in result.stderr


# --- The systemd units: loopback only, one sendmail -bs per connection ---


def unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (ROOT / "examples" / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_socket_unit_listens_on_loopback_only_and_accepts_each_connection() -> None:
    socket_unit = unit("pymta-smtpd.socket")
    assert socket_unit["ListenStream"] == ["127.0.0.1:25", "[::1]:25"]
    assert not any(key.startswith("Listen") and key != "ListenStream" for key in socket_unit)
    assert socket_unit["Accept"] == ["yes"]
    assert socket_unit["IPAddressDeny"] == ["any"] and socket_unit["IPAddressAllow"] == ["localhost"]


def test_the_service_runs_sendmail_bs_on_the_socket_as_an_unprivileged_user() -> None:
    service = unit("pymta-smtpd@.service")
    assert service["ExecStart"] == ["/usr/sbin/sendmail -bs"]
    assert service["StandardInput"] == ["socket"] and service["StandardOutput"] == ["socket"]
    assert service["User"] == ["pymta-smtpd"] and "DynamicUser" not in service
    assert service["PrivateNetwork"] == ["yes"]  # it never opens a connection of its own
    text = (ROOT / "man" / "sendmail.8").read_text()
    assert "pymta\\-smtpd.socket" in text and "submitted by" in text
