"""Delivery status notifications (RFC 3464): who gets one, whether one is wanted, and the message itself.

A DSN is an ordinary message from the null sender `<>`, queued like any other (DESIGN.md invariant 2): the
flush decides *when* (a recipient failed, the lifetime expired, `retry.warn_after` passed); this module
decides *whether* (`wants`, honouring `sendmail -N`), *to whom* (`bounce_recipient`), and builds the bytes
(`build_dsn`) and the envelope (`dsn_envelope`). It is pure: no I/O, no clock, no printing.

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

No bounce storms: a DSN comes from `<>`; a message from `<>` that fails is reported to the admin instead (a
double bounce); when that cannot be (no admin, or the admin's own copy is what failed) to the local
postmaster, delivered without the admin rule (root's mailbox after aliases; the user's own in user mode);
and when the notice to postmaster fails too, `bounce_recipient` says None: the message stays `failed` in
the queue, told to no one, and `failed_retention` never removes it. The admin's copy is recognised by what
routing cannot change: a notice of ours (`dsn_of` in its envelope) whose envelope recipient is the admin
address, however aliases expand it, and any failed recipient that an alias chain from the admin reached.

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
from dataclasses import dataclass
from typing import Literal

from pymta.mail.message import CRLF, MAX_LINE, get_header, header_fields, normalise_line_endings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.queue.entry import QueueEntry

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
ACTIONS: tuple[Action, ...] = ("failed", "delayed", "delivered", "relayed", "expanded")
# The actions that report a success (RFC 3464 2.3.3): only ever sent when NOTIFY asked for SUCCESS.
SUCCESS_ACTIONS: tuple[Action, ...] = ("delivered", "relayed", "expanded")

# The whole original is returned (-R full) only up to this size: a bounce must not carry a big attachment
# back through the sender's mailbox quota (Postfix limits bounce_size_limit to 50 kB; 256 KiB is generous).
FULL_RETURN_LIMIT = 256 * 1024
# Who is told of a double bounce when the admin cannot be (RFC 5321 4.5.1: every host has a postmaster; a
# bare local name, so aliases decide whose mailbox it is: root's, or in user mode the user's own).
POSTMASTER = "postmaster"
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
# A delivery-status field value is cut here: it must fit a line (998 bytes) after folding; the text part
# carries the reply in full.
MAX_FIELD_VALUE = 900
# Soft limit of a folded field line and of the wrapped text (RFC 5322 2.1.1 asks for 78).
LINE_WIDTH = 78
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
# The reason the flush records for a recipient that expired (`expiry_reason`), read back by the builder.
_EXPIRY = re.compile(
    r"5\.4\.7 expired: not delivered within (?P<within>\S+)(?:; the last reply from "
    r"(?P<relay>\S+) was: (?P<reply>.*))?",
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
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
        return self.diagnostic is not None and _SMTP_REPLY.match(self.diagnostic) is not None


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


def reported_recipients(
    entry: QueueEntry,
    action: Literal["failed", "delayed"],
    *,
    remote_mta: str | None = None,
    last_attempt: float | None = None,
) -> list[ReportedRecipient]:
    """The recipients of `entry` a DSN of `action` reports on: status `failed` for "failed", `pending` or
    `deferred` for "delayed", each with its status code from its last reply. `remote_mta` (the relay of the
    last attempt; "none" or "" for no server) is named only beside a reply that came from a server. A
    recipient that expired (`expiry_reason`) after a server's reply is reported with that reply and that
    server, and status 5.4.7. (A success notice reports what one attempt did, which the queue entry does not
    hold: the flush builds its recipients from the attempt.)"""
    wanted = ("failed",) if action == "failed" else ("pending", "deferred")
    relay = remote_mta if remote_mta and remote_mta not in ("none", "local") else None
    reported = []
    for recipient in entry.recipients:
        if recipient.status not in wanted:
            continue
        reply = recipient.last_error
        expired = _EXPIRY.fullmatch(reply.strip()) if action == "failed" and reply else None
        if expired is not None and expired.group("reply"):
            last = expired.group("reply")
            reported.append(
                ReportedRecipient(
                    recipient.address,
                    EXPIRED_STATUS,
                    last,
                    expired.group("relay") if _SMTP_REPLY.match(last) else None,
                    last_attempt,
                    expired_after=expired.group("within"),
                )
            )
            continue
        from_server = reply is not None and _SMTP_REPLY.match(reply) is not None
        reported.append(
            ReportedRecipient(
                recipient.address,
                status_code(reply, action),
                reply,
                relay if from_server else None,
                last_attempt,
            )
        )
    return reported


def expiry_reason(within: str, last_reply: str | None = None, relay: str | None = None) -> str:
    """The reason a recipient fails with when `retry.lifetime` (`within`, as "5d") ran out: the server's
    last reply kept in it when one answered, so the sender's DSN still shows what the server said."""
    reason = f"{EXPIRED_STATUS} expired: not delivered within {within}"
    if last_reply and _SMTP_REPLY.match(last_reply) and relay and relay not in ("none", "local"):
        return f"{reason}; the last reply from {relay} was: {' '.join(last_reply.split())}"
    return reason


