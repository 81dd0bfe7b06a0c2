"""Delivery status notifications: every DSN parsed back with `email` and checked field by field, the NOTIFY
and double-bounce decisions, and a property test that any original gives a valid, 7-bit clean DSN."""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import re
from email.message import EmailMessage, Message
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.mail import dsn as bounce
from pymta.mail import message as message_module
from pymta.mail import mime
from pymta.mail.dsn import FULL_RETURN_LIMIT, ReportedRecipient, build_dsn, status_code
from pymta.mail.message import header_fields
from pymta.queue import notices
from pymta.queue.entry import MessageState, QueueEntry, RecipientStatus
from pymta.queue.notices import bounce_recipient, delay_warning_due, dsn_envelope, reported_recipients, wants
from pymta.queue.spool import Spool

HOST = "mx.example.net"
QUEUED = 1_700_000_000.0
NOW = QUEUED + 3600
LAST = QUEUED + 3000
ID = "6553f10012345678abcdef01"
USER_UNKNOWN = "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown"
GREYLISTED = "451 4.7.1 <carol@example.com>: greylisted, try again later"
EXPIRED = "expired: not delivered within 5d"

ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com, carol@example.com, dave@example.com\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <report-1@example.org>\r\n"
    b"\r\n"
    b"Numbers attached.\r\n"
)
ORIGINAL_HEADERS = ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]


def make_entry(
    *,
    sender: str = "alice@example.org",
    statuses: dict[str, tuple[str, str | None]] | None = None,
    notify: str | None = None,
    ret: str | None = None,
    envid: str | None = None,
    queued_at: float = QUEUED,
    entry_id: str = ID,
    via: dict[str, str] | None = None,
) -> QueueEntry:
    """A queue entry as the spool reads it: bob failed with a 550, carol deferred, dave delivered. `via`:
    the recipients that are alias targets, and the address each came from."""
    if statuses is None:
        statuses = {
            "bob@example.com": ("failed", USER_UNKNOWN),
            "carol@example.com": ("deferred", GREYLISTED),
            "dave@example.com": ("delivered", None),
        }
    envelope: dict[str, object] = {
        "v": 1,
        "id": entry_id,
        "sender": sender,
        "recipients": [address for address in statuses if address not in (via or {})],
        "submitted_by": "alice",
        "uid": 1000,
        "full_name": "Alice",
        "queued_at": queued_at,
        "notify": notify,
        "ret": ret,
        "envid": envid,
        "body_type": None,
    }
    state: dict[str, object] = {
        "state": "deferred",
        "attempts": 2,
        "recipients": {
            address: {"status": status, "last_error": error}
            | ({"via": (via or {})[address]} if address in (via or {}) else {})
            for address, (status, error) in statuses.items()
        },
    }
    return QueueEntry(
        "queue", f"/spool/queue/{entry_id}", envelope, MessageState.from_json(state), 1234, 1000
    )


def parse(dsn: bytes) -> EmailMessage:
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[Message]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


def report_blocks(message: EmailMessage) -> list[Message]:
    """The message/delivery-status part as `email` reads it: the per-message block, then one per recipient."""
    status_part = parts(message)[1]
    assert status_part.get_content_type() == "message/delivery-status"
    blocks = status_part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def text_of(message: EmailMessage) -> str:
    first = parts(message)[0]
    assert isinstance(first, EmailMessage)
    assert first.get_content_type() == "text/plain"
    content = first.get_content()
    assert isinstance(content, str)
    return content


def failed_dsn(**kwargs: object) -> bytes:
    entry = make_entry(**kwargs)  # type: ignore[arg-type]
    recipients = reported_recipients(entry, "failed", remote_mta="smtp.example.com", last_attempt=LAST)
    return build_dsn(entry, ORIGINAL, recipients, action="failed", to=entry.sender, hostname=HOST, now=NOW)


def assert_seven_bit_clean(dsn: bytes) -> None:
    assert dsn.isascii()
    assert b"\0" not in dsn
    assert dsn.endswith(b"\r\n")
    for line in dsn.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 998


# --- A failed DSN, field by field ---


def test_failed_dsn_top_level_header() -> None:
    message = parse(failed_dsn())
    assert message.defects == []
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    assert message["To"] == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Message-ID"] == bounce.dsn_message_id(ID, "failed", HOST, ["bob@example.com"])
    assert re.fullmatch(rf"<{ID}\.failed\.[0-9a-f]{{16}}@{re.escape(HOST)}>", message["Message-ID"])
    assert message["In-Reply-To"] == "<report-1@example.org>"
    assert message["References"] == "<report-1@example.org>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_failed_dsn_reports_exactly_the_failed_recipient() -> None:
    message = parse(failed_dsn(envid="QQ314159"))
    per_message, *per_recipient = report_blocks(message)
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["X-Pymta-Queue-ID"] == ID
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == QUEUED
    assert len(per_recipient) == 1
    block = per_recipient[0]
    assert block["Final-Recipient"] == "rfc822; bob@example.com"
    assert block["Original-Recipient"] is None
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; smtp.example.com"
    assert block["Diagnostic-Code"] == f"smtp; {USER_UNKNOWN}"
    assert email.utils.parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() == LAST
    assert block["Will-Retry-Until"] is None


