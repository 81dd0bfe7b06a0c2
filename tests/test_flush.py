"""`pymta flush` end to end: queued with the real `sendmail`, delivered to real servers on 127.0.0.1.

The main paths run the console scripts; where time must move, a `Flusher` runs in-process with a clock and a
jitter the test controls. Every test checks what the server received and what the spool says afterwards.
"""

from __future__ import annotations

import errno
import json
import logging
import mailbox
import os
import pty
import pwd
import random
import re
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MtaEnv, nested_multipart, script
from mailservers import (
    HOST,
    PASSWORD,
    USER,
    Close,
    Expect,
    ReadData,
    ScriptedServer,
    Send,
    SmtpServer,
    Step,
    accept_message,
    certificates,
    greet,
    smtp_server,
    wait_until,
)

from pymta.config.load import load
from pymta.delivery.flush import Flusher
from pymta.queue.directory import encode_json, new_id
from pymta.queue.entry import QueueEntry
from pymta.queue.spool import STALE_TMP_AGE, Spool

__all__ = ["certificates", "smtp_server"]  # fixtures imported for use

MESSAGE = (
    b"To: root\n"
    b"Cc: Bob <bob@example.net>\n"
    b"Bcc: carol@example.net\n"
    b"Subject: flush test\n"
    b"\n"
    b"first line\n"
    b".leading dot\n"
    b"caf\xc3\xa9 8-bit, trailing space \n"
)
# The body as the wire carries it: CRLF line endings, the 8-bit bytes and the leading dot untouched.
BODY = b"first line\r\n.leading dot\r\ncaf\xc3\xa9 8-bit, trailing space \r\n"
SIMPLE = b"Subject: hello\n\nhello\n"
BASE_CONFIG = "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"


# --- helpers ---


def plain_host(port: int, **values: object) -> dict[str, object]:
    """A smarthost entry for a plain-text test server, with a short timeout."""
    return {"host": HOST, "port": port, "security": "none", "timeout": "3s", **values}


def configure(mta: MtaEnv, *hosts: dict[str, object], extra: str = "", base: str = BASE_CONFIG) -> None:
    """Write the config: the base settings, the smarthosts (JSON is YAML) and any extra keys."""
    text = base + (f"smarthosts: {json.dumps(list(hosts))}\n" if hosts else "")
    mta.write_config(text + extra)


def enqueue(mta: MtaEnv, *args: str, message: bytes = SIMPLE) -> str:
    """Queue one message with the real sendmail; its queue id."""
    result = mta.sendmail("-v", "-i", *args, input=message)
    assert result.returncode == 0, result.stderr
    found = re.search(rb"queued as (\w+)", result.stderr)
    assert found, result.stderr
    return found.group(1).decode()


def enqueue_in_order(mta: MtaEnv, *recipients: str) -> list[str]:
    """Queue one message per recipient, each in a later second than the one before, so the flush takes
    them in this order (ids order by the second they were made in)."""
    ids: list[str] = []
    for recipient in recipients:
        if ids:
            second = int(ids[-1][:8], 16)
            wait_until(lambda second=second: int(time.time()) > second, what="the next second")
        ids.append(enqueue(mta, recipient))
    assert ids == sorted(ids)
    return ids