# --- Decisions ---


def notify_words(entry: QueueEntry) -> frozenset[str] | None:
    """The NOTIFY words of `sendmail -N` (never, success, failure, delay), or None when -N was not given."""
    if entry.dsn_notify is None:
        return None
    return frozenset(word.strip().lower() for word in entry.dsn_notify.split(",") if word.strip())


def wants(entry: QueueEntry, action: Action, *, delay_warnings: bool = True) -> bool:
    """Whether the sender of `entry` is to get a DSN of `action`, by what they asked with `-N`.

    `-N never`: none. No -N: failures, and delay warnings when the config has them on (`delay_warnings`,
    i.e. `retry.warn_after` is not `never`). An explicit list: only what it names (`-N failure` means no
    delay warning), and a delay warning still only when the config has them on. A message from the null
    sender never gets a delay warning: it is a notification itself, and only its final failure is news (to
    the admin). A success notice ("delivered", "relayed") only when -N named success (RFC 3461 4.1), and
    never for the null sender. Whether a failed DSN can be sent at all is `bounce_recipient`'s question.
    """
    words = notify_words(entry)
    if words is not None and "never" in words:
        return False
    if action in SUCCESS_ACTIONS:
        return entry.sender != "" and words is not None and "success" in words
    if action == "failed":
        return words is None or "failure" in words
    if entry.sender == "" or not delay_warnings:
        return False
    return words is None or "delay" in words


def delay_warning_due(
    entry: QueueEntry, *, now: float, warn_after: float | None, lifetime: float, held: float = 0.0
) -> bool:
    """Whether `entry` has waited long enough for a delay warning: `warn_after` passed, `lifetime` not yet,
    a recipient still waiting, and the sender wants one. `held` seconds on hold do not count as waiting.
    Sending it only once is the caller's to record (a warning built again has the same Message-ID, so a
    repeat is at least recognisable)."""
    if warn_after is None or warn_after >= lifetime:
        return False
    waited = now - entry.queued_at - held
    if not warn_after <= waited < lifetime:
        return False
    if not any(recipient.status in ("pending", "deferred") for recipient in entry.recipients):
        return False
    return wants(entry, "delayed")


def bounce_recipient(entry: QueueEntry, admin: str | None, failed: Iterable[str] | None = None) -> str | None:
    """Who gets the DSN about `entry`: its envelope sender; for the null sender the admin (a double bounce),
    and failing that the local postmaster (`POSTMASTER`), as Postfix sends a double bounce.

    Postmaster is told when there is no admin, or when the admin's own copy is what failed: a notice of
    ours (`dsn_of`) addressed to the admin, whatever aliases or routing made of that address; or the admin
    address, or an alias chain from it (`via`), led to one of the `failed` recipients (default: all of the
    message's recipients). The notice to postmaster is marked (`to_postmaster`, see `dsn_envelope`): it is
    delivered without the admin rule, so it reaches root's mailbox (after aliases) even when the admin is
    what fails. None when that notice itself failed: nobody is left to tell, and the message stays `failed`
    in the queue, untold, for the admin to find. A notice that failed begets at most one more, to a
    different place: that is what makes bounce storms impossible.
    """
    if entry.sender != "":
        return entry.sender
    if entry.to_postmaster:
        return None
    if admin and not _admins_own(entry, admin, failed):
        return admin
    return POSTMASTER