def test_failed_dsn_text_says_what_happened_in_plain_english() -> None:
    text = text_of(parse(failed_dsn()))
    assert "could not be delivered to 1 of its 3 recipients" in text
    assert "bob@example.com" in text
    assert "carol@example.com" not in text and "dave@example.com" not in text
    assert "The mailbox does not exist (5.1.1)" in text
    assert f"The server smtp.example.com said: {USER_UNKNOWN}" in " ".join(text.split())
    assert "What you can do" in text and "typing mistakes" in text
    assert "Subject:   Quarterly report" in text
    assert "headers of the message are attached" in text


def test_headers_part_holds_the_original_header_block() -> None:
    returned = parts(parse(failed_dsn()))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "7bit"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS


def test_no_envelope_id_no_original_envelope_id_field() -> None:
    per_message = report_blocks(parse(failed_dsn()))[0]
    assert per_message["Original-Envelope-Id"] is None


def test_expired_recipients_are_5_4_7_with_our_own_reason() -> None:
    entry = make_entry(
        statuses={
            "bob@example.com": ("failed", USER_UNKNOWN),
            "carol@example.com": ("failed", EXPIRED),
        }
    )
    recipients = reported_recipients(entry, "failed", remote_mta="smtp.example.com", last_attempt=LAST)
    message = parse(
        build_dsn(entry, ORIGINAL, recipients, action="failed", to=entry.sender, hostname=HOST, now=NOW)
    )
    bob, carol = report_blocks(message)[1:]
    assert bob["Status"] == "5.1.1"
    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Status"] == "5.4.7"
    assert carol["Remote-MTA"] is None  # no server said this
    assert carol["Diagnostic-Code"] == f"X-pymta; {EXPIRED}"
    text = text_of(message)
    assert "could not be delivered to any of its 2 recipients" in text
    assert "in the time allowed (5.4.7)" in text