def flush(mta: MtaEnv, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """`pymta flush -v` as a real process; it must exit 0."""
    result = mta.run("pymta", ["flush", "-v", *args], timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


def log_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stderr.decode().splitlines()


def state_of(mta: MtaEnv, queue_id: str) -> dict[str, object]:
    """The raw delivery state of a queued message (state/ID)."""
    data: dict[str, object] = json.loads((mta.spool / "state" / queue_id).read_text())
    return data


def recipients_of(state: dict[str, object]) -> dict[str, dict[str, str | None]]:
    recipients = state["recipients"]
    assert isinstance(recipients, dict)
    return recipients


def queue_json(mta: MtaEnv) -> list[dict[str, object]]:
    result = mta.run("pymta", ["queue", "--json"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    listing: list[dict[str, object]] = json.loads(result.stdout)
    return listing


def spool_files(mta: MtaEnv, directory: str) -> list[str]:
    path = mta.spool / directory
    return sorted(os.listdir(path)) if path.exists() else []


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def flusher(
    mta: MtaEnv, clock: Clock | None = None, jitter: float | Callable[[], float] = 0.5
) -> tuple[Flusher, list[str]]:
    """An in-process Flusher on the test's config, logging into a list. `jitter` is what the random source
    returns (0.5: the interval itself, 0: 10% less, towards 1: 10% more), or a random source."""
    logger = logging.Logger("pymta-test", logging.INFO)
    capture = LogLines()
    logger.addHandler(capture)
    source = jitter if callable(jitter) else lambda: jitter
    return Flusher(load(str(mta.config)), logger, clock=clock or Clock(), jitter=source), capture.lines


@pytest.fixture
def plain() -> Iterator[SmtpServer]:
    """aiosmtpd without TLS or AUTH: a relay on a trusted network."""
    with SmtpServer("plain") as server:
        yield server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else gets it) but not listening."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


# --- the main path ---


def test_starttls_auth_delivery_through_the_console_scripts(
    mta: MtaEnv, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    secret = tmp_path / "webde.secret"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    assert smtp_server.tls is not None
    configure(
        mta,
        {
            "host": HOST,
            "port": smtp_server.port,
            "security": "starttls",
            "ca_file": str(smtp_server.tls.ca_file),
            "username": USER,
            "password": {"file": str(secret)},
            "timeout": "5s",
        },
    )
    queue_id = enqueue(mta, "-t", message=MESSAGE)

    result = flush(mta)

    [received] = smtp_server.handler.messages
    assert received.login == USER
    assert received.mail_from == "root@example.org"
    # root is a local user (issue 5): its copy went to its mailbox, the others to the smarthost
    assert received.rcpt_tos == ["bob@example.net", "carol@example.net"]
    owner = pwd.getpwuid(os.geteuid()).pw_name  # in user mode local mail goes to the running user's mailbox
    box = mailbox.mbox(str(mta.mail_spool / owner))
    try:
        [local_copy] = box
    finally:
        box.close()
    assert local_copy.get_payload(decode=True) == BODY.replace(b"\r\n", b"\n")
    assert local_copy["To"] == "root@example.org" and "carol" not in local_copy.as_string()
    header, _, body = received.data.partition(b"\r\n\r\n")
    assert body == BODY
    assert re.search(rb"^To: root@example\.org\r?$", header, re.M)
    assert re.search(rb"^Date: ", header, re.M)
    assert re.search(rf"^Message-ID: <{queue_id}@mx\.example\.org>\r?$".encode(), header, re.M)
    assert re.search(rb"^From: .*root@example\.org", header, re.M)
    assert not re.search(rb"^bcc:", header, re.M | re.I)
    assert b"carol" not in received.data
    assert smtp_server.handler.ehlo_names[0] == "mx.example.org"

    lines = log_lines(result)
    relay = re.escape(f"relay=127.0.0.1[127.0.0.1]:{smtp_server.port}")
    for address in ("bob@example.net", "carol@example.net"):
        pattern = (
            rf"pymta: id={queue_id} to=<{re.escape(address)}> {relay} delay=\d+\.\d tries=1 "
            r"status=sent \(250 .+\)"
        )
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, lines)
    local_line = (
        rf"pymta: id={queue_id} to=<root> relay=local delay=\d+\.\d tries=1 status=sent \(delivered to .+\)"
    )
    assert any(re.fullmatch(local_line, line) for line in lines), lines
    assert b"3 recipients delivered, 0 deferred, 0 failed" in result.stdout
    assert mta.entries() == []
    for directory in ("new", "queue", "state", "done", "corrupt"):
        assert spool_files(mta, directory) == [], directory
    assert queue_json(mta) == []


def test_550_for_one_of_three_recipients_fails_it_and_keeps_the_message(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    plain.handler.rejections = {"bad@example.net": "550 5.1.1 <bad@example.net>: user unknown"}
    configure(mta, plain_host(plain.port))
    queue_id = enqueue(mta, "-f", "alice@example.org", "a@example.net", "bad@example.net", "c@example.net")

    result = flush(mta)

    received, notice = plain.handler.messages
    assert received.rcpt_tos == ["a@example.net", "c@example.net"]
    assert (notice.mail_from, notice.rcpt_tos) == ("<>", ["alice@example.org"])  # the bounce (issue 4)
    lines = log_lines(result)
    assert sum("status=sent" in line for line in lines) == 3
    [bounced] = [line for line in lines if "status=bounced" in line]
    assert re.fullmatch(
        rf"pymta: id={queue_id} to=<bad@example\.net> relay=127\.0\.0\.1\[127\.0\.0\.1\]:{plain.port} "
        r"delay=\d+\.\d tries=1 status=bounced \(550 5\.1\.1 <bad@example\.net>: user unknown\)",
        bounced,
    )
    state = state_of(mta, queue_id)
    assert state["state"] == "failed"
    assert state["attempts"] == 1
    assert recipients_of(state) == {
        "a@example.net": {"status": "delivered", "last_error": None},
        "bad@example.net": {
            "status": "failed",
            "last_error": "550 5.1.1 <bad@example.net>: user unknown",
            "reported": True,
        },
        "c@example.net": {"status": "delivered", "last_error": None},
    }
    assert spool_files(mta, "queue") == [queue_id]
    [listed] = queue_json(mta)
    assert (listed["id"], listed["state"], listed["attempts"]) == (queue_id, "failed", 1)
    assert listed["recipients"] == [
        {"address": "a@example.net", "status": "delivered", "last_error": None},
        {
            "address": "bad@example.net",
            "status": "failed",
            "last_error": "550 5.1.1 <bad@example.net>: user unknown",
        },
        {"address": "c@example.net", "status": "delivered", "last_error": None},
    ]
    assert listed["last_error"] == "550 5.1.1 <bad@example.net>: user unknown"

    # A later flush, even one forcing every waiting message, sends nothing again (invariant 3).
    flush(mta)
    flush(mta, "--now")
    assert len(plain.handler.messages) == 2  # the message and its one bounce
    assert len(plain.handler.ehlo_names) == 1
    assert state_of(mta, queue_id) == state


# --- deferral, retry schedule and expiry (the clock moves) ---


def test_451_defers_one_recipient_and_retries_only_it(mta: MtaEnv, plain: SmtpServer) -> None:
    plain.handler.rejections = {"later@example.net": "451 4.7.1 greylisted, try again in 5 minutes"}
    configure(mta, plain_host(plain.port), extra="retry: {schedule: [10m, 1h], lifetime: 5d}\n")
    queue_id = enqueue(mta, "now@example.net", "later@example.net")
    clock = Clock()
    first, lines = flusher(mta, clock, jitter=random.random)

    report = first.run()

    assert (report.attempted, report.sent, report.deferred, report.failed) == (1, 1, 1, 0)
    assert [m.rcpt_tos for m in plain.handler.messages] == [["now@example.net"]]
    [entry] = mta.entries()
    assert entry.state == "deferred"
    assert entry.attempts == 1
    assert entry.next_attempt is not None
    assert clock.now + 540 <= entry.next_attempt <= clock.now + 660  # 10 minutes +-10% jitter
    assert entry.last_error == "451 4.7.1 greylisted, try again in 5 minutes"
    assert any("to=<later@example.net>" in line and "status=deferred (451 4.7.1" in line for line in lines)
    [listed] = queue_json(mta)
    assert listed["state"] == "deferred"
    assert listed["attempts"] == 1
    assert listed["recipients"] == [
        {"address": "now@example.net", "status": "delivered", "last_error": None},
        {
            "address": "later@example.net",
            "status": "deferred",
            "last_error": "451 4.7.1 greylisted, try again in 5 minutes",
        },
    ]
    assert listed["next_attempt"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.next_attempt))

    # Before the next attempt is due nothing is sent: not even a connection is made.
    clock.now += 60
    early, _ = flusher(mta, clock)
    assert early.run().attempted == 0
    assert len(plain.handler.ehlo_names) == 1
    assert mta.only_entry().attempts == 1

    # Past it, only the deferred recipient goes out; the accepted one is never sent again (invariant 3).
    plain.handler.rejections = {}
    clock.now = entry.next_attempt + 1
    later, lines = flusher(mta, clock)
    report = later.run()
    assert (report.attempted, report.sent) == (1, 1)
    assert [m.rcpt_tos for m in plain.handler.messages] == [["now@example.net"], ["later@example.net"]]
    assert any(
        f"id={queue_id} to=<later@example.net>" in line and "tries=2 status=sent" in line for line in lines
    )
    assert mta.entries() == []


def test_retries_follow_the_schedule_and_repeat_its_last_interval(mta: MtaEnv, plain: SmtpServer) -> None:
    plain.handler.rejections = {"later@example.net": "451 4.3.0 try later"}
    configure(mta, plain_host(plain.port), extra="retry: {schedule: [10m, 1h], lifetime: 5d}\n")
    queue_id = enqueue(mta, "later@example.net")
    clock = Clock()
    # jitter() in [0, 1) scales the interval by 0.9 to 1.1; 0.5 is the interval itself.
    expected = [(0.5, 600.0), (0.5, 3600.0), (0.5, 3600.0), (0.0, 3240.0), (0.999, 3600 * 1.0998)]
    for attempt, (jitter, interval) in enumerate(expected, 1):
        run, _ = flusher(mta, clock, jitter=jitter)
        assert run.run().deferred == 1
        state = state_of(mta, queue_id)
        assert state["attempts"] == attempt
        assert state["next_attempt"] == pytest.approx(clock.now + interval)
        assert os.stat(mta.spool / "state" / queue_id).st_mtime == pytest.approx(clock.now + interval)
        clock.now += interval - 1
        idle, _ = flusher(mta, clock)
        assert idle.run().attempted == 0  # one second early: not due
        clock.now += 1
    assert len(plain.handler.ehlo_names) == len(expected)
    assert plain.handler.messages == []


def test_a_message_past_its_lifetime_fails_its_pending_recipients_as_expired(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    plain.handler.rejections = {"later@example.net": "451 4.3.0 try later"}
    configure(mta, plain_host(plain.port), extra="retry: {schedule: [10m], lifetime: 1h}\n")
    queue_id = enqueue(mta, "now@example.net", "later@example.net")
    queued_at = mta.only_entry().queued_at
    first, _ = flusher(mta, Clock(queued_at + 1))
    first.run()
    assert state_of(mta, queue_id)["state"] == "deferred"

    late, lines = flusher(mta, Clock(queued_at + 3600 + 1))
    report = late.run()

    # the message, and its bounce, which goes to the sender root: a local user, so into a mailbox
    assert (report.attempted, report.failed, report.sent) == (2, 1, 1)
    assert [m.rcpt_tos for m in plain.handler.messages] == [["now@example.net"]]  # not offered again
    owner = pwd.getpwuid(os.geteuid()).pw_name
    assert b"Undelivered Mail Returned to Sender" in (mta.mail_spool / owner).read_bytes()
    state = state_of(mta, queue_id)
    assert state["state"] == "failed"
    recipients = recipients_of(state)
    assert recipients["now@example.net"] == {"status": "delivered", "last_error": None}
    assert recipients["later@example.net"]["status"] == "failed"
    assert "expired" in str(recipients["later@example.net"]["last_error"])
    assert "expired" in str(state["last_error"])
    assert any("to=<later@example.net>" in line and "status=bounced (5.4.7 expired" in line for line in lines)
    assert spool_files(mta, "queue") == [queue_id]  # kept for the bounce (invariant 2)


# --- connections: reuse, reconnect, failover, routes ---


def test_one_connection_carries_many_messages_with_rset_between(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port))
    ids = [enqueue(mta, f"user{n}@example.net") for n in range(5)]

    result = flush(mta)

    assert len(plain.handler.messages) == 5
    assert sorted(m.rcpt_tos[0] for m in plain.handler.messages) == [f"user{n}@example.net" for n in range(5)]
    assert len(plain.handler.ehlo_names) == 1
    assert len(plain.handler.sessions) == 1
    assert plain.handler.resets == 4
    assert sum("status=sent" in line for line in log_lines(result)) == 5
    assert {line.split()[1] for line in log_lines(result) if "status=sent" in line} == {
        f"id={i}" for i in ids
    }
    assert mta.entries() == []


def test_a_line_over_998_octets_reaches_a_strict_server_with_every_byte(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    import email

    configure(mta, plain_host(plain.port))
    body = b"line one\n" + b"0123456789" * 500 + b"\nlast line\n"  # a cron job's long line
    enqueue(mta, "-f", "cron@example.org", "ops@example.net", message=b"Subject: report\n\n" + body)

    flush(mta)

    [received] = plain.handler.messages  # aiosmtpd refuses longer lines: 500 Line too long
    assert max(len(line) for line in received.data.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(received.data)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_payload(decode=True) == body.replace(b"\n", b"\r\n")
    assert mta.entries() == []


def test_a_server_that_closes_after_one_message_gets_the_next_over_a_new_connection(mta: MtaEnv) -> None:
    first = [*greet(), *accept_message(), Close()]
    second = [*greet(), *accept_message(), Expect("QUIT"), Send("221 bye")]
    with ScriptedServer(first, second) as server:
        configure(mta, plain_host(server.port))
        enqueue(mta, "one@example.net")
        enqueue(mta, "two@example.net")
        result = flush(mta)
        wait_until(server.finished.is_set, what="the second script to end")
    assert server.errors == []
    assert server.connections == 2
    assert len(server.data) == 2
    # Ids order messages by the second they were queued in; within one second the order is open.
    assert sorted(line for line in server.lines if line.startswith("RCPT")) == [
        "RCPT TO:<one@example.net>",
        "RCPT TO:<two@example.net>",
    ]
    assert sum("status=sent" in line for line in log_lines(result)) == 2
    assert mta.entries() == []


# --- pipelining across messages (RFC 2920): one round trip per message ---

# A pipelined message's commands as a server reads them, and the replies that accept them.
NEXT_COMMANDS: list[Step] = [Expect("RSET"), Expect("MAIL"), Expect("RCPT"), Expect("DATA")]
NEXT_ACCEPTED = "250 2.0.0 ok\n250 2.1.0 ok\n250 2.1.5 ok\n354 go ahead"
FIRST_ENVELOPE: list[Step] = [
    Expect("MAIL"), Expect("RCPT"), Expect("DATA"), Send("250 2.1.0 ok\n250 2.1.5 ok\n354 go ahead"),
]  # fmt: skip


def sent_replies(server: ScriptedServer, lines: list[str]) -> list[str]:
    """For each RCPT the server read, in order, the reply the log records for that recipient."""
    replies = []
    for rcpt in (line for line in server.lines if line.startswith("RCPT")):
        address = rcpt.removeprefix("RCPT TO:")
        [logged] = [line for line in lines if f" to={address} " in line]
        replies.append(logged.rsplit("(", 1)[1].rstrip(")"))
    return replies


def three_pipelined_messages() -> list[Step]:
    """A server script for three messages that answers each text only after it has read the next message's
    commands (PIPELINING across messages), then QUIT."""
    return [
        *greet(), *FIRST_ENVELOPE,
        ReadData(), *NEXT_COMMANDS, Send("250 2.0.0 queued as 1\n" + NEXT_ACCEPTED),
        ReadData(), *NEXT_COMMANDS, Send("250 2.0.0 queued as 2\n" + NEXT_ACCEPTED),
        ReadData(), Send("250 2.0.0 queued as 3"), Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip


def test_each_message_s_commands_ride_behind_the_text_before_it(mta: MtaEnv) -> None:
    # This server answers a text only after it has read the next message's commands: a flush that waited
    # for the answer first would time out here.
    with ScriptedServer(three_pipelined_messages()) as server:
        configure(mta, plain_host(server.port))
        for n in range(3):
            enqueue(mta, f"user{n}@example.net")
        result = flush(mta)
        wait_until(server.finished.is_set, what="the script to end")
    assert server.errors == []
    assert len(server.data) == 3
    # Each outcome is recorded for its own message, not for the one whose commands came with its text.
    assert sent_replies(server, log_lines(result)) == [f"250 2.0.0 queued as {n}" for n in (1, 2, 3)]
    assert mta.entries() == []


def test_a_5xx_to_one_text_while_the_next_is_in_flight_fails_only_that_one(mta: MtaEnv) -> None:
    script = [
        *greet(), *FIRST_ENVELOPE,
        ReadData(), *NEXT_COMMANDS, Send("554 5.6.0 refused by content filter\n" + NEXT_ACCEPTED),
        ReadData(), Send("250 2.0.0 queued as 2"), Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server:
        configure(mta, plain_host(server.port))
        for n in range(2):
            enqueue(mta, "-N", "never", f"user{n}@example.net")  # no bounce to script
        result = flush(mta)
        wait_until(server.finished.is_set, what="the script to end")
    assert server.errors == []
    replies = sent_replies(server, log_lines(result))
    assert replies == ["554 5.6.0 refused by content filter", "250 2.0.0 queued as 2"]
    [failed] = mta.entries()
    assert failed.state == "failed"
    first_rcpt = next(line for line in server.lines if line.startswith("RCPT"))
    assert f"<{failed.recipients[0].address}>" in first_rcpt
    assert failed.recipients[0].last_error == "554 5.6.0 refused by content filter"


def test_a_smarthost_failing_mid_pipeline_defers_that_message_and_the_next_goes_on(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    # The first smarthost read the first text and the second message's commands, then went away without an
    # answer. The first message may have been delivered there: it is deferred, not sent anywhere else. Of
    # the second nothing deliverable went out: it goes through the second smarthost at once.
    script = [*greet(), *FIRST_ENVELOPE, ReadData(), *NEXT_COMMANDS, Close()]
    with ScriptedServer(script) as server:
        configure(mta, plain_host(server.port), plain_host(plain.port))
        for n in range(2):
            enqueue(mta, f"user{n}@example.net")
        result = flush(mta)
    assert server.errors == []
    assert len(server.data) == 1
    [deferred] = mta.entries()
    assert deferred.state == "deferred"
    assert "connection ended before the server answered" in (deferred.last_error or "")
    assert "may already have the message" in (deferred.last_error or "")
    first_rcpt = next(line for line in server.lines if line.startswith("RCPT"))
    assert f"<{deferred.recipients[0].address}>" in first_rcpt
    [received] = plain.handler.messages
    assert received.rcpt_tos != [deferred.recipients[0].address]
    assert sum("status=sent" in line for line in log_lines(result)) == 1


def test_the_only_smarthost_failing_mid_pipeline_costs_the_next_message_a_new_connection(
    mta: MtaEnv,
) -> None:
    # The first message's text went out and the server went away: it may have it, so it is deferred. The
    # second, whose commands went unanswered, is tried again over a new connection (this server refuses
    # it), and its state says what happened to it, not to the first.
    script = [*greet(), *FIRST_ENVELOPE, ReadData(), *NEXT_COMMANDS, Close()]
    with ScriptedServer(script) as server:
        configure(mta, plain_host(server.port))
        first, second = enqueue_in_order(mta, "user0@example.net", "user1@example.net")
        flush(mta)
    assert server.connections == 2
    assert len(server.data) == 1
    entries = {entry.id: entry for entry in mta.entries()}
    assert [entries[i].state for i in (first, second)] == ["deferred", "deferred"]
    assert "may already have the message" in (entries[first].last_error or "")
    assert "closed the connection during connect" in (entries[second].last_error or "")
    assert "may already have" not in (entries[second].last_error or "")


def test_a_connection_closed_after_a_text_carries_the_next_two_over_a_new_one(mta: MtaEnv) -> None:
    # The server answered the first text and closed. The second message, whose commands went unanswered,
    # is sent again over a new connection, and the third, started meanwhile, follows it there.
    first = [*greet(), *FIRST_ENVELOPE, ReadData(), *NEXT_COMMANDS, Send("250 2.0.0 queued as 1"), Close()]
    second = [
        *greet(), *accept_message("250 2.0.0 queued as 2"),
        *NEXT_COMMANDS, Send(NEXT_ACCEPTED), ReadData(), Send("250 2.0.0 queued as 3"),
        Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(first, second) as server:
        configure(mta, plain_host(server.port))
        for n in range(3):
            enqueue(mta, f"user{n}@example.net")
        result = flush(mta)
        wait_until(server.finished.is_set, what="the second script to end")
    assert server.errors == []
    assert server.connections == 2
    assert len(server.data) == 3
    replies = sent_replies(server, log_lines(result))
    # The second message's RCPT was read twice (it was sent again): its one log line has the second answer.
    assert replies == [f"250 2.0.0 queued as {n}" for n in (1, 2, 2, 3)]
    assert mta.entries() == []


def test_a_run_failing_mid_pipeline_leaves_no_lock_and_no_quit_in_a_text(
    mta: MtaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = [
        *greet(), *FIRST_ENVELOPE, ReadData(), *NEXT_COMMANDS,
        Send("250 2.0.0 queued as 1\n" + NEXT_ACCEPTED), ReadData(),
    ]  # fmt: skip
    with ScriptedServer(script) as server:
        configure(mta, plain_host(server.port))
        ids = [enqueue(mta, f"user{n}@example.net") for n in range(2)]
        running, _ = flusher(mta)

        def record(*args: object) -> bool:
            raise OSError(errno.EIO, "the state cannot be written")

        monkeypatch.setattr(running, "_record", record)
        started = time.monotonic()
        with pytest.raises(OSError, match="state cannot be written"):
            running.run()
        assert time.monotonic() - started < 3  # closed at once, not after a timeout waiting for QUIT
        wait_until(server.finished.is_set, what="the script to end")
    assert server.errors == []
    assert server.data[1] == b""  # the second message's text never started, and no QUIT went into it
    spool = Spool(str(mta.spool))
    for queue_id in ids:  # neither message is left locked
        lock = spool.lock_message(queue_id)
        assert lock is not None
        spool.unlock_message(lock)


def test_pipelining_through_aiosmtpd_records_every_outcome(mta: MtaEnv, plain: SmtpServer) -> None:
    plain.handler.extensions = ["PIPELINING"]
    plain.handler.rejections = {"full@example.net": "452 4.2.2 mailbox full"}
    configure(mta, plain_host(plain.port))
    for n in range(4):
        enqueue(mta, f"user{n}@example.net")
    full = enqueue(mta, "full@example.net", "user9@example.net")
    enqueue(mta, "user5@example.net")

    result = flush(mta)

    assert sorted(rcpt for m in plain.handler.messages for rcpt in m.rcpt_tos) == [
        f"user{n}@example.net" for n in (0, 1, 2, 3, 5, 9)
    ]
    assert len(plain.handler.sessions) == 1
    assert plain.handler.resets == 5
    assert sum("status=sent" in line for line in log_lines(result)) == 6
    [entry] = mta.entries()
    assert entry.id == full
    assert {(r.address, r.status) for r in entry.recipients} == {
        ("full@example.net", "deferred"),
        ("user9@example.net", "delivered"),
    }


def test_failover_to_the_second_smarthost_when_the_first_is_down(
    mta: MtaEnv, plain: SmtpServer, closed_port: int
) -> None:
    configure(mta, plain_host(closed_port), plain_host(plain.port))
    queue_id = enqueue(mta, "bob@example.net")

    result = flush(mta)

    assert [m.rcpt_tos for m in plain.handler.messages] == [["bob@example.net"]]
    lines = log_lines(result)
    assert any(
        f"smarthost 127.0.0.1: 127.0.0.1[127.0.0.1]:{closed_port}: connection refused" in x for x in lines
    )
    [sent] = [line for line in lines if "status=sent" in line]
    assert f"id={queue_id} to=<bob@example.net> relay=127.0.0.1[127.0.0.1]:{plain.port} " in sent
    assert mta.entries() == []


@pytest.mark.parametrize("at", ["MAIL", "RCPT"])
def test_a_421_before_the_text_sends_the_message_to_the_next_smarthost_at_once(
    mta: MtaEnv, plain: SmtpServer, at: str
) -> None:
    before = [Expect("MAIL"), Send("250 ok")] if at == "RCPT" else []
    script = [*greet(), *before, Expect(at), Send("421 4.3.2 shutting down"), Close()]
    with ScriptedServer(script) as primary:
        configure(mta, plain_host(primary.port), plain_host(plain.port))
        queue_id = enqueue(mta, "bob@example.net")
        result = flush(mta)
    # None of its text reached the primary, so the backup has it in the same run, once.
    assert [m.rcpt_tos for m in plain.handler.messages] == [["bob@example.net"]]
    assert primary.data == []
    assert any(f"id={queue_id} to=<bob@example.net> relay=127.0.0.1[127.0.0.1]:{plain.port}" in line
               for line in log_lines(result))  # fmt: skip
    assert mta.entries() == []


def test_no_failover_onto_a_session_with_a_message_started_behind(mta: MtaEnv, plain: SmtpServer) -> None:
    # A (any sender: one, then two) is started on one; B (a route to two) is started on two behind it.
    # When one gives up on A at MAIL, A cannot go to two ahead of B: it waits for the next run.
    script = [*greet(), Expect("MAIL"), Send("421 4.3.2 shutting down"), Close()]
    with ScriptedServer(script) as one:
        routes = 'routes: [{sender: "*@b.example", smarthost: two}]\n'
        configure(mta, plain_host(one.port, name="one"), plain_host(plain.port, name="two"), extra=routes)
        first = enqueue(mta, "to-a@example.net")
        # Ids order by their first 8 digits, the second they were made in: B's must come later.
        wait_until(lambda: int(time.time()) > int(first[:8], 16), what="the next second")
        assert enqueue(mta, "-f", "x@b.example", "to-b@example.net") > first
        report = flusher(mta)[0].run()  # it used to die here: "finished in the order they were started"
    assert [m.rcpt_tos for m in plain.handler.messages] == [["to-b@example.net"]]
    [waiting] = [entry for entry in mta.entries() if entry.id == first]
    assert waiting.state == "deferred" and "421 4.3.2 shutting down" in (waiting.last_error or "")
    assert report.sent == 1


# --- a slow or silent smarthost: the end of the text has its own, long limit ---


def test_a_slow_answer_to_the_end_of_the_text_is_awaited_and_the_message_sent_once(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    # A content scanner that takes longer than the command timeout to answer the final dot: before, pymta
    # hung up after `timeout`, deferred, and sent the whole message again at every retry.
    plain.handler.slow = {"slow@example.net": 4.0}
    configure(mta, plain_host(plain.port, timeout="2s"))  # data_timeout keeps its default, 10 minutes
    enqueue(mta, "slow@example.net")
    result = flush(mta)
    assert [m.rcpt_tos for m in plain.handler.messages] == [["slow@example.net"]]
    assert "status=sent" in result.stderr.decode()
    assert mta.entries() == []
    flush(mta)
    assert len(plain.handler.messages) == 1  # exactly once


def test_no_answer_to_the_end_of_the_text_defers_only_that_message_and_the_run_goes_on(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    plain.handler.slow = {"slow@example.net": 6.0}
    plain.handler.rejections = {"busy@example.net": "451 4.3.0 try again later"}
    configure(mta, plain_host(plain.port, timeout="5s", data_timeout="2s"))
    slow, one, busy, two = enqueue_in_order(
        mta, "slow@example.net", "one@example.net", "busy@example.net", "two@example.net"
    )

    result = flush(mta)

    # The others went over a new connection in the same run (before, they were all deferred untried).
    received = [m.rcpt_tos for m in plain.handler.messages]
    assert ["one@example.net"] in received and ["two@example.net"] in received
    assert received.count(["slow@example.net"]) == 1  # the server has it: the outcome was unknown
    assert len(plain.handler.sessions) == 2
    entries = {entry.id: entry for entry in mta.entries()}
    assert set(entries) == {slow, busy}
    waiting = entries[slow]
    assert waiting.state == "deferred" and waiting.attempts == 1
    assert "may already have the message" in (waiting.last_error or "")
    assert "data_timeout" in (waiting.last_error or "")
    assert waiting.recipients[0].last_error == waiting.last_error
    # The other message records only what happened to it: its own 451, once.
    assert entries[busy].attempts == 1
    assert entries[busy].last_error == "451 4.3.0 try again later"
    lines = log_lines(result)
    [slow_line] = [line for line in lines if f"id={slow} " in line and "status=" in line]
    assert "status=deferred" in slow_line and "may already have the message" in slow_line
    for queue_id in (one, two):
        [line] = [line for line in lines if f"id={queue_id} " in line and "status=" in line]
        assert "tries=1 status=sent" in line
    listed = {item["id"]: item for item in queue_json(mta)}
    assert "may already have the message" in str(listed[slow]["last_error"])


def test_a_smarthost_that_hangs_twice_in_a_row_leaves_the_rest_untried_and_untouched(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    plain.handler.slow = {"slow1@example.net": 6.0, "slow2@example.net": 6.0}
    configure(mta, plain_host(plain.port, timeout="5s", data_timeout="2s"))
    slow1, slow2, other = enqueue_in_order(mta, "slow1@example.net", "slow2@example.net", "other@example.net")

    result = flush(mta)

    entries = {entry.id: entry for entry in mta.entries()}
    assert [entries[i].state for i in (slow1, slow2)] == ["deferred", "deferred"]
    # Not tried in this run (a server that hangs at every message would cost a timeout each): its state
    # is as it was, and it is due for the next run.
    untried = entries[other]
    assert untried.state == "queued" and untried.attempts == 0 and untried.last_error is None
    assert any(f"id={other} not tried" in line for line in log_lines(result))
    assert ["other@example.net"] not in [m.rcpt_tos for m in plain.handler.messages]

    plain.handler.slow = {}
    flush(mta)
    assert ["other@example.net"] in [m.rcpt_tos for m in plain.handler.messages]
    assert other not in {entry.id for entry in mta.entries()}


def test_a_message_nested_400_deep_is_delivered_and_the_others_with_it(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    configure(mta, plain_host(plain.port))
    enqueue(mta, "deep@example.net", message=nested_multipart(400))
    enqueue(mta, "other@example.net")
    result = flush(mta)  # exit 1 and a RecursionError before, at every flush
    assert sorted(rcpt for m in plain.handler.messages for rcpt in m.rcpt_tos) == [
        "deep@example.net",
        "other@example.net",
    ]
    [deep] = [m for m in plain.handler.messages if m.rcpt_tos == ["deep@example.net"]]
    assert b"x" * 900 in deep.data and max(map(len, deep.data.split(b"\r\n"))) <= 998
    assert sum("status=sent" in line for line in log_lines(result)) == 2
    assert mta.entries() == []


def test_when_every_smarthost_is_down_the_message_is_deferred_with_both_reasons(
    mta: MtaEnv, closed_port: int
) -> None:
    with socket.socket() as other:
        other.bind((HOST, 0))
        second_port = other.getsockname()[1]
        configure(mta, plain_host(closed_port), plain_host(second_port))
        queue_id = enqueue(mta, "bob@example.net")
        result = flush(mta)
    [entry] = mta.entries()
    assert entry.id == queue_id
    assert entry.state == "deferred"
    assert entry.attempts == 1
    error = entry.last_error or ""
    assert "\n" not in error
    assert f":{closed_port}: connection refused" in error
    assert f":{second_port}: connection refused" in error
    assert entry.recipients[0].status == "deferred"
    assert "status=deferred" in result.stderr.decode()


def test_routes_choose_the_smarthost_by_sender(mta: MtaEnv) -> None:
    with SmtpServer("plain") as one, SmtpServer("plain") as two:
        configure(
            mta,
            plain_host(one.port, name="one"),
            plain_host(two.port, name="two"),
            extra='routes: [{sender: "*@b.example", smarthost: two}]\n',
        )
        enqueue(mta, "-f", "x@b.example", "to-b@example.net")
        enqueue(mta, "-f", "y@a.example", "to-a@example.net")
        enqueue(mta, "to-root@example.net")  # from the bare login: matches no route
        flush(mta)
    assert [(m.mail_from, m.rcpt_tos) for m in two.handler.messages] == [
        ("x@b.example", ["to-b@example.net"])
    ]
    assert sorted((m.mail_from, m.rcpt_tos[0]) for m in one.handler.messages) == [
        ("root@example.org", "to-root@example.net"),
        ("y@a.example", "to-a@example.net"),
    ]
    assert mta.entries() == []


def test_routes_match_the_sender_as_it_goes_out(mta: MtaEnv) -> None:
    with SmtpServer("plain") as one, SmtpServer("plain") as two:
        configure(
            mta,
            plain_host(one.port, name="one"),
            plain_host(two.port, name="two"),
            extra='routes: [{sender: "*@example.org", smarthost: two}]\n',
        )
        enqueue(mta, "bob@example.net")  # from root, sent as MAIL FROM:<root@example.org>
        flush(mta)
    assert one.handler.messages == []
    assert [m.mail_from for m in two.handler.messages] == ["root@example.org"]


def test_without_a_smarthost_mail_waits_with_a_clear_note(mta: MtaEnv) -> None:
    configure(mta)
    queue_id = enqueue(mta, "bob@example.net")
    result = flush(mta)
    [entry] = mta.entries()
    assert entry.id == queue_id
    assert entry.state == "deferred"
    assert entry.last_error is not None and entry.last_error.startswith("no smarthost configured")
    assert entry.recipients[0].status == "deferred"
    assert "status=deferred (no smarthost configured" in result.stderr.decode()


# --- one flush at a time ---


def test_a_second_flush_exits_at_once_and_leaves_a_request(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port))
    enqueue(mta, "bob@example.net")
    spool = Spool(str(mta.spool))
    lock = spool.lock_flush()
    assert lock is not None
    try:
        started = time.monotonic()
        result = flush(mta, timeout=10)
        assert time.monotonic() - started < 5
    finally:
        spool.release_flush(lock)
    assert b"another flush is running" in result.stdout
    assert (mta.spool / "flush.request").exists()
    assert plain.handler.messages == []
    assert len(mta.entries()) == 1


def test_the_running_flush_takes_the_request_and_looks_again(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port))
    enqueue(mta, "first@example.net")
    others: list[subprocess.CompletedProcess[bytes]] = []

    def meanwhile(done: int, total: int) -> None:
        if not others:  # while this flush holds the lock: a new message, and a flush that finds it busy
            enqueue(mta, "second@example.net")
            others.append(flush(mta, timeout=10))

    running, _ = flusher(mta)
    report = running.run(progress=meanwhile)

    assert b"another flush is running" in others[0].stdout
    assert report.attempted == 2
    assert report.picked_up == 2
    assert [m.rcpt_tos for m in plain.handler.messages] == [["first@example.net"], ["second@example.net"]]
    assert not (mta.spool / "flush.request").exists()
    assert mta.entries() == []


def test_a_request_in_the_last_moments_of_a_flush_is_not_lost(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port))
    enqueue(mta, "first@example.net")
    running, _ = flusher(mta)
    quit_sessions = running.sessions.close
    others: list[subprocess.CompletedProcess[bytes]] = []

    def close() -> None:
        # A cron job's sendmail finishes while this flush says QUIT, and its flush finds the lock held.
        if not others:
            enqueue(mta, "second@example.net")
            others.append(flush(mta, timeout=10))
        quit_sessions()

    running.sessions.close = close  # type: ignore[method-assign]
    running.run()

    assert b"another flush is running" in others[0].stdout
    assert [m.rcpt_tos for m in plain.handler.messages] == [["first@example.net"], ["second@example.net"]]
    assert not (mta.spool / "flush.request").exists()


def test_many_immediate_submissions_at_once_deliver_each_message_once(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port), base=BASE_CONFIG.replace("deliver: queue", "deliver: immediate"))
    submissions = [
        subprocess.Popen(
            [script("sendmail"), "-i", f"job{n}@example.net"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=mta.env,
        )
        for n in range(6)
    ]
    for process in submissions:
        process.communicate(SIMPLE, timeout=10)
        assert process.returncode == 0
    spool = Spool(str(mta.spool))

    def idle() -> bool:
        lock = spool.lock_flush()
        if lock is not None:
            spool.release_flush(lock)
        return lock is not None

    wait_until(lambda: len(plain.handler.messages) >= 1 and idle(), timeout=15, what="the background flushes")
    flush(mta)  # the timer's flush: whatever a background flush left (see the test above) goes now
    wait_until(idle, timeout=15, what="the last flush to end")
    received = sorted(m.rcpt_tos[0] for m in plain.handler.messages)
    assert received == [f"job{n}@example.net" for n in range(6)]  # each once: never two flushes at a time
    assert mta.entries() == []


# --- pick-up from new/ and spool hygiene ---


def test_pick_up_refuses_links_fifos_oversized_and_garbage_and_delivers_the_good_one(
    mta: MtaEnv, plain: SmtpServer, tmp_path: Path
) -> None:
    configure(mta, plain_host(plain.port), extra="max_message_size: 1k\n")
    good = enqueue(mta, "bob@example.net")
    new = mta.spool / "new"
    submission = (new / good).read_bytes()
    outside = tmp_path / "outside"
    outside.write_bytes(submission.replace(good.encode(), b"f" * len(good)))
    (new / "symlink").symlink_to(outside)
    os.link(outside, new / "hardlink")
    os.mkfifo(new / "fifo")
    oversized, garbage = sorted((new_id(), new_id()))
    (new / oversized).write_bytes(submission + b"x" * (5 * 1024 * 1024))
    (new / garbage).write_bytes(b"this is not a pymta queue file\n\x00\xff")
    (new / "no\nid").write_bytes(submission)  # a name sendmail never makes, one that would forge a log line

    result = flush(mta, timeout=20)  # a FIFO that blocked the pick-up would time out here

    assert [m.rcpt_tos for m in plain.handler.messages] == [["bob@example.net"]]
    assert spool_files(mta, "new") == []
    text = result.stderr.decode()
    renamed = re.findall(r"moved to corrupt/ as ([0-9a-f]{24}) for the admin", text)
    assert sorted(spool_files(mta, "corrupt")) == sorted([garbage, oversized, *renamed]) and len(renamed) == 1
    assert outside.read_bytes().startswith(b'{"v":1')  # the link's target is left alone
    assert os.stat(outside).st_nlink == 1
    assert "refused new/symlink: a symbolic link; removed" in text
    assert "refused new/hardlink of uid" in text and "a hard link (2 names); removed" in text
    assert "refused new/fifo of uid" in text and "not a regular file" in text
    assert re.search(rf"refused new/{oversized}: \d+ bytes, over max_message_size; moved to corrupt/ ", text)
    assert re.search(rf"id={garbage} cannot read the queued message \(.+\); moved to corrupt/", text)
    assert "refused new/'no\\nid': its name is not a queue id (sendmail did not write it)" in text
    assert mta.entries() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_submission_owned_by_another_user_is_copied_and_attributed_to_its_owner(mta: MtaEnv) -> None:
    configure(mta)  # no smarthost: the message stays queued for inspection
    queue_id = enqueue(mta, "bob@example.net")
    dropped = mta.spool / "new" / queue_id
    claimed = dropped.read_bytes()
    assert b'"uid":0,' in claimed and b'"submitted_by":"root"' in claimed  # what the file claims
    os.chown(dropped, 65534, 65534)

    flush(mta)

    assert not dropped.exists()
    stored = mta.spool / "queue" / queue_id
    info = os.stat(stored)
    assert (info.st_uid, stat.S_IMODE(info.st_mode), info.st_nlink) == (0, 0o600, 1)
    [entry] = mta.entries()
    assert entry.uid == 65534
    nobody = pwd.getpwuid(65534).pw_name
    assert entry.submitted_by == nobody
    # The file claims root's sender, which its owner may not set: marked as sendmail does
    # (pymta.config.identity).
    warning = f"X-Authentication-Warning: mx.example.org: {nobody} set sender to root using -f\r\n"
    assert mta.message(entry) == warning.encode() + claimed.partition(b"\n")[2]
    [listed] = queue_json(mta)
    assert listed["submitted_by"] == pwd.getpwuid(65534).pw_name


def _drop_as_nobody(mta: MtaEnv, name: str, envelope: dict[str, object], message: bytes) -> None:
    """What a local user can do in system mode: create a file of their own in the drop directory new/."""
    path = mta.spool / "new" / name
    path.write_bytes(encode_json({"v": 1, **envelope}).encode() + b"\n" + message)
    os.chown(path, 65534, 65534)


INTRUDER: dict[str, object] = {
    "sender": "mallory@example.net",
    "recipients": ["victim@example.net"],
    "submitted_by": "nobody",
    "uid": 65534,
    "full_name": "",
    "queued_at": 1.0,  # 1970: expired at once, so its outcome is final
}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop a file as another user")
def test_a_dropped_file_cannot_replace_a_queued_message(mta: MtaEnv) -> None:
    configure(mta)  # no smarthost: the victim's message waits, deferred
    victim = enqueue(mta, "bob@example.net")
    flush(mta)
    stored = (mta.spool / "queue" / victim).read_bytes()
    state = (mta.spool / "state" / victim).read_bytes()
    # The queue id is no secret: it is in the Message-ID of every copy delivered, and in the logs.
    _drop_as_nobody(mta, victim, {"id": victim, **INTRUDER}, b"Subject: replaced\r\n\r\nnot yours\r\n")

    result = flush(mta)

    assert (mta.spool / "queue" / victim).read_bytes() == stored
    assert (mta.spool / "state" / victim).read_bytes() == state
    assert f"refused new/{victim}" in result.stderr.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop a file as another user")
def test_a_dropped_file_cannot_claim_the_id_of_a_queued_message(mta: MtaEnv) -> None:
    configure(mta)
    victim = enqueue(mta, "bob@example.net")
    flush(mta)
    stored = (mta.spool / "queue" / victim).read_bytes()
    state = (mta.spool / "state" / victim).read_bytes()
    intruder = "00000000" + "1" * 16
    _drop_as_nobody(mta, intruder, {"id": victim, **INTRUDER}, b"Subject: mine\r\n\r\ntext\r\n")

    flush(mta)

    # The victim's message and its state are its own; today its state says "failed" (the intruder's
    # expiry), so it would never be tried again.
    assert (mta.spool / "queue" / victim).read_bytes() == stored
    assert (mta.spool / "state" / victim).read_bytes() == state


def test_a_corrupt_queue_entry_is_set_aside_and_the_flush_goes_on(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port))
    enqueue(mta, "bob@example.net")
    (mta.spool / "queue").mkdir(exist_ok=True)
    broken = "00000000deadbeefdeadbeef"
    (mta.spool / "queue" / broken).write_bytes(b"\x00\x01 garbage without an envelope")

    result = flush(mta)

    assert spool_files(mta, "corrupt") == [broken]
    assert (mta.spool / "corrupt" / broken).read_bytes() == b"\x00\x01 garbage without an envelope"
    assert f"id={broken} cannot read the queued message" in result.stderr.decode()
    assert [m.rcpt_tos for m in plain.handler.messages] == [["bob@example.net"]]
    assert mta.entries() == []


def test_stale_tmp_files_are_removed_and_fresh_ones_kept(mta: MtaEnv) -> None:
    configure(mta)
    Spool(str(mta.spool)).create_private()
    now = time.time()
    stale = mta.spool / "tmp" / "stale"
    fresh = mta.spool / "tmp" / "fresh"
    for path, age in ((stale, STALE_TMP_AGE + 3600), (fresh, STALE_TMP_AGE - 3600)):
        path.write_bytes(b"half a message")
        os.utime(path, (now - age, now - age))
    flush(mta)
    assert spool_files(mta, "tmp") == ["fresh"]


# --- immediate delivery and the terminal ---


def test_deliver_immediate_sends_without_anyone_running_flush(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port), base=BASE_CONFIG.replace("deliver: queue", "deliver: immediate"))
    started = time.monotonic()
    result = mta.sendmail("-i", "bob@example.net", input=SIMPLE, timeout=10)
    assert time.monotonic() - started < 5
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")

    wait_until(lambda: len(plain.handler.messages) == 1, timeout=15, what="the background flush to deliver")
    assert plain.handler.messages[0].rcpt_tos == ["bob@example.net"]
    spool = Spool(str(mta.spool))

    def finished() -> bool:
        lock = spool.lock_flush()
        if lock is not None:
            spool.release_flush(lock)
        return lock is not None and spool_files(mta, "queue") == []

    wait_until(finished, timeout=15, what="the background flush to finish")
    assert mta.entries() == []


def test_progress_is_shown_only_on_a_terminal(mta: MtaEnv, plain: SmtpServer) -> None:
    configure(mta, plain_host(plain.port), extra="retry: {schedule: [1s]}\n")
    plain.handler.rejections = {"later@example.net": "451 4.3.0 try later"}
    for _ in range(10):
        enqueue(mta, "later@example.net")

    quiet = mta.run("pymta", ["flush"])
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"", b"")
    assert len(mta.entries()) == 10

    # The same run with stderr on a terminal shows a progress line.
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [script("pymta"), "flush", "--now"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=mta.env,
        )
        os.close(terminal)
        terminal = -1
        shown = _read_terminal(controller, process)
    finally:
        if terminal != -1:
            os.close(terminal)
        os.close(controller)
    assert process.returncode == 0
    assert b"delivering 10/10 (100%)" in shown
    assert len(plain.handler.ehlo_names) == 2


def _read_terminal(controller: int, process: subprocess.Popen[bytes]) -> bytes:
    """Everything written to the terminal until the process ends (EIO once its last user closed it)."""
    shown = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 4096)
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        shown += chunk
    process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return shown


# --- prefetch: the message after next is locked and read while the answer to the one in flight is awaited ---


def spy_on_the_pass(running: Flusher) -> tuple[list[str], list[tuple[str, ...]]]:
    """The due list of the run's first pass, and the events of the run in order: ("prefetch", name) when
    the prefetch looks at a message, ("prefetched", name) when it holds one, ("record", id) when an outcome
    is recorded."""
    due: list[str] = []
    events: list[tuple[str, ...]] = []
    real_due, real_prefetch, real_record = running.due, running._prefetch, running._record

    def spy_due(force: bool) -> list[str]:
        names = real_due(force)
        if not due:  # the first pass's
            due.extend(names)
        return names

    def spy_prefetch() -> None:
        if running._upcoming is not None:
            events.append(("prefetch", running._upcoming))
        real_prefetch()
        if running._prefetched is not None:
            events.append(("prefetched", running._prefetched.name))

    def spy_record(entry: QueueEntry, *args: Any) -> bool:
        events.append(("record", entry.id))
        return real_record(entry, *args)

    running.due = spy_due  # type: ignore[method-assign]
    running._prefetch = spy_prefetch  # type: ignore[method-assign]
    running._record = spy_record  # type: ignore[method-assign]
    return due, events


def test_the_message_after_next_is_read_only_after_the_text_went_out_and_recorded_in_turn(
    mta: MtaEnv,
) -> None:
    # This server answers a text only after it has read the next message's commands: a prefetch that came
    # before that write would wait for an answer that never comes.
    with ScriptedServer(three_pipelined_messages()) as server:
        configure(mta, plain_host(server.port))
        for n in range(3):
            enqueue(mta, f"user{n}@example.net")
        running, _ = flusher(mta)
        due, events = spy_on_the_pass(running)
        seen: list[tuple[int, int]] = []  # at each record: the texts and RCPTs the server had read
        real_record = running._record

        def record(entry: QueueEntry, *args: Any) -> bool:
            seen.append((len(server.data), sum(line.startswith("RCPT") for line in server.lines)))
            return real_record(entry, *args)

        running._record = record  # type: ignore[method-assign]
        spied_prefetch = running._prefetch

        def prefetch() -> None:
            if running._upcoming is not None:  # the second message's commands are out already
                wait_until(lambda: sum(line.startswith("RCPT") for line in server.lines) == 2, what="RCPT")
            spied_prefetch()

        running._prefetch = prefetch  # type: ignore[method-assign]
        progress: list[tuple[int, int]] = []
        report = running.run(progress=lambda done, total: progress.append((done, total)))
        wait_until(server.finished.is_set, what="the script to end")
    assert server.errors == []
    first, second, third = due
    # The third message is locked and read while the answer to the first is awaited, after the first's
    # text and the second's commands went out, and before the first's outcome is written; nothing of the
    # third is recorded before the second is.
    assert events == [
        ("prefetch", third), ("prefetched", third), ("record", first), ("record", second), ("record", third),
    ]  # fmt: skip
    # Each outcome is written before the text of the next message is sent.
    assert seen == [(1, 2), (2, 3), (3, 3)]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert (report.attempted, report.sent, report.deferred, report.failed) == (3, 3, 0, 0)
    assert mta.entries() == []


def test_a_prefetched_message_is_unlocked_when_the_run_fails(mta: MtaEnv) -> None:
    script = [
        *greet(), *FIRST_ENVELOPE, ReadData(), *NEXT_COMMANDS,
        Send("250 2.0.0 queued as 1\n" + NEXT_ACCEPTED), ReadData(),
    ]  # fmt: skip
    with ScriptedServer(script) as server:
        configure(mta, plain_host(server.port))
        for n in range(3):
            enqueue(mta, f"user{n}@example.net")
        running, _ = flusher(mta)
        due, events = spy_on_the_pass(running)

        def record(*args: object) -> bool:
            raise OSError(errno.EIO, "the state cannot be written")

        running._record = record  # type: ignore[method-assign]
        with pytest.raises(OSError, match="state cannot be written"):
            running.run()
        wait_until(server.finished.is_set, what="the script to end")
    assert ("prefetched", due[2]) in events
    assert running._prefetched is None
    assert server.data[1] == b""  # the second message's text never started
    spool = Spool(str(mta.spool))
    for queue_id in due:  # no message is left locked, the prefetched one included
        lock = spool.lock_message(queue_id)
        assert lock is not None
        spool.unlock_message(lock)
    assert sorted(entry.id for entry in mta.entries()) == sorted(due)


@pytest.mark.parametrize("change", ["hold", "delete"])
def test_a_message_held_or_deleted_before_its_prefetch_is_skipped(mta: MtaEnv, change: str) -> None:
    from pymta.queue import ops as queue_ops

    script = [
        *greet(), *FIRST_ENVELOPE, ReadData(), *NEXT_COMMANDS,
        Send("250 2.0.0 queued as 1\n" + NEXT_ACCEPTED), ReadData(), Send("250 2.0.0 queued as 2"),
        Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server:
        configure(mta, plain_host(server.port))
        for n in range(3):
            enqueue(mta, "-N", "never", f"user{n}@example.net")
        running, _ = flusher(mta)
        due, events = spy_on_the_pass(running)
        config = load(str(mta.config))

        def progress(done: int, total: int) -> None:
            if done == 1:  # the first message is in flight; the third is not looked at yet
                [result] = getattr(queue_ops, change)(config, [due[2]])
                assert result.ok, result

        report = running.run(progress=progress)
        wait_until(server.finished.is_set, what="the script to end")
    assert server.errors == []
    assert len(server.data) == 2
    assert ("prefetch", due[2]) in events
    assert ("record", due[2]) not in events
    assert (report.attempted, report.sent) == (2, 2)
    if change == "hold":
        [held] = mta.entries()
        assert (held.id, held.state) == (due[2], "held")
    else:
        assert mta.entries() == []


# --- a state directory that cannot be written: deliver nothing that could not be recorded ---


def test_a_state_directory_without_room_stops_the_flush_before_it_sends_anything(
    mta: MtaEnv, plain: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymta.errors import SpoolFullError
    from pymta.queue import spool as spool_module

    configure(mta, plain_host(plain.port))
    queue_id = enqueue(mta, "ops@example.net")
    monkeypatch.setattr(spool_module, "STATE_MIN_FREE", 2**62)  # more than any disk has free
    run, _ = flusher(mta)
    with pytest.raises(SpoolFullError) as stopped:
        run.run()
    assert "only" in str(stopped.value) and "KiB free: free some space" in str(stopped.value)
    assert "delivering nothing until then" in str(stopped.value)
    assert plain.handler.messages == []
    monkeypatch.setattr(spool_module, "STATE_MIN_FREE", 0)
    flusher(mta)[0].run()
    assert [m.rcpt_tos for m in plain.handler.messages] == [["ops@example.net"]]
    assert queue_id not in spool_files(mta, "queue")


def test_a_state_write_that_fails_mid_run_stops_the_run_with_one_clear_line(
    mta: MtaEnv, plain: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymta.errors import SpoolFullError

    plain.handler.rejections = {"later@example.net": "451 4.3.0 try later"}
    configure(mta, plain_host(plain.port))
    enqueue(mta, "now@example.net", "later@example.net")  # a state to write after the attempt
    enqueue(mta, "now@example.net", "later@example.net")

    def full(self: Spool, target: str, data: bytes, mtime: float | None = None, replace: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(Spool, "_write_private", full)
    run, _ = flusher(mta)
    with pytest.raises(SpoolFullError) as stopped:
        run.run()
    assert str(stopped.value) == (
        f"cannot record the delivery state in {mta.spool / 'state'}: No space left on device; "
        "free some space, then run pymta flush again"
    )
    # The run stopped at the first state it could not write: the second message was not sent.
    assert [m.rcpt_tos for m in plain.handler.messages] == [["now@example.net"]]


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        (OSError(errno.EROFS, "Read-only file system", "/srv/spool/flush.lock"), 73, "check its owner, mode"),
        (OSError(errno.ENOSPC, "No space left on device", "/srv/spool/x"), 75, "free some space"),
    ],
)
def test_an_unwritable_spool_file_is_one_clear_line_and_a_sysexits_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: OSError,
    code: int,
    words: str,
) -> None:
    from pymta.cli import main as cli

    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(cli.cli, "main", fail)
    assert cli.main(["flush"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(raised.filename) in err and words in err, err


def test_ctrl_c_is_75_and_says_what_became_of_the_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import click

    from pymta.cli import main as cli

    def interrupted(*args: object, **kwargs: object) -> None:
        raise click.exceptions.Abort()

    monkeypatch.setattr(cli.cli, "main", interrupted)
    assert cli.main(["flush"]) == 75
    assert "interrupted; what was done before is kept" in capsys.readouterr().err
