"""Delivery status notifications (RFC 3464): the message itself, built from plain values.

A DSN is an ordinary message from the null sender `<>`, queued like any other (ARCHITECTURE.md invariant 2):
the flush decides *when*; `pymta.queue.notices` decides *whether* and *to whom*, and which recipients it
reports on (`ReportedRecipient`); this module builds the bytes (`build_dsn`) from the message it is about
(anything shaped like `Original`: a queue entry is one). It is pure: no I/O, no clock, no printing, and it
knows nothing of the queue.

Its main invariant: whatever the original holds (8-bit or broken headers, NUL bytes, endless lines, no header
block at all), `build_dsn` returns a valid MIME message that is 7-bit clean: ASCII only, CRLF line endings,
no line longer than 998 bytes. So a DSN can always be relayed, even by a server without 8BITMIME:

- the human-readable part is us-ascii, or UTF-8 in quoted-printable when a reply or subject is not ASCII;
- the `message/delivery-status` part is ASCII: a non-ASCII address or reply is written with RFC 6533's
  `\\x{HEX}` escapes (addresses then have the type `utf-8`), and control characters become spaces;
- the original's header block goes in `text/rfc822-headers`, as it is (7bit) when it is clean ASCII, else in
  quoted-printable, which keeps every byte (NUL too) recoverable and the text still readable;
- the whole original (`-R full`, failures only, RFC 3461 4.3) goes in `message/rfc822` only when it is at most
  `FULL_RETURN_LIMIT` bytes and itself 7-bit clean: RFC 2046 forbids encoding a message/rfc822 part, so an
  8-bit original can only travel as 8bit, which would need 8BITMIME. Otherwise its headers go, and the text
  says why.

Success notices (`-N success`, RFC 3461 5.2): "delivered" after a local delivery, "relayed" after a smarthost
that does not offer DSN took the message (one that does gets NOTIFY passed on, and reports itself), and
"expanded" for an address that aliases (or the admin rule) replaced: RFC 3461 5.2.7.3 reports the address
the sender used, once, and never the targets, which are the recipient's own business.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from pymta.mail.message import CRLF, format_date, get_header, header_fields, normalise_line_endings
from pymta.mail.mime import (
    LINE_WIDTH,
    ascii_field,
    ascii_token,
    body_part,
    header_bytes,
    quoted_printable,
    readable,
    seven_bit_clean,
    text_part,
    wrap,
)
from pymta.records import record

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
ACTIONS: tuple[Action, ...] = ("failed", "delayed", "delivered", "relayed", "expanded")
# The actions that report a success (RFC 3464 2.3.3): only ever sent when NOTIFY asked for SUCCESS.
SUCCESS_ACTIONS: tuple[Action, ...] = ("delivered", "relayed", "expanded")

# The whole original is returned (-R full) only up to this size: a bounce must not carry a big attachment
# back through the sender's mailbox quota (Postfix limits bounce_size_limit to 50 kB; 256 KiB is generous).
FULL_RETURN_LIMIT = 256 * 1024
# Envelope `submitted_by` and display name of every DSN, as other MTAs name their bounce sender.
MAILER_DAEMON = "MAILER-DAEMON"
MAIL_DELIVERY_SYSTEM = "Mail Delivery System"
# Status when a failure or delay came with no usable enhanced code: RFC 3463 X.4.7 "delivery time expired".
EXPIRED_STATUS = "5.4.7"
DELAYED_STATUS = "4.4.7"
DELIVERED_STATUS = "2.0.0"
# The first digit of a status, by action (RFC 3463: 2 success, 4 persistent transient, 5 permanent).
_STATUS_CLASS: dict[Action, str] = {
    "failed": "5",
    "delayed": "4",
    "delivered": "2",
    "relayed": "2",
    "expanded": "2",
}
# The RFC 3464 diagnostic-type of a reason of our own (not a server's reply): a private X- type, as Postfix's.
LOCAL_DIAGNOSTIC_TYPE = "X-pymta"
SUBJECTS: dict[Action, str] = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
    "expanded": "Successful Mail Delivery Report",
}

# What a status code means and what the sender can do about it, by RFC 3463 subject.detail ("1.1" of
# "5.1.1"), then by subject alone ("1" of "5.1.x"). Plain words for people who never saw an SMTP reply.
_STATUS_MEANINGS: dict[str, str] = {
    "1.1": "the mailbox does not exist",
    "1.2": "the domain does not exist or does not take mail",
    "1.3": "the address is not valid",
    "1.6": "the mailbox has moved and has no forwarding address",
    "1.8": "the server does not accept mail from this sender's address",
    "1": "there is a problem with the address",
    "2.1": "the mailbox is disabled",
    "2.2": "the mailbox is full",
    "2.3": "the message is larger than this mailbox accepts",
    "2": "there is a problem with the mailbox",
    "3.4": "the message is too large for the receiving system",
    "3": "the receiving mail system has a problem",
    "4.1": "the receiving server did not answer",
    "4.2": "the connection to the receiving server broke off",
    "4.4": "the message could not be routed to its destination",
    "4.7": "the message could not be delivered in the time allowed",
    "4": "there is a network or routing problem",
    "5": "the receiving server rejected the mail transaction",
    "6": "the receiving server cannot handle the message's content or encoding",
    "7.1": "the receiving server refused it by its policy (for example as spam, or a sender not allowed)",
    "7": "the receiving server refused it for security or policy reasons",
}
_ADVICE: dict[str, str] = {
    "1": "Check the address for typing mistakes. If it is right, the recipient may have changed address: "
    "ask them another way for the right one.",
    "2": "The recipient's mailbox cannot take mail just now. Let them know another way, and send it again "
    "later.",
    "3": "Try sending a smaller message, for example with a link instead of a large attachment.",
    "4": "The recipient's mail server could not be reached for a long time. Try again later, or reach the "
    "recipient another way.",
    "5": "Try sending the message again; if it fails again, tell your mail administrator.",
    "6": "Try sending the message in a simpler form, for example as plain text.",
    "7": "Your mail administrator or the recipient's can tell why the server refused it.",
}
# For a recipient that expired although the server answered: it was there, and kept saying "later".
_EXPIRED_ADVICE = (
    "The recipient's mail server answered but kept putting the message off (its last reply is above) until "
    "the mail system gave up. Try again later, or reach the recipient another way."
)

_SMTP_REPLY = re.compile(r"([245])[0-9][0-9](?:[ -]|$)")
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")
_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,900}>")  # one printable ASCII msg-id, no spaces or angle brackets
_PRINTABLE_ADDRESS = re.compile(r"[!-~]{1,900}")
# A relay as the flush records it (`SmtpSession.relay`): `host[ip]:port`, `host:port`, or a label.
_RELAY = re.compile(r"(?P<host>[^\[\]\s]+?)(?:\[(?P<ip>[^\]\s]*)\])?(?::(?P<port>[0-9]+))?")


class OriginalRecipient(Protocol):
    """A recipient of the message a DSN is about, as far as the DSN counts it."""

    @property
    def via(self) -> str | None: ...


class Original(Protocol):
    """What a DSN tells of the message it is about (`pymta.queue.entry.QueueEntry` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def queued_at(self) -> float: ...
    @property
    def dsn_ret(self) -> str | None: ...
    @property
    def dsn_envid(self) -> str | None: ...
    @property
    def recipients(self) -> Sequence[OriginalRecipient]: ...


@record(frozen=True, slots=True)
class ReportedRecipient:
    """One recipient a DSN reports on: the per-recipient fields of RFC 3464 2.3."""

    address: str  # Final-Recipient: the envelope recipient
    status: str  # RFC 3463 status code, "5.1.1"; class 5 for failed, 4 for delayed
    diagnostic: str | None = None  # the server's reply "550 5.1.1 <a@b>: user unknown", or our own reason
    remote_mta: str | None = None  # the server that gave the reply, when one did
    last_attempt: float | None = None  # Last-Attempt-Date (Unix time)
    original_recipient: str | None = None  # Original-Recipient, when it differs (an alias, an ORCPT)
    expired_after: str | None = None  # "5d": it expired, and `diagnostic` is the last reply a server gave
    action: Action | None = None  # its own Action when it differs from the DSN's ("relayed" in a "delivered")

    @property
    def smtp_reply(self) -> bool:
        """Whether the diagnostic is a server's SMTP reply (Diagnostic-Code type `smtp`)."""
        return self.diagnostic is not None and is_smtp_reply(self.diagnostic)


def is_smtp_reply(text: str) -> bool:
    """Whether `text` starts as a server's SMTP reply does ("550 ...", "451-..."), not as a reason of ours."""
    return _SMTP_REPLY.match(text) is not None


def status_code(reply: str | None, action: Action) -> str:
    """The RFC 3463 status of a recipient, from the reply or reason its delivery ended with.

    A reply whose class matches the action gives its own enhanced code ("550 5.1.1 ..." -> 5.1.1) or, without
    one, X.0.0 of its basic code; pymta's own reasons carry their code first ("5.1.1 no such local user").
    Anything else (a failure without a permanent reply is an expiry; a delay after a network error) gives
    5.4.7 or 4.4.7, "delivery time expired"; a success without a 2xx reply (a local delivery) 2.0.0.
    """
    wanted = _STATUS_CLASS[action]
    text = (reply or "").strip()
    basic = _SMTP_REPLY.match(text)
    if basic is None:
        # pymta's own reasons start with their RFC 3463 code ("5.1.1 no such local user: bob")
        own = _ENHANCED.match(text)
        if own is not None and own.group(1) == wanted:
            return own.group(0)
    if basic is None or basic.group(1) != wanted:
        return _fallback_status(action)
    enhanced = _ENHANCED.match(text, basic.end())
    if enhanced is not None and enhanced.group(1) == wanted:
        return enhanced.group(0)
    return f"{wanted}.0.0"


def dsn_message_id(entry_id: str, action: Action, hostname: str, addresses: Iterable[str]) -> str:
    """The Message-ID of the DSN of `action` about message `entry_id` reporting on `addresses`.

    One message can get several notices of one kind: a bounce per run in which recipients failed, a success
    notice per run that delivered some. Each reports on recipients no other notice of its kind reports on
    (a failure is reported once, a delivery happens once), so a digest of the addresses tells them apart;
    and it stays the same whenever the notice is built again, so a notice generated twice (a crash before
    the state was written, a bounce whose queueing failed) is recognisably one notice."""
    names = sorted({address.lower() for address in addresses})
    digest = hashlib.sha256("\0".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"<{entry_id}.{action}.{digest}@{hostname}>"


# --- Building the message ---


def build_dsn(
    entry: Original,
    original: bytes,
    recipients: Sequence[ReportedRecipient],
    *,
    action: Action,
    to: str,
    hostname: str,
    now: float,
    retry_until: float | None = None,
) -> bytes:
    """The complete DSN (CRLF line endings, 7-bit clean) about `entry` to `to`, ready for `Spool.submit`.

    `original` is the message as queued (or as sent); `recipients` the ones to report (`reported_recipients`);
    `hostname` names the reporting MTA (Reporting-MTA, From, Message-ID); `now` is the DSN's Date;
    `retry_until` is when a delayed message will be given up (Will-Retry-Until and the text). Never raises on
    a bad original.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    message = normalise_line_endings(original)
    header_block = b"".join(raw for _, raw in header_fields(message))
    returned, why = _returned_part(entry, message, header_block, action)
    text = _notification_text(
        entry, message, recipients, action=action, hostname=hostname, retry_until=retry_until, why=why
    )
    parts = [
        text_part(text),
        body_part(
            [("Content-Description", "Delivery report"), ("Content-Type", "message/delivery-status")],
            _delivery_status(entry, recipients, action=action, hostname=hostname, retry_until=retry_until),
        ),
    ]
    if returned is not None:
        parts.append(returned)
    boundary = _boundary(entry.id, action, parts)
    references = _original_message_id(message, entry.id, hostname)
    header = [
        ("From", f"{MAIL_DELIVERY_SYSTEM} <{MAILER_DAEMON}@{hostname}>"),
        ("To", _to_value(to)),
        ("Subject", SUBJECTS[action]),
        ("Date", format_date(now)),
        (
            "Message-ID",
            dsn_message_id(ascii_token(entry.id), action, hostname, (r.address for r in recipients)),
        ),
    ]
    if references:
        header += [("In-Reply-To", references), ("References", references)]
    header += [
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
    ]
    body = [b"This is a MIME-encapsulated message: a delivery status notification (RFC 3464).\r\n"]
    for part in parts:
        body.append(b"\r\n--" + boundary.encode("ascii") + CRLF + part)
    body.append(b"\r\n--" + boundary.encode("ascii") + b"--\r\n")
    return header_bytes(header) + CRLF + b"".join(body)


def _returned_part(
    entry: Original, message: bytes, header_block: bytes, action: Action
) -> tuple[bytes | None, str | None]:
    """The third part (the original, or its headers, or none) and why the whole original is not in it when
    `-R full` asked for it."""
    why = None
    if action == "failed" and entry.dsn_ret == "full":
        if len(message) > FULL_RETURN_LIMIT:
            why = (
                f"it is too large ({len(message)} bytes; at most {FULL_RETURN_LIMIT // 1024} KiB are "
                "returned)"
            )
        elif not seven_bit_clean(message):
            why = "it contains 8-bit or binary data, which a notification cannot carry unencoded"
        else:
            # A message without a header block is all body: the empty line says so to a MIME reader.
            whole = message if header_block else CRLF + message
            headers = [
                ("Content-Description", "Undelivered message"),
                ("Content-Type", "message/rfc822"),
                ("Content-Transfer-Encoding", "7bit"),
            ]
            return body_part(headers, whole), None
    if not header_block:
        return None, why
    headers = [
        ("Content-Description", "Undelivered message headers" if action == "failed" else "Message headers"),
        ("Content-Type", "text/rfc822-headers"),
    ]
    if seven_bit_clean(header_block):
        return body_part([*headers, ("Content-Transfer-Encoding", "7bit")], header_block), why
    encoded = quoted_printable(header_block)
    return body_part([*headers, ("Content-Transfer-Encoding", "quoted-printable")], encoded), why


def _notification_text(
    entry: Original,
    message: bytes,
    recipients: Sequence[ReportedRecipient],
    *,
    action: Action,
    hostname: str,
    retry_until: float | None,
    why: str | None,
) -> str:
    """The human-readable part, in plain English."""
    double = entry.sender == ""
    count = len(recipients)
    success = action in SUCCESS_ACTIONS
    # A success is reported for the addresses the sender used (alias targets never are), so count those.
    total = (
        max(count, sum(1 for r in entry.recipients if r.via is None)) if success else len(entry.recipients)
    )
    if total > count:
        whom = f"{count} of its {total} recipients"
    else:
        whom = "its recipient" if count == 1 else f"{'its' if success else 'any of its'} {count} recipients"
    paragraphs = [f"This is the mail system at {hostname}."]
    if double:
        paragraphs.append(
            "This notice is for the mail administrator: the message below came from the null sender <> "
            "(it is itself a delivery notification or an automatic message), so it cannot be returned to "
            "its sender."
        )
    if action == "failed":
        paragraphs.append(
            f"{'The' if double else 'Your'} message could not be delivered to {whom}. "
            "This is a permanent error: the mail system has stopped trying."
        )
    elif action in ("delivered", "expanded"):
        paragraphs.append(f"Your message was delivered to {whom}, as you asked to be told when it was sent.")
        if any(r.action == "relayed" for r in recipients):
            paragraphs.append(
                "Where a recipient below was passed on to a mail server that does not report on delivery, "
                "this is the last notice you will get about it."
            )
        if any((r.action or action) == "expanded" for r in recipients):
            paragraphs.append(
                "Where a recipient below stands for other addresses (an alias or a mailing list), the "
                "message was passed on to them; their own deliveries are not reported."
            )
    elif action == "relayed":
        paragraphs.append(
            f"Your message was passed on to {whom} through a mail server that does not report on "
            "delivery, so this is the last notice you will get about it. You asked to be told of "
            "successful delivery when it was sent."
        )
    else:
        until = f" and will keep trying until {format_date(retry_until)}" if retry_until is not None else ""
        paragraphs.append(
            f"{'The' if double else 'Your'} message has not yet been delivered to {whom}. "
            f"The mail system has been trying since {format_date(entry.queued_at)}{until}."
        )
    blocks = [wrap(paragraph) for paragraph in paragraphs]
    blocks.append(
        "\n".join(_recipient_lines(recipient, recipient.action or action) for recipient in recipients)
    )
    if action == "failed":
        advice = [
            _EXPIRED_ADVICE if r.expired_after else _ADVICE.get(_subject(r.status), _ADVICE["5"])
            for r in recipients
        ]
        blocks.append("What you can do:\n" + "\n".join(wrap(item) for item in dict.fromkeys(advice)))
        if total > count:
            blocks.append(wrap("The other recipients are not affected by this notice."))
    elif action == "delayed":
        blocks.append(
            wrap(
                "This is only a warning: you do not need to send the message again. You will be told "
                "again only if it finally cannot be delivered."
            )
        )
    details = [f"    Queue ID:  {readable(entry.id)}", f"    Queued:    {format_date(entry.queued_at)}"]
    subject = _subject_text(message)
    if subject is not None:
        details.append(f"    Subject:   {subject}")
    blocks.append("The message:\n" + "\n".join(details))
    if action == "failed" and entry.dsn_ret == "full" and why is None:
        blocks.append(wrap("The whole message is attached below, as was asked for when it was sent."))
    elif why is not None:
        blocks.append(
            wrap(f"The whole message was asked for, but only its headers are attached below: {why}.")
        )
    elif header_fields(message):
        blocks.append(wrap("The headers of the message are attached below."))
    else:
        blocks.append(wrap("The message had no header fields, so none are attached."))
    return "\n\n".join(blocks) + "\n"


def _recipient_lines(recipient: ReportedRecipient, action: Action) -> str:
    meaning = _meaning(recipient.status, action)
    lines = [f"    {readable(recipient.address)}"]
    headline = f"{meaning[0].upper()}{meaning[1:]} ({readable(recipient.status)})"
    if recipient.expired_after is not None and recipient.diagnostic:
        # It expired although a server answered: say what that server last said, not "could not be reached".
        server = f" from {readable(recipient.remote_mta)}" if recipient.remote_mta else ""
        return "\n".join(
            lines
            + _indented(
                f"{headline}: not delivered within {readable(recipient.expired_after)}; the last "
                f"reply{server} was: {readable(recipient.diagnostic)}"
            )
        )
    lines += _indented(headline + ".")
    if recipient.diagnostic:
        if recipient.smtp_reply:
            server = f" {readable(recipient.remote_mta)}" if recipient.remote_mta else ""
            said = f"The server{server} said: "
        else:
            said = "Reason: "
        lines += _indented(said + readable(recipient.diagnostic))
    return "\n".join(lines)


def _indented(text: str) -> list[str]:
    return textwrap.wrap(
        text, LINE_WIDTH, initial_indent=" " * 8, subsequent_indent=" " * 10, break_on_hyphens=False
    )


def _meaning(status: str, action: Action) -> str:
    """What `status` means in plain words. A delay is told as a delay: the reason is in the server's reply,
    and a temporary 4.7.1 (greylisting) is no refusal."""
    if action == "delayed":
        return "not delivered yet; it is still being tried"
    if action == "delivered":
        return "delivered to the recipient's mailbox"
    if action == "relayed":
        return "passed on to a mail server that does not report on delivery"
    if action == "expanded":
        return "delivered to this address and passed on to the addresses it stands for"
    detail = status.split(".", 1)[1] if "." in status else ""
    return _STATUS_MEANINGS.get(detail) or _STATUS_MEANINGS.get(_subject(status)) or "the delivery failed"


def _subject(status: str) -> str:
    parts = status.split(".")
    return parts[1] if len(parts) == 3 else ""


def _subject_text(message: bytes) -> str | None:
    """The original's Subject, decoded for people when it is RFC 2047 and readable; never raises."""
    try:
        raw = get_header(message, "Subject")
    except Exception:  # a header helper must not stop a bounce
        return None
    if raw is None:
        return None
    text = raw
    try:
        from email.header import decode_header, make_header

        if "=?" in raw and raw.isascii():
            text = str(make_header(decode_header(raw)))
    except Exception:  # RFC 2047 errors of every kind: show it as written
        text = raw
    shown = readable(text)
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _delivery_status(
    entry: Original,
    recipients: Sequence[ReportedRecipient],
    *,
    action: Action,
    hostname: str,
    retry_until: float | None,
) -> bytes:
    """The body of the message/delivery-status part: the per-message fields, then a block per recipient."""
    per_message = [("Reporting-MTA", f"dns; {hostname}"), ("X-Pymta-Queue-ID", ascii_field(entry.id))]
    if entry.dsn_envid:
        per_message.append(("Original-Envelope-Id", ascii_field(entry.dsn_envid)))
    per_message.append(("Arrival-Date", format_date(entry.queued_at)))
    blocks = [header_bytes(per_message)]
    for recipient in recipients:
        fields: list[tuple[str, str]] = []
        if recipient.original_recipient:
            fields.append(("Original-Recipient", _typed_address(recipient.original_recipient)))
        fields += [
            ("Final-Recipient", _typed_address(recipient.address)),
            ("Action", recipient.action or action),
            ("Status", recipient.status if _valid_status(recipient.status) else _fallback_status(action)),
        ]
        if recipient.remote_mta:
            fields.append(("Remote-MTA", f"dns; {ascii_field(remote_mta_name(recipient.remote_mta))}"))
        if recipient.diagnostic:
            kind = "smtp" if recipient.smtp_reply else LOCAL_DIAGNOSTIC_TYPE
            fields.append(("Diagnostic-Code", f"{kind}; {ascii_field(recipient.diagnostic)}"))
        if recipient.last_attempt is not None:
            fields.append(("Last-Attempt-Date", format_date(recipient.last_attempt)))
        if action == "delayed" and retry_until is not None:
            fields.append(("Will-Retry-Until", format_date(retry_until)))
        blocks.append(header_bytes(fields))
    return CRLF.join(blocks)


def remote_mta_name(relay: str) -> str:
    """The mta-name of a Remote-MTA field (RFC 3464 2.3.5, type dns) for a relay as the flush records it
    (`host[ip]:port`, `host:port`): the host name as configured. The address and port stay in the
    human-readable part, where a person can use them."""
    import ipaddress

    relay = relay.strip()
    try:
        return str(ipaddress.ip_address(relay))  # an IPv6 address alone, whose colons are no port
    except ValueError:
        pass
    match = _RELAY.fullmatch(relay)
    return match.group("host") if match is not None else relay


def _valid_status(status: str) -> bool:
    return re.fullmatch(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", status) is not None


def _fallback_status(action: Action) -> str:
    return {"failed": EXPIRED_STATUS, "delayed": DELAYED_STATUS}.get(action, DELIVERED_STATUS)


def _typed_address(address: str) -> str:
    """An address with its RFC 3464 type: `rfc822; a@b`, or (RFC 6533) `utf-8; j\\x{F6}rg@b` if not ASCII."""
    if _PRINTABLE_ADDRESS.fullmatch(address) and "\\" not in address:
        return f"rfc822; {address}"
    return f"utf-8; {ascii_field(address)}"


def _original_message_id(message: bytes, entry_id: str, hostname: str) -> str | None:
    """The Message-ID the original went out with: its own when it is a plain one, else the one delivery
    gives a message without (`message.complete`), when the queue id is plain too."""
    try:
        value = get_header(message, "Message-ID")
    except Exception:  # a header helper must not stop a bounce
        value = None
    if value is not None:
        value = value.strip()
        return value if _MESSAGE_ID.fullmatch(value) else None
    candidate = f"<{entry_id}@{hostname}>"
    return candidate if _MESSAGE_ID.fullmatch(candidate) else None


def _boundary(entry_id: str, action: Action, parts: list[bytes]) -> str:
    """A multipart boundary found in no part. `=_` cannot occur in quoted-printable; the hash of the id
    keeps the DSN the same each time it is built."""
    counter = 0
    while True:
        digest = hashlib.sha256(f"{entry_id}\0{action}\0{counter}".encode("utf-8", "replace")).hexdigest()
        boundary = f"=_pymta_{digest[:24]}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary
        counter += 1


def _to_value(address: str) -> str:
    """The To field of a DSN: the address as it is, when it is plain printable ASCII; otherwise (it cannot
    be written in a 7-bit header) an empty group, the envelope still carrying the address."""
    if _PRINTABLE_ADDRESS.fullmatch(address) and not any(char in address for char in '<>(),;:"\\'):
        return address
    return "undisclosed-recipients:;"


__all__ = [
    "ACTIONS",
    "Action",
    "FULL_RETURN_LIMIT",
    "Original",
    "ReportedRecipient",
    "build_dsn",
    "dsn_message_id",
    "is_smtp_reply",
    "remote_mta_name",
    "status_code",
]
