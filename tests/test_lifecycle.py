"""A message's whole life (issue 4), end to end: queued with the real `sendmail`, delivered by `pymta flush`
to aiosmtpd on 127.0.0.1, bounced, delayed, expired, held, released, retried, deleted and removed.

Every bounce is checked as the smarthost receives it: from `<>`, parsed back with `email` and read field by
field. Where time must move, an in-process `Flusher` runs with a clock the test controls; everything else
goes through the console scripts (`sendmail`, `pymta flush`, `pymta queue ...`).
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import mailbox
import os
import pwd
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import MtaEnv
from mailservers import Handler, Received, SmtpServer
from test_flush import Clock, configure, enqueue, flush, flusher, log_lines, plain_host, state_of

from pymta.config.load import load
from pymta.errors import SpoolFullError
from pymta.queue import ops as queue_ops
from pymta.queue.entry import NEVER
from pymta.queue.spool import Spool

SENDER = "alice@example.net"  # not local: her bounces go out through the smarthost
UNKNOWN = "550 5.1.1 <bad@example.net>: user unknown"
GREYLISTED = "451 4.7.1 greylisted, try again later"
ORIGINAL = b"To: a@example.net, bad@example.net, c@example.net\nSubject: lifecycle test\n\nHello there.\n"
NO_WARNINGS = "retry: {schedule: [10m], lifetime: 5d, warn_after: never}\n"


@dataclass
class CountingHandler(Handler):
    """A Handler that also records every RCPT it is offered, accepted or not."""

    offered: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.offered.append(address)
        return await super().handle_RCPT(server, session, envelope, address, options)


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    """aiosmtpd without TLS or AUTH, counting every RCPT."""
    with SmtpServer("plain", handler=CountingHandler()) as smtp:
        yield smtp


def offered(server: SmtpServer) -> list[str]:
    handler = server.handler
    assert isinstance(handler, CountingHandler)
    return handler.offered


# --- reading what arrives ---


@dataclass
class Dsn:
    """A delivery status notification as the smarthost received it, taken apart."""

    received: Received
    message: EmailMessage
    text: str
    per_message: Message
    recipients: list[Message]
    returned: Message | None


def parse_dsn(received: Received) -> Dsn:
    assert received.mail_from == "<>", "a DSN comes from the null sender"
    assert received.data.isascii(), "a DSN is 7-bit clean"
    assert all(len(line) <= 998 for line in received.data.split(b"\r\n"))
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message.defects == []
    parts = message.get_payload()
    assert isinstance(parts, list)
    assert 2 <= len(parts) <= 3
    text_part, status_part = parts[0], parts[1]
    assert isinstance(text_part, EmailMessage)
    assert text_part.get_content_type() == "text/plain"
    text = text_part.get_content()
    assert isinstance(text, str)
    assert status_part.get_content_type() == "message/delivery-status"
    blocks = status_part.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    return Dsn(received, message, text, blocks[0], blocks[1:], parts[2] if len(parts) == 3 else None)


def notices(server: SmtpServer) -> list[Received]:
    """What the server received from the null sender: the bounces and delay notices."""
    return [m for m in server.handler.messages if m.mail_from == "<>"]


def originals(server: SmtpServer) -> list[Received]:
    return [m for m in server.handler.messages if m.mail_from != "<>"]


def pymta(mta: MtaEnv, *args: str) -> subprocess.CompletedProcess[bytes]:
    return mta.run("pymta", list(args))


def failed_listing(mta: MtaEnv) -> list[dict[str, object]]:
    result = pymta(mta, "queue", "--state", "failed", "--json")
    assert result.returncode == 0, result.stderr
    listing: list[dict[str, object]] = json.loads(result.stdout)
    return listing


def arrival(dsn: Dsn) -> float:
    date = email.utils.parsedate_to_datetime(str(dsn.per_message["Arrival-Date"]))
    return date.timestamp()


# --- bounces ---


def test_5xx_for_one_of_three_recipients_returns_one_dsn_naming_it_through_the_smarthost(
    mta: MtaEnv, server: SmtpServer
) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(
        mta, "-f", SENDER, "a@example.net", "bad@example.net", "c@example.net", message=ORIGINAL
    )
    queued_at = mta.only_entry().queued_at

    flush(mta)

    [sent] = originals(server)
    assert sent.rcpt_tos == ["a@example.net", "c@example.net"]
    [received] = notices(server)
    assert received.rcpt_tos == [SENDER]
    dsn = parse_dsn(received)
    header = dsn.message
    [author] = header["From"].addresses
    assert (author.username, author.domain) == ("MAILER-DAEMON", "mx.example.org")
    assert header["To"] == SENDER
    assert header["Subject"] == "Undelivered Mail Returned to Sender"
    assert header["Auto-Submitted"] == "auto-replied"
    assert header["Date"] and header["Message-ID"]
    assert "bad@example.net" in dsn.text
    assert "a@example.net" not in dsn.text and "c@example.net" not in dsn.text
    assert "user unknown" in dsn.text
    assert dsn.per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert abs(arrival(dsn) - queued_at) < 1.5
    [recipient] = dsn.recipients
    assert recipient["Final-Recipient"] == "rfc822; bad@example.net"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    # RFC 3464 2.3.5: the host name as configured; its address and port only in the text.
    assert recipient["Remote-MTA"] == "dns; 127.0.0.1"
    assert f"The server 127.0.0.1[127.0.0.1]:{server.port} said:" in " ".join(dsn.text.split())
    assert recipient["Diagnostic-Code"] == f"smtp; {UNKNOWN}"
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "text/rfc822-headers"
    headers = dsn.returned.get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert b"Subject: lifecycle test" in headers
    assert b"Hello there." not in headers  # headers only, without -R full
    # The headers as they went out, with the Date, Message-ID and From the flush added when sending.
    sent_headers = sent.data[: sent.data.index(b"\r\n\r\n") + 2]
    assert headers == sent_headers
    assert b"\r\nMessage-ID: <" + queue_id.encode() + b"@mx.example.org>\r\n" in headers
    assert b"\r\nDate: " in headers and b"\r\nFrom: " in headers

    # The original stays, failed, for the admin to see; its failed recipient is marked as told.
    [listed] = failed_listing(mta)
    assert (listed["id"], listed["state"]) == (queue_id, "failed")
    listed_recipients = listed["recipients"]
    assert isinstance(listed_recipients, list)
    assert [r["address"] for r in listed_recipients if r["status"] == "failed"] == ["bad@example.net"]
    recipients = state_of(mta, queue_id)["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["bad@example.net"]["reported"] is True
    assert [e.id for e in mta.entries()] == [queue_id]  # the DSN itself was delivered and is gone

    # Later flushes, even forced ones, send no second DSN and nothing again.
    flush(mta)
    flush(mta, "--now")
    assert len(server.handler.messages) == 2
    assert offered(server) == ["a@example.net", "bad@example.net", "c@example.net", SENDER]


def test_ret_full_returns_the_whole_small_message(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    enqueue(mta, "-f", SENDER, "-R", "full", "bad@example.net", message=ORIGINAL)

    flush(mta)

    [received] = notices(server)
    dsn = parse_dsn(received)
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "message/rfc822"
    payload = dsn.returned.get_payload()
    assert isinstance(payload, list)
    [returned] = payload
    assert isinstance(returned, EmailMessage)
    assert returned["Subject"] == "lifecycle test"
    assert returned.get_content().strip() == "Hello there."
    assert "whole message is attached" in dsn.text
    # The whole message as it was sent (-R full too): with the header fields the flush completed.
    assert returned["Message-ID"] and returned["Date"] and returned["From"]


def test_notify_never_gets_no_dsn(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "-N", "never", "a@example.net", "bad@example.net")

    flush(mta)
    flush(mta, "--now")

    assert notices(server) == []
    assert [m.rcpt_tos for m in server.handler.messages] == [["a@example.net"]]
    assert SENDER not in offered(server)
    [entry] = mta.entries()
    assert (entry.id, entry.state) == (queue_id, "failed")


def test_expiry_fails_pending_recipients_and_returns_a_5_4_7_dsn(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(
        mta, plain_host(server.port), extra="retry: {schedule: [10m], lifetime: 2h, warn_after: never}\n"
    )
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net", "fast@example.net")
    queued_at = mta.only_entry().queued_at
    first, _ = flusher(mta, Clock(queued_at + 1))
    assert first.run().deferred == 1
    assert notices(server) == []

    late, lines = flusher(mta, Clock(queued_at + 2 * 3600 + 1))
    late.run()

    assert offered(server) == ["slow@example.net", "fast@example.net", SENDER]  # not offered again
    [received] = notices(server)
    assert received.rcpt_tos == [SENDER]
    dsn = parse_dsn(received)
    [recipient] = dsn.recipients
    assert recipient["Final-Recipient"] == "rfc822; slow@example.net"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.4.7"
    # The server answered every time: its last reply is what the sender needs, not "could not be reached".
    assert recipient["Diagnostic-Code"] == f"smtp; {GREYLISTED}"
    assert recipient["Remote-MTA"] == "dns; 127.0.0.1"
    text = " ".join(dsn.text.split())
    assert (
        f"not delivered within 2h; the last reply from 127.0.0.1[127.0.0.1]:{server.port} was: {GREYLISTED}"
        in text
    )
    assert "could not be reached" not in text
    state = state_of(mta, queue_id)
    assert state["state"] == "failed"
    assert "expired" in str(state["last_error"]) and GREYLISTED in str(state["last_error"])
    assert any(f"id={queue_id} to=<slow@example.net>" in line and "status=bounced" in line for line in lines)


def test_a_failed_null_sender_message_is_reported_to_the_admin(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS + "admin: boss@example.net\n")
    queue_id = enqueue(mta, "-f", "", "bad@example.net")

    flush(mta)

    [received] = notices(server)
    assert received.rcpt_tos == ["boss@example.net"]
    dsn = parse_dsn(received)
    assert dsn.message["To"] == "boss@example.net"
    assert "administrator" in dsn.text
    [recipient] = dsn.recipients
    assert recipient["Final-Recipient"] == "rfc822; bad@example.net"
    recipients = state_of(mta, queue_id)["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["bad@example.net"]["reported"] is True


def postmaster_mail(mta: MtaEnv) -> list[mailbox.mboxMessage]:
    """What reached root's mbox in the test's mail spool: postmaster is root (the aliases file says so, as
    pymta's own default does), and the flush runs as root here."""
    path = mta.mail_spool / "root"
    if not path.exists():
        return []
    box = mailbox.mbox(str(path), create=False)
    try:
        return list(box)
    finally:
        box.close()


def final_recipients(notice: mailbox.mboxMessage) -> list[str]:
    """The Final-Recipient fields of a DSN read back from a mailbox."""
    return re.findall(r"^Final-Recipient: rfc822; (\S+)", notice.as_string(), re.MULTILINE)


def test_a_failed_null_sender_message_without_an_admin_goes_to_postmaster_in_roots_mailbox(
    mta: MtaEnv, server: SmtpServer
) -> None:
    """No admin: the double bounce goes to the local postmaster, as Postfix sends it, not nowhere."""
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    (mta.root / "aliases").write_text("postmaster: root\n")
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", "", "bad@example.net")

    result = flush(mta)
    flush(mta, "--now")

    assert server.handler.messages == []
    assert offered(server) == ["bad@example.net"]
    assert not any("nobody can be told" in line for line in log_lines(result))
    [notice] = postmaster_mail(mta)
    assert notice["Subject"] == "Undelivered Mail Returned to Sender"
    assert final_recipients(notice) == ["bad@example.net"]
    assert "for the mail administrator" in " ".join(notice.as_string().split())
    [listed] = failed_listing(mta)
    assert (listed["id"], listed["sender"]) == (queue_id, "")
    assert [e.id for e in mta.entries()] == [queue_id]


def test_a_double_bounce_the_admin_never_takes_goes_to_postmaster_when_it_expires(
    mta: MtaEnv, server: SmtpServer
) -> None:
    """The admin's server keeps answering 4xx: when the double bounce to the admin expires, postmaster
    (root's mailbox) is told, once, and nothing more is sent out."""
    server.handler.rejections = {"bad@example.net": UNKNOWN, "boss@example.net": GREYLISTED}
    (mta.root / "aliases").write_text("postmaster: root\n")
    retry = "retry: {schedule: [10m], lifetime: 1h, warn_after: never}\n"
    configure(mta, plain_host(server.port), extra=retry + "admin: boss@example.net\n")
    queue_id = enqueue(mta, "-f", "", "bad@example.net")
    clock = Clock(mta.only_entry().queued_at)
    flusher(mta, clock)[0].run()
    assert postmaster_mail(mta) == []
    [notice_id] = [e.id for e in mta.entries() if e.id != queue_id]

    clock.now += 3600 + 1
    run, lines = flusher(mta, clock)
    run.run()
    clock.now += 3600 + 1
    flusher(mta, clock)[0].run()

    [notice] = postmaster_mail(mta)
    assert final_recipients(notice) == ["boss@example.net"]
    assert offered(server).count("boss@example.net") == 1  # tried once; then it expired: nothing more
    assert {e.id: e.state for e in mta.entries()} == {queue_id: "failed", notice_id: "failed"}
    assert any(f"id={notice_id} failed for boss@example.net; bounce" in line for line in lines), lines


def test_a_message_no_one_was_told_about_stays_past_failed_retention_and_is_pointed_at(
    mta: MtaEnv, server: SmtpServer
) -> None:
    """No admin, and the notice to postmaster fails too (its alias names no user): that notice reached no
    human. failed_retention removes the messages whose failure someone was told of, never that one; the
    queue listing marks it and says how many there are."""
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    (mta.root / "aliases").write_text("postmaster: nosuchuser-pymta-test\n")
    configure(mta, plain_host(server.port), extra=NO_WARNINGS + "failed_retention: 1d\n")
    queue_id = enqueue(mta, "-f", "", "bad@example.net")
    clock = Clock(mta.only_entry().queued_at)
    flusher(mta, clock)[0].run()
    [notice_id] = [e.id for e in mta.entries() if e.id != queue_id]
    assert {e.id: e.state for e in mta.entries()} == {queue_id: "failed", notice_id: "failed"}

    clock.now += 2 * 86400
    run, lines = flusher(mta, clock)
    run.run()

    assert [e.id for e in mta.entries()] == [notice_id]
    assert any(f"id={queue_id} removed" in line for line in lines)
    assert not any(f"id={notice_id} removed" in line for line in lines)
    table = pymta(mta, "queue").stdout.decode()
    assert "1 failed message no one was told about" in table, table
    below = table.split(notice_id, 1)[1].splitlines()
    assert any("no one was told" in line for line in below[1:3]), table
    shown = pymta(mta, "queue", "show", notice_id).stdout.decode()
    assert "no one was told" in shown, shown
    [details] = json.loads(pymta(mta, "queue", "show", "--json", notice_id).stdout)
    assert details["untold"] is True
    recipients = state_of(mta, notice_id)["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["nosuchuser-pymta-test"]["status"] == "failed"  # postmaster's alias target


def test_an_expiry_with_no_server_answering_keeps_our_own_reason(mta: MtaEnv) -> None:
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        retry = "retry: {schedule: [10m], lifetime: 2h, warn_after: never}\n"
        configure(mta, plain_host(closed.getsockname()[1]), extra=retry)
        queue_id = enqueue(mta, "-f", "", "slow@example.net")  # null sender, no admin: no notice to send
        queued_at = mta.only_entry().queued_at
        flusher(mta, Clock(queued_at + 1))[0].run()
        flusher(mta, Clock(queued_at + 2 * 3600 + 1))[0].run()

    recipients = state_of(mta, queue_id)["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["slow@example.net"]["last_error"] == "5.4.7 expired: not delivered within 2h"


def test_expiry_comes_on_time_not_at_the_next_retry_after_it(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(
        mta, plain_host(server.port), extra="retry: {schedule: [90m], lifetime: 2h, warn_after: never}\n"
    )
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net")
    queued_at = mta.only_entry().queued_at
    flusher(mta, Clock(queued_at))[0].run()
    assert state_of(mta, queue_id)["next_attempt"] == queued_at + 90 * 60
    flusher(mta, Clock(queued_at + 90 * 60))[0].run()
    # The next retry would be at 3:00, an hour after the lifetime ends: it is at 2:00 instead.
    assert state_of(mta, queue_id)["next_attempt"] == queued_at + 2 * 3600
    assert flusher(mta, Clock(queued_at + 2 * 3600 - 1))[0].due(False) == []

    flusher(mta, Clock(queued_at + 2 * 3600))[0].run()

    [received] = notices(server)
    assert parse_dsn(received).recipients[0]["Status"] == "5.4.7"
    assert state_of(mta, queue_id)["state"] == "failed"


def test_a_dsn_to_an_admin_alias_that_fails_causes_no_bounce_storm(mta: MtaEnv, server: SmtpServer) -> None:
    """`admin` is a local alias whose target rejects mail: the double bounce fails under the target's
    address, not the admin's; postmaster is told (locally, the admin rule left out), and then nothing more."""
    reject = "550 5.1.1 no such mailbox"
    server.handler.rejections = {"bad@example.net": reject, "admin-bad@remote.test": reject}
    (mta.root / "aliases").write_text("boss: admin-bad@remote.test\npostmaster: root\n")
    configure(
        mta,
        plain_host(server.port),
        extra=NO_WARNINGS + "admin: boss@example.org\nlocal_domains: [example.org]\n",
    )
    queue_id = enqueue(mta, "-f", "", "bad@example.net")

    for _ in range(5):
        flush(mta, "--now")

    # The original, then one double bounce to the admin (sent to the alias target): then postmaster.
    assert offered(server) == ["bad@example.net", "admin-bad@remote.test"]
    assert server.handler.messages == []
    entries = mta.entries()
    assert len(entries) == 2
    assert {e.state for e in entries} == {"failed"}
    [notice] = [e for e in entries if e.id != queue_id]
    assert notice.dsn_of == queue_id
    [told] = postmaster_mail(mta)
    assert final_recipients(told) == ["admin-bad@remote.test"]


@pytest.mark.parametrize("admin", ["boss@example.net", None])
def test_a_dsn_that_fails_itself_causes_no_bounce_storm(
    mta: MtaEnv, server: SmtpServer, admin: str | None
) -> None:
    reject = "550 5.1.1 no such mailbox"
    server.handler.rejections = {"bad@example.net": reject, SENDER: reject, "boss@example.net": reject}
    (mta.root / "aliases").write_text("postmaster: root\n")
    extra = NO_WARNINGS + (f"admin: {admin}\n" if admin else "")
    configure(mta, plain_host(server.port), extra=extra)
    enqueue(mta, "-f", SENDER, "bad@example.net")

    for _ in range(3):
        flush(mta, "--now")

    # The original, its bounce to the sender, (with an admin) one double bounce, and one notice to
    # postmaster in root's mailbox: then it stops.
    expected = ["bad@example.net", SENDER, *([admin] if admin else [])]
    assert offered(server) == expected
    assert server.handler.messages == []
    entries = mta.entries()
    assert len(entries) == len(expected)
    assert {e.state for e in entries} == {"failed"}
    [told] = postmaster_mail(mta)
    assert final_recipients(told) == [admin or SENDER]


# --- success notices (-N success) ---

OWNER = pwd.getpwuid(os.geteuid()).pw_name  # a local recipient: with no admin, its mail goes to its mailbox


@pytest.mark.parametrize(
    ("notify", "smarthost_dsn", "expected"),
    [
        ("success,failure", False, {OWNER: "delivered", "remote@example.net": "relayed"}),
        ("success", True, {OWNER: "delivered"}),  # the smarthost got NOTIFY=SUCCESS and reports itself
        ("failure", False, {}),
    ],
    ids=["relay without DSN", "relay with DSN", "-N failure"],
)
def test_notify_success_gets_one_notice_for_local_and_relayed_recipients(
    mta: MtaEnv, server: SmtpServer, notify: str, smarthost_dsn: bool, expected: dict[str, str]
) -> None:
    if smarthost_dsn:
        server.handler.extensions = ["DSN"]
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "-N", notify, OWNER, "remote@example.net", message=ORIGINAL)

    flush(mta)
    flush(mta, "--now")

    [sent] = originals(server)
    assert sent.rcpt_tos == ["remote@example.net"]
    if smarthost_dsn:
        assert sent.rcpt_options["remote@example.net"][0].startswith("NOTIFY=SUCCESS")
    assert (mta.mail_spool / OWNER).exists()
    assert mta.entries() == []
    received = notices(server)
    if not expected:
        assert received == []
        return
    [notice] = received
    assert notice.rcpt_tos == [SENDER]
    dsn = parse_dsn(notice)
    assert dsn.message["Subject"] == "Successful Mail Delivery Report"
    assert dsn.message["Auto-Submitted"] == "auto-replied"
    actions = {str(r["Final-Recipient"]).removeprefix("rfc822; "): str(r["Action"]) for r in dsn.recipients}
    assert actions == expected
    for recipient in dsn.recipients:
        assert str(recipient["Status"]).startswith("2.")
        if recipient["Action"] == "relayed":
            assert recipient["Remote-MTA"] == "dns; 127.0.0.1"
            assert str(recipient["Diagnostic-Code"]).startswith("smtp; 250 ")
        else:
            assert recipient["Remote-MTA"] is None
    assert "Your message was delivered to" in " ".join(dsn.text.split())
    assert dsn.returned is not None and dsn.returned.get_content_type() == "text/rfc822-headers"
    assert queue_id in dsn.text


def test_a_null_sender_message_never_gets_a_success_notice(mta: MtaEnv, server: SmtpServer) -> None:
    configure(mta, plain_host(server.port), extra=NO_WARNINGS + "admin: boss@example.net\n")
    enqueue(mta, "-f", "", "-N", "success", "remote@example.net")

    flush(mta)

    assert [m.rcpt_tos for m in server.handler.messages] == [["remote@example.net"]]
    assert mta.entries() == []


# --- the delay warning ---


@pytest.mark.parametrize(
    ("warn_after", "flags", "expected"),
    [("1h", [], 1), ("never", [], 0), ("1h", ["-N", "failure"], 0)],
    ids=["warn_after 1h", "warn_after never", "-N failure"],
)
def test_a_deferred_message_gets_at_most_one_delay_notice(
    mta: MtaEnv, server: SmtpServer, warn_after: str, flags: list[str], expected: int
) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(
        mta,
        plain_host(server.port),
        extra=f"retry: {{schedule: [10m], lifetime: 5d, warn_after: {warn_after}}}\n",
    )
    queue_id = enqueue(mta, "-f", SENDER, *flags, "slow@example.net")
    queued_at = mta.only_entry().queued_at
    clock = Clock(queued_at + 1)
    for _ in range(6):  # at 0:00, 0:21, 0:43, 1:05, 1:26, 1:48: three runs past warn_after
        run, _ = flusher(mta, clock)
        assert run.run().deferred == 1
        clock.now += 1300

    assert offered(server).count("slow@example.net") == 6
    received = notices(server)
    assert len(received) == expected
    [entry] = mta.entries()
    assert (entry.id, entry.state) == (queue_id, "deferred")
    if not expected:
        return
    assert received[0].rcpt_tos == [SENDER]
    dsn = parse_dsn(received[0])
    assert dsn.message["Subject"] == "Delayed Mail (still being retried)"
    assert dsn.message["Auto-Submitted"] == "auto-replied"
    [recipient] = dsn.recipients
    assert recipient["Final-Recipient"] == "rfc822; slow@example.net"
    assert recipient["Action"] == "delayed"
    assert recipient["Status"] == "4.7.1"
    assert recipient["Diagnostic-Code"] == f"smtp; {GREYLISTED}"
    until = email.utils.parsedate_to_datetime(str(recipient["Will-Retry-Until"])).timestamp()
    assert abs(until - (queued_at + 5 * 86400)) < 1.5
    assert "you do not need to send the message again" in dsn.text
    assert entry.warned


# --- queue management, end to end through the CLI ---


def test_a_held_message_is_not_delivered_and_does_not_expire_until_released(
    mta: MtaEnv, server: SmtpServer
) -> None:
    configure(
        mta, plain_host(server.port), extra="retry: {schedule: [10m], lifetime: 1h, warn_after: never}\n"
    )
    held = enqueue(mta, "-f", SENDER, "held@example.net")
    other = enqueue(mta, "-f", SENDER, "other@example.net")

    result = pymta(mta, "queue", "hold", held)
    assert result.returncode == 0, result.stderr
    assert f"{held}: held".encode() in result.stdout
    flush(mta, "--now")

    assert [m.rcpt_tos for m in server.handler.messages] == [["other@example.net"]]
    assert [(e.id, e.state) for e in mta.entries()] == [(held, "held")]
    assert other not in [e.id for e in mta.entries()]

    # Far past its lifetime, a forced run still neither delivers nor expires it.
    queued_at = mta.only_entry().queued_at
    late, _ = flusher(mta, Clock(queued_at + 10 * 3600))
    assert late.run(force=True).attempted == 0
    assert [(e.id, e.state) for e in mta.entries()] == [(held, "held")]
    assert len(server.handler.messages) == 1

    result = pymta(mta, "queue", "release", held)
    assert result.returncode == 0, result.stderr
    assert b"due now" in result.stdout
    flush(mta)

    assert [m.rcpt_tos for m in server.handler.messages] == [["other@example.net"], ["held@example.net"]]
    assert mta.entries() == []


def test_time_on_hold_does_not_count_toward_the_lifetime(mta: MtaEnv, server: SmtpServer) -> None:
    """Held for ten hours with a lifetime of one: released, it is tried again, not bounced at once; it
    expires one lifetime of queue time (hold excluded) after it was queued."""
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(
        mta, plain_host(server.port), extra="retry: {schedule: [10m], lifetime: 1h, warn_after: never}\n"
    )
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net")
    queued_at = mta.only_entry().queued_at
    flusher(mta, Clock(queued_at + 60))[0].run()
    config = load(str(mta.config))
    [held] = queue_ops.hold(config, [queue_id], now=queued_at + 600)
    [released] = queue_ops.release(config, [queue_id], now=queued_at + 600 + 10 * 3600)
    assert held.ok and released.ok and "does not count toward retry.lifetime" in released.detail
    assert state_of(mta, queue_id)["held_seconds"] == 10 * 3600

    run, lines = flusher(mta, Clock(queued_at + 600 + 10 * 3600 + 1))
    assert run.run().deferred == 1

    assert offered(server) == ["slow@example.net", "slow@example.net"]  # tried again, not bounced
    assert notices(server) == []
    state = state_of(mta, queue_id)
    assert state["state"] == "deferred" and state["held_seconds"] == 10 * 3600  # the flush keeps it
    # The retry after the next would be past the end of the lifetime: it comes at that end instead.
    flusher(mta, Clock(queued_at + 10 * 3600 + 3300))[0].run()
    assert state_of(mta, queue_id)["next_attempt"] == queued_at + 10 * 3600 + 3600
    flusher(mta, Clock(queued_at + 10 * 3600 + 3600))[0].run()
    [received] = notices(server)
    assert parse_dsn(received).recipients[0]["Status"] == "5.4.7"
    assert state_of(mta, queue_id)["state"] == "failed"


def test_retry_makes_a_deferred_message_due_now(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net")
    flush(mta)
    assert mta.only_entry().state == "deferred"
    server.handler.rejections = {}

    flush(mta)  # not due for ten minutes: not tried
    assert offered(server) == ["slow@example.net"]

    result = pymta(mta, "queue", "retry", queue_id)
    assert result.returncode == 0, result.stderr
    flush(mta)

    assert offered(server) == ["slow@example.net", "slow@example.net"]
    assert [m.rcpt_tos for m in server.handler.messages] == [["slow@example.net"]]
    assert mta.entries() == []


def test_delete_removes_a_message_without_a_bounce(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net")
    flush(mta)

    result = pymta(mta, "queue", "delete", queue_id)
    assert result.returncode == 0, result.stderr
    assert b"no bounce" in result.stdout
    flush(mta, "--now")

    assert mta.entries() == []
    assert server.handler.messages == []
    assert offered(server) == ["slow@example.net"]
    assert pymta(mta, "queue", "show", queue_id).returncode == 67  # EX_NOUSER: no longer in the queue


def test_queue_bounce_returns_the_message_to_its_sender_at_the_next_flush(
    mta: MtaEnv, server: SmtpServer
) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net", message=ORIGINAL)
    flush(mta)

    result = pymta(mta, "queue", "bounce", queue_id)
    assert result.returncode == 0, result.stderr
    assert notices(server) == []  # the command itself sends nothing
    flush(mta)

    [received] = notices(server)
    assert received.rcpt_tos == [SENDER]
    dsn = parse_dsn(received)
    [recipient] = dsn.recipients
    assert recipient["Final-Recipient"] == "rfc822; slow@example.net"
    assert recipient["Action"] == "failed"
    assert str(recipient["Status"]).startswith("5.")
    assert "bounced by the administrator" in str(recipient["Diagnostic-Code"])
    state = state_of(mta, queue_id)
    assert state["state"] == "failed"
    assert not state.get("bounce_due")
    recipients = state["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["slow@example.net"]["reported"] is True
    assert [item["id"] for item in failed_listing(mta)] == [queue_id]

    flush(mta, "--now")
    assert len(notices(server)) == 1
    assert offered(server) == ["slow@example.net", SENDER]


def test_an_administrators_bounce_is_not_reported_as_an_expiry(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net")
    flush(mta)
    assert pymta(mta, "queue", "bounce", queue_id).returncode == 0

    flush(mta)

    [received] = notices(server)
    dsn = parse_dsn(received)
    [recipient] = dsn.recipients
    assert recipient["Status"] != "5.4.7"
    assert "in the time allowed" not in dsn.text


def test_failed_messages_are_removed_after_failed_retention(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS + "failed_retention: 1d\n")
    old = enqueue(mta, "-f", SENDER, "bad@example.net")
    clock = Clock()
    flusher(mta, clock)[0].run()
    clock.now += 20 * 3600
    young = enqueue(mta, "-f", SENDER, "bad@example.net")
    flusher(mta, clock)[0].run()
    assert sorted((e.id, e.state) for e in mta.entries()) == sorted([(old, "failed"), (young, "failed")])

    clock.now += 5 * 3600  # the old one failed 25 hours ago, the young one 5
    run, lines = flusher(mta, clock)
    run.run()

    assert [(e.id, e.state) for e in mta.entries()] == [(young, "failed")]
    assert any(f"id={old} removed" in line for line in lines)
    assert [item["id"] for item in failed_listing(mta)] == [young]
    assert len(notices(server)) == 2  # one bounce each, and none for the removal


# --- concurrency ---


def test_a_flush_skips_a_message_a_queue_command_holds_and_delivers_it_once_later(
    mta: MtaEnv, server: SmtpServer
) -> None:
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    ids = [enqueue(mta, "-f", SENDER, f"{name}@example.net") for name in ("a", "b", "c")]
    spool = Spool(str(mta.spool))
    spool.pick_up(load(str(mta.config)).max_message_size, lambda line: None)
    lock = spool.lock_message(ids[1])  # what `pymta queue hold/delete/...` holds while it changes a message
    assert lock is not None
    try:
        result = flush(mta, "--now")
        assert sorted(m.rcpt_tos[0] for m in server.handler.messages) == ["a@example.net", "c@example.net"]
        assert any(f"id={ids[1]} is being changed" in line for line in log_lines(result))
        # A queue command meanwhile waits, then says so; the message is untouched.
        busy = pymta(mta, "queue", "delete", "--wait", "0.2", ids[1])
        assert busy.returncode == 75, busy.stderr
        assert [e.id for e in mta.entries()] == [ids[1]]
    finally:
        spool.unlock_message(lock)

    flush(mta)
    flush(mta, "--now")

    assert sorted(m.rcpt_tos[0] for m in server.handler.messages) == [
        "a@example.net",
        "b@example.net",
        "c@example.net",
    ]
    assert sorted(offered(server)) == ["a@example.net", "b@example.net", "c@example.net"]
    assert mta.entries() == []


# --- bad input ---


def test_a_dsn_for_an_original_with_8bit_and_broken_headers_is_valid_and_delivered(
    mta: MtaEnv, server: SmtpServer
) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    original = (
        b"Subject: caf\xe9 \xff\xfe na\xc3\xafve\n"
        b"X-Long: " + b"x" * 1500 + b"\n"
        b"X-Control: a\x01b\x7fc\n"
        b"From: =?utf-8?q?broken <alice@example.net\n"
        b"\n"
        b"caf\xc3\xa9\n"
    )
    queue_id = enqueue(mta, "-f", SENDER, "-R", "full", "bad@example.net", message=original)

    flush(mta)

    [received] = notices(server)
    dsn = parse_dsn(received)  # ASCII, short lines, parses without defects
    [recipient] = dsn.recipients
    assert recipient["Final-Recipient"] == "rfc822; bad@example.net"
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "text/rfc822-headers"  # 8-bit: never message/rfc822
    assert dsn.returned["Content-Transfer-Encoding"] == "quoted-printable"
    headers = dsn.returned.get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert b"caf\xe9 \xff\xfe na\xc3\xafve" in headers
    assert b"x" * 1500 in headers
    assert "8-bit" in dsn.text
    assert [(e.id, e.state) for e in mta.entries()] == [(queue_id, "failed")]


def test_hold_and_release_keep_what_was_reported_so_no_second_bounce(mta: MtaEnv, server: SmtpServer) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN, "a@example.net": GREYLISTED}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "a@example.net", "bad@example.net", message=ORIGINAL)
    flush(mta)
    assert [m.rcpt_tos for m in server.handler.messages] == [[SENDER]]  # the one bounce, for bad@
    for command in ("hold", "release"):
        assert pymta(mta, "queue", command, queue_id).returncode == 0
    assert state_of(mta, queue_id)["recipients"]["bad@example.net"]["reported"] is True  # type: ignore[index]
    server.handler.rejections = {"bad@example.net": UNKNOWN}  # a@ is accepted now
    flush(mta, "--now")
    assert [m.rcpt_tos for m in server.handler.messages] == [[SENDER], ["a@example.net"]]  # no second bounce


# --- a notice our own spool cannot take (ARCHITECTURE.md invariant 3) ---

DISK_FULL = "cannot write the message to the spool: No space left on device; free some space, then send again"


def fail_notices(monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[str]:
    """Make `Spool.submit` of a DSN envelope fail as a full disk does, `times` times; the ids of the
    messages whose notice was refused."""
    refused: list[str] = []
    real_submit = Spool.submit

    def submit(self: Spool, envelope: dict[str, object], message: bytes, **kwargs: bool) -> str:
        if envelope.get("dsn_of") and len(refused) < times:
            refused.append(str(envelope["dsn_of"]))
            raise SpoolFullError(DISK_FULL)
        return real_submit(self, envelope, message, **kwargs)

    monkeypatch.setattr(Spool, "submit", submit)
    return refused


def test_a_bounce_the_spool_cannot_take_stays_owed_and_delivered_mail_is_not_sent_again(
    mta: MtaEnv, server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.handler.rejections = {"bad@example.net": UNKNOWN}
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)  # retry every 10 minutes
    queue_id = enqueue(mta, "-f", SENDER, "good@example.net", "bad@example.net", message=ORIGINAL)
    refused = fail_notices(monkeypatch)
    clock = Clock(mta.only_entry().queued_at + 1)

    run, lines = flusher(mta, clock)
    report = run.run()

    # The outcomes are recorded although the bounce could not be queued.
    assert refused == [queue_id]
    assert (report.sent, report.failed) == (1, 1)
    assert [m.rcpt_tos for m in originals(server)] == [["good@example.net"]]
    assert notices(server) == []
    state = state_of(mta, queue_id)
    recipients = state["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["good@example.net"]["status"] == "delivered"
    assert recipients["bad@example.net"]["status"] == "failed"
    assert not recipients["bad@example.net"].get("reported")
    assert (state["state"], state["bounce_due"]) == ("failed", True)
    [logged] = [line for line in lines if "cannot queue" in line]
    assert logged == (
        f"id={queue_id} cannot queue the bounce to <{SENDER}>: {DISK_FULL}; it stays owed, and a later run "
        "queues it"
    )
    # Owed, so due again on the retry schedule, and never expired meanwhile.
    spool = Spool(str(mta.spool))
    assert spool.due(clock.now + 599) == []
    assert spool.due(clock.now + 600) == [queue_id]
    assert queue_ops.expire_failed(spool, load(str(mta.config)), clock.now + 365 * 86400) == []

    # The next run finds only the bounce owed: it queues it (and delivers it), sends nothing else again.
    clock.now += 600
    run, lines = flusher(mta, clock)
    run.run()

    assert offered(server) == ["good@example.net", "bad@example.net", SENDER]
    [received] = notices(server)
    assert received.rcpt_tos == [SENDER]
    [recipient] = parse_dsn(received).recipients
    assert recipient["Final-Recipient"] == "rfc822; bad@example.net"
    assert any(f"id={queue_id} failed for bad@example.net; bounce " in line for line in lines)
    state = state_of(mta, queue_id)
    recipients = state["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["bad@example.net"]["reported"] is True
    assert state["state"] == "failed" and not state.get("bounce_due") and state["next_attempt"] is None
    assert spool.due(NEVER - 1) == []

    flush(mta, "--now")
    assert offered(server) == ["good@example.net", "bad@example.net", SENDER]


def test_a_delay_notice_the_spool_cannot_take_is_tried_at_the_next_attempt(
    mta: MtaEnv, server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.handler.rejections = {"slow@example.net": GREYLISTED}
    configure(mta, plain_host(server.port), extra="retry: {schedule: [10m], lifetime: 5d, warn_after: 1h}\n")
    queue_id = enqueue(mta, "-f", SENDER, "slow@example.net")
    refused = fail_notices(monkeypatch)
    clock = Clock(mta.only_entry().queued_at + 1)
    flusher(mta, clock)[0].run()
    clock.now += 2 * 3600

    run, lines = flusher(mta, clock)
    run.run()

    assert refused == [queue_id]
    assert notices(server) == []
    assert not state_of(mta, queue_id)["warned"]
    assert f"id={queue_id} cannot queue the delay notice to <{SENDER}>: {DISK_FULL}" in "\n".join(lines)

    clock.now += 600
    flusher(mta, clock)[0].run()
    clock.now += 600
    flusher(mta, clock)[0].run()

    [received] = notices(server)
    assert parse_dsn(received).message["Subject"] == "Delayed Mail (still being retried)"
    assert state_of(mta, queue_id)["warned"] is True
    assert offered(server).count("slow@example.net") == 4


def test_a_success_notice_the_spool_cannot_take_is_lost_and_the_delivery_recorded(
    mta: MtaEnv, server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    queue_id = enqueue(mta, "-f", SENDER, "-N", "success", "remote@example.net")
    refused = fail_notices(monkeypatch)

    run, lines = flusher(mta, Clock())
    run.run()

    assert refused == [queue_id]
    assert mta.entries() == []  # delivered, and gone
    assert (
        f"id={queue_id} cannot queue the success notice to <{SENDER}>: {DISK_FULL}; the notice is lost"
        in lines
    )
    flush(mta, "--now")
    assert offered(server) == ["remote@example.net"]
    assert notices(server) == []


# --- notices that are about different things look different ---


def test_each_bounce_and_success_notice_of_one_message_has_its_own_message_id(
    mta: MtaEnv, server: SmtpServer
) -> None:
    """Run 1: ok@ delivered, bad@ refused, slow@ and later@ put off. Run 2: slow@ delivered, later@ refused.
    Two bounces and two success notices, each with a Message-ID of its own."""
    server.handler.rejections = {
        "bad@example.net": UNKNOWN,
        "slow@example.net": GREYLISTED,
        "later@example.net": GREYLISTED,
    }
    configure(mta, plain_host(server.port), extra=NO_WARNINGS)
    recipients = ["ok@example.net", "bad@example.net", "slow@example.net", "later@example.net"]
    enqueue(mta, "-f", SENDER, "-N", "success,failure", *recipients, message=ORIGINAL)
    flush(mta)
    server.handler.rejections = {"bad@example.net": UNKNOWN, "later@example.net": UNKNOWN}
    flush(mta, "--now")

    dsns = [parse_dsn(received) for received in notices(server)]
    reported = sorted(
        (str(dsn.recipients[0]["Action"]), str(dsn.recipients[0]["Final-Recipient"])) for dsn in dsns
    )
    assert reported == [
        ("failed", "rfc822; bad@example.net"),
        ("failed", "rfc822; later@example.net"),
        ("relayed", "rfc822; ok@example.net"),
        ("relayed", "rfc822; slow@example.net"),
    ]
    ids = [str(dsn.message["Message-ID"]) for dsn in dsns]
    assert len(set(ids)) == 4, ids


def test_a_success_notice_reports_an_alias_as_expanded_and_never_its_targets(
    mta: MtaEnv, server: SmtpServer
) -> None:
    (mta.root / "aliases").write_text(f"team: {OWNER}, outside@example.net\n")
    configure(mta, plain_host(server.port), extra=NO_WARNINGS + "local_domains: [example.org]\n")
    enqueue(mta, "-f", SENDER, "-N", "success", "team", "direct@example.net", message=ORIGINAL)

    flush(mta)
    flush(mta, "--now")

    [sent] = originals(server)
    assert sorted(sent.rcpt_tos) == ["direct@example.net", "outside@example.net"]
    assert (mta.mail_spool / OWNER).exists()
    [received] = notices(server)  # one notice: the expansion is reported once
    dsn = parse_dsn(received)
    actions = {str(r["Final-Recipient"]): str(r["Action"]) for r in dsn.recipients}
    assert actions == {"rfc822; team": "expanded", "rfc822; direct@example.net": "relayed"}
    assert b"outside@example.net" not in received.data
    assert f"{OWNER}@".encode() not in received.data and f"; {OWNER}\r".encode() not in received.data
    text = " ".join(dsn.text.split())
    assert "Your message was delivered to its 2 recipients, as you asked" in text


def test_a_smarthost_that_reports_itself_is_not_asked_for_success_of_alias_targets(
    mta: MtaEnv, server: SmtpServer
) -> None:
    server.handler.extensions = ["DSN"]  # it takes NOTIFY and reports delivery itself
    (mta.root / "aliases").write_text("team: outside@example.net\n")
    configure(mta, plain_host(server.port), extra=NO_WARNINGS + "local_domains: [example.org]\n")
    enqueue(mta, "-f", SENDER, "-N", "success,failure", "team", "direct@example.net", message=ORIGINAL)

    flush(mta)

    [sent] = originals(server)
    assert sent.rcpt_options["direct@example.net"][0] == "NOTIFY=SUCCESS,FAILURE"
    assert sent.rcpt_options["outside@example.net"][0] == "NOTIFY=FAILURE"  # RFC 3461 5.2.7.3
    [received] = notices(server)  # ours reports only the expansion; the smarthost reports the rest
    actions = {str(r["Final-Recipient"]): str(r["Action"]) for r in parse_dsn(received).recipients}
    assert actions == {"rfc822; team": "expanded"}
