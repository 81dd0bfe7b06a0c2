"""Who gets a delivery status notification, and whether one is wanted: the queue's side of a DSN
(`pymta.mail.dsn` builds the message itself from plain values).

The flush decides *when* (a recipient failed, the lifetime expired, `retry.warn_after` passed); this module
decides *whether* (`wants`, honouring `sendmail -N`), *to whom* (`bounce_recipient`), which recipients a
notice reports on and how (`reported_recipients`), and the notice's envelope (`dsn_envelope`). It is pure:
no I/O, no clock.

No bounce storms: a DSN comes from `<>`; a message from `<>` that fails is reported to the admin instead (a
double bounce); when that cannot be (no admin, or the admin's own copy is what failed) to the local
postmaster (`POSTMASTER`), delivered without the admin rule (root's mailbox after aliases; the user's own in
user mode); and when the notice to postmaster fails too, `bounce_recipient` says None: the message stays
`failed` in the queue, told to no one, and `failed_retention` never removes it. The admin's copy is
recognised by what routing cannot change: a notice of ours (`dsn_of` in its envelope) whose envelope
recipient is the admin address, however aliases expand it, and any failed recipient that an alias chain
from the admin reached.

A recipient whose `retry.lifetime` ran out fails with an `Expiry` (`expiry`): the bounce reports the last
reply a server gave it, read from that typed field of the state, never from the reason's text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pymta.mail.address import POSTMASTER
from pymta.mail.dsn import (
    EXPIRED_STATUS,
    MAIL_DELIVERY_SYSTEM,
    MAILER_DAEMON,
    SUCCESS_ACTIONS,
    Action,
    ReportedRecipient,
    is_smtp_reply,
    status_code,
)
from pymta.queue.entry import Expiry, QueueEntry

__all__ = ["POSTMASTER"]  # who is told of a double bounce: defined with the addresses, used here by name


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
    recipient that expired (`expiry`) after a server's reply is reported with that reply and that
    server, and status 5.4.7. (A success notice reports what one attempt did, which the queue entry does not
    hold: the flush builds its recipients from the attempt.)"""
    wanted = ("failed",) if action == "failed" else ("pending", "deferred")
    relay = remote_mta if remote_mta and remote_mta not in ("none", "local") else None
    reported = []
    for recipient in entry.recipients:
        if recipient.status not in wanted:
            continue
        reply = recipient.last_error
        expired = recipient.expired if action == "failed" else None
        if expired is not None and expired.reply:
            reported.append(
                ReportedRecipient(
                    recipient.address,
                    EXPIRED_STATUS,
                    expired.reply,
                    expired.relay if is_smtp_reply(expired.reply) else None,
                    last_attempt,
                    expired_after=expired.within,
                )
            )
            continue
        from_server = reply is not None and is_smtp_reply(reply)
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


def expiry(within: str, last_reply: str | None = None, relay: str | None = None) -> Expiry:
    """How a recipient fails when `retry.lifetime` (`within`, as "5d") ran out: with the server's last reply
    kept when one answered, so the sender's DSN still shows what the server said. Its `reason` is the
    recipient's `last_error`."""
    if last_reply and is_smtp_reply(last_reply) and relay and relay not in ("none", "local"):
        return Expiry(within, " ".join(last_reply.split()), relay)
    return Expiry(within)


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