def test_an_expired_recipient_keeps_the_last_reply_of_the_server_that_gave_it() -> None:
    reason = notices.expiry("2h", "451 4.3.0 try later", "smtp.example.com[192.0.2.7]:587").reason
    assert reason == (
        "5.4.7 expired: not delivered within 2h; "
        "the last reply from smtp.example.com[192.0.2.7]:587 was: 451 4.3.0 try later"
    )
    entry = make_entry(statuses={"slow@example.com": ("failed", reason)})
    recipients = reported_recipients(entry, "failed", remote_mta=None, last_attempt=LAST)
    message = parse(
        build_dsn(entry, ORIGINAL, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    block = report_blocks(message)[1]
    assert block["Status"] == "5.4.7"
    assert block["Diagnostic-Code"] == "smtp; 451 4.3.0 try later"
    assert block["Remote-MTA"] == "dns; smtp.example.com"
    text = " ".join(text_of(message).split())
    assert (
        "(5.4.7): not delivered within 2h; "
        "the last reply from smtp.example.com[192.0.2.7]:587 was: 451 4.3.0 try later"
    ) in text
    assert "kept putting the message off" in text
    assert "could not be reached" not in text


def test_an_expired_recipient_is_reported_from_its_typed_expiry_not_from_its_reason_text() -> None:
    expired = notices.expiry("2h", "451 4.3.0 try later", "smtp.example.com[192.0.2.7]:587")
    record = {"status": "failed", "last_error": "shown to people only", "expired": expired.to_json()}
    state = MessageState.from_json({"recipients": {"slow@example.com": record}})
    assert state.recipients["slow@example.com"].expired == expired
    envelope: dict[str, object] = {"v": 1, "id": ID, "sender": "a@b.c", "recipients": ["slow@example.com"]}
    entry = QueueEntry("queue", "/spool/queue/x", envelope, state, 10, 1000)
    (reported,) = reported_recipients(entry, "failed", remote_mta=None, last_attempt=LAST)
    assert (reported.status, reported.diagnostic) == ("5.4.7", "451 4.3.0 try later")
    assert (reported.remote_mta, reported.expired_after) == ("smtp.example.com[192.0.2.7]:587", "2h")


def test_an_expiry_survives_the_state_file(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    envelope: dict[str, object] = {"sender": "a@b.c", "recipients": ["slow@example.com"], "queued_at": QUEUED}
    queue_id = spool.submit(envelope, b"x\n", create_parents=True)
    assert spool.pick_up(10**6, pytest.fail) == [queue_id]
    relay = "smtp.example.com[192.0.2.7]:587"
    reason = notices.expiry("2h", "451 4.3.0 try later", relay).reason
    record = {"status": "failed", "last_error": reason}
    state = MessageState.from_json({"state": "failed", "recipients": {"slow@example.com": record}})
    spool.write_state(queue_id, state, QUEUED)
    written = json.loads((tmp_path / "spool" / "state" / queue_id).read_bytes())
    expected = {"within": "2h", "reply": "451 4.3.0 try later", "relay": relay}
    assert written["recipients"]["slow@example.com"]["expired"] == expected
    (recipient,) = spool.read_entry("queue", queue_id).recipients
    assert recipient.expired == notices.expiry("2h", "451 4.3.0 try later", relay)


def test_an_expired_recipient_no_server_answered_keeps_our_own_reason() -> None:
    reason = notices.expiry("2h", "smtp.example.com: cannot connect: refused", "none").reason
    assert reason == "5.4.7 expired: not delivered within 2h"
    entry = make_entry(statuses={"slow@example.com": ("failed", reason)})
    message = parse(failed_dsn_of(entry))
    block = report_blocks(message)[1]
    assert (block["Status"], block["Remote-MTA"]) == ("5.4.7", None)
    assert block["Diagnostic-Code"] == f"X-pymta; {reason}"
    assert "could not be reached for a long time" in " ".join(text_of(message).split())


@pytest.mark.parametrize(
    ("relay", "name"),
    [
        ("smtp.example.com[192.0.2.7]:587", "smtp.example.com"),
        ("smtp.example.com:587", "smtp.example.com"),
        ("smtp.example.com", "smtp.example.com"),
        ("127.0.0.1[127.0.0.1]:2599", "127.0.0.1"),
        ("::1", "::1"),
    ],
)
def test_remote_mta_is_the_configured_host_name_without_address_or_port(relay: str, name: str) -> None:
    assert bounce.remote_mta_name(relay) == name
    entry = make_entry()
    recipients = reported_recipients(entry, "failed", remote_mta=relay)
    message = parse(
        build_dsn(entry, ORIGINAL, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    assert report_blocks(message)[1]["Remote-MTA"] == f"dns; {name}"
    assert f"The server {relay} said:" in " ".join(text_of(message).split())


def test_success_notices_delivered_and_relayed() -> None:
    entry = make_entry(notify="success")
    reported = [
        ReportedRecipient("dave@example.com", "2.0.0", last_attempt=LAST, action="delivered"),
        ReportedRecipient(
            "erin@example.com", "2.0.0", "250 2.0.0 OK", "smtp.example.com:25", LAST, action="relayed"
        ),
    ]
    message = parse(
        build_dsn(entry, ORIGINAL, reported, action="delivered", to=entry.sender, hostname=HOST, now=NOW)
    )
    assert message["Subject"] == "Successful Mail Delivery Report"
    expected_id = bounce.dsn_message_id(ID, "delivered", HOST, ["dave@example.com", "erin@example.com"])
    assert message["Message-ID"] == expected_id
    delivered, relayed = report_blocks(message)[1:]
    assert (delivered["Action"], delivered["Status"], delivered["Remote-MTA"]) == ("delivered", "2.0.0", None)
    assert (relayed["Action"], relayed["Status"]) == ("relayed", "2.0.0")
    assert relayed["Remote-MTA"] == "dns; smtp.example.com"
    assert relayed["Diagnostic-Code"] == "smtp; 250 2.0.0 OK"
    text = " ".join(text_of(message).split())
    assert "Your message was delivered to" in text
    assert "Delivered to the recipient's mailbox (2.0.0)" in text
    assert "Passed on to a mail server that does not report on delivery" in text
    assert "What you can do" not in text
    assert parts(message)[2]["Content-Description"] == "Message headers"


def success_text(entry: QueueEntry, delivered: list[str], action: bounce.Action = "delivered") -> str:
    reported = [
        ReportedRecipient(address, "2.0.0", last_attempt=LAST, action=action) for address in delivered
    ]
    dsn = build_dsn(entry, ORIGINAL, reported, action=action, to=entry.sender, hostname=HOST, now=NOW)
    return " ".join(text_of(parse(dsn)).split())


@pytest.mark.parametrize(
    ("statuses", "delivered", "whom"),
    [({"dave@example.com": ("delivered", None)}, ["dave@example.com"], "its recipient"),
     ({"dave@example.com": ("delivered", None), "erin@example.com": ("delivered", None)},
      ["dave@example.com", "erin@example.com"], "its 2 recipients"),
     ({"dave@example.com": ("delivered", None), "erin@example.com": ("delivered", None),
       "bob@example.com": ("deferred", GREYLISTED)},
      ["dave@example.com", "erin@example.com"], "2 of its 3 recipients"),
     ({"dave@example.com": ("delivered", None), "bob@example.com": ("deferred", GREYLISTED)},
      ["dave@example.com"], "1 of its 2 recipients")],
    ids=["one of one", "all of two", "two of three", "one of two"],
)  # fmt: skip
def test_a_success_notice_says_how_many_recipients_it_reports(
    statuses: dict[str, tuple[str, str | None]], delivered: list[str], whom: str
) -> None:
    text = success_text(make_entry(notify="success", statuses=statuses), delivered)
    assert f"Your message was delivered to {whom}, as you asked" in text
    assert "any of its" not in text


def test_a_success_notice_counts_the_recipients_the_sender_named_not_alias_targets() -> None:
    """`team` expanded to three addresses: the sender named two recipients, and both were delivered."""
    statuses: dict[str, tuple[str, str | None]] = {
        "dave@example.com": ("delivered", None),
        "team": ("expanded", None),
        "ann@example.com": ("delivered", None),
        "ben@example.com": ("delivered", None),
        "cat@example.com": ("deferred", GREYLISTED),
    }
    via = {"ann@example.com": "team", "ben@example.com": "team", "cat@example.com": "team"}
    entry = make_entry(notify="success", statuses=statuses, via=via)
    text = success_text(entry, ["dave@example.com", "team"])
    assert "Your message was delivered to its 2 recipients, as you asked" in text


def test_an_expanded_recipient_is_reported_as_expanded_without_its_targets() -> None:
    entry = make_entry(
        notify="success",
        statuses={"team": ("expanded", None), "ann@example.com": ("delivered", None)},
        via={"ann@example.com": "team"},
    )
    reported = [
        ReportedRecipient("team", status_code(None, "expanded"), last_attempt=LAST, action="expanded")
    ]
    dsn = build_dsn(entry, ORIGINAL, reported, action="delivered", to=entry.sender, hostname=HOST, now=NOW)
    message = parse(dsn)
    [block] = report_blocks(message)[1:]
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; team",
        "expanded",
        "2.0.0",
    )
    text = " ".join(text_of(message).split())
    assert "Your message was delivered to its recipient" in text
    assert "passed on to the addresses it stands for" in text
    assert "ann@example.com" not in dsn.decode()
    assert message["Subject"] == "Successful Mail Delivery Report"


def test_notices_about_other_recipients_have_other_message_ids_and_a_rebuild_the_same() -> None:
    """A message gets a bounce per run in which recipients fail and a success notice per run that delivers
    some: each has an id of its own; the same notice built again keeps its id."""
    entry = make_entry(notify="success")

    def message_id(action: bounce.Action, addresses: list[str]) -> str:
        status = "5.1.1" if action == "failed" else "2.0.0"
        reported = [ReportedRecipient(address, status, action=action) for address in addresses]
        dsn = build_dsn(entry, ORIGINAL, reported, action=action, to=entry.sender, hostname=HOST, now=NOW)
        return str(parse(dsn)["Message-ID"])

    first_bounce = message_id("failed", ["bob@example.com"])
    second_bounce = message_id("failed", ["carol@example.com"])
    first_success = message_id("delivered", ["dave@example.com"])
    second_success = message_id("delivered", ["erin@example.com", "frank@example.com"])
    assert len({first_bounce, second_bounce, first_success, second_success}) == 4
    assert message_id("failed", ["bob@example.com"]) == first_bounce
    assert message_id("delivered", ["frank@example.com", "erin@example.com"]) == second_success


def test_the_line_limit_is_the_one_of_the_message_module() -> None:
    assert mime.MAX_LINE is message_module.MAX_LINE


@pytest.mark.parametrize(
    ("notify", "sender", "wanted"),
    [(None, "alice@example.org", False), ("success", "alice@example.org", True),
     ("failure", "alice@example.org", False), ("SUCCESS,FAILURE", "alice@example.org", True),
     ("never", "alice@example.org", False), ("success", "", False)],
)  # fmt: skip
def test_success_notices_only_when_asked_and_never_for_the_null_sender(
    notify: str | None, sender: str, wanted: bool
) -> None:
    entry = make_entry(notify=notify, sender=sender)
    assert wants(entry, "delivered") is wanted
    assert wants(entry, "relayed") is wanted


def failed_dsn_of(entry: QueueEntry) -> bytes:
    recipients = reported_recipients(entry, "failed", remote_mta="none", last_attempt=LAST)
    return build_dsn(entry, ORIGINAL, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)


def test_original_recipient_and_missing_details() -> None:
    entry = make_entry()
    recipient = ReportedRecipient("bob@example.com", "5.0.0", original_recipient="postmaster")
    message = parse(
        build_dsn(entry, ORIGINAL, [recipient], action="failed", to=entry.sender, hostname=HOST, now=NOW)
    )
    block = report_blocks(message)[1]
    assert block["Original-Recipient"] == "rfc822; postmaster"
    assert block["Final-Recipient"] == "rfc822; bob@example.com"
    for absent in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert block[absent] is None


def test_dsn_is_the_same_every_time_it_is_built() -> None:
    assert failed_dsn() == failed_dsn()
    addresses = ["carol@example.com", "Bob@example.com"]
    same = bounce.dsn_message_id(ID, "delayed", HOST, ["bob@example.com", "carol@example.com"])
    assert bounce.dsn_message_id(ID, "delayed", HOST, addresses) == same


def test_message_id_of_the_original_when_it_had_none_is_the_one_delivery_gave() -> None:
    entry = make_entry()
    original = b"Subject: no id\r\n\r\nbody\r\n"
    recipients = reported_recipients(entry, "failed")
    message = parse(
        build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    assert message["References"] == f"<{ID}@{HOST}>"


def test_a_broken_message_id_is_not_referenced() -> None:
    entry = make_entry()
    original = b"Message-ID: <bro ken\xff@x>\r\n\r\nbody\r\n"
    recipients = reported_recipients(entry, "failed")
    message = parse(
        build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    assert message["References"] is None and message["In-Reply-To"] is None


# --- -R full ---


def test_ret_full_returns_the_whole_small_original() -> None:
    message = parse(failed_dsn(ret="full"))
    returned = parts(message)[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert isinstance(inner, EmailMessage)
    assert inner["Subject"] == "Quarterly report"
    assert inner.as_bytes(policy=email.policy.SMTP) == ORIGINAL
    assert "The whole message is attached" in text_of(message)


def test_ret_full_too_large_returns_headers_and_says_so() -> None:
    entry = make_entry(ret="full")
    original = ORIGINAL_HEADERS + b"\r\n" + (b"y" * 70 + b"\r\n") * (FULL_RETURN_LIMIT // 72 + 1)
    assert len(original) > FULL_RETURN_LIMIT
    recipients = reported_recipients(entry, "failed")
    message = parse(
        build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    returned = parts(message)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS
    text = " ".join(text_of(message).split())
    assert "only its headers are attached below: it is too large" in text
    assert "256 KiB" in text


def test_ret_full_with_8bit_body_returns_headers_and_says_why() -> None:
    entry = make_entry(ret="full")
    original = ORIGINAL_HEADERS + b"\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    recipients = reported_recipients(entry, "failed")
    dsn = build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    assert_seven_bit_clean(dsn)
    message = parse(dsn)
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"
    assert "8-bit or binary data" in " ".join(text_of(message).split())


def test_ret_full_does_not_apply_to_delay_warnings() -> None:
    entry = make_entry(ret="full")
    recipients = reported_recipients(entry, "delayed")
    message = parse(
        build_dsn(entry, ORIGINAL, recipients, action="delayed", to="a@b.c", hostname=HOST, now=NOW)
    )
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"


def test_boundary_never_occurs_in_a_returned_message() -> None:
    first = parse(failed_dsn(ret="full"))
    boundary = first.get_boundary()
    assert boundary is not None
    entry = make_entry(ret="full")
    original = ORIGINAL + f"--{boundary}\r\n--{boundary}--\r\n".encode()
    recipients = reported_recipients(entry, "failed")
    message = parse(
        build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    assert message.get_boundary() != boundary
    assert len(parts(message)) == 3
    inner = parts(message)[2].get_payload()[0]
    assert isinstance(inner, EmailMessage)
    assert inner.as_bytes(policy=email.policy.SMTP) == original


# --- Bad originals ---

EIGHT_BIT_HEADERS = (
    b"From: root (Cron Daemon)\r\n"
    b"Subject: Cron <root@host> /usr/local/bin/r\xc3\xa9sum\xc3\xa9 --all \xff\xfe\r\n"
    b"X-Null: a\x00b\r\n"
    b"X-Long: " + b"z" * 1500 + b"\r\n"
    b"X-Trailing: space \r\n"
    b"\r\n"
    b"body\r\n"
)


def test_8bit_nul_and_long_header_lines_go_quoted_printable_and_come_back_exactly() -> None:
    entry = make_entry()
    recipients = reported_recipients(entry, "failed")
    dsn = build_dsn(entry, EIGHT_BIT_HEADERS, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    assert_seven_bit_clean(dsn)
    message = parse(dsn)
    assert message.defects == []
    returned = parts(message)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    expected = b"".join(raw for _, raw in header_fields(EIGHT_BIT_HEADERS))
    assert returned.get_payload(decode=True) == expected
    text = text_of(message)
    assert "Subject:   Cron <root@host> /usr/local/bin/résumé --all \ufffd\ufffd" in text


def test_broken_header_block_and_bare_line_endings() -> None:
    original = b"Subject: =?utf-8?q?broken=ZZ?=\n\tcontinued\rnot a header line\n\nbody\x00\r\n"
    entry = make_entry()
    recipients = reported_recipients(entry, "failed")
    dsn = build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    assert_seven_bit_clean(dsn)
    message = parse(dsn)
    returned = parts(message)[2]
    assert returned.get_payload(decode=True) == b"Subject: =?utf-8?q?broken=ZZ?=\r\n\tcontinued\r\n"


def test_original_without_header_block() -> None:
    original = b"just some text from a careless script\r\n"
    entry = make_entry()
    recipients = reported_recipients(entry, "failed")
    message = parse(
        build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    assert [part.get_content_type() for part in parts(message)] == ["text/plain", "message/delivery-status"]
    assert "no header fields, so none are attached" in text_of(message)
    assert message["References"] == f"<{ID}@{HOST}>"


def test_original_without_header_block_returned_in_full_is_all_body() -> None:
    original = b"Dear Bob, no header here\r\nSubject: still body\r\n"
    entry = make_entry(ret="full")
    recipients = reported_recipients(entry, "failed")
    message = parse(
        build_dsn(entry, original, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    )
    inner = parts(message)[2].get_payload()[0]
    assert isinstance(inner, EmailMessage)
    assert list(inner.keys()) == []
    assert inner.get_payload() == "Dear Bob, no header here\r\nSubject: still body\r\n"


def test_empty_original() -> None:
    entry = make_entry(ret="full")
    recipients = reported_recipients(entry, "failed")
    dsn = build_dsn(entry, b"", recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    assert_seven_bit_clean(dsn)
    assert len(parts(parse(dsn))) == 3


def test_non_ascii_addresses_and_replies_are_escaped_in_the_report_and_readable_in_the_text() -> None:
    entry = make_entry(
        sender="jörg@example.de",
        statuses={"zoë@example.com": ("failed", "550 5.1.1 Benutzer \\ unbekannt: zoë")},
    )
    recipients = reported_recipients(entry, "failed", remote_mta="mx.example.com")
    dsn = build_dsn(entry, ORIGINAL, recipients, action="failed", to=entry.sender, hostname=HOST, now=NOW)
    assert_seven_bit_clean(dsn)
    message = parse(dsn)
    assert message["To"] == "undisclosed-recipients:;"
    block = report_blocks(message)[1]
    assert block["Final-Recipient"] == "utf-8; zo\\x{EB}@example.com"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer \\x{5C} unbekannt: zo\\x{EB}"
    text = text_of(message)
    assert "zoë@example.com" in text and "Benutzer \\ unbekannt: zoë" in text


def test_a_reply_cannot_inject_fields_and_a_huge_one_is_cut() -> None:
    injected = "550 5.7.1 no\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; evil@x " + "w" * 3000
    entry = make_entry(statuses={"bob@example.com": ("failed", injected)})
    recipients = reported_recipients(entry, "failed")
    dsn = build_dsn(entry, ORIGINAL, recipients, action="failed", to="a@b.c", hostname=HOST, now=NOW)
    assert_seven_bit_clean(dsn)
    blocks = report_blocks(parse(dsn))
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    diagnostic = blocks[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 no Action: delivered Final-Recipient")
    assert diagnostic.endswith("...") and len(diagnostic) < 1000


# --- Delay warnings ---


def test_delayed_dsn() -> None:
    entry = make_entry()
    until = QUEUED + 5 * 86400
    recipients = reported_recipients(entry, "delayed", remote_mta="smtp.example.com", last_attempt=LAST)
    dsn = build_dsn(
        entry,
        ORIGINAL,
        recipients,
        action="delayed",
        to=entry.sender,
        hostname=HOST,
        now=NOW,
        retry_until=until,
    )
    message = parse(dsn)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert message["Message-ID"] == bounce.dsn_message_id(ID, "delayed", HOST, ["carol@example.com"])
    per_message, *per_recipient = report_blocks(message)
    assert len(per_recipient) == 1
    block = per_recipient[0]
    assert block["Final-Recipient"] == "rfc822; carol@example.com"
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert block["Remote-MTA"] == "dns; smtp.example.com"
    assert block["Diagnostic-Code"] == f"smtp; {GREYLISTED}"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == until
    text = " ".join(text_of(message).split())
    assert "has not yet been delivered to 1 of its 3 recipients" in text
    assert "Not delivered yet; it is still being tried (4.7.1)." in text
    assert all(len(line) <= 78 for line in text_of(message).splitlines())
    assert f"will keep trying until {email.utils.formatdate(until, localtime=True)}" in text
    assert "you do not need to send the message again" in text
    returned = parts(message)[2]
    assert returned["Content-Description"] == "Message headers"


def test_delayed_after_a_network_error_is_4_4_7_without_a_remote_mta() -> None:
    entry = make_entry(
        statuses={"bob@example.com": ("deferred", "smtp.example.com: cannot connect: refused")}
    )
    recipients = reported_recipients(entry, "delayed", remote_mta="smtp.example.com")
    message = parse(
        build_dsn(entry, ORIGINAL, recipients, action="delayed", to="a@b.c", hostname=HOST, now=NOW)
    )
    block = report_blocks(message)[1]
    assert block["Status"] == "4.4.7"
    assert block["Remote-MTA"] is None
    assert block["Diagnostic-Code"] == "X-pymta; smtp.example.com: cannot connect: refused"
    assert block["Will-Retry-Until"] is None


@pytest.mark.parametrize(
    ("reply", "action", "status"),
    [
        ("550 5.1.1 user unknown", "failed", "5.1.1"),
        ("554-5.7.1 spam", "failed", "5.7.1"),
        ("552 mailbox full", "failed", "5.0.0"),
        ("550 4.2.0 odd server", "failed", "5.0.0"),
        ("451 4.7.1 greylisted", "failed", "5.4.7"),
        (EXPIRED, "failed", "5.4.7"),
        (None, "failed", "5.4.7"),
        ("451 4.7.1 greylisted", "delayed", "4.7.1"),
        ("421 closing", "delayed", "4.0.0"),
        ("connection refused", "delayed", "4.4.7"),
        ("5501 nonsense", "failed", "5.4.7"),
    ],
)
def test_status_code(reply: str | None, action: bounce.Action, status: str) -> None:
    assert status_code(reply, action) == status


def test_build_dsn_refuses_an_unknown_action() -> None:
    entry = make_entry()
    with pytest.raises(ValueError, match="action"):
        build_dsn(entry, ORIGINAL, [], action="success", to="a@b.c", hostname=HOST, now=NOW)  # type: ignore[arg-type]


# --- Decisions: NOTIFY, delay warnings, who gets the bounce ---


@pytest.mark.parametrize(
    ("notify", "sender", "delay_warnings", "failed", "delayed"),
    [
        (None, "alice@example.org", True, True, True),  # no -N: failures, and delays per config
        (None, "alice@example.org", False, True, False),  # retry.warn_after: never
        ("never", "alice@example.org", True, False, False),
        ("failure", "alice@example.org", True, True, False),  # -N failure: no delay warning
        ("delay", "alice@example.org", True, False, True),
        ("failure,delay", "alice@example.org", True, True, True),
        ("failure,delay", "alice@example.org", False, True, False),  # the config's never wins
        ("success", "alice@example.org", True, False, False),
        ("SUCCESS, Failure", "alice@example.org", True, True, False),
        (None, "", True, True, False),  # a bounce gets no delay warning
    ],
)
def test_wants(notify: str | None, sender: str, delay_warnings: bool, failed: bool, delayed: bool) -> None:
    entry = make_entry(notify=notify, sender=sender)
    assert wants(entry, "failed", delay_warnings=delay_warnings) is failed
    assert wants(entry, "delayed", delay_warnings=delay_warnings) is delayed


@pytest.mark.parametrize(
    ("waited", "warn_after", "notify", "due"),
    [
        (3 * 3600, 4 * 3600, None, False),
        (4 * 3600, 4 * 3600, None, True),
        (2 * 86400, 4 * 3600, None, True),
        (5 * 86400, 4 * 3600, None, False),  # expired: a failure now, not a warning
        (4 * 3600, None, None, False),  # warn_after: never
        (4 * 3600, 4 * 3600, "failure", False),
        (4 * 3600, 6 * 86400, None, False),  # warning later than the lifetime
    ],
)
def test_delay_warning_due(waited: float, warn_after: float | None, notify: str | None, due: bool) -> None:
    entry = make_entry(notify=notify)
    assert delay_warning_due(entry, now=QUEUED + waited, warn_after=warn_after, lifetime=5 * 86400) is due


def test_no_delay_warning_when_nobody_is_waiting() -> None:
    entry = make_entry(statuses={"bob@example.com": ("failed", USER_UNKNOWN)})
    assert not delay_warning_due(entry, now=QUEUED + 86400, warn_after=3600, lifetime=5 * 86400)


def test_bounce_goes_to_the_sender() -> None:
    assert bounce_recipient(make_entry(), "admin@example.org") == "alice@example.org"
    assert bounce_recipient(make_entry(), None) == "alice@example.org"


def test_null_sender_bounce_goes_to_the_admin() -> None:
    assert bounce_recipient(make_entry(sender=""), "admin@example.org") == "admin@example.org"


def test_null_sender_without_admin_goes_to_postmaster() -> None:
    """As Postfix does: with nobody else to tell, the local postmaster (root's mailbox after aliases)."""
    assert bounce_recipient(make_entry(sender=""), None) == "postmaster"
    assert bounce_recipient(make_entry(sender=""), "") == "postmaster"


def test_a_bounce_to_the_admin_that_fails_goes_to_postmaster() -> None:
    double = make_entry(sender="", statuses={"Admin@Example.org": ("failed", USER_UNKNOWN)})
    assert bounce_recipient(double, "admin@example.org") == "postmaster"


def test_a_notice_to_postmaster_that_fails_gets_no_notice() -> None:
    """The last resort: its failure is told to no one, and the message stays in the queue for good."""
    last = make_entry(sender="", statuses={"postmaster": ("failed", "5.1.1 no such local user: root")})
    last.to_postmaster = True
    assert bounce_recipient(last, "admin@example.org") is None
    assert bounce_recipient(last, None) is None
    # Only our own mark counts: a bounce to a sender that happens to be called postmaster is a bounce.
    envelope = dsn_envelope(make_entry(sender="postmaster"), "postmaster", action="failed", now=NOW)
    assert "to_postmaster" not in envelope
    envelope = dsn_envelope(make_entry(sender=""), "postmaster", action="failed", now=NOW)
    assert envelope["to_postmaster"] is True


def test_null_sender_message_with_admin_among_delivered_recipients_still_reports_to_admin() -> None:
    entry = make_entry(
        sender="",
        statuses={"admin@example.org": ("delivered", None), "bob@example.com": ("failed", USER_UNKNOWN)},
    )
    failed = [r.address for r in entry.recipients if r.status == "failed"]
    assert bounce_recipient(entry, "admin@example.org", failed) == "admin@example.org"
    # Without `failed` all recipients count: the admin's copy failed, so postmaster is told.
    assert bounce_recipient(entry, "admin@example.org") == "postmaster"


def test_double_bounce_text_speaks_to_the_admin() -> None:
    entry = make_entry(sender="")
    recipients = reported_recipients(entry, "failed")
    message = parse(
        build_dsn(
            entry, ORIGINAL, recipients, action="failed", to="admin@example.org", hostname=HOST, now=NOW
        )
    )
    assert message["To"] == "admin@example.org"
    text = " ".join(text_of(message).split())
    assert "for the mail administrator" in text and "null sender <>" in text
    assert "The message could not be delivered" in text


def test_a_notice_of_ours_to_the_admin_gets_no_notice_whatever_the_alias_made_of_it() -> None:
    """The double bounce went to `boss` (the admin, an alias) and failed under the alias target: the failed
    address is not the admin's, but the notice is still recognised as the admin's own, by its envelope."""
    statuses: dict[str, tuple[str, str | None]] = {
        "boss@example.org": ("expanded", None),
        "admin-bad@remote.test": ("failed", USER_UNKNOWN),
    }
    double = make_entry(sender="", statuses=statuses, entry_id="dsn2")
    double.recipients = double.recipients[:1]  # the envelope holds only the admin; the target came by alias
    double.recipients.append(RecipientStatus("admin-bad@remote.test", "failed", USER_UNKNOWN))
    double.dsn_of = "dsn1"
    assert bounce_recipient(double, "boss@example.org", ["admin-bad@remote.test"]) == "postmaster"
    assert bounce_recipient(double, "Boss@Example.org", ["admin-bad@remote.test"]) == "postmaster"
    # A null-sender message that is not one of our notices: the alias chain from the admin still counts.
    double.dsn_of = None
    double.recipients[1] = RecipientStatus(
        "admin-bad@remote.test", "failed", USER_UNKNOWN, "boss@example.org"
    )
    assert bounce_recipient(double, "boss@example.org", ["admin-bad@remote.test"]) == "postmaster"
    # Without either, a failed null-sender message is the admin's business.
    double.recipients[1] = RecipientStatus("admin-bad@remote.test", "failed", USER_UNKNOWN)
    assert bounce_recipient(double, "boss@example.org", ["admin-bad@remote.test"]) == "boss@example.org"


def test_a_bounce_storm_is_impossible() -> None:
    """The original fails, its DSN fails, the double bounce to the admin fails, the notice to postmaster
    fails: then nothing more."""
    original = make_entry(sender="alice@example.org")
    to = bounce_recipient(original, "admin@example.org")
    assert to == "alice@example.org"
    dsn = make_entry(sender="", statuses={to: ("failed", USER_UNKNOWN)}, entry_id="dsn1")
    to = bounce_recipient(dsn, "admin@example.org")
    assert to == "admin@example.org"
    double = make_entry(sender="", statuses={to: ("failed", USER_UNKNOWN)}, entry_id="dsn2")
    to = bounce_recipient(double, "admin@example.org")
    assert to == "postmaster"
    last = make_entry(sender="", statuses={to: ("failed", USER_UNKNOWN)}, entry_id="dsn3")
    last.to_postmaster = True
    assert bounce_recipient(last, "admin@example.org") is None


def test_dsn_envelope_queues_from_the_null_sender(tmp_path: Path) -> None:
    entry = make_entry()
    envelope = dsn_envelope(entry, "alice@example.org", action="failed", now=NOW)
    assert envelope["sender"] == ""
    assert envelope["recipients"] == ["alice@example.org"]
    assert envelope["submitted_by"] == "MAILER-DAEMON"
    assert envelope["full_name"] == "Mail Delivery System"
    assert envelope["queued_at"] == NOW
    assert envelope["dsn_of"] == ID
    assert envelope["dsn_action"] == "failed"
    assert (
        dsn_envelope(entry, "x@y", action="delayed", now=NOW, submitted_by="pymta")["submitted_by"] == "pymta"
    )
    spool = Spool(str(tmp_path / "spool"))
    dsn = failed_dsn()
    queue_id = spool.submit(envelope, dsn)
    queued = spool.read_entry("new", queue_id)
    assert queued.sender == ""
    assert [r.address for r in queued.recipients] == ["alice@example.org"]
    assert queued.dsn_notify is None
    assert spool.read_message(queued) == dsn


# --- Any original at all ---

HEADERISH = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from(
            [b"Subject: ", b"Message-ID: <", b">", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b": ", b"\t", b" ",
             b"=?utf-8?q?", b"?=", b"\xff", b"\x00", b"--=_pymta_", b"From: a@b\r\n", b"."]
        ),
    ),
    max_size=30,
).map(b"".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    original=st.one_of(st.binary(max_size=600), HEADERISH),
    ret=st.sampled_from([None, "hdrs", "full"]),
    action=st.sampled_from(bounce.ACTIONS),
    sender=st.sampled_from(["alice@example.org", ""]),
    reply=st.one_of(st.none(), st.text(max_size=80)),
)
def test_any_original_gives_a_valid_7bit_dsn(
    original: bytes, ret: str | None, action: bounce.Action, sender: str, reply: str | None
) -> None:
    status = {"failed": "failed", "delayed": "deferred"}.get(action, "delivered")
    entry = make_entry(sender=sender, ret=ret, statuses={"bob@example.com": (status, reply)})
    if action == "failed" or action == "delayed":
        recipients = reported_recipients(entry, action, remote_mta="smtp.example.com", last_attempt=LAST)
    else:  # a success notice reports what one attempt did: the flush builds its recipients
        code = status_code(reply, action)
        recipients = [
            ReportedRecipient("bob@example.com", code, reply, "smtp.example.com", LAST, action=action)
        ]
    dsn = build_dsn(
        entry, original, recipients, action=action, to="admin@example.org", hostname=HOST, now=NOW,
        retry_until=QUEUED + 86400,
    )  # fmt: skip
    assert_seven_bit_clean(dsn)
    message = parse(dsn)
    assert message.defects == []
    for name, value in message.items():
        assert name.isascii() and str(value).isascii()
    types = [part.get_content_type() for part in parts(message)]
    assert types[:2] == ["text/plain", "message/delivery-status"]
    assert len(types) in (2, 3)
    blocks = report_blocks(message)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == action
    assert blocks[1]["Status"][0] == {"failed": "5", "delayed": "4"}.get(action, "2")
    text_of(message)