def _admins_own(entry: QueueEntry, admin: str, failed: Iterable[str] | None) -> bool:
    """Whether what failed of the null-sender `entry` is the admin's own copy (see `bounce_recipient`)."""
    wanted = admin.lower()
    if entry.dsn_of is not None and any(
        r.via is None and r.address.lower() == wanted for r in entry.recipients
    ):
        return True
    via = {r.address.lower(): r.via.lower() for r in entry.recipients if r.via}
    addresses = [r.address for r in entry.recipients] if failed is None else list(failed)
    for address in addresses:
        seen: set[str] = set()
        current: str | None = address.lower()
        while current is not None and current not in seen:  # alias chains can loop
            if current == wanted:
                return True
            seen.add(current)
            current = via.get(current)
    return False


def dsn_envelope(
    entry: QueueEntry,
    to: str,
    *,
    action: Action,
    now: float,
    submitted_by: str = MAILER_DAEMON,
    uid: int = -1,
) -> dict[str, object]:
    """The envelope to pass to `Spool.submit` with a DSN about `entry`: from the null sender to `to`.

    `dsn_of` and `dsn_action` mark it as a DSN; `bounce_recipient` reads `dsn_of` to recognise a failed
    notice to the admin. A notice about a null-sender message to `POSTMASTER` is the last resort and says so
    (`to_postmaster`): the flush routes it without the admin rule, and nobody is told when it fails. No
    NOTIFY is asked: should the DSN fail, the flush reports it to the admin or postmaster
    (`bounce_recipient`), and a smarthost's own bounce of it goes to `<>`, which takes none.
    """
    last_resort = {"to_postmaster": True} if entry.sender == "" and to == POSTMASTER else {}
    return {
        "sender": "",
        "recipients": [to],
        "submitted_by": submitted_by,
        "uid": uid,
        "full_name": MAIL_DELIVERY_SYSTEM,
        "queued_at": now,
        "notify": None,
        "ret": None,
        "envid": None,
        "body_type": None,  # always 7-bit: see the module docstring
        "dsn_of": entry.id,
        "dsn_action": action,
        **last_resort,
    }


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
    entry: QueueEntry,
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
        _text_part(text),
        _part(
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
        ("Date", _date(now)),
        (
            "Message-ID",
            dsn_message_id(_ascii_token(entry.id), action, hostname, (r.address for r in recipients)),
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
    return _header_bytes(header) + CRLF + b"".join(body)


def _returned_part(
    entry: QueueEntry, message: bytes, header_block: bytes, action: Action
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
        elif not _seven_bit_clean(message):
            why = "it contains 8-bit or binary data, which a notification cannot carry unencoded"
        else:
            # A message without a header block is all body: the empty line says so to a MIME reader.
            whole = message if header_block else CRLF + message
            headers = [
                ("Content-Description", "Undelivered message"),
                ("Content-Type", "message/rfc822"),
                ("Content-Transfer-Encoding", "7bit"),
            ]
            return _part(headers, whole), None
    if not header_block:
        return None, why
    headers = [
        ("Content-Description", "Undelivered message headers" if action == "failed" else "Message headers"),
        ("Content-Type", "text/rfc822-headers"),
    ]
    if _seven_bit_clean(header_block):
        return _part([*headers, ("Content-Transfer-Encoding", "7bit")], header_block), why
    encoded = _quoted_printable(header_block)
    return _part([*headers, ("Content-Transfer-Encoding", "quoted-printable")], encoded), why


def _notification_text(
    entry: QueueEntry,
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
        until = f" and will keep trying until {_date(retry_until)}" if retry_until is not None else ""
        paragraphs.append(
            f"{'The' if double else 'Your'} message has not yet been delivered to {whom}. "
            f"The mail system has been trying since {_date(entry.queued_at)}{until}."
        )
    blocks = [_wrap(paragraph) for paragraph in paragraphs]
    blocks.append(
        "\n".join(_recipient_lines(recipient, recipient.action or action) for recipient in recipients)
    )
    if action == "failed":
        advice = [
            _EXPIRED_ADVICE if r.expired_after else _ADVICE.get(_subject(r.status), _ADVICE["5"])
            for r in recipients
        ]
        blocks.append("What you can do:\n" + "\n".join(_wrap(item) for item in dict.fromkeys(advice)))
        if total > count:
            blocks.append(_wrap("The other recipients are not affected by this notice."))
    elif action == "delayed":
        blocks.append(
            _wrap(
                "This is only a warning: you do not need to send the message again. You will be told "
                "again only if it finally cannot be delivered."
            )
        )
    details = [f"    Queue ID:  {_readable(entry.id)}", f"    Queued:    {_date(entry.queued_at)}"]
    subject = _subject_text(message)
    if subject is not None:
        details.append(f"    Subject:   {subject}")
    blocks.append("The message:\n" + "\n".join(details))
    if action == "failed" and entry.dsn_ret == "full" and why is None:
        blocks.append(_wrap("The whole message is attached below, as was asked for when it was sent."))
    elif why is not None:
        blocks.append(
            _wrap(f"The whole message was asked for, but only its headers are attached below: {why}.")
        )
    elif header_fields(message):
        blocks.append(_wrap("The headers of the message are attached below."))
    else:
        blocks.append(_wrap("The message had no header fields, so none are attached."))
    return "\n\n".join(blocks) + "\n"


def _recipient_lines(recipient: ReportedRecipient, action: Action) -> str:
    meaning = _meaning(recipient.status, action)
    lines = [f"    {_readable(recipient.address)}"]
    headline = f"{meaning[0].upper()}{meaning[1:]} ({_readable(recipient.status)})"
    if recipient.expired_after is not None and recipient.diagnostic:
        # It expired although a server answered: say what that server last said, not "could not be reached".
        server = f" from {_readable(recipient.remote_mta)}" if recipient.remote_mta else ""
        return "\n".join(
            lines
            + _indented(
                f"{headline}: not delivered within {_readable(recipient.expired_after)}; the last "
                f"reply{server} was: {_readable(recipient.diagnostic)}"
            )
        )
    lines += _indented(headline + ".")
    if recipient.diagnostic:
        if recipient.smtp_reply:
            server = f" {_readable(recipient.remote_mta)}" if recipient.remote_mta else ""
            said = f"The server{server} said: "
        else:
            said = "Reason: "
        lines += _indented(said + _readable(recipient.diagnostic))
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
    shown = _readable(text)
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _delivery_status(
    entry: QueueEntry,
    recipients: Sequence[ReportedRecipient],
    *,
    action: Action,
    hostname: str,
    retry_until: float | None,
) -> bytes:
    """The body of the message/delivery-status part: the per-message fields, then a block per recipient."""
    per_message = [("Reporting-MTA", f"dns; {hostname}"), ("X-Pymta-Queue-ID", _ascii_field(entry.id))]
    if entry.dsn_envid:
        per_message.append(("Original-Envelope-Id", _ascii_field(entry.dsn_envid)))
    per_message.append(("Arrival-Date", _date(entry.queued_at)))
    blocks = [_header_bytes(per_message)]
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
            fields.append(("Remote-MTA", f"dns; {_ascii_field(remote_mta_name(recipient.remote_mta))}"))
        if recipient.diagnostic:
            kind = "smtp" if recipient.smtp_reply else LOCAL_DIAGNOSTIC_TYPE
            fields.append(("Diagnostic-Code", f"{kind}; {_ascii_field(recipient.diagnostic)}"))
        if recipient.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(recipient.last_attempt)))
        if action == "delayed" and retry_until is not None:
            fields.append(("Will-Retry-Until", _date(retry_until)))
        blocks.append(_header_bytes(fields))
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
    return f"utf-8; {_ascii_field(address)}"


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


# --- MIME and text helpers ---


def _part(headers: list[tuple[str, str]], body: bytes) -> bytes:
    """One body part: its header, an empty line, its body ending in CRLF."""
    if body and not body.endswith(CRLF):
        body += CRLF
    return _header_bytes(headers) + CRLF + body


def _text_part(text: str) -> bytes:
    """The notification text as a text/plain part: us-ascii as is, else UTF-8 in quoted-printable."""
    data = text.replace("\n", "\r\n").encode("utf-8")
    headers = [("Content-Description", "Notification")]
    if text.isascii() and all(len(line) <= MAX_LINE for line in data.split(CRLF)):
        headers += [("Content-Type", "text/plain; charset=us-ascii"), ("Content-Transfer-Encoding", "7bit")]
        return _part(headers, data)
    headers += [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", "quoted-printable"),
    ]
    return _part(headers, _quoted_printable(data))


def _header_bytes(fields: list[tuple[str, str]]) -> bytes:
    """Header fields (ASCII values) folded at spaces to about LINE_WIDTH, each line ending in CRLF."""
    lines = []
    for name, value in fields:
        line = f"{name}:"
        for word in value.split(" "):
            if len(line) + 1 + len(word) > LINE_WIDTH and line.strip() != f"{name}:":
                lines.append(line)
                line = " " + word
            else:
                line += " " + word
        lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


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


def _seven_bit_clean(data: bytes) -> bool:
    """ASCII without NUL, bare CR or LF, and no line longer than MAX_LINE: may go as 7bit."""
    if not data.isascii() or b"\0" in data:
        return False
    lines = data.split(CRLF)
    return all(b"\r" not in line and b"\n" not in line and len(line) <= MAX_LINE for line in lines)


def _quoted_printable(data: bytes) -> bytes:
    """`data` (lines ending in CRLF) in quoted-printable (RFC 2045 6.7): every byte recoverable, lines at
    most 76 characters. Only CRLF is a line break; a lone CR or LF is encoded."""
    out: list[str] = []
    lines = data.split(CRLF)
    for line in lines:
        last = len(line) - 1
        current = ""
        for index, byte in enumerate(line):
            if (33 <= byte <= 126 and byte != ord("=")) or (byte in (9, 32) and index < last):
                token = chr(byte)
            else:
                token = f"={byte:02X}"
            if len(current) + len(token) > 75:
                out.append(current + "=")
                current = ""
            current += token
        out.append(current)
    return "\r\n".join(out).encode("ascii")


def _clean(text: str) -> str:
    """`text` as proper Unicode: bytes that were not UTF-8 (surrogateescape) and lone surrogates become
    U+FFFD."""
    return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)


def _readable(text: str | None) -> str:
    """`text` for the human-readable part: one line, control characters as spaces, bad bytes as U+FFFD."""
    cleaned = _clean(text or "")
    return "".join(" " if ord(char) < 32 or 127 <= ord(char) < 160 else char for char in cleaned).strip()


def _ascii_field(text: str) -> str:
    """`text` for a delivery-status field: printable ASCII on one line; other characters as RFC 6533
    `\\x{HEX}` escapes (a backslash too, so the escapes stay unambiguous); controls as spaces; cut at
    MAX_FIELD_VALUE."""
    out = []
    for char in _clean(text):
        code = ord(char)
        if char == "\\":
            out.append("\\x{5C}")
        elif 32 <= code < 127:
            out.append(char)
        elif code < 32 or code == 127 or 128 <= code < 160:
            out.append(" ")
        else:
            out.append(f"\\x{{{code:X}}}")
    value = " ".join("".join(out).split())
    return value if len(value) <= MAX_FIELD_VALUE else value[:MAX_FIELD_VALUE] + "..."


def _ascii_token(text: str) -> str:
    """`text` with everything but printable ASCII other than <>@ and space dropped: fit for a msg-id."""
    return "".join(char for char in text if 33 <= ord(char) < 127 and char not in '<>@\\"') or "unknown"


def _to_value(address: str) -> str:
    """The To field of a DSN: the address as it is, when it is plain printable ASCII; otherwise (it cannot
    be written in a 7-bit header) an empty group, the envelope still carrying the address."""
    if _PRINTABLE_ADDRESS.fullmatch(address) and not any(char in address for char in '<>(),;:"\\'):
        return address
    return "undisclosed-recipients:;"


def _date(moment: float) -> str:
    """`moment` as an RFC 5322 date in the local time zone (RFC 3464 dates are RFC 5322 dates)."""
    from email.utils import formatdate

    return formatdate(moment, localtime=True)


def _wrap(paragraph: str) -> str:
    return "\n".join(textwrap.wrap(paragraph, LINE_WIDTH, break_on_hyphens=False))


__all__ = [
    "ACTIONS",
    "Action",
    "FULL_RETURN_LIMIT",
    "POSTMASTER",
    "ReportedRecipient",
    "bounce_recipient",
    "build_dsn",
    "delay_warning_due",
    "dsn_envelope",
    "expiry_reason",
    "dsn_message_id",
    "notify_words",
    "remote_mta_name",
    "reported_recipients",
    "status_code",
    "wants",
]
